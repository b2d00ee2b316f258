"""Memory amplification by key holders (issue #14, "Byte budgets"), against the sans-IO cores.

A key holder (or anyone whose stream or datagram authenticates) sends input that is small or
bounded in length but costs far more memory once decoded or cached. Before the fix (seen
failing on 3ac6cc7):
- a push-pull of empty msgpack arrays decoded to 64x its size (20 MiB, the stream cap, would be
  1.3 GB); so did an anti-entropy message on the store's stream;
- the decode cache was bounded by entry count only, so distinct padded broadcast parts (a
  decoder accepts arrays longer than it knows) stayed cached at their full size: 16,384 of them
  ~1 GB;
- the store was bounded by entry count only: values that each decode to 64x their size were all
  kept (1,000,000 entries x 64 KiB, 61 GiB, before decoding).
After it, each is bounded in bytes by a named constant and refused past it, counted, and the
node goes on working.

Memory is measured with tracemalloc (what Python allocates), so the numbers do not depend on
the allocator or on other tests in the process.
"""

from __future__ import annotations

import gc
import random
import sys
import tracemalloc
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import msgpack
import pytest

from meshnet.membership import Membership, MembershipConfig, NodeMeta
from meshnet.membership.messages import Alive, MsgType, Suspect
from meshnet.state import codec
from meshnet.state.hlc import Hlc
from meshnet.state.store import Store
from meshnet.state.types import Entry, StoreConfig
from meshnet.state.validate import check_value

MiB = 1 << 20
# The bounds under test, as numbers: a test must run (and fail) against the code before them.
PUSH_PULL_DECODE_BUDGET = 96 * MiB  # membership.messages.MAX_PUSH_PULL_DECODE_BYTES
STREAM_DECODE_BUDGET = 160 * MiB  # state.codec.MAX_STREAM_DECODE_BYTES
DECODE_CACHE_BUDGET = 64 * MiB  # membership.messages.DECODE_CACHE_BYTES
STORE_BUDGET = 256 * MiB  # state.store.MAX_STORE_BYTES


@contextmanager
def traced() -> Iterator[list[int]]:
    """[peak, retained]: bytes Python allocated at most, and still held at the end, inside."""
    out = [0, 0]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield out
    finally:
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[0], out[1] = peak - base, current - base


def core(i: int) -> Membership:
    return Membership(MembershipConfig.lan(), NodeMeta(f"n{i}", (f"10.0.0.{i}", 7946)),
                      random.Random(i), 0.0)


