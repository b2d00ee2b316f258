"""Services on real hosts: the practice exercise, scaling, removal, restart policy, failover."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Cluster, task_trees, wait

from meshnet.lab.demo_http import TASK_ARGV as DEMO
from meshnet.lab.demo_http import TASK_MOUNT
from meshnet.lab.lab import LAB_ENV
from meshnet.platform import cgroups
from meshnet.platform.sandbox import node_sandboxes, processes_with_env, sandbox_ns_name

pytestmark = pytest.mark.netns


def ps(c: Cluster, host: str, service: str) -> list[dict[str, Any]]:
    r = c.ctl(host, "--json", "service", "ps", service)
    return json.loads(r.stdout) if r.returncode == 0 else []


def running(c: Cluster, host: str, service: str) -> dict[int, str]:
    """slot -> node of running tasks, as HOST sees them."""
    return {int(t["slot"]): t["node"] for t in ps(c, host, service) if t["state"] == "running"}


def create(c: Cluster, host: str, name: str, *args: str, detach: bool = False) -> None:
    """`service create`, waiting until its tasks run unless DETACH (tasks that never stay up)."""
    r = c.ctl(host, "service", "create", name, *TASK_MOUNT, *(["--detach"] if detach else []),
              *args)
    assert r.returncode == 0, r.stderr


def test_practice_exercise_frontend_reaches_backend_by_name(
        cluster: Callable[[int], Cluster]) -> None:
    c = cluster(3)
    assert c.ctl("h1", "network", "create", "appnet").returncode == 0
    wait(lambda: all(c.ctl(h, "network", "inspect", "appnet").returncode == 0
                     for h in ("h1", "h2", "h3")), 10, "appnet everywhere")
    create(c, "h1", "backend", "--network", "appnet", "--replicas", "2", "--", *DEMO, "serve")
    create(c, "h2", "frontend", "--network", "appnet", "--replicas", "3", "--", *DEMO, "front",
           "--backend", "http://backend:8080/")
    wait(lambda: len(running(c, "h3", "backend")) == 2 and
         len(running(c, "h3", "frontend")) == 3, 40, "5 tasks running")
    # spread across hosts, not piled on one
    nodes = set(running(c, "h1", "backend").values()) | set(running(c, "h1", "frontend").values())
    assert len(nodes) >= 2
    answers = Counter()
    for _ in range(6):
        r = c.probe("h1", "appnet", " ".join(DEMO) + " get http://frontend:8080/", *TASK_MOUNT)
        assert r.returncode == 0, r.stdout + r.stderr
        line = r.stdout.strip()
        assert line.startswith("frontend.") and " -> backend." in line, line
        answers[line.split(" -> ")[0]] += 1
    assert len(answers) >= 2, answers  # the VIP spreads calls over frontend tasks

    # scale both; scaling down stops the highest slots
    assert c.ctl("h3", "service", "scale", "backend=4", "frontend=1").returncode == 0
    wait(lambda: sorted(running(c, "h2", "backend")) == [1, 2, 3, 4] and
         sorted(running(c, "h2", "frontend")) == [1], 40, "scaled")
    ls = {s["name"]: s for s in json.loads(c.ctl("h1", "--json", "service", "ls").stdout)}
    assert ls["backend"]["desired"] == 4 and ls["backend"]["running"] == 4
    inspect = json.loads(c.ctl("h1", "--json", "network", "inspect", "appnet").stdout)
    assert sorted(e["name"] for e in inspect["endpoints"]) == \
        ["backend.1", "backend.2", "backend.3", "backend.4", "frontend.1"]

    # logs are gathered from every host that runs a task
    r = c.ctl("h1", "service", "logs", "frontend")
    assert r.returncode == 0 and "frontend.1 |" in r.stdout

    # rm stops every task everywhere
    assert c.ctl("h2", "service", "rm", "backend").returncode == 0
    wait(lambda: not any(e["service"] == "backend" for e in json.loads(
        c.ctl("h3", "--json", "network", "inspect", "appnet").stdout)["endpoints"]), 30,
        "backend endpoints gone")
    assert c.ctl("h1", "service", "ps", "backend").returncode == 1


def test_restart_policy(cluster: Callable[[int], Cluster]) -> None:
    c = cluster(2)
    assert c.ctl("h1", "network", "create", "pol").returncode == 0
    wait(lambda: c.ctl("h2", "network", "inspect", "pol").returncode == 0, 10, "network")
    create(c, "h1", "flaky", "--network", "pol", "--restart-condition", "on-failure", "--",
           "sh", "-c", "echo try; exit 1", detach=True)
    create(c, "h1", "once", "--network", "pol", "--restart-condition", "none", "--",
           "sh", "-c", "exit 1", detach=True)
    wait(lambda: any((t.get("restarts") or 0) >= 2 for t in ps(c, "h2", "flaky")), 30,
         "on-failure restarts")
    wait(lambda: [t["state"] for t in ps(c, "h2", "once")] == ["failed"], 20, "once failed")
    time.sleep(3)
    once = ps(c, "h1", "once")
    assert once[0]["state"] == "failed" and (once[0].get("restarts") or 0) == 0
    r = c.ctl("h1", "service", "create", "bad", "--network", "nope", "--", "true")
    assert r.returncode == 1 and "network nope not found" in r.stderr
    r = c.ctl("h1", "service", "create", "bad", "--network", "pol", "--constraint",
              "node.colour~red", "--", "true")
    assert r.returncode == 1 and "constraint" in r.stderr


def test_failover_and_return(cluster: Callable[[int], Cluster]) -> None:
    c = cluster(3)
    assert c.ctl("h1", "network", "create", "fo").returncode == 0
    wait(lambda: all(c.ctl(h, "network", "inspect", "fo").returncode == 0
                     for h in ("h1", "h2", "h3")), 10, "network")
    create(c, "h1", "backend", "--network", "fo", "--replicas", "6", "--", *DEMO, "serve")
    create(c, "h1", "frontend", "--network", "fo", "--replicas", "2", "--constraint",
           "node.name==h1", "--", *DEMO, "front", "--backend", "http://backend:8080/")
    wait(lambda: len(running(c, "h1", "backend")) == 6 and
         len(running(c, "h1", "frontend")) == 2, 60,
         lambda: f"tasks running: {ps(c, 'h1', 'backend')} {ps(c, 'h1', 'frontend')}")
    before = running(c, "h1", "backend")
    victim = next(n for n in ("h2", "h3") if n in before.values())
    lost = sorted(s for s, n in before.items() if n == victim)

    c.lab.kill(victim)
    survivors = [h for h in ("h1", "h2", "h3") if h != victim]
    wait(lambda: sorted(running(c, "h1", "backend")) == [1, 2, 3, 4, 5, 6] and
         victim not in running(c, "h1", "backend").values(), 60, "tasks back on survivors")
    after = running(c, "h1", "backend")
    # only the victim's tasks moved
    assert all(after[s] == before[s] for s in before if s not in lost)
    for _ in range(4):  # the frontend's calls to backend keep succeeding
        r = c.probe("h1", "fo", " ".join(DEMO) + " get http://frontend:8080/", *TASK_MOUNT)
        assert r.returncode == 0 and " -> backend." in r.stdout, r.stdout + r.stderr
        assert "backend error" not in r.stdout

    c.lab.start(victim)
    # Running tasks stay where they are (Docker's rule, placement rule 6). With the victim back,
    # the cap is 3 tasks a node again (8 tasks, 3 nodes): only tasks of a node above it move.
    def settled() -> dict[int, str] | None:
        now = running(c, "h1", "backend")
        load = Counter([*now.values(), "h1", "h1"])  # the two frontends are pinned to h1
        if sorted(now) != [1, 2, 3, 4, 5, 6] or max(load.values()) > 3:
            return None
        return now

    final = wait(settled, 60, lambda: f"every node within its cap: {ps(c, 'h1', 'backend')}")
    load_after = Counter([*after.values(), "h1", "h1"])
    assert all(final[s] == n for s, n in after.items() if load_after[n] <= 3), (after, final)
    for h in [*survivors, victim]:  # once views agree, nothing runs twice
        tasks = [t for t in ps(c, h, "backend") if t["state"] == "running"]
        assert sorted(int(t["slot"]) for t in tasks) == [1, 2, 3, 4, 5, 6]
    # A survivor that gave its stand-in tasks back tore their sandboxes down completely: one
    # DNS listener per task it still runs, none left bound in a namespace (a half-removed
    # sandbox kept its 127.0.0.11:53 sockets, and the task's next start there failed).
    for h in survivors:
        wait_listeners_match_tasks(c, h)


def wait_listeners_match_tasks(c: Cluster, host: str) -> None:
    def tasks() -> int:
        rows = ps(c, host, "backend") + ps(c, host, "frontend")
        return sum(t["state"] == "running" and t["node"] == host for t in rows)

    wait(lambda: c.ctl_json(host, "status")["dns"]["listeners"] == tasks(), 10,
         lambda: f"{host}: {c.ctl_json(host, 'status')['dns']['listeners']} DNS listeners "
                 f"for {tasks()} tasks")


def test_tasks_never_outlive_a_killed_agent(cluster: Callable[[int], Cluster]) -> None:
    """A kill -9'd agent leaves its tasks running, in namespaces whose names died with the
    agent's mount namespace (as under systemd). The restarted agent finds them through their
    cgroups and kills them, leaving one process tree per slot and no cgroup or namespace of
    theirs; so does `lab down` when the agent never comes back."""
    c = cluster(2)
    c.network("orphans")
    create(c, "h1", "keep", "--network", "orphans", "--replicas", "2", "--constraint",
           "node.name==h2", "--", "sleep", "1000")
    wait(lambda: len(running(c, "h1", "keep")) == 2, 30, "two tasks on h2")
    c.serve("h2", "orphans", "old")
    before = wait(lambda: (t := task_trees(c.lab, "h2")) and len(t) == 3 and
                  all(len(p) == 2 for p in t.values()) and t, 10,
                  lambda: f"keep.1, keep.2, old: a cgroup each holding tini and its command: "
                          f"{task_trees(c.lab, 'h2')}")
    old_pids = set().union(*before.values())

    c.lab.kill("h2")
    time.sleep(0.5)
    assert task_trees(c.lab, "h2") == before, "orphaned tasks still run before the restart"
    c.lab.start("h2")
    wait(lambda: not old_pids & set().union(*task_trees(c.lab, "h2").values()), 20,
         "the restarted agent kills its old tasks")
    wait(lambda: sorted(running(c, "h1", "keep")) == [1, 2], 30, "tasks restarted")
    # one tree per slot (tini and its command; the command runs a moment after the launcher
    # starts), and nothing else left
    after = wait(lambda: (t := task_trees(c.lab, "h2")) and all(len(p) == 2 for p in t.values())
                 and t, 10, lambda: f"one tree per slot: {task_trees(c.lab, 'h2')}")
    assert sorted(n.rsplit("-", 1)[0] for n in after) == ["keep.1", "keep.2"], after
    assert sorted(node_sandboxes(c.lab.sandbox_prefix, "h2")) == \
        sorted(sandbox_ns_name(c.lab.sandbox_prefix, "h2", f"keep.{i}") for i in (1, 2))

    c.serve("h2", "orphans", "orphan")
    orphan = set().union(*task_trees(c.lab, "h2").values())
    c.lab.kill("h2")
    c.close()
    c.lab.down()
    assert not task_trees(c.lab, "h2")
    assert not cgroups.find_parents(c.lab.cgroup_prefix), "a task cgroup outlived lab down"
    for pid in orphan:
        assert not os.path.exists(f"/proc/{pid}"), f"task process {pid} outlived lab down"
    assert not processes_with_env(f"{LAB_ENV}={c.lab.prefix}")
