"""The store with a schema (StoreConfig.validator): invalid remote writes are refused and counted,
never stored, and anti-entropy with a replica that holds one settles into silence."""

from __future__ import annotations

from typing import Any

import pytest

from meshnet import wire
from meshnet.state import Entry, Hlc, Store, StoreConfig, codec
from meshnet.state.validate import check_value

T0 = 1_700_000_000.0
NET = {"name": "n1", "vni": 5000, "subnet": "10.1.0.0/24", "encrypted": False}
SPEC = {"networks": ["n1"], "command": ["true"]}
SVC = {"name": "web", "network": "n1", "mode": "replicated", "replicas": 2, "spec": SPEC}


def validating(node: str, **kw: Any) -> Store:
    return Store(node, StoreConfig(validator=check_value, **kw))


def forced(node: str) -> Store:
    """A replica that stores anything (an agent from before the schema, or a write forced in):
    the holder of the writes the others refuse."""
    return Store(node)


def delta(table: str, key: str, value: dict[str, Any], wall: float, writer: str = "x") -> bytes:
    e = Entry(table, key, wire.pack(value), Hlc(int(wall * 1000), 0), writer)
    return codec.encode_delta(e)


def exchange(a: Store, b: Store, now: float) -> tuple[int, int]:
    """One anti-entropy exchange started by A; returns (entries B shipped, entries A shipped
    back)."""
    diff = b.diff_for(a.digest())
    back = a.apply_entries(diff, now)
    assert back is not None
    assert b.apply_entries(back, now) is None
    return len(codec.decode_entries(diff).entries), len(codec.decode_entries(back).entries)


def quiet_both_ways(a: Store, b: Store, now: float) -> bool:
    return exchange(a, b, now) == (0, 0) and exchange(b, a, now) == (0, 0)


def drain(s: Store) -> list[Any]:
    out = []
    while (ev := s.next_event()) is not None:
        out.append(ev)
    return out


# ---- refusing ------------------------------------------------------------------------------


def test_invalid_delta_refused_counted_not_stored_not_regossiped() -> None:
    s = validating("b")
    bad = {**SVC, "replicas": 10**12}
    assert s.apply_delta(delta("services", "web", bad, T0), T0) is False
    assert s.get("services", "web") is None and s.entry("services", "web") is None
    assert len(s) == 0 and s.pending_deltas() == 0 and drain(s) == []
    assert s.stats.refused_invalid == 1 and s.stats.applied == 0
    assert s.stats.refused_by_table == {"services": 1}
    assert s.take_refusals() == ["services/web: replicas 1000000000000 > 10000"]
    assert s.take_refusals() == []
    # offered again (gossip retransmits, anti-entropy): recognized, not counted or logged again
    assert s.apply_delta(delta("services", "web", bad, T0), T0) is False
    assert s.stats.refused_invalid == 1 and s.stats.refused_invalid_repeats == 1
    assert s.take_refusals() == []
    assert s.take_dirty().upserts == []  # nothing to persist


def test_each_acceptance_case_refused() -> None:
    s = validating("b")
    ep = {"name": "x", "network": "n1", "ip": "10.1.0.5", "mac": "zz", "node": "h1"}
    cases = [
        ("services", "huge", {**SVC, "name": "huge", "replicas": 10**12}),
        ("services", "odd", {**SVC, "name": "odd", "spec": {**SPEC, "restart": {"jitter": 1}}}),
        ("endpoints", "n1/x", ep),
        ("networks", "n2", {**NET, "name": "n2", "subnet": "10.0.0.0/33"}),
        ("volumes", "v", {"size": 1}),
    ]
    for i, (table, key, value) in enumerate(cases):
        assert not s.apply_delta(delta(table, key, value, T0 + i), T0 + 10)
    assert len(s) == 0 and s.stats.refused_invalid == len(cases)
    assert s.stats.refused_by_table == {"services": 2, "endpoints": 1, "networks": 1,
                                        "volumes": 1}
    # every loop reading the store still sees a consistent, empty picture, and a later good
    # write takes effect
    assert s.apply_delta(delta("networks", "n1", NET, T0 + 20), T0 + 20)
    assert s.apply_delta(delta("services", "web", SVC, T0 + 21), T0 + 21)
    assert set(s.networks()) == {"n1"} and s.services()["web"].replicas == 2


def test_refused_write_leaves_the_older_valid_value() -> None:
    s = validating("b")
    assert s.apply_delta(delta("services", "web", SVC, T0), T0)
    drain(s)
    assert not s.apply_delta(delta("services", "web", {**SVC, "replicas": -5}, T0 + 1), T0 + 1)
    assert s.services()["web"].replicas == 2 and drain(s) == []
    # a valid write older than the refused one still applies (the refused one never arrived)
    assert s.apply_delta(delta("services", "web", {**SVC, "replicas": 4}, T0 + 0.5), T0 + 2)
    assert s.services()["web"].replicas == 4


