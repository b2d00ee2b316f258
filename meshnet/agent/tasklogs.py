"""Task output logs: the stamped line format, reading by position, and `service logs --follow`.

A task's output is written one line per line of output, stamped with the time the agent read
it and the stream it came from (`<service>.<slot>.log` in state_dir/logs, size-capped and
rotated to `.log.1` by services._CappedLog):

    2026-12-05T09:30:01.123456Z stdout the line as the task printed it

A line longer than MAX_LINE_BYTES is cut (Docker's 16 KiB); a last line without a newline is
written when the output ends. Lines of files written before this format have no time and count
as stdout.

`service logs` gathers from every host over stream service STREAM_LOG_LINES: the first request
asks each host for the last lines of each task and where its file ends (inode, offset); with
`--follow` the gathering agent then asks the hosts that run the service's tasks every
FOLLOW_POLL_S for what was written since those positions. A file that appears later (a task
that started on a new host, or after a scale-up) is read from the lines stamped after the
follow began. Every read and reply is bounded (below); nothing is kept between requests on the
serving host.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from meshnet.agent.control import SendEvent
from meshnet.events import MAX_TAIL_LINES, iso_us

STREAMS = ("stdout", "stderr")
# Docker cuts log lines at 16 KiB too: one record never needs more than this in memory.
MAX_LINE_BYTES = 16 * 1024
# A task's log file is capped at 1 MiB (services.LOG_CAP_BYTES); one reply carries at most
# this much of one task (the tail, or what was written since the last poll; the rest is skipped
# and said so).
TASK_READ_BYTES = 64 << 10
# One host's reply carries at most this much (each line's text and 40 bytes of framing, an
# upper bound): 256 tasks of 64 KiB of stamped lines fit, under the stream's 20 MiB reply cap.
# A task past it is left out of this reply (with --follow, its position is kept for the next).
REPLY_BUDGET_BYTES = 16 << 20
# What a line costs in a reply beyond its text (msgpack framing, time stamp, stream).
LINE_FRAMING_BYTES = 40
# A follow request carries a position per task: 256 of them fit the 4 KiB request cap of
# STREAM_LOG_LINES (gossip.REQUEST_CAPS; a test checks it). More tasks of one service on one
# host are left out of `service logs` beyond this many (lowest slots first).
MAX_TASKS_PER_HOST = 256
# How often a follow asks each host for new lines: a printed line shows within about this.
FOLLOW_POLL_S = 0.5
# Lines per control frame to meshctl.
FRAME_LINES = 512

_STAMP_RE = re.compile(rb"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z) "
                       rb"(stdout|stderr) ")
_STAMP_TEXT_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z "
                            r"(?:stdout|stderr) ")
_TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
_SLOT_RE = re.compile(r"[0-9]{1,10}")
LOG_SUFFIX = ".log"


# A removed service's task logs are deleted once untouched this long (Docker removes a task's
# logs with its container); a defined service's stay, capped per slot (services.LOG_CAP_BYTES,
# plus one rotated file). Otherwise every slot ever run here would keep its logs for good.
PRUNE_AFTER_S = 600.0


def logs_to_prune(log_dir: Path, keep: Iterable[str], now: float) -> list[Path]:
    """The task logs (`<service>.<slot>.log` and its rotated `.1`) in LOG_DIR of services not
    in KEEP that nothing has written for PRUNE_AFTER_S. Never raises."""
    keep = set(keep)
    try:
        names = os.listdir(log_dir)
    except OSError:
        return []
    out = []
    for fname in names:
        stem = fname[:-2] if fname.endswith(LOG_SUFFIX + ".1") else fname
        if not stem.endswith(LOG_SUFFIX):
            continue
        service, dot, slot = stem[:-len(LOG_SUFFIX)].rpartition(".")
        if not dot or not service or not _SLOT_RE.fullmatch(slot) or service in keep:
            continue
        path = log_dir / fname
        try:
            st = path.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= PRUNE_AFTER_S:
            out.append(path)
    return out


# --- writing ----------------------------------------------------------------------------------


class LineStamper:
    """Cuts one stream's output into stamped lines (at most MAX_LINE_BYTES of text each)."""

    def __init__(self, stream: str) -> None:
        self.stream = stream.encode()
        self.partial = bytearray()

    def feed(self, data: bytes, now: float) -> bytes:
        """Records for every complete line in DATA (and what came before it)."""
        self.partial += data
        out = bytearray()
        while True:
            nl = self.partial.find(b"\n", 0, MAX_LINE_BYTES + 1)
            if nl >= 0:
                out += self._record(self.partial[:nl], now)
                del self.partial[:nl + 1]
            elif len(self.partial) >= MAX_LINE_BYTES:
                out += self._record(self.partial[:MAX_LINE_BYTES], now)
                del self.partial[:MAX_LINE_BYTES]
            else:
                return bytes(out)

    def flush(self, now: float) -> bytes:
        """The last line, if the output ended without a newline."""
        if not self.partial:
            return b""
        out = self._record(self.partial, now)
        self.partial.clear()
        return out

    def _record(self, text: bytes | bytearray, now: float) -> bytes:
        return iso_us(now).encode() + b" " + self.stream + b" " + bytes(text) + b"\n"


