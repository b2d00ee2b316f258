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
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshnet.cli.meshctl import Client, render
from meshnet.lab.demo_http import TASK_ARGV as DEMO
from meshnet.lab.demo_http import TASK_MOUNT
from meshnet.lab.lab import BRIDGE, METRICS_PORT, UNDERLAY_NET, Lab, LabError
from meshnet.lab.scrape import http_get, sample_values
from meshnet.platform import netns

# lan-fast timings keep the walkthrough short; the LAN defaults are for real hosts.
PROFILE = "lan-fast"
CONVERGE_TIMEOUT_S = 30.0
MESHCTL = str(Path(sys.executable).parent / "meshctl")
NET = "appnet"
# The frontend's published port (the demo servers listen on 8080).
PUBLISHED = 8080
# "A laptop on the hosts' LAN": an underlay address no host has (hosts are .1..N), on the lab's
# switch, so the published port is reached from outside every host, as a user would.
CLIENT_IP = str(UNDERLAY_NET.network_address + 250)
# A directory of the walkthrough's, bound read-only into the backend's tasks at MARKS: a file
# sick-<task> there makes that task's health check fail (a task's /tmp is its own).
MARKS = "/run/lab-marks"
# Docker's `--health-cmd` (run by /bin/sh inside the task): the server answers, and the task
# is not marked sick. A probe a second, two failures in a row make it unhealthy.
HEALTH_CMD = f"curl -fso /dev/null http://127.0.0.1:8080/ && test ! -e {MARKS}/sick-$MESHNET_TASK"
HEALTH_FLAGS = ["--health-cmd", HEALTH_CMD, "--health-interval", "1s", "--health-retries", "2"]
# The steady probe during the rolling update: this many requests a second through frontend.
LOAD_RATE = 10
# GET http://frontend:8080/ LOAD_RATE times a second by name (argv[1]), a new connection and
# lookup each; one line per request, "ok <answer>" or "ERR <why>".
LOAD = """
import socket, sys, time, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
rate, due = float(sys.argv[1]), time.monotonic()
while True:
    try:
        ip = socket.gethostbyname("frontend")
        with opener.open(f"http://{ip}:8080/", timeout=5) as r:
            print("ok", r.read().decode().strip(), flush=True)
    except Exception as e:
        print("ERR", repr(e)[:200], flush=True)
    due += 1 / rate
    time.sleep(max(0.0, due - time.monotonic()))
"""
# What the frontend answers when it reached a backend ("frontend.2 on h3 -> backend.1 on h1
# v2"); a frontend that could not reach one says "-> backend error: ...".
FRONT_ANSWER = re.compile(r"(frontend\.\d+) on (\S+) -> (backend\.\d+) on (\S+)(?: v(\d+))?")


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
    say(f"\n[{host}] $ meshctl {shlex.join(args)}")
    r = lab.ctl(host, list(args), timeout=SHOW_TIMEOUT_S)
    if r.returncode != 0:
        raise StepFailed(f"meshctl {' '.join(args)} on {host} exited {r.returncode}")


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
        stop_proc(proc)
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


def call(lab: Lab, host: str, op: str, args: dict[str, Any]) -> Any:
    """One request straight on HOST's control socket: polls fast enough to see a state that
    lasts a second (a task unhealthy until its restart), which a meshctl process per look may
    miss."""
    for frame in Client(str(lab.socket_path(host))).call(op, args, 10):
        if "ok" in frame:
            if not frame["ok"]:
                raise StepFailed(f"{op} on {host}: {frame.get('error')}")
            return frame.get("result")
    raise StepFailed(f"{op} on {host}: no reply")


def ps(lab: Lab, host: str, service: str) -> list[dict[str, Any]]:
    return list(call(lab, host, "service.ps", {"name": service}))


def ready(task: dict[str, Any]) -> bool:
    """Running, and past its health check if it has one: what gets traffic."""
    return task["state"] == "running" and task.get("health") in (None, "healthy")


def wait_ready(lab: Lab, hosts: list[str], want: dict[str, int]) -> None:
    wait_until(lambda: all(sum(map(ready, ps(lab, hosts[0], svc))) == n
                           for svc, n in want.items()),
               60, f"tasks running and healthy ({want})")


def tasks_dns(lab: Lab, host: str, service: str) -> set[str]:
    return set(call(lab, host, "dns.lookup", {"name": f"tasks.{service}", "network": NET,
                                              "type": "A"})["answers"])