def test_tombstone_needs_no_value_check() -> None:
    s = validating("b")
    assert s.apply_delta(delta("networks", "n1", NET, T0), T0)
    gone = Entry("networks", "n1", None, Hlc(int((T0 + 1) * 1000), 0), "x")
    assert s.apply_delta(codec.encode_delta(gone), T0 + 1)
    assert s.get("networks", "n1") is None and s.stats.refused_invalid == 0


def test_local_put_raises_with_the_reason() -> None:
    s = validating("b")
    with pytest.raises(ValueError, match=r"services/web: replicas 1000000000000 > 10000"):
        s.put("services", "web", {**SVC, "replicas": 10**12}, T0)
    with pytest.raises(ValueError, match="unknown table"):
        s.put("volumes", "v", {}, T0)
    assert len(s) == 0 and s.pending_deltas() == 0
    s.put("networks", "n1", NET, T0)
    assert s.delete("networks", "n1", T0 + 1) is not None  # a delete is never checked


def test_validator_failure_is_a_refusal_not_an_exception() -> None:
    def broken(table: str, key: str, data: Any) -> str | None:
        raise RuntimeError("bug")

    s = Store("b", StoreConfig(validator=broken))
    assert not s.apply_delta(delta("networks", "n1", NET, T0), T0)
    assert s.stats.refused_invalid == 1 and "validator failed" in s.take_refusals()[0]
    with pytest.raises(ValueError, match="validator failed"):
        s.put("networks", "n1", NET, T0)


def test_set_validator_only_before_anything_is_held() -> None:
    s = Store("b")
    s.set_validator(check_value)
    assert s.validator is check_value
    s.put("networks", "n1", NET, T0)
    with pytest.raises(ValueError):
        s.set_validator(None)


def test_load_refuses_invalid_rows_and_drops_them_from_disk() -> None:
    src = forced("a")
    good = src.put("networks", "n1", NET, T0)
    bad = src.put("networks", "n2", {**NET, "name": "n2", "subnet": "10.0.0.0/33"}, T0)
    tomb = src.put("networks", "n3", {**NET, "name": "n3"}, T0)
    tomb = src.delete("networks", "n3", T0 + 1) or tomb
    s = validating("b")
    assert s.load([good, bad, tomb], T0 + 2) == 2
    assert set(s.networks()) == {"n1"} and s.entry("networks", "n2") is None
    assert s.stats.refused_invalid == 1 and s.take_refusals()
    changes = s.take_dirty()
    assert changes.removed == [("networks", "n2")] and changes.upserts == []


def test_refusals_remembered_are_bounded() -> None:
    s = validating("b", max_refused=8)
    for i in range(50):
        s.apply_delta(delta("networks", f"m{i}", {**NET, "name": f"m{i}", "vni": 1}, T0), T0)
    assert s.stats.refused_invalid == 50 and len(s._refused) == 8
    # the table breakdown is bounded too, whatever table names a peer invents
    for i in range(100):
        s.apply_delta(delta(f"t{i}", "k", {}, T0), T0)
    assert len(s.stats.refused_by_table) <= 17 and sum(s.stats.refused_by_table.values()) == 150


# ---- anti-entropy with a replica holding refused writes ----------------------------------


def test_anti_entropy_with_a_holder_goes_quiet_new_keys() -> None:
    a, b = forced("a"), validating("b")
    a.put("networks", "n1", NET, T0)
    a.put("services", "huge", {**SVC, "name": "huge", "replicas": 10**12}, T0)
    a.put("endpoints", "n1/x", {"name": "x", "network": "n1", "ip": "10.1.0.5", "mac": "zz",
                                "node": "a"}, T0)
    a.put("networks", "n2", {**NET, "name": "n2", "subnet": "10.0.0.0/33"}, T0)
    assert exchange(b, a, T0) == (4, 0)  # the first exchange brings everything once
    assert b.stats.refused_invalid == 3 and set(b.networks()) == {"n1"}
    assert b.digest() != a.digest()  # b does not hold what it refused...
    repeats = b.stats.refused_invalid_repeats
    for i in range(5):  # ...yet later exchanges, either way round, ship nothing
        assert quiet_both_ways(a, b, T0 + 1 + i)
    assert b.stats.refused_invalid == 3 and b.stats.refused_invalid_repeats == repeats
    assert b.stats.ae_buckets_skipped > 0 or a.stats.ae_buckets_skipped > 0
    assert len(b) == 1


