"""Health checks on real hosts (issue 17): the check runs inside each task's own containment,
only healthy tasks are in DNS, and a task whose check starts failing leaves `tasks.NAME`, shows
unhealthy, and is restarted by its restart policy until it is healthy again.

One 2-host lab for the module, one service of 2 tasks (one per host) whose check is
`test ! -e /tmp/sick` every 0.5 s, 2 retries. The task's /tmp is its own, so the task itself
makes /tmp/sick: when the test creates `sick-<task>` in a directory bound into the tasks, and
only if that marker is newer than the task's start (so the restarted task stays well).
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, new_prefix, require_root, task_trees, wait

from meshnet.cli import meshctl
from meshnet.lab import Lab
from meshnet.lab.lab import RUN_BASE

pytestmark = pytest.mark.netns

SERVICE = "hc"
NET = "hcnet"
SHARED = "/run/shared"  # where the tasks see the test's marker directory
# Where a process runs, as it sees it: hostname, user, namespaces, capabilities, cgroups, and
# whether the lab's agents' directories (state, sockets, keys) are visible. The task prints it
# once when it starts, the health check on every probe: run in the task, they must agree.
CONTEXT = (
    'echo "ctx $(hostname) uid=$(id -u) $(readlink /proc/self/ns/mnt /proc/self/ns/pid '
    '/proc/self/ns/net /proc/self/ns/uts /proc/self/ns/ipc /proc/self/ns/cgroup | tr "\\n" " ")'
    '$(grep -E "^(CapBnd|CapEff|NoNewPrivs)" /proc/self/status | tr -s "\\t\\n" "  ")'
    f'cgroup=$(tr "\\n" " " < /proc/self/cgroup)agents=$(test -e {RUN_BASE} && echo visible '
    '|| echo hidden)"')
TASK_SCRIPT = f"""{CONTEXT}
touch /tmp/started
while :; do
  if [ {SHARED}/sick-$MESHNET_TASK -nt /tmp/started ]; then touch /tmp/sick; fi
  sleep 0.3
