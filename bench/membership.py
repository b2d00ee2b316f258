#!/usr/bin/env python3
"""Membership benchmark: failure detection, false positives and bandwidth on the simulator.

    bench/membership.py [--nodes N] [--scenario clean|loss5|slow10] [--duration S] [--seed S]
                        [--profile lan] [--suspicion-mult M] [--suspicion-k K]
                        [--nacks-confirm 0|1] [--json]

N cores of the real ``Membership`` class run on virtual time (meshnet.sim). After a bootstrap
(everyone holds everyone alive) and a warm-up, one random healthy node is crashed every
``--crash-every`` virtual seconds. For each crash we record when the first member declares it
dead and when every live member holds it dead. Any non-crashed node declared dead by anyone is a
false positive. Bytes are what the nodes sent, encryption framing included, over the measured
window.

Scenarios: clean; loss5 = 5% loss on every link; slow10 = 10% of nodes handle their inbox
1-3 probe timeouts late, plus 1% loss everywhere.

The last line of stdout is one JSON object. memberlist_expected_* are what memberlist's own
formulas (its LAN defaults, SuspicionMult 4) predict for the same N, beside our measured values.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import random
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshnet.membership import (
    MemberDead,
    MemberEvent,
    MembershipConfig,
    MemberSuspect,
)
from meshnet.membership.lifeguard import suspicion_bounds
from meshnet.sim import Simulator
from meshnet.wire import FRESHNESS_OVERHEAD


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    idx = min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))
    return s[idx]


def serf_convergence_s(n: int, cfg: MembershipConfig, loss: float, target: float = 0.9999) -> float:
    """Serf's infection curve N/(1+(N+1)e^(-cNr)), c = fanout/N (1-loss) 0.5; time to ``target``."""
    c_n = cfg.gossip_nodes * (1 - loss) * 0.5
    rounds = math.log((n + 1) / (1 / target - 1)) / c_n
    return rounds * cfg.gossip_interval


