"""Health checks (issue 17): the spec and flags, Docker's state machine, the probe loop on a fake
clock, the task record's fields, events, validation and meshctl's rendering. No namespaces."""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
from types import MappingProxyType
from typing import Any

import pytest

from meshnet.agent.eventhub import store_event
from meshnet.agent.health import TIMED_OUT, HealthCheck, TaskHealth
from meshnet.cli import meshctl
from meshnet.cli.health_flags import retries_arg, seconds_arg
from meshnet.containment import Containment
from meshnet.health import (
    HEALTHY,
    LOG_PROBES,
    STARTING,
    UNHEALTHY,
    HealthError,
    HealthMonitor,
    HealthSpec,
    OutputTail,
    describe,
    health_from_args,
    health_spec,
)
from meshnet.platform import container, launch
from meshnet.state.types import ChangeEvent
from meshnet.state.validate import check_value

CMD = ["/bin/sh", "-c", "test -e /tmp/ok"]
FULL = {"cmd": CMD, "interval": 30.0, "timeout": 30.0, "retries": 3, "start_period": 0.0}


# --- the spec and the flags ------------------------------------------------------------------

def test_spec_takes_dockers_defaults_and_round_trips() -> None:
    spec = HealthSpec.from_value({"cmd": CMD})
    assert spec.to_value() == FULL
    assert HealthSpec.from_value(spec.to_value()) == spec
    assert health_spec(None) is None


@pytest.mark.parametrize("value, why", [
    ({"cmd": []}, "non-empty"),
    ({"cmd": "test -e /x"}, "list"),
    ({"cmd": ["", "x"]}, "program is empty"),
    ({"cmd": ["sh", "a\0b"]}, "NUL"),
    ({"cmd": ["x"] * 65}, "more than 64"),
    ({"cmd": ["x" * 4097]}, "longer than 4096"),
    ({"cmd": CMD, "interval": 0.05}, "interval must be 0.1..86400"),
    ({"cmd": CMD, "timeout": 86401}, "timeout must be"),
    ({"cmd": CMD, "interval": float("nan")}, "interval"),
    ({"cmd": CMD, "interval": True}, "number"),
    ({"cmd": CMD, "retries": 0}, "retries"),
    ({"cmd": CMD, "retries": 101}, "retries"),
    ({"cmd": CMD, "retries": 2.0}, "retries"),
    ({"cmd": CMD, "start_period": -1}, "start_period"),
    ({"cmd": CMD, "start_interval": 1}, "unknown key"),
    ([CMD], "must be a map"),
])
def test_spec_refuses_with_one_line(value: Any, why: str) -> None:
    with pytest.raises(HealthError, match=why) as e:
        HealthSpec.from_value(value)
    assert "\n" not in str(e.value)


def test_flags_make_a_shell_check_with_defaults() -> None:
    got = health_from_args({"health_cmd": "test ! -e /tmp/sick", "health_interval": 0.5,
                            "health_retries": 2})
    assert got == {"cmd": ["/bin/sh", "-c", "test ! -e /tmp/sick"], "interval": 0.5,
                   "timeout": 30.0, "retries": 2, "start_period": 0.0}
    assert health_from_args({}) is None
    assert health_from_args({"no_healthcheck": True}) is None


def test_update_keeps_what_no_flag_changes_and_can_remove_the_check() -> None:
    current = {**FULL, "interval": 5.0}
    assert health_from_args({}, current) == current
    assert health_from_args({"health_timeout": 2}, current) == {**current, "timeout": 2.0}
    assert health_from_args({"health_cmd": "true"}, current)["cmd"] == ["/bin/sh", "-c", "true"]
    assert health_from_args({"no_healthcheck": True}, current) is None


@pytest.mark.parametrize("args, why", [
    ({"health_interval": 5}, "--health-interval needs --health-cmd"),
    ({"health_cmd": "  "}, "--health-cmd needs a command"),
    ({"health_cmd": "true", "health_interval": 0.01}, "--health-interval must be 0.1"),
    ({"health_cmd": "true", "health_retries": 0}, "--health-retries must be"),
    ({"health_cmd": "true", "health_start_period": "1m"}, "--health-start-period must be a"),
    ({"health_cmd": "true", "no_healthcheck": True}, "--no-healthcheck conflicts"),
])
def test_flags_are_refused_in_their_own_words(args: dict[str, Any], why: str) -> None:
    with pytest.raises(HealthError, match=why):
        health_from_args(args)


