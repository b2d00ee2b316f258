"""Byte budgets (issue #14): the decode budget, the decode cache's byte bound, push-pull and
anti-entropy refused past their budgets, and the store's MAX_STORE_BYTES."""

from __future__ import annotations

import random
import tracemalloc
from typing import Any
from unittest import mock

import msgpack
import pytest

from meshnet import decode_budget, wire
from meshnet.agent.control import OpError
from meshnet.agent.state_service import StateService
from meshnet.decode_budget import Budget
from meshnet.membership import Membership, MembershipConfig, MembershipProtocolError, NodeMeta
from meshnet.membership.messages import (
    DECODE_CACHE_ENTRY_BYTES,
    MAX_PUSH_PULL_DECODE_BYTES,
    META_DECODED_PER_BYTE,
    Alive,
    DecodeCache,
    MsgType,
    PushPull,
    PushPullOverBudget,
    PushPullState,
    Suspect,
    decode_packet,
    decode_push_pull,
)
from meshnet.membership.types import MemberState
from meshnet.state import Entry, Hlc, StateProtocolError, Store, StoreConfig, StoreFull, codec
from meshnet.state.store import MAX_STORE_BYTES, STORE_ENTRY_BYTES

T0 = 1_700_000_000.0

# ---------------------------------------------------------------- the decode budget


def test_small_input_is_decoded_without_the_hooks() -> None:
    data = msgpack.packb([1, [2, {"a": []}]])
    budget = Budget(len(data) * decode_budget.MAX_BYTES_PER_INPUT_BYTE)
    assert decode_budget.unpack(data, budget, max_bytes=100, exc=ValueError,
                                over=OverflowError) == wire.unpack(data)
    assert budget.used == 0  # it could not have passed the budget: nothing was charged


def test_the_estimate_charges_each_container_and_slot() -> None:
    budget = Budget(10**6)
    got = decode_budget.unpack(msgpack.packb([[], {"a": 1}, "s"]), budget, max_bytes=100,
                               exc=ValueError, over=OverflowError, always_charge=True)
    assert got == [[], {"a": 1}, "s"]
    # outer list: 64 + 3 x 64; the empty list: 64; the map: 64 + 2 x 64 for its entry
    assert budget.used == 256 + 64 + 192


def test_over_budget_stops_the_decode_and_raises_the_callers_exception() -> None:
    data = msgpack.packb([[[]] * 1000 for _ in range(100)])
    with pytest.raises(OverflowError, match="over 50000 bytes"):
        decode_budget.unpack(data, Budget(50_000), max_bytes=10**6, exc=ValueError,
                             over=OverflowError)
    with pytest.raises(ValueError):  # malformed input is still the protocol's error
        decode_budget.unpack(b"\x92\x90\xc1", Budget(1000), max_bytes=10**6, exc=ValueError,
                             over=OverflowError, always_charge=True)
    with pytest.raises(ValueError):
        decode_budget.unpack(data, Budget(50_000), max_bytes=100, exc=ValueError,
                             over=OverflowError)


@pytest.mark.parametrize("body", [
    [[[]] * 100 for _ in range(100)],  # empty arrays: the 64x case
    [[{}] * 100 for _ in range(100)],
    [[1000] * 100 for _ in range(100)],  # int16: a 32-byte int each
    [["ab"] * 100 for _ in range(100)],  # two-letter strs
    [[b"xy"] * 100 for _ in range(100)],
    [{f"k{i}": i for i in range(100)} for _ in range(100)],
], ids=["arrays", "maps", "ints", "strs", "bins", "map entries"])
def test_the_estimate_is_above_what_decoding_allocates(body: object) -> None:
    data = msgpack.packb(body)
    budget = Budget(10**9)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    got = decode_budget.unpack(data, budget, max_bytes=10**7, exc=ValueError,
                               over=OverflowError, always_charge=True)
    held = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert got == body
    assert held <= budget.used + len(data)  # (characters and bytes: at most the input)
    assert budget.used <= len(data) * decode_budget.MAX_BYTES_PER_INPUT_BYTE


