"""`make lab`: the Docker-style walkthrough on hosts made of network namespaces.

Each step prints the Docker command it stands for, runs the meshnet equivalent on the lab's
hosts, and checks the outcome; any failed step makes the whole run exit non-zero. The lab is
always torn down at the end, pass or fail.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshnet.lab.demo_http import TASK_ARGV as DEMO
from meshnet.lab.demo_http import TASK_MOUNT
from meshnet.lab.lab import METRICS_PORT, Lab, LabError
from meshnet.lab.scrape import http_get, sample_values

# lan-fast timings keep the walkthrough short; the LAN defaults are for real hosts.
PROFILE = "lan-fast"
CONVERGE_TIMEOUT_S = 30.0
MESHCTL = str(Path(sys.executable).parent / "meshctl")


class StepFailed(Exception):
    pass


def say(text: str) -> None:
    print(text, flush=True)


def step(n: int, docker: str, meshnet: str) -> None:
    say(f"\n== step {n}: {docker}")
    say(f"   meshnet: {meshnet}")


def wait_until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = cond()
        if result:
            return result
        time.sleep(0.2)
    raise StepFailed(f"timed out after {timeout:.0f}s waiting for {what}")


def ctl_json(lab: Lab, host: str, *args: str) -> Any:
    r = lab.ctl(host, ["--json", *args], capture_output=True, timeout=30)
    if r.returncode != 0:
        raise StepFailed(f"meshctl {' '.join(args)} on {host}: {r.stderr.strip()}")
    return json.loads(r.stdout)


# Above meshctl's own 60 s wait in `service create|scale|rm`, whose reason is the better error.
SHOW_TIMEOUT_S = 90.0


def show(lab: Lab, host: str, *args: str) -> None:
    """Run meshctl ARGS on HOST with its output straight on ours, as the user would see it
    (`service create|scale|rm` show their progress live until the tasks run or are gone)."""
    say(f"\n[{host}] $ meshctl {' '.join(args)}")
    r = lab.ctl(host, list(args), timeout=SHOW_TIMEOUT_S)
    if r.returncode != 0:
        raise StepFailed(f"meshctl {' '.join(args)} on {host} exited {r.returncode}")


def background(lab: Lab, host: str, *args: str) -> subprocess.Popen[bytes]:
    """A long-running meshctl (e.g. `run` of a server) whose output goes to the lab's log."""
    log = open(lab.host_dir(host) / "walkthrough.log", "ab")  # noqa: SIM115 (lives with proc)
    return subprocess.Popen([MESHCTL, "--socket", str(lab.socket_path(host)), *args],
                            stdout=log, stderr=log)


def endpoint(lab: Lab, host: str, network: str, name: str) -> str | None:
    r = lab.ctl(host, ["--json", "network", "inspect", network], capture_output=True,
                timeout=20)
    if r.returncode != 0:
        return None
    return next((str(e["ip"]) for e in json.loads(r.stdout)["endpoints"] if e["name"] == name),
                None)


def wait_running(lab: Lab, hosts: list[str], want: dict[str, int]) -> None:
    def ok() -> bool:
        for svc, n in want.items():
            rows = ctl_json(lab, hosts[0], "service", "ps", svc)
            if sum(1 for t in rows if t["state"] == "running") != n:
                return False
        return True

    wait_until(ok, 60, f"tasks running ({want})")


def show_metrics(lab: Lab, host: str, hosts: int) -> None:
    """`curl http://<host>:9946/metrics | head` and its /health, run inside the lab (the
    underlay is reachable only there); checks the members gauge and the health answer."""
    ip, port = lab.metrics_addr(host)
    url = f"http://{ip}:{port}"
    for shown, path in ((f"curl -s {url}/metrics | head -n 24", "/metrics"),
                        (f"curl -s -i {url}/health", "/health")):
        say(f"\n[{host}] $ {shown}")
        if shutil.which("curl"):
            r = lab.exec(host, ["sh", "-c", shown], capture_output=True, timeout=20)
            say(r.stdout.rstrip())
        else:  # deploy/bootstrap.sh installs curl; a host without it still gets the text
            reply = http_get(lab.host_ns(host), (ip, port), path)
            say("\n".join(reply.body.splitlines()[:24]) if path == "/metrics" else
                f"HTTP/1.1 {reply.status}\n\n{reply.body.rstrip()}")
    metrics = http_get(lab.host_ns(host), (ip, port), "/metrics")
    alive = sample_values(metrics.body, "meshnet_members").get('{state="alive"}')
    if metrics.status != 200 or alive != hosts:
        raise StepFailed(f"/metrics on {host}: status {metrics.status}, "
                         f"meshnet_members{{state=\"alive\"}} {alive} (want {hosts})")
    health = http_get(lab.host_ns(host), (ip, port), "/health")
    if health.status != 200:
        raise StepFailed(f"/health on {host}: {health.status} {health.body.strip()}")


