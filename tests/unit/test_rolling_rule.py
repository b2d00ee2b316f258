"""The rolling-update rule (meshnet/state/rolling.py) and its records (state/validate.py)."""

from __future__ import annotations

from typing import Any

import pytest

from meshnet.state.rolling import (
    RollingError,
    Rollout,
    SinceClock,
    TaskView,
    UpdateConfig,
    owner_failure,
    plan,
    rollback_value,
    rollout_of,
    update_config,
)
from meshnet.state.tables import SERVICES
from meshnet.state.validate import TASKS, check_value

NOW = 1_000_000.0
PLACED = {1: "h1", 2: "h2", 3: "h3", 4: "h1"}


def rollout(**kw: Any) -> Rollout:
    base: dict[str, Any] = {"name": "web", "version": 2, "previous_version": 1,
                            "previous_replicas": 4, "config": UpdateConfig(delay=5.0)}
    base.update(kw)
    return Rollout(**base)


def ready(slot: int, version: int = 2, age: float = 100.0, **kw: Any) -> TaskView:
    return TaskView(slot, PLACED[slot], version, "running", since=NOW - age, **kw)


def old(slot: int) -> TaskView:
    return ready(slot, version=1)


def test_a_service_never_updated_runs_its_spec_everywhere() -> None:
    p = plan(rollout(previous_version=None), PLACED, [old(1)], NOW)
    assert p.allowed == {1, 2, 3, 4} and p.status is None


def test_batches_go_in_slot_order_one_at_a_time() -> None:
    tasks = [old(s) for s in PLACED]
    assert plan(rollout(), PLACED, tasks, NOW).allowed == {1}
    tasks[0] = ready(1)
    assert plan(rollout(), PLACED, tasks, NOW).allowed == {1, 2}
    tasks[1] = ready(2)
    p = plan(rollout(), PLACED, tasks, NOW)
    assert p.allowed == {1, 2, 3}
    assert p.status is not None and p.status.state == "updating"
    assert p.status.message == "updating to version 2: 2/4 tasks on version 2"
    tasks[2] = ready(3, age=1.0)  # just started: not past the monitor period yet
    assert plan(rollout(), PLACED, tasks, NOW).status.message == (  # type: ignore[union-attr]
        "updating to version 2: 2/4 tasks on version 2 (1 more running it, within 5 s of "
        "starting)")


def test_a_batch_waits_for_the_delay_health_and_the_placed_node() -> None:
    others = [old(s) for s in (2, 3, 4)]
    assert plan(rollout(), PLACED, [ready(1, age=4.0), *others], NOW).allowed == {1}
    assert plan(rollout(), PLACED, [ready(1, age=6.0), *others], NOW).allowed == {1, 2}
    starting = ready(1, health="starting")
    assert plan(rollout(), PLACED, [starting, *others], NOW).allowed == {1}
    assert plan(rollout(), PLACED, [ready(1, health="healthy"), *others], NOW).allowed == {1, 2}
    elsewhere = TaskView(1, "h9", 2, "running", since=NOW - 100)  # not where placement puts 1
    assert plan(rollout(), PLACED, [elsewhere, *others], NOW).allowed == {1}
    failed = TaskView(1, "h1", 2, "failed", since=NOW - 100)
    assert plan(rollout(), PLACED, [failed, *others], NOW).allowed == {1}


def test_parallelism_two_and_all_at_once() -> None:
    tasks = [old(s) for s in PLACED]
    two = rollout(config=UpdateConfig(parallelism=2))
    assert plan(two, PLACED, tasks, NOW).allowed == {1, 2}
    assert plan(two, PLACED, [ready(1), ready(2), old(3), old(4)], NOW).allowed == {1, 2, 3, 4}
    assert plan(two, PLACED, [ready(1), old(2), old(3), old(4)], NOW).allowed == {1, 2}
    every = rollout(config=UpdateConfig(parallelism=0))
    assert plan(every, PLACED, tasks, NOW).allowed == {1, 2, 3, 4}


