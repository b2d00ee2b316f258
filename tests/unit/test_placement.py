"""Placement core: constraint parsing, validation, edge cases, and the fast path against the
definition (every (slot, node) value computed directly)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from meshnet.placement import (
    Constraint,
    NodeInfo,
    PlacementError,
    ServiceSpec,
    block_of,
    capacities,
    global_slot,
    parse_constraint,
    place,
    seed64,
)
from meshnet.placement.hrw import Lanes, block_slots, first, lane_seed, value

# --- a slow, literal reference ------------------------------------------------------------------


def reference(
    services: list[ServiceSpec], nodes: list[NodeInfo], balance: float = 1.25,
    current: dict[str, dict[int, str]] | None = None,
) -> dict[str, dict[int, str]]:
    """The rules of meshnet.placement.core, written out the slow way: every value computed."""
    current = current or {}
    nodes = sorted(nodes, key=lambda n: n.name)
    services = sorted(services, key=lambda s: s.name)
    seeds = [seed64("node", n.name) for n in nodes]
    out: dict[str, dict[int, str]] = {s.name: {} for s in services}
    if not nodes:
        return out
    elig = {s.name: [i for i, n in enumerate(nodes) if s.eligible(n)] for s in services}
    total = sum(
        len(elig[s.name]) if s.mode == "global" else (s.replicas if elig[s.name] else 0)
        for s in services
    )
    caps = capacities(total, [n.weight for n in nodes], balance)
    load = [0] * len(nodes)
    for s in services:
        if s.mode == "global":
            taken: dict[int, str] = {}
            for i in elig[s.name]:
                slot = global_slot(nodes[i].name)
                while slot in taken:
                    slot = slot % (2**31 - 1) + 1
                taken[slot] = nodes[i].name
                load[i] += 1
            out[s.name] = taken

    def count(si: int, i: int) -> int:
        return sum(1 for n in out[services[si].name].values() if n == nodes[i].name)

    # rule 6: running slots stay, lowest slots first, within cap and max_per_node
    names = [n.name for n in nodes]
    kept: set[tuple[int, int]] = set()
    shed: dict[tuple[int, int], int] = {}
    wanted = sorted(
        (slot, s.name, si, names.index(node))
        for si, s in enumerate(services) if s.mode != "global" and elig[s.name]
        for slot, node in current.get(s.name, {}).items()
        if 1 <= slot <= s.replicas and node in names and names.index(node) in elig[s.name]
    )
    for slot, name, si, i in wanted:
        limit = services[si].max_per_node
        if load[i] < caps[i] and (limit is None or count(si, i) < limit):
            load[i] += 1
            out[name][slot] = nodes[i].name
            kept.add((si, slot))
        else:
            shed[si, slot] = i
    # rule 7: spread level and phase of every new slot
    level: dict[int, int] = {}
    phase: dict[tuple[int, int], int] = {}
    for si, s in enumerate(services):
        new = [k for k in range(1, s.replicas + 1) if (si, k) not in kept]
        if s.mode == "global" or not new or not elig[s.name]:
            continue

        def fits(lv: int, si: int = si, s: ServiceSpec = s) -> int:
            return sum(max(0, lv - count(si, i)) for i in elig[s.name])

        lv = 1
        while fits(lv) < len(new) and (s.max_per_node is None or lv < s.max_per_node):
            lv += 1
        level[si] = lv
        first = fits(lv - 1)
        for n, k in enumerate(new):
            phase[si, k] = 0 if n < first else 1
    kept_count = {(si, i): count(si, i) for si in level for i in range(len(nodes))}

    prefs: dict[tuple[int, int], list[int]] = {}
    vals: dict[tuple[int, int, int], float] = {}
    for si, s in enumerate(services):
        if s.mode == "global":
            continue
        for slot in range(1, s.replicas + 1):
            if (si, slot) in kept:
                continue
            b, off, size = block_of(slot)
            bseed = seed64("block", s.name, b)
            order = []
            for i in elig[s.name]:
                v = value(seeds[i], bseed, size, nodes[i].weight, off)
                vals[si, slot, i] = v
                order.append((v, i))
            prefs[si, slot] = [i for _, i in sorted(order)]
    keys = sorted(prefs)
    sid = {k: n for n, k in enumerate(keys)}
    nxt = dict.fromkeys(keys, 0)
    Held = list[tuple[int, int, float, int, tuple[int, int]]]
    held: dict[int, Held] = {i: [] for i in range(len(nodes))}
    free = list(reversed(keys))
    forced = []
    while free:
        k = free.pop()
        if nxt[k] >= len(prefs[k]) or nxt[k] == 32:
            forced.append(k)
            continue
        r = nxt[k]
        i = prefs[k][r]
        nxt[k] = r + 1
        si, ph = k[0], phase[k]
        c = kept_count[si, i]
        quota = max(0, level[si] - 1 - c) if ph == 0 else int(c < level[si])
        if load[i] >= caps[i] or quota == 0:
            free.append(k)
            continue
        held[i].append((ph, r, vals[k[0], k[1], i], sid[k], k))
        same = [e for e in held[i] if e[4][0] == si and e[0] == ph]
        if len(same) > quota:
            worst = max(same)
            held[i].remove(worst)
            free.append(worst[4])
        limit = services[si].max_per_node
        mine = [e for e in held[i] if e[4][0] == si]
        if limit is not None and len(mine) + c > limit:
            worst = max(mine)
            held[i].remove(worst)
            free.append(worst[4])
        if len(held[i]) > caps[i] - load[i]:
            worst = max(held[i])
            held[i].remove(worst)
            free.append(worst[4])
    for i, h in held.items():
        load[i] += len(h)
        for e in h:
            out[services[e[4][0]].name][e[4][1]] = nodes[i].name
    for k in sorted(forced):
        s = services[k[0]]
        ok = [
            i
            for i in elig[s.name]
            if s.max_per_node is None or count(k[0], i) < s.max_per_node
        ]
        was = shed.get(k)
        if was is not None and was in ok:
            ok = [was]
        if ok:
            i = min(ok, key=lambda i: (load[i] >= caps[i], count(k[0], i),
                                       (load[i] + 1) / caps[i], i))
            load[i] += 1
            out[s.name][k[1]] = nodes[i].name
    return {name: dict(sorted(slots.items())) for name, slots in out.items()}


def cluster(
    n: int, rng: random.Random, weights: tuple[float, ...] = (1.0, 2.0, 4.0)
) -> list[NodeInfo]:
    zones = ["a", "b", "c"]
    return [
        NodeInfo(f"h{i:03d}", {"zone": zones[i % 3], "disk": "ssd" if i % 2 else "hdd"},
                 rng.choice(weights))
        for i in range(n)
    ]


# --- constraints ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("node.labels.zone==a", Constraint("node.labels.zone", "==", "a")),
        ("node.name!=h2", Constraint("node.name", "!=", "h2")),
        ("  node.labels.disk ==  ssd ", Constraint("node.labels.disk", "==", "ssd")),
        ("node.hostname==h1", Constraint("node.name", "==", "h1")),
        ("node.labels.rack.row==r-1.2", Constraint("node.labels.rack.row", "==", "r-1.2")),
    ],
)
def test_parse_constraint_good(text: str, want: Constraint) -> None:
    assert parse_constraint(text) == want
    assert parse_constraint(str(want)) == want


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "expected KEY==VALUE"),
        ("node.labels.zone=a", "expected KEY==VALUE"),
        ("node.labels.zone", "expected KEY==VALUE"),
        ("==a", "missing key"),
        ("node.name==", "missing value"),
        ("node.name==a==b", "exactly one"),
        ("node.name==a!=b", "exactly one"),
        ("node.id==x", "node.name or node.labels"),
        ("node.labels.==x", "node.name or node.labels"),
        ("labels.zone==x", "node.name or node.labels"),
        ("node.labels.zo ne==x", "spaces"),
        ("node.name==a b", "spaces"),
        ("node.name===a", "spaces, = or !"),
    ],
)
def test_parse_constraint_bad(text: str, says: str) -> None:
    with pytest.raises(PlacementError, match=says) as err:
        parse_constraint(text)
    assert repr(text) in str(err.value)


def test_constraint_matching() -> None:
    n = NodeInfo("h1", {"zone": "a"})
    assert parse_constraint("node.labels.zone==a").matches(n)
    assert not parse_constraint("node.labels.zone!=a").matches(n)
    # A missing label never equals and always differs (Swarm's rule).
    assert not parse_constraint("node.labels.rack==r1").matches(n)
    assert parse_constraint("node.labels.rack!=r1").matches(n)
    assert parse_constraint("node.name==h1").matches(n)
    with pytest.raises(PlacementError, match="operator"):
        Constraint("node.name", "=", "x")  # type: ignore[arg-type]


# --- validation and edge cases ----------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: NodeInfo("", {}),
        lambda: NodeInfo("h", {}, 0.0),
        lambda: NodeInfo("h", {}, -1.0),
        lambda: NodeInfo("h", {}, float("nan")),
        lambda: NodeInfo("h", {}, float("inf")),
        lambda: ServiceSpec("", 1),
        lambda: ServiceSpec("s", -1),
        lambda: ServiceSpec("s", 1, mode="spread"),
        lambda: ServiceSpec("s", 1, max_per_node=0),
        lambda: ServiceSpec("s", 1, constraints=("node.name==a",)),  # type: ignore[arg-type]
    ],
)
def test_bad_inputs_are_refused(make: object) -> None:
    with pytest.raises(PlacementError):
        make()  # type: ignore[operator]


def test_place_refuses_duplicates_and_bad_balance() -> None:
    nodes = [NodeInfo("a", {}), NodeInfo("b", {})]
    with pytest.raises(PlacementError, match="duplicate node"):
        place([], [*nodes, NodeInfo("a", {})])
    with pytest.raises(PlacementError, match="duplicate service"):
        place([ServiceSpec("s"), ServiceSpec("s", 2)], nodes)
    for bad in (0.5, float("nan"), float("inf")):
        with pytest.raises(PlacementError, match="balance"):
            place([ServiceSpec("s")], nodes, balance=bad)


def test_empty_cluster_and_zero_replicas() -> None:
    specs = [ServiceSpec("web", 3), ServiceSpec("agent", mode="global")]
    assert place(specs, []) == {"web": {}, "agent": {}}
    assert place([], [NodeInfo("a", {})]) == {}
    nodes = [NodeInfo("a", {}), NodeInfo("b", {})]
    assert place([ServiceSpec("web", 0)], nodes) == {"web": {}}


def test_slots_and_values_are_stable_constants() -> None:
    """Changing the hash or the layout reshuffles every cluster on upgrade: pin them."""
    assert seed64("node", "h1") == seed64("node", "h1")
    assert seed64("ab", "c") != seed64("a", "bc")
    assert [block_of(s) for s in (1, 2, 3, 4, 7, 8, 15, 16, 23, 24)] == [
        (0, 0, 1), (1, 0, 2), (1, 1, 2), (2, 0, 4), (2, 3, 4),
        (3, 0, 8), (3, 7, 8), (4, 0, 8), (4, 7, 8), (5, 0, 8),
    ]
    for b in range(12):
        start, size = block_slots(b)
        assert all(block_of(start + k) == (b, k, size) for k in range(size))
    placed = place([ServiceSpec("web", 3)], [NodeInfo(f"h{i}", {}) for i in range(5)])
    assert placed == {"web": {1: "h3", 2: "h1", 3: "h0"}}
    assert global_slot("h1") == 1 + seed64("global-slot", "h1") % (2**31 - 1)


def test_lanes_agree_with_the_scalar_hash() -> None:
    rng = random.Random(5)
    seeds = [seed64("node", f"n{i}") for i in range(300)]
    lanes = Lanes(seeds)
    for _ in range(20):
        b = seed64("block", str(rng.random()), 0)
        thr = [rng.randrange(0, 2**32 + 1) for _ in seeds]
        got = lanes.below(b, lanes.threshold(thr))
        assert got == [i for i, s in enumerate(seeds) if first(s, b) < thr[i]]
        assert all(first(s, b) % 2 == 1 and lane_seed(s) < 2**32 for s in seeds)


# --- the fast path is the definition --------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_fast_path_equals_reference(seed: int) -> None:
    rng = random.Random(seed)
    nodes = cluster(rng.randrange(1, 40), rng)
    specs = []
    for k in range(rng.randrange(1, 6)):
        cons: tuple[Constraint, ...] = ()
        if rng.random() < 0.3:
            cons = (parse_constraint(rng.choice(["node.labels.zone==a", "node.labels.disk!=ssd",
                                                 "node.name==h001", "node.labels.gpu==yes"])),)
        mode = "global" if rng.random() < 0.15 else "replicated"
        mpn = rng.choice([None, None, 1, 2])
        specs.append(ServiceSpec(f"s{k}", rng.randrange(0, 40), mode, cons, mpn))
    balance = rng.choice([1.0, 1.1, 1.25, 2.0])
    assert place(specs, nodes, balance) == reference(specs, nodes, balance)


def test_fast_path_equals_reference_deep_lists() -> None:
    """Tight capacity (balance 1) and pins force deep lists, level changes and forced slots."""
    rng = random.Random(99)
    nodes = cluster(60, rng, (0.5, 1.0, 3.0))
    specs = [ServiceSpec(f"s{k}", 37 + k, max_per_node=3 if k % 2 else None) for k in range(4)]
    specs.append(ServiceSpec("pinned", 5, constraints=(parse_constraint("node.name==h007"),)))
    not_c = (parse_constraint("node.labels.zone!=c"),)
    specs.append(ServiceSpec("daemon", mode="global", constraints=not_c))
    got = place(specs, nodes, 1.0)
    assert got == reference(specs, nodes, 1.0)
    assert set(got["pinned"].values()) == {"h007"}  # forced beyond capacity, not dropped


# --- behaviour ----------------------------------------------------------------------------------


def loads(placed: dict[str, dict[int, str]]) -> Counter[str]:
    return Counter(n for slots in placed.values() for n in slots.values())


def test_weights_are_honoured_roughly_proportionally() -> None:
    """Across services (spread keeps each service to one task per node here: 20 < 200 nodes)."""
    nodes = [NodeInfo(f"h{i:03d}", {}, [1.0, 4.0][i % 2]) for i in range(200)]
    placed = place([ServiceSpec(f"s{k}", 20) for k in range(120)], nodes)
    load = loads(placed)
    light = sum(load[n.name] for n in nodes if n.weight == 1.0)
    heavy = sum(load[n.name] for n in nodes if n.weight == 4.0)
    assert light + heavy == 2400
    assert 3.5 < heavy / light < 4.5
    caps = capacities(2400, [n.weight for n in nodes], 1.25)
    assert all(load[n.name] <= c for n, c in zip(nodes, caps, strict=True))


def test_capacity_definition() -> None:
    # average 4.29 -> floor(5.36) = 5; average 0.5 -> ceil = 1 (never below the average)
    assert capacities(30, [1.0, 2.0, 4.0], 1.25) == [5, 10, 21]
    assert capacities(2, [1.0, 1.0, 1.0, 1.0], 1.25) == [1, 1, 1, 1]
    assert capacities(0, [1.0], 1.25) == [0]
    assert capacities(100, [1.0] * 10, 1.25) == [12] * 10  # floor(12.5)


def test_global_mode_one_task_per_eligible_node() -> None:
    nodes = [NodeInfo(f"h{i}", {"zone": "ab"[i % 2]}) for i in range(9)]
    zone_a = (parse_constraint("node.labels.zone==a"),)
    spec = ServiceSpec("agent", mode="global", constraints=zone_a)
    placed = place([spec, ServiceSpec("web", 4)], nodes)["agent"]
    assert sorted(placed.values()) == [n.name for n in nodes if n.labels["zone"] == "a"]
    assert placed == {global_slot(n): n for n in placed.values()}
    # a node's global slot does not depend on the others
    fewer = place([spec], nodes[:5])["agent"]
    assert all(placed[s] == n for s, n in fewer.items())


def test_max_per_node_and_unplaceable_slots() -> None:
    nodes = [NodeInfo(f"h{i}", {}) for i in range(3)]
    placed = place([ServiceSpec("web", 8, max_per_node=2)], nodes)["web"]
    assert len(placed) == 6 and max(Counter(placed.values()).values()) == 2
    gpu = (parse_constraint("node.labels.gpu==y"),)
    none = place([ServiceSpec("gpu", 2, constraints=gpu)], nodes)
    assert none == {"gpu": {}}


def test_scaling_keeps_existing_slots_and_is_order_free() -> None:
    rng = random.Random(3)
    nodes = cluster(30, rng)
    others = [ServiceSpec(f"o{k}", 20 + k) for k in range(4)]
    small = place([ServiceSpec("web", 25), *others], nodes)
    big = place([ServiceSpec("web", 40), *others], nodes, current=small)
    assert all(big["web"][s] == n for s, n in small["web"].items())  # scale-up moves nothing
    assert all(big[o.name] == small[o.name] for o in others)
    down = place([ServiceSpec("web", 10), *others], nodes, current=big)
    assert down["web"] == {s: n for s, n in small["web"].items() if s <= 10}  # highest slots go
    specs = [ServiceSpec(f"s{k}", 7 * k) for k in range(5)]
    shuffled = specs[::-1]
    assert place(specs, nodes) == place(shuffled, list(reversed(nodes)))


def moved(a: dict[str, dict[int, str]], b: dict[str, dict[int, str]]) -> int:
    return sum(1 for s, slots in a.items() for k, n in slots.items() if b[s].get(k) != n)


def test_movement_on_leave_and_join_is_the_minimum() -> None:
    """With the running placement as input, a departure moves exactly the leaver's tasks (caps
    only grow), and an arrival exactly the tasks over their node's new, lower cap."""
    rng = random.Random(11)
    nodes = cluster(200, rng)
    specs = [ServiceSpec(f"s{k:02d}", 100) for k in range(20)]
    base = place(specs, nodes)
    load = loads(base)
    for x in rng.sample(nodes, 15):
        rest = [n for n in nodes if n is not x]
        after = place(specs, rest, current=base)
        assert moved(base, after) == load[x.name]
        y = NodeInfo("new", {}, x.weight)
        joined = place(specs, [*nodes, y], current=base)
        caps = capacities(2000, [n.weight for n in [*nodes, y]], 1.25)
        over = sum(max(0, load[n.name] - c) for n, c in zip(nodes, caps, strict=False))
        assert moved(base, joined) == over