def stamped(stream: str, text: str, now: float) -> bytes:
    """One record (e.g. the agent's own note that a task could not start)."""
    return LineStamper(stream).feed(text.encode() + b"\n", now)


# --- reading ----------------------------------------------------------------------------------

Record = tuple[str | None, str, str]  # (time, stream, text)


def parse_record(line: bytes) -> Record:
    m = _STAMP_RE.match(line)
    if m is None:
        return None, "stdout", line.decode(errors="replace")
    return m.group(1).decode(), m.group(2).decode(), line[m.end():].decode(errors="replace")


def plain_text(text: str) -> str:
    """Stamped lines back to the output as printed (for peers that ask for the old form)."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return "".join(_STAMP_TEXT_RE.sub("", line, count=1) + "\n" for line in lines)


@dataclass
class Chunk:
    """What one read of a task's log gave."""

    records: list[Record] = field(default_factory=list)
    pos: tuple[int, int] = (0, 0)  # (inode folded to 32 bits, offset after the last full line)
    skipped: int = 0  # bytes of output passed over (more than TASK_READ_BYTES since last time)


def _ino(st: os.stat_result) -> int:
    return st.st_ino & 0xFFFFFFFF


def open_regular(path: Path) -> tuple[int, os.stat_result] | None:
    """An fd on PATH if it is a regular file (never following a symlink, never blocking on a
    FIFO), with its stat; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def read_span(fd: int, start: int, end: int) -> bytes:
    os.lseek(fd, start, os.SEEK_SET)
    chunks, left = [], end - start
    while left > 0 and (chunk := os.read(fd, min(left, 65536))):
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _span(fd: int, start: int, size: int, limit: int) -> tuple[list[bytes], int, int]:
    """Complete lines of [START, SIZE), at most LIMIT bytes of them (the newest):
    (lines, offset after the last complete line, bytes skipped)."""
    skipped = 0
    if size - start > limit:
        skipped, start = size - limit - start, size - limit
        data = read_span(fd, start, size)
        cut = data.find(b"\n")  # we landed inside a line: it starts with the next one
        skipped += cut + 1 if cut >= 0 else len(data)
        start += cut + 1 if cut >= 0 else len(data)
        data = data[cut + 1:] if cut >= 0 else b""
    else:
        data = read_span(fd, start, size)
    end = data.rfind(b"\n") + 1  # a line still being written is read next time
    return data[:end].split(b"\n")[:-1], start + end, skipped


def read_tail(path: Path, lines: int | None, limit: int = TASK_READ_BYTES) -> Chunk | None:
    """The last LINES lines (None: all within LIMIT bytes) of PATH and where it ends."""
    opened = open_regular(path)
    if opened is None:
        return None
    fd, st = opened
    try:
        raw, end, _ = _span(fd, 0, st.st_size, limit)
    except OSError:
        return None
    finally:
        os.close(fd)
    if lines is not None:
        raw = raw[-lines:] if lines else []
    return Chunk([parse_record(line) for line in raw], (_ino(st), end))


def read_since(path: Path, pos: tuple[int, int] | None, since: str | None,
               limit: int = TASK_READ_BYTES) -> Chunk | None:
    """What PATH gained after POS (inode, offset). If the file there is another one (rotated
    to `.log.1`, whose rest is read first, or new), or POS is None, its lines stamped at or
    after SINCE."""
    opened = open_regular(path)
    if opened is None:
        return None
    fd, st = opened
    out = Chunk(pos=(_ino(st), 0))
    try:
        start = 0
        if pos is not None and pos[0] == _ino(st) and pos[1] <= st.st_size:
            start = pos[1]
        elif pos is not None:
            rest = _rotated_rest(path, pos, limit)
            if rest is not None:
                out.records += rest.records
                out.skipped += rest.skipped
                limit = max(0, limit - sum(len(r[2]) for r in rest.records))
                since = None  # the new file began after what we read of the old one
        raw, end, skipped = _span(fd, start, st.st_size, limit)
    except OSError:
        return None
    finally:
        os.close(fd)
    records = [parse_record(line) for line in raw]
    if start == 0 and since is not None:
        records = [r for r in records if r[0] is not None and r[0] >= since]
    out.records += records
    out.skipped += skipped
    out.pos = (_ino(st), end)
    return out


def _rotated_rest(path: Path, pos: tuple[int, int], limit: int) -> Chunk | None:
    """The rest of the file POS was in, if it is now `NAME.log.1` (rotated at the cap)."""
    opened = open_regular(path.with_name(path.name + ".1"))
    if opened is None:
        return None
    fd, st = opened
    try:
        if _ino(st) != pos[0] or pos[1] > st.st_size:
            return None
        raw, _, skipped = _span(fd, pos[1], st.st_size, limit)
        return Chunk([parse_record(line) for line in raw], skipped=skipped)
    except OSError:
        return None
    finally:
        os.close(fd)


def task_of_log(service: str, fname: str) -> str | None:
    """The task name if FNAME is exactly `SERVICE.<slot>.log`, else None (literal comparison:
    SERVICE is never a pattern)."""
    stem = service + "."
    if not (fname.startswith(stem) and fname.endswith(LOG_SUFFIX)):
        return None
    slot = fname[len(stem):len(fname) - len(LOG_SUFFIX)]
    return f"{stem}{slot}" if _SLOT_RE.fullmatch(slot) else None


# --- the STREAM_LOG_LINES request and reply -----------------------------------------------------


@dataclass(frozen=True)
class LinesRequest:
    service: str
    tail: int | None = None  # lines per task on a first request; None: all (bounded)
    since: str | None = None  # new files: lines stamped at or after this (ISO, as stamped)
    cursors: dict[int, tuple[int, int]] | None = None  # slot -> pos; None: a first request

    def encode(self) -> bytes:
        cursors = None if self.cursors is None else \
            [[slot, ino, off] for slot, (ino, off) in sorted(self.cursors.items())]
        return bytes(msgpack.packb({"service": self.service, "tail": self.tail,
                                    "since": self.since, "from": cursors}))


def parse_lines_request(body: bytes) -> LinesRequest:
    """A peer's STREAM_LOG_LINES request; ValueError for anything but what ``encode`` makes.
    (The service name is checked by the caller, as for every name.)"""
    try:
        doc = msgpack.unpackb(body, raw=False, max_str_len=256, max_bin_len=0,
                              max_array_len=MAX_TASKS_PER_HOST, max_map_len=8)
    except (ValueError, msgpack.UnpackException) as e:  # msgpack's decoding errors
        raise ValueError(f"undecodable logs request: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("service"), str):
        raise ValueError("a logs request is a map with a service")
    tail, since, raw_cursors = doc.get("tail"), doc.get("since"), doc.get("from")
    if tail is not None and (type(tail) is not int or not 0 <= tail <= MAX_TAIL_LINES):
        raise ValueError(f"tail must be 0..{MAX_TAIL_LINES} or absent")
    if since is not None and (not isinstance(since, str) or not _TIME_RE.fullmatch(since)):
        raise ValueError("since must be a log time stamp")
    cursors: dict[int, tuple[int, int]] | None = None
    if raw_cursors is not None:
        if not isinstance(raw_cursors, list):
            raise ValueError("from must be a list")
        cursors = {}
        for item in raw_cursors:
            if not (isinstance(item, list) and len(item) == 3 and
                    all(type(v) is int and 0 <= v < 1 << 63 for v in item)):
                raise ValueError("a position is [slot, inode, offset]")
            cursors[item[0]] = (item[1], item[2])
    return LinesRequest(doc["service"], tail, since, cursors)


def serve_lines(log_dir: Path, node: str, req: LinesRequest) -> bytes:
    """The reply to REQ from this host's log files of REQ.service (a checked name)."""
    tasks: list[tuple[int, str]] = []
    try:
        names = os.listdir(log_dir)
    except OSError:
        names = []
    for fname in names:
        task = task_of_log(req.service, fname)
        if task is not None:
            tasks.append((int(task.rpartition(".")[2]), task))
    tasks.sort()
    out: dict[str, Any] = {}
    budget = REPLY_BUDGET_BYTES
    for slot, task in tasks[:MAX_TASKS_PER_HOST]:
        path = log_dir / f"{task}{LOG_SUFFIX}"
        if req.cursors is None:
            chunk = read_tail(path, req.tail)
        else:
            chunk = read_since(path, req.cursors.get(slot), req.since)
        if chunk is None:
            continue
        cost = sum(len(r[2].encode()) + LINE_FRAMING_BYTES for r in chunk.records)
        if cost > budget:
            break  # reading has no side effect: this task and the rest come next time
        budget -= cost
        out[task] = {"pos": list(chunk.pos), "skipped": chunk.skipped,
                     "lines": [list(r) for r in chunk.records]}
    return bytes(msgpack.packb({"node": node, "tasks": out}))


