"""Membership on real hosts: a partition that outlasts ``reap_after`` heals with no restart.

Each side declares the other dead, then reaps it (forgets it). After the heal both sides must
still find each other: the core keeps reaped-while-dead members' addresses and keeps trying
them (serf's reconnect), and a push-pull tells a member it was declared dead so it refutes
with an alive the other side's tombstones accept (docs/design.md §8, Membership).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from meshnet.lab import Lab

pytestmark = pytest.mark.netns

LabFactory = Callable[[], Lab]

# Shortened from lan-fast's 30 s so that the test stays short; the partition outlasts it.
REAP_AFTER_S = 15.0
# After the heal, every host sees every host alive within this (lan-fast: reconnect every 5 s;
# measured ~1-6 s).
MERGE_BOUND_S = 30.0


def views(lab: Lab, hosts: list[str]) -> dict[str, dict[str, str]]:
    out = {}
    for h in hosts:
        r = lab.ctl(h, ["--json", "members"], capture_output=True, timeout=20)
        out[h] = {m["name"]: m["state"] for m in json.loads(r.stdout)} if r.returncode == 0 else {}
    return out


def wait_views(lab: Lab, hosts: list[str], ok: Callable[[dict[str, dict[str, str]]], bool],
               timeout: float, what: str) -> float:
    """Poll every host's member list until OK holds; the seconds it took."""
    start = time.monotonic()
    last: dict[str, dict[str, str]] = {}
    while time.monotonic() - start < timeout:
        last = views(lab, hosts)
        if ok(last):
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; views: {last}")


def test_partition_longer_than_reap_after_merges_back_without_restart(
        lab_factory: LabFactory, tmp_path: Path) -> None:
    conf = tmp_path / "meshnetd.toml"
    conf.write_text(f"[membership]\nreap_after = {REAP_AFTER_S}\n")
    lab = lab_factory()
    lab.up(4, profile="lan-fast", agent_args=["--config", str(conf)])
    hosts = ["h1", "h2", "h3", "h4"]
    left, right = hosts[:2], hosts[2:]

    def all_alive(v: dict[str, dict[str, str]]) -> bool:
        return all(v[h].get(o) == "alive" for h in hosts for o in hosts)

    wait_views(lab, hosts, all_alive, 30, "all four alive")
    pids = {s.name: s.pid for s in lab.status()}
    assert all(pids.values()), pids

    lab.partition([left, right])
    cut = time.monotonic()

    def reaped(v: dict[str, dict[str, str]]) -> bool:
        # Each side alive to itself and has forgotten the other side entirely.
        return all(set(v[h]) == set(side) and all(v[h][o] == "alive" for o in side)
                   for side in (left, right) for h in side)

    wait_views(lab, hosts, reaped, 60 + REAP_AFTER_S, "each side to reap the other")
    held = time.monotonic() - cut
    assert held > REAP_AFTER_S

    lab.heal()
    took = wait_views(lab, hosts, all_alive, MERGE_BOUND_S, "all four alive after the heal")
    print(f"partition held {held:.1f}s (reap_after {REAP_AFTER_S:g}s); merged {took:.1f}s "
          "after the heal")
    # No agent was restarted to get there.
    assert {s.name: s.pid for s in lab.status()} == pids