def run(args: argparse.Namespace) -> dict[str, object]:
    cfg = MembershipConfig.profile(args.profile)
    if args.suspicion_mult is not None:
        cfg.suspicion_mult = args.suspicion_mult
    if args.suspicion_k is not None:
        cfg.suspicion_k = args.suspicion_k
    if args.nacks_confirm is not None:
        cfg.nacks_confirm = bool(args.nacks_confirm)
    loss = {"clean": 0.0, "loss5": 0.05, "slow10": 0.01}[args.scenario]
    sim = Simulator(cfg, seed=args.seed, loss=loss)
    rng = random.Random(args.seed ^ 0x5EED)
    n = args.nodes
    for _ in range(n):
        sim.add_node()
    slow: set[int] = set()
    if args.scenario == "slow10":
        slow = set(rng.sample(range(n), max(1, n // 10)))
        for i in sorted(slow):
            sim.set_slow(i, rng.uniform(1.0, 3.0) * cfg.probe_timeout)

    crashed_at: dict[int, float] = {}
    first_dead: dict[int, float] = {}
    all_dead: dict[int, float] = {}
    holders: dict[int, set[int]] = {}
    live: set[int] = set(range(n))
    false_dead: set[str] = set()
    false_dead_events = 0
    false_suspect_events = 0
    name_to_idx = {node.name: node.index for node in sim.nodes}

    def check_all(v: int, now: float) -> None:
        if v in all_dead:
            return
        h = holders[v]
        if all(i in h for i in live if i != v):
            all_dead[v] = now - crashed_at[v]

    def hook(now: float, i: int, ev: MemberEvent) -> None:
        nonlocal false_dead_events, false_suspect_events
        t = type(ev)
        if t is MemberDead:
            v = name_to_idx[ev.member.name]
            if v in crashed_at:
                first_dead.setdefault(v, now - crashed_at[v])
                holders[v].add(i)
                check_all(v, now)
            else:
                false_dead_events += 1
                false_dead.add(ev.member.name)
        elif t is MemberSuspect and name_to_idx[ev.member.name] not in crashed_at:
            false_suspect_events += 1

    sim.bootstrap()
    warmup = args.warmup
    sim.run_until(warmup)
    # Every core's view (~N^2 objects) lives for the whole run: keep the cyclic collector from
    # walking them all again at every full collection. Collection order changes no outcome.
    gc.freeze()
    sim.on_event = hook
    bytes0 = sim.total_bytes_sent()
    packets0 = sum(node.packets_sent for node in sim.nodes)
    refuted0 = sum(node.core.stats["refuted_suspicions"] for node in sim.nodes)
    wall0 = time.perf_counter()
    cpu0 = time.process_time()
    t_end = warmup + args.duration
    next_crash = warmup + 1.0
    healthy = [i for i in range(n) if i not in slow]
    rng.shuffle(healthy)
    while sim.now < t_end:
        if next_crash >= t_end - args.crash_tail or not healthy:
            next_crash = t_end
        if sim.now >= next_crash and next_crash < t_end:
            v = healthy.pop()
            sim.crash(v)
            live.discard(v)
            crashed_at[v] = sim.now
            holders[v] = set()
            for u in list(crashed_at):
                if u in first_dead:
                    check_all(u, sim.now)
            next_crash += args.crash_every
        sim.run_until(min(t_end, next_crash))
        if args.progress:
            print(f"t={sim.now:.0f} wall={time.perf_counter() - wall0:.1f}", file=sys.stderr)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    virtual = args.duration
    total_bytes = sim.total_bytes_sent() - bytes0
    packets = sum(node.packets_sent for node in sim.nodes) - packets0
    refuted = sum(node.core.stats["refuted_suspicions"] for node in sim.nodes) - refuted0

    lo, hi = suspicion_bounds(cfg.suspicion_mult, cfg.suspicion_max_timeout_mult, n, 1.0)
    ml_lo, ml_hi = suspicion_bounds(4, 6, n, cfg.probe_interval)
    swim_first = math.e / (math.e - 1) * cfg.probe_interval
    dissem = serf_convergence_s(n, cfg, loss)
    first = list(first_dead.values())
    alls = list(all_dead.values())
    undetected = [v for v in crashed_at if v not in all_dead]
    return {
        "nodes": n,
        "scenario": args.scenario,
        "profile": args.profile,
        "seed": args.seed,
        "suspicion_mult": cfg.suspicion_mult,
        "suspicion_k": cfg.suspicion_k,
        "nacks_confirm": cfg.nacks_confirm,
        "virtual_s": virtual,
        "wall_s": round(wall, 2),
        "virtual_per_wall": round(virtual / wall, 3) if wall > 0 else None,
        # CPU seconds of this process: the honest speed when the machine is shared.
        "cpu_s": round(cpu, 2),
        "virtual_per_cpu_s": round(virtual / cpu, 3) if cpu > 0 else None,
        "crashes": len(crashed_at),
        "crashes_not_fully_detected": len(undetected),
        "detect_first_p50_s": _r(pct(first, 50)),
        "detect_first_p99_s": _r(pct(first, 99)),
        "detect_all_p50_s": _r(pct(alls, 50)),
        "detect_all_p99_s": _r(pct(alls, 99)),
        "detect_all_max_s": _r(max(alls) if alls else None),
        "detect_all_mean_s": _r(statistics.fmean(alls) if alls else None),
        "false_positives": len(false_dead),
        "false_dead_events": false_dead_events,
        "false_suspect_events": false_suspect_events,
        "refuted_suspicions": refuted,
        "deaths_vetoed": sum(node.core.stats["deaths_vetoed"] for node in sim.nodes),
        "nack_confirmations": sum(node.core.stats["nack_confirmations"] for node in sim.nodes),
        "bytes_per_node_per_s": round(total_bytes / (n * virtual)),
        "datagrams_per_node_per_s": round(packets / (n * virtual), 2),
        # What the per-sender freshness value (#14) adds to every datagram, in those bytes.
        "freshness_bytes_per_node_per_s": round(FRESHNESS_OVERHEAD * packets / (n * virtual)),
        "suspicion_min_s": round(lo * cfg.probe_interval, 2),
        "suspicion_max_s": round(hi * cfg.probe_interval, 2),
        "memberlist_expected_suspicion_min_s": round(ml_lo, 2),
        "memberlist_expected_suspicion_max_s": round(ml_hi, 2),
        "memberlist_expected_first_probe_s": round(swim_first, 2),
        "memberlist_expected_dissemination_s": round(dissem, 2),
        # SWIM's first probe of the dead node + one probe interval to fail + the minimum
        # (fully confirmed) suspicion, then dissemination to everyone.
        "memberlist_expected_detect_first_s": round(swim_first + cfg.probe_interval + ml_lo, 2),
        "memberlist_expected_detect_all_s": round(
            swim_first + cfg.probe_interval + ml_lo + dissem, 2
        ),
        "ours_expected_detect_all_s": round(
            swim_first + cfg.probe_interval + lo * cfg.probe_interval + dissem, 2
        ),
        # Serf's bandwidth estimate (every gossip packet full): 1400 x fanout / interval x 2.
        "memberlist_expected_bytes_per_node_per_s": round(
            cfg.udp_payload * cfg.gossip_nodes / cfg.gossip_interval * 2
        ),
        "sim_steps": sim.steps,
        # Peak resident memory of this process (every node's full member view lives in it).
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=200)
    p.add_argument("--scenario", choices=["clean", "loss5", "slow10"], default="clean")
    p.add_argument("--duration", type=float, default=None, help="measured virtual seconds")
    p.add_argument("--warmup", type=float, default=10.0)
    p.add_argument("--crash-every", type=float, default=15.0)
    p.add_argument("--crash-tail", type=float, default=30.0,
                   help="no crash in the last S seconds, so each has time to be detected")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--profile", default="lan")
    p.add_argument("--suspicion-mult", type=float, default=None)
    p.add_argument("--suspicion-k", type=int, default=None)
    p.add_argument("--nacks-confirm", type=int, choices=[0, 1], default=None,
                   help="count a failed probe's nacking helpers as confirmations (default: the "
                        "profile's, on)")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the JSON result line (always last)")
    args = p.parse_args()
    if args.duration is None:
        args.duration = 120.0 if args.nodes <= 300 else 600.0
    result = run(args)
    if not args.json:
        for k, v in result.items():
            print(f"{k:45s} {v}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
