"""Authorization on real hosts (#13), tried as a user would: a worker cannot define services,
networks or keys, or forge them; no node deletes another's records; a revoked node is dropped."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Cluster, inject_record, task_trees, wait

pytestmark = pytest.mark.netns


def store(c: Cluster, host: str) -> dict[str, Any]:
    return dict(c.ctl_json(host, "status")["store"])


def unauthorized(c: Cluster, host: str, table: str) -> int:
    return int(store(c, host).get("refused_unauthorized_by_table", {}).get(table, 0))


def service_names(c: Cluster, host: str) -> set[str]:
    r = c.ctl(host, "--json", "service", "ls")
    return {s["name"] for s in json.loads(r.stdout)} if r.returncode == 0 else set()


def test_workers_cannot_define_or_forge_and_nobody_deletes_anothers(
        cluster: Callable[..., Cluster]) -> None:
    c = cluster(3, workers=("h3",))
    members = {m["name"]: m for m in c.ctl_json("h1", "members")}
    assert members["h3"]["roles"] == ["worker"] and members["h1"]["roles"] == ["admin"]
    c.network("n")

    # a worker's own commands are refused locally, with one line
    for args in (("service", "create", "evil", "--network", "n", "--", "sleep", "600"),
                 ("network", "create", "evil"), ("keys", "generate"),
                 ("run", "--network", "n", "--cap-add", "NET_ADMIN", "--", "true")):
        r = c.ctl("h3", *args)
        if args[0] == "keys":  # generating a key is local; installing one is a change
            r = c.ctl("h3", "keys", "install", r.stdout.strip())
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert "admin" in r.stderr, r.stderr
    assert c.ctl("h3", "run", "--network", "n", "--", "true").returncode == 0  # tasks are fine

    # a service record forged with the worker's own key runs nowhere
    spec = {"networks": ["n"], "command": ["sleep", "600"]}
    forged = {"name": "evil", "network": "n", "mode": "global", "replicas": 0, "spec": spec}
    before = {h: unauthorized(c, h, "services") for h in ("h1", "h2")}
    for h in ("h1", "h2"):
        inject_record(c.lab, h, "services", "evil", forged, writer="h3", sign_as="h3",
                      from_host="h3")
    wait(lambda: all(unauthorized(c, h, "services") > before[h] for h in ("h1", "h2")), 10,
         "the forged service refused")
    for h in ("h1", "h2", "h3"):
        assert "evil" not in service_names(c, h)
        assert not any(name.startswith("evil.") for name in task_trees(c.lab, h))

    # nobody deletes another node's record: h1's registration survives h3's tombstone (the
    # injected deletes carry HLCs 60 s ahead, newer than h1's write and than h1's re-announce of
    # the disputed record, and are still refused)
    subnet = c.ctl_json("h1", "network", "inspect", "n")["subnet"]
    ip = subnet.rsplit(".", 1)[0] + ".200"
    r = c.ctl("h1", "endpoint", "add", "web", ip, "--network", "n")
    assert r.returncode == 0, r.stderr
    wait(lambda: c.ctl_json("h2", "dns", "lookup", "web", "--network", "n")["answers"] == [ip],
         10, "web resolves on h2")
    key = "n/web@h1"
    before = {h: unauthorized(c, h, "endpoints") for h in ("h1", "h2")}
    for h in ("h1", "h2"):
        inject_record(c.lab, h, "endpoints", key, None, writer="h3", sign_as="h3",
                      from_host="h3", ahead_s=60)
        inject_record(c.lab, h, "endpoints", key, None, writer="h1", from_host="h3",
                      ahead_s=60)  # unsigned
    wait(lambda: all(unauthorized(c, h, "endpoints") >= before[h] + 2 for h in ("h1", "h2")),
         10, "the foreign deletes refused")
    # the owner answers a dispute of a record it still holds with a fresh write of it
    wait(lambda: c.ctl_json("h1", "status")["store"]["records_reannounced"] >= 1, 10,
         "h1 to re-announce its disputed record")
    for h in ("h1", "h2", "h3"):
        assert c.ctl_json(h, "dns", "lookup", "web", "--network", "n")["answers"] == [ip]


def test_a_revoked_node_is_dropped_everywhere(cluster: Callable[..., Cluster]) -> None:
    c = cluster(3)
    r = c.ctl("h1", "ca", "revoke", "h3", "--ca", str(c.lab.ca_dir))
    assert r.returncode == 0, r.stderr

    def gone() -> bool:
        return all("h3" not in {m["name"] for m in c.ctl_json(h, "members")}
                   for h in ("h1", "h2"))

    wait(gone, 20, lambda: f"h3 dropped: {[c.ctl_json(h, 'members') for h in ('h1', 'h2')]}")
    # and it stays out: its alives and refutations no longer count
    wait(lambda: c.ctl_json("h2", "status")["identity"]["revocations"] >= 1, 10,
         "the revocation gossiped to h2")
    time.sleep(3)
    assert gone()
