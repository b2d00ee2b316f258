"""Unit tests of the replicated store core (meshnet/state)."""

from __future__ import annotations

import itertools

import pytest

from meshnet import wire
from meshnet.state import (
    ENDPOINTS,
    NETWORKS,
    ChangeEvent,
    Endpoint,
    Entry,
    EventsLost,
    Hlc,
    Network,
    Service,
    StateProtocolError,
    Store,
    StoreConfig,
    StoreEvent,
    StoreFull,
    codec,
    merge,
    tombstone_ttl_for,
)
from meshnet.state.hlc import MAX_LOGICAL, MAX_WALL_MS
from meshnet.state.store import MIN_DELTA_TRANSMITS
from meshnet.state.types import MAX_VALUE_BYTES

T0 = 1_700_000_000.0


def ep(name: str, node: str, network: str = "net", ip: str = "10.0.0.2") -> Endpoint:
    return Endpoint(name, network, ip, "02:42:0a:00:00:02", node, "web", 1)


def sync(a: Store, b: Store, now: float) -> int:
    """One anti-entropy exchange started by ``a``; returns the bytes moved."""
    d = a.digest()
    diff = b.diff_for(d)
    back = a.apply_entries(diff, now)
    assert back is not None
    assert b.apply_entries(back, now) is None
    return len(d) + len(diff) + len(back)


def canon(s: Store) -> list[tuple[str, str, bytes | None, int, str]]:
    return sorted((e.table, e.key, e.value, e.hlc.pack(), e.writer) for e in s.entries())


def drain(s: Store) -> list[StoreEvent]:
    out = []
    while (ev := s.next_event()) is not None:
        out.append(ev)
    return out


# ---- HLC ---------------------------------------------------------------------------------------


def test_hlc_monotonic_when_now_goes_backwards() -> None:
    h = Hlc()
    seen = []
    for now in [10.0, 10.0, 9.0, 5.0, 10.0005, 10.002, 3.0, 11.0]:
        h = h.tick(now)
        seen.append(h)
    assert all(a < b for a, b in itertools.pairwise(seen))
    assert seen[0] == Hlc(10_000, 0)
    assert seen[2] == Hlc(10_000, 2)  # now went back: logical advances, wall holds
    assert seen[-1] == Hlc(11_000, 0)


def test_hlc_update_passes_remote_and_local() -> None:
    local = Hlc(5_000, 3)
    remote = Hlc(7_000, 9)
    u = local.update(remote, 6.0)
    assert u > remote and u > local and u == Hlc(7_000, 10)
    assert Hlc(7_000, 2).update(Hlc(7_000, 9), 1.0) == Hlc(7_000, 10)
    assert Hlc(8_000, 2).update(Hlc(7_000, 9), 1.0) == Hlc(8_000, 3)
    assert Hlc(1, 0).update(Hlc(2, 0), 9.0) == Hlc(9_000, 0)  # physical time wins


def test_hlc_logical_overflow_borrows_next_millisecond() -> None:
    h = Hlc(1_000, MAX_LOGICAL)
    assert h.tick(0.5) == Hlc(1_001, 0)
    assert Hlc(MAX_WALL_MS, MAX_LOGICAL).tick(0.0) == Hlc(MAX_WALL_MS, MAX_LOGICAL)


def test_hlc_pack_roundtrip_and_order() -> None:
    for h in [Hlc(), Hlc(1, 2), Hlc(MAX_WALL_MS, MAX_LOGICAL), Hlc(1_700_000_000_000, 7)]:
        assert Hlc.unpack(h.pack()) == h
        assert 0 <= h.pack() < 1 << 63  # fits a signed SQLite INTEGER
    assert Hlc(1, 5).pack() < Hlc(2, 0).pack()
    with pytest.raises(ValueError):
        Hlc.unpack(1 << 63)
    with pytest.raises(ValueError):
        Hlc(-1, 0)


