"""`meshnet-lab chaos` in CI (#15): 5 hosts, 90 s, every fault kind, a fixed seed. The run must
end with every invariant holding; its report must show every fault kind acted out, churn, and
convergence measured after every heal. The same seed draws the same schedule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meshnet.lab.chaos import FAULT_KINDS

pytestmark = pytest.mark.netns

SEED = 1
LAB = str(Path(sys.executable).parent / "meshnet-lab")


@pytest.mark.timeout(900)  # a run that never converges takes ~6 min to say which invariant
def test_chaos_run_with_every_fault_kind_holds_every_invariant() -> None:
    prefix = f"mnch{os.getpid() % 10000}"
    try:
        r = subprocess.run([LAB, "--prefix", prefix, "chaos", "--hosts", "5", "--duration",
                            "90", "--seed", str(SEED), "--json"], capture_output=True,
                           text=True, timeout=840, check=False)
    finally:  # a run killed by a timeout cleans nothing up itself
        subprocess.run([LAB, "--prefix", prefix, "down"], capture_output=True, timeout=120,
                       check=False)
    assert r.stdout.strip(), r.stderr[-3000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    violations = [f"[{v['invariant']}] {v['detail']} {json.dumps(v['evidence'])[:800]}"
                  for v in rep["violations"]]
    assert r.returncode == 0 and rep["ok"], (rep["error"], violations, r.stderr[-3000:])
    begun = {a["action"].split()[1] for a in rep["actions"]
             if a["action"].startswith("begin ") and a["ok"]}
    assert begun == set(FAULT_KINDS) - {"churn"}, rep["actions"]
    assert any(a["action"].startswith("churn ") for a in rep["actions"])
    assert len(rep["convergence"]) == len(rep["schedule"]) + 1  # each round, and the final heal
    assert rep["final_requests"] == {"served": 100, "failed": 0}
    assert rep["tracebacks"] == 0 and rep["max_rss_mb"] < rep["rss_bound_mb"]
    # nothing of the lab is left
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert prefix not in left
