"""``place()``: weighted HRW preferences, bounded loads, filters; one deterministic answer.

The rules (every agent applies them to the same members and specs and gets the same map):

1. **Tasks.** A replicated service has slots ``1..replicas``. A global service has one task on
   every eligible node; its slot number is derived from the node's name alone
   (:func:`global_slot`, a number in ``[1, 2**31 - 1]``), so a node keeps its slot whatever else
   joins or leaves. Two names on the same number (1 in 2**31 per pair: about 2e-4 for 1,000
   nodes) are resolved by probing upwards in name order.
2. **Filters.** Constraints (ANDed) decide which nodes a service may use; ``max_per_node`` caps
   its tasks on one node. A slot with no eligible node is not placed (absent from the output).
3. **Capacity, across all services.** ``T`` = all tasks of all services, ``W`` = the sum of the
   weights. Node ``i`` takes at most
   ``cap_i = max(floor(c * T * w_i / W), ceil(T * w_i / W))`` tasks in total (exact rational
   arithmetic). That is never above the ``ceil(c * average)`` of bounded-load hashing, never below
   the average (so the caps always add up to at least ``T``), and keeps
   ``load_i / average_i <= c`` whenever ``average_i >= 1 / (c - 1)`` (4 tasks for c = 1.25);
   below that, integer loads cannot do better than ``ceil(average_i)``.
4. **Who gets a full node.** Each slot ranks the eligible nodes by weighted HRW
   (:mod:`meshnet.placement.hrw`). Global tasks are fixed first. Replicated slots are then
   matched by deferred acceptance (Gale-Shapley, slots proposing down their HRW order): a node
   holds at most ``cap_i`` tasks (minus its global ones) and at most ``max_per_node`` of one
   service, and when over, drops the task it likes least. A node likes a task more the higher the
   node sits in that task's own order (the slot's rank), then the smaller the task's value ``V``
   for it, then the lower (service, slot). The result is the slot-optimal stable matching, which is
   unique, so it depends on nothing but the inputs (not on the order anything is processed in).
   Ranking by rank first means a slot on its first choice is never pushed out by an overflowing
   slot; ranking by ``V`` next is the best guess, from the values alone, of which slots were
   there before a departure (a slot displaced from a leaving node has a larger ``V`` for its new
   first choice than that node's own slots, on average twice as large).
5. **Forced.** A slot that every eligible node refuses for capacity (possible only with
   constraints, global tasks or ``max_per_node`` narrowing where it may go), or its first
   ``MAX_WALK`` (32) nodes in a row, still runs: on the eligible node, within ``max_per_node``,
   with the least ``(load + 1) / cap_i`` (so on a node with room if there is one), then by name,
   in (service, slot) order after the matching. Only these can exceed ``cap_i``.

Movement ("a task moves only when it must"): with caps that never bind this is plain weighted
HRW, and a departure moves exactly the leaver's tasks, an arrival exactly the tasks that now rank
the newcomer first. With binding caps, every other task that moves does so through a full node:
it was pushed out of a node that is full in the new placement, or took a place it prefers that
was full in the old one (both placements are stable matchings; the property tests check this).
Those moves come in rejection chains started by the displaced tasks, and by caps that changed
(``T * w_i / W`` shifts a little for every node when ``W`` changes, and a ``floor`` that crosses
an integer frees or takes one place; with many distinct weights that is about
``c * (leaver's share)`` places per event; with few distinct weights it is rare but lumpy: every
node of one weight crosses at the same ``W``; in the bench cluster at c = 1.4, the join of a node
of weight 2 or 4 lowers every cap by one and moves ~190 tasks instead of 10 to 20).

Measured with c = 1.25, 1,000 nodes of weights 1/2/4 and 10,000 tasks (``bench/placement.py``):
about 0.3 extra moves per displaced task on leave and on join (leave 1.31-1.32, join 1.26-1.28
times the minimum, over 20 and 60 events). That is the price of c = 1.25 with integer caps: the
caps 5/10/21 are the largest that keep ``load / average <= 1.25`` (a weight-1 node averages 4.29),
first choices are Poisson, so 22% of the nodes get more first choices than they can hold
(``P(Poisson(4.29) > 5) = 0.26``). When a task leaves such a node (its first choice is now a new
node), the node's best rejected proposer takes the freed place; that holds for *any* rule in
which a node keeps the best ``cap_i`` of its first-choice proposers, not only for stable
matchings, and alone costs 0.18 extra moves per task on join; the rest is chains continuing
through overflow places. With more slack it falls fast: c = 1.3 (caps 5/11/22, but
``max_over_avg`` 1.28) gives 1.18/1.20, c = 1.5 about 1.07. Alternatives measured equal or worse
on the same events: node preference by ``V`` alone (1.29/1.34), by ``V`` scaled by rank, by the
task's best value first (1.38/1.37), by regret ``V - V_best`` (1.32/1.28), rank then best value
(1.30/1.28), first-choice-or-not then ``V``; greedy bounded loads in one fixed task order (as in
the paper; slot-hash order 1.44/1.37, best-value order 1.38/1.37); overflow ranked with weights
``w**1.5`` or ``w**2`` to favour the nodes with more integer headroom (1.31/1.26, 1.33/1.33);
caps dithered per node so they cross integers one node at a time (1.51/1.84: lower caps, and a
change on every event); headroom kept for first choices; two phases (first choices, then
overflow). Which task a full node drops only matters for the first step of a chain (and ``V`` is
already the likelihood-ratio test there: a displaced task's new best value is the second point of
the same Poisson process, Gamma(2) against Exp); how often a chain starts or continues is set by
how many nodes are over-demanded, which only more slack changes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

from meshnet.placement.hrw import (
    GOLDEN,
    INV24,
    INV32,
    M32,
    M64,
    MASK24,
    MULT,
    TWO32,
    BlockLists,
    Cand,
    Lanes,
    block_slots,
    lane_seed,
    race,
    seed64,
)
from meshnet.placement.spec import GLOBAL, NodeInfo, PlacementError, ServiceSpec

DEFAULT_BALANCE = 1.25
#: Global slot numbers live in [1, GLOBAL_SLOTS]: positive 32-bit ints, short enough for task names.
GLOBAL_SLOTS = (1 << 31) - 1
#: Expected candidates per slot at the first level, by block size: enough that few blocks ever
#: need a second pass (every slot of the block needs its first choice in the list).
_K = {1: 2.5, 2: 3.0, 4: 3.5, 8: 4.0}
#: A slot refused by this many nodes in a row is forced (rule 5) instead of walking on: bounds the
#: work at O(slots * MAX_WALK) when constraints leave far too little room. On 1,000 nodes and
#: 10,000 tasks no walk reaches 12 at c = 1.25, nor 24 at c = 1.0; with at most 32 eligible
#: nodes it never matters.
MAX_WALK = 32
#: Past this, tau is infinite: every eligible node is a candidate.
_MAX_LEVEL = 16

Placement = dict[str, dict[int, str]]


def global_slot(node_name: str) -> int:
    """The slot number a global service's task on this node gets (before collision probing)."""
    return 1 + seed64("global-slot", node_name) % GLOBAL_SLOTS