# ---------------------------------------------------------------- push-pull


def core(i: int) -> Membership:
    return Membership(MembershipConfig.lan(), NodeMeta(f"n{i}", (f"10.0.0.{i}", 7946)),
                      random.Random(i), 0.0)


def honest_push_pull(n: int) -> bytes:
    states = []
    for i in range(n):
        meta = NodeMeta(f"node{i}", (f"10.1.{i // 250}.{i % 250}", 7946), {"zone": "a"})
        states.append(PushPullState(meta.name, i, MemberState.ALIVE, meta, meta.encode()))
    return PushPull(False, states, b"").encode()


def test_push_pull_over_its_budget_is_refused() -> None:
    data = honest_push_pull(200)
    assert len(decode_push_pull(data).states) == 200
    with pytest.raises(PushPullOverBudget):
        decode_push_pull(data, budget=200 * 320)  # 200 rows of 4 fields need 200 x 320 and more
    assert issubclass(PushPullOverBudget, MembershipProtocolError)  # the one exception type
    # The budget is far above what the largest honest push-pull needs: 100,000 rows of 9 fields
    # (and as many certificates), charged 640 bytes a row.
    assert MAX_PUSH_PULL_DECODE_BYTES > 100_000 * (64 + 9 * 64) + 100_000 * 64 + (1 << 20)


def test_core_counts_push_pulls_over_budget_both_ways() -> None:
    m = core(1)
    assert m.stats["push_pulls_over_budget"] == 0
    evil = bytes((MsgType.PUSH_PULL,)) + msgpack.packb(
        [1, False, [[[]] * 1000 for _ in range(1600)], b""])  # 1.6 MB: ~205 MB estimated
    assert m.handle_stream_request(evil, ("10.0.0.2", 7946), 1.0) is None
    m.receive_stream_reply(evil, ("10.0.0.2", 7946), 1.0)
    assert m.stats["push_pulls_over_budget"] == 2
    assert m.stats["push_pulls_bad"] == 0  # a reason of its own


# ---------------------------------------------------------------- the decode cache


def padded(i: int, pad: int) -> bytes:
    return bytes((MsgType.SUSPECT,)) + msgpack.packb([1, f"x{i}", "n2", b"\0" * pad])


def test_decode_cache_charges_each_entry_and_clears_past_its_bytes() -> None:
    stats: dict[str, int] = {}
    cache = DecodeCache(max_bytes=100_000, stats=stats)
    part = padded(0, 1000)
    cache.decode(part)  # one part: cached as a part and as a packet
    assert cache.used == 2 * (len(part) + DECODE_CACHE_ENTRY_BYTES) + 8
    for i in range(1, 200):
        got = cache.decode(padded(i, 1000))
        assert list(got) == decode_packet(padded(i, 1000))
        assert cache.used <= cache.max_bytes
    assert stats["decode_cache_clears_bytes"] >= 3 and stats["decode_cache_clears"] == 0
    assert len(cache.parts) < 50 and len(cache.packets) < 50


def test_decode_cache_clears_every_table_together() -> None:
    stats: dict[str, int] = {}
    cache = DecodeCache(max_entries=4, stats=stats)
    for i in range(4):
        meta = NodeMeta(f"a{i}", ("10.0.0.1", 1))
        cache.decode(Alive(1, meta, meta.encode()).encode())
    assert len(cache.meta) == 4 and len(cache.parts) == 4
    meta = NodeMeta("b", ("10.0.0.1", 1))
    cache.decode(Alive(1, meta, meta.encode()).encode())
    # the metadata table was full: everything went (a part's alive shares its NodeMeta)
    assert stats["decode_cache_clears"] == 1
    assert set(cache.meta.values()) == {meta} and len(cache.parts) == 1
    raw = meta.encode()
    alive = Alive(1, meta, raw).encode()
    expected = (DECODE_CACHE_ENTRY_BYTES + (1 + META_DECODED_PER_BYTE) * len(raw)
                + len(alive) + DECODE_CACHE_ENTRY_BYTES + len(raw)
                + len(alive) + DECODE_CACHE_ENTRY_BYTES + 8)
    assert cache.used == expected


