"""The chaos run's invariants (meshnet/lab/invariants.py) on a real 3-host lab: all hold on a
healthy practice exercise, and each planted fault is named by its invariant."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from conftest import Cluster, task_trees, wait

from meshnet.lab import invariants as inv
from meshnet.lab.demo_http import TASK_ARGV as DEMO
from meshnet.lab.demo_http import TASK_MOUNT
from meshnet.lab.lab import Lab

pytestmark = pytest.mark.netns

HOSTS = ["h1", "h2", "h3"]
EXPECTED = inv.Expected(
    networks={"appnet": {}},
    services={"backend": {"network": "appnet", "replicas": 2},
              "frontend": {"network": "appnet", "replicas": 2}})


def converging(lab: Lab) -> list[inv.Violation]:
    """Invariants 1, 3 and 5: what the chaos runner polls after a heal."""
    return (inv.check_membership(lab, HOSTS) + inv.check_tasks(lab, HOSTS, EXPECTED)
            + inv.check_dns(lab, HOSTS, EXPECTED))


def details(vs: list[inv.Violation]) -> str:
    return "\n".join(f"{v.invariant}: {v.detail}" for v in vs)


@contextmanager
def frozen(lab: Lab, host: str) -> Iterator[None]:
    """HOST's agent stopped (SIGSTOP) for the block: it repairs nothing meanwhile."""
    pid = {s.name: s.pid for s in lab.status()}[host]
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def test_invariants_hold_then_name_each_planted_fault(
        cluster: Callable[[int], Cluster], monkeypatch: pytest.MonkeyPatch) -> None:
    c = cluster(3)
    lab = c.lab
    c.network("appnet")
    for host, name, cmd in (("h1", "backend", ["serve"]),
                            ("h2", "frontend", ["front", "--backend", "http://backend:8080/"])):
        r = c.ctl(host, "service", "create", name, "--network", "appnet", "--replicas", "2",
                  *TASK_MOUNT, "--", *DEMO, *cmd)
        assert r.returncode == 0, r.stderr
    wait(lambda: not converging(lab), 60, lambda: details(converging(lab)))

    # All hold, and 100 requests by name from every host are served.
    stats: dict[str, int] = {}
    assert details(inv.check_all(lab, HOSTS, EXPECTED, stats=stats)) == ""
    assert stats == {"served": 100, "failed": 0}
    t0 = time.perf_counter()
    assert converging(lab) == []
    print(f"check_membership + check_tasks + check_dns on 3 hosts: "
          f"{(time.perf_counter() - t0) * 1000:.0f} ms")

    # definitions: an acknowledged service that does not exist; one that exists but was
    # acknowledged removed (absent from Expected); an unacknowledged write excuses it.
    ghost = inv.Expected(EXPECTED.networks, {**EXPECTED.services,
                                             "ghost": {"network": "appnet", "replicas": 1}})
    found = inv.check_definitions(lab, HOSTS, ghost)
    assert {(v.invariant, v.evidence["name"]) for v in found} == {("definitions", "ghost")}, \
        details(found)
    assert sorted(found[0].evidence["hosts"]) == HOSTS
    removed = inv.Expected(EXPECTED.networks, {"backend": EXPECTED.services["backend"]})
    found = inv.check_definitions(lab, HOSTS, removed)
    assert [v.evidence["name"] for v in found] == ["frontend"], details(found)
    removed.maybe_services.add("frontend")
    assert inv.check_definitions(lab, HOSTS, removed) == []
    scaled = inv.Expected(EXPECTED.networks, {**EXPECTED.services,
                                              "backend": {"network": "appnet", "replicas": 3}})
    found = inv.check_definitions(lab, HOSTS, scaled)
    assert [v.evidence["name"] for v in found] == ["backend"], details(found)
    assert "replicas=2" in found[0].detail

    # agents: a traceback in a log; none after the offset taken past it.
    with open(lab.log_path("h3"), "a") as f:
        f.write("Traceback (most recent call last):\n")
    found = inv.check_agents(lab, HOSTS)
    assert [(v.invariant, v.evidence["host"]) for v in found] == [("agents", "h3")], \
        details(found)
    assert inv.check_agents(lab, HOSTS, log_offsets=inv.log_sizes(lab, HOSTS)) == []
    found = inv.check_agents(lab, HOSTS, rss_bound_mb=1.0)
    assert sorted(v.evidence["host"] for v in found if "rss_mb" in v.evidence) == HOSTS

    # dns: an address no running task holds, registered under the backend's name (what a
    # record never withdrawn looks like), answers on every host; a removed name must not.
    r = c.ctl("h3", "endpoint", "add", "stale", "10.10.0.241", "--network", "appnet",
              "--service", "backend")
    assert r.returncode == 0, r.stderr
    found = wait(lambda: len(inv.check_dns(lab, HOSTS, EXPECTED)) == 3 and
                 inv.check_dns(lab, HOSTS, EXPECTED), 10, "the stale address on every host")
    assert {(v.invariant, v.evidence["service"]) for v in found} == {("dns", "backend")}
    assert all(list(v.evidence["dead"]) == ["10.10.0.241"] for v in found), details(found)
    assert c.ctl("h3", "endpoint", "rm", "stale", "--network", "appnet").returncode == 0
    r = c.ctl("h3", "endpoint", "add", "gone", "10.10.0.242", "--network", "appnet",
              "--service", "removed")
    assert r.returncode == 0, r.stderr
    found = wait(lambda: inv.check_dns(lab, HOSTS, EXPECTED, names=["removed"]), 10,
                 "a removed service's name to answer")
    assert {v.evidence["service"] for v in found} == {"removed"}, details(found)
    assert c.ctl("h3", "endpoint", "rm", "gone", "--network", "appnet").returncode == 0
    wait(lambda: not inv.check_dns(lab, HOSTS, EXPECTED, names=["removed"]), 10,
         lambda: details(inv.check_dns(lab, HOSTS, EXPECTED, names=["removed"])))

    # A frozen agent answers nothing: keep the checks short while one is.
    monkeypatch.setattr(inv, "QUERY_TIMEOUT_S", 0.5)

    # kernel: a stray FDB entry on h1's VXLAN device, planted while its agent (which would
    # remove it within a reconcile period) is frozen.
    vni = c.ctl_json("h1", "network", "inspect", "appnet")["vni"]
    dev, stray = f"mnvx-{vni:06x}", "02:42:0a:0a:00:fe"
    with frozen(lab, "h1"):
        r = lab.exec("h1", ["bridge", "fdb", "append", stray, "dst", "10.99.0.77", "dev", dev,
                            "self", "permanent"], capture_output=True, timeout=5)
        assert r.returncode == 0, r.stderr
        found = inv.check_kernel(lab, HOSTS)
        lab.exec("h1", ["bridge", "fdb", "del", stray, "dev", dev, "self"],
                 capture_output=True, timeout=5)
    assert any(v.invariant == "kernel" and v.evidence.get("key") == stray
               and v.evidence.get("host") == "h1" for v in found), details(found)
    wait(lambda: not converging(lab), 30, lambda: details(converging(lab)))

    # tasks / dns: kill a frontend task's processes while its agent is frozen (so it cannot
    # restart or withdraw it first): its host's word says running, no process is.
    rows = c.ctl_json("h1", "service", "ps", "frontend")
    victim = next(r for r in rows if r["state"] == "running")
    host, task = victim["node"], victim["task"]
    pids = set().union(*(p for n, p in task_trees(lab, host).items()
                         if n.rsplit("-", 1)[0] == task))
    assert pids
    with frozen(lab, host):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # gone with its PID 1 (tini)
                os.kill(pid, signal.SIGKILL)
        wait(lambda: not any(map(inv.pid_alive, pids)), 5, "the task's processes to die")
        found = inv.check_tasks(lab, HOSTS, EXPECTED) + inv.check_dns(lab, HOSTS, EXPECTED)
    assert any(v.invariant in ("tasks", "dns") and task in json.dumps(v.to_dict())
               for v in found), details(found)
    # The agent, thawed, restarts it: everything holds again.
    wait(lambda: not converging(lab), 60, lambda: details(converging(lab)))

    # addresses: one IP registered on both sides of a partition (each side's check passes).
    lab.partition([["h1"], ["h2", "h3"]])
    try:
        for h in ("h1", "h2"):
            r = c.ctl(h, "endpoint", "add", f"dup{h}", "10.10.0.250", "--network", "appnet",
                      timeout=10)
            assert r.returncode == 0, r.stderr
    finally:
        lab.heal()
    found = wait(lambda: inv.check_addresses(lab, HOSTS), 20, "the duplicate to be seen")
    assert {v.invariant for v in found} == {"addresses"}
    assert found[0].evidence["ip"] == "10.10.0.250"
    assert sorted(found[0].evidence["endpoints"]) == ["duph1@h1", "duph2@h2"]
    for h in ("h1", "h2"):
        assert c.ctl(h, "endpoint", "rm", f"dup{h}", "--network", "appnet").returncode == 0
    wait(lambda: not inv.check_addresses(lab, HOSTS) and not inv.check_kernel(lab, HOSTS), 20,
         lambda: details(inv.check_addresses(lab, HOSTS) + inv.check_kernel(lab, HOSTS)))