def test_anti_entropy_with_a_holder_goes_quiet_overwrite() -> None:
    """The holder's refused write replaced a valid one the refuser still holds."""
    a, b = forced("a"), validating("b")
    a.put("services", "web", SVC, T0)
    a.put("networks", "n1", NET, T0)
    exchange(b, a, T0)
    a.put("services", "web", {**SVC, "spec": {**SPEC, "restart": {"jitter": 1}}}, T0 + 1)
    exchange(a, b, T0 + 2)
    assert b.stats.refused_invalid == 1 and b.services()["web"].replicas == 2
    for i in range(3):
        assert quiet_both_ways(a, b, T0 + 3 + i)
    # a newer good write at the holder replaces the refused one everywhere
    a.put("services", "web", {**SVC, "replicas": 5}, T0 + 10)
    exchange(b, a, T0 + 10)
    assert b.services()["web"].replicas == 5 and not b._refused
    assert a.digest() == b.digest()


def test_validating_replicas_still_repair_each_other_under_a_refused_write() -> None:
    """b and c refused the same newer write but hold different valid values below it: the
    refused write must not hide that difference from anti-entropy."""
    a, b, c = forced("a"), validating("b"), validating("c")
    v = a.put("services", "web", SVC, T0)
    w = a.put("services", "web", {**SVC, "replicas": 3}, T0 + 1)
    e = a.put("services", "web", {**SVC, "replicas": 10**12}, T0 + 2)
    for s, entries in ((b, [v, e]), (c, [w, e])):
        for entry in entries:
            s.apply_delta(codec.encode_delta(entry), T0 + 3)
    assert b.services()["web"].replicas == 2 and c.services()["web"].replicas == 3
    exchange(b, c, T0 + 4)
    assert b.services()["web"].replicas == 3 == c.services()["web"].replicas
    assert b.digest() == c.digest() and quiet_both_ways(b, c, T0 + 5)
    assert quiet_both_ways(a, b, T0 + 5) and quiet_both_ways(a, c, T0 + 5)


def test_forgotten_refusal_is_a_bounded_steady_state() -> None:
    """Past max_refused, a forgotten refusal makes its bucket ship again at each exchange with
    the holder: one bucket, re-refused every time, never stored."""
    a, b = forced("a"), validating("b", max_refused=1)
    a.put("networks", "n1", NET, T0)
    for i in range(3):
        a.put("networks", f"bad{i}", {**NET, "name": f"bad{i}", "vni": 1}, T0)
    exchange(b, a, T0)
    assert b.stats.refused_invalid == 3 and len(b) == 1
    shipped = [exchange(b, a, T0 + 1 + i)[0] for i in range(4)]
    assert shipped == [shipped[0]] * 4 and 0 < shipped[0] <= 4  # constant, one bucket's worth
    assert len(b) == 1 and set(b.networks()) == {"n1"}


def test_digest_alternatives_are_ignored_by_a_store_without_refusals() -> None:
    """A peer's alternatives only ever cause a skip when they equal what we hold; an old peer
    (no alternatives) is the plain protocol."""
    a, b = forced("a"), validating("b")
    a.put("networks", "n2", {**NET, "name": "n2", "vni": 1}, T0)
    exchange(a, b, T0)
    groups = codec.decode_digest_groups(b.digest())
    assert groups["networks"].alts  # b says what it refuses
    assert codec.decode_digest(b.digest())["networks"][0] == groups["networks"].level
    c = forced("c")  # holds nothing: b's alternative is not c's, c must still send its entries
    c.put("networks", "n3", {**NET, "name": "n3"}, T0)
    assert exchange(b, c, T0 + 1)[0] == 1


def test_a_persisted_row_from_the_far_future_does_not_move_the_clock() -> None:
    """Found by fuzzing the store's rows: one row stamped far ahead moved the store's clock past
    what peers accept, so every later write of this node was refused (refused_skew), even
    after a restart. It is skipped on load, counted, and the clock stays near now."""
    from meshnet import wire
    from meshnet.state import Entry, Hlc
    from meshnet.state.store import Store

    now = 1_800_000_000.0
    future = Entry("networks", "n", wire.pack({"x": 1}), Hlc(int(now * 1000) + 10**9, 0), "b")
    ok = Entry("networks", "m", wire.pack({"x": 2}), Hlc(int(now * 1000) - 1000, 0), "b")
    store = Store("a")
    assert store.load([future, ok], now) == 1
    assert store.stats.refused_skew == 1
    assert store.entry("networks", "n") is None
    written = store.put("networks", "k", {"x": 3}, now)
    assert written.hlc.wall_ms <= int(now * 1000) + 1