def test_push_pull_metadata_is_charged_to_the_cache() -> None:
    cache = DecodeCache(max_bytes=50_000)
    decode_push_pull(honest_push_pull(100), cache=cache)
    assert 0 < cache.used <= 50_000 and cache.stats["decode_cache_clears_bytes"] >= 1


def test_core_counts_its_cache_clears() -> None:
    m = core(1)
    assert m.stats["decode_cache_clears"] == m.stats["decode_cache_clears_bytes"] == 0
    for i in range(1200):  # ~72 MB of distinct padded parts
        m.receive_datagram(padded(i, 60_000), ("10.0.0.2", 7946), 1.0)
    assert m.stats["decode_cache_clears_bytes"] >= 1 and m.stats["bad_packets"] == 0
    shared = DecodeCache()  # a shared cache keeps its own counters
    m2 = Membership(MembershipConfig.lan(), NodeMeta("n9", ("10.0.0.9", 7946)),
                    random.Random(9), 0.0, decode_cache=shared)
    assert shared.stats is not m2.stats and "decode_cache_clears" in m2.stats


def test_suspect_equality_survives_the_cache() -> None:
    cache = DecodeCache(max_bytes=1)  # every insert clears: still the same answers
    for _ in range(3):
        assert list(cache.decode(Suspect(1, "a", "b").encode())) == [Suspect(1, "a", "b")]


# ---------------------------------------------------------------- anti-entropy messages


def entry(key: str, value: dict[str, Any] | None, wall: int = 1_700_000_000_000,
          table: str = "networks") -> Entry:
    return Entry(table, key, None if value is None else wire.pack(value), Hlc(wall, 0), "w")


def test_decode_value_sized_estimates_the_decoded_value() -> None:
    data, size = codec.decode_value_sized(wire.pack({"a": 1, "b": [1, 2], "c": "x"}))
    assert data == {"a": 1, "b": [1, 2], "c": "x"}
    assert size == (64 + 3 * 128) + (64 + 2 * 64)


def test_entries_message_over_budget_is_refused_and_counted() -> None:
    store = Store("a")
    msg = codec.encode_entries([entry(f"k{i}", {"x": [[]] * 100}) for i in range(20)], None)
    with mock.patch.object(codec, "MAX_STREAM_DECODE_BYTES", 50_000):
        with pytest.raises(codec.OverBudget):
            codec.decode_entries(msg)
        with pytest.raises(StateProtocolError):  # (OverBudget is one)
            store.apply_entries(msg, T0)
        digest = codec.encode_digest([("t", 0, bytes(8), [[0, 1]] * 1)])
        bloated = wire.frame(codec.MsgType.DIGEST, [1, [], [[]] * 20_000])
        with pytest.raises(StateProtocolError):
            store.diff_for(bloated)
        store.diff_for(digest)
    assert store.stats.over_budget == 2 and store.stats.bad_messages == 0
    assert store.apply_entries(msg, T0) is None and len(store) == 20  # within the real budget


# ---------------------------------------------------------------- the store


def cost(key: str, value: bytes | None, size: int) -> int:
    return STORE_ENTRY_BYTES + len(key) + (0 if value is None else len(value)) + size


