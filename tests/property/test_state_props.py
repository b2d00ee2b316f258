"""Hypothesis properties of the replicated store: convergence under any delivery schedule."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet import wire
from meshnet.state import Entry, Hlc, Store, StoreConfig, codec, entry_order, merge

T0 = 1_700_000_000.0
NAMES = ["r0", "r1", "r2", "r3"]
TABLES = ["networks", "endpoints", "extra"]
KEYS = ["a", "b", "c", "d"]
# No tombstone may expire during the convergence properties: GC has its own property below.
NO_GC = StoreConfig(tombstone_ttl=10_000_000.0)

Canon = list[tuple[str, str, bytes | None, int, str]]


def canon(s: Store) -> Canon:
    return sorted((e.table, e.key, e.value, e.hlc.pack(), e.writer) for e in s.entries())


def canon_of(entries: dict[tuple[str, str], Entry]) -> Canon:
    return sorted((e.table, e.key, e.value, e.hlc.pack(), e.writer) for e in entries.values())


def sync(a: Store, b: Store, now: float) -> None:
    """digest -> diff -> diff, started by ``a``, and step 4 if ``b`` has one: its horizon
    tombstones for old writes ``a`` shipped (hypothesis found the case: a write older than a
    tombstone ``b`` had collected), which ends the exchange."""
    back = a.apply_entries(b.diff_for(a.digest()), now)
    assert back is not None
    last = b.apply_entries(back, now)
    if last is not None:
        assert a.apply_entries(last, now) is None


replica = st.integers(0, 3)
op = st.one_of(
    st.tuples(
        st.just("put"), replica, st.sampled_from(TABLES), st.sampled_from(KEYS), st.integers(0, 3)
    ),
    st.tuples(st.just("del"), replica, st.sampled_from(TABLES), st.sampled_from(KEYS)),
    st.tuples(st.just("tick"), st.integers(0, 1500)),
    st.tuples(st.just("gossip"), replica, st.integers(60, 1400)),
    st.tuples(st.just("deliver"), st.integers(0, 1 << 16), st.booleans()),
    st.tuples(st.just("sync"), replica, replica),
)


@dataclass
class World:
    """N replicas, a shared clock with per-replica skew, and messages in flight."""

    n: int
    skew: list[float]
    now: float = T0
    stores: list[Store] = field(default_factory=list)
    flight: list[tuple[int, bytes]] = field(default_factory=list)
    best: dict[tuple[str, str], Entry] = field(default_factory=dict)  # LWW reference model

    def __post_init__(self) -> None:
        self.stores = [Store(NAMES[i], NO_GC) for i in range(self.n)]

    def t(self, i: int) -> float:
        return self.now + self.skew[i]

    def wrote(self, e: Entry | None) -> None:
        if e is not None:
            k = (e.table, e.key)
            got = merge(self.best.get(k), e)
            assert got is not None
            self.best[k] = got

    def gossip(self, i: int, limit: int) -> None:
        for msg in self.stores[i].take_deltas(limit, overhead=2):
            assert len(msg) + 2 <= limit
            self.flight.extend((j, msg) for j in range(self.n) if j != i)

    def deliver(self, idx: int, keep: bool) -> None:
        if self.flight:
            j, msg = self.flight[idx % len(self.flight)]
            if not keep:
                self.flight.pop(idx % len(self.flight))
            self.stores[j].apply_delta(msg, self.t(j))

    def step(self, o: tuple[object, ...], allow_sync: bool) -> None:
        kind = o[0]
        if kind == "put":
            _, i, table, key, v = o
            assert isinstance(i, int) and isinstance(table, str) and isinstance(key, str)
            i %= self.n
            self.wrote(self.stores[i].put(table, key, {"v": v, "node": NAMES[i]}, self.t(i)))
        elif kind == "del":
            _, i, table, key = o
            assert isinstance(i, int) and isinstance(table, str) and isinstance(key, str)
            i %= self.n
            self.wrote(self.stores[i].delete(table, key, self.t(i)))
        elif kind == "tick":
            assert isinstance(o[1], int)
            self.now += o[1] / 1000.0
        elif kind == "gossip":
            assert isinstance(o[1], int) and isinstance(o[2], int)
            self.gossip(o[1] % self.n, o[2])
        elif kind == "deliver":
            assert isinstance(o[1], int) and isinstance(o[2], bool)
            self.deliver(o[1], o[2])
        elif kind == "sync" and allow_sync:
            assert isinstance(o[1], int) and isinstance(o[2], int)
            a, b = self.stores[o[1] % self.n], self.stores[o[2] % self.n]
            if a is not b:
                sync(a, b, self.now)
                # one digest -> diff -> diff round converges the two replicas
                assert canon(a) == canon(b) and a.digest() == b.digest()

    def heal_by_gossip(self) -> None:
        while self.flight:
            self.deliver(0, False)
        while any(s.pending_deltas() for s in self.stores):
            for i in range(self.n):
                self.gossip(i, 100_000)
            while self.flight:
                self.deliver(0, False)

    def heal_by_anti_entropy(self) -> None:
        for i in range(self.n - 1):
            sync(self.stores[i], self.stores[i + 1], self.now)
        for i in range(self.n - 1, 0, -1):
            sync(self.stores[i], self.stores[i - 1], self.now)

    def assert_converged(self) -> None:
        want = canon_of(self.best)
        for s in self.stores:
            assert canon(s) == want
        assert len({s.digest() for s in self.stores}) == 1


world_args = (
    st.integers(3, 4),
    st.lists(st.floats(-2.0, 2.0), min_size=4, max_size=4),
    st.lists(op, max_size=60),
)


@settings(max_examples=150, deadline=None)
@given(*world_args)
def test_gossip_only_any_order_and_duplication_converges(
    n: int, skew: list[float], ops: list[tuple[object, ...]]
) -> None:
    w = World(n, skew)
    for o in ops:
        w.step(o, allow_sync=False)
    w.heal_by_gossip()
    w.assert_converged()


@settings(max_examples=150, deadline=None)
@given(*world_args)
def test_partition_then_anti_entropy_converges(
    n: int, skew: list[float], ops: list[tuple[object, ...]]
) -> None:
    w = World(n, skew)
    for o in ops:
        w.step(o, allow_sync=True)
    w.heal_by_anti_entropy()
    w.assert_converged()


@settings(max_examples=100, deadline=None)
@given(*world_args, st.randoms(use_true_random=False))
def test_same_writes_any_permutation_with_duplicates_converge(
    n: int, skew: list[float], ops: list[tuple[object, ...]], rnd: object
) -> None:
    import random

    assert isinstance(rnd, random.Random)
    w = World(n, skew)
    for o in ops:
        w.step(o, allow_sync=True)
    msgs = [codec.encode_delta(e) for s in w.stores for e in s.entries()]
    fresh = [Store(f"f{i}", NO_GC) for i in range(3)]
    for f in fresh:
        schedule = msgs + rnd.choices(msgs, k=len(msgs) // 2) if msgs else []
        rnd.shuffle(schedule)
        # half by gossip, half in anti-entropy batches of random sizes
        cut = rnd.randint(0, len(schedule))
        for m in schedule[:cut]:
            f.apply_delta(m, w.now)
        rest = [codec.decode_delta(m).entry for m in schedule[cut:]]
        while rest:
            k = rnd.randint(1, len(rest))
            assert f.apply_entries(codec.encode_entries(rest[:k], None), w.now) is None
            rest = rest[k:]
    w.heal_by_anti_entropy()
    want = canon(w.stores[0])
    assert all(canon(f) == want for f in fresh)


# ---- merge algebra -----------------------------------------------------------------------------

entries = st.builds(
    Entry,
    st.just("t"),
    st.just("k"),
    st.one_of(st.none(), st.integers(0, 3).map(lambda v: wire.pack({"v": v}))),
    st.builds(Hlc, st.integers(0, 3), st.integers(0, 2)),
    st.sampled_from(["a", "b", "c"]),
)


@given(entries, entries, entries)
def test_merge_commutative_associative_idempotent(a: Entry, b: Entry, c: Entry) -> None:
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))
    assert merge(a, a) == a
    m = merge(a, b)
    assert m is not None and entry_order(m) >= entry_order(a) and entry_order(m) >= entry_order(b)


@given(st.lists(entries, max_size=12), st.randoms(use_true_random=False))
def test_store_merge_is_order_insensitive_and_idempotent(es: list[Entry], rnd: object) -> None:
    import random

    assert isinstance(rnd, random.Random)
    a, b = Store("x", NO_GC), Store("y", NO_GC)
    for e in es:
        a.apply_delta(codec.encode_delta(e), T0)
    shuffled = es + es
    rnd.shuffle(shuffled)
    for e in shuffled:
        b.apply_delta(codec.encode_delta(e), T0)
    assert canon(a) == canon(b)
    before = canon(a)
    for e in es:
        assert not a.apply_delta(codec.encode_delta(e), T0)
    assert canon(a) == before


# ---- tombstones --------------------------------------------------------------------------------


@given(
    st.lists(st.one_of(st.integers(0, 5), st.none()), min_size=1, max_size=20),
    st.lists(st.floats(-5.0, 5.0), min_size=20, max_size=20),
    st.randoms(use_true_random=False),
)
def test_a_tombstone_never_lets_an_older_write_back(
    history: list[int | None], jitter: list[float], rnd: object
) -> None:
    """One key written and deleted in turn (clock jumping about); the other replica receives the
    writes in any order with duplicates and at every point shows the newest it has received."""
    import random

    assert isinstance(rnd, random.Random)
    a, b = Store("a", NO_GC), Store("b", NO_GC)
    log = []
    for i, v in enumerate(history):
        now = T0 + i + jitter[i]
        e = a.put("t", "k", {"v": v}, now) if v is not None else a.delete("t", "k", now)
        if e is not None:
            log.append(e)
    received: list[Entry] = []
    schedule = log + rnd.choices(log, k=len(log)) if log else []
    rnd.shuffle(schedule)
    for e in schedule:
        b.apply_delta(codec.encode_delta(e), T0 + 100)
        received.append(e)
        newest = max(received, key=entry_order)
        assert b.entry("t", "k") == newest
        want = None if newest.value is None else newest.data()
        assert b.get("t", "k") == want
    if log:
        assert b.entry("t", "k") == a.entry("t", "k") == log[-1]


gc_op = st.one_of(
    st.tuples(st.just("put"), st.integers(0, 1), st.sampled_from(KEYS), st.integers(0, 3)),
    st.tuples(st.just("del"), st.integers(0, 1), st.sampled_from(KEYS)),
    st.tuples(st.just("tick"), st.integers(0, 8000)),
    st.tuples(st.just("gc"), st.integers(0, 1)),
    st.tuples(st.just("sync"), st.integers(0, 1)),
    st.tuples(st.just("replay"), st.integers(0, 1), st.integers(0, 1 << 16)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(gc_op, max_size=50))
def test_collected_tombstones_resurrect_nothing(ops: list[tuple[object, ...]]) -> None:
    """Two replicas with a 10 s tombstone ttl, partitioned for random spans, collecting garbage,
    syncing, and being replayed arbitrary old writes: once a replica has collected the tombstone
    of a key, no write of that key at or before the tombstone ever shows there again, and after
    a final collection and one exchange each way the replicas agree."""
    cfg = StoreConfig(tombstone_ttl=10.0)
    stores = [Store("a", cfg), Store("b", cfg)]
    now = T0
    history: list[Entry] = []
    collected: list[dict[tuple[str, str], int]] = [{}, {}]

    def check(i: int, before: dict[tuple[str, str], Entry]) -> None:
        s = stores[i]
        for k in s.take_dirty().removed:
            old = before.get(k)
            if old is not None and old.value is None:
                collected[i][k] = max(collected[i].get(k, 0), old.hlc.pack())
        for e in s.entries():
            floor = collected[i].get((e.table, e.key))
            assert floor is None or e.hlc.pack() > floor, "a collected tombstone resurrected"

    for o in ops:
        snaps = [{(e.table, e.key): e for e in s.entries()} for s in stores]
        kind = o[0]
        if kind == "put":
            i, key, v = o[1], o[2], o[3]
            assert isinstance(i, int) and isinstance(key, str)
            history.append(stores[i].put("t", key, {"v": v}, now))
        elif kind == "del":
            i, key = o[1], o[2]
            assert isinstance(i, int) and isinstance(key, str)
            e = stores[i].delete("t", key, now)
            if e is not None:
                history.append(e)
        elif kind == "tick":
            assert isinstance(o[1], int)
            now += o[1] / 1000.0
        elif kind == "gc":
            assert isinstance(o[1], int)
            stores[o[1]].handle_timer(now)
        elif kind == "sync":
            assert isinstance(o[1], int)
            sync(stores[o[1]], stores[1 - o[1]], now)
        elif kind == "replay" and history:
            i, idx = o[1], o[2]
            assert isinstance(i, int) and isinstance(idx, int)
            stores[i].apply_delta(codec.encode_delta(history[idx % len(history)]), now)
        for i in (0, 1):
            check(i, snaps[i])
    for s in stores:
        s.handle_timer(now)
    snaps = [{(e.table, e.key): e for e in s.entries()} for s in stores]
    sync(stores[0], stores[1], now)
    sync(stores[1], stores[0], now)
    for i in (0, 1):
        check(i, snaps[i])
    assert canon(stores[0]) == canon(stores[1])
