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
    capacities,
    global_slot,
    parse_constraint,
    place,
)

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


def check_moves_only_what_must(
    services: list[ServiceSpec], old_nodes: list[NodeInfo], new_nodes: list[NodeInfo], c: float
) -> None:
    """With the running placement as input, a slot whose node is still there and eligible moves
    only when that node has no room left for it: full (its load reached its cap) or at the
    service's max_per_node."""
    old = place(services, old_nodes, c)
    new = place(services, new_nodes, c, current=old)
    new_caps, new_load = caps_of(services, new_nodes, c), loads(new)
    spec = {s.name: s for s in services}
    present = {n.name: n for n in new_nodes}
    for svc, slots in old.items():
        if spec[svc].mode == "global":
            continue
        for slot, y in slots.items():
            z = new[svc].get(slot)
            if z == y or y not in present or not spec[svc].eligible(present[y]):
                continue
            limit = spec[svc].max_per_node
            mine = sum(1 for x in new[svc].values() if x == y)
            assert new_load[y] >= new_caps[y] or (limit is not None and mine >= limit)


@SETTINGS
@given(services_st(), nodes_st(min_size=2), balances, st.data())
def test_leave_and_join_move_only_what_must_move(
    services: list[ServiceSpec], nodes: list[NodeInfo], c: float, data: st.DataObject
) -> None:
    x = data.draw(st.sampled_from(nodes))
    rest = [n for n in nodes if n is not x]
    check_moves_only_what_must(services, nodes, rest, c)  # x leaves
    check_moves_only_what_must(services, rest, nodes, c)  # x joins


@SETTINGS
@given(services_st(plain=True), nodes_st(min_size=2), st.data())
def test_without_binding_caps_movement_is_exactly_minimal(
    services: list[ServiceSpec], nodes: list[NodeInfo], data: st.DataObject
) -> None:
    """Caps that cannot bind (huge c): a departure moves only the leaver's tasks, an arrival
    none (Docker's rule: a new node gets new tasks, running ones stay)."""
    x = data.draw(st.sampled_from(nodes))
    rest = [n for n in nodes if n is not x]
    c = 1e6
    full = place(services, nodes, c)
    less = place(services, rest, c, current=full)
    for svc, slots in full.items():
        for slot, n in slots.items():
            if n != x.name:
                assert less[svc][slot] == n
    assert place(services, nodes, c, current=less) == less


@SETTINGS
@given(services_st(), nodes_st(), balances)
def test_the_placement_is_a_fixed_point(
    services: list[ServiceSpec], nodes: list[NodeInfo], c: float
) -> None:
    """Fed its own answer, placement gives it back: a settled cluster moves nothing. (When
    constraints forced a slot over a cap, one slot may still move once; see rule 6.)"""
    first = place(services, nodes, c)
    caps, load = caps_of(services, nodes, c), loads(first)
    if any(load[n] > caps[n] for n in caps):
        return
    assert place(services, nodes, c, current=first) == first


def spread_holds(placed: Placement, services: list[ServiceSpec], nodes: list[NodeInfo],
                 c: float) -> None:
    """Per service, node counts differ by at most one, except on a node that is full."""
    caps, load = caps_of(services, nodes, c), loads(placed)
    for s in services:
        count = Counter(placed[s.name].values())
        low = [n.name for n in nodes if load[n.name] < caps[n.name]]
        high = max((count[n.name] for n in nodes), default=0)
        for n in low:
            assert count[n] >= high - 1, (s.name, n, count)


@SETTINGS
@given(services_st(plain=True), nodes_st(), balances, st.data())
def test_replicas_spread_and_scale_up_moves_nothing(
    services: list[ServiceSpec], nodes: list[NodeInfo], c: float, data: st.DataObject
) -> None:
    first = place(services, nodes, c)
    spread_holds(first, services, nodes, c)
    more = [ServiceSpec(s.name, s.replicas + data.draw(st.integers(0, 12))) for s in services]
    scaled = place(more, nodes, c, current=first)
    for svc, slots in first.items():
        assert all(scaled[svc][k] == n for k, n in slots.items())
    # New slots go where the service has fewest tasks, among the nodes with room.
    caps, load = caps_of(more, nodes, c), loads(scaled)
    low = [n.name for n in nodes if load[n.name] < caps[n.name]]
    for svc, slots in scaled.items():
        count = Counter(slots.values())
        for k, a in slots.items():
            if k not in first[svc]:
                assert all(count[b] >= count[a] - 1 for b in low), (svc, k, a, count)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32))
def test_leave_moves_exactly_the_leavers_tasks_on_a_bigger_cluster(seed: int) -> None:
    rng = random.Random(seed)
    nodes = [NodeInfo(f"h{i}", {}, rng.choice([1.0, 2.0, 4.0])) for i in range(60)]
    services = [ServiceSpec(f"s{k}", rng.randrange(20, 80)) for k in range(5)]
    x = rng.choice(nodes)
    rest = [n for n in nodes if n is not x]
    before = place(services, nodes)
    after = place(services, rest, current=before)
    own = loads(before)[x.name]
    moved = sum(1 for s, sl in before.items() for k, n in sl.items() if after[s].get(k) != n)
    assert moved == own
