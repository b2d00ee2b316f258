"""What `meshctl events` and `service logs` share (meshnet/events.py): DURATION, filters, and
the human lines; and the meshctl side of both streams (meshnet/cli/streams.py)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshnet.cli import meshctl, streams
from meshnet.events import (
    MAX_SINCE_S,
    event_line,
    iso_ms,
    iso_us,
    log_line,
    matches,
    parse_duration,
    parse_filters,
)


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400), ("1h30m", 5400), ("250ms", 0.25),
    ("1.5h", 5400), ("0s", 0), ("2h0m5s", 7205)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [
    "", "10", "-5m", "10x", "m", "1 m", " 1m", "1m ", "1M", "1e3s", "inf", "nans", "1.s", ".5s",
    "10m\n", "\u0661\u0660m", "1w", "367d", "9" * 13 + "s", "1m" * 7])
def test_bad_durations_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_duration(text)
    assert "\n" not in str(e.value)
    assert parse_duration("366d") == MAX_SINCE_S


def test_filters() -> None:
    f = parse_filters(["type=member", "type=task", "node=h2"])
    assert f == {"type": frozenset({"member", "task"}), "node": frozenset({"h2"})}
    assert matches({"type": "task", "node": "h2"}, f)
    assert not matches({"type": "task", "node": "h1"}, f)
    assert not matches({"type": "member", "name": "h2"}, f)  # a member has no node field
    assert matches({"type": "task", "slot": 3}, parse_filters(["type=task"]))
    assert parse_filters(None) == {}
    for bad in (["type"], ["type="], ["=x"], ["kind=member"], ["type=members"], "type=member",
                [1], ["x=" + "y" * 200], ["type=task"] * 33):
        with pytest.raises(ValueError):
            parse_filters(bad)


def test_times() -> None:
    assert iso_ms(1_796_463_001.1239) == "2026-12-05T09:30:01.123Z"
    assert iso_us(1_796_463_001.5) == "2026-12-05T09:30:01.500000Z"
    assert iso_ms(59.9999) == "1970-01-01T00:00:59.999Z"  # never rounds into a 60th second


def test_event_lines() -> None:
    doc = {"time": "2026-12-05T09:30:01.123Z", "type": "member", "action": "dead",
           "name": "h3", "addr": "10.0.0.3:7946", "state": "dead", "incarnation": 4}
    assert event_line(doc) == \
        "2026-12-05T09:30:01.123Z member h3 dead addr=10.0.0.3:7946 incarnation=4"
    task = {"time": "T", "type": "task", "action": "failed", "task": "web.2", "service": "web",
            "slot": 2, "node": "h2", "state": "failed", "old_state": "running", "exit_code": 1}
    assert event_line(task) == \
        "T task web.2 failed service=web slot=2 node=h2 old_state=running exit_code=1"
    net = {"time": "T", "type": "network", "action": "created", "name": "n", "encrypted": True}
    assert event_line(net) == "T network n created encrypted=yes"
    odd = {"time": "T", "type": "key", "action": "install", "key_id": "ab12",
           "by": "a b\n\x1b[31m"}
    line = event_line(odd)
    assert "\n" not in line and "\x1b" not in line and line.startswith("T key ab12 install by=")


def test_log_lines() -> None:
    rec = {"task": "web.1", "node": "h1", "time": "2026-12-05T09:30:01.123456Z",
           "stream": "stdout", "line": "hello"}
    assert log_line(rec, False) == "web.1 | hello"
    assert log_line(rec, True) == "web.1 | 2026-12-05T09:30:01.123456Z hello"
    assert log_line({**rec, "time": None}, True) == "web.1 | - hello"


# --- meshctl's side ----------------------------------------------------------------------------

def test_meshctl_parses_the_events_and_logs_flags() -> None:
    p = meshctl.build_parser()
    ns = p.parse_args(["events", "--since", "10m", "--filter", "type=member",
                       "--filter", "type=task", "--json"])
    assert meshctl.to_request(ns) == ("events", "events", {
        "since": 600.0, "filters": ["type=member", "type=task"]})
    assert ns.json
    ns = p.parse_args(["service", "logs", "web", "-f", "--tail", "20", "--timestamps"])
    assert meshctl.to_request(ns) == ("service logs", "service.logs",
                                      {"name": "web", "tail": 20, "follow": True})
    for bad in (["events", "--since", "10"], ["events", "--filter", "type=nope"],
                ["service", "logs", "web", "--tail", "-1"],
                ["service", "logs", "web", "--tail", "x"]):
        with pytest.raises(SystemExit) as e:
            p.parse_args(bad)
        assert e.value.code == meshctl.EXIT_USAGE


def frames_of(*frames: dict[str, Any]) -> streams.Remote:
    def remote(on_event: Any) -> tuple[int, Any]:
        for f in frames:
            on_event(f)
        return 0, {"service": "web", "tasks": ["web.1"]}
    return remote


def _ns(as_json: bool, timestamps: bool = False) -> Any:
    return meshctl.build_parser().parse_args(
        ["service", "logs", "web", *(["--json"] if as_json else []),
         *(["-t"] if timestamps else [])])


REC = {"task": "web.1", "node": "h1", "time": "2026-12-05T09:30:01.123456Z", "stream": "stderr",
       "line": "hi there"}


def test_json_streams_are_json_lines_and_nothing_else(capsys: pytest.CaptureFixture[str]) -> None:
    code = streams.follow(_ns(True), frames_of(
        {"logs": [REC, {**REC, "line": "two"}]},
        {"skipped": [{"task": "web.1", "node": "h1", "bytes": 99}]},
        {"events": [{"time": "T", "type": "member", "action": "dead", "name": "h3"}]},
        {"dropped": 3}))
    out, err = capsys.readouterr()
    assert code == 0
    docs = [json.loads(line) for line in out.splitlines()]
    assert docs[0] == REC and docs[1]["line"] == "two"
    assert docs[2]["type"] == "member" and docs[2]["name"] == "h3"
    assert docs[3]["type"] == "events" and docs[3]["action"] == "dropped" and \
        docs[3]["count"] == 3
    assert len(docs) == 4  # not the op's final result
    assert "99 bytes of output skipped" in err


def test_human_streams(capsys: pytest.CaptureFixture[str]) -> None:
    streams.follow(_ns(False, timestamps=True), frames_of(
        {"logs": [REC]}, {"data": "web.2 | from an older agent\n"}))
    out, _ = capsys.readouterr()
    assert out.splitlines() == ["web.1 | 2026-12-05T09:30:01.123456Z hi there",
                                "web.2 | - from an older agent"]


def test_ctrl_c_ends_a_stream_quietly_with_0(capsys: pytest.CaptureFixture[str]) -> None:
    def remote(on_event: Any) -> tuple[int, Any]:
        on_event({"events": [{"time": "T", "type": "task", "action": "running",
                              "task": "web.1"}]})
        raise KeyboardInterrupt

    assert streams.follow(_ns(False), remote) == 0
    out, err = capsys.readouterr()
    assert out == "T task web.1 running\n" and err == ""


def test_a_reader_that_goes_away_ends_a_stream_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """`meshctl events | head -1`: the closed pipe is not taken for a lost agent (exit 3)."""
    class Closed:
        def write(self, text: str) -> int:
            raise BrokenPipeError

        def flush(self) -> None:
            raise BrokenPipeError

        def fileno(self) -> int:
            raise ValueError("no file")

    def call(self: Any, op: str, args: Any, timeout: Any) -> Any:
        yield {"event": {"events": [{"time": "T", "type": "task", "action": "running"}]}}
        raise AssertionError("meshctl read on after its reader went away")

    monkeypatch.setattr(meshctl.Client, "call", call)
    monkeypatch.setattr("sys.stdout", Closed())
    assert meshctl.main(["events"]) == meshctl.EXIT_OK
