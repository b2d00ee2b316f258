"""The chaos soak (#15): `meshnet-lab chaos` for a long run on many hosts, summed up in one line.

    python bench/chaos.py [--hosts 7] [--duration 1800] [--seed 1] [--faults all] [--json]

Every fault kind by default, the `lan` membership profile. Prints the run's progress on stderr
and, last on stdout, one JSON object: actions, violations, convergence_s_p50/p99/max (after
each heal: until every host sees every host alive and tasks and DNS are as acknowledged),
served, failed_during_chaos, max_rss_mb (the largest agent peak, VmHWM), tracebacks, and the
targets beside them. Exits 0 only if the final check found no violation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshnet.lab import Lab
from meshnet.lab.chaos import Chaos, make_schedule, parse_faults
from meshnet.lab.lab import LabError

TARGETS = {"violations": 0, "convergence_s_p99": 10.0, "tracebacks": 0}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hosts", type=int, default=7)
    p.add_argument("--duration", type=float, default=1800.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--faults", default="all")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench/chaos.py: needs root (network namespaces)", file=sys.stderr)
        return 1
    hosts = [f"h{i}" for i in range(1, args.hosts + 1)]
    schedule = make_schedule(args.seed, hosts, args.duration, parse_faults(args.faults))
    lab = Lab(prefix=f"mnc{os.getpid() % 10000}")
    chaos = Chaos(schedule, lab, lambda line: print(line, file=sys.stderr, flush=True))
    try:
        chaos.start()
        chaos.run()
    except (LabError, KeyboardInterrupt) as e:
        chaos.report.error = str(e) or type(e).__name__
    finally:
        chaos.stop()
    rep = chaos.report.to_dict()
    summary = {
        "seed": args.seed, "hosts": args.hosts, "duration_s": args.duration,
        "faults": rep["faults"], "rounds": len(schedule.rounds),
        "actions": len(rep["actions"]), "violations": len(rep["violations"]),
        "violation_details": rep["violations"],
        "convergence_s_p50": rep["convergence_s_p50"],
        "convergence_s_p99": rep["convergence_s_p99"],
        "convergence_s_max": rep["convergence_s_max"], "unconverged": rep["unconverged"],
        "served": rep["served"], "failed_during_chaos": rep["failed_during_chaos"],
        "final_requests": rep["final_requests"], "max_rss_mb": rep["max_rss_mb"],
        "rss_bound_mb": rep["rss_bound_mb"], "tracebacks": rep["tracebacks"],
        "error": rep["error"], "targets": TARGETS,
        "targets_met": {
            "violations": not rep["violations"] and rep["error"] is None,
            "convergence_s_p99": rep["convergence_s_p99"] is not None
            and rep["convergence_s_p99"] <= TARGETS["convergence_s_p99"]
            and rep["unconverged"] == 0,
            "tracebacks": rep["tracebacks"] == 0,
        },
    }
    print(json.dumps(summary), flush=True)
    return 0 if chaos.report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
