#!/usr/bin/env python3
"""Placement benchmark: 1,000 nodes with mixed weights, 10,000 tasks, one agent's full placement.

    bench/placement.py [--nodes N] [--services S] [--replicas R] [--runs K] [--trials T]
                       [--balance C] [--json]

Cluster: nodes ``node-0000``.. with weights 1, 2, 4 in turn (``i % 3``); ``S`` services of ``R``
replicas (100 x 100 = 10,000 tasks), no constraints, balance c = 1.25 (the default; ``--balance``
to see how movement depends on the slack, e.g. 1.3 or 1.5; the targets are for 1.25).

Keys (the last line of stdout is one JSON object):

- ``compute_ms``: wall time of one full :func:`meshnet.placement.place` call, median of ``K``
  runs (``cpu_ms``: the same in process CPU time, less disturbed by other load on the machine;
  ``compute_ms_min`` the fastest run).
- ``max_over_avg``: max over nodes of ``load_i / (T * w_i / sum(w))``.
- ``moved_on_leave`` / ``leave_min``: one node leaves; tasks whose node changed, and that node's
  task count (nothing can do with fewer moves). Summed over ``T`` (default 20) single-node
  departures from the same cluster (evenly spaced nodes, so all three weights), because one
  departure moves about 10 tasks and its own ratio is mostly noise (1.0 to 1.6 here);
  ``leave_trials`` lists each ``[node, moved, min]``.
- ``moved_on_join`` / ``join_min``: one new node joins (weights 1, 2, 4 in turn); tasks whose node
  changed, and the fewest any placement within the new caps could move: the tasks over their
  node's new (lower) cap. Summed over ``T`` joins likewise. ``joiner_tasks``: what the new nodes
  got (running tasks stay where they are, as in Docker: a new node fills with new tasks).
- ``leave_ratio``, ``join_ratio``: moved / min.
- Leaves, joins and scale-ups pass the running placement as ``current`` (as the agent does, from
  the task table); ``sticky_ms`` is one such full placement (median of ``K``).
- ``moved_on_scale_up``: every tenth service scaled up by 10 replicas; running tasks that moved.
- ``spread_violations``: (service, node) pairs, in the first placement and after the scale-up,
  where a node with room holds two or more tasks fewer of the service than another node.
- Targets: compute_ms <= 500, max_over_avg <= 1.25, both ratios <= 1.25, moved_on_scale_up 0,
  spread_violations 0 (``targets`` says which hold).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshnet.placement import NodeInfo, ServiceSpec, capacities, place

Placement = dict[str, dict[int, str]]


def moved(a: Placement, b: Placement) -> int:
    return sum(1 for s, slots in a.items() for k, n in slots.items() if b[s].get(k) != n)


def loads(p: Placement) -> Counter[str]:
    return Counter(n for slots in p.values() for n in slots.values())


def spread_violations(p: Placement, nodes: list[NodeInfo], caps: dict[str, int]) -> int:
    load = loads(p)
    room = [n.name for n in nodes if load[n.name] < caps[n.name]]
    bad = 0
    for slots in p.values():
        count = Counter(slots.values())
        high = max(count.values(), default=0)
        bad += sum(1 for n in room if count[n] < high - 1)
    return bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--services", type=int, default=100)
    ap.add_argument("--replicas", type=int, default=100)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--balance", type=float, default=1.25, help="bounded-load factor c")
    ap.add_argument("--json", action="store_true", help="only the JSON line")
    args = ap.parse_args()

    weights = (1.0, 2.0, 4.0)
    nodes = [NodeInfo(f"node-{i:04d}", {}, weights[i % 3]) for i in range(args.nodes)]
    specs = [ServiceSpec(f"svc-{j:03d}", args.replicas) for j in range(args.services)]
    total = args.services * args.replicas

    wall, cpu = [], []
    base: Placement = {}
    for _ in range(args.runs):
        t0, c0 = time.perf_counter(), time.process_time()
        base = place(specs, nodes, args.balance)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    load = loads(base)
    assert sum(load.values()) == total
    wsum = sum(n.weight for n in nodes)
    max_over_avg = max(load[n.name] / (total * n.weight / wsum) for n in nodes)

    sticky = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        again = place(specs, nodes, args.balance, current=base)
        sticky.append(time.perf_counter() - t0)
    assert again == base  # fed its own answer, placement gives it back

    def caps_of(ns: list[NodeInfo], t: int) -> dict[str, int]:
        return dict(zip((n.name for n in ns), capacities(t, [n.weight for n in ns],
                                                         args.balance), strict=True))

    violations = spread_violations(base, nodes, caps_of(nodes, total))
    grown = [ServiceSpec(s.name, s.replicas + (10 if k % 10 == 0 else 0))
             for k, s in enumerate(specs)]
    scaled = place(grown, nodes, args.balance, current=base)
    moved_on_scale_up = moved(base, scaled)
    violations += spread_violations(scaled, nodes,
                                    caps_of(nodes, sum(s.replicas for s in grown)))

    step = max(1, args.nodes // args.trials)
    leavers = [nodes[(step // 2 + k * step) % args.nodes] for k in range(args.trials)]
    leave_trials: list[tuple[str, int, int]] = []
    for x in leavers:
        after = place(specs, [n for n in nodes if n is not x], args.balance, current=base)
        leave_trials.append((x.name, moved(base, after), load[x.name]))
        if not args.json:
            print(f"leave {x.name} (w={x.weight:g}): moved {leave_trials[-1][1]}, "
                  f"min {load[x.name]}")
    join_trials: list[tuple[str, int, int, int]] = []
    for k in range(args.trials):
        y = NodeInfo(f"node-new-{k}", {}, weights[k % 3])
        after = place(specs, [*nodes, y], args.balance, current=base)
        caps = caps_of([*nodes, y], total)
        over = sum(max(0, load[n.name] - caps[n.name]) for n in nodes)
        join_trials.append((y.name, moved(base, after), over, loads(after)[y.name]))
        if not args.json:
            print(f"join {y.name} (w={y.weight:g}): moved {join_trials[-1][1]}, "
                  f"min {over}, joiner got {join_trials[-1][3]}")

    leave_moved = sum(t[1] for t in leave_trials)
    leave_min = sum(t[2] for t in leave_trials)
    join_moved = sum(t[1] for t in join_trials)
    join_min = sum(t[2] for t in join_trials)
    compute_ms = statistics.median(wall) * 1000
    out = {
        "nodes": args.nodes,
        "tasks": total,
        "services": args.services,
        "weights": list(weights),
        "balance": args.balance,
        "runs": args.runs,
        "compute_ms": round(compute_ms, 1),
        "compute_ms_min": round(min(wall) * 1000, 1),
        "cpu_ms": round(statistics.median(cpu) * 1000, 1),
        "sticky_ms": round(statistics.median(sticky) * 1000, 1),
        "moved_on_scale_up": moved_on_scale_up,
        "spread_violations": violations,
        "joiner_tasks": sum(t[3] for t in join_trials),
        "max_over_avg": round(max_over_avg, 4),
        "moved_on_leave": leave_moved,
        "leave_min": leave_min,
        "leave_ratio": round(leave_moved / max(1, leave_min), 4),
        "moved_on_join": join_moved,
        "join_min": join_min,
        "join_ratio": round(join_moved / max(1, join_min), 4),
        "trials": args.trials,
        "leave_trials": leave_trials,
        "join_trials": join_trials,
    }
    out["targets"] = {
        "compute_ms": compute_ms <= 500,
        "max_over_avg": max_over_avg <= 1.25,
        "leave": leave_moved <= 1.25 * leave_min,
        "join": join_moved <= 1.25 * join_min,
        "moved_on_scale_up": moved_on_scale_up == 0,
        "spread_violations": violations == 0,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