def placements(lab: Lab, host: str, services: list[str]) -> dict[str, tuple[str, str]]:
    """task -> (node, address) of every running task of SERVICES."""
    return {t["task"]: (t["node"], t["ip"]) for svc in services for t in ps(lab, host, svc)
            if t["state"] == "running"}


def check_spread(lab: Lab, hosts: list[str], services: list[str]) -> None:
    """Docker's spread: no host runs two tasks of a service while another host (every lab host
    is eligible here: no constraints) runs none of it."""
    for svc in services:
        per_host = Counter(t["node"] for t in ps(lab, hosts[0], svc) if t["state"] == "running")
        say(f"   {svc} tasks per host: " + ", ".join(f"{h} {per_host[h]}" for h in hosts))
        idle = [h for h in hosts if not per_host[h]]
        crowded = [h for h in hosts if per_host[h] >= 2]
        if idle and crowded:
            raise StepFailed(f"{svc} is not spread: {', '.join(crowded)} run two or more while "
                             f"{', '.join(idle)} run none")


def scale_keeps_running_tasks(lab: Lab, hosts: list[str]) -> None:
    services = ["backend", "frontend"]
    before = placements(lab, hosts[0], services)
    show(lab, hosts[2], "service", "scale", "backend=3", "frontend=4")
    wait_ready(lab, hosts, {"backend": 3, "frontend": 4})
    show(lab, hosts[0], "service", "ps", "frontend")
    after = placements(lab, hosts[0], services)
    moved = [f"{t} {node} {ip} -> {' '.join(after[t]) if t in after else 'gone'}"
             for t, (node, ip) in sorted(before.items()) if after.get(t) != (node, ip)]
    if moved:
        raise StepFailed(f"scaling up moved running tasks: {'; '.join(moved)}")
    kept = ", ".join(f"{t} on {node}" for t, (node, _) in sorted(before.items()))
    say(f"\n   no running task moved: {kept} kept their host and address")
    check_spread(lab, hosts, services)


def answer(lab: Lab, host_ip: str) -> str | None:
    """The body GET http://HOST_IP:PUBLISHED/ gets from the laptop on the underlay; None if
    nothing answers (the port's rules not there yet)."""
    try:
        return http_get(lab.underlay_ns, (host_ip, PUBLISHED), "/", timeout=5).body.strip()
    except OSError:
        return None


def published_on_every_host(lab: Lab, hosts: list[str]) -> None:
    """The routing mesh: the frontend's published port answers on every host's underlay
    address, from a client on the hosts' LAN, including a host that runs no frontend task."""
    netns.ip("addr", "add", f"{CLIENT_IP}/{UNDERLAY_NET.prefixlen}", "dev", BRIDGE,
             ns=lab.underlay_ns)  # the laptop; gone with the underlay namespace
    with_task = {t["node"] for t in ps(lab, hosts[0], "frontend") if ready(t)}
    idle = [h for h in hosts if h not in with_task]
    say(f"   frontend tasks run on {', '.join(sorted(with_task))}"
        + (f"; {', '.join(idle)} runs none" if idle else ""))
    for h in hosts:
        ip = lab.underlay_ip(h)
        note = "   # no frontend task on this host" if h in idle else ""
        say(f"\n[laptop {CLIENT_IP}] $ curl -s http://{ip}:{PUBLISHED}/   # {h}{note}")
        for _ in range(2):
            body = wait_until(lambda: answer(lab, ip), 20,  # noqa: B023 (called at once)
                              f"{h}'s address {ip}:{PUBLISHED} to answer")
            say(body)
            if not FRONT_ANSWER.fullmatch(body):
                raise StepFailed(f"{h}'s published port answered {body!r}, not a frontend "
                                 "that reached a backend")