def test_slots_of_a_scale_up_start_at_once_and_unplaced_slots_hold_nothing() -> None:
    tasks = [old(1), old(2)]
    p = plan(rollout(previous_replicas=2), PLACED, tasks, NOW)
    assert p.allowed == {1, 3, 4}
    no_two = {1: "h1", 3: "h3", 4: "h1"}  # slot 2's node is gone and nowhere takes it
    assert plan(rollout(), no_two, [ready(1), old(3), old(4)], NOW).allowed == {1, 3}


def test_a_failure_pauses_after_its_batch_even_once_the_task_recovers() -> None:
    flagged = ready(2, update_failure="exited with code 1 0.3s after starting")
    p = plan(rollout(), PLACED, [ready(1), flagged, old(3), old(4)], NOW)
    assert p.allowed == {1, 2} and not p.rollback
    assert p.status is not None and p.status.state == "paused"
    assert p.status.message == ("update to version 2 paused: web.2 on h2 exited with code 1 "
                                "0.3s after starting")
    assert p.failure == "web.2 on h2 exited with code 1 0.3s after starting"


def test_a_failure_of_a_new_slot_freezes_the_batches_already_started() -> None:
    flagged = TaskView(4, "h1", 2, "failed", update_failure="exited with code 1 0.1s after "
                       "starting")
    p = plan(rollout(previous_replicas=3), PLACED, [ready(1), old(2), old(3), flagged], NOW)
    assert p.allowed == {1, 4}  # batch 0 started; batch 1 (slot 2) was due but does not start
    assert p.status is not None and p.status.state == "paused"


def test_failure_action_rollback_and_a_rollback_that_fails_pauses() -> None:
    flagged = ready(1, update_failure="turned unhealthy 2.0s after starting")
    tasks = [flagged, old(2), old(3), old(4)]
    p = plan(rollout(config=UpdateConfig(failure_action="rollback")), PLACED, tasks, NOW)
    assert p.rollback and p.status is not None and p.status.state == "rolling_back"
    back = rollout(version=3, previous_version=2, rollback_from=2, rollback_reason="x",
                   config=UpdateConfig(failure_action="rollback"))
    tasks = [ready(1, version=3, update_failure="exited with code 1 0.1s after starting")]
    p = plan(back, PLACED, tasks, NOW)
    assert not p.rollback and p.status is not None and p.status.state == "paused"
    assert p.status.message.startswith("rollback from version 2 paused: web.1 on h1")


def test_completion_waits_out_the_monitor() -> None:
    r = rollout(config=UpdateConfig(delay=0.0, monitor=5.0))
    tasks = [ready(s, age=3.0) for s in PLACED]
    p = plan(r, PLACED, tasks, NOW)
    assert p.allowed == {1, 2, 3, 4}
    assert p.status is not None and p.status.state == "updating"
    p = plan(r, PLACED, tasks, NOW + 2.0)
    assert p.status is not None and p.status.state == "completed"
    assert p.status.message == "4/4 tasks on version 2"
    back = rollout(version=3, previous_version=2, rollback_from=2, rollback_reason="why")
    p = plan(back, PLACED, [ready(s, version=3) for s in PLACED], NOW)
    assert p.status is not None and p.status.state == "rolled_back"
    assert p.status.message == "rolled back from version 2 (4/4 tasks on version 3): why"


def test_owner_failure() -> None:
    cfg = UpdateConfig(delay=2.0, monitor=5.0)

    def judge(now: float, state: str = "failed", code: int | None = 1,
              ready_since: float | None = 100.5, health: str | None = None) -> str | None:
        return owner_failure(config=cfg, now=now, run_started=100.0, ready_since=ready_since,
                             state=state, exit_code=code, health=health)

    assert judge(101.0) == "exited with code 1 1.0s after starting"
    assert judge(110.0) is None  # after the monitor, and it had been done
    assert judge(110.0, ready_since=None) == "exited with code 1 10.0s after starting"
    assert judge(110.0, ready_since=109.0) is not None  # stopped before its delay was up
    assert judge(101.0, state="complete", code=0, ready_since=None) is not None  # early end
    assert judge(110.0, state="complete", code=0) is None
    assert judge(101.0, state="running", health="unhealthy") == \
        "turned unhealthy 1.0s after starting"
    assert judge(101.0, state="running", code=None) is None