done"""
HEALTH_CMD = f"{CONTEXT}; test ! -e /tmp/sick"


def call(c: Cluster, host: str, op: str, args: dict[str, Any]) -> Any:
    """One control request to HOST's agent, straight on its socket (polling fast enough to
    see a state that lasts a second, which a meshctl process per look may not)."""
    for frame in meshctl.Client(str(c.lab.socket_path(host))).call(op, args, 10):
        if "ok" in frame:
            assert frame["ok"], frame
            return frame.get("result")
    raise AssertionError(f"{op}: no reply")


def ps(c: Cluster, host: str) -> dict[str, dict[str, Any]]:
    return {r["task"]: r for r in call(c, host, "service.ps", {"name": SERVICE})}


def dns(c: Cluster, host: str) -> set[str]:
    return set(call(c, host, "dns.lookup", {"name": f"tasks.{SERVICE}", "network": NET,
                                            "type": "A"})["answers"])


@pytest.fixture(scope="module")
def hc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path]]:
    require_root()
    shared = tmp_path_factory.mktemp("health")
    prefix = new_prefix()
    lab = Lab(prefix, RUN_BASE / prefix)
    c = Cluster(lab)
    try:
        lab.up(2, profile="lan-fast")
        wait(lambda: all(sum(m["state"] == "alive" for m in call(c, h, "members", {})) == 2
                         for h in ("h1", "h2")), 30, "membership to converge")
        c.network(NET)
        r = c.ctl("h1", "service", "create", SERVICE, "--network", NET, "--replicas", "2",
                  "--max-per-node", "1", "--mount",
                  f"type=bind,source={shared},target={SHARED},readonly",
                  "--health-cmd", HEALTH_CMD, "--health-interval", "0.5",
                  "--health-retries", "2", "--", "sh", "-c", TASK_SCRIPT)
        assert r.returncode == 0, r.stderr
        yield c, shared
    finally:
        c.close()
        lab.down()


def healthy(c: Cluster, host: str) -> dict[str, dict[str, Any]] | None:
    rows = ps(c, host)
    ok = len(rows) == 2 and all(r["state"] == "running" and r["health"] == "healthy"
                                for r in rows.values())
    return rows if ok else None


def test_tasks_turn_healthy_and_the_check_runs_inside_each_task(
        hc: tuple[Cluster, Path]) -> None:
    c, _ = hc
    rows = wait(lambda: healthy(c, "h1"), 30, "both tasks healthy")
    assert {r["node"] for r in rows.values()} == {"h1", "h2"}
    ips = {r["ip"] for r in rows.values()}
    wait(lambda: dns(c, "h2") == ips, 10, f"tasks.{SERVICE} to answer {ips}")
    text = c.ctl("h2", "service", "ps", SERVICE).stdout
    assert "HEALTH" in text and text.count("healthy") == 2, text
    doc = call(c, "h1", "service.inspect", {"name": SERVICE})
    assert doc["health"] == {"cmd": ["/bin/sh", "-c", HEALTH_CMD], "interval": 0.5,
                             "timeout": 30.0, "retries": 2, "start_period": 0.0}

    logs = [json.loads(line) for line in
            c.ctl("h1", "--json", "service", "logs", SERVICE).stdout.splitlines()]
    assert RUN_BASE.is_dir()  # what the tasks must not see is there on the host
    for host in ("h1", "h2"):
        mine = [t for t in call(c, host, "service.inspect", {"name": SERVICE})["tasks"]
                if t["node"] == host]
        assert len(mine) == 1 and mine[0]["health_log"], mine
        task, probe = mine[0]["task"], mine[0]["health_log"][-1]
        assert probe["exit_code"] == 0, probe
        started = [r["line"] for r in logs if r["task"] == task and r["line"].startswith("ctx")]
        assert started, logs
        print(f"{task}: the task: {started[-1]}\n{task}: its check: {probe['output'].strip()}")
        assert probe["output"].strip() == started[-1]  # same namespaces, caps, cgroups, user
        assert probe["output"].startswith(f"ctx {task} uid=0 mnt:[")
        assert "NoNewPrivs: 1" in probe["output"] and "agents=hidden" in probe["output"]


def test_an_unhealthy_task_leaves_dns_shows_unhealthy_and_is_restarted(
        hc: tuple[Cluster, Path]) -> None:
    c, shared = hc
    rows = wait(lambda: healthy(c, "h1"), 30, "both tasks healthy")
    sick = next(r for r in rows.values() if r["node"] == "h2")  # DNS is asked on h1
    wait(lambda: sick["ip"] in dns(c, "h1"), 10, f"{sick['task']} in DNS")
    wait(lambda: sick["ip"] in vip_backends(c, "h1"), 10, f"{sick['task']} in h1's VIP map")
    # On the task's own host every write of its record is an event (a peer may get two
    # writes in one anti-entropy round, and see only the last); --since: from before the
    # marker, however long meshctl takes to start.
    events = c.background("h2", "--json", "events", "--since", "5m", "--filter",
                          f"task={sick['task']}")
    actions: list[tuple[str, str | None, int | None]] = []
    threading.Thread(target=collect, args=(events, actions), daemon=True).start()

    t0 = time.monotonic()
    (shared / f"sick-{sick['task']}").touch()
    wait(lambda: sick["ip"] not in dns(c, "h1") and sick["ip"] not in vip_backends(c, "h1"),
         30, f"{sick['task']} to leave DNS and the VIP map of h1's task")
    gone = time.monotonic() - t0
    print(f"{sick['task']} left tasks.{SERVICE} on h1 {gone:.2f} s after its check began to "
          "fail (bound: interval 0.5 s x retries 2 + 1 s, plus up to 0.3 s for the task to "
          "notice the marker)")
    seen = wait(lambda: (r := ps(c, "h1")[sick["task"]])["health"] == "unhealthy" and r,
                10, f"{sick['task']} unhealthy in service ps")
    assert seen["state"] in ("running", "failed")
    assert "unhealthy" in meshctl.render("service ps", [seen])

    back = wait(lambda: (r := ps(c, "h1")[sick["task"]])["restarts"] > sick["restarts"] and
                r["state"] == "running" and r["health"] == "healthy" and r, 30,
                f"{sick['task']} restarted and healthy")
    assert back["node"] == "h2"
    wait(lambda: back["ip"] in dns(c, "h1"), 10, f"{sick['task']} back in DNS")
    print(f"{sick['task']} healthy again after {time.monotonic() - t0:.2f} s")

    # Docker's order: health_status unhealthy, the task killed (SIGTERM: 143) and failed, then
    # started again (starting) and healthy.
    order = [("health_status", "unhealthy", None), ("failed", "unhealthy", 143),
             ("running", "starting", 143), ("health_status", "healthy", 143)]
    wait(lambda: all(a in actions for a in order), 10, lambda: f"events {order}: {actions}")
    assert [actions.index(a) for a in order] == sorted(actions.index(a) for a in order), actions
    events.terminate()


def vip_backends(c: Cluster, host: str) -> set[str]:
    """The addresses in the VIP table of a task sandbox of HOST (agent/vips.py), read inside
    it; the VIP itself among them."""
    pids = next((p for name, p in task_trees(c.lab, host).items()
                 if name.startswith(f"{SERVICE}.") and p), None)
    if not pids:
        return set()
    r = subprocess.run(["nsenter", f"--net=/proc/{min(pids)}/ns/net", "nft", "list", "table",
                        "ip", "meshnet_vip"], capture_output=True, text=True, timeout=10)
    return set(re.findall(r"\b\d+\.\d+\.\d+\.\d+\b", r.stdout))


def collect(proc: subprocess.Popen[str], into: list[tuple[str, str | None, int | None]]) -> None:
    """A task's events, as (action, health, exit_code), from `meshctl --json events`."""
    assert proc.stdout is not None
    for line in proc.stdout:
        e = json.loads(line)
        into.append((e["action"], e.get("health"), e.get("exit_code")))
