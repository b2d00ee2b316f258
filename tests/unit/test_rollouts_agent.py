"""The agent's side of rolling updates (meshnet/agent/rollouts.py): the value `service update`
and `service rollback` write, which spec a slot starts on, when a running task is replaced, and
what the owner writes into its task record."""

from __future__ import annotations

from typing import Any

import pytest

from meshnet.agent.control import OpError
from meshnet.agent.rollouts import OwnerWatch, Rollouts, manual_rollback, updated_value
from meshnet.state.rolling import UpdateConfig
from meshnet.state.tables import Service

SPEC = {"networks": ["n"], "command": ["serve"], "env": {"A": "1", "B": "2"},
        "constraints": ["node.name!=h9"], "containment": {"memory": 64 << 20},
        "max_per_node": None, "restart": {"condition": "any"}}


def web(**extra: Any) -> Service:
    svc = Service.from_value({"name": "web", "network": "n", "replicas": 4, "spec": SPEC,
                              **extra})
    assert svc is not None
    return svc


def test_update_changes_the_spec_and_keeps_what_it_replaces() -> None:
    value, changed = updated_value(web(), {
        "env_add": ["A=9", "C=3"], "env_rm": ["B"], "constraint_add": ["node.name!=h8"],
        "constraint_rm": ["node.name!=h9"], "limit_memory": "0", "limit_pids": "50",
        "health_cmd": "true", "update_parallelism": 2, "command": ["serve", "--v2"]})
    assert changed and value["version"] == 2
    spec = value["spec"]
    assert spec["env"] == {"A": "9", "C": "3"} and spec["constraints"] == ["node.name!=h8"]
    assert spec["containment"] == {"pids": 50} and spec["command"] == ["serve", "--v2"]
    assert spec["health"]["cmd"] == ["/bin/sh", "-c", "true"]
    assert value["previous"] == {"spec": SPEC, "version": 1, "replicas": 4}
    assert value["update_config"]["parallelism"] == 2


def test_replicas_and_policy_alone_change_no_version() -> None:
    value, changed = updated_value(web(), {"replicas": 6, "update_delay": 2.0})
    assert not changed and "version" not in value and "previous" not in value
    assert value["replicas"] == 6 and value["update_config"]["delay"] == 2.0


@pytest.mark.parametrize(("args", "why"), [
    ({"constraint_rm": ["node.name==x"]}, "no such constraint"),
    ({"constraint_add": ["node.colour~red"]}, "bad constraint"),
    ({"env_add": ["novalue"]}, "--env-add"),
    ({"limit_cpu": "lots"}, "--limit-cpu"),
    ({"update_parallelism": -1}, "--update-parallelism"),
    ({"update_failure_action": "continue"}, "--update-failure-action"),
    ({"health_interval": 5.0}, "--health-interval needs --health-cmd"),
    ({"replicas": -1}, "--replicas"),
])
def test_bad_updates_say_why(args: dict[str, Any], why: str) -> None:
    with pytest.raises(OpError, match=why):
        updated_value(web(), args)


def test_manual_rollback() -> None:
    with pytest.raises(OpError, match="no previous spec"):
        manual_rollback(web())
    value, _ = updated_value(web(), {"env_add": ["A=2"]})
    svc = Service.from_value(value)
    assert svc is not None
    back = manual_rollback(svc)
    assert back["spec"] == SPEC and back["version"] == 3 and back["rollback"]["from"] == 2


def test_slots_start_and_get_replaced_by_the_rule() -> None:
    value, _ = updated_value(web(), {"env_add": ["A=2"]})
    svc = Service.from_value(value)
    assert svc is not None
    placed = {1: "h1", 2: "h2", 3: "h1", 4: "h2"}
    old = {f"web.{s}@{n}": {"task": f"web.{s}", "service": "web", "slot": s, "node": n,
                            "state": "running", "since": 0.0} for s, n in placed.items()}
    r = Rollouts()
    r.update({"web": svc}, {"web": placed}, old, 100.0)
    assert r.target(svc, 1).version == 2 and r.target(svc, 1).monitored
    assert r.target(svc, 2).version == 1 and r.target(svc, 2).spec == SPEC  # not its turn
    assert r.due(svc, 1, SPEC, 1) and not r.due(svc, 2, SPEC, 1)
    assert not r.due(svc, 3, dict(svc.spec), 2)  # on the new spec: never taken back
    assert r.rollbacks() == []


def test_the_owner_flags_a_failure_once_and_only_while_watched() -> None:
    w = OwnerWatch(version=2, monitored=True, config=UpdateConfig(monitor=5.0))
    w.started(100.0)
    assert w.record(now=100.2, state="running", exit_code=None, health=None,
                    stopping=False) == {"version": 2}
    out = w.record(now=101.0, state="failed", exit_code=1, health=None, stopping=False)
    assert out == {"version": 2, "update_failure": "exited with code 1 1.0s after starting"}
    w.started(102.0)  # restarted: the failure stays on the record
    assert w.record(now=102.1, state="running", exit_code=1, health=None,
                    stopping=False)["update_failure"].startswith("exited with code 1 1.0s")
    calm = OwnerWatch(version=2, monitored=False)
    assert calm.record(now=1.0, state="failed", exit_code=1, health=None,
                       stopping=False) == {"version": 2}
    stopped = OwnerWatch(version=2, monitored=True)
    assert "update_failure" not in stopped.record(now=1.0, state="failed", exit_code=143,
                                                  health=None, stopping=True)


def test_a_task_whose_spec_comes_back_is_relabelled_not_restarted() -> None:
    value, _ = updated_value(web(), {"env_add": ["A=2"]})
    svc = Service.from_value(value)
    assert svc is not None
    back = Service.from_value(manual_rollback(svc))
    assert back is not None
    assert Rollouts.relabel(back, SPEC, 1) == 3  # it never left SPEC
    assert Rollouts.relabel(back, dict(svc.spec), 2) is None  # runs the rolled-back spec
    assert Rollouts.relabel(back, SPEC, 3) is None