def capacities(total: int, weights: Sequence[float], balance: float) -> list[int]:
    """``cap_i = max(floor(c*T*w_i/W), ceil(T*w_i/W))``, exactly (see the module docstring)."""
    c = Fraction(balance)
    exact = [Fraction(w) for w in weights]
    wsum = sum(exact, Fraction(0))
    memo: dict[Fraction, int] = {}
    out = []
    for w in exact:
        cap = memo.get(w)
        if cap is None:
            avg = total * w / wsum
            cap = memo[w] = max(math.floor(c * avg), math.ceil(avg))
        out.append(cap)
    return out


class _Group:
    """The nodes one set of constraints allows, and the thresholds their block tests use."""

    def __init__(self, eligible: list[int], weights: list[float], n: int, lanes: Lanes) -> None:
        self.eligible = eligible
        self.wsum = math.fsum(weights[i] for i in eligible)
        self.wmin = min((weights[i] for i in eligible), default=1.0)
        self.weights = weights
        self.n = n
        self.lanes = lanes
        self._packed: dict[tuple[int, int], int] = {}

    def tau(self, size: int, level: int) -> float:
        if level > _MAX_LEVEL:
            return math.inf
        return _K[size] / self.wsum * 2.0**level

    def packed(self, size: int, level: int) -> int:
        key = (size, level)
        p = self._packed.get(key)
        if p is None:
            tau = self.tau(size, level)
            thr = [0] * self.n
            memo: dict[float, int] = {}
            for i in self.eligible:
                w = self.weights[i]
                t = memo.get(w)
                if t is None:
                    # Superset of "first arrival < tau * w": race() makes the exact cut.
                    prob = -math.expm1(-size * tau * w)
                    t = memo[w] = min(TWO32, int(prob * TWO32) + 2)
                thr[i] = t
            p = self._packed[key] = self.lanes.threshold(thr)
        return p


