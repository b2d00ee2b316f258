"""Metrics and health, pure: histograms, Prometheus text exposition, and the /health verdict.

The agent's shell (meshnet/agent/telemetry.py) gathers numbers at scrape time from the
counters the agent keeps anyway, and this module turns them into the Prometheus text format
0.0.4 (https://prometheus.io/docs/instrumenting/exposition_formats/): one ``# HELP`` and one
``# TYPE`` line per family, then its samples; label values and help texts escaped. Names
follow the Prometheus conventions: ``meshnet_`` first, the unit in the name (``_seconds``,
``_bytes``), ``_total`` at the end of a counter.

Nothing here does I/O or reads a clock: the shell passes ``now``.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = [
    "COUNTER",
    "DNS_LATENCY_BUCKETS",
    "GAUGE",
    "HISTOGRAM",
    "LAG_BUCKETS",
    "TASK_START_BUCKETS",
    "Exposition",
    "HealthInputs",
    "Histogram",
    "LagWindow",
    "MonotonicSum",
    "add_status",
    "health_verdict",
    "rcode_name",
    "status_leaves",
]

COUNTER = "counter"
GAUGE = "gauge"
HISTOGRAM = "histogram"

# What /metrics answers with (the format Prometheus asks for by default; version 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket bounds (seconds). DNS: a local answer takes microseconds, a forwarded one a round
# trip to the upstream, up to the pool's timeout (a few seconds) when it never answers.
DNS_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                       0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A task's start: sandbox, address claim confirmed by every member, launcher; ~70 ms on an
# idle lab host (bench/task_start.py), seconds when a member is slow to confirm the claim.
TASK_START_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Event-loop lag: how late a timer fires. Under a millisecond when idle; a lag near the
# membership probe timeout (0.5 s on LAN) makes our own probes fail.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_UNSAFE_RE = re.compile(r"[^a-zA-Z0-9_]")

# The DNS header's 4-bit RCODE (RFC 1035 4.1.1, RFC 2136); the rest are shown as numbers.
_RCODES = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN",
           "YXRRSET", "NXRRSET", "NOTAUTH", "NOTZONE")


def rcode_name(rcode: int) -> str:
    return _RCODES[rcode] if 0 <= rcode < len(_RCODES) else str(rcode)


# -- histograms ---------------------------------------------------------------------------------


class Histogram:
    """Counts of observations by upper bound (Prometheus' ``le``), their sum and count.

    Fixed buckets, so memory is constant however many values are observed. ``observe`` is a
    bisect and two additions: cheap enough for the DNS server's hot path.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        b = [float(x) for x in bounds]
        if not b or not all(math.isfinite(x) for x in b) or \
                any(x >= y for x, y in itertools.pairwise(b)):
            raise ValueError("histogram bounds must be finite and strictly increasing")
        self.bounds = tuple(b)
        self.counts = [0] * (len(b) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        if value != value:  # NaN: a broken clock reading must not poison the sum
            return
        # bisect_left: the first bound >= value, so a value equal to a bound counts in it (le)
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def add_first_bucket(self, n: int, total: float) -> None:
        """N observations already known to fall in the first bucket, summing TOTAL: what a hot
        path that checked each against ``bounds[0]`` adds once per batch."""
        self.counts[0] += n
        self.count += n
        self.sum += total

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations <= it) for every bound, then (inf, count)."""
        out = []
        total = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out


class MonotonicSum:
    """A counter summed over parts that come and go (an encrypted overlay's peers): what a part
    counted before it went away, or before its own count started again (a new session), stays
    in the total, so the sum never goes down (Prometheus would take that for a restart).
    Holds only the parts of the latest update. What a part counted after the last update
    before it left is not seen."""

    __slots__ = ("_last", "_retired")

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._retired: float = 0

    def update(self, parts: Mapping[str, float]) -> float:
        for key, old in self._last.items():
            new = parts.get(key)
            if new is None or new < old:
                self._retired += old
        self._last = dict(parts)
        return self._retired + sum(parts.values())


# -- the text format ----------------------------------------------------------------------------


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: float) -> str:
    if isinstance(value, int):  # bool included: True is 1
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


Labels = tuple[tuple[str, str], ...]


# A scrape names the same few hundred series every time: each name is checked once (cached).
@functools.lru_cache(maxsize=8192)
def _check_name(name: str, kind: str) -> None:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"metric name {name!r} is not valid")
    if kind == COUNTER and not name.endswith("_total"):
        raise ValueError(f"counter {name!r} must end in _total")


@functools.lru_cache(maxsize=1024)
def _check_label(name: str) -> None:
    if not _LABEL_RE.fullmatch(name) or name.startswith("__") or name == "le":
        raise ValueError(f"label name {name!r} is not valid here")


@dataclass
class _Family:
    name: str
    kind: str
    help: str
    lines: list[str] = field(default_factory=list)
    seen: set[Labels] = field(default_factory=set)


class Exposition:
    """Families and their samples, in the order first added; ``render()`` gives the text.

    A name or label that is not valid in the format, a family added again with another type,
    or a sample added twice with the same labels is a bug in the caller: ValueError (a scrape
    with a duplicate sample would be refused by Prometheus whole).
    """

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._families

    def names(self) -> list[str]:
        return list(self._families)

    def _family(self, name: str, kind: str, help_text: str) -> _Family:
        fam = self._families.get(name)
        if fam is None:
            _check_name(name, kind)
            fam = self._families[name] = _Family(name, kind, help_text)
        elif fam.kind != kind:
            raise ValueError(f"metric {name!r} added as {kind} and as {fam.kind}")
        return fam

    @staticmethod
    def _labels(labels: Mapping[str, str] | None) -> Labels:
        if not labels:
            return ()
        for k in labels:
            _check_label(k)
        return tuple(sorted((k, str(v)) for k, v in labels.items()))

    @staticmethod
    def _sample(name: str, labels: Labels, value: float) -> str:
        if labels:
            inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            return f"{name}{{{inner}}} {_format_value(value)}"
        return f"{name} {_format_value(value)}"

    def _add(self, name: str, kind: str, help_text: str, value: float,
             labels: Mapping[str, str] | None) -> None:
        fam = self._family(name, kind, help_text)
        key = self._labels(labels) if labels else ()
        if key in fam.seen:
            raise ValueError(f"{name}{dict(key)} added twice")
        fam.seen.add(key)
        fam.lines.append(f"{name} {_format_value(value)}" if not key
                         else self._sample(name, key, value))

    def _add_checked(self, name: str, kind: str, help_text: str, value: float,
                     labels: Labels) -> bool:
        """_add for a caller whose LABELS are valid and sorted; False (nothing added) where
        _add would raise."""
        fam = self._families.get(name)
        if fam is None:
            try:
                _check_name(name, kind)
            except ValueError:
                return False
            fam = self._families[name] = _Family(name, kind, help_text)
        elif fam.kind != kind or labels in fam.seen:
            return False
        fam.seen.add(labels)
        fam.lines.append(self._sample(name, labels, value) if labels
                         else f"{name} {_format_value(value)}")
        return True

    def counter(self, name: str, help_text: str, value: float,
                labels: Mapping[str, str] | None = None) -> None:
        self._add(name, COUNTER, help_text, value, labels)

    def gauge(self, name: str, help_text: str, value: float,
              labels: Mapping[str, str] | None = None) -> None:
        self._add(name, GAUGE, help_text, value, labels)

    def histogram(self, name: str, help_text: str, hist: Histogram,
                  labels: Mapping[str, str] | None = None) -> None:
        fam = self._family(name, HISTOGRAM, help_text)
        key = self._labels(labels)
        if key in fam.seen:
            raise ValueError(f"{name}{dict(key)} added twice")
        fam.seen.add(key)
        for bound, n in hist.cumulative():
            le = "+Inf" if math.isinf(bound) else repr(bound)
            fam.lines.append(self._sample(f"{name}_bucket", (*key, ("le", le)), n))
        fam.lines.append(self._sample(f"{name}_sum", key, hist.sum))
        fam.lines.append(self._sample(f"{name}_count", key, hist.count))

    def render(self) -> str:
        out: list[str] = []
        for fam in self._families.values():
            out.append(_header(fam.name, fam.kind, fam.help))
            out.extend(fam.lines)
        return "\n".join(out) + "\n" if out else ""


@functools.lru_cache(maxsize=8192)
def _header(name: str, kind: str, help_text: str) -> str:
    return f"# HELP {name} {_escape_help(help_text)}\n# TYPE {name} {kind}"


# -- `meshctl status --json`, every number of it -------------------------------------------------

# Leaves of the status document that are levels, not counts (the rest are counters). A new
# gauge in `status` belongs here, or it is shown as a counter.
STATUS_GAUGES = frozenset({
    "incarnation", "uptime_s", "in_flight", "listeners", "tcp_connections", "upstream_sockets",
    "fresh_senders", "entries", "bytes_held", "unsaved", "files_unsaved", "mtu", "networks",
    "port", "underlay_mtu", "overlay_mtu", "max_datagram", "peers", "established",
    "certs_known", "sources_under_load",
    "subscribers", "buffered",  # events: watchers now, events held for --since
})
# Sections whose every leaf is a level.
STATUS_GAUGE_SECTIONS = frozenset({"members"})
# Maps keyed by something open-ended (a table, a reason): one family with the key as a label,
# rather than one family per key.
STATUS_LABELLED_MAPS: Mapping[tuple[str, ...], str] = {
    ("store", "refused_by_table"): "table",
    ("store", "refused_unauthorized_by_table"): "table",
    ("identity", "refusals"): "reason",
    ("datapath", "encrypted", "handshake_drops"): "reason",
}
STATUS_PREFIX = "meshnet_status_"
# The status document is the agent's own and bounded; this bounds what a bug could add.
MAX_STATUS_LEAVES = 4096


class StatusLeaf(NamedTuple):  # a tuple: a scrape makes a few hundred
    path: tuple[str, ...]  # keys from the document's root, as in the JSON
    name: str  # the family's name
    kind: str  # COUNTER or GAUGE
    value: float
    labels: Mapping[str, str] | None = None


def _number(value: object) -> int | float | None:
    """The value as a sample (a boolean as 0/1), or None if it is not a finite number."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    return None


def _metric_name(path: Sequence[str], kind: str) -> str:
    parts = [_UNSAFE_RE.sub("_", p) or "_" for p in path]
    if parts[-1].endswith("_s"):  # uptime_s: seconds, spelled out as the conventions ask
        parts[-1] = parts[-1][:-2] + "_seconds"
    name = STATUS_PREFIX + "_".join(parts)
    if kind == COUNTER and not name.endswith("_total"):
        name += "_total"
    return name


# Every scrape walks the same paths: their names and types are worked out once (cached).
@functools.lru_cache(maxsize=MAX_STATUS_LEAVES)
def _leaf_meta(path: tuple[str, ...], boolean: bool) -> tuple[str, str]:
    """(name, kind) of the status leaf at PATH."""
    gauge = boolean or path[-1] in STATUS_GAUGES or path[-1].startswith("max_") \
        or path[0] in STATUS_GAUGE_SECTIONS
    kind = GAUGE if gauge else COUNTER
    return _metric_name(path, kind), kind


@functools.lru_cache(maxsize=64)
def _map_name(path: tuple[str, ...]) -> str:
    return _metric_name(path, COUNTER)


def _status_rows(doc: Mapping[str, object]) -> Iterator[StatusLeaf]:
    """Every number of DOC as a leaf, duplicates included: a section's own leaves in order,
    then its subsections (no recursion: a document deeper than Python's stack is walked too)."""
    stack: list[tuple[Mapping[str, object], tuple[str, ...]]] = [(doc, ())]
    while stack:
        node, path = stack.pop()
        nested = []
        for k, v in node.items():
            here = (*path, str(k))
            if isinstance(v, Mapping):
                label = STATUS_LABELLED_MAPS.get(here)
                if label is None:
                    nested.append((v, here))
                    continue
                name = _map_name(here)
                for item, raw in v.items():
                    n = _number(raw)
                    if n is not None:
                        yield StatusLeaf(here, name, COUNTER, n, {label: str(item)})
                continue
            n = _number(v)
            if n is not None:
                name, kind = _leaf_meta(here, isinstance(v, bool))
                yield StatusLeaf(here, name, kind, n)
        stack.extend(reversed(nested))  # sections after the leaves beside them


def status_leaves(doc: Mapping[str, object]) -> list[StatusLeaf]:
    """Every number (and boolean, as 0/1) in a `meshctl status --json` document, as a metric:
    ``meshnet_status_<path joined by _>`` (a counter gets ``_total``), and the maps in
    STATUS_LABELLED_MAPS as one family labelled by their keys. Strings, lists and nulls are
    not numbers and are left out. Two paths that come out as one name keep the first."""
    out: list[StatusLeaf] = []
    taken: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    for leaf in _status_rows(doc):
        key = (leaf.name, tuple(sorted((leaf.labels or {}).items())))
        if key not in taken and len(out) < MAX_STATUS_LEAVES:
            taken.add(key)
            out.append(leaf)
    return out


def add_status(expo: Exposition, doc: Mapping[str, object]) -> int:
    """Add every status leaf to EXPO (see status_leaves); how many were added. A name the
    exposition already holds (with another type, or these labels) is skipped, never an error.
    Every scrape does this for a few hundred leaves, hence the fast path past the checks."""
    added = 0
    for leaf in _status_rows(doc):
        if added >= MAX_STATUS_LEAVES:
            break
        labels: Labels = tuple(leaf.labels.items()) if leaf.labels else ()
        if expo._add_checked(leaf.name, leaf.kind, _status_help(leaf.path), leaf.value,
                             labels):
            added += 1
    return added


@functools.lru_cache(maxsize=MAX_STATUS_LEAVES)
def _status_help(path: tuple[str, ...]) -> str:
    return f"`meshctl status --json` {'.'.join(path)}"


# -- event-loop lag -------------------------------------------------------------------------------


class LagWindow:
    """The worst event-loop lag seen recently: the largest of the current window and the one
    before it, so a stall is remembered for between one and two windows, in constant memory."""

    __slots__ = ("_current", "_previous", "_start", "last", "last_at", "window")

    def __init__(self, window: float, now: float) -> None:
        self.window = window
        self._start = now
        self._current = 0.0
        self._previous = 0.0
        self.last = 0.0  # the latest lag observed
        self.last_at = now  # when the lag monitor last ran

    def _roll(self, now: float) -> None:
        if now - self._start >= 2 * self.window:
            self._previous = self._current = 0.0
            self._start = now
        elif now - self._start >= self.window:
            self._previous, self._current = self._current, 0.0
            self._start += self.window

    def observe(self, now: float, lag: float) -> None:
        self._roll(now)
        lag = max(0.0, lag)
        self._current = max(self._current, lag)
        self.last = lag
        self.last_at = now

    def worst(self, now: float) -> float:
        self._roll(now)
        return max(self._current, self._previous)


# -- /health ------------------------------------------------------------------------------------

# An event loop this late within the last LAG_WINDOW_S is not healthy: by then our own probes
# time out (0.5 s on LAN) and peers begin to suspect us.
LAG_UNHEALTHY_S = 2.0
LAG_WINDOW_S = 10.0


@dataclass(frozen=True)
class HealthInputs:
    now: float
    left: bool  # we announced `left` (leave, or shutting down)
    others_reachable: int  # members besides us that are alive or suspect
    others_lost: int  # members besides us that are dead
    join_targets: bool  # --join or remembered peers: we are meant to have company
    worst_lag: float  # LagWindow.worst
    lag_monitor_at: float  # LagWindow.last_at
    lag_interval: float  # how often the lag monitor runs
    stalled: tuple[str, ...] = ()  # loops past their bound, each "what (why)"


def health_verdict(h: HealthInputs) -> tuple[bool, str]:
    """(healthy, one line saying why). Healthy means: the agent has not left; its event loop
    and its periodic loops run (timers fire on time); and it is joined: some other member is
    alive, or it is alone by design (no join targets and nobody it lost). The first reason
    that fails is given."""
    if h.left:
        return False, "left the cluster"
    since = h.now - h.lag_monitor_at
    if since > max(LAG_UNHEALTHY_S, 4 * h.lag_interval):
        return False, f"event loop stalled: the lag monitor last ran {since:.1f} s ago"
    if h.worst_lag > LAG_UNHEALTHY_S:
        return False, (f"event loop stalled: a timer fired {h.worst_lag:.1f} s late within the "
                       f"last {LAG_WINDOW_S:g} s")
    if h.stalled:
        return False, "stalled: " + "; ".join(h.stalled)
    if h.others_reachable == 0:
        if h.others_lost:
            return False, (f"no alive member besides itself ({h.others_lost} dead: "
                           "partitioned or alone)")
        if h.join_targets:
            return False, "no alive member besides itself while join targets are configured"
        return True, "ok: alone, with no join targets"
    return True, f"ok: {h.others_reachable + 1} members reachable"
