"""Properties of the rolling-update rule (meshnet/state/rolling.py) and a fuzz of the records
it reads (state/validate.py)."""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.state.rolling import Rollout, TaskView, UpdateConfig, plan, rollout_of, task_view
from meshnet.state.tables import SERVICES
from meshnet.state.validate import TASKS, check_value

NODES = ["h1", "h2", "h3"]
NOW = 10_000.0


@st.composite
def situations(draw: st.DrawFn) -> tuple[Rollout, dict[int, str], list[TaskView]]:
    slots = draw(st.lists(st.integers(1, 12), min_size=0, max_size=10, unique=True))
    placement = {s: draw(st.sampled_from(NODES)) for s in slots}
    config = UpdateConfig(parallelism=draw(st.integers(0, 4)),
                          delay=draw(st.sampled_from([0.0, 1.0, 5.0])),
                          failure_action=draw(st.sampled_from(["pause", "rollback"])),
                          monitor=draw(st.sampled_from([0.0, 5.0])))
    r = Rollout("svc", 3, 2, draw(st.none() | st.integers(0, 12)), False, config)
    tasks = []
    for s in slots:
        if draw(st.booleans()):
            node = placement[s] if draw(st.integers(0, 4)) else draw(st.sampled_from(NODES))
            tasks.append(TaskView(
                s, node, draw(st.sampled_from([1, 2, 3])),
                draw(st.sampled_from(["running", "starting", "failed"])),
                draw(st.sampled_from([None, "starting", "healthy", "unhealthy"])),
                NOW - draw(st.sampled_from([0.0, 0.5, 2.0, 100.0])),
                draw(st.sampled_from([None, None, None, "exited with code 1 0.1s after"]))))
    return r, placement, tasks


def rolling_order(r: Rollout, placement: dict[int, str]) -> list[int]:
    return sorted(s for s in placement
                  if r.previous_replicas is None or s <= r.previous_replicas)


@given(situations(), st.randoms(use_true_random=False))
def test_every_node_reaches_the_same_answer_whatever_order_it_reads(
        sit: tuple[Rollout, dict[int, str], list[TaskView]], rnd: random.Random) -> None:
    r, placement, tasks = sit
    shuffled = list(tasks)
    rnd.shuffle(shuffled)
    items = list(placement.items())
    rnd.shuffle(items)
    assert plan(r, placement, tasks, NOW) == plan(r, dict(items), shuffled, NOW)


@given(situations())
def test_the_allowed_slots_are_a_prefix_of_the_order_and_at_most_one_batch_is_unfinished(
        sit: tuple[Rollout, dict[int, str], list[TaskView]]) -> None:
    r, placement, tasks = sit
    p = plan(r, placement, tasks, NOW)
    order = rolling_order(r, placement)
    allowed = [s for s in order if s in p.allowed]
    assert allowed == order[:len(allowed)]  # in ascending slot order, no gap
    grown = set(placement) - set(order)
    assert grown <= p.allowed  # a scale-up's slots start on the new version at once
    at = {(t.slot, t.node): t for t in tasks}

    def done(s: int) -> bool:
        t = at.get((s, placement[s]))
        return (t is not None and t.version == r.version and t.ready and t.since is not None
                and NOW - t.since >= r.config.delay)

    unfinished = [s for s in allowed if not done(s)]
    if r.config.parallelism and any(t.version != r.version for t in tasks):
        assert len(unfinished) <= r.config.parallelism


@given(situations())
def test_waiting_longer_never_takes_a_slot_back(
        sit: tuple[Rollout, dict[int, str], list[TaskView]]) -> None:
    r, placement, tasks = sit
    assert plan(r, placement, tasks, NOW).allowed <= plan(r, placement, tasks, NOW + 50).allowed


@settings(max_examples=60)
@given(st.integers(0, 9), st.integers(0, 4), st.sampled_from([0.0, 2.0]),
       st.integers(0, 2**32 - 1))
def test_an_update_without_failures_finishes(n: int, parallelism: int, delay: float,
                                             seed: int) -> None:
    """Nodes that follow the rule (start an allowed slot on the new version, which becomes
    ready a random while later) bring every slot to the new version, in ascending batches."""
    rnd = random.Random(seed)
    placement = {s: rnd.choice(NODES) for s in range(1, n + 1)}
    r = Rollout("svc", 2, 1, n, False, UpdateConfig(parallelism, delay, "pause", 1.0))
    tasks = {s: TaskView(s, placement[s], 1, "running", since=0.0) for s in placement}
    now, started_order = 0.0, []
    for _ in range(10 * n + 10):
        now += 1.0
        p = plan(r, placement, tasks.values(), now)
        if p.status is not None and p.status.state == "completed":
            break
        for s in sorted(p.allowed):
            t = tasks[s]
            if t.version != 2:
                started_order.append(s)
                tasks[s] = TaskView(s, placement[s], 2, "starting", since=now)
            elif t.state == "starting" and rnd.random() < 0.5:
                tasks[s] = TaskView(s, placement[s], 2, "running", since=now)
    assert all(t.version == 2 and t.state == "running" for t in tasks.values())
    assert started_order == sorted(placement)


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 2**54) | st.floats(allow_nan=True) |
    st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8)
_spec = {"networks": ["n"], "command": ["true"]}


@st.composite
def service_values(draw: st.DrawFn) -> dict[str, Any]:
    value: dict[str, Any] = {"name": "web", "network": "n", "spec": _spec}
    fields = {
        "version": st.integers(-1, 5) | _values,
        "previous": st.fixed_dictionaries(
            {"spec": st.just(_spec) | _values, "version": st.integers(-1, 5) | _values},
            optional={"replicas": st.integers(-1, 3) | _values}) | _values,
        "update_config": st.fixed_dictionaries({}, optional={
            "parallelism": st.integers(-1, 20_000) | _values,
            "delay": st.floats(allow_nan=True) | _values,
            "failure_action": st.sampled_from(["pause", "rollback", "x"]) | _values,
            "monitor": st.floats(-1, 1e6) | _values,
            "other": _values}) | _values,
        "rollback": st.fixed_dictionaries({}, optional={
            "from": st.integers(-1, 5) | _values, "reason": st.text(max_size=400) | _values}),
    }
    for key, strategy in fields.items():
        if draw(st.booleans()):
            value[key] = draw(strategy)
    return value


@settings(max_examples=300)
@given(service_values())
def test_service_fields_are_checked_and_whatever_is_stored_reads(value: dict[str, Any]) -> None:
    problem = check_value(SERVICES, "web", value)  # never raises
    if problem is None:
        r = rollout_of(value)
        assert r.version == value.get("version", 1)
        if value.get("previous") is not None:
            assert r.previous_version == value["previous"]["version"] < r.version
        plan(r, {1: "h1", 2: "h2"}, [], NOW)


@settings(max_examples=200)
@given(st.fixed_dictionaries({"task": st.just("web.1"), "service": st.just("web"),
                              "slot": st.just(1), "node": st.just("h1"),
                              "state": st.just("running")},
                             optional={"version": st.integers(-1, 2**54) | _values,
                                       "update_failure": st.text(max_size=400) | _values,
                                       "since": st.floats(allow_nan=True) | _values}))
def test_task_fields_are_checked_and_read(value: dict[str, Any]) -> None:
    if check_value(TASKS, "web.1@h1", value) is None:
        view = task_view(value)
        assert view is not None and view.version == value.get("version", 1)