class _Placer:
    def __init__(self, services: Sequence[ServiceSpec], nodes: Sequence[NodeInfo], c: float):
        self.nodes = sorted(nodes, key=lambda n: n.name)
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise PlacementError("duplicate node name in placement input")
        self.services = sorted(services, key=lambda s: s.name)
        snames = [s.name for s in self.services]
        if len(set(snames)) != len(snames):
            raise PlacementError("duplicate service name in placement input")
        self.names = names
        self.weights = [float(n.weight) for n in self.nodes]
        self.seeds = [seed64("node", n) for n in names]
        self.lane_seeds = [lane_seed(s) for s in self.seeds]
        self.lanes = Lanes(self.seeds)
        self.groups: dict[tuple[object, ...], _Group] = {}
        self.c = c

    def group(self, spec: ServiceSpec) -> _Group:
        key = tuple(sorted(set(spec.constraints), key=str))
        g = self.groups.get(key)
        if g is None:
            elig = [i for i, n in enumerate(self.nodes) if spec.eligible(n)]
            g = self.groups[key] = _Group(elig, self.weights, len(self.nodes), self.lanes)
        return g

    def deepen(self, bl: BlockLists, g: _Group, want: int = 0) -> bool:
        """Next level of ``bl``, one where a slot expects ``2 * want`` candidates if that is
        further (levels are not free: each walks every passing node again); False once the last
        (complete) level was already there."""
        if bl.level > _MAX_LEVEL:
            return False
        bl.level = max(bl.level + 1, math.ceil(math.log2(max(1.0, 2 * want / _K[bl.size]))))
        tau = g.tau(bl.size, bl.level)
        lists: list[list[Cand]] = [[] for _ in range(bl.used)]
        seeds, weights = self.seeds, self.weights
        size, bseed, used = bl.size, bl.block_seed, bl.used
        if tau == math.inf:
            passing = g.eligible
        else:
            passing = self.lanes.below(bseed, g.packed(size, bl.level))
        log1p = math.log1p
        lseeds = self.lane_seeds
        lseed_b = bseed & M32
        for i in passing:
            # Inline fast path of race(): most passing nodes have exactly one value below tau.
            w = weights[i]
            lim = tau * w
            t = -log1p(-((lseeds[i] * lseed_b) & M32) * INV32) / size
            if t >= lim:
                continue
            if size == 1:
                lists[0].append((t / w, i))
                continue
            nseed = seeds[i]
            h = ((nseed ^ bseed ^ GOLDEN) * MULT) & M64
            h ^= h >> 29
            if t - log1p(-(((h >> 20) & MASK24) + 0.5) * INV24) / (size - 1) < lim:
                race(nseed, bseed, size, w, tau, used, lists, i)
                continue
            off = ((h >> 44) * size) >> 20
            if off < used:
                lists[off].append((t / w, i))
        for lst in lists:
            lst.sort()
        bl.lists = lists
        return True

    def run(self) -> Placement:
        n = len(self.nodes)
        out: Placement = {s.name: {} for s in self.services}
        if n == 0:
            return out
        load = [0] * n
        glob: list[tuple[ServiceSpec, _Group]] = []
        reps: list[tuple[int, ServiceSpec, _Group]] = []
        total = 0
        for si, spec in enumerate(self.services):
            g = self.group(spec)
            if spec.mode == GLOBAL:
                glob.append((spec, g))
                total += len(g.eligible)
            elif spec.replicas and g.eligible:
                reps.append((si, spec, g))
                total += spec.replicas
        caps = capacities(total, self.weights, self.c)

        for spec, g in glob:
            taken: dict[int, str] = {}
            for i in g.eligible:
                slot = global_slot(self.names[i])
                while slot in taken:
                    slot = slot % GLOBAL_SLOTS + 1
                taken[slot] = self.names[i]
                load[i] += 1
            out[spec.name] = dict(sorted(taken.items()))

        # Slot ids: services by name, slots ascending. Per id: service, slot, limit, block, offset.
        sid_svc: list[int] = []
        sid_slot: list[int] = []
        sid_limit: list[int | None] = []
        sid_block: list[BlockLists] = []
        sid_off: list[int] = []
        groups: list[_Group] = []  # per block
        room = [caps[i] - load[i] for i in range(n)]
        forced: list[int] = []
        no_block = BlockLists(0, 1, 1)  # for slots forced before the matching
        no_block.lists = [[]]
        for si, spec, g in reps:
            if not any(room[i] > 0 for i in g.eligible):  # global tasks fill every one
                forced.extend(range(len(sid_svc), len(sid_svc) + spec.replicas))
                sid_svc.extend([si] * spec.replicas)
                sid_slot.extend(range(1, spec.replicas + 1))
                sid_limit.extend([spec.max_per_node] * spec.replicas)
                sid_block.extend([no_block] * spec.replicas)
                sid_off.extend([0] * spec.replicas)
                continue
            b = 0
            while True:
                start, size = block_slots(b)
                if start > spec.replicas:
                    break
                used = min(size, spec.replicas - start + 1)
                bl = BlockLists(seed64("block", spec.name, b), size, used)
                bl.index = len(groups)
                groups.append(g)
                self.deepen(bl, g)
                sid_svc.extend([si] * used)
                sid_slot.extend(range(start, start + used))
                sid_limit.extend([spec.max_per_node] * used)
                sid_block.extend([bl] * used)
                sid_off.extend(range(used))
                b += 1
        sid_list = [bl.lists[off] for bl, off in zip(sid_block, sid_off, strict=True)]

        held: list[list[tuple[int, float, int]]] = [[] for _ in range(n)]
        per_svc: dict[tuple[int, int], int] = {}
        nxt = [0] * len(sid_svc)
        skip = set(forced)
        free = [sid for sid in range(len(sid_svc) - 1, -1, -1) if sid not in skip]
        pop, push = free.pop, free.append
        while free:
            sid = pop()
            rank = nxt[sid]
            lst = sid_list[sid]
            if rank >= len(lst) or rank == MAX_WALK:
                if rank == MAX_WALK:
                    forced.append(sid)
                    continue
                bl = sid_block[sid]
                while rank >= len(bl.lists[sid_off[sid]]) and self.deepen(
                    bl, groups[bl.index], rank + 1
                ):
                    pass
                lst = sid_list[sid] = bl.lists[sid_off[sid]]
                # the block's other slots pick up their (longer) lists lazily, same prefix
                if rank >= len(lst):
                    forced.append(sid)
                    continue
            v, i = lst[rank]
            nxt[sid] = rank + 1
            if room[i] <= 0:  # full of global tasks: refuses everyone
                push(sid)
                continue
            h = held[i]
            h.append((rank, v, sid))
            limit = sid_limit[sid]
            if limit is not None:
                si = sid_svc[sid]
                k = per_svc.get((i, si), 0) + 1
                per_svc[i, si] = k
                if k > limit:
                    worst = max(e for e in h if sid_svc[e[2]] == si)
                    h.remove(worst)
                    per_svc[i, si] = k - 1
                    push(worst[2])
            if len(h) > room[i]:
                worst = max(h)
                h.remove(worst)
                w_sid = worst[2]
                if sid_limit[w_sid] is not None:
                    per_svc[i, sid_svc[w_sid]] -= 1
                push(w_sid)

        for i, h in enumerate(held):
            load[i] += len(h)
            for _, _, sid in h:
                out[self.services[sid_svc[sid]].name][sid_slot[sid]] = self.names[i]

        for sid in sorted(forced):
            si = sid_svc[sid]
            limit = sid_limit[sid]
            best: tuple[float, int] | None = None
            for i in self.group(self.services[si]).eligible:
                if limit is not None and per_svc.get((i, si), 0) >= limit:
                    continue
                key = ((load[i] + 1) / caps[i], i)
                if best is None or key < best:
                    best = key
            if best is None:
                continue
            i = best[1]
            load[i] += 1
            if limit is not None:
                per_svc[i, si] = per_svc.get((i, si), 0) + 1
            out[self.services[si].name][sid_slot[sid]] = self.names[i]

        for name, slots in out.items():
            out[name] = dict(sorted(slots.items()))
        return out


def place(
    services: Sequence[ServiceSpec], nodes: Sequence[NodeInfo], balance: float = DEFAULT_BALANCE
) -> Placement:
    """Service name -> slot -> node name, for every service (an unplaceable slot is absent).

    ``balance`` is the bounded-load factor c (>= 1). Pure and deterministic: the same services and
    nodes, in any order, give the same answer on every machine.
    """
    if isinstance(balance, bool) or not isinstance(balance, int | float):
        raise PlacementError(f"balance must be a number >= 1, not {balance!r}")
    if not math.isfinite(balance) or balance < 1:
        raise PlacementError(f"balance must be a finite number >= 1, not {balance!r}")
    for s in services:
        if not isinstance(s, ServiceSpec):
            raise PlacementError(f"services must be ServiceSpec objects, not {type(s).__name__}")
    for nd in nodes:
        if not isinstance(nd, NodeInfo):
            raise PlacementError(f"nodes must be NodeInfo objects, not {type(nd).__name__}")
    return _Placer(services, nodes, float(balance)).run()
