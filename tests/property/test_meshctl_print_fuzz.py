"""meshctl reads what the agent sends back (results, progress, events) and a member's gossiped
version: whatever shape those take, printing and judging them never raises, and the human form
never falls back to a Python repr."""

from __future__ import annotations

import contextlib
import io
import json
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.agent.agent import gossiped_version
from meshnet.cli.meshctl import (
    Progress,
    done_line,
    emit_event,
    progress_summary,
    render,
    settled,
    task_progress,
    unacknowledged,
    why_not,
)

# Text without brackets, quotes or capitals: any `{'`, `['`, True, False or None in the output
# can only be a repr meshctl let through.
TEXT = st.text(alphabet="abcxyz019 =-_.:/", max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers(-2**40, 2**40) |
           st.floats(allow_nan=False, allow_infinity=False) | TEXT | st.binary(max_size=6))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) |
                      st.dictionaries(TEXT, inner, max_size=4), max_leaves=25)
VERBS = ["status", "members", "version", "keys list", "keys install", "keys generate",
         "network ls", "network inspect", "service inspect", "service create", "service ps",
         "service ls", "service scale", "dns lookup", "join", "endpoint ls"]
REPR = re.compile(r"\{'|\['|\[\{|\bTrue\b|\bFalse\b|\bNone\b")
TASK = st.fixed_dictionaries({}, optional={
    "task": VALUES, "node": VALUES, "slot": VALUES, "state": st.sampled_from(
        ["running", "pending", "failed"]) | VALUES, "exit_code": VALUES, "restarts": VALUES})
DOC = st.fixed_dictionaries({}, optional={
    "name": VALUES, "exists": VALUES, "desired": VALUES, "placed": VALUES,
    "tasks": st.lists(TASK | VALUES, max_size=6) | VALUES})


@settings(max_examples=300)
@given(st.sampled_from(VERBS), VALUES | st.dictionaries(TEXT, VALUES, max_size=6) |
       st.lists(st.dictionaries(TEXT, VALUES, max_size=5), max_size=4))
def test_render_never_raises_nor_prints_a_repr(verb: str, result: Any) -> None:
    out = render(verb, result)
    assert isinstance(out, str)
    assert not REPR.search(out), out


@settings(max_examples=300)
@given(DOC, st.booleans())
def test_progress_judgement_never_raises(doc: dict[str, Any], removing: bool) -> None:
    assert isinstance(settled(doc, removing), bool)
    line = why_not(doc, removing, 60)
    assert "\n" not in line and not REPR.search(line), line
    rows = task_progress(doc)
    progress = Progress(io.StringIO())
    progress.update("svc", progress_summary(doc, removing), rows)
    done_line(doc, removing)


@given(st.dictionaries(TEXT, VALUES, max_size=5))
def test_unacknowledged_never_raises(result: dict[str, Any]) -> None:
    assert all(isinstance(x, str) for x in unacknowledged(result))


@given(st.dictionaries(TEXT | st.sampled_from(["stream", "data"]), VALUES, max_size=4) | VALUES)
def test_a_json_event_is_one_json_line(event: Any) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        emit_event(event, as_json=True)
    lines = out.getvalue().splitlines()
    assert len(lines) == (1 if isinstance(event, dict) else 0)
    for line in lines:
        assert isinstance(json.loads(line), dict)
        assert "b'" not in line, line  # bytes, however deep, as text


@given(st.dictionaries(st.text(max_size=5) | st.just("ver"), VALUES, max_size=4))
def test_gossiped_version_is_a_version_or_none(extra: dict[str, Any]) -> None:
    v = gossiped_version(extra)
    assert v is None or re.fullmatch(r"[0-9A-Za-z.+_-]{1,32}", v)