@dataclass
class TaskLines:
    pos: tuple[int, int]
    skipped: int
    records: list[Record]


def parse_lines_reply(service: str, raw: bytes) -> tuple[str | None, dict[str, TaskLines]]:
    """A host's STREAM_LOG_LINES answer: (its node name, task -> lines), keeping only well-formed
    entries of SERVICE's tasks whatever the host sent. Never raises."""
    try:
        doc = msgpack.unpackb(raw, raw=False)
    except (ValueError, msgpack.UnpackException):  # msgpack's decoding errors
        return None, {}
    if not isinstance(doc, dict):
        return None, {}
    node = doc.get("node") if isinstance(doc.get("node"), str) else None
    tasks = doc.get("tasks")
    if not isinstance(tasks, dict):
        return node, {}
    out: dict[str, TaskLines] = {}
    for task, entry in tasks.items():
        if len(out) >= MAX_TASKS_PER_HOST:  # what we keep a position for stays bounded
            break
        if not isinstance(task, str) or task_of_log(service, task + LOG_SUFFIX) is None or \
                not isinstance(entry, dict):
            continue
        pos, skipped, lines = entry.get("pos"), entry.get("skipped"), entry.get("lines")
        if not (isinstance(pos, list) and len(pos) == 2 and
                all(type(v) is int and 0 <= v < 1 << 63 for v in pos)):
            continue
        if type(skipped) is not int or skipped < 0 or not isinstance(lines, list):
            continue
        records: list[Record] = []
        for rec in lines:
            if isinstance(rec, list) and len(rec) == 3 and \
                    (rec[0] is None or (isinstance(rec[0], str) and _TIME_RE.fullmatch(rec[0])))\
                    and rec[1] in STREAMS and isinstance(rec[2], str):
                records.append((rec[0], rec[1], rec[2]))
        out[task] = TaskLines((pos[0], pos[1]), skipped, records)
    return node, out


