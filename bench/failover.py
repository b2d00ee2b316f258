"""Failover in the lab: 5 hosts, a service with 10 replicas, kill -9 one host's agent.

    python bench/failover.py [--trials 5] [--profile lan] [--json] [--keep-logs]

Per trial, from the SIGKILL (the phases of the failover budget, each a mark on one clock):
- suspect_s: until the first survivor holds the host suspect (first probe of it, failed);
- first_dead_s: until the first survivor holds it dead (the suspicion timed out somewhere);
- detect_s: until every survivor holds it dead (dissemination of the dead message);
- restored_s: until all 10 tasks run again (on survivors), as h1's replicated task table says;
- dns_clean_s: until no survivor's DNS returns an address of a task that was on the dead host.
The host is restarted between trials and the layout allowed to settle. Default timings (the
`lan` profile: memberlist's LAN values). The summary has p50 and max of each mark, of each
phase between marks (`phases`: probe, suspicion, dissemination, restart), the targets of
issue 17 (restored p50 <= 5 s, max <= 8 s) with a pass flag each, and per trial
`moved_others` (survivors' tasks that placement moved meanwhile). The last line of stdout is
one JSON object.
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


# The slowest control call of the current trial: the marks are only as good as the polling,
# so a trial reports it (a call that stalls holds back every mark behind it).
SLOWEST: dict[str, Any] = {}


def api(lab: Lab, host: str, op: str, **args: Any) -> Any:
    """One control-API call on HOST's agent socket, in-process: a poll of all survivors takes
    milliseconds (spawning meshctl for each took ~1.3 s per round, blurring every mark)."""
    t0 = time.monotonic()
    try:
        for body in Client(str(lab.socket_path(host))).call(op, args, 10):
            if "ok" in body:
                return body.get("result") if body["ok"] else None
    except (NoAgent, OSError, ConnectionError, ValueError):
        return None
    finally:
        took = time.monotonic() - t0
        if took > SLOWEST.get("s", 0.0):
            SLOWEST.update(s=round(took, 2), op=op, host=host)
    return None


def members(lab: Lab, host: str) -> dict[str, str]:
    return {m["name"]: m["state"] for m in api(lab, host, "members") or []}


def running(lab: Lab, host: str) -> dict[int, tuple[str, str]]:
    return running_of(api(lab, host, "service.ps", name="web") or [])


def running_of(rows: list[dict[str, Any]]) -> dict[int, tuple[str, str]]:
    return {int(t["slot"]): (t["node"], t["ip"]) for t in rows if t["state"] == "running"}


def dns_ips(lab: Lab, host: str) -> set[str]:
    # tasks.web: the task addresses whatever the endpoint mode (a vip service's own name
    # answers with its VIP, which never changes on a failover).
    doc = api(lab, host, "dns.lookup", name="tasks.web", network=None, type="A")
    return set(doc["answers"]) if doc else set()


def counters(lab: Lab, host: str) -> dict[str, float]:
    """HOST's numeric store and gossip counters (`status`), flattened: "store.applied", ..."""
    doc = api(lab, host, "status") or {}
    out = {}
    for part in ("store", "gossip"):
        for k, v in (doc.get(part) or {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                out[f"{part}.{k}"] = float(v)
    return out


def grew(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 2) for k, v in sorted(after.items())
            if v != before.get(k, 0.0)}


def wait(cond: Any, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise SystemExit(f"bench: timed out waiting for {what}")


def trial(lab: Lab) -> dict[str, Any]:
    """The marks of one kill, plus ``moved_others``: slots that were NOT on the victim but run
    on another node once restored (placement moving survivors' tasks delays the restore)."""
    layout = running(lab, "h1")
    counts: dict[str, int] = {}
    for node, _ip in layout.values():
        counts[node] = counts.get(node, 0) + 1
    victim = max((h for h in HOSTS if h != "h1"), key=lambda h: counts.get(h, 0))
    dead_ips = {ip for node, ip in layout.values() if node == victim}
    survivors = [h for h in HOSTS if h != victim]
    before = {h: counters(lab, h) for h in survivors}
    t0 = time.monotonic()
    lab.kill(victim)
    SLOWEST.clear()
    marks: dict[str, Any] = {}
    late: dict[str, str] = {}
    while not all(m in marks for m in MARKS) and time.monotonic() - t0 < 120:
        now = time.monotonic() - t0
        if "detect_s" not in marks:
            held = [members(lab, h).get(victim) for h in survivors]
            if "suspect_s" not in marks and any(s in ("suspect", "dead") for s in held):
                marks["suspect_s"] = now
            if "first_dead_s" not in marks and "dead" in held:
                marks["first_dead_s"] = now
            if all(s == "dead" for s in held):
                marks["detect_s"] = now
        if "dns_clean_s" not in marks and not any(dns_ips(lab, h) & dead_ips for h in survivors):
            marks["dns_clean_s"] = now
        if "restored_s" not in marks:
            rows = api(lab, "h1", "service.ps", name="web") or []
            now_running = running_of(rows)
            if len(now_running) == REPLICAS and all(n != victim for n, _ in now_running.values()):
                marks["restored_s"] = now
                marks["moved_others"] = sum(
                    1 for slot, (node, _ip) in layout.items()
                    if node != victim and now_running[slot][0] != node)
                marks["slowest_call"] = dict(SLOWEST)
                if "detect_s" in marks and now - marks["detect_s"] > LATE_RESTART_S:
                    marks["late"] = late  # what h1 said of the slots still missing, last poll
                    # and what h1's and those slots' owners' counters did meanwhile
                    owners = {v.split(":")[0] for v in late.values()} & set(survivors)
                    marks["counters"] = {h: grew(before[h], counters(lab, h))
                                         for h in sorted(owners | {"h1"})}
            else:
                late = {str(r["slot"]): f"{r['node']}:{r['state']}" for r in rows
                        if int(r["slot"]) not in now_running or
                        now_running[int(r["slot"])][0] == victim}
        time.sleep(0.02)
    lab.start(victim)
    wait(lambda: len(running(lab, "h1")) == REPLICAS and
         all(n != "x" for n, _ in running(lab, "h1").values()), 120, "settle after restart")
    time.sleep(3)
    return marks


# A restart phase longer than this reports what h1 last said of the slots still missing.
LATE_RESTART_S = 2.0
MARKS = ("suspect_s", "first_dead_s", "detect_s", "restored_s", "dns_clean_s")
# The failover budget, phase by phase: (name, from mark, to mark); None is the SIGKILL.
PHASES = (
    ("probe_s", None, "suspect_s"),  # until a probe of it fails (wait for a probe + ack window)
    ("suspicion_s", "suspect_s", "first_dead_s"),  # Lifeguard's suspicion timeout
    ("dissemination_s", "first_dead_s", "detect_s"),  # the dead message to every survivor
    ("restart_s", "detect_s", "restored_s"),  # reschedule, start, report running (to h1)
)
# Issue 17's failover targets, on restored_s.
TARGETS = {"restored_s_p50": 5.0, "restored_s_max": 8.0}


def targets(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target beside its measured value, with a pass flag (False when not measured)."""
    out = {}
    for key, bound in TARGETS.items():
        got = result.get(key)
        out[key] = {"target": bound, "measured": got, "pass": got is not None and got <= bound}
    return out


def phases(samples: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """p50 and max of each phase's duration over the trials that have both of its marks."""
    out = {}
    for name, start, end in PHASES:
        spans = [{name: s[end] - (s[start] if start else 0.0)} for s in samples
                 if end in s and (start is None or start in s)]
        got = summary(spans, name)
        out[name] = {"p50": got[f"{name}_p50"], "max": got[f"{name}_max"]}
    return out


def summary(samples: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    vals = [s[key] for s in samples if key in s]
    if not vals:
        return {f"{key}_p50": None, f"{key}_max": None}
    return {f"{key}_p50": round(statistics.median(vals), 2), f"{key}_max": round(max(vals), 2)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--profile", default="lan")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep-logs", action="store_true",
                    help="keep each agent's meshnetd.log after the lab is taken down (to see "
                         "why a trial was slow), e.g. --trials 20 --keep-logs")
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
        lab.down(keep_logs=args.keep_logs)
        if args.keep_logs:
            print(f"bench: agent logs kept in {lab.log_path('h1').parent.parent}/h*/",
                  file=sys.stderr)
    result: dict[str, Any] = {"hosts": len(HOSTS), "replicas": REPLICAS, "trials": len(samples),
                              "profile": args.profile}
    for key in MARKS:
        result.update(summary(samples, key))
    result["phases"] = phases(samples)
    result["targets"] = targets(result)
    result["targets_met"] = all(t["pass"] for t in result["targets"].values())
    result["samples"] = [{k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()}
                         for s in samples]
    if not args.json:
        for k, v in result.items():
            print(f"{k}: {v}")
    print(json.dumps(result))
    return 0


def lab_ctl(lab: Lab, host: str) -> list[str]:
    return [str(Path(sys.executable).parent / "meshctl"), "--socket", str(lab.socket_path(host))]


if __name__ == "__main__":
    sys.exit(main())
