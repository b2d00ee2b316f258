"""Sandbox namespace names on real agents (root): a restarted agent sweeps exactly its own
sandboxes under the hashed names, and a namespace already on the host under the name a
sandbox would take is refused, never shared."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, LabFactory, wait

from meshnet.platform import nsfd
from meshnet.platform.sandbox import (
    SandboxExists,
    create_sandbox,
    node_sandbox_leftovers,
    node_sandboxes,
    sandbox_ns_name,
)

pytestmark = pytest.mark.netns


def running(c: Cluster, host: str, service: str) -> list[int]:
    r = c.ctl(host, "--json", "service", "ps", service)
    rows: list[dict[str, Any]] = json.loads(r.stdout) if r.returncode == 0 else []
    return sorted(int(t["slot"]) for t in rows if t["state"] == "running")


def test_restarted_agent_sweeps_exactly_its_own(cluster: Callable[[int], Cluster]) -> None:
    c = cluster(2)
    p = c.lab.sandbox_prefix
    c.network("sweep")
    r = c.ctl("h1", "service", "create", "keep", "--network", "sweep", "--replicas", "2",
              "--constraint", "node.name==h2", "--", "sleep", "1000")
    assert r.returncode == 0, r.stderr
    wait(lambda: running(c, "h1", "keep") == [1, 2], 30, "keep.1 and keep.2 on h2")
    c.serve("h2", "sweep", "old")  # a `run`: it does not outlive its agent
    c.serve("h1", "sweep", "neighbour")  # another agent's, on the same /run/netns
    keep = sorted(sandbox_ns_name(p, "h2", f"keep.{i}") for i in (1, 2))
    assert sorted(node_sandboxes(p, "h2")) == sorted([*keep, sandbox_ns_name(p, "h2", "old")])
    neighbour = sandbox_ns_name(p, "h1", "neighbour")
    assert node_sandboxes(p, "h1") == [neighbour]
    assert all(len(n) <= 64 and n.startswith(f"{p}-") for n in nsfd.list_netns(f"{p}-"))

    # Sandboxes whose namespace is gone but whose /etc/netns directory stayed: h2's is swept
    # by h2's restart, h1's is not h2's to touch.
    etc = Path("/etc/netns")
    h2_orphan, h1_orphan = (etc / sandbox_ns_name(p, h, "orphan") for h in ("h2", "h1"))
    for d in (h2_orphan, h1_orphan):
        d.mkdir()
        (d / "resolv.conf").write_text("nameserver 127.0.0.11\n")
    assert node_sandbox_leftovers(p, "h2") == sorted(
        [*keep, sandbox_ns_name(p, "h2", "old"), h2_orphan.name])

    c.lab.kill("h2")
    c.lab.start("h2")
    wait(lambda: running(c, "h1", "keep") == [1, 2] and
         sorted(node_sandboxes(p, "h2")) == keep, 30,
         lambda: f"h2's tasks back, `old` swept: {node_sandboxes(p, 'h2')}")
    assert node_sandboxes(p, "h1") == [neighbour]
    assert sorted(nsfd.list_netns(f"{p}-")) == sorted([*keep, neighbour])
    assert not h2_orphan.exists()
    assert h1_orphan.is_dir()


def test_existing_namespace_is_never_shared(cluster: Callable[[int], Cluster]) -> None:
    c = cluster(1)
    c.network("squat")
    ns = sandbox_ns_name(c.lab.sandbox_prefix, "h1", "squatted")
    assert nsfd.create_netns(ns)
    try:
        r = c.ctl("h1", "run", "--network", "squat", "--name", "squatted", "--", "true")
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and "not sharing it" in r.stderr, r.stderr
        assert nsfd.netns_exists(ns)  # left as it was found
        r = c.ctl("h1", "--json", "network", "inspect", "squat")
        assert json.loads(r.stdout)["endpoints"] == [], r.stdout  # its address withdrawn
        r = c.ctl("h1", "run", "--network", "squat", "--name", "free", "--", "true")
        assert r.returncode == 0, r.stderr
    finally:
        nsfd.delete_netns(ns)


def test_create_sandbox_exclusive(lab_factory: LabFactory) -> None:
    lab = lab_factory()  # for a prefix of our own; never up
    ns = f"{lab.prefix}-s-exclusive"
    assert nsfd.create_netns(ns)
    try:
        with pytest.raises(SandboxExists, match="not sharing it"):
            asyncio.run(create_sandbox(ns, "mnbr-nowhere", "10.9.0.2/24",
                                       "02:42:0a:09:00:02", 1450, exclusive=True))
        assert nsfd.netns_exists(ns)
    finally:
        nsfd.delete_netns(ns)
    assert not nsfd.netns_exists(ns)
