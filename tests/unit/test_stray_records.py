"""An agent withdraws its own records that nothing of its own stands behind: a task record or a
sandbox endpoint it wrote, lost with an unsaved store (a full disk, then a restart), and handed
back by a peer. Only the owner may delete them, so nobody else ever would (the 30-minute chaos
soak found one resolving a dead address for good)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from test_store_sig import T0, Authority, node

from meshnet.agent.sandboxes import Sandboxes
from meshnet.agent.services import Services

EP = {"name": "web.1", "network": "n", "ip": "10.0.0.5", "mac": "02:42:0a:00:00:05",
      "node": "h1", "service": "web", "slot": 1, "sandbox": "mnlab-s-h1-web.1"}


def fake(store: Any, **kw: Any) -> SimpleNamespace:
    return SimpleNamespace(store=store, node="h1", state=SimpleNamespace(changed=lambda: None),
                           **kw)


def test_own_sandbox_endpoints_without_a_sandbox_are_withdrawn() -> None:
    s = node("h1", Authority("h1"))
    s.put("endpoints", "n/web.1@h1", EP, T0)  # a lost sandbox's
    s.put("endpoints", "n/web.2@h1", {**EP, "name": "web.2", "slot": 2}, T0)  # a live one
    s.put("endpoints", "n/web.3@h1", {**EP, "name": "web.3", "slot": 3}, T0)  # being claimed
    s.put("endpoints", "n/db@h1", {**EP, "name": "db", "service": None, "slot": None,
                                   "sandbox": ""}, T0)  # `endpoint add`: no sandbox
    s.put("endpoints", "n/host-h1@h1", {**EP, "name": "host-h1", "kind": "host"}, T0)
    live = {"ns": SimpleNamespace(key="n/web.2@h1")}
    sb = fake(s, live=live, claiming={"n/web.3@h1"})
    assert Sandboxes.sweep_strays(sb) == 1  # type: ignore[arg-type]
    assert sorted(s.view("endpoints")) == ["n/db@h1", "n/host-h1@h1", "n/web.2@h1",
                                           "n/web.3@h1"]
    assert Sandboxes.sweep_strays(sb) == 0  # type: ignore[arg-type]


def test_own_task_records_without_a_task_are_withdrawn() -> None:
    s = node("h1", Authority("h1"))
    rec = {"task": "web.1", "service": "web", "slot": 1, "node": "h1", "state": "running"}
    s.put("tasks", "web.1@h1", rec, T0)  # lost
    s.put("tasks", "web.2@h1", {**rec, "task": "web.2", "slot": 2}, T0)  # runs
    s.put("tasks", "web.3@h1", {**rec, "task": "web.3", "slot": 3}, T0)  # handed over
    svc = fake(s, tasks={"web.2": object()}, _handed_over={"web.3"},
               counters={"stray_records_removed": 0},
               sandboxes=SimpleNamespace(sweep_strays=lambda: 0))
    Services._sweep_strays(svc)  # type: ignore[arg-type]
    assert sorted(s.view("tasks")) == ["web.2@h1", "web.3@h1"]
    assert svc.counters["stray_records_removed"] == 1
