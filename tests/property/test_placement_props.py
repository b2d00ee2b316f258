"""Hypothesis properties of placement: determinism, the load bound, the filters, global mode, and
movement on leave and join."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet.placement import (
    NodeInfo,
    ServiceSpec,
    block_of,
    capacities,
    global_slot,
    parse_constraint,
    place,
    seed64,
)
from meshnet.placement.hrw import value

Placement = dict[str, dict[int, str]]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CONSTRAINTS = ["node.labels.zone==a", "node.labels.zone!=b", "node.labels.ssd==y", "node.name!=n1"]


@st.composite
def nodes_st(draw: st.DrawFn, min_size: int = 1, max_size: int = 14) -> list[NodeInfo]:
    idx = draw(st.lists(st.integers(0, 40), min_size=min_size, max_size=max_size, unique=True))
    return [
        NodeInfo(
            f"n{i}",
            {"zone": draw(st.sampled_from("abc")), **({"ssd": "y"} if draw(st.booleans()) else {})},
            draw(st.sampled_from([0.5, 1.0, 2.0, 4.0])),
        )
        for i in idx
    ]


@st.composite
def services_st(draw: st.DrawFn, plain: bool = False) -> list[ServiceSpec]:
    names = draw(st.lists(st.sampled_from("abcdefg"), min_size=1, max_size=4, unique=True))
    out = []
    for name in names:
        if plain:
            out.append(ServiceSpec(name, draw(st.integers(0, 30))))
            continue
        cons = tuple(parse_constraint(c) for c in draw(st.lists(st.sampled_from(CONSTRAINTS),
                                                                 max_size=2, unique=True)))
        mode = draw(st.sampled_from(["replicated", "replicated", "replicated", "global"]))
        mpn = draw(st.sampled_from([None, None, 1, 2, 3]))
        out.append(ServiceSpec(name, draw(st.integers(0, 30)), mode, cons, mpn))
    return out


balances = st.sampled_from([1.0, 1.1, 1.25, 1.5, 3.0])


def loads(p: Placement) -> Counter[str]:
    return Counter(n for slots in p.values() for n in slots.values())


def total_tasks(services: list[ServiceSpec], nodes: list[NodeInfo]) -> int:
    t = 0
    for s in services:
        elig = [n for n in nodes if s.eligible(n)]
        t += len(elig) if s.mode == "global" else (s.replicas if elig else 0)
    return t


def caps_of(services: list[ServiceSpec], nodes: list[NodeInfo], c: float) -> dict[str, int]:
    caps = capacities(total_tasks(services, nodes), [n.weight for n in nodes], c)
    return {n.name: cap for n, cap in zip(nodes, caps, strict=True)}


@SETTINGS
@given(services_st(), nodes_st(min_size=0), balances, st.randoms(use_true_random=False))
def test_deterministic_in_any_input_order(
    services: list[ServiceSpec], nodes: list[NodeInfo], c: float, rnd: random.Random
) -> None:
    a = place(services, nodes, c)
    s2, n2 = list(services), list(nodes)
    rnd.shuffle(s2)
    rnd.shuffle(n2)
    assert place(s2, n2, c) == a
    assert list(a) == [s.name for s in services] or set(a) == {s.name for s in services}


@SETTINGS
@given(services_st(), nodes_st(), balances)
def test_filters_global_mode_and_completeness(
    services: list[ServiceSpec], nodes: list[NodeInfo], c: float
) -> None:
    placed = place(services, nodes, c)
    by_name = {n.name: n for n in nodes}
    for s in services:
        got = placed[s.name]
        elig = {n.name for n in nodes if s.eligible(n)}
        assert all(s.eligible(by_name[n]) for n in got.values())  # constraints always honoured
        per_node = Counter(got.values())
        if s.mode == "global":
            assert set(got.values()) == elig and len(got) == len(elig)  # one per eligible node
            assert all(1 <= slot <= 2**31 - 1 for slot in got)
            if len({global_slot(n) for n in elig}) == len(elig):
                assert got == {global_slot(n): n for n in elig}
        else:
            assert set(got) <= set(range(1, s.replicas + 1))
            if s.max_per_node is not None:
                assert max(per_node.values(), default=0) <= s.max_per_node
                want = min(s.replicas, s.max_per_node * len(elig))
            else:
                want = s.replicas if elig else 0
            assert len(got) == want  # a slot is left out only when no eligible node may take it


@SETTINGS
@given(services_st(plain=True), nodes_st(), balances)
def test_load_bound(services: list[ServiceSpec], nodes: list[NodeInfo], c: float) -> None:
    """Without constraints, global tasks or per-node limits nothing is ever forced: every node
    stays within cap_i = max(floor(c*T*w_i/W), ceil(T*w_i/W)) <= ceil(c * average_i)."""
    placed = place(services, nodes, c)
    caps = caps_of(services, nodes, c)
    load = loads(placed)
    total = sum(s.replicas for s in services)
    wsum = sum(n.weight for n in nodes)
    for n in nodes:
        avg = total * n.weight / wsum
        assert load[n.name] <= caps[n.name]
        assert caps[n.name] <= max(1, -(-c * avg // 1)) or caps[n.name] == -(-avg // 1)
    assert sum(load.values()) == total


def prefers(service: str, slot: int, a: NodeInfo, b: NodeInfo) -> bool:
    """Does the slot rank node a above node b (weighted HRW, ties by name)?"""
    blk, off, size = block_of(slot)
    bseed = seed64("block", service, blk)
    va = value(seed64("node", a.name), bseed, size, a.weight, off)
    vb = value(seed64("node", b.name), bseed, size, b.weight, off)
    return (va, a.name) < (vb, b.name)


def check_moves_only_through_full_nodes(
    services: list[ServiceSpec], old_nodes: list[NodeInfo], new_nodes: list[NodeInfo], c: float
) -> None:
    """A task that moves although its node is still there either lost its place on a node that is
    full (for it) in the new placement, or took a place it prefers that was full in the old one
    (stability of both matchings). Holds whenever nothing had to be forced over capacity."""
    old, new = place(services, old_nodes, c), place(services, new_nodes, c)
    old_caps, new_caps = caps_of(services, old_nodes, c), caps_of(services, new_nodes, c)
    old_load, new_load = loads(old), loads(new)
    if any(old_load[n] > old_caps[n] for n in old_caps) or any(
        new_load[n] > new_caps[n] for n in new_caps
    ):
        return  # something was forced (constraints/limits too tight): stability does not apply
    spec = {s.name: s for s in services}
    both = {n.name: n for n in old_nodes} | {n.name: n for n in new_nodes}

    def full_for(
        p: Placement, caps: dict[str, int], load: Counter[str], svc: str, node: str
    ) -> bool:
        limit = spec[svc].max_per_node
        mine = sum(1 for x in p[svc].values() if x == node)
        return load[node] >= caps[node] or (limit is not None and mine >= limit)

    for svc, slots in old.items():
        if spec[svc].mode == "global":
            continue
        for slot, y in slots.items():
            z = new[svc].get(slot)
            if z is None or z == y or y not in new_caps or z not in old_caps:
                continue  # unplaced, stayed, or moved because its node left / to the new node
            if prefers(svc, slot, both[z], both[y]):
                assert full_for(old, old_caps, old_load, svc, z)
            else:
                assert full_for(new, new_caps, new_load, svc, y)


@SETTINGS
@given(services_st(), nodes_st(min_size=2), balances, st.data())
def test_leave_and_join_move_tasks_only_through_full_nodes(
    services: list[ServiceSpec], nodes: list[NodeInfo], c: float, data: st.DataObject
) -> None:
    x = data.draw(st.sampled_from(nodes))
    rest = [n for n in nodes if n is not x]
    check_moves_only_through_full_nodes(services, nodes, rest, c)  # x leaves
    check_moves_only_through_full_nodes(services, rest, nodes, c)  # x joins


@SETTINGS
@given(services_st(plain=True), nodes_st(min_size=2), st.data())
def test_without_binding_caps_movement_is_exactly_minimal(
    services: list[ServiceSpec], nodes: list[NodeInfo], data: st.DataObject
) -> None:
    """Caps that cannot bind (huge c) leave plain weighted HRW: a departure moves only the
    leaver's tasks, an arrival only the tasks that now rank the new node first."""
    x = data.draw(st.sampled_from(nodes))
    rest = [n for n in nodes if n is not x]
    c = 1e6
    full, less = place(services, nodes, c), place(services, rest, c)
    for svc, slots in full.items():
        for slot, n in slots.items():
            if n != x.name:
                assert less[svc][slot] == n  # leave: everything not on x stays
            # join (less -> full): a task moves only if it lands on x
            if less[svc][slot] != n:
                assert n == x.name


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32))
def test_leave_movement_bound_on_a_bigger_cluster(seed: int) -> None:
    """One departure moves the leaver's own tasks plus rejection chains through full nodes; those
    are started by its displaced tasks and by caps that moved (T * w_i / W changes for everyone).
    Bound: extra <= 5 * (own + cap change + 1). Measured on 2,000 seeds of this generator:
    mean 0.42, worst 4.0 (two displaced tasks, a chain of twelve)."""
    rng = random.Random(seed)
    nodes = [NodeInfo(f"h{i}", {}, rng.choice([1.0, 2.0, 4.0])) for i in range(60)]
    services = [ServiceSpec(f"s{k}", rng.randrange(20, 80)) for k in range(5)]
    x = rng.choice(nodes)
    rest = [n for n in nodes if n is not x]
    before, after = place(services, nodes), place(services, rest)
    caps_before, caps_after = caps_of(services, nodes, 1.25), caps_of(services, rest, 1.25)
    cap_change = sum(abs(caps_after[n.name] - caps_before[n.name]) for n in rest)
    own = loads(before)[x.name]
    moved = sum(1 for s, sl in before.items() for k, n in sl.items() if after[s].get(k) != n)
    assert own <= moved <= own + 5 * (own + cap_change + 1)