def test_store_clock_monotonic_across_writes_with_backwards_now() -> None:
    s = Store("a")
    hlcs = [s.put(NETWORKS, "n", {"i": i}, T0 - i).hlc for i in range(50)]
    assert hlcs == sorted(hlcs) and len(set(hlcs)) == 50
    assert s.get(NETWORKS, "n") == {"i": 49}  # the last write wins locally even with now going back


# ---- LWW merge ---------------------------------------------------------------------------------


def test_merge_tie_broken_by_writer() -> None:
    h = Hlc(1000, 0)
    a = Entry("t", "k", wire.pack({"v": 1}), h, "a")
    b = Entry("t", "k", wire.pack({"v": 2}), h, "b")
    assert merge(a, b) == merge(b, a) == b
    assert merge(a, None) == a and merge(None, a) == a


def test_delete_beats_earlier_write_and_older_write_stays_dead() -> None:
    a, b = Store("a"), Store("b")
    w = a.put(NETWORKS, "n", {"x": 1}, T0)
    d = a.delete(NETWORKS, "n", T0 + 1)
    assert d is not None and d.tombstone
    assert a.delete(NETWORKS, "n", T0 + 2) is None  # nothing left to delete
    b.apply_delta(codec.encode_delta(d), T0 + 1)
    assert not b.apply_delta(codec.encode_delta(w), T0 + 1)  # older write loses to the tombstone
    assert b.get(NETWORKS, "n") is None
    assert b.entry(NETWORKS, "n") == d


def test_remote_write_advances_clock_so_next_local_write_wins() -> None:
    a, b = Store("a"), Store("b")
    w = a.put(NETWORKS, "n", {"x": 1}, T0 + 100)  # a's clock is ahead
    b.apply_delta(codec.encode_delta(w), T0)
    d = b.delete(NETWORKS, "n", T0)  # b deletes after seeing it: must win although b's now is older
    assert d is not None and d.hlc > w.hlc
    a.apply_delta(codec.encode_delta(d), T0 + 100)
    assert a.get(NETWORKS, "n") is None


def test_write_from_far_future_refused() -> None:
    a, b = Store("a"), Store("b", StoreConfig(max_clock_skew=60))
    w = a.put(NETWORKS, "n", {"x": 1}, T0 + 3600)
    assert not b.apply_delta(codec.encode_delta(w), T0)
    assert b.stats.refused_skew == 1 and b.clock.wall_ms < (T0 + 3600) * 1000
    assert b.apply_delta(codec.encode_delta(w), T0 + 3600)  # once our clock catches up


# ---- values and tables -------------------------------------------------------------------------


def test_put_validates_input() -> None:
    s = Store("a")
    with pytest.raises(ValueError):
        s.put("", "k", {}, T0)
    with pytest.raises(ValueError):
        s.put("t", "", {}, T0)
    with pytest.raises(ValueError):
        s.put("t", "k", {"x": object()}, T0)
    with pytest.raises(ValueError):
        s.put("t", "k", {"x": b"x" * MAX_VALUE_BYTES}, T0)
    with pytest.raises(ValueError):
        Store("")


def test_extensible_tables_and_typed_helpers() -> None:
    s = Store("a")
    s.put("volumes", "v1", {"size": 3}, T0)
    assert s.view("volumes") == {"v1": {"size": 3}}
    net = Network("front", 4097, "10.1.0.0/24", encrypted=True)
    svc = Service("web", "front", replicas=3, spec={"cmd": ["sleep", "1"]})
    e = ep("web.1", "a", network="front")
    s.put_network(net, T0)
    s.put_service(svc, T0)
    s.put_endpoint(e, T0)
    assert s.networks() == {"front": net}
    assert s.services()["web"] == svc and s.services()["web"].spec == {"cmd": ["sleep", "1"]}
    assert s.endpoints() == [e] and s.endpoints(network="front") == [e]
    assert s.endpoints(network="other") == []
    assert e.key == "front/web.1"
    # a malformed value in a known table is skipped by the typed views, not fatal
    s.put(NETWORKS, "bad", {"name": 3}, T0)
    assert "bad" not in s.networks() and "bad" in s.view(NETWORKS)
    # unknown fields survive a round trip
    s.put(NETWORKS, "x", {**net.to_value(), "name": "x", "mtu": 1450}, T0)
    assert s.networks()["x"].to_value()["mtu"] == 1450


