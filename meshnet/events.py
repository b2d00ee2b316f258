"""What `meshctl events` and `meshctl service logs` share between the agent and meshctl (pure).

An event is one JSON object: `time` (UTC, ISO 8601 with milliseconds), `type` (one of
EVENT_TYPES), `action`, and the fields of its type (docs/design.md §8, "Operations"). A
subscriber chooses events with filters `KEY=VALUE`: values of one key OR together, different
keys AND together, as `docker events --filter` does.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from typing import Any

EVENT_TYPES = ("member", "task", "network", "service", "key")
# What a filter can name: the type and action, and the fields naming a member, node, task or
# service (a member's name, a network's, a service's: `name`).
FILTER_KEYS = ("type", "action", "name", "node", "service", "task")
# A subscriber names a handful; a bound keeps a control request from making a huge matcher.
MAX_FILTERS = 32
MAX_FILTER_CHARS = 128
# `--since` reaches back at most this far (the agent's buffer holds far less anyway); the bound
# keeps every DURATION a finite float that `time.time() - since` cannot overflow.
MAX_SINCE_S = 366 * 86400.0

# `service logs --tail N`: more than this is all of it (a task's log holds far fewer lines).
MAX_TAIL_LINES = 1_000_000

Filters = Mapping[str, frozenset[str]]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART_RE = re.compile(r"([0-9]{1,12}(?:\.[0-9]{1,9})?)(ms|s|m|h|d)")
_DURATION_RE = re.compile(r"(?:[0-9]{1,12}(?:\.[0-9]{1,9})?(?:ms|s|m|h|d)){1,6}")


def parse_duration(text: str) -> float:
    """`30s`, `10m`, `2h`, `1d`, `1h30m`, `250ms` -> seconds. ValueError (one line saying what
    is accepted) for anything else: a bare number, a negative, a unit we do not know, or more
    than MAX_SINCE_S."""
    if not isinstance(text, str) or not _DURATION_RE.fullmatch(text):
        raise ValueError(f"bad duration {str(text)[:40]!r}: give a number and a unit, e.g. "
                         "30s, 10m, 2h, 1d or 1h30m")
    total = sum(float(n) * _UNITS[u] for n, u in _PART_RE.findall(text))
    if not math.isfinite(total) or total > MAX_SINCE_S:
        raise ValueError(f"bad duration {text!r}: at most {int(MAX_SINCE_S // 86400)}d")
    return total


def parse_filters(items: object) -> dict[str, frozenset[str]]:
    """`["type=member", "type=task", "node=h2"]` -> {"type": {member, task}, "node": {h2}}.
    ValueError saying what is wrong for anything else (the items come from a command line or a
    control request)."""
    if items is None:
        return {}
    if not isinstance(items, list) or len(items) > MAX_FILTERS:
        raise ValueError(f"filters must be a list of at most {MAX_FILTERS} KEY=VALUE")
    out: dict[str, set[str]] = {}
    for item in items:
        if not isinstance(item, str) or len(item) > MAX_FILTER_CHARS:
            raise ValueError(f"a filter is KEY=VALUE, at most {MAX_FILTER_CHARS} characters")
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise ValueError(f"filter {item[:40]!r} is not KEY=VALUE")
        if key not in FILTER_KEYS:
            raise ValueError(f"unknown filter key {key[:40]!r} (have {', '.join(FILTER_KEYS)})")
        if key == "type" and value not in EVENT_TYPES:
            raise ValueError(f"unknown event type {value[:40]!r} (have "
                             f"{', '.join(EVENT_TYPES)})")
        out.setdefault(key, set()).add(value)
    return {k: frozenset(v) for k, v in out.items()}


def matches(doc: Mapping[str, Any], filters: Filters) -> bool:
    """True if event DOC passes every key of FILTERS (any of a key's values)."""
    for key, values in filters.items():
        value = doc.get(key)
        if value is None or str(value) not in values:
            return False
    return True


def iso_ms(t: float) -> str:
    """Unix time -> `2026-12-05T09:30:01.123Z`."""
    sec, ms = divmod(int(t * 1000), 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ms:03d}Z"


def iso_us(t: float) -> str:
    """Unix time -> `2026-12-05T09:30:01.123456Z` (task log lines)."""
    sec, us = divmod(int(t * 1_000_000), 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{us:06d}Z"


# The field that names what an event is about, per type (shown first in its human line).
SUBJECT = {"member": "name", "task": "task", "network": "name", "service": "name",
           "key": "key_id", "events": ""}
_NOT_SHOWN = frozenset({"time", "type", "action"})


def _word(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    plain = text.isprintable() and not any(c.isspace() or c in "\"'=" for c in text)
    return text if text and plain else repr(text)


def event_line(doc: Mapping[str, Any]) -> str:
    """One human line: `2026-12-05T09:30:01.123Z member h3 dead addr=... incarnation=4`."""
    kind = str(doc.get("type", "?"))
    subject_key = SUBJECT.get(kind, "")
    words = [_word(doc.get("time", "-")), _word(kind)]
    if subject_key and doc.get(subject_key) is not None:
        words.append(_word(doc[subject_key]))
    words.append(_word(doc.get("action", "?")))
    for k, v in doc.items():
        if k in _NOT_SHOWN or k == subject_key or v is None:
            continue
        if k == "state" and v == doc.get("action"):
            continue  # `member h3 dead`, not `member h3 dead state=dead`
        words.append(f"{_word(k)}={_word(v)}")
    return " ".join(words)


def log_line(rec: Mapping[str, Any], timestamps: bool) -> str:
    """One human line of `service logs`: `web.1 | text`, with `--timestamps`
    `web.1 | 2026-12-05T09:30:01.123456Z text` (docker service logs' order)."""
    stamp = f"{rec.get('time') or '-'} " if timestamps else ""
    return f"{rec.get('task', '?')} | {stamp}{rec.get('line', '')}"
