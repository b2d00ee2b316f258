"""Fuzz health checks (issue 17): a spec's `health`, the --health-* request keys and the health
fields of task and endpoint records are hostile input; the monitor keeps Docker's invariants
under any sequence of probe results."""

from __future__ import annotations

import math
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.health import (
    HEALTH_KEYS,
    HEALTH_STATES,
    HEALTHY,
    STARTING,
    UNHEALTHY,
    HealthError,
    HealthMonitor,
    HealthSpec,
    health_from_args,
)
from meshnet.state.validate import check_value

SCALARS = (st.none() | st.booleans() | st.integers(-(1 << 64), 1 << 64)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
           | st.binary(max_size=4))
ANY = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                   | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
NUMBERS = (st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 200_000)
           | st.sampled_from([0.1, 0.5, 30, 86_400, 86_400.5, 0.0999]))
CMDS = (st.lists(st.text(max_size=20), max_size=70)
        | st.sampled_from([["/bin/sh", "-c", "true"], [""], ["x" * 5000], ["a\0"]]) | ANY)


@st.composite
def health_values(draw: st.DrawFn) -> Any:
    """A `health` map near a valid one: each key present or not, valid-looking or not, and
    sometimes a stranger key or no map at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(ANY)
    value: dict[Any, Any] = {}
    if draw(st.booleans()) or draw(st.booleans()):
        value["cmd"] = draw(CMDS)
    for key in ("interval", "timeout", "start_period"):
        if draw(st.booleans()):
            value[key] = draw(NUMBERS | ANY)
    if draw(st.booleans()):
        value["retries"] = draw(st.integers(-2, 200) | ANY)
    if draw(st.integers(0, 5)) == 0:
        value[draw(st.text(max_size=8))] = draw(ANY)
    return value


def service(health: Any) -> dict[str, Any]:
    return {"name": "web", "network": "n1", "mode": "replicated", "replicas": 1,
            "spec": {"networks": ["n1"], "command": ["sleep", "9"], "health": health}}


@settings(max_examples=300, deadline=None)
@given(health_values())
def test_spec_check_agrees_with_the_schema_and_round_trips(value: Any) -> None:
    try:
        spec = HealthSpec.from_value(value)
    except HealthError as e:
        assert str(e) and "\n" not in str(e)
        why = check_value("services", "web", service(value))
        if value is not None:  # None is "no check", which the schema allows
            assert why is not None and "health" in why
        return
    assert check_value("services", "web", service(value)) is None
    assert HealthSpec.from_value(spec.to_value()) == spec
    assert set(spec.to_value()) == set(HEALTH_KEYS)
    assert 0.1 <= spec.interval <= 86_400 and 0.1 <= spec.timeout <= 86_400
    assert 1 <= spec.retries <= 100 and math.isfinite(spec.start_period)


ARGS = st.fixed_dictionaries({}, optional={
    "health_cmd": st.text(max_size=30) | ANY,
    "health_interval": NUMBERS | ANY, "health_timeout": NUMBERS | ANY,
    "health_retries": st.integers(-2, 200) | ANY, "health_start_period": NUMBERS | ANY,
    "no_healthcheck": st.booleans() | ANY})


@settings(max_examples=300, deadline=None)
@given(ARGS, st.none() | health_values())
def test_flags_give_a_valid_check_or_one_line(args: dict[str, Any], current: Any) -> None:
    try:
        got = health_from_args(args, current)
    except HealthError as e:
        assert str(e) and "\n" not in str(e)
        return
    if got is not None:
        assert HealthSpec.from_value(got).to_value() == got
        assert check_value("services", "web", service(got)) is None


@settings(max_examples=300, deadline=None)
@given(ANY, ANY)
def test_record_health_fields_are_checked(health: Any, since: Any) -> None:
    task = {"task": "web.1", "service": "web", "slot": 1, "node": "h1", "state": "running",
            "ip": "10.1.0.5", "restarts": 0, "health": health, "since": since}
    why = check_value("tasks", "web.1@h1", task)
    good_since = type(since) in (int, float) and math.isfinite(since) and 0 <= since <= 1e12
    assert (why is None) == (health in HEALTH_STATES and good_since)
    endpoint = {"name": "web.1", "network": "n1", "ip": "10.1.0.5",
                "mac": "02:42:0a:01:00:05", "node": "h1", "health": health}
    assert (check_value("endpoints", "n1/web.1@h1", endpoint) is None) == \
        (health in HEALTH_STATES)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5), st.floats(0, 5), st.floats(0.1, 3),
       st.lists(st.tuples(st.booleans(), st.floats(0, 4)), max_size=40))
def test_monitor_keeps_dockers_invariants(retries: int, start_period: float, interval: float,
                                          probes: list[tuple[bool, float]]) -> None:
    spec = HealthSpec(("true",), interval=interval, retries=retries, start_period=start_period)
    m = HealthMonitor(spec, started_at=0.0)
    passed_once = False
    for passed, took in probes:
        start = m.next_probe_at
        before, streak = m.status, m.failing_streak
        changed = m.probe_done(start, start + took, passed)
        assert changed == (m.status if m.status != before else None)
        assert m.next_probe_at == max(start + interval, start + took)
        if passed:
            passed_once = True
            assert m.status == HEALTHY and m.failing_streak == 0
        else:
            counted = not (before == STARTING and start < start_period)
            assert m.failing_streak == streak + counted
            assert (m.status == UNHEALTHY) == (m.failing_streak >= retries or
                                               before == UNHEALTHY)
        assert m.status != STARTING or not passed_once  # never back to starting
