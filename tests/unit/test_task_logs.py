"""Task logs (meshnet/agent/tasklogs.py): stamped lines, reading by position (--tail, --follow,
rotation), the STREAM_LOG_LINES request and reply, and gathering across hosts."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack

from meshnet.agent import services as services_mod
from meshnet.agent import tasklogs
from meshnet.agent.gossip import REQUEST_CAPS, STREAM_LOG_LINES
from meshnet.agent.services import Services, _CappedLog, _copy_output
from meshnet.agent.tasklogs import (
    HUNG_UP,
    MAX_LINE_BYTES,
    MAX_TASKS_PER_HOST,
    LinesRequest,
    LineStamper,
    LogGatherer,
    parse_lines_reply,
    parse_lines_request,
    parse_record,
    plain_text,
    read_since,
    read_tail,
    serve_lines,
)
from meshnet.events import iso_us

T0 = 1_796_463_001.0


def stamp(t: float) -> str:
    return iso_us(T0 + t)


def write(path: Path, *lines: tuple[float, str, str]) -> None:
    with open(path, "ab") as f:
        for t, stream, text in lines:
            f.write(f"{stamp(t)} {stream} {text}\n".encode())


def test_stamper_cuts_lines_and_keeps_their_bytes() -> None:
    s = LineStamper("stderr")
    assert s.feed(b"par", T0) == b""
    out = s.feed(b"tial\r\nnext\n\nlast", T0 + 1)
    assert out == (f"{stamp(1)} stderr partial\r\n{stamp(1)} stderr next\n"
                   f"{stamp(1)} stderr \n").encode()
    assert s.flush(T0 + 2) == f"{stamp(2)} stderr last\n".encode()
    assert s.flush(T0 + 3) == b""
    long = LineStamper("stdout").feed(b"x" * (2 * MAX_LINE_BYTES + 5) + b"\n", T0)
    assert [len(parse_record(line)[2]) for line in long.split(b"\n")[:-1]] == \
        [MAX_LINE_BYTES, MAX_LINE_BYTES, 5]


def test_records_and_plain_text_read_old_and_new_lines() -> None:
    assert parse_record(f"{stamp(0)} stdout a b".encode()) == (stamp(0), "stdout", "a b")
    assert parse_record(b"an old line") == (None, "stdout", "an old line")
    assert parse_record(b"2026-13-99 stdout x") == (None, "stdout", "2026-13-99 stdout x")
    text = f"{stamp(0)} stdout one\nold two\n{stamp(1)} stderr three\n"
    assert plain_text(text) == "one\nold two\nthree\n"


def test_tail_and_positions(tmp_path: Path) -> None:
    path = tmp_path / "web.1.log"
    write(path, *((i, "stdout", f"line {i}") for i in range(10)))
    chunk = read_tail(path, 3)
    assert chunk is not None
    assert [r[2] for r in chunk.records] == ["line 7", "line 8", "line 9"]
    assert chunk.pos == (os.stat(path).st_ino & 0xFFFFFFFF, path.stat().st_size)
    assert len(read_tail(path, None).records) == 10  # type: ignore[union-attr]
    assert read_tail(path, 0).records == []  # type: ignore[union-attr]
    assert len(read_tail(path, 50).records) == 10  # type: ignore[union-attr]
    small = read_tail(path, None, limit=100)  # the newest whole lines within the limit
    assert small is not None and [r[2] for r in small.records][-1] == "line 9"
    assert all(r[0] is not None for r in small.records)


def test_follow_reads_what_was_added_and_waits_for_a_line_being_written(tmp_path: Path) -> None:
    path = tmp_path / "web.1.log"
    write(path, (0, "stdout", "before"))
    pos = read_tail(path, None).pos  # type: ignore[union-attr]
    write(path, (1, "stdout", "after"))
    with open(path, "ab") as f:
        f.write(f"{stamp(2)} stdout half-writ".encode())
    got = read_since(path, pos, stamp(0))
    assert got is not None and [r[2] for r in got.records] == ["after"]
    with open(path, "ab") as f:
        f.write(b"ten\n")
    again = read_since(path, got.pos, stamp(0))
    assert again is not None and [r[2] for r in again.records] == ["half-written"]
    assert read_since(path, again.pos, stamp(0)).records == []  # type: ignore[union-attr]


def test_a_new_file_is_read_from_the_lines_after_the_follow_began(tmp_path: Path) -> None:
    path = tmp_path / "web.3.log"
    write(path, (0, "stdout", "from a previous life"), (5, "stdout", "new"))
    (tmp_path / "old.log").write_text("unstamped\n")
    got = read_since(path, None, stamp(3))
    assert got is not None and [r[2] for r in got.records] == ["new"]


def test_rotation_reads_the_rest_of_the_old_file_first(tmp_path: Path) -> None:
    path = tmp_path / "web.1.log"
    write(path, (0, "stdout", "a"))
    pos = read_tail(path, None).pos  # type: ignore[union-attr]
    write(path, (1, "stdout", "b"))
    os.replace(path, tmp_path / "web.1.log.1")  # what _CappedLog does at its cap
    write(path, (2, "stdout", "c"))
    got = read_since(path, pos, stamp(10))
    assert got is not None and [r[2] for r in got.records] == ["b", "c"]


def test_too_much_since_the_last_poll_is_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "web.1.log"
    write(path, (0, "stdout", "start"))
    pos = read_tail(path, None).pos  # type: ignore[union-attr]
    write(path, *((1, "stdout", f"{i:04d}" + "y" * 60) for i in range(100)))
    got = read_since(path, pos, None, limit=1000)
    assert got is not None and 0 < len(got.records) < 100
    assert got.records[-1][2].startswith("0099")
    assert got.skipped > 0 and got.pos[1] == path.stat().st_size
    assert all(r[0] == stamp(1) for r in got.records)  # whole lines only


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "web.4.log")
    (tmp_path / "outside").write_text("secret\n")
    (tmp_path / "web.3.log").symlink_to(tmp_path / "outside")
    for name in ("web.4.log", "web.3.log", "missing.log"):
        assert read_tail(tmp_path / name, None) is None
        assert read_since(tmp_path / name, None, None) is None


def test_request_round_trip_and_worst_case_fits_the_cap() -> None:
    req = LinesRequest("web", tail=5, since=stamp(0), cursors={1: (7, 100), 2: (8, 0)})
    assert parse_lines_request(req.encode()) == req
    assert parse_lines_request(LinesRequest("web").encode()) == LinesRequest("web")
    # every task a host may report, at the largest slot, inode and offset a log can have
    worst = LinesRequest("x" * 63, tail=None, since=stamp(0), cursors={
        9_999 - i: (0xFFFFFFFF, (1 << 20) * 2) for i in range(MAX_TASKS_PER_HOST)})
    assert len(worst.encode()) <= REQUEST_CAPS[STREAM_LOG_LINES]


def test_serve_lines_answers_only_the_services_files(tmp_path: Path) -> None:
    for name in ("web.1.log", "web.2.log", "web.x.log", "other.1.log", "web.1.log.1"):
        write(tmp_path / name, (0, "stdout", name))
    reply = serve_lines(tmp_path, "h1", LinesRequest("web", tail=1))
    node, tasks = parse_lines_reply("web", reply)
    assert node == "h1" and sorted(tasks) == ["web.1", "web.2"]
    assert tasks["web.1"].records == [(stamp(0), "stdout", "web.1.log")]
    # a follow: nothing new on web.1, a new file web.3 from after the start
    cursors = {int(t.rpartition(".")[2]): got.pos for t, got in tasks.items()}
    write(tmp_path / "web.3.log", (-5, "stdout", "old"), (5, "stderr", "fresh"))
    _, tasks = parse_lines_reply("web", serve_lines(
        tmp_path, "h1", LinesRequest("web", since=stamp(1), cursors=cursors)))
    assert {t: [r[2] for r in got.records] for t, got in tasks.items()} == \
        {"web.1": [], "web.2": [], "web.3": ["fresh"]}


def test_a_reply_over_budget_leaves_tasks_for_the_next_poll(tmp_path: Path,
                                                          monkeypatch: Any) -> None:
    for slot in (1, 2, 3):
        write(tmp_path / f"web.{slot}.log", *((i, "stdout", "z" * 100) for i in range(5)))
    monkeypatch.setattr(tasklogs, "REPLY_BUDGET_BYTES", 2 * 5 * (100 + 40))
    _, tasks = parse_lines_reply("web", serve_lines(tmp_path, "h1", LinesRequest("web")))
    assert sorted(tasks) == ["web.1", "web.2"]
    assert all(got.skipped == 0 for got in tasks.values())  # deferred, not skipped
    cursors = {int(t.rpartition(".")[2]): got.pos for t, got in tasks.items()}
    cursors[3] = (os.stat(tmp_path / "web.3.log").st_ino & 0xFFFFFFFF, 0)
    _, tasks = parse_lines_reply("web", serve_lines(
        tmp_path, "h1", LinesRequest("web", since=stamp(0), cursors=cursors)))
    assert len(tasks["web.3"].records) == 5 and tasks["web.1"].records == []


def test_parse_lines_reply_keeps_only_well_formed_entries_of_the_service() -> None:
    good = {"pos": [1, 2], "skipped": 0, "lines": [[stamp(0), "stdout", "ok"],
                                                   [None, "stdout", "old"],
                                                   ["yesterday", "stdout", "bad time"],
                                                   [stamp(0), "stdin", "bad stream"],
                                                   [stamp(0), "stdout", b"bytes"], "x"]}
    raw = msgpack.packb({"node": "h2", "tasks": {
        "web.1": good, "other.1": good, "web.2\nweb.9": good, "../web.1": good,
        "web.3": {**good, "pos": [-1, 0]}, "web.4": {**good, "skipped": "lots"},
        "web.5": "not a map"}})
    node, tasks = parse_lines_reply("web", raw)
    assert node == "h2" and sorted(tasks) == ["web.1"]
    assert tasks["web.1"].records == [(stamp(0), "stdout", "ok"), (None, "stdout", "old")]
    for junk in (b"", b"\xc1", msgpack.packb([1]), msgpack.packb({"tasks": []})):
        assert parse_lines_reply("web", junk)[1] == {}


def test_stamped_output_reaches_the_log(tmp_path: Path) -> None:
    async def run() -> None:
        out, err = asyncio.StreamReader(), asyncio.StreamReader()
        out.feed_data(b"hello\nno newline")
        out.feed_eof()
        err.feed_data(b"oops\n")
        err.feed_eof()
        logf = _CappedLog(tmp_path / "web.1.log")
        await asyncio.gather(_copy_output(out, "stdout", logf), _copy_output(err, "stderr", logf))
        logf.close()

    asyncio.run(run())
    records = [parse_record(line) for line in (tmp_path / "web.1.log").read_bytes().splitlines()]
    assert sorted((s, t) for _, s, t in records) == \
        [("stderr", "oops"), ("stdout", "hello"), ("stdout", "no newline")]
    assert all(t is not None for t, _, _ in records)


# --- gathering across hosts, and following -----------------------------------------------------

class Hosts:
    """Fake hosts, each a log directory answering STREAM_LOG_LINES (or only the older
    STREAM_LOGS, or nothing)."""

    def __init__(self, root: Path, names: list[str]) -> None:
        self.dirs = {n: root / n for n in names}
        for d in self.dirs.values():
            d.mkdir()
        self.legacy_only: set[str] = set()
        self.down: set[str] = set()
        self.asked_legacy: list[str] = []

    async def ask(self, host: str, body: bytes) -> bytes | None:
        if host in self.down:
            return None
        if host in self.legacy_only:
            return HUNG_UP
        return serve_lines(self.dirs[host], host, parse_lines_request(body))

    async def legacy(self, host: str) -> dict[str, str] | None:
        self.asked_legacy.append(host)
        return {p.name[:-4]: plain_text(p.read_text()) for p in self.dirs[host].iterdir()}


def gatherer(hosts: Hosts, sent: list[dict[str, Any]]) -> LogGatherer:
    async def send(frame: dict[str, Any]) -> None:
        sent.append(frame)

    async def local(req: LinesRequest) -> bytes:
        return serve_lines(hosts.dirs["h1"], "h1", req)

    return LogGatherer("web", "h1", send, local=local, ask=hosts.ask, legacy=hosts.legacy)


def lines_of(sent: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(r["node"], r["task"], r["line"]) for f in sent for r in f.get("logs", [])]


def test_gather_then_follow_across_hosts(tmp_path: Path) -> None:
    hosts = Hosts(tmp_path, ["h1", "h2", "h3"])
    write(hosts.dirs["h1"] / "web.1.log", (0, "stdout", "a1"), (2, "stdout", "a2"))
    write(hosts.dirs["h2"] / "web.2.log", (1, "stdout", "b1"))
    hosts.down.add("h3")
    sent: list[dict[str, Any]] = []
    g = gatherer(hosts, sent)

    async def run() -> None:
        await g.first(["h2", "h3"], tail=None)
        assert lines_of(sent) == [("h1", "web.1", "a1"), ("h2", "web.2", "b1"),
                                  ("h1", "web.1", "a2")]  # one round in time order
        sent.clear()
        write(hosts.dirs["h2"] / "web.2.log", (11, "stdout", "b2"))
        # a task that starts later on a host that answered nothing before (scale-up)
        hosts.down.clear()
        write(hosts.dirs["h3"] / "web.3.log", (-1, "stdout", "stale"), (12, "stdout", "c1"))
        await g.poll(["h2", "h3"], stamp(10))
        assert lines_of(sent) == [("h2", "web.2", "b2"), ("h3", "web.3", "c1")]
        sent.clear()
        await g.poll(["h2", "h3"], stamp(10))
        assert lines_of(sent) == []  # nothing twice
        assert g.tasks == {"web.1", "web.2", "web.3"}
        assert hosts.asked_legacy == []  # a host that could not be asked is not asked twice

    asyncio.run(run())


def test_tail_per_task_and_the_older_agents_text(tmp_path: Path) -> None:
    hosts = Hosts(tmp_path, ["h1", "h2"])
    write(hosts.dirs["h1"] / "web.1.log", *((i, "stdout", f"a{i}") for i in range(5)))
    (hosts.dirs["h2"] / "web.2.log").write_text("old one\nold two\n")
    hosts.legacy_only.add("h2")
    sent: list[dict[str, Any]] = []
    asyncio.run(gatherer(hosts, sent).first(["h2"], tail=2))
    got = lines_of(sent)
    assert ("h1", "web.1", "a3") in got and ("h1", "web.1", "a4") in got and len(got) == 4
    assert ("h2", "web.2", "old one") in got


# --- the op, with the older form of a peer's reply ---------------------------------------------

def test_op_logs_follows_until_the_service_is_removed(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(services_mod, "FOLLOW_POLL_S", 0.0)
    write(tmp_path / "web.1.log", (0, "stdout", "first"))
    s = object.__new__(Services)
    s.log_dir = tmp_path
    s.node = "h1"
    polls = []
    services = {"web": SimpleNamespace(name="web")}
    s.store = SimpleNamespace(services=lambda: services)
    s.peers = lambda: []
    s._task_rows = lambda service: [{"node": "h1"}]

    async def request(addr: Any, service: int, body: bytes, *a: Any) -> bytes:
        raise AssertionError("no peers")

    s.gossip = SimpleNamespace(request=request)
    sent: list[dict[str, Any]] = []

    async def send(frame: dict[str, Any]) -> None:
        sent.append(frame)
        polls.append(1)
        if len(polls) == 1:
            write(tmp_path / "web.1.log", (1, "stdout", "second"))
        elif len(polls) == 2:
            services.clear()  # `service rm`: one last round, then the stream ends

    result = asyncio.run(s.op_logs({"name": "web", "follow": True}, send))
    assert [line for _, _, line in lines_of(sent)] == ["first", "second"]
    assert result == {"service": "web", "tasks": ["web.1"]}


def test_logs_of_removed_services_are_pruned_once_untouched(tmp_path: Path) -> None:
    """Every slot ever run here kept its logs (up to 2 MiB) for good: a disk leak."""
    now = 1_800_000_000.0
    old = now - tasklogs.PRUNE_AFTER_S - 1
    files = {"gone.1.log": old, "gone.1.log.1": old, "gone.2.log": now - 5,  # still written
             "web.1.log": old, "web.1.log.1": old,  # a defined service: kept
             "notes.txt": old, "gone.x.log": old, "gone.1.log.2": old}  # not task logs
    for name, mtime in files.items():
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (mtime, mtime))
    os.mkdir(tmp_path / "dir.1.log")
    os.utime(tmp_path / "dir.1.log", (old, old))
    os.symlink("/etc/passwd", tmp_path / "link.1.log")
    pruned = tasklogs.logs_to_prune(tmp_path, {"web"}, now)
    assert sorted(p.name for p in pruned) == ["gone.1.log", "gone.1.log.1"]
    assert tasklogs.logs_to_prune(tmp_path / "missing", set(), now) == []


def test_the_scheduler_prunes_only_with_a_trustworthy_view(tmp_path: Path) -> None:
    old = os.path.getmtime(tmp_path) - tasklogs.PRUNE_AFTER_S - 1
    for name in ("gone.1.log", "web.2.log", "run.1.log"):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (old, old))
    fake = SimpleNamespace(
        state=SimpleNamespace(synced=False), nodes=lambda: ["a", "b"], log_dir=tmp_path,
        tasks={"run.1": SimpleNamespace(service="run")}, counters={"logs_pruned": 0},
        _logs_pruned_at=-1e9)
    prune = services_mod.Services._prune_logs
    prune(fake, {"web": object()})  # type: ignore[arg-type]
    assert (tmp_path / "gone.1.log").exists()  # no exchange of state yet: a stale view
    fake.state.synced = True
    prune(fake, {"web": object()})  # type: ignore[arg-type]
    assert sorted(os.listdir(tmp_path)) == ["run.1.log", "web.2.log"]  # defined, or running
    assert fake.counters["logs_pruned"] == 1
    prune(fake, {})  # type: ignore[arg-type]
    assert (tmp_path / "web.2.log").exists()  # within LOG_PRUNE_PERIOD_S of the last look
    fake._logs_pruned_at = -1e9
    prune(fake, {})  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == ["run.1.log"] and fake.counters["logs_pruned"] == 2