def empty_arrays(mib: int) -> list[list[list[Any]]]:
    """MIB MiB of msgpack: rows of 1,000 empty arrays (one byte each, a 56-byte list decoded)."""
    return [[[]] * 1000 for _ in range(mib * MiB // 1000)]


# ---------------------------------------------------------------- push-pull inflation


def test_push_pull_of_empty_arrays_is_refused_within_its_budget() -> None:
    victim, peer = core(1), core(2)
    evil = bytes((MsgType.PUSH_PULL,)) + msgpack.packb([1, False, empty_arrays(6), b""])
    assert len(evil) < 7 * MiB  # well under the 20 MiB a push-pull stream may carry
    with traced() as mem:
        reply = victim.handle_stream_request(evil, peer.local().addr, 1.0)
    print(f"push-pull of {len(evil):,} bytes: peak {mem[0]:,} bytes ({mem[0] / len(evil):.0f}x)",
          file=sys.stderr)
    assert mem[0] < PUSH_PULL_DECODE_BUDGET, f"decoding peaked at {mem[0]:,} bytes"
    assert reply is None
    assert victim.stats.get("push_pulls_over_budget") == 1
    # It goes on: an honest push-pull is answered and merged.
    peer.join([victim.local().addr], 2.0)
    (req, dst), = peer.streams_to_open()
    answer = victim.handle_stream_request(req, peer.local().addr, 2.0)
    assert answer is not None
    peer.receive_stream_reply(answer, dst, 2.0)
    assert {m.name for m in victim.members()} == {"n1", "n2"}
    assert {m.name for m in peer.members()} == {"n1", "n2"}


def test_anti_entropy_of_empty_arrays_is_refused_within_its_budget() -> None:
    """The store's anti-entropy rides the same stream: its message is bounded the same way."""
    store = Store("victim")
    evil = bytes((codec.MsgType.ENTRIES,)) + msgpack.packb([1, empty_arrays(6), None])
    with traced() as mem:
        refused = _raises(lambda: store.apply_entries(evil, 1_000.0))
    print(f"entries of {len(evil):,} bytes: peak {mem[0]:,} bytes ({mem[0] / len(evil):.0f}x)",
          file=sys.stderr)
    assert mem[0] < STREAM_DECODE_BUDGET, f"decoding peaked at {mem[0]:,} bytes"
    assert refused
    assert getattr(store.stats, "over_budget", 0) == 1
    good = codec.encode_entries([_entry("networks", "net1", {"x": 1})], None)  # no validator
    assert store.apply_entries(good, 1_000.0) is None and len(store) == 1


def _raises(fn: Callable[[], object]) -> bool:
    try:
        fn()
    except codec.StateProtocolError:
        return True
    return False


# ---------------------------------------------------------------- padded-cache inflation


def padded_suspect(i: int, size: int = 60_000) -> bytes:
    """A distinct Suspect part padded to SIZE bytes by a field the decoder does not know."""
    pad = size - len(Suspect(1, f"x{i}", "n2").encode()) - 5  # bin 32 header: 5 bytes
    return bytes((MsgType.SUSPECT,)) + msgpack.packb([1, f"x{i}", "n2", b"\0" * pad])


def test_padded_broadcast_parts_cannot_fill_the_decode_cache() -> None:
    victim = core(1)
    n = 5_000  # 300 MB of distinct padded parts
    with traced() as mem:
        for i in range(n):
            victim.receive_datagram(padded_suspect(i), ("10.0.0.2", 7946), 1.0 + i * 1e-4)
    print(f"{n:,} padded parts of 60 KB: peak {mem[0]:,} bytes, {mem[1]:,} held after",
          file=sys.stderr)
    assert mem[0] < DECODE_CACHE_BUDGET, f"the cache grew to {mem[0]:,} bytes"
    assert victim.stats["bad_packets"] == 0  # each was decoded (and then cleared, counted)
    assert victim.stats.get("decode_cache_clears_bytes", 0) >= 1
    # The cache still serves: a gossiped alive is decoded and taken.
    meta = NodeMeta("n3", ("10.0.0.3", 7946))
    victim.receive_datagram(Alive(1, meta, meta.encode()).encode(), ("10.0.0.3", 7946), 2.0)
    assert "n3" in {m.name for m in victim.members()}


# ---------------------------------------------------------------- store inflation


def _entry(table: str, key: str, value: dict[str, Any], wall: int = 1_000_000) -> Entry:
    return Entry(table, key, msgpack.packb(value), Hlc(wall, 0), "attacker")


def inflating_network(i: int) -> dict[str, Any]:
    """A network every replica's validator takes (unknown fields are allowed: a newer agent's),
    whose 64 KiB value decodes to ~4 MB: 65,000 empty arrays."""
    return {"name": f"net{i}", "vni": 5000 + i, "subnet": f"10.{i}.0.0/16",
            "x": [[]] * 65_000}


def held_bytes(obj: object) -> int:
    """Bytes of the objects reachable from OBJ through lists and dicts (values as stored)."""
    total = sys.getsizeof(obj)
    if isinstance(obj, Mapping):  # the store hands out read-only views of its dicts
        total += sum(held_bytes(k) + held_bytes(v) for k, v in obj.items())
    elif isinstance(obj, list):
        total += sum(held_bytes(v) for v in obj)
    return total


def test_store_bytes_bounded_against_inflating_values() -> None:
    store = Store("victim", StoreConfig(validator=check_value))
    sent = 0
    for batch in range(10):  # ten anti-entropy messages of 8 writes each: 5 MB on the wire
        entries = [_entry("networks", f"net{i}", inflating_network(i))
                   for i in range(batch * 8, batch * 8 + 8)]
        assert all(check_value("networks", e.key, msgpack.unpackb(e.value)) is None
                   for e in entries)
        msg = codec.encode_entries(entries, None)
        sent += len(msg)
        store.apply_entries(msg, 1_000.0)
    held = sum(held_bytes(store.get("networks", e.key)) for e in store.entries())
    print(f"{sent:,} bytes of writes: the store holds {len(store)} values of {held:,} bytes",
          file=sys.stderr)
    assert held < STORE_BUDGET, f"the store holds {held:,} bytes of decoded values"
    assert getattr(store.stats, "refused_bytes", 0) > 0
    # It goes on: a small write still fits; a local write over the bound is refused with a
    # reason (StoreFull, a ValueError), not taken.
    small = {"name": "ok", "vni": 4999, "subnet": "10.200.0.0/16"}
    store.apply_entries(codec.encode_entries([_entry("networks", "ok", small)], None), 1_000.0)
    assert store.get("networks", "ok") is not None
    with pytest.raises(ValueError, match="store full"):
        store.put("networks", "net99", inflating_network(99), 1_000.0)
    assert store.get("networks", "net99") is None