def test_since_clock_trusts_no_clock_ahead_of_ours() -> None:
    clock = SinceClock()
    assert clock.since("a", NOW + 60, NOW) == NOW  # owner's clock a minute ahead
    assert clock.since("a", NOW + 60, NOW + 10) == NOW  # counted from when we saw it
    assert clock.since("b", NOW - 30, NOW) == NOW - 30
    assert clock.since("c", None, NOW) == NOW
    clock.prune({("b", NOW - 30)})
    assert set(clock.first_seen) == {("b", NOW - 30)}


SPEC = {"networks": ["n"], "command": ["sleep", "1"]}
NEW_SPEC = {"networks": ["n"], "command": ["sleep", "2"]}


def service(**kw: Any) -> dict[str, Any]:
    value: dict[str, Any] = {"name": "web", "network": "n", "mode": "replicated",
                             "replicas": 4, "spec": NEW_SPEC, "version": 2,
                             "previous": {"spec": SPEC, "version": 1, "replicas": 3},
                             "update_config": UpdateConfig().to_value()}
    value.update(kw)
    return value


def test_rollback_value_is_the_previous_spec_one_version_on_and_deterministic() -> None:
    value = rollback_value(service(), "update to version 2 failed: web.1 on h1 exited")
    assert value == rollback_value(service(), "update to version 2 failed: web.1 on h1 exited")
    assert value is not None
    assert value["spec"] == SPEC and value["version"] == 3
    assert value["previous"] == {"spec": NEW_SPEC, "version": 2, "replicas": 4}
    assert value["rollback"] == {"from": 2, "reason":
                                 "update to version 2 failed: web.1 on h1 exited"}
    assert check_value(SERVICES, "web", value) is None
    r = rollout_of(value)
    assert (r.version, r.previous_version, r.rollback_from) == (3, 2, 2)
    assert rollback_value(service(previous=None), "x") is None


def test_update_config_checks() -> None:
    assert update_config(None) == UpdateConfig()
    assert update_config({"parallelism": 0, "delay": 1}) == UpdateConfig(0, 1.0)
    for bad in ({"parallelism": -1}, {"delay": float("nan")}, {"monitor": 1e9},
                {"failure_action": "continue"}, {"max_failure_ratio": 0.5}, [1]):
        with pytest.raises(RollingError):
            update_config(bad)


@pytest.mark.parametrize(("change", "why"), [
    ({"version": 0}, "version 0 < 1"),
    ({"previous": {"spec": SPEC, "version": 2}}, "previous version 2 > 1"),
    ({"previous": {"spec": {"networks": ["n"]}, "version": 1}}, "previous command"),
    ({"previous": {"spec": SPEC, "version": 1, "x": 1}}, "previous must be a map"),
    ({"update_config": {"parallelism": "2"}}, "parallelism"),
    ({"rollback": {"from": 2, "reason": "x"}}, "rollback from"),
    ({"rollback": {"from": 1}}, "rollback must be a map"),
])
def test_service_records_are_checked(change: dict[str, Any], why: str) -> None:
    problem = check_value(SERVICES, "web", service(**change))
    assert problem is not None and why in problem, problem


def test_task_records_carry_version_and_update_failure() -> None:
    task = {"task": "web.1", "service": "web", "slot": 1, "node": "h1", "state": "running",
            "version": 3, "update_failure": "exited with code 1 0.2s after starting"}
    assert check_value(TASKS, "web.1@h1", task) is None
    assert check_value(TASKS, "web.1@h1", {**task, "version": 0}) is not None
    assert check_value(TASKS, "web.1@h1", {**task, "update_failure": "x" * 301}) is not None
    assert check_value(TASKS, "web.1@h1", {**task, "update_failure": 3}) is not None


def test_once_no_task_runs_an_older_version_a_fresh_slot_starts_on_the_current_one() -> None:
    # slot 1's agent restarted (its record wiped); every other task already runs version 2
    tasks = [ready(2), ready(3), ready(4)]
    assert plan(rollout(), PLACED, tasks, NOW).allowed == {1, 2, 3, 4}
    # mid-update, the same restart keeps the rule: slot 4 still runs version 1
    assert plan(rollout(), PLACED, [ready(2), ready(3), old(4)], NOW).allowed == {1}
