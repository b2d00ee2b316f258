"""Fuzz the replicated schema: check_value never raises on anything msgpack can carry, and a
validating store never raises anything but StateProtocolError and never stores a value the
schema refuses, whatever well-formed writes arrive."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet import wire
from meshnet.state import Entry, Hlc, StateProtocolError, Store, StoreConfig, codec
from meshnet.state.validate import KNOWN_TABLES, check_value

T0 = 1_700_000_000.0

TEXT = st.text(max_size=12) | st.sampled_from(
    ["web", "n1", "h1", "web.1", "10.1.0.5", "02:42:0a:01:00:05", "10.1.0.0/24", "any", "",
     "node.name==h1", "\u0661", "x\n", "zz", "NET_ADMIN", "memory", "-1"])
SCALARS = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
           | st.floats(allow_nan=True, allow_infinity=True) | TEXT | st.binary(max_size=8))
MSGPACK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)

TEMPLATES: dict[str, tuple[str, dict[str, Any]]] = {
    "networks": ("n1", {"name": "n1", "vni": 5000, "subnet": "10.1.0.0/24", "encrypted": False}),
    "services": ("web", {
        "name": "web", "network": "n1", "mode": "replicated", "replicas": 2,
        "spec": {"networks": ["n1"], "command": ["sh", "-c", "x"], "env": {"A": "b"},
                 "constraints": ["node.name==h1"], "containment": {"memory": 67108864},
                 "max_per_node": None,
                 "restart": {"condition": "any", "delay": 1.0, "max_attempts": 0,
                             "backoff": 2.0}}}),
    "endpoints": ("n1/web.1@h1", {
        "name": "web.1", "network": "n1", "ip": "10.1.0.5", "mac": "02:42:0a:01:00:05",
        "node": "h1", "service": "web", "slot": 1, "pending": False, "prefixlen": 24,
        "sandbox": "mns-h1-web.1",
        "containment": {"user": "0", "capabilities": ["CHOWN"], "limits": {}, "mounts": []}}),
    "tasks": ("web.1@h1", {
        "task": "web.1", "service": "web", "slot": 1, "node": "h1", "state": "running",
        "ip": "10.1.0.5", "exit_code": None, "restarts": 0}),
    "certs": ("h1/" + "0123456789abcdef" * 2, {"cert": b"\x01" * 200}),
    "revocations": ("h1/all/1700000000", {"revocation": b"\x02" * 100}),
}


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    """A good value of a known table with one field (maybe nested) replaced or removed."""
    table = draw(st.sampled_from(sorted(TEMPLATES)))
    key, base = TEMPLATES[table]
    value = copy.deepcopy(base)
    target = value
    if table == "services" and draw(st.booleans()):
        target = value["spec"]
        if draw(st.booleans()):
            target = target["restart"] if draw(st.booleans()) else target["containment"]
    field = draw(st.sampled_from(sorted(target)) | TEXT)
    if draw(st.integers(0, 4)) == 0:
        target.pop(field, None)
    else:
        target[field] = draw(MSGPACK)
    if draw(st.integers(0, 5)) == 0:
        key = draw(TEXT)
    return table, key, value


@settings(max_examples=800, deadline=None)
@given(st.sampled_from(sorted(KNOWN_TABLES)) | TEXT, TEXT,
       st.dictionaries(TEXT, MSGPACK, max_size=6))
def test_check_value_never_raises_on_anything(table: str, key: str, data: dict[str, Any]) -> None:
    why = check_value(table, key, data)
    assert why is None or (isinstance(why, str) and why and "\n" not in why)


@settings(max_examples=1500, deadline=None)
@given(near_valid())
def test_check_value_never_raises_near_valid(case: tuple[str, str, dict[str, Any]]) -> None:
    table, key, value = case
    why = check_value(table, key, value)
    assert why is None or (isinstance(why, str) and why.startswith(table))


def test_templates_are_valid() -> None:
    for table, (key, value) in TEMPLATES.items():
        assert check_value(table, key, value) is None, table


def _entry(table: str, key: str, value: dict[str, Any] | None, wall: int, writer: str) -> Entry:
    blob = None if value is None else wire.pack(value)
    return Entry(table, key, blob, Hlc(T0_MS + wall, 0), writer)


T0_MS = int(T0 * 1000)
WRITES = st.lists(
    st.tuples(near_valid() | st.tuples(st.sampled_from(sorted(KNOWN_TABLES)) | TEXT, TEXT,
                                       st.dictionaries(TEXT, MSGPACK, max_size=4)),
              st.integers(0, 5000), st.sampled_from(["a", "b", "c"]), st.booleans()),
    max_size=12,
)


def _well_formed(table: str, key: str, value: dict[str, Any]) -> bool:
    """What the codec itself would carry (the store's own limits), so the schema is what is
    under test."""
    try:
        codec.check_table(table)
        codec.check_key(key)
        wire.pack(value)
    except (StateProtocolError, TypeError, ValueError, OverflowError):
        return False
    return True


def _assert_all_held_valid(s: Store) -> None:
    for e in s.entries():
        if e.value is not None:
            assert check_value(e.table, e.key, codec.decode_value(e.value)) is None, e


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(WRITES)
def test_validating_store_never_stores_an_invalid_value(writes: list[Any]) -> None:
    s = Store("z", StoreConfig(validator=check_value))
    holder = Store("h")  # stores anything: the writes come back by anti-entropy too
    for (table, key, value), wall, writer, tomb in writes:
        if not _well_formed(table, key, value):
            continue
        e = _entry(table, key, None if tomb else value, wall, writer)
        # well-formed writes: applied or refused, never an exception (not even the protocol's)
        s.apply_delta(codec.encode_delta(e), T0 + 10)
        holder.apply_delta(codec.encode_delta(e), T0 + 10)
    _assert_all_held_valid(s)
    for _ in range(2):  # anti-entropy both ways, twice: still nothing invalid, no exception
        back = s.apply_entries(holder.diff_for(s.digest()), T0 + 10)
        assert back is not None
        holder.apply_entries(back, T0 + 10)
        back = holder.apply_entries(s.diff_for(holder.digest()), T0 + 10)
        assert back is not None
        s.apply_entries(back, T0 + 10)
    _assert_all_held_valid(s)
    # the typed views every loop reads never fail
    s.networks()
    s.services()
    s.endpoints()
    s.view("tasks")
    # and now the exchange with the holder of every refused write is silent, both ways
    for x, y in ((s, holder), (holder, s)):
        diff = codec.decode_entries(y.diff_for(x.digest()))
        assert diff.entries == [] and not diff.requests


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_validating_store_raises_only_protocol_errors_on_bytes(data: bytes) -> None:
    s = Store("z", StoreConfig(validator=check_value, max_clock_skew=1e9))
    s.put("networks", "n1", TEMPLATES["networks"][1], T0)
    for fn in (lambda d: s.apply_delta(d, T0), lambda d: s.apply_entries(d, T0), s.diff_for):
        try:
            fn(data)
        except StateProtocolError:
            continue
    _assert_all_held_valid(s)