def test_meshctl_durations_and_retries() -> None:
    assert [seconds_arg(t) for t in ("30", "2.5", "30s", "500ms", "1m30s")] == \
        [30.0, 2.5, 30.0, 0.5, 90.0]
    for bad in ("-1", "1e3", "fast", "2d"):
        with pytest.raises(argparse.ArgumentTypeError):
            seconds_arg(bad)
    assert retries_arg("3") == 3
    for bad in ("0", "101", "x", "99999999999999999999"):
        with pytest.raises(argparse.ArgumentTypeError):
            retries_arg(bad)
    ns = meshctl.build_parser().parse_args(
        ["service", "create", "web", "--network", "n", "--health-cmd", "test -e /ok",
         "--health-interval", "500ms", "--health-retries", "2"])
    ns.command = ["sleep", "9"]  # meshctl splits the command off at `--` first
    _, op, args = meshctl.to_request(ns)
    assert op == "service.create"
    assert health_from_args(args) == {"cmd": ["/bin/sh", "-c", "test -e /ok"], "interval": 0.5,
                                      "timeout": 30.0, "retries": 2, "start_period": 0.0}


# --- Docker's state machine ------------------------------------------------------------------

def test_one_pass_is_healthy_and_retries_failures_in_a_row_unhealthy() -> None:
    m = HealthMonitor(HealthSpec(tuple(CMD), interval=1.0, retries=3), started_at=100.0)
    assert m.status == STARTING and m.next_probe_at == 101.0
    assert m.probe_done(101.0, 101.1, passed=True) == HEALTHY
    assert m.probe_done(102.0, 102.1, passed=False) is None
    assert m.probe_done(103.0, 103.1, passed=False) is None
    assert m.probe_done(104.0, 104.1, passed=True) is None  # the streak starts again
    assert [m.probe_done(t, t + 0.1, passed=False) for t in (105.0, 106.0, 107.0)] == \
        [None, None, UNHEALTHY]
    assert m.failing_streak == 3
    assert m.probe_done(108.0, 108.1, passed=True) == HEALTHY and m.failing_streak == 0


def test_a_task_that_never_passes_goes_from_starting_to_unhealthy() -> None:
    m = HealthMonitor(HealthSpec(tuple(CMD), interval=1.0, retries=2), started_at=0.0)
    assert m.probe_done(1.0, 1.0, passed=False) is None and m.status == STARTING
    assert m.probe_done(2.0, 2.0, passed=False) == UNHEALTHY


def test_failures_in_the_start_period_count_only_once_a_probe_passed() -> None:
    spec = HealthSpec(tuple(CMD), interval=1.0, retries=1, start_period=10.0)
    m = HealthMonitor(spec, started_at=0.0)
    for t in range(1, 10):  # still starting, within the start period: not counted
        assert m.probe_done(float(t), t + 0.5, passed=False) is None
    assert m.status == STARTING and m.failing_streak == 0
    assert m.probe_done(10.0, 10.5, passed=False) == UNHEALTHY  # the period is over
    m = HealthMonitor(spec, started_at=0.0)
    assert m.probe_done(1.0, 1.1, passed=True) == HEALTHY
    assert m.probe_done(2.0, 2.1, passed=False) == UNHEALTHY  # healthy once: it counts


def test_probes_start_an_interval_apart_and_an_overrun_is_followed_at_once() -> None:
    m = HealthMonitor(HealthSpec(tuple(CMD), interval=2.0, timeout=5.0), started_at=0.0)
    m.probe_done(2.0, 2.3, passed=True)
    assert m.next_probe_at == 4.0  # start to start, not end to start
    m.probe_done(4.0, 9.0, passed=False)  # timed out after 5 s
    assert m.next_probe_at == 9.0


