"""Task start latency under containment: `service create` to the task's command running.

    python bench/task_start.py [--hosts 2] [--rounds 20] [--json]

Three phases, each of ROUNDS rounds (variants interleaved round by round, after one warm-up
round each that is reported apart):

- create_to_running: a lab of HOSTS hosts (profile lan-fast) and a network; per round a fresh
  service `--replicas 1 --constraint node.name==h1` whose command is
  `sh -c 'date +%s.%N; exec sleep 1000'`. t0 = time.time() right before `service.create` goes
  to h1's control socket (in-process, as bench/failover.py does); the task's own clock reading,
  polled from its log (<state>/logs/<svc>.1.log) every 3 ms, minus t0 is the latency. Then
  `service rm`, and the next round starts only once the task's processes, cgroup and sandbox
  are gone and `service ps` fails (rm_to_gone_*). Without limits and with
  `--limit-memory 256M --limit-cpu 0.5 --limit-pids 100`.
- run_true: `meshctl run --network NET -- true` round trips (a meshctl subprocess, start to
  exit), without and with the same limits; meshctl_noop_* is `meshctl members` alone (what the
  CLI's own start costs).
- containment: in a network namespace of our own, the launcher run directly the way the agent
  runs it (container.build_plan, `python -I -S launch.py` with the plan on stdin, command
  `true`, no cgroups) against `ip netns exec NS true` (how tasks were started before
  containment) and `nsenter --net=/run/netns/NS true`. Run before the lab comes up, so no agent
  competes for the 2 CPUs. containment_adds_ms = launcher p50 - ip netns exec p50.

p99 is the nearest-rank 99th percentile (with 20 rounds: the slowest). The last line of stdout
with --json is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshnet.cli.meshctl import Client, NoAgent, build_parser, to_request
from meshnet.containment import Containment
from meshnet.lab import Lab, LabError
from meshnet.platform import cgroups, container, netns, nsfd
from meshnet.platform.sandbox import processes_with_env

MESHCTL = str(Path(sys.executable).parent / "meshctl")
NET = "tsb"
HOST = "h1"
LIMITS = ["--limit-memory", "256M", "--limit-cpu", "0.5", "--limit-pids", "100"]
TASK_CMD = ["sh", "-c", "date +%s.%N; exec sleep 1000"]
TARGET_P50_MS = 200
POLL_S = 0.003
START_TIMEOUT_S = 30.0
GONE_TIMEOUT_S = 30.0


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- helpers


def pct(vals: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not vals:
        return None
    if q == 50:
        return statistics.median(vals)
    s = sorted(vals)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def wait(cond: Callable[[], Any], timeout: float, what: str, period: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(period)
    raise BenchError(f"timed out after {timeout:g}s waiting for {what}")


def request(words: list[str]) -> tuple[str, dict[str, Any]]:
    """(op, args) exactly as meshctl would send WORDS."""
    tail: list[str] = []
    if "--" in words:
        cut = words.index("--")
        words, tail = words[:cut], words[cut + 1:]
    ns = build_parser().parse_args(words)
    ns.command = tail
    _, op, args = to_request(ns)
    return op, args


def call(lab: Lab, host: str, op: str, args: dict[str, Any], timeout: float = 30) -> Any:
    """One control-API call on HOST's socket, in-process; BenchError with the agent's words."""
    try:
        for body in Client(str(lab.socket_path(host))).call(op, args, timeout):
            if "ok" in body:
                if not body["ok"]:
                    raise BenchError(f"{op}: {body.get('error', 'failed')}")
                return body.get("result")
    except (NoAgent, OSError, ConnectionError, ValueError) as e:
        raise BenchError(f"{op}: {e}") from e
    raise BenchError(f"{op}: no reply")


def api(lab: Lab, host: str, op: str, **args: Any) -> Any:
    """Like call(), None on any failure (for polling)."""
    try:
        return call(lab, host, op, args, 10)
    except BenchError:
        return None


def starttime(pid: int) -> int | None:
    """The process's start time (ticks since boot), None if gone: tells a reused pid apart."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
        return int(data[data.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def parent_pid(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    return None


def is_launcher(pid: int) -> bool:
    try:
        return str(container.LAUNCHER).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})"


def timed(argv: list[str], stdin: bytes | None = None, **kw: Any) -> float:
    t = time.perf_counter()
    r = subprocess.run(argv, input=stdin, capture_output=True, check=False, **kw)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise BenchError(f"{' '.join(argv[:6])}: exit {r.returncode}: "
                         f"{(r.stderr or r.stdout).decode(errors='replace').strip()}")
    return dt


# ---------------------------------------------------------------- phase 1: the launcher itself


def measure_containment(prefix: str, rounds: int) -> dict[str, list[float]]:
    ns = f"{prefix}-launch"
    tools = container.find_tools()
    hostname = "taskbench"
    plan = container.build_plan(
        netns_path=str(nsfd.netns_path(ns)), hostname=hostname, etc_files={},
        containment=Containment(), hidden=container.hidden_paths([], []),
        env=container.task_env({"MESHNET_TASK": "taskbench"}, {}, hostname, "/root"),
        argv=["true"], cgroup_procs=[], tools=tools, user=None)
    stdin = container.encode_plan(plan)
    variants: dict[str, tuple[list[str], bytes | None, dict[str, Any]]] = {
        # as container.spawn starts it
        "launcher": ([tools.python, "-I", "-S", str(container.LAUNCHER)], stdin,
                     {"start_new_session": True, "env": {"PATH": container.TASK_PATH}}),
        "ip_netns_exec": (netns.exec_argv(ns, ["true"]), None, {}),
        "nsenter": (["nsenter", f"--net={nsfd.netns_path(ns)}", "true"], None, {}),
    }
    out: dict[str, list[float]] = {k: [] for k in variants}
    netns.add(ns)
    try:
        for i in range(rounds + 1):
            for key, (argv, data, kw) in variants.items():
                dt = timed(argv, data, **kw)
                if i:  # round 0 warms the page cache
                    out[key].append(dt)
    finally:
        netns.delete(ns)
    return out


# ---------------------------------------------------------------- phase 2: the lab


class TaskBench:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.logs = lab.host_dir(HOST) / "state" / "logs"
        self.cg_parents: list[Path] = []
        self.seq = 0
        self.limits_seen: list[Any] | None = None

    def setup(self, hosts: int) -> None:
        lab = self.lab
        names = [f"h{i}" for i in range(1, hosts + 1)]
        lab.up(hosts, profile="lan-fast")

        def converged() -> bool:
            for h in names:
                members = api(lab, h, "members") or []
                if sum(1 for m in members if m.get("state") == "alive") != hosts:
                    return False
            return True

        wait(converged, 60, "membership convergence")
        call(lab, HOST, *request(["network", "create", NET]))
        wait(lambda: all(api(lab, h, "network.inspect", name=NET) for h in names), 30,
             f"network {NET} on every host")
        parent = f"meshnet-{lab.sandbox_prefix}-{HOST}"
        self.cg_parents = [p for p in cgroups.find_parents(lab.cgroup_prefix) if p.name == parent]

    def fail(self, what: str, task: str | None = None) -> BenchError:
        """WHAT, with the task's log (if any) and the tail of the agent's log."""
        text = what
        if task is not None:
            path = self.logs / f"{task}.log"
            text += f"\n--- task log {path}:\n{log_tail(path)}"
        path = self.lab.log_path(HOST)
        return BenchError(f"{text}\n--- agent log {path}:\n{log_tail(path)}")

    def task_cgroups(self, task: str) -> list[Path]:
        return [d for p in self.cg_parents for d in p.glob(f"{task}-*") if d.is_dir()]

    def create_round(self, limits: bool) -> dict[str, float]:
        """One service: create -> its command's clock reading; rm -> everything gone."""
        self.seq += 1
        svc = f"tsb{self.seq}{'l' if limits else 'n'}"
        task = f"{svc}.1"
        logf = self.logs / f"{task}.log"
        op, args = request(["service", "create", svc, "--network", NET, "--replicas", "1",
                            "--constraint", f"node.name=={HOST}", *(LIMITS if limits else []),
                            "--", *TASK_CMD])
        t0 = time.time()
        call(self.lab, HOST, op, args)
        deadline = time.monotonic() + START_TIMEOUT_S
        printed = None
        while printed is None:
            with contextlib.suppress(OSError):
                line = logf.read_bytes().split(b"\n", 1)
                if len(line) == 2:  # a whole first line
                    try:
                        # "<timestamp> stdout <clock>" (task logs are timestamped, #16)
                        printed = float(line[0].rsplit(b" ", 1)[-1])
                    except ValueError:
                        raise self.fail(f"task {task} printed {line[0]!r}, not a time",
                                        task) from None
            if printed is None:
                if time.monotonic() > deadline:
                    raise self.fail(f"task {task} did not print within {START_TIMEOUT_S:g}s",
                                    task)
                time.sleep(POLL_S)
        latency = printed - t0
        # What runs now: the task's processes (in its cgroup: tini and the command; outside
        # it, their parent: the launcher), its cgroup and its sandbox. (`ip netns pids` sees
        # nothing from here: the sandbox's name is bound in the agent's mount namespace.)
        cgs = self.task_cgroups(task)
        sandbox_ns = f"{self.lab.sandbox_prefix}-{HOST}-{task}"
        pids: set[int] = set()
        for d in cgs:
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        pids.update(processes_with_env(f"MESHNET_TASK={task}"))  # setpriv gave tini the env
        pids |= {pp for pp in map(parent_pid, pids) if pp and is_launcher(pp)}
        if not pids:
            raise self.fail(f"task {task} printed, but none of its processes can be found", task)
        procs = [(p, starttime(p)) for p in pids]
        limits_seen = None
        if limits:
            doc = call(self.lab, HOST, "service.inspect", {"name": svc})
            limits_seen = [t.get("limits") for t in doc.get("tasks", [])]
        t1 = time.monotonic()
        call(self.lab, HOST, "service.rm", {"name": svc})

        def gone() -> bool:
            return (not any(st is not None and starttime(p) == st for p, st in procs)
                    and not any(d.exists() for d in cgs)
                    and not netns.exists(sandbox_ns)
                    and api(self.lab, HOST, "service.ps", name=svc) is None)

        try:
            wait(gone, GONE_TIMEOUT_S, f"service {svc} to be gone", period=0.005)
        except BenchError as e:
            raise self.fail(str(e), task) from None
        if limits_seen is not None:
            self.limits_seen = limits_seen
        return {"latency": latency, "rm_to_gone": time.monotonic() - t1,
                "task_pids": float(len(pids)), "task_cgroups": float(len(cgs))}

    def run_round(self, limits: bool) -> float:
        argv = [MESHCTL, "--socket", str(self.lab.socket_path(HOST)), "run", "--network", NET,
                *(LIMITS if limits else []), "--", "true"]
        try:
            return timed(argv)
        except BenchError as e:
            raise self.fail(str(e)) from None

    def noop_round(self) -> float:
        return timed([MESHCTL, "--socket", str(self.lab.socket_path(HOST)), "members"])


def measure_lab(prefix: str, hosts: int, rounds: int) -> dict[str, Any]:
    lab = Lab(prefix=prefix)
    bench = TaskBench(lab)
    res: dict[str, Any] = {"create": {False: [], True: []}, "gone": {False: [], True: []},
                           "first": {}, "run": {False: [], True: []}, "noop": []}
    try:
        bench.setup(hosts)
        for i in range(rounds + 1):
            for limits in (False, True):
                r = bench.create_round(limits)
                if i == 0:
                    res["first"][limits] = r["latency"]
                    res["task_pids"] = r["task_pids"]
                    res["task_cgroups"] = r["task_cgroups"]
                    continue
                res["create"][limits].append(r["latency"])
                res["gone"][limits].append(r["rm_to_gone"])
        res["limits_seen"] = bench.limits_seen
        for i in range(rounds + 1):
            for limits in (False, True):
                dt = bench.run_round(limits)
                if i:
                    res["run"][limits].append(dt)
            dt = bench.noop_round()
            if i:
                res["noop"].append(dt)
    finally:
        lab.down()
    return res


# ---------------------------------------------------------------- main


def interrupted(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/task_start.py needs root (namespaces, cgroups)", file=sys.stderr)
        return 1
    if args.hosts < 1 or args.rounds < 1:
        print("bench/task_start.py: --hosts and --rounds must be at least 1", file=sys.stderr)
        return 2
    prefix = f"mnbt{os.getpid() % 10000:04d}"
    started = time.monotonic()
    signal.signal(signal.SIGTERM, interrupted)  # clean up on SIGTERM as on Ctrl-C
    try:
        cont = measure_containment(prefix, args.rounds)
        labr = measure_lab(prefix, args.hosts, args.rounds)
    except (BenchError, LabError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted (lab and namespace removed)", file=sys.stderr)
        return 130
    launcher, ipne, nse = (statistics.median(cont[k])
                           for k in ("launcher", "ip_netns_exec", "nsenter"))
    c, g, r = labr["create"], labr["gone"], labr["run"]
    result: dict[str, Any] = {
        "create_to_running_p50_ms": ms(pct(c[False], 50)),
        "create_to_running_p99_ms": ms(pct(c[False], 99)),
        "create_to_running_limits_p50_ms": ms(pct(c[True], 50)),
        "create_to_running_limits_p99_ms": ms(pct(c[True], 99)),
        "create_to_running_first_ms": ms(labr["first"].get(False)),
        "create_to_running_limits_first_ms": ms(labr["first"].get(True)),
        "rm_to_gone_p50_ms": ms(pct(g[False], 50)),
        "rm_to_gone_limits_p50_ms": ms(pct(g[True], 50)),
        "run_true_p50_ms": ms(pct(r[False], 50)),
        "run_true_p99_ms": ms(pct(r[False], 99)),
        "run_true_limits_p50_ms": ms(pct(r[True], 50)),
        "run_true_limits_p99_ms": ms(pct(r[True], 99)),
        "meshctl_noop_p50_ms": ms(pct(labr["noop"], 50)),
        "launcher_p50_ms": ms(launcher),
        "launcher_p99_ms": ms(pct(cont["launcher"], 99)),
        "ip_netns_exec_p50_ms": ms(ipne),
        "nsenter_p50_ms": ms(nse),
        "containment_adds_ms": ms(launcher - ipne),
        "target_p50_ms": TARGET_P50_MS,
        "rounds": args.rounds,
        "hosts": args.hosts,
        "task_pids_watched": int(labr.get("task_pids", 0)),
        "task_cgroup_dirs": int(labr.get("task_cgroups", 0)),
        "limits_reported": labr.get("limits_seen"),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "samples_ms": {"create": [ms(x) for x in c[False]],
                       "create_limits": [ms(x) for x in c[True]]},
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    rows = [
        ("service create -> command running", c[False], True),
        ("  ... with limits", c[True], True),
        ("service rm -> task gone", g[False], False),
        ("  ... with limits", g[True], False),
        ("meshctl run -- true (round trip)", r[False], False),
        ("  ... with limits", r[True], False),
        ("meshctl members (CLI start cost)", labr["noop"], False),
        ("launcher, command true (no cgroup)", cont["launcher"], False),
        ("ip netns exec NS true", cont["ip_netns_exec"], False),
        ("nsenter --net NS true", cont["nsenter"], False),
    ]
    print(f"task start, {args.hosts} hosts, {args.rounds} rounds, {cpu_model()} "
          f"x{os.cpu_count()}")
    print(f"{'':38} {'p50 ms':>8} {'p99 ms':>8} {'min ms':>8}")
    for label, vals, target in rows:
        line = (f"{label:38} {ms(pct(vals, 50)):>8} {ms(pct(vals, 99)):>8} "
                f"{ms(min(vals)):>8}")
        if target:
            line += f"   (target p50 {TARGET_P50_MS})"
        print(line)
    print(f"first round (cold): create -> running {result['create_to_running_first_ms']} ms, "
          f"with limits {result['create_to_running_limits_first_ms']} ms")
    print(f"containment adds (launcher - ip netns exec, p50): {result['containment_adds_ms']} ms")
    print(f"elapsed {result['elapsed_s']} s")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
