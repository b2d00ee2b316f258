"""Fuzz what `meshctl events` and `service logs` parse (#16): DURATION and filters from the
command line or a control request, and the STREAM_LOG_LINES request and reply a peer holding
the cluster key can send any bytes of. Each gives a valid value or ValueError (the reply parser
never raises), and the line formats stay one line whatever they are given."""

from __future__ import annotations

import atexit
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meshnet.agent.tasklogs import (
    MAX_LINE_BYTES,
    LinesRequest,
    LineStamper,
    parse_lines_reply,
    parse_lines_request,
    parse_record,
    serve_lines,
    task_of_log,
)
from meshnet.events import (
    FILTER_KEYS,
    MAX_SINCE_S,
    event_line,
    iso_us,
    log_line,
    parse_duration,
    parse_filters,
)

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=30) | st.from_regex(r"[0-9.]{0,14}(ms|s|m|h|d|w|M|)", fullmatch=True))
@example("1e3s")
@example("9" * 12 + ".999999999d")
def test_duration_any_text(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError as e:
        assert "\n" not in str(e)
        return
    assert math.isfinite(seconds) and 0 <= seconds <= MAX_SINCE_S


@given(st.lists(st.tuples(st.integers(0, 10_000), st.sampled_from(sorted(UNITS))),
                min_size=1, max_size=6))
def test_duration_sums_its_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{u}" for n, u in parts)
    want = sum(n * UNITS[u] for n, u in parts)
    if want > MAX_SINCE_S:
        with pytest.raises(ValueError, match="at most"):
            parse_duration(text)
    else:
        assert parse_duration(text) == want


FILTER_TEXT = st.text(max_size=20) | st.builds(
    lambda k, v: f"{k}={v}", st.sampled_from([*FILTER_KEYS, "x", ""]),
    st.sampled_from(["member", "task", "h1", "", "a=b"]) | st.text(max_size=10))


@given(st.lists(FILTER_TEXT, max_size=40) | st.none() | st.integers() | st.text(max_size=5))
def test_filters_any_input(items: Any) -> None:
    try:
        out = parse_filters(items)
    except ValueError:
        return
    assert set(out) <= set(FILTER_KEYS)
    assert all(v and all(isinstance(x, str) and x for x in v) for v in out.values())


SCALAR = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)


@given(st.dictionaries(st.text(max_size=8) | st.sampled_from(["time", "type", "action", "name",
                                                               "state"]), SCALAR, max_size=8))
def test_an_event_is_one_printable_line(doc: dict[str, Any]) -> None:
    line = event_line(doc)
    assert "\n" not in line and "\r" not in line and line.isprintable()


@given(st.dictionaries(st.sampled_from(["task", "time", "line", "node"]), SCALAR, max_size=4),
       st.booleans())
def test_a_log_line_never_raises(rec: dict[str, Any], timestamps: bool) -> None:
    assert isinstance(log_line(rec, timestamps), str)


# ---- the stamped line format --------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300) | st.sampled_from([b"\n", b"\r\n", b"a\nb"]),
                max_size=12),
       st.sampled_from(["stdout", "stderr"]))
def test_stamping_any_chunks_keeps_every_byte_in_order(chunks: list[bytes], stream: str) -> None:
    s = LineStamper(stream)
    out = b"".join(s.feed(c, 1_796_463_001.0 + i) for i, c in enumerate(chunks)) + \
        s.flush(1_796_463_100.0)
    records = [parse_record(line) for line in out.split(b"\n")[:-1]]
    assert all(r[0] is not None and r[1] == stream for r in records)
    # every record is one line of the input (cut at MAX_LINE_BYTES), nothing lost or added
    data = b"".join(chunks)
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    pieces = [ln[i:i + MAX_LINE_BYTES] for ln in lines
              for i in range(0, max(len(ln), 1), MAX_LINE_BYTES)]
    assert [r[2] for r in records] == [p.decode(errors="replace") for p in pieces]


# ---- STREAM_LOG_LINES: the request ----------------------------------------------------------

