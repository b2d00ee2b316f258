"""An agent whose state dir fills up: writes through the cluster go on everywhere, that agent
logs one line (no stack trace), counts, stays alive, and writes everything once space returns;
it also starts on a state dir that is already full."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Cluster, wait

from meshnet.lab import Lab

pytestmark = pytest.mark.netns

LabFactory = Callable[[], Lab]
HOSTS = ["h1", "h2", "h3"]


def store(c: Cluster, host: str) -> dict[str, Any]:
    return dict(c.ctl_json(host, "status")["store"])


def networks(c: Cluster, host: str) -> set[str]:
    r = c.ctl(host, "--json", "network", "ls")
    return {n["name"] for n in json.loads(r.stdout)} if r.returncode == 0 else set()


def log_lines(lab: Lab, host: str) -> list[str]:
    return lab.log_path(host).read_text(errors="replace").splitlines()


def test_full_state_dir_fails_cleanly_and_catches_up(lab_factory: LabFactory) -> None:
    lab = lab_factory()
    lab.up(3, profile="lan-fast", tmpfs_state={"h3": 1 << 20})
    c = Cluster(lab)
    wait(lambda: all(sum(m["state"] == "alive" for m in c.ctl_json(h, "members")) == 3
                     for h in HOSTS), 30, "membership to converge")
    c.network("before")
    assert lab.fill_state("h3") > 0

    made = set()
    for i, h in enumerate(["h1", "h3", "h2", "h3"]):  # through the full host too
        name = f"full{i}"
        r = c.ctl(h, "network", "create", name)
        assert r.returncode == 0, r.stderr
        made.add(name)
    wait(lambda: all(made | {"before"} <= networks(c, h) for h in HOSTS), 20,
         "every write on every host")
    s = store(c, "h3")
    assert s["save_errors"] > 0 and s["disk_full"] is True and s["unsaved"] > 0, s
    assert store(c, "h1")["save_errors"] == 0
    assert all(x.running for x in lab.status())
    lines = log_lines(lab, "h3")
    assert not [ln for ln in lines if "Traceback" in ln]
    assert len([ln for ln in lines if "cannot save the store" in ln]) == 1

    lab.free_state("h3")
    wait(lambda: (lambda s: s["unsaved"] == 0 and not s["disk_full"])(store(c, "h3")), 20,
         "h3's store to catch up on disk")
    assert len([ln for ln in log_lines(lab, "h3") if "saved to disk again" in ln]) == 1

    # What h3 holds now comes from its own disk: restarted cut off from its peers.
    lab.kill("h3")
    lab.partition([["h1", "h2"], ["h3"]])
    lab.start("h3")
    assert made | {"before"} <= networks(c, "h3")
    lab.heal()

    # It starts on a state dir that is already full (node.json cannot be rewritten) and runs on.
    lab.fill_state("h3")
    c.ctl("h1", "network", "create", "whilefull")
    lab.kill("h3")
    lab.start("h3")
    s = store(c, "h3")
    assert s["disk_full"] is True and s["files_unsaved"] >= 1, s
    wait(lambda: "whilefull" in networks(c, "h3"), 20, "h3 to learn a write made while full")
    lab.free_state("h3")
    wait(lambda: (lambda s: s["unsaved"] == 0 and s["files_unsaved"] == 0)(store(c, "h3")), 20,
         "h3 to write everything after the restart")
    lines = log_lines(lab, "h3")
    assert not [ln for ln in lines if "Traceback" in ln]
    assert len([ln for ln in lines if "node.json: the disk is full" in ln]) == 1