def test_view_values_are_read_only() -> None:
    s = Store("a")
    s.put(NETWORKS, "n", {"x": 1}, T0)
    v = s.view(NETWORKS)["n"]
    with pytest.raises(TypeError):
        v["x"] = 2  # type: ignore[index]


def test_capacity_bound() -> None:
    s = Store("a", StoreConfig(max_entries=3))
    for i in range(3):
        s.put("t", f"k{i}", {}, T0)
    with pytest.raises(StoreFull):
        s.put("t", "k9", {}, T0)
    s.put("t", "k0", {"again": 1}, T0)  # an existing key may still be written
    other = Store("b")
    e = other.put("t", "k9", {}, T0)
    assert not s.apply_delta(codec.encode_delta(e), T0)
    assert s.stats.refused_capacity == 1


# ---- ownership ---------------------------------------------------------------------------------


def test_dead_owner_hides_endpoints_at_once_and_they_return() -> None:
    a, b = Store("a"), Store("b")
    mine = a.put_endpoint(ep("web.1", "a"), T0)
    theirs = a.put_endpoint(ep("web.2", "c", ip="10.0.0.3"), T0)
    for e in (mine, theirs):
        b.apply_delta(codec.encode_delta(e), T0)
    drain(b)
    # c was never declared live on b: hidden
    assert [x.name for x in b.endpoints()] == []
    b.set_node_live("a", True)
    b.set_node_live("c", True)
    assert [x.name for x in b.endpoints()] == ["web.1", "web.2"]
    drain(b)
    v = b.version
    b.set_node_live("c", False)  # membership: c is dead
    assert [x.name for x in b.endpoints()] == ["web.1"]
    assert b.get(ENDPOINTS, "net/web.2") is None
    assert b.version == v + 1
    evs = drain(b)
    assert len(evs) == 1 and isinstance(evs[0], ChangeEvent)
    assert evs[0].key == "net/web.2" and evs[0].old is not None and evs[0].new is None
    assert b.entry(ENDPOINTS, "net/web.2") == theirs  # no write was made
    assert [e.key for e in b.owned_by("c")] == ["net/web.2"]
    b.set_node_live("c", False)  # repeated: no change
    assert b.version == v + 1 and drain(b) == []
    b.set_node_live("c", True)
    assert [x.name for x in b.endpoints()] == ["web.1", "web.2"]
    evs = drain(b)
    assert len(evs) == 1 and isinstance(evs[0], ChangeEvent) and evs[0].old is None


def test_owner_sees_itself_live_and_reannounces_with_fresh_hlc() -> None:
    a = Store("a")
    e = a.put_endpoint(ep("web.1", "a"), T0)
    assert a.endpoints() == [ep("web.1", "a")]  # a node is live to itself
    other = Store("b")
    other.apply_delta(codec.encode_delta(e), T0)
    d = other.delete(ENDPOINTS, e.key, T0 + 1)  # someone withdrew it while a was away
    assert d is not None
    a.apply_delta(codec.encode_delta(d), T0 + 1)
    assert a.endpoints() == []
    assert a.owned_by("a") == []  # tombstones are not owned entries
    # the agent re-puts what it still runs; a fresh HLC beats the delete everywhere
    again = a.put_endpoint(ep("web.1", "a"), T0 + 2)
    other.apply_delta(codec.encode_delta(again), T0 + 2)
    other.set_node_live("a", True)
    assert [x.name for x in other.endpoints()] == ["web.1"]
    re = a.reannounce("a", T0 + 3)
    assert len(re) == 1 and re[0].hlc > again.hlc and re[0].value == again.value


def test_owner_change_moves_ownership() -> None:
    s = Store("a")
    s.set_node_live("b", True)
    s.put_endpoint(ep("t", "b"), T0)
    s.put_endpoint(ep("t", "c"), T0 + 1)  # the task moved to c (not live)
    assert s.owned_by("b") == [] and len(s.owned_by("c")) == 1
    assert s.endpoints() == []