def test_output_keeps_only_its_last_bytes() -> None:
    tail = OutputTail(8)
    for chunk in (b"0123", b"456789", b"abc"):
        tail.feed(chunk)
    assert tail.text() == "56789abc" and tail.dropped == 5
    tail.feed(b"\xff")
    assert tail.text().endswith("\ufffd")
    assert describe(HealthSpec(tuple(CMD), retries=2),
                    [{"exit_code": 1, "output": "not\nready  yet\n"}]) == \
        "health check failed 2 times in a row (last: exit 1: not ready yet)"


# --- the probe loop, on a fake clock ---------------------------------------------------------

def test_the_loop_probes_on_schedule_reports_changes_and_keeps_five_probes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    results = iter([(1, "booting"), (0, "ok"), (0, "ok"), (1, "x"), (TIMED_OUT, "slow"),
                    (0, "ok"), (1, "a"), (1, "b")])
    changes: list[tuple[str, str]] = []
    starts: list[float] = []
    counters = {"health_probes": 0, "health_probe_timeouts": 0}

    async def probe(argv: list[str], timeout: float) -> tuple[int, str]:
        assert argv == CMD and timeout == 3.0
        starts.append(now[0])
        now[0] += 0.25
        return next(results)

    async def on_change(status: str, why: str) -> None:
        changes.append((status, why))
        if [s for s, _ in changes].count(UNHEALTHY) == 2:
            raise asyncio.CancelledError  # as services.py's stop ends the loop

    async def sleep(delay: float) -> None:  # virtual time: a sleep only moves the clock
        now[0] += delay

    check = HealthCheck(HealthSpec(tuple(CMD), interval=1.0, timeout=3.0, retries=2), probe,
                        on_change, counters, clock=lambda: now[0], wall=lambda: 0.0)
    monkeypatch.setattr(asyncio, "sleep", sleep)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(check.run())
    assert starts == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    assert [s for s, _ in changes] == [HEALTHY, UNHEALTHY, HEALTHY, UNHEALTHY]
    assert changes[1][1] == "health check failed 2 times in a row (last: exit -1: slow)"
    assert counters == {"health_probes": 8, "health_probe_timeouts": 1}
    assert len(check.log) == LOG_PROBES
    assert [p["output"] for p in check.log] == ["x", "slow", "ok", "a", "b"]
    assert check.log[0]["duration_s"] == 0.25


def test_the_task_record_carries_health_and_since_of_the_last_change() -> None:
    h = TaskHealth()
    assert h.record("running", 10.0) == {"since": 10.0}  # no check: no health key
    assert h.record("running", 11.0) == {"since": 10.0}  # nothing changed
    h.status = STARTING
    assert h.record("running", 12.0) == {"since": 12.0, "health": STARTING}
    h.status = HEALTHY
    assert h.record("running", 13.0)["since"] == 13.0
    assert h.record("failed", 14.0)["since"] == 14.0
    assert h.log() == []


# --- what others see: validation, events, meshctl --------------------------------------------

SERVICE = {"name": "web", "network": "n1", "mode": "replicated", "replicas": 1,
           "spec": {"networks": ["n1"], "command": ["sleep", "9"], "health": FULL}}
TASK = {"task": "web.1", "service": "web", "slot": 1, "node": "h1", "state": "running",
        "ip": "10.1.0.5", "exit_code": None, "restarts": 0}
ENDPOINT = {"name": "web.1", "network": "n1", "ip": "10.1.0.5", "mac": "02:42:0a:01:00:05",
            "node": "h1", "service": "web", "slot": 1}


def test_the_schema_checks_health_everywhere() -> None:
    assert check_value("services", "web", SERVICE) is None
    bad = {**SERVICE, "spec": {**SERVICE["spec"], "health": {**FULL, "retries": 0}}}
    assert "retries" in str(check_value("services", "web", bad))
    for status in (STARTING, HEALTHY, UNHEALTHY):
        assert check_value("tasks", "web.1@h1", {**TASK, "health": status,
                                                 "since": 1.7e9}) is None
        assert check_value("endpoints", "n1/web.1@h1", {**ENDPOINT, "health": status}) is None
    assert "health" in str(check_value("tasks", "web.1@h1", {**TASK, "health": "sick"}))
    assert "health" in str(check_value("endpoints", "n1/web.1@h1", {**ENDPOINT, "health": 1}))
    for since in (-1.0, float("inf"), "now", 1e13):
        assert "since" in str(check_value("tasks", "web.1@h1", {**TASK, "since": since}))


