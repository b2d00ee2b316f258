"""Membership on real hosts: a 5-host lab split in two and healed, with no restart."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest

from meshnet.lab import Lab

pytestmark = pytest.mark.netns

LabFactory = Callable[[], Lab]


def views(lab: Lab, hosts: list[str]) -> dict[str, dict[str, str]]:
    out = {}
    for h in hosts:
        r = lab.ctl(h, ["--json", "members"], capture_output=True, timeout=20)
        out[h] = {m["name"]: m["state"] for m in json.loads(r.stdout)} if r.returncode == 0 else {}
    return out


def wait_views(lab: Lab, hosts: list[str], want: Callable[[str, str], str], timeout: float,
               what: str) -> None:
    deadline = time.monotonic() + timeout
    last: dict[str, dict[str, str]] = {}
    while time.monotonic() < deadline:
        last = views(lab, hosts)
        if all(last[h].get(o) == want(h, o) for h in hosts for o in hosts if o != h):
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}; views: {last}")


def test_partition_marks_the_other_side_dead_and_heal_merges(lab_factory: LabFactory) -> None:
    lab = lab_factory()
    lab.up(5, profile="lan-fast")
    hosts = [f"h{i}" for i in range(1, 6)]
    wait_views(lab, hosts, lambda h, o: "alive", 30, "all five alive")
    pids = {s.name: s.pid for s in lab.status()}

    left, right = hosts[:2], hosts[2:]
    lab.partition([left, right])

    def split(h: str, o: str) -> str:
        return "alive" if (h in left) == (o in left) else "dead"

    t0 = time.monotonic()
    wait_views(lab, hosts, split, 60, "each side to hold the other dead")
    print(f"split seen after {time.monotonic() - t0:.1f} s")

    lab.heal()
    t0 = time.monotonic()
    wait_views(lab, hosts, lambda h, o: "alive", 90, "one alive view after heal")
    print(f"merged {time.monotonic() - t0:.1f} s after the heal")
    # no agent was restarted to get there
    assert {s.name: s.pid for s in lab.status()} == pids