def test_bytes_held_follows_every_write_and_collection() -> None:
    s = Store("a", StoreConfig(tombstone_ttl=1.0))
    e1 = s.put("networks", "k1", {"x": 1}, T0)
    e2 = s.put("networks", "k2", {"y": [1, 2]}, T0)
    sizes = {"k1": 64 + 128, "k2": 64 + 128 + 64 + 2 * 64}
    assert s.stats.bytes_held == cost("k1", e1.value, sizes["k1"]) + cost("k2", e2.value,
                                                                             sizes["k2"])
    s.delete("networks", "k1", T0)
    assert s.stats.bytes_held == cost("k1", None, 0) + cost("k2", e2.value, sizes["k2"])
    s.delete("networks", "k2", T0)
    s.handle_timer(T0 + 10)
    assert len(s) == 0 and s.stats.bytes_held == 0


def test_local_write_over_the_bound_raises_store_full_and_counts() -> None:
    assert MAX_STORE_BYTES == 256 << 20
    s = Store("a", max_bytes=20_000)
    big = {"blob": b"x" * 6_000}
    for i in range(2):
        s.put("networks", f"k{i}", big, T0)
    with pytest.raises(StoreFull, match="store full: writing networks/k2"):
        s.put("networks", "k2", big, T0)
    assert s.stats.refused_bytes == 1 and s.get("networks", "k2") is None
    # What does not grow the store is always taken, even past the bound.
    s.max_bytes = 1_000
    s.put("networks", "k0", {"blob": b"y"}, T0)
    assert s.delete("networks", "k1", T0) is not None
    assert s.reannounce("a", T0) == []
    assert s.stats.refused_bytes == 1


def test_remote_writes_over_the_bound_are_refused_and_not_regossiped() -> None:
    big = {"blob": b"x" * 500}  # (a delta fits a packet)
    s = Store("a")
    one = s.put("networks", "mine", big, T0)
    s.max_bytes = 2 * s.stats.bytes_held + 100  # room for one more like it
    s.take_deltas(10**6)
    assert one.value is not None
    for i in range(3):
        delta = codec.encode_delta(entry(f"r{i}", big))
        s.apply_delta(delta, T0)
    assert s.get("networks", "r0") is not None and s.get("networks", "r1") is None
    assert s.stats.refused_bytes == 2 and s.stats.bytes_held <= s.max_bytes
    gossiped = {codec.decode_delta(d).entry.key for d in s.take_deltas(10**6)}
    assert "r0" in gossiped and not gossiped & {"r1", "r2"}  # what was refused is not passed on
    # a tombstone of a held key is taken (it is smaller), and once collected frees the room
    s.apply_delta(codec.encode_delta(entry("r0", None, 1_700_000_000_001)), T0)
    assert s.entry("networks", "r0") is not None and s.get("networks", "r0") is None
    s.handle_timer(T0 + 1_000)
    s.apply_delta(codec.encode_delta(entry("r1", big, 1_700_000_000_002)), T0 + 1_000)
    assert s.get("networks", "r1") is not None and s.stats.refused_bytes == 2


def test_load_over_the_bound_skips_rows_and_counts() -> None:
    s = Store("a", max_bytes=20_000)
    rows = [entry(f"k{i}", {"blob": b"x" * 6_000}) for i in range(5)]
    assert s.load(rows, T0) == 2
    assert s.stats.refused_bytes == 3 and s.stats.bytes_held <= 20_000
    assert s.take_dirty().removed == []  # left on disk: a later bound may take them


def test_default_capacity_counts_a_load_past_max_entries() -> None:
    s = Store("a", StoreConfig(max_entries=2))
    assert s.load([entry(f"k{i}", {"i": i}) for i in range(3)], T0) == 2
    assert s.stats.refused_capacity == 1


async def test_a_full_store_is_a_clear_error_for_the_cli() -> None:
    store = Store("a", max_bytes=STORE_ENTRY_BYTES)
    svc = StateService(store, None, "a")  # type: ignore[arg-type]  # (no write reaches the db)
    with pytest.raises(OpError, match="store full: writing networks/n1") as err:
        await svc.put("networks", "n1", {"name": "n1"})
    assert err.value.code == "store_full" and store.stats.refused_bytes == 1

