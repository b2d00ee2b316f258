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

6. **Stable.** ``current`` (service -> slot -> node, from the replicated task table) says where
   slots run now. Before the matching, such a slot stays on its node if the node is in the
   input, eligible, below its cap and below ``max_per_node``; the lowest slots are kept first
   (they are the oldest; scale-down removes the highest). Kept slots take their room like global
   tasks do and never propose. A kept-over-cap slot that is then forced (rule 5) goes back to its
   node. So scale-up and a departure move nothing but the leaver's tasks (caps only grow), and
   an arrival moves only the tasks over their node's new, lower cap: the fewest possible.
7. **Spread** (Docker's strategy). Per service, with ``c_i`` its kept tasks on node ``i``, its new
   slots fill the nodes level by level: ``L`` is the least level with
   ``sum(max(0, L - c_i)) >= new`` (at most ``max_per_node``); the first
   ``sum(max(0, L - 1 - c_i))`` new slots (phase 0) may take node ``i`` up to ``L - 1``, the rest
   (phase 1) one more each, up to ``L``. In the matching these are extra per-node quotas, and a
   full node drops phase-1 proposals before phase-0 ones (its preference is (phase, rank, V, id)).
   With no full node the counts of a service differ by at most one between nodes; slots the
   quotas leave out are forced (rule 5) onto the node with room holding fewest of the service.

Convergence without a leader: every agent computes the same answer from the same (members,
services, task table). In a settled cluster the task table is that answer, and placement fed its
own answer gives it back (a property test; the one exception is a slot constraints forced over a
cap, which may move once). While views differ, two agents may both start a slot; both records
reach everyone, every agent keeps the same one (``Services.running_now``: running first, then a
hash), and the other stops.

Movement without ``current`` (a fresh placement; the agent always passes it): with caps that never
bind this is plain weighted HRW, and a departure moves exactly the leaver's tasks, an arrival
exactly the tasks that now rank the newcomer first. With binding caps, every other task that moves
does so through a full node: it was pushed out of a node that is full in the new placement, or took
a place it prefers that was full in the old one (both placements are stable matchings; the property
tests check this). Those moves come in rejection chains started by the displaced tasks, and by caps
that changed (``T * w_i / W`` shifts a little for every node when ``W`` changes, and a ``floor``
that crosses an integer frees or takes one place; with many distinct weights that is about ``c *
(leaver's share)`` places per event; with few distinct weights it is rare but lumpy: every node of
one weight crosses at the same ``W``; in the bench cluster at c = 1.4, the join of a node of weight
2 or 4 lowers every cap by one and moves ~190 tasks instead of 10 to 20).

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
from collections.abc import Mapping, Sequence
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
        self._eligible_set: frozenset[int] | None = None

    def eligible_set(self) -> frozenset[int]:
        if self._eligible_set is None:
            self._eligible_set = frozenset(self.eligible)
        return self._eligible_set

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

    def run(self, current: Placement) -> Placement:
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

        room = [caps[i] - load[i] for i in range(n)]
        # Tasks of one service per node: (node, service) -> count, kept for every service.
        per_svc: dict[tuple[int, int], int] = {}
        sticky, shed = self.keep_running(reps, current, room, per_svc)
        for i, c in enumerate(room):
            load[i] = caps[i] - c
        spread = {si: self.spread_level(si, g, spec, len(sticky.get(si, ())), per_svc)
                  for si, spec, g in reps}

        # Slot ids: services by name, slots ascending. Per id: service, slot, limit, block, offset,
        # spread phase (rule 7).
        sid_svc: list[int] = []
        sid_slot: list[int] = []
        sid_limit: list[int | None] = []
        sid_block: list[BlockLists] = []
        sid_off: list[int] = []
        sid_phase: list[int] = []
        groups: list[_Group] = []  # per block
        forced: list[int] = []
        fixed: set[int] = set()  # kept where they run (rule 6): they do not propose
        no_block = BlockLists(0, 1, 1)  # for slots forced before the matching
        no_block.lists = [[]]
        for si, spec, g in reps:
            kept = sticky.get(si, {})
            level, first_phase = spread[si]
            phases = []
            new = 0
            for slot in range(1, spec.replicas + 1):
                if slot in kept:
                    phases.append(2)
                else:
                    phases.append(0 if new < first_phase else 1)
                    new += 1
            if not any(room[i] > 0 for i in g.eligible):  # sticky or global tasks fill them
                base = len(sid_svc)
                forced.extend(base + k for k in range(spec.replicas) if k + 1 not in kept)
                fixed.update(base + k for k in range(spec.replicas) if k + 1 in kept)
                sid_svc.extend([si] * spec.replicas)
                sid_slot.extend(range(1, spec.replicas + 1))
                sid_limit.extend([spec.max_per_node] * spec.replicas)
                sid_block.extend([no_block] * spec.replicas)
                sid_off.extend([0] * spec.replicas)
                sid_phase.extend(phases)
                continue
            b = 0
            while True:
                start, size = block_slots(b)
                if start > spec.replicas:
                    break
                used = min(size, spec.replicas - start + 1)
                base = len(sid_svc)
                fixed.update(base + k for k in range(used) if start + k in kept)
                if used > sum(1 for k in range(used) if start + k in kept):
                    bl = BlockLists(seed64("block", spec.name, b), size, used)
                    bl.index = len(groups)
                    groups.append(g)
                    self.deepen(bl, g)
                else:  # every slot of the block is kept: no candidate lists needed
                    bl = no_block
                sid_svc.extend([si] * used)
                sid_slot.extend(range(start, start + used))
                sid_limit.extend([spec.max_per_node] * used)
                sid_block.extend([bl] * used)
                sid_off.extend(range(used) if bl is not no_block else [0] * used)
                b += 1
            sid_phase.extend(phases)
        sid_list = [bl.lists[off] for bl, off in zip(sid_block, sid_off, strict=True)]

        held: list[list[tuple[int, int, float, int]]] = [[] for _ in range(n)]
        per_phase: dict[tuple[int, int, int], int] = {}
        nxt = [0] * len(sid_svc)
        skip = set(forced) | fixed
        free = [sid for sid in range(len(sid_svc) - 1, -1, -1) if sid not in skip]
        pop, push = free.pop, free.append

        def drop(i: int, entry: tuple[int, int, float, int]) -> None:
            held[i].remove(entry)
            w_sid = entry[3]
            w_si = sid_svc[w_sid]
            per_phase[i, w_si, sid_phase[w_sid]] -= 1
            per_svc[i, w_si] -= 1
            push(w_sid)

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
            si, phase = sid_svc[sid], sid_phase[sid]
            level = spread[si][0]
            kept_here = per_svc.get((i, si), 0) - sum(
                per_phase.get((i, si, p), 0) for p in (0, 1))
            quota = max(0, level - 1 - kept_here) if phase == 0 else int(kept_here < level)
            if room[i] <= 0 or quota <= 0:  # full, or spread gives it no place of this phase
                push(sid)
                continue
            h = held[i]
            entry = (phase, rank, v, sid)
            h.append(entry)
            k = per_phase.get((i, si, phase), 0) + 1
            per_phase[i, si, phase] = k
            per_svc[i, si] = per_svc.get((i, si), 0) + 1
            if k > quota:
                drop(i, max(e for e in h if sid_svc[e[3]] == si and e[0] == phase))
            limit = sid_limit[sid]
            if limit is not None and per_svc[i, si] > limit:
                drop(i, max(e for e in h if sid_svc[e[3]] == si))
            if len(h) > room[i]:
                drop(i, max(h))

        for i, h in enumerate(held):
            load[i] += len(h)
            for _, _, _, sid in h:
                out[self.services[sid_svc[sid]].name][sid_slot[sid]] = self.names[i]
        for si, kept in sticky.items():
            name = self.services[si].name
            for slot, i in kept.items():
                out[name][slot] = self.names[i]

        for sid in sorted(forced):
            si = sid_svc[sid]
            limit = sid_limit[sid]
            elig = self.group(self.services[si]).eligible
            was = shed.get((si, sid_slot[sid]))
            best: tuple[bool, int, float, int] | None = None
            if was is not None and (limit is None or per_svc.get((was, si), 0) < limit):
                best = (False, 0, 0.0, was)  # a slot over a cap keeps running where it is
            else:
                for i in elig:
                    k = per_svc.get((i, si), 0)
                    if limit is not None and k >= limit:
                        continue
                    key = (load[i] >= caps[i], k, (load[i] + 1) / caps[i], i)
                    if best is None or key < best:
                        best = key
            if best is None:
                continue
            i = best[3]
            load[i] += 1
            per_svc[i, si] = per_svc.get((i, si), 0) + 1
            out[self.services[si].name][sid_slot[sid]] = self.names[i]

        for name, slots in out.items():
            out[name] = dict(sorted(slots.items()))
        return out

    def keep_running(
        self, reps: list[tuple[int, ServiceSpec, _Group]], current: Placement,
        room: list[int], per_svc: dict[tuple[int, int], int],
    ) -> tuple[dict[int, dict[int, int]], dict[tuple[int, int], int]]:
        """Rule 6: the slots that stay where they run, as service -> slot -> node; and the ones
        that lost their place there, as (service, slot) -> node. Takes their room and counts."""
        index = {name: i for i, name in enumerate(self.names)}
        wanted: list[tuple[int, str, int, int]] = []
        for si, spec, g in reps:
            cur = current.get(spec.name)
            if not cur:
                continue
            elig = g.eligible_set()
            for slot, node in cur.items():
                if type(slot) is not int or not 1 <= slot <= spec.replicas:
                    continue  # a slot above a scale-down is gone
                i = index.get(node) if isinstance(node, str) else None
                if i is not None and i in elig:
                    wanted.append((slot, spec.name, si, i))
        wanted.sort()  # lowest slots first: they are the oldest, and scale-down keeps them
        sticky: dict[int, dict[int, int]] = {}
        shed: dict[tuple[int, int], int] = {}
        for slot, _, si, i in wanted:
            limit = self.services[si].max_per_node
            k = per_svc.get((i, si), 0)
            if room[i] > 0 and (limit is None or k < limit):
                room[i] -= 1
                per_svc[i, si] = k + 1
                sticky.setdefault(si, {})[slot] = i
            else:
                shed[si, slot] = i
        return sticky, shed

    def spread_level(
        self, si: int, g: _Group, spec: ServiceSpec, kept: int,
        per_svc: dict[tuple[int, int], int],
    ) -> tuple[int, int]:
        """Rule 7: the level L, the fewest tasks of the service per node that leave room for
        its new (not kept) slots; and how many of those fill every node up to L - 1 first."""
        new = spec.replicas - kept
        if new <= 0:
            return 0, 0
        counts = [c for (i, s), c in per_svc.items() if s == si and c > 0]
        m = len(g.eligible)

        def places(level: int) -> int:  # new slots that fit under `level` on every node
            return (m - len(counts)) * level + sum(max(0, level - c) for c in counts)

        level = max(1, -(-new // m))
        while places(level) < new and (spec.max_per_node is None or level < spec.max_per_node):
            level += 1
        if spec.max_per_node is not None:
            level = min(level, spec.max_per_node)
        return level, places(level - 1)


def place(
    services: Sequence[ServiceSpec],
    nodes: Sequence[NodeInfo],
    balance: float = DEFAULT_BALANCE,
    current: Mapping[str, Mapping[int, str]] | None = None,
) -> Placement:
    """Service name -> slot -> node name, for every service (an unplaceable slot is absent).

    ``balance`` is the bounded-load factor c (>= 1). ``current`` is where slots run now (service
    -> slot -> node, from the replicated task table): such a slot stays there while its node is
    in ``nodes``, eligible and within its cap (rule 6). Pure and deterministic: the same services,
    nodes and current map, in any order, give the same answer on every machine.
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
    now: Placement = {}
    if current is not None:
        if not isinstance(current, Mapping):
            raise PlacementError(f"current must be a mapping, not {type(current).__name__}")
        for name, slots in current.items():
            if isinstance(name, str) and isinstance(slots, Mapping):
                now[name] = dict(slots)
    return _Placer(services, nodes, float(balance)).run(now)
