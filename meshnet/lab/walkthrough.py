"""`make lab`: the Docker-style walkthrough on hosts made of network namespaces.

Each step prints the Docker command it stands for, runs the meshnet equivalent on the lab's
hosts, and checks the outcome; any failed step makes the whole run exit non-zero. The lab is
always torn down at the end, pass or fail.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshnet.lab.lab import Lab, LabError

# lan-fast timings keep the walkthrough short; the LAN defaults are for real hosts.
PROFILE = "lan-fast"
CONVERGE_TIMEOUT_S = 30.0
MESHCTL = str(Path(sys.executable).parent / "meshctl")
# The demo workloads run with this interpreter inside the sandboxes.
DEMO = [sys.executable, "-m", "meshnet.lab.demo_http"]


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


def show(lab: Lab, host: str, *args: str) -> None:
    r = lab.ctl(host, list(args), capture_output=True, timeout=30)
    say(f"\n[{host}] $ meshctl {' '.join(args)}")
    say((r.stdout or r.stderr).rstrip())
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

        last = names[-1]
        step(4, f"docker run -d --network appnet --name backend web-server   (on {last})",
             f"meshctl run --network appnet --name backend -- demo HTTP server   (on {last})")
        procs.append(background(lab, last, "run", "--network", "appnet", "--name", "backend",
                                "--", *DEMO, "serve", "--name", "backend"))
        wait_until(lambda: endpoint(lab, names[0], "appnet", "backend"), CONVERGE_TIMEOUT_S,
                   "backend's endpoint to reach h1")

        step(5, "docker network inspect appnet", "meshctl network inspect appnet")
        show(lab, names[0], "network", "inspect", "appnet")

        step(6, "docker run --network appnet client curl http://backend:8080   (on h1)",
             "meshctl run --network appnet -- GET http://backend:8080   (on h1, across hosts)")
        r = lab.ctl(names[0], ["run", "--network", "appnet", "--name", "client", "--", *DEMO,
                               "get", "http://backend:8080/"], capture_output=True, timeout=60)
        say(f"\n[{names[0]}] $ meshctl run --network appnet -- GET http://backend:8080/")
        say((r.stdout + r.stderr).rstrip())
        if r.returncode != 0 or f"backend on {last}" not in r.stdout:
            raise StepFailed("the client on h1 could not reach backend by name")
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