# Lines of the `meshctl events` capture shown (a kill and a restart: a handful).
EVENTS_EXCERPT_LINES = 40


def show_events_while_restarting(lab: Lab, names: list[str]) -> None:
    """`meshctl events` on the first host, in the background, while the last host's agent is
    SIGKILLed and started again; prints what it captured, which must show that host die and
    come back. (Run once the services are gone: a host restarted under running services can
    leave address claims that keep `network rm` refused; reported with #16.)"""
    watcher, victim = names[0], names[-1]
    capture = lab.host_dir(watcher) / "events.log"
    with open(capture, "wb") as out:
        proc = subprocess.Popen([MESHCTL, "--socket", str(lab.socket_path(watcher)), "events"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: ctl_json(lab, watcher, "status").get("events", {})
                   .get("subscribers"), 10, "meshctl events to subscribe")
        lab.kill(victim)
        wait_until(lambda: f" member {victim} dead " in capture.read_text(), 30,
                   f"{victim} dead in the events")
        lab.start(victim)
        wait_until(lambda: all_alive(lab, names), CONVERGE_TIMEOUT_S, f"{victim} back")
        wait_until(lambda: back_after_dead(capture.read_text(), victim), 10,
                   f"{victim} back in the events")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    lines = capture.read_text().splitlines()
    say(f"\n[{watcher}] $ meshctl events   # ran while {victim} was killed and restarted")
    say("\n".join(lines[:EVENTS_EXCERPT_LINES]))
    if len(lines) > EVENTS_EXCERPT_LINES:
        say(f"... ({len(lines) - EVENTS_EXCERPT_LINES} more lines)")


def back_after_dead(text: str, host: str) -> bool:
    """Events TEXT shows HOST dead, then alive again (a rejoin, or a refuted suspicion)."""
    dead = text.find(f" member {host} dead ")
    return dead >= 0 and re.search(rf" member {re.escape(host)} (join|alive) ",
                                   text[dead:]) is not None


def all_alive(lab: Lab, hosts: list[str]) -> bool:
    for h in hosts:
        members = {m["name"]: m["state"] for m in ctl_json(lab, h, "members")}
        if any(members.get(other) != "alive" for other in hosts):
            return False
    return True


def run(hosts: int) -> None:
    lab = Lab()
    names = [f"h{i}" for i in range(1, hosts + 1)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        step(1, "docker swarm init / docker swarm join (on every host)",
             f"meshnet-lab up --hosts {hosts}: each host runs meshnetd, joining h1")
        lab.up(hosts, profile=PROFILE)
        for s in lab.status():
            say(f"   {s.name}: underlay {s.underlay_ip}, agent pid {s.pid}, socket {s.socket}")
        for h in names:
            show(lab, h, "status")

        step(2, "docker node ls", "meshctl members (every host sees every other, alive)")
        wait_until(lambda: all_alive(lab, names), CONVERGE_TIMEOUT_S, "all hosts to see all")
        show(lab, names[0], "members")

        step(3, "docker network create -d overlay --attachable appnet",
             "meshctl network create appnet (VNI by hash, subnet from the default pool)")
        show(lab, names[0], "network", "create", "appnet")
        wait_until(lambda: all(lab.ctl(h, ["network", "inspect", "appnet"], capture_output=True,
                                       timeout=20).returncode == 0 for h in names),
                   CONVERGE_TIMEOUT_S, "appnet on every host")
        show(lab, names[-1], "network", "ls")

        step(4, "docker service create --name backend --network appnet --replicas 2 "
                "--limit-memory 128M web",
             "meshctl service create backend --network appnet --replicas 2 --limit-memory 128M "
             "-- demo HTTP server (contained: own namespaces, Docker's capabilities, a cgroup)")
        show(lab, names[0], "service", "create", "backend", "--network", "appnet",
             "--replicas", "2", "--limit-memory", "128M", "--limit-pids", "200", *TASK_MOUNT,
             "--", *DEMO, "serve")

        step(5, "docker service create --name frontend --network appnet --replicas 3 front",
             "meshctl service create frontend ... -- demo frontend calling http://backend:8080/")
        show(lab, names[1], "service", "create", "frontend", "--network", "appnet",
             "--replicas", "3", *TASK_MOUNT, "--", *DEMO, "front", "--backend",
             "http://backend:8080/")
        wait_running(lab, names, {"backend": 2, "frontend": 3})
        show(lab, names[2], "service", "ls")
        show(lab, names[0], "service", "ps", "backend")
        show(lab, names[0], "service", "ps", "frontend")
        show(lab, names[0], "service", "inspect", "backend")

        step(6, "docker service scale backend=3 frontend=4",
             "meshctl service scale backend=3 frontend=4 (placement by hashing, no leader)")
        show(lab, names[2], "service", "scale", "backend=3", "frontend=4")
        wait_running(lab, names, {"backend": 3, "frontend": 4})
        show(lab, names[0], "service", "ps", "frontend")

        step(7, "docker network inspect appnet", "meshctl network inspect appnet")
        show(lab, names[0], "network", "inspect", "appnet")
        doc = ctl_json(lab, names[0], "network", "inspect", "appnet")
        hosts_used = {e["node"] for e in doc["endpoints"]}
        if len(hosts_used) < 2:
            raise StepFailed(f"tasks are not spread across hosts: {sorted(hosts_used)}")

        step(8, "docker run --rm --network appnet probe curl http://frontend:8080  (x6)",
             "meshctl run --network appnet -- GET http://frontend:8080/ (answers across hosts)")
        script = "; ".join([" ".join([*DEMO, "get", "http://frontend:8080/"])] * 6)
        r = lab.ctl(names[0], ["run", "--network", "appnet", "--name", "probe", *TASK_MOUNT,
                               "--", "sh", "-c", script], capture_output=True, timeout=120)
        say(f"\n[{names[0]}] $ meshctl run --network appnet -- GET http://frontend:8080/ (x6)")
        say((r.stdout + r.stderr).rstrip())
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("frontend.")]
        if r.returncode != 0 or len(lines) != 6 or any(" -> backend." not in ln for ln in lines):
            raise StepFailed("the probe could not reach frontend, or frontend not backend")
        served_by = {ln.split(" on ")[1].split(" ->")[0] for ln in lines}
        say(f"   answered by frontends on {', '.join(sorted(served_by))}")
        if len(served_by) < 2:
            raise StepFailed("every answer came from one host: the VIP did not spread calls")
        say("\n   frontend and backend run in endpoint mode vip (Docker's default): a name is one "
            "virtual IP, which each sandbox's kernel balances over the tasks; tasks.NAME lists "
            "them")
        show(lab, names[0], "dns", "lookup", "backend", "--network", "appnet")
        show(lab, names[0], "dns", "lookup", "tasks.backend", "--network", "appnet")

        say("\n== metrics: dockerd --metrics-addr, then curl http://<host>:9323/metrics")
        say(f"   meshnet: meshnetd --metrics-listen IP:{METRICS_PORT} (on for every lab host): "
            "Prometheus text at /metrics, 200/503 at /health")
        show_metrics(lab, names[0], hosts)

        step(9, "docker service rm frontend backend; docker network rm appnet",
             "meshctl service rm ...; meshctl network rm appnet")
        show(lab, names[0], "service", "rm", "frontend")
        show(lab, names[0], "service", "rm", "backend")
        wait_until(lambda: not ctl_json(lab, names[0], "network", "inspect", "appnet")[
            "endpoints"], CONVERGE_TIMEOUT_S, "every task to stop")
        # A task that was still starting somewhere (its address claimed, not yet published)
        # holds the network until its agent has torn it down, as a container does in Docker.
        wait_until(lambda: lab.ctl(names[0], ["network", "rm", "appnet"], capture_output=True,
                                   timeout=20).returncode == 0,
                   CONVERGE_TIMEOUT_S, "appnet to be free of tasks")
        say(f"\n[{names[0]}] $ meshctl network rm appnet\nremoved: appnet")

        say("\n== events: docker events, while a host is killed and started again")
        say(f"   meshnet: meshctl events on {names[0]}; meshnet-lab kill {names[-1]}, then "
            f"meshnet-lab start {names[-1]}")
        show_events_while_restarting(lab, names)
        say("\nlab: every step passed")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        say("\n== clean up: meshnet-lab down")
        lab.down()
        say("   removed every namespace, link and process the lab made")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="meshnet-lab-walkthrough")
    p.add_argument("--hosts", type=int, default=3)
    ns = p.parse_args(argv)
    if os.geteuid() != 0:
        print("make lab: needs root (network namespaces)", file=sys.stderr)
        return 1
    try:
        run(ns.hosts)
    except (StepFailed, LabError) as e:
        print(f"\nlab FAILED: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