# ---- events ------------------------------------------------------------------------------------


def test_events_and_version() -> None:
    s = Store("a")
    assert s.version == 0 and s.next_event() is None
    s.put(NETWORKS, "n", {"x": 1}, T0)
    s.put(NETWORKS, "n", {"x": 1}, T0)  # same value again: no visible change
    s.put(NETWORKS, "n", {"x": 2}, T0)
    s.delete(NETWORKS, "n", T0)
    evs = drain(s)
    assert [(e.old, e.new) for e in evs if isinstance(e, ChangeEvent)] == [
        (None, {"x": 1}),
        ({"x": 1}, {"x": 2}),
        ({"x": 2}, None),
    ]
    assert s.version == 3 and [e.version for e in evs] == [1, 2, 3]
    first = evs[0]
    assert isinstance(first, ChangeEvent)
    with pytest.raises(AttributeError):
        first.key = "other"  # type: ignore[misc]


def test_event_queue_bounded() -> None:
    s = Store("a", StoreConfig(max_pending_events=10))
    for i in range(25):
        s.put("t", f"k{i}", {}, T0)
    evs = drain(s)
    assert len(evs) <= 10 and isinstance(evs[0], EventsLost)
    assert s.version == 25


def test_remote_change_gives_event() -> None:
    a, b = Store("a"), Store("b")
    b.apply_delta(codec.encode_delta(a.put(NETWORKS, "n", {"x": 1}, T0)), T0)
    evs = drain(b)
    assert len(evs) == 1 and isinstance(evs[0], ChangeEvent) and evs[0].new == {"x": 1}


# ---- deltas ------------------------------------------------------------------------------------


def test_take_deltas_bounded_retransmitted_and_superseded() -> None:
    s = Store("a")
    s.set_cluster_size(9)  # limit = max(8, 4 x ceil(log10(10)) = 4) = 8
    s.put("t", "k", {"v": 1}, T0)
    first = s.take_deltas(1000)
    assert len(first) == 1
    s.put("t", "k", {"v": 2}, T0)  # supersedes the queued write
    assert s.pending_deltas() == 1
    sent = []
    while batch := s.take_deltas(1000):
        sent.extend(batch)
    assert len(sent) == MIN_DELTA_TRANSMITS == 8 and len(set(sent)) == 1
    assert codec.decode_delta(sent[0]).data == {"v": 2}
    s.set_cluster_size(999)  # memberlist's limit beyond the floor: 4 x log10(1000)
    s.put("t", "k", {"v": 3}, T0)
    assert sum(len(s.take_deltas(1000)) for _ in range(20)) == 12


def test_take_deltas_respects_limit_and_least_sent_first() -> None:
    s = Store("a")
    s.set_cluster_size(100)
    for i in range(50):
        s.put("t", f"key-{i:03}", {"pad": "x" * 40}, T0)
    one = len(s.take_deltas(10_000, overhead=3)[0])
    for limit in (0, 1, one, one + 2, one * 5 + 15, 1400):
        batch = s.take_deltas(limit, overhead=3)
        assert sum(len(m) + 3 for m in batch) <= limit
    # least-sent first: a new write jumps the queue
    s.put("t", "fresh", {}, T0)
    assert codec.decode_delta(s.take_deltas(200)[0]).entry.key == "fresh"


def test_received_news_is_regossiped_but_old_news_is_not() -> None:
    a, b = Store("a"), Store("b")
    msg = codec.encode_delta(a.put("t", "k", {}, T0))
    assert b.apply_delta(msg, T0)
    assert b.take_deltas(1400) == [msg]
    c = Store("c")
    c.apply_delta(msg, T0)
    c.take_deltas(1400)
    assert not c.apply_delta(msg, T0)  # duplicate


def test_delta_queue_bounded() -> None:
    s = Store("a", StoreConfig(max_queued_deltas=8))
    for i in range(20):
        s.put("t", f"k{i}", {}, T0)
    assert s.pending_deltas() == 8 and s.stats.deltas_evicted == 12


