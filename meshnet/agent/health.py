"""A task's health check, run by the node that runs the task (the shell of meshnet/health.py).

Each probe runs the check's command inside the task, as `docker exec` would: the launcher's
exec mode (platform/launch.py) joins the task's network, PID, mount, UTS, IPC and cgroup
namespaces through a pidfd of the task's PID 1, joins its cgroups (so the probe counts
against the task's limits), and execs the command through setpriv with the task's bounding
set, user and no_new_privs, and the task's environment. A probe that outlives its timeout is
killed (its process group, SIGKILL) and fails. Output (stdout and stderr together, as
Docker's) is read to its end but only its last 4 KiB kept; the last 5 probes are remembered
for `service inspect` on this host.

The HealthMonitor (pure) decides the status; `on_change` carries a change out (agent/services.py:
the endpoint and task record are published again, an unhealthy task is stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from meshnet.agent.logs import LogOnce, error_line
from meshnet.events import iso_ms
from meshnet.health import (
    LOG_PROBES,
    HealthMonitor,
    HealthSpec,
    OutputTail,
    describe,
)
from meshnet.platform import container
from meshnet.platform.container import ContainerError, Tools
from meshnet.platform.launch import START_FAILED

# Docker's exit code for a probe that exceeded its timeout (and its output, below).
TIMED_OUT = -1
# A probe's background children may hold its output open after it exits: read this much
# longer at most, then stop reading.
OUTPUT_GRACE_S = 0.2
READ_CHUNK = 65536

log = logging.getLogger("meshnet.health")
_log_once = LogOnce(log)

# (argv, timeout) -> (exit code, output)
Probe = Callable[[list[str], float], Awaitable[tuple[int, str]]]
# (new status, why) -> None
OnChange = Callable[[str, str], Awaitable[None]]


class TaskProbe:
    """Runs a command inside one running task (the one its launcher LAUNCHER_PID started
    with PLAN). The task's PID 1 is looked up once and held by a pidfd until close()."""

    def __init__(self, tools: Tools, plan: dict[str, Any], launcher_pid: int) -> None:
        self.tools = tools
        self.plan = plan
        self.launcher_pid = launcher_pid
        self.pidfd: int | None = None

    async def __call__(self, argv: list[str], timeout: float) -> tuple[int, str]:
        if self.pidfd is None:
            try:
                self.pidfd = container.task_init(self.launcher_pid)
            except ContainerError as e:
                return START_FAILED, f"meshnet: {e}"
        plan = container.exec_plan(self.plan, self.pidfd, argv)
        try:
            proc = await container.spawn(plan, self.tools, stdout=asyncio.subprocess.PIPE,
                                         stderr=asyncio.subprocess.STDOUT,
                                         pass_fds=[self.pidfd])
        except OSError as e:  # no memory, no file descriptors: the probe could not run
            return START_FAILED, f"meshnet: cannot start the probe: {error_line(e)}"
        assert proc.stdout is not None
        tail = OutputTail()
        reader = asyncio.get_running_loop().create_task(_read_all(proc.stdout, tail))
        try:
            code = await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            reader.cancel()
            return TIMED_OUT, f"Health check exceeded timeout ({timeout:g}s)"
        finally:
            if proc.returncode is None:  # cancelled: the probe dies with us
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(reader), OUTPUT_GRACE_S)
            reader.cancel()
        return code, tail.text()

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


async def _read_all(stream: asyncio.StreamReader, tail: OutputTail) -> None:
    while chunk := await stream.read(READ_CHUNK):
        tail.feed(chunk)


class HealthCheck:
    """One task's check: probes on the monitor's schedule, each result into the monitor, a
    change of status to ON_CHANGE. Runs until cancelled."""

    def __init__(self, spec: HealthSpec, probe: Probe, on_change: OnChange,
                 counters: dict[str, int],
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.spec = spec
        self.probe = probe
        self.on_change = on_change
        self.counters = counters
        self.clock = clock
        self.wall = wall
        self.monitor = HealthMonitor(spec, clock())
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_PROBES)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self.monitor.next_probe_at - self.clock()))
            start, began = self.clock(), self.wall()
            try:
                code, output = await self.probe(list(self.spec.cmd), self.spec.timeout)
            except Exception as e:  # a bug of ours: the probe failed, the check goes on
                self.counters["health_errors"] += 1
                _log_once("running a health probe", e, "tasks.health_errors")
                code, output = START_FAILED, f"meshnet: the probe failed: {error_line(e)}"
            end = self.clock()
            self.counters["health_probes"] += 1
            if code == TIMED_OUT:
                self.counters["health_probe_timeouts"] += 1
            self.log.append({"start": iso_ms(began), "duration_s": round(end - start, 3),
                             "exit_code": code, "output": output})
            changed = self.monitor.probe_done(start, end, code == 0)
            if changed is not None:
                try:
                    await self.on_change(changed, describe(self.spec, list(self.log)))
                except Exception as e:  # counted; the next change is published again
                    self.counters["health_errors"] += 1
                    _log_once("publishing a task's health", e, "tasks.health_errors")


@dataclass
class TaskHealth:
    """A task's health as the node running it knows it (agent/services.py keeps one per task):
    the status its records carry, since when, and the check running for the current start."""

    status: str | None = None  # None: the spec has no check (or the task is not running yet)
    since: float | None = None
    seen: tuple[str, str | None] | None = None
    check: HealthCheck | None = None
    runner: asyncio.Task[None] | None = None
    probe: TaskProbe | None = None

    def record(self, state: str, now: float) -> dict[str, Any]:
        """The task record's `health` (absent without a check) and `since` (when its state or
        health last changed, as this node saw it)."""
        if self.seen != (state, self.status) or self.since is None:
            self.seen, self.since = (state, self.status), now
        out: dict[str, Any] = {"since": self.since}
        if self.status is not None:
            out["health"] = self.status
        return out

    def start(self, spec: HealthSpec, probe: TaskProbe, on_change: OnChange,
              counters: dict[str, int]) -> None:
        """Probe on SPEC's schedule from now, until stop()."""
        self.stop()
        self.probe = probe
        self.check = HealthCheck(spec, probe, on_change, counters)
        self.runner = asyncio.get_running_loop().create_task(self.check.run())

    def stop(self) -> None:
        """The task's command ended (or is being stopped): no more probes. A probe running now
        is killed (TaskProbe's cancellation)."""
        if self.runner is not None:
            self.runner.cancel()
            self.runner = None
        if self.probe is not None:  # a probe being spawned already has its copy of the fd
            self.probe.close()
            self.probe = None

    def log(self) -> list[dict[str, Any]]:
        """The last probes of the current (or last) start, oldest first."""
        return list(self.check.log) if self.check is not None else []
