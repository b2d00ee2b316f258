"""Hypothesis properties of signed writes: the merge algebra with signatures, replicas without
an authorizer converging on the same bytes, and replicas with one converging on exactly the
newest genuine writes whatever forged copies, deferrals and delivery orders they meet."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet import wire
from meshnet.state import (
    SIG_BYTES,
    Entry,
    Hlc,
    Refusal,
    Store,
    StoreConfig,
    codec,
    copy_order,
    entry_order,
    merge,
)

T0 = 1_700_000_000.0
T0_MS = int(T0 * 1000)
TTL = 10_000_000.0  # no tombstone may expire here
SIGS = st.sampled_from([b"", b"\x01" * SIG_BYTES, b"\x02" * SIG_BYTES])

entries = st.builds(
    Entry,
    st.just("t"),
    st.just("k"),
    st.one_of(st.none(), st.integers(0, 2).map(lambda v: wire.pack({"v": v}))),
    st.builds(Hlc, st.integers(0, 2).map(lambda w: T0_MS + w), st.integers(0, 1)),
    st.sampled_from(["a", "b"]),
    SIGS,
)


@given(entries, entries, entries)
def test_merge_with_signatures_is_commutative_associative_idempotent(
    a: Entry, b: Entry, c: Entry
) -> None:
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))
    assert merge(a, a) == a
    m = merge(a, b)
    assert m is not None and copy_order(m) == max(copy_order(a), copy_order(b))
    assert entry_order(m) == max(entry_order(a), entry_order(b))


def full(s: Store) -> list[Entry]:
    return sorted(s.entries(), key=lambda e: (e.table, e.key))


def plain_digest(s: Store) -> str:
    """The digest without its alternatives (which say what each replica refused) and without
    the empty groups only a refusal puts there."""
    return str({t: g for t, g in codec.decode_digest(s.digest()).items() if any(g[1])})


def sync(a: Store, b: Store, now: float) -> None:
    back = a.apply_entries(b.diff_for(a.digest()), now)
    assert back is not None
    assert b.apply_entries(back, now) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(entries, max_size=12), st.randoms(use_true_random=False))
def test_unjudged_replicas_converge_on_the_same_copies(es: list[Entry], rnd: random.Random) -> None:
    a, b = Store("x", StoreConfig(tombstone_ttl=TTL)), Store("y", StoreConfig(tombstone_ttl=TTL))
    for e in es:
        a.apply_delta(codec.encode_delta(e), T0)
    shuffled = es + es
    rnd.shuffle(shuffled)
    cut = rnd.randint(0, len(shuffled))
    for e in shuffled[:cut]:
        b.apply_delta(codec.encode_delta(e), T0)
    if cut < len(shuffled):
        b.apply_entries(codec.encode_entries(shuffled[cut:], None), T0)
    assert full(a) == full(b)
    best = None
    for e in es:
        best = merge(best, e)
    assert full(a) == ([] if best is None else [best])
    if es:
        assert a.digest() == b.digest()


# ---- judged replicas ---------------------------------------------------------------------------

WRITERS = ["r0", "r1", "r2"]
KEYS = ["a", "b", "c"]


def sign_as(writer: str) -> Callable[[bytes], bytes]:
    def sign(msg: bytes) -> bytes:
        return hashlib.blake2b(msg, key=writer.encode(), digest_size=SIG_BYTES).digest()
    return sign


def genuine(e: Entry) -> bool:
    return e.sig == sign_as(e.writer)(codec.signed_bytes(e))


class Judge:
    def __init__(self, me: str) -> None:
        self.known = {me}

    def __call__(self, e: Entry, data: Mapping[str, Any] | None, now: float) -> Refusal | None:
        if e.writer not in self.known:
            return Refusal("no certificate yet", final=False)
        return None if genuine(e) else Refusal("bad signature", final=True)


op = st.one_of(
    st.tuples(st.just("put"), st.integers(0, 2), st.sampled_from(KEYS), st.integers(0, 2)),
    st.tuples(st.just("del"), st.integers(0, 2), st.sampled_from(KEYS)),
    st.tuples(st.just("tick"), st.integers(0, 1500)),
    # a forged write into any replica (3 is the unjudged holder): a forged copy of something
    # held somewhere, or a forged new write, possibly newer than everything
    st.tuples(st.just("forge"), st.integers(0, 3), st.integers(0, 1 << 16), st.booleans(),
              st.integers(-500, 2000)),
    st.tuples(st.just("learn"), st.integers(0, 2), st.integers(0, 2)),
    st.tuples(st.just("gossip"), st.integers(0, 3)),
    st.tuples(st.just("deliver"), st.integers(0, 1 << 16), st.booleans()),
    st.tuples(st.just("sync"), st.integers(0, 3), st.integers(0, 3)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, min_size=10, max_size=80))
def test_judged_replicas_converge_on_the_newest_genuine_writes(ops: list[Any]) -> None:
    judges = [Judge(w) for w in WRITERS]
    stores = [Store(w, StoreConfig(signer=sign_as(w), authorizer=judges[i], tombstone_ttl=TTL))
              for i, w in enumerate(WRITERS)]
    stores.append(Store("h", StoreConfig(tombstone_ttl=TTL)))  # takes anything, spreads forgeries
    now = T0
    best: dict[tuple[str, str], Entry] = {}
    flight: list[tuple[int, bytes]] = []

    def wrote(e: Entry | None) -> None:
        if e is not None:
            got = merge(best.get((e.table, e.key)), e)
            assert got is not None
            best[(e.table, e.key)] = got

    for o in ops:
        kind = o[0]
        if kind == "put":
            wrote(stores[o[1]].put("t", o[2], {"v": o[3]}, now))
        elif kind == "del":
            wrote(stores[o[1]].delete("t", o[2], now))
        elif kind == "tick":
            now += o[1] / 1000.0
        elif kind == "forge":
            _, target, idx, copy, dt = o
            held = [e for s in stores for e in s.entries()]
            if copy and held:
                e = held[idx % len(held)]
                fake = Entry(e.table, e.key, e.value, e.hlc, e.writer, bytes([idx % 256]) * 64)
            else:
                fake = Entry("t", KEYS[idx % 3], wire.pack({"v": "forged"}),
                             Hlc(int((now + dt / 1000.0) * 1000), 0), WRITERS[idx % 3],
                             bytes(SIG_BYTES))
            stores[target].apply_delta(codec.encode_delta(fake), now)
        elif kind == "learn":
            judges[o[1]].known.add(WRITERS[o[2]])
        elif kind == "gossip":
            for msg in stores[o[1]].take_deltas(100_000):
                flight.extend((j, msg) for j in range(4) if j != o[1])
        elif kind == "deliver" and flight:
            j, msg = flight[o[1] % len(flight)]
            if not o[2]:
                flight.pop(o[1] % len(flight))
            stores[j].apply_delta(msg, now)
        elif kind == "sync" and o[1] != o[2]:
            sync(stores[o[1]], stores[o[2]], now)
        for s in stores[:3]:  # a judge never holds a write it did not make or could not check
            assert all(genuine(e) for e in s.entries())
    # every judge learns every writer; anti-entropy (with the holder in the ring too) heals
    for j in judges:
        j.known.update(WRITERS)
    for _ in range(2):
        for i in range(4):
            for k in range(4):
                if i != k:
                    sync(stores[i], stores[k], now)
    want = sorted(best.values(), key=lambda e: (e.table, e.key))
    for s in stores[:3]:
        assert full(s) == want
        assert all(genuine(e) for e in s.entries())
    assert len({plain_digest(s) for s in stores[:3]}) == 1