class Load:
    """A steady probe: a sandbox on HOST running LOAD, its lines collected as they come."""

    def __init__(self, lab: Lab, host: str, rate: int) -> None:
        with open(lab.host_dir(host) / "walkthrough.log", "ab") as log:  # the child has a copy
            self.proc = subprocess.Popen(
                [MESHCTL, "--socket", str(lab.socket_path(host)), "run", "--network", NET,
                 "--name", "load", "--", "python3", "-c", LOAD, str(rate)],
                stdout=subprocess.PIPE, stderr=log, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def stop(self) -> list[str]:
        """Ends the probe (meshctl run's end stops its sandbox); every line it printed."""
        stop_proc(self.proc)
        self.reader.join(10)
        return list(self.lines)


def stop_proc(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def versions_over_time(lines: list[str], per_second: int) -> str:
    """The backend versions that answered, second by second, runs merged:
    "v1 (4 s) -> v1+v2 (12 s) -> v2 (3 s)"."""
    runs: list[list[Any]] = []
    for i in range(0, len(lines), per_second):
        seen = sorted({m.group(5) or "1" for ln in lines[i:i + per_second]
                       if (m := FRONT_ANSWER.search(ln))})
        label = "+".join(f"v{v}" for v in seen) or "none"
        if runs and runs[-1][0] == label:
            runs[-1][1] += 1
        else:
            runs.append([label, 1])
    return " -> ".join(f"{label} ({n} s)" for label, n in runs)


def rolling_update_under_load(lab: Lab, hosts: list[str]) -> None:
    """`service update` of the backend, one task at a time, while a sandbox sends LOAD_RATE
    requests a second through the frontend: no request fails, every task ends on version 2,
    each replaced where it ran."""
    nodes = {t["task"]: t["node"] for t in ps(lab, hosts[0], "backend")}
    load = Load(lab, hosts[0], LOAD_RATE)
    try:
        wait_until(lambda: len(load.lines) >= LOAD_RATE, 30, "the probe's first second")
        say(f"\n   a sandbox on {hosts[0]} GETs http://frontend:{PUBLISHED}/ {LOAD_RATE} times a "
            "second (a new connection each) during the update")
        show(lab, hosts[0], "service", "update", "backend", "--env-add", "VERSION=2",
             "--update-parallelism", "1", "--update-delay", "1s")
        seen = len(load.lines)
        wait_until(lambda: len(load.lines) >= seen + LOAD_RATE, 30,
                   "a second of probes after the update")
    finally:
        lines = load.stop()
    show(lab, hosts[0], "service", "ps", "backend")
    failed = [ln for ln in lines if not (ln.startswith("ok ") and FRONT_ANSWER.search(ln))]
    say(f"\n   the probe: {len(lines)} requests, {len(failed)} failed; first: {lines[0]}; "
        f"last: {lines[-1]}")
    say(f"   answered by backend versions, second by second: "
        f"{versions_over_time(lines, LOAD_RATE)}")
    if failed:
        raise StepFailed(f"{len(failed)} of {len(lines)} requests failed during the rolling "
                         f"update: {failed[:3]}")
    first, last = FRONT_ANSWER.search(lines[0]), FRONT_ANSWER.search(lines[-1])
    if not (first and first.group(5) == "1" and last and last.group(5) == "2"):
        raise StepFailed("the probe did not go from version 1's answers to version 2's")
    rows = ps(lab, hosts[0], "backend")
    if len(rows) != 3 or not all(ready(t) and t.get("version") == 2 for t in rows):
        raise StepFailed(f"not every backend task runs version 2, healthy: {rows}")
    if {t["task"]: t["node"] for t in rows} != nodes:
        raise StepFailed(f"the update moved tasks: {nodes} -> "
                         f"{ {t['task']: t['node'] for t in rows} }")


def health_check_takes_a_task_out(lab: Lab, hosts: list[str], marks: Path) -> None:
    """One backend task's check starts failing: it turns unhealthy, leaves tasks.backend (and
    the VIP), is restarted by its restart policy, and comes back once its check passes."""
    asker = hosts[0]
    rows = ps(lab, asker, "backend")
    sick = next((t for t in rows if t["node"] != asker), rows[0])
    name, ip, restarts = sick["task"], sick["ip"], sick.get("restarts", 0)
    others = {t["ip"] for t in rows if t["task"] != name}
    wait_until(lambda: tasks_dns(lab, asker, "backend") == others | {ip}, 10,
               "tasks.backend to list every backend task")
    marker = marks / f"sick-{name}"
    say(f"\n   $ touch {MARKS}/sick-{name}   # (the host's {marks}, bound into the tasks): "
        f"{name}'s check on {sick['node']} fails from now on")
    t0 = time.monotonic()
    marker.touch()

    def unhealthy() -> list[dict[str, Any]] | None:
        rs = ps(lab, asker, "backend")
        return rs if any(r["task"] == name and r.get("health") == "unhealthy" for r in rs) \
            else None

    seen = wait_until(unhealthy, 20, f"{name} unhealthy")
    say(f"\n[{asker}] $ meshctl service ps backend   # {time.monotonic() - t0:.1f} s later")
    say(render("service ps", seen))
    wait_until(lambda: tasks_dns(lab, asker, "backend") == others, 20,
               f"{name} to leave tasks.backend")
    say(f"\n   {name} left tasks.backend {time.monotonic() - t0:.1f} s after its check began "
        "to fail (bound: interval 1 s x retries 2 + 1 s); VIP maps and published ports drop "
        "it by the same rule (Endpoint.serving)")
    show(lab, asker, "dns", "lookup", "tasks.backend", "--network", NET)
    marker.unlink()
    say(f"\n   $ rm {MARKS}/sick-{name}   # its restarted task passes its check again")
    back = wait_until(lambda: next((r for r in ps(lab, asker, "backend")
                                    if r["task"] == name and r.get("restarts", 0) > restarts
                                    and ready(r)), None), 30, f"{name} restarted and healthy")
    wait_until(lambda: tasks_dns(lab, asker, "backend") == others | {back["ip"]}, 10,
               f"{name} back in tasks.backend")
    say(f"   {name} restarted on {back['node']} (restarts: {back['restarts']}) and healthy "
        f"again {time.monotonic() - t0:.1f} s after its check began to fail")
    show(lab, asker, "service", "ps", "backend")
    show(lab, asker, "dns", "lookup", "tasks.backend", "--network", NET)


def run(hosts: int) -> None:
    lab = Lab()
    names = [f"h{i}" for i in range(1, hosts + 1)]
    marks = Path(tempfile.mkdtemp(prefix="meshnet-lab-marks-"))
    marks_mount = ["--mount", f"type=bind,source={marks},target={MARKS},readonly"]
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

        step(3, f"docker network create -d overlay --attachable {NET}",
             f"meshctl network create {NET} (VNI by hash, subnet from the default pool)")
        show(lab, names[0], "network", "create", NET)
        wait_until(lambda: all(lab.ctl(h, ["network", "inspect", NET], capture_output=True,
                                       timeout=20).returncode == 0 for h in names),
                   CONVERGE_TIMEOUT_S, f"{NET} on every host")
        show(lab, names[-1], "network", "ls")

        step(4, f"docker service create --name backend --network {NET} --replicas 2 "
                "--limit-memory 128M --env VERSION=1 --health-cmd 'curl -f "
                "http://127.0.0.1:8080/ && test ! -e /run/lab-marks/sick-$TASK' "
                "--health-interval 1s --health-retries 2 web",
             "meshctl service create backend ... --health-cmd CMD --health-interval 1s "
             "--health-retries 2 -- demo HTTP server (contained: own namespaces, Docker's "
             "capabilities, a cgroup; the check runs inside the task; endpoint mode vip, "
             "Docker's default)")
        show(lab, names[0], "service", "create", "backend", "--network", NET,
             "--replicas", "2", "--limit-memory", "128M", "--limit-pids", "200",
             "--env", "VERSION=1", *HEALTH_FLAGS, *TASK_MOUNT, *marks_mount,
             "--", *DEMO, "serve")

        step(5, f"docker service create --name frontend --network {NET} --replicas 2 "
                f"--publish {PUBLISHED}:8080 front",
             f"meshctl service create frontend --publish {PUBLISHED}:8080 ... -- demo frontend "
             "calling http://backend:8080/")
        show(lab, names[1], "service", "create", "frontend", "--network", NET,
             "--replicas", "2", "--publish", f"{PUBLISHED}:8080", *TASK_MOUNT, "--", *DEMO,
             "front", "--backend", "http://backend:8080/")
        wait_ready(lab, names, {"backend": 2, "frontend": 2})
        show(lab, names[2], "service", "ls")
        show(lab, names[0], "service", "ps", "backend")
        show(lab, names[0], "service", "ps", "frontend")
        show(lab, names[0], "service", "inspect", "frontend")
        ports = ctl_json(lab, names[0], "service", "inspect", "frontend").get("ports")
        if ports != [{"published": PUBLISHED, "target": 8080, "protocol": "tcp"}]:
            raise StepFailed(f"service inspect frontend shows ports {ports}")

        step(6, f"curl http://<every host>:{PUBLISHED}/ from the LAN (the routing mesh)",
             f"the published port answers on every host's underlay address, from a client "
             f"{CLIENT_IP} on the hosts' switch, DNATed by nftables to a frontend anywhere")
        published_on_every_host(lab, names)

        step(7, "docker service scale backend=3 frontend=4",
             "meshctl service scale backend=3 frontend=4 (no leader; running tasks stay put, "
             "new ones spread)")
        scale_keeps_running_tasks(lab, names)

        step(8, f"docker network inspect {NET}", f"meshctl network inspect {NET}")
        show(lab, names[0], "network", "inspect", NET)

        step(9, f"docker run --rm --network {NET} probe curl http://frontend:8080  (x10)",
             f"meshctl run --network {NET} -- GET http://frontend:8080/ (one VIP, balanced "
             "by each sandbox's kernel over the tasks)")
        n = 10
        script = "; ".join([" ".join([*DEMO, "get", "http://frontend:8080/"])] * n)
        r = lab.ctl(names[0], ["run", "--network", NET, "--name", "probe", *TASK_MOUNT,
                               "--", "sh", "-c", script], capture_output=True, timeout=120)
        say(f"\n[{names[0]}] $ meshctl run --network {NET} -- GET http://frontend:8080/ (x{n})")
        say((r.stdout + r.stderr).rstrip())
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("frontend.")]
        if r.returncode != 0 or len(lines) != n or \
                not all(FRONT_ANSWER.fullmatch(ln) for ln in lines):
            raise StepFailed("the probe could not reach frontend, or frontend not backend")
        served_by = {ln.split(" on ")[0] for ln in lines}
        say(f"   answered by {', '.join(sorted(served_by))}")
        if len(served_by) < 2:
            raise StepFailed("every answer came from one task: the VIP did not spread calls")
        say("\n   a vip service's name is one virtual IP; tasks.NAME lists its healthy tasks")
        vip = ctl_json(lab, names[0], "service", "inspect", "backend")["vips"][NET]
        show(lab, names[0], "dns", "lookup", "backend", "--network", NET)
        answers = ctl_json(lab, names[0], "dns", "lookup", "backend", "--network", NET)
        if answers.get("answers") != [vip]:
            raise StepFailed(f"backend answers {answers.get('answers')}, not its VIP {vip}")
        task_ips = {t["ip"] for t in ps(lab, names[0], "backend") if ready(t)}
        wait_until(lambda: tasks_dns(lab, names[0], "backend") == task_ips, 10,
                   f"tasks.backend to answer {sorted(task_ips)}")
        show(lab, names[0], "dns", "lookup", "tasks.backend", "--network", NET)

        step(10, "docker service update --env-add VERSION=2 --update-parallelism 1 "
                 "--update-delay 1s backend  (under load)",
             "meshctl service update backend --env-add VERSION=2 --update-parallelism 1 "
             "--update-delay 1s (each host replaces its own tasks, a batch at a time, by one "
             "rule over the replicated state; each task leaves DNS and the VIP before it stops)")
        rolling_update_under_load(lab, names)

        step(11, "docker service create --health-cmd ...: a check fails, the task leaves the "
                 "VIP and is restarted",
             "the health check runs inside the task's own namespaces and cgroup; an unhealthy "
             "task leaves DNS, the VIP and the published port, and its restart policy starts "
             "it again")
        health_check_takes_a_task_out(lab, names, marks)

        say("\n== metrics: dockerd --metrics-addr, then curl http://<host>:9323/metrics")
        say(f"   meshnet: meshnetd --metrics-listen IP:{METRICS_PORT} (on for every lab host): "
            "Prometheus text at /metrics, 200/503 at /health")
        show_metrics(lab, names[0], hosts)

        step(12, f"docker service rm frontend backend; docker network rm {NET}",
             f"meshctl service rm ...; meshctl network rm {NET}")
        show(lab, names[0], "service", "rm", "frontend")
        show(lab, names[0], "service", "rm", "backend")
        wait_until(lambda: not ctl_json(lab, names[0], "network", "inspect", NET)[
            "endpoints"], CONVERGE_TIMEOUT_S, "every task to stop")
        # A task that was still starting somewhere (its address claimed, not yet published)
        # holds the network until its agent has torn it down, as a container does in Docker.
        wait_until(lambda: lab.ctl(names[0], ["network", "rm", NET], capture_output=True,
                                   timeout=20).returncode == 0,
                   CONVERGE_TIMEOUT_S, f"{NET} to be free of tasks")
        say(f"\n[{names[0]}] $ meshctl network rm {NET}\nremoved: {NET}")

        say("\n== events: docker events, while a host is killed and started again")
        say(f"   meshnet: meshctl events on {names[0]}; meshnet-lab kill {names[-1]}, then "
            f"meshnet-lab start {names[-1]}")
        show_events_while_restarting(lab, names)
        say("\nlab: every step passed")
    finally:
        say("\n== clean up: meshnet-lab down")
        lab.down()
        shutil.rmtree(marks, ignore_errors=True)
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