def test_same_answer_in_another_process() -> None:
    """No salted hash(): a fresh interpreter with a different PYTHONHASHSEED agrees."""
    code = (
        "import json; from meshnet.placement import *;"
        "n=[NodeInfo(f'h{i}', {}, 1.0 + i % 3) for i in range(50)];"
        "print(json.dumps(place([ServiceSpec('web', 60), ServiceSpec('db', 9)], n)))"
    )
    root = Path(__file__).resolve().parents[2]
    got = {}
    for hs in ("1", "2"):
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
            env={"PYTHONHASHSEED": hs, "PATH": "/usr/bin:/bin"},
        )
        got[hs] = json.loads(res.stdout)
    nodes = [NodeInfo(f"h{i}", {}, 1.0 + i % 3) for i in range(50)]
    here = place([ServiceSpec("web", 60), ServiceSpec("db", 9)], nodes)
    want = {s: {str(k): v for k, v in slots.items()} for s, slots in here.items()}
    assert got["1"] == got["2"] == want


def test_hash_spreads_like_independent_draws() -> None:
    """Uncapped, a node's task count is a sum of independent wins (at most one per service, by
    spread): binomial with small p, so Poisson-like, mean ~ weight."""
    nodes = [NodeInfo(f"n{i:03d}", {}, [1.0, 3.0][i % 2]) for i in range(200)]
    placed = place([ServiceSpec(f"s{k}", 10) for k in range(300)], nodes, balance=1e6)
    load = loads(placed)
    for w, mean in ((1.0, 7.5), (3.0, 22.5)):
        xs = [load[n.name] for n in nodes if n.weight == w]
        m = sum(xs) / len(xs)
        var = sum((x - m) ** 2 for x in xs) / len(xs)
        assert abs(m - mean) < 0.15 * mean
        assert 0.6 < var / m < 1.5