# --- gathering and following (the agent meshctl talks to) --------------------------------------

Ask = Callable[[str, bytes], Awaitable[bytes | None]]
# What ASK returns for a host that closed the stream without a reply (no reply is ever empty).
HUNG_UP = b""


class LogGatherer:
    """`service logs`: the first lines of every host, then (--follow) new lines by polling the
    hosts that run the service's tasks. ASK(host, body) -> that host's reply (HUNG_UP if it
    closed the stream unanswered, None if it could not be asked); LOCAL(request) -> this
    host's reply; LEGACY(host) -> its logs as text through the older STREAM_LOGS. Records go
    to SEND as `{"logs": [{task, node, time, stream, line}]}` frames, output passed over as
    `{"skipped": [{task, node, bytes}]}`."""

    def __init__(self, service: str, node: str, send: SendEvent,
                 local: Callable[[LinesRequest], Awaitable[bytes]], ask: Ask,
                 legacy: Callable[[str], Awaitable[dict[str, str] | None]]) -> None:
        self.service = service
        self.node = node
        self.send = send
        self.local = local
        self.ask = ask
        self.legacy = legacy
        # host -> slot -> where we are in that task's log there
        self.cursors: dict[str, dict[int, tuple[int, int]]] = {}
        self.tasks: set[str] = set()  # every task whose log was seen
        self.notes: list[dict[str, Any]] = []  # frames for meshctl's stderr (skipped output)

    async def first(self, hosts: Iterable[str], tail: int | None) -> None:
        """The last TAIL lines (None: all there is, bounded) of every task on every host."""
        req = LinesRequest(self.service, tail=tail)
        peers = [h for h in hosts if h != self.node]
        replies = await asyncio.gather(*(self._ask(h, req, legacy=True) for h in peers))
        records = self._take(self.node, await self.local(req))
        for host, reply in zip(peers, replies, strict=True):
            records += self._take(host, reply)
        await self._emit(records)

    async def poll(self, hosts: Iterable[str], since: str) -> None:
        """One follow round: new lines from this host and HOSTS."""
        peers = [h for h in hosts if h != self.node]
        reqs = {h: LinesRequest(self.service, since=since, cursors=self.cursors.get(h, {}))
                for h in [self.node, *peers]}
        replies = await asyncio.gather(*(self._ask(h, reqs[h]) for h in peers))
        records = self._take(self.node, await self.local(reqs[self.node]))
        for host, reply in zip(peers, replies, strict=True):
            records += self._take(host, reply)
        await self._emit(records)

    async def _ask(self, host: str, req: LinesRequest,
                   legacy: bool = False) -> bytes | dict[str, str] | None:
        raw = await self.ask(host, req.encode())
        if raw == HUNG_UP:
            # an agent from before STREAM_LOG_LINES closes such a stream unanswered
            return await self.legacy(host) if legacy else None
        return raw

    def _take(self, host: str, reply: bytes | dict[str, str] | None) -> list[dict[str, Any]]:
        if reply is None:
            return []
        out: list[dict[str, Any]] = []
        if isinstance(reply, dict):  # the older text form: no times, no positions
            for task, text in reply.items():
                self.tasks.add(task)
                out += [{"task": task, "node": host, "time": None, "stream": "stdout",
                         "line": line} for line in plain_text(text).split("\n")[:-1]]
            return out
        node, tasks = parse_lines_reply(self.service, reply)
        node = host if node is None else node
        cursors = self.cursors.setdefault(host, {})
        skipped = []
        for task, got in tasks.items():
            self.tasks.add(task)
            cursors[int(task.rpartition(".")[2])] = got.pos
            if got.skipped:
                skipped.append({"task": task, "node": node, "bytes": got.skipped})
            out += [{"task": task, "node": node, "time": t, "stream": s, "line": text}
                    for t, s, text in got.records]
        if skipped:
            self.notes.append({"skipped": skipped})
        return out

    async def _emit(self, records: list[dict[str, Any]]) -> None:
        for note in self.notes:
            await self.send(note)
        self.notes.clear()
        # One round's lines in time order across tasks (unstamped lines first, by task).
        records.sort(key=lambda r: (r["time"] or "", r["task"]))
        for i in range(0, len(records), FRAME_LINES):
            await self.send({"logs": records[i:i + FRAME_LINES]})
