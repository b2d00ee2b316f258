"""Failover in the lab: 5 hosts, a service with 10 replicas, kill -9 one host's agent.

    python bench/failover.py [--trials 5] [--profile lan] [--json]

Per trial, from the SIGKILL:
- detect_s: until every survivor holds the host dead;
- restored_s: until all 10 tasks run again (on survivors);
- dns_clean_s: until no survivor's DNS returns an address of a task that was on the dead host.
The host is restarted between trials and the layout allowed to settle. Default timings (the
`lan` profile: memberlist's LAN values). The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshnet.cli.meshctl import Client, NoAgent
from meshnet.lab import Lab

HOSTS = [f"h{i}" for i in range(1, 6)]
REPLICAS = 10
DEMO = [sys.executable, "-m", "meshnet.lab.demo_http", "serve"]


def api(lab: Lab, host: str, op: str, **args: Any) -> Any:
    """One control-API call on HOST's agent socket, in-process: a poll of all survivors takes
    milliseconds (spawning meshctl for each took ~1.3 s per round, blurring every mark)."""
    try:
        for body in Client(str(lab.socket_path(host))).call(op, args, 10):
            if "ok" in body:
                return body.get("result") if body["ok"] else None
    except (NoAgent, OSError, ConnectionError, ValueError):
        return None
    return None


def members(lab: Lab, host: str) -> dict[str, str]:
    return {m["name"]: m["state"] for m in api(lab, host, "members") or []}


def running(lab: Lab, host: str) -> dict[int, tuple[str, str]]:
    rows = api(lab, host, "service.ps", name="web") or []
    return {int(t["slot"]): (t["node"], t["ip"]) for t in rows if t["state"] == "running"}


def dns_ips(lab: Lab, host: str) -> set[str]:
    doc = api(lab, host, "dns.lookup", name="web", network=None, type="A")
    return set(doc["answers"]) if doc else set()


def wait(cond: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise SystemExit(f"bench: timed out waiting for {what}")


def trial(lab: Lab) -> dict[str, float]:
    layout = running(lab, "h1")
    counts: dict[str, int] = {}
    for node, _ip in layout.values():
        counts[node] = counts.get(node, 0) + 1
    victim = max((h for h in HOSTS if h != "h1"), key=lambda h: counts.get(h, 0))
    dead_ips = {ip for node, ip in layout.values() if node == victim}
    survivors = [h for h in HOSTS if h != victim]
    t0 = time.monotonic()
    lab.kill(victim)
    marks: dict[str, float] = {}
    while len(marks) < 3 and time.monotonic() - t0 < 120:
        now = time.monotonic() - t0
        if "detect_s" not in marks:
            states = [members(lab, h) for h in survivors]
            if all(s.get(victim) == "dead" for s in states):
                marks["detect_s"] = now
        if "dns_clean_s" not in marks and not any(dns_ips(lab, h) & dead_ips for h in survivors):
            marks["dns_clean_s"] = now
        if "restored_s" not in marks:
            now_running = running(lab, "h1")
            if len(now_running) == REPLICAS and all(n != victim for n, _ in now_running.values()):
                marks["restored_s"] = now
        time.sleep(0.02)
    lab.start(victim)
    wait(lambda: len(running(lab, "h1")) == REPLICAS and
         all(n != "x" for n, _ in running(lab, "h1").values()), 120, "settle after restart")
    time.sleep(3)
    return marks


def summary(samples: list[dict[str, float]], key: str) -> dict[str, float | None]:
    vals = [s[key] for s in samples if key in s]
    if not vals:
        return {f"{key}_p50": None, f"{key}_max": None}
    return {f"{key}_p50": round(statistics.median(vals), 2), f"{key}_max": round(max(vals), 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--profile", default="lan")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/failover.py needs root (network namespaces)", file=sys.stderr)
        return 1
    lab = Lab(prefix=f"mnf{os.getpid() % 10000}")
    samples = []
    try:
        lab.up(len(HOSTS), profile=args.profile)
        wait(lambda: all(list(members(lab, h).values()).count("alive") == len(HOSTS)
                         for h in HOSTS), 60, "cluster")
        subprocess.run([*lab_ctl(lab, "h1"), "network", "create", "fo"], check=True,
                       capture_output=True)
        wait(lambda: all(api(lab, h, "network.inspect", name="fo") for h in HOSTS), 30, "net")
        # --detach: the wait below allows more than meshctl's 60 s for 10 tasks
        subprocess.run([*lab_ctl(lab, "h1"), "service", "create", "web", "--detach",
                        "--network", "fo", "--replicas", str(REPLICAS), "--", *DEMO],
                       check=True, capture_output=True)
        wait(lambda: len(running(lab, "h1")) == REPLICAS, 120, "10 tasks")
        for _ in range(args.trials):
            samples.append(trial(lab))
    finally:
        lab.down()
    result: dict[str, Any] = {"hosts": len(HOSTS), "replicas": REPLICAS, "trials": len(samples),
                              "profile": args.profile}
    for key in ("detect_s", "restored_s", "dns_clean_s"):
        result.update(summary(samples, key))
    result["samples"] = [{k: round(v, 2) for k, v in s.items()} for s in samples]
    if not args.json:
        for k, v in result.items():
            print(f"{k}: {v}")
    print(json.dumps(result))
    return 0


def lab_ctl(lab: Lab, host: str) -> list[str]:
    return [str(Path(sys.executable).parent / "meshctl"), "--socket", str(lab.socket_path(host))]


if __name__ == "__main__":
    sys.exit(main())