TEXT = st.text(max_size=10) | st.sampled_from(["service", "tail", "since", "from", "web"])
SCALARS = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
           | st.floats(allow_nan=True) | TEXT | st.binary(max_size=8))
MSGPACK = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12)
STAMP = st.builds(lambda t: iso_us(t), st.floats(0, 4e9))
REQUEST = st.fixed_dictionaries({
    "service": st.sampled_from(["web", "../web", "*", ""]) | TEXT,
    "tail": st.none() | st.integers(-5, 2_000_000) | TEXT,
    "since": st.none() | STAMP | TEXT,
    "from": st.none() | st.lists(st.lists(st.integers(-3, (1 << 64) - 1), min_size=2, max_size=4),
                                 max_size=5) | MSGPACK,
})


def _pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | MSGPACK.map(_pack) | REQUEST.map(_pack))
@example(b"\x91" * 1000 + b"\xc0")
def test_a_lines_request_is_well_formed_or_value_error(body: bytes) -> None:
    try:
        req = parse_lines_request(body)
    except ValueError:
        return
    assert isinstance(req.service, str)
    assert req.tail is None or req.tail >= 0
    assert parse_lines_request(req.encode()) == req


def _make_log_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="mn-loglines-fuzz-"))
    atexit.register(shutil.rmtree, d, True)
    for f in ("web.1.log", "web.10.log", "web.1.log.1", "webx.1.log", "other.2.log", "web.log"):
        (d / f).write_bytes(f"{iso_us(1_796_463_001.0)} stdout line of {f}\nold\n".encode())
    return d


_LOG_DIR = _make_log_dir()


@settings(max_examples=150, deadline=None)
@given(REQUEST.map(_pack))
def test_serving_a_request_reads_only_the_named_services_files(body: bytes) -> None:
    try:
        req = parse_lines_request(body)
    except ValueError:
        return
    if task_of_log(req.service, "x") is not None or req.service not in ("web", "other"):
        return  # the handler checks the name first (services._serve_log_lines)
    node, tasks = parse_lines_reply(req.service, serve_lines(_LOG_DIR, "h1", req))
    assert node == "h1"
    assert all(task_of_log(req.service, t + ".log") for t in tasks)
    assert set(tasks) <= {"web": {"web.1", "web.10"}, "other": {"other.2"}}[req.service]


# ---- STREAM_LOG_LINES: the reply ------------------------------------------------------------

LINE = st.lists(SCALARS | STAMP | st.sampled_from(["stdout", "stderr"]), max_size=4)
ENTRY = st.fixed_dictionaries({
    "pos": st.lists(st.integers(-2, (1 << 64) - 1), max_size=3) | SCALARS,
    "skipped": st.integers(-2, 1 << 40) | SCALARS,
    "lines": st.lists(LINE | SCALARS, max_size=4) | SCALARS}) | MSGPACK
REPLY = st.fixed_dictionaries({
    "node": SCALARS,
    "tasks": st.dictionaries(st.sampled_from(["web.1", "web.x", "../web.1", "web.1\n",
                                              "other.1", "web.\u0661"]) | TEXT, ENTRY,
                             max_size=4) | MSGPACK})


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | MSGPACK.map(_pack) | REPLY.map(_pack))
@example(b"\x81\xa5tasks" + b"\x91" * 1000 + b"\xc0")
def test_a_lines_reply_never_raises_and_keeps_only_valid_entries(raw: bytes) -> None:
    node, tasks = parse_lines_reply("web", raw)
    assert node is None or isinstance(node, str)
    for task, got in tasks.items():
        assert task == task_of_log("web", task + ".log")
        assert all(v >= 0 for v in got.pos) and got.skipped >= 0
        for t, stream, text in got.records:
            assert t is None or len(t) == 27
            assert stream in ("stdout", "stderr") and isinstance(text, str)


def test_encode_is_what_parse_takes() -> None:
    req = LinesRequest("web", 3, iso_us(0), {1: (2, 3)})
    assert parse_lines_request(req.encode()) == req