def change(old: dict[str, Any] | None, new: dict[str, Any] | None) -> ChangeEvent:
    return ChangeEvent("tasks", "web.1@h1", None if old is None else MappingProxyType(old),
                       None if new is None else MappingProxyType(new), 1)


def test_a_change_of_health_alone_is_a_health_status_event() -> None:
    starting = {**TASK, "health": STARTING, "since": 1.0}
    kind, action, fields = store_event(change(None, starting))
    assert (kind, action, fields["health"]) == ("task", "running", STARTING)
    kind, action, fields = store_event(change(starting, {**starting, "health": UNHEALTHY,
                                                         "since": 2.0}))
    assert (kind, action) == ("task", "health_status")
    assert (fields["health"], fields["old_health"], fields["task"]) == \
        (UNHEALTHY, STARTING, "web.1")
    assert store_event(change(starting, {**starting, "since": 3.0})) is None


def test_ps_and_inspect_show_health() -> None:
    rows = [{**TASK, "health": UNHEALTHY}, {**TASK, "task": "web.2", "health": None}]
    text = meshctl.render("service ps", rows)
    assert "HEALTH" in text.splitlines()[0] and "unhealthy" in text
    doc = {"name": "web", "health": FULL, "containment": None,
           "tasks": [{"task": "web.1", "node": "h1", "state": "running", "health": HEALTHY,
                      "health_log": [{"start": "2026-12-05T12:00:00.000Z", "duration_s": 0.03,
                                      "exit_code": 0, "output": "fine\nreally\n"}]}]}
    text = meshctl.render("service inspect", doc)
    assert "/bin/sh -c 'test -e /tmp/ok'" in text
    assert "healthy" in text and "fine really" in text and "health log:" in text


# --- the launcher's exec mode ----------------------------------------------------------------

def test_exec_plan_runs_the_command_with_the_tasks_privileges_and_no_second_init() -> None:
    tools = container.Tools(python=sys.executable, setpriv="/usr/bin/setpriv",
                            init="/usr/bin/tini", launcher_id="x")
    task = container.build_plan(
        netns_path="/run/netns/x", hostname="web.1", etc_files={}, containment=Containment(),
        hidden=["/state"], env={"PATH": "/bin", "MESHNET_TASK": "web.1"}, argv=["sleep", "9"],
        cgroup_procs=["/sys/fs/cgroup/t/cgroup.procs"], tools=tools,
        user={"uid": 1000, "gid": 1000, "groups": []})
    plan = container.exec_plan(task, 7, CMD)
    assert plan["pidfd"] == 7 and plan["mode"] == "exec" and plan["argv"] == CMD
    for key in ("caps", "user", "env", "cgroup_procs", "setpriv", "launcher_id"):
        assert plan[key] == task[key]
    argv = launch.privileges_argv(plan)
    assert "--no-new-privs" in argv and "--reuid=1000" in argv
    assert argv[argv.index("--") + 1:] == CMD  # the task's own PID 1 is its init


def test_exec_mode_without_a_task_fails_in_one_line() -> None:
    tools = container.find_tools()
    task = container.build_plan(
        netns_path="/nonexistent", hostname="t.1", etc_files={}, containment=Containment(),
        hidden=[], env={"PATH": "/bin"}, argv=["true"], cgroup_procs=[], tools=tools, user=None)
    r = subprocess.run([sys.executable, "-I", "-S", str(container.LAUNCHER)],
                       input=container.encode_plan(container.exec_plan(task, 987, ["true"])),
                       capture_output=True, timeout=30, check=False)
    assert r.returncode == launch.START_FAILED
    assert r.stderr.decode().startswith("meshnet: could not run in the task: ")
    assert r.stderr.count(b"\n") == 1
    with pytest.raises(container.ContainerError, match="init is not running"):
        container.task_init(2 ** 22 + 1)  # no such launcher