def test_oversized_value_is_not_gossiped_but_replicates_by_anti_entropy() -> None:
    a, b = Store("a"), Store("b")
    a.put("t", "big", {"blob": b"x" * 5000}, T0)
    assert a.pending_deltas() == 0 and a.stats.deltas_too_large == 1
    sync(b, a, T0)
    assert b.get("t", "big") == {"blob": b"x" * 5000}


# ---- anti-entropy ------------------------------------------------------------------------------


def _big_store(node: str, n: int, cfg: StoreConfig | None = None) -> Store:
    s = Store(node, cfg or StoreConfig())
    for i in range(n):
        s.put_endpoint(
            Endpoint(
                f"svc{i % 97}.{i}",
                "net",
                f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}",
                "02:42:0a:00:00:02",
                f"node{i % 50}",
                f"svc{i % 97}",
                i,
            ),
            T0,
        )
    return s


def test_digest_diff_ships_only_differing_buckets_of_a_10k_store() -> None:
    a = _big_store("a", 10_000)
    b = Store("b")
    b.load(list(a.entries()), T0)
    assert canon(a) == canon(b) and a.digest() == b.digest()
    full = sum(len(codec.encode_entry(e)) for e in a.entries())
    # identical stores: only the digest and two empty diffs move
    assert sync(a, b, T0) < 0.02 * full
    # one difference each way
    a.put_endpoint(ep("only-on-a", "a"), T0 + 1)
    b.delete(ENDPOINTS, next(iter(b.entries())).key, T0 + 1)
    moved = sync(a, b, T0 + 2)
    assert moved < 0.05 * full, (moved, full)
    assert len(a.digest()) < 0.01 * full
    assert canon(a) == canon(b) and a.digest() == b.digest()


def test_one_round_converges_two_diverged_replicas() -> None:
    a, b = Store("a"), Store("b")
    for i in range(300):
        a.put("t", f"a{i}", {"i": i}, T0 + i)
        b.put("t", f"b{i}", {"i": i}, T0 + i)
        a.put("u", f"x{i % 7}", {"w": "a", "i": i}, T0 + i)
        b.put("u", f"x{i % 5}", {"w": "b", "i": i}, T0 + i)
    b.delete("u", "x1", T0 + 999)
    sync(a, b, T0 + 1000)
    assert canon(a) == canon(b) and a.digest() == b.digest()
    assert b.get("u", "x1") is None and a.get("u", "x1") is None


def test_empty_and_one_sided_tables() -> None:
    a, b = Store("a"), Store("b")
    assert sync(a, b, T0) < 50
    b.put("only-b", "k", {}, T0)
    sync(a, b, T0)
    assert a.get("only-b", "k") == {}
    a.put("only-a", "k", {}, T0)
    sync(a, b, T0)
    assert b.get("only-a", "k") == {}
    assert canon(a) == canon(b)


def test_different_bucket_levels_fold_to_each_other() -> None:
    a = _big_store("a", 2_000)  # more buckets than b will use
    b = Store("b")
    b.load(list(a.entries())[:100], T0)
    sync(b, a, T0)  # b's (coarse) digest first
    assert canon(a) == canon(b)
    c = Store("c")
    c.load(list(a.entries())[:100], T0)
    sync(a, c, T0)  # a's (fine) digest first
    assert canon(a) == canon(c)


def test_diff_truncated_by_max_diff_bytes_converges_over_rounds() -> None:
    cfg = StoreConfig(max_diff_bytes=16 * 1024)
    a = _big_store("a", 1_000, cfg)
    b = Store("b", cfg)
    rounds = 0
    while canon(a) != canon(b):
        sync(b, a, T0)
        rounds += 1
        assert rounds < 50
    assert rounds > 1


# ---- tombstone GC ------------------------------------------------------------------------------


def test_tombstone_ttl_rule() -> None:
    assert tombstone_ttl_for(60.0, 30.0) == 120.0
    assert StoreConfig().tombstone_ttl == 120.0


