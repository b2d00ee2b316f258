"""`service create|scale|rm` wait until the cluster gets there, with a line per task on
stderr, as `docker service create` does; --timeout gives up with the reason, --detach does not
wait at all."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Cluster, wait

pytestmark = pytest.mark.netns


def rows(c: Cluster, host: str, service: str) -> list[dict[str, Any]]:
    r = c.ctl(host, "--json", "service", "ps", service)
    return json.loads(r.stdout) if r.returncode == 0 else []


def test_create_scale_rm_wait_with_progress(cluster: Callable[[int], Cluster]) -> None:
    c = cluster(2)
    c.network("prog")
    r = c.ctl("h1", "service", "create", "web", "--network", "prog", "--replicas", "3",
              "--json", "--", "sleep", "600")
    print(r.stderr)  # the progress as a user sees it (pytest shows it on failure, or -rP)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["running"] == 3  # stdout: the document alone
    err = r.stderr.splitlines()
    assert err[-1] == "web: converged, 3/3 running", r.stderr
    for slot in (1, 2, 3):  # a line per task, the last one it got showing it running
        mine = [line.split() for line in err if line.split()[:1] == [f"web.{slot}"]]
        assert mine and mine[-1][2] == "running" and mine[-1][1] in ("h1", "h2"), r.stderr
    # when it returned, every task ran (as the agent that was asked sees them)
    assert sorted(t["state"] for t in rows(c, "h1", "web")) == ["running"] * 3

    r = c.ctl("h2", "service", "scale", "web=1")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines()[-1] == "web: converged, 1/1 running", r.stderr
    assert [t["task"] for t in rows(c, "h2", "web")] == ["web.1"]

    r = c.ctl("h1", "service", "rm", "web")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "removed: web\n"
    assert r.stderr.splitlines()[-1] == "web: removed, every task stopped", r.stderr
    eps = c.ctl_json("h1", "network", "inspect", "prog")["endpoints"]
    assert not [e for e in eps if e["service"] == "web"], eps


def test_timeout_names_what_is_missing_and_detach_returns_at_once(
        cluster: Callable[[int], Cluster]) -> None:
    c = cluster(2)
    c.network("prog")
    # nowhere to place it: gives up after --timeout, exit 1, one line with the reason
    r = c.ctl("h1", "service", "create", "lost", "--network", "prog", "--constraint",
              "node.name==h9", "--timeout", "2", "--", "sleep", "600")
    assert r.returncode == 1, r.stderr
    last = r.stderr.splitlines()[-1]
    assert last.startswith("meshctl: service create: lost: 0/1 tasks running after "), last
    assert "1 cannot be placed" in last, last
    assert c.ctl("h1", "service", "inspect", "lost").returncode == 0  # the change stays

    # a task that fails at once: its state and exit status are the reason
    r = c.ctl("h1", "service", "create", "dud", "--network", "prog", "--restart-condition",
              "none", "--timeout", "5", "--", "sh", "-c", "exit 3")
    assert r.returncode == 1
    print(r.stderr)
    assert "dud.1 on h" in r.stderr and "failed (exit 3)" in r.stderr, r.stderr

    # --detach: stored, not waited for, nothing on stderr
    r = c.ctl("h2", "service", "create", "quick", "--network", "prog", "--replicas", "2",
              "--detach", "--json", "--", "sleep", "600")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["name"] == "quick"
    wait(lambda: [t["state"] for t in rows(c, "h1", "quick")] == ["running"] * 2, 30,
         lambda: f"quick running: {rows(c, 'h1', 'quick')}")
    r = c.ctl("h2", "service", "rm", "quick", "-d")
    assert r.returncode == 0 and r.stderr == ""
