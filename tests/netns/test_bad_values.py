"""Bad replicated values on real hosts (issue #13): a peer holding the cluster key gossips a
service with 10^12 replicas, a service with an unknown restart key, an endpoint with MAC "zz" and
a network with subnet 10.0.0.0/33. Each is refused and counted; every loop keeps running, which a
later good `network create` + `service create` taking effect everywhere shows."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Cluster, inject_record, wait

pytestmark = pytest.mark.netns

HOSTS = ("h1", "h2")


def status_store(c: Cluster, host: str) -> dict[str, Any]:
    return dict(c.ctl_json(host, "status")["store"])


def names(c: Cluster, host: str, *what: str) -> set[str]:
    r = c.ctl(host, "--json", *what)
    return {x["name"] for x in json.loads(r.stdout)} if r.returncode == 0 else set()


def running(c: Cluster, host: str, service: str) -> list[dict[str, Any]]:
    r = c.ctl(host, "--json", "service", "ps", service)
    rows = json.loads(r.stdout) if r.returncode == 0 else []
    return [t for t in rows if t["state"] == "running"]


def inject(c: Cluster, to: str, table: str, key: str, value: dict[str, Any]) -> None:
    """One write as an admin (h1's key signs it) would gossip it: only the schema can refuse
    it."""
    inject_record(c.lab, to, table, key, value, writer="h1", sign_as="h1")


def test_bad_replicated_values_are_refused_and_loops_keep_running(
        cluster: Callable[[int], Cluster]) -> None:
    c = cluster(len(HOSTS))
    pre = c.network("pre")
    before = status_store(c, "h2")
    spec = {"networks": ["pre"], "command": ["sleep", "600"]}
    bad: list[tuple[str, str, dict[str, Any]]] = [
        ("services", "huge", {"name": "huge", "network": "pre", "mode": "replicated",
                              "replicas": 10**12, "spec": spec}),
        ("services", "odd", {"name": "odd", "network": "pre", "mode": "replicated",
                             "replicas": 1, "spec": {**spec, "restart": {"jitter": 1}}}),
        # owned by a live node on an existing network: the overlay would program it at once
        ("endpoints", "pre/zz@h1", {"name": "zz", "network": "pre", "ip": "10.10.0.77",
                                    "mac": "zz", "node": "h1", "service": None, "slot": None}),
        ("networks", "bad", {"name": "bad", "vni": 5000, "subnet": "10.0.0.0/33",
                             "encrypted": False}),
    ]
    # a good write by the same path, so a refusal cannot be mistaken for a lost packet
    control = ("networks", "injected", {"name": "injected", "vni": 6000,
                                        "subnet": "10.99.0.0/24", "encrypted": False})

    expected = {"services": 2, "endpoints": 1, "networks": 1}

    def refused_all() -> bool:
        """Each bad write refused at least once (a total could be reached by repeats alone)."""
        by_table = status_store(c, "h2").get("refused_by_table", {})
        return all(by_table.get(t, 0) - before.get("refused_by_table", {}).get(t, 0) >= n
                   for t, n in expected.items())

    def sent_all() -> bool:
        if not refused_all():  # UDP in a lab does not get lost, but be sure
            for table, key, value in bad:
                inject(c, "h2", table, key, value)
        if "injected" not in names(c, "h2", "network", "ls"):
            inject(c, "h2", *control)
        return refused_all() and "injected" in names(c, "h2", "network", "ls")

    wait(sent_all, 15, lambda: f"refusals counted on h2: {status_store(c, 'h2')}")
    store = status_store(c, "h2")
    by_table = store["refused_by_table"]
    assert by_table.get("services", 0) >= 2 and by_table.get("endpoints", 0) >= 1 and \
        by_table.get("networks", 0) >= 1, store
    # refused means never stored: on no host (the good control spread to both)
    wait(lambda: all("injected" in names(c, h, "network", "ls") for h in HOSTS), 10,
         "the good injected write everywhere")
    for h in HOSTS:
        assert "bad" not in names(c, h, "network", "ls")
        assert not names(c, h, "service", "ls") & {"huge", "odd"}
        eps = c.ctl_json(h, "network", "inspect", "pre")["endpoints"]
        assert all(ep["name"] != "zz" for ep in eps), eps

    # every loop still runs: a good network and service take effect everywhere
    good = c.network("good")
    assert good["subnet"] != pre["subnet"]
    r = c.ctl("h1", "service", "create", "web", "--network", "good", "--replicas", "2",
              "--max-per-node", "1", "--", "sleep", "600")
    assert r.returncode == 0, r.stderr
    wait(lambda: all(len(running(c, h, "web")) == 2 for h in HOSTS), 30,
         lambda: f"web's tasks: {c.ctl('h1', '--json', 'service', 'ps', 'web').stdout}")
    tasks = running(c, "h1", "web")
    assert {t["node"] for t in tasks} == set(HOSTS)  # the schedulers on both hosts placed one
    ips = sorted(t["ip"] for t in tasks)
    for h in HOSTS:  # DNS records rebuilt (refresh_dns ran after the refusals)
        wait(lambda h=h: sorted(c.ctl_json(h, "dns", "lookup", "tasks.web", "--network",
                                           "good")["answers"]) == ips, 10, f"web in DNS on {h}")
    # the overlay loop programmed the good network's devices on both hosts and keeps passing
    for h in HOSTS:
        overlay = c.ctl_json(h, "status")["datapath"]["overlay"]
        passes = overlay["passes"]
        wait(lambda h=h, p=passes: c.ctl_json(h, "status")["datapath"]["overlay"]["passes"] > p,
             10, f"overlay passes on {h}")
        assert c.ctl_json(h, "status")["datapath"]["overlay"]["networks"] >= 3  # pre good injected
    # the two tasks reach each other over the overlay: the FDB/neighbour sync ran
    other = next(t["ip"] for t in tasks if t["node"] == "h2")
    r = c.probe("h1", "good", f"ping -c 1 -W 2 {other}")
    assert r.returncode == 0, r.stdout + r.stderr
    # nothing was counted as a handler crash along the way
    for h in HOSTS:
        store = status_store(c, h)
        assert store["handler_errors"] == 0 and store["listener_errors"] == 0, store
        # and the schedulers and claims ran clean: placed, started, every claim confirmed
        tasks_status = c.ctl_json(h, "status")["tasks"]
        assert tasks_status["scheduler_errors"] == 0 and tasks_status["task_start_errors"] == 0
        assert tasks_status["claims"] >= 1 and tasks_status["confirm_unreachable"] == 0, \
            tasks_status