def test_tombstone_collected_after_ttl_and_never_resurrects() -> None:
    cfg = StoreConfig(tombstone_ttl=100.0)
    a, stale = Store("a", cfg), Store("s", cfg)
    w = a.put(NETWORKS, "n", {"x": 1}, T0)
    stale.apply_delta(codec.encode_delta(w), T0)  # stale only ever sees the write
    d = a.delete(NETWORKS, "n", T0 + 1)
    assert d is not None
    assert a.get_timer() == pytest.approx(T0 + 101, abs=0.002)
    assert a.handle_timer(T0 + 50) == 0 and a.entry(NETWORKS, "n") == d
    assert a.handle_timer(T0 + 102) == 1
    assert a.entry(NETWORKS, "n") is None and len(a) == 0 and a.get_timer() is None
    assert a.gc_horizon == (d.hlc.pack(), "a")
    # the old write comes back by gossip and by anti-entropy: refused both ways
    assert not a.apply_delta(codec.encode_delta(w), T0 + 103)
    sync(a, stale, T0 + 104)
    assert a.get(NETWORKS, "n") is None
    # ... and the stale replica learns the key is gone
    assert stale.get(NETWORKS, "n") is None and canon(a) == canon(stale)
    sync(stale, a, T0 + 105)
    assert a.get(NETWORKS, "n") is None and canon(a) == canon(stale)
    # a newer write of the key is welcome
    assert a.apply_delta(codec.encode_delta(stale.put(NETWORKS, "n", {"x": 2}, T0 + 106)), T0 + 106)
    assert a.get(NETWORKS, "n") == {"x": 2}


def test_expired_tombstone_arriving_late_still_deletes() -> None:
    cfg = StoreConfig(tombstone_ttl=10.0)
    a, b = Store("a", cfg), Store("b", cfg)
    w = a.put("t", "k", {}, T0)
    b.apply_delta(codec.encode_delta(w), T0)
    d = a.delete("t", "k", T0 + 1)
    assert d is not None
    b.apply_delta(codec.encode_delta(d), T0 + 500)
    assert b.entry("t", "k") is None and b.gc_horizon == (d.hlc.pack(), "a")
    assert not b.apply_delta(codec.encode_delta(w), T0 + 500)


def test_take_dirty_reports_upserts_and_collections() -> None:
    s = Store("a", StoreConfig(tombstone_ttl=1.0))
    s.put("t", "k", {}, T0)
    s.put("t", "j", {}, T0)
    ch = s.take_dirty()
    assert sorted(e.key for e in ch.upserts) == ["j", "k"] and ch.removed == []
    assert s.take_dirty().upserts == []
    s.delete("t", "k", T0)
    s.handle_timer(T0 + 10)
    ch = s.take_dirty()
    assert ch.upserts == [] and ch.removed == [("t", "k")] and ch.gc_horizon[0] > 0


def test_load_seeds_without_events_and_moves_clock() -> None:
    # Written while the clock was ahead (within the skew peers accept, 300 s), loaded after it
    # was set back; rows beyond the skew are skipped (test_store_validate).
    a = Store("a")
    es = [a.put("t", f"k{i}", {"i": i}, T0 + 200) for i in range(5)]
    a.delete("t", "k0", T0 + 200)
    b = Store("a")
    assert b.load(list(a.entries()), T0, gc_horizon=(7, "x")) == 5
    assert b.next_event() is None and b.take_dirty().upserts == [] and b.gc_horizon == (7, "x")
    assert b.clock > es[-1].hlc
    assert b.put("t", "k1", {"new": 1}, T0).hlc > es[-1].hlc  # beats what it wrote before restart
    assert canon(b) != canon(a)


def test_decoders_raise_only_state_protocol_error() -> None:
    s = Store("a")
    for bad in [b"", b"\x01", b"\x02\x90", b"\x03\x93\x01\x90\x91\x93\xa1t\x0d\x90", b"\xff" * 9]:
        for fn in (
            lambda d: s.apply_delta(d, T0),
            lambda d: s.apply_entries(d, T0),
            s.diff_for,
        ):
            with pytest.raises(StateProtocolError):
                fn(bad)
    assert s.stats.bad_messages == 15
