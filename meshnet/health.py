"""Task health checks (issue 17): the spec, and Docker's health state machine. Pure.

A service spec may carry `health`: {"cmd": [argv...], "interval": s, "timeout": s,
"retries": n, "start_period": s} (`--health-cmd CMD` is stored as ["/bin/sh", "-c", CMD],
Docker's CMD-SHELL). The node running a task probes it by running `cmd` inside the task's own
containment (agent/health.py, platform/launch.py's exec mode) and feeds each result to a
`HealthMonitor`, which says what the task's health is, as Docker's daemon/health.go does:

- "starting" until the first probe passes;
- a probe passes when it exits 0 within `timeout`; anything else fails (a probe that exceeds
  its timeout is killed and fails);
- while the task is still "starting" and the probe began within `start_period` of the task's
  start, a failure does not count;
- `retries` failures that count, in a row, make it "unhealthy"; one pass makes it "healthy"
  (and resets the streak), whatever it was.

Probes start `interval` apart (start to start; a probe that overruns is followed at once), the
first one `interval` after the task starts, so a check that starts failing is unhealthy at most
`interval x retries` plus one probe's run time later.

Every complaint is a `HealthError` with one line fit for meshctl to print; the same checks run
on `service create`/`update` and on every replica (state/validate.py), so the spec is hostile
until checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

STARTING, HEALTHY, UNHEALTHY = "starting", "healthy", "unhealthy"
# An endpoint leaving service in good order (a rolling update's drain): no new connections go
# to it, and the ones it has are left to finish until it is gone (agent/vips.py).
DRAINING = "draining"
HEALTH_STATES = (STARTING, HEALTHY, UNHEALTHY, DRAINING)

# Docker's defaults (moby daemon/health.go: defaultProbeInterval, defaultProbeTimeout,
# defaultStartPeriod; retries 3).
DEFAULT_INTERVAL_S = 30.0
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRIES = 3
DEFAULT_START_PERIOD_S = 0.0
# Each probe starts the launcher (~25 ms of CPU): ten a second per task is the most we allow.
MIN_PERIOD_S = 0.1
# A day between probes, or a day's timeout or start period, is already "never".
MAX_PERIOD_S = 86_400.0
MAX_RETRIES = 100
# A health command is a short command line: a few arguments, 4 KiB in all.
MAX_CMD_ARGS = 64
MAX_CMD_CHARS = 4096
# What a probe's output keeps (its last bytes), and how many probes a task remembers: Docker's
# health log holds the last 5 probes with at most 4 KiB of output each.
MAX_OUTPUT_BYTES = 4096
LOG_PROBES = 5
SHELL = "/bin/sh"

HEALTH_KEYS = ("cmd", "interval", "timeout", "retries", "start_period")
# `service create`/`update` request keys (meshctl's --health-* flags) -> spec keys.
ARG_KEYS = {"health_interval": "interval", "health_timeout": "timeout",
            "health_retries": "retries", "health_start_period": "start_period"}


class HealthError(ValueError):
    """A bad health check spec or flag; the message is one line."""


def _number(value: object, what: str, lo: float, hi: float) -> float:
    if type(value) not in (int, float):
        raise HealthError(f"health {what} must be a number of seconds")
    assert isinstance(value, int | float)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise HealthError(f"health {what} must be {lo:g}..{hi:g} seconds")
    return float(value)


def _cmd(value: object) -> tuple[str, ...]:
    if type(value) is not list or not value:
        raise HealthError("health cmd must be a non-empty list of strings")
    if len(value) > MAX_CMD_ARGS:
        raise HealthError(f"health cmd has more than {MAX_CMD_ARGS} arguments")
    if not all(type(a) is str and "\0" not in a for a in value):
        raise HealthError("health cmd must be strings without NUL")
    if not value[0]:
        raise HealthError("health cmd's program is empty")
    if sum(len(a) for a in value) > MAX_CMD_CHARS:
        raise HealthError(f"health cmd is longer than {MAX_CMD_CHARS} characters")
    return tuple(value)


@dataclass(frozen=True)
class HealthSpec:
    cmd: tuple[str, ...]
    interval: float = DEFAULT_INTERVAL_S
    timeout: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES
    start_period: float = DEFAULT_START_PERIOD_S

    def to_value(self) -> dict[str, Any]:
        return {"cmd": list(self.cmd), "interval": self.interval, "timeout": self.timeout,
                "retries": self.retries, "start_period": self.start_period}

    @classmethod
    def from_value(cls, value: object) -> HealthSpec:
        """The spec's `health` map, checked whole (HealthError); absent keys but `cmd` take
        Docker's defaults, unknown keys are refused (the reader takes every key it is given)."""
        if type(value) is not dict:
            raise HealthError("health must be a map")
        unknown = [k for k in value if k not in HEALTH_KEYS]
        if unknown:
            raise HealthError(f"health: unknown key {str(unknown[0])[:40]!r}")
        retries = value.get("retries", DEFAULT_RETRIES)
        if type(retries) is not int or not 1 <= retries <= MAX_RETRIES:
            raise HealthError(f"health retries must be an integer 1..{MAX_RETRIES}")
        return cls(
            cmd=_cmd(value.get("cmd")),
            interval=_number(value.get("interval", DEFAULT_INTERVAL_S), "interval",
                             MIN_PERIOD_S, MAX_PERIOD_S),
            timeout=_number(value.get("timeout", DEFAULT_TIMEOUT_S), "timeout",
                            MIN_PERIOD_S, MAX_PERIOD_S),
            retries=retries,
            start_period=_number(value.get("start_period", DEFAULT_START_PERIOD_S),
                                 "start_period", 0.0, MAX_PERIOD_S))


def health_spec(value: object) -> HealthSpec | None:
    """A service spec's `health` (None or absent: no check) as a HealthSpec; HealthError."""
    return None if value is None else HealthSpec.from_value(value)


def shell_cmd(text: str) -> list[str]:
    """`--health-cmd CMD`: run by the shell, as Docker's CMD-SHELL form."""
    return [SHELL, "-c", text]


def health_from_args(args: Mapping[str, Any],
                     current: object = None) -> dict[str, Any] | None:
    """The spec's `health` map from `service create`/`update` request keys: `health_cmd` (one
    string, run as /bin/sh -c CMD), `health_interval`, `health_timeout`, `health_start_period`
    (seconds), `health_retries`, `no_healthcheck` (true: no check). Keys left out (None) keep
    CURRENT's values (`service update`; None: Docker's defaults). Returns None for no check;
    HealthError says which flag is wrong."""
    given = {k: args.get(k) for k in ("health_cmd", *ARG_KEYS) if args.get(k) is not None}
    if args.get("no_healthcheck") is True:
        if given:
            raise HealthError("--no-healthcheck conflicts with --health-* options")
        return None
    if not given:
        return None if current is None else HealthSpec.from_value(current).to_value()
    base = dict(HealthSpec.from_value(current).to_value()) if current is not None else {}
    cmd = given.pop("health_cmd", None)
    if cmd is not None:
        if type(cmd) is not str or not cmd.strip():
            raise HealthError("--health-cmd needs a command, e.g. --health-cmd 'test -e /ok'")
        base["cmd"] = shell_cmd(cmd)
    if "cmd" not in base:
        flag = "--" + next(iter(given)).replace("_", "-")
        raise HealthError(f"{flag} needs --health-cmd (there are no images with a HEALTHCHECK)")
    for key, value in given.items():
        base[ARG_KEYS[key]] = value
    try:
        return HealthSpec.from_value(base).to_value()
    except HealthError as e:  # in the flag's words
        text = str(e)
        for key, field in ARG_KEYS.items():
            text = text.replace(f"health {field} ", f"--{key.replace('_', '-')} ", 1)
        raise HealthError(text.replace("health cmd", "--health-cmd", 1)) from None


class HealthMonitor:
    """One task's health from its probe results (Docker's rules, module docstring). Times are
    the caller's monotonic clock; `started_at` is when the task's command started."""

    def __init__(self, spec: HealthSpec, started_at: float) -> None:
        self.spec = spec
        self.started_at = started_at
        self.status = STARTING
        self.failing_streak = 0
        self.next_probe_at = started_at + spec.interval

    def probe_done(self, start: float, end: float, passed: bool) -> str | None:
        """One probe's result (it ran from START to END); the new status if it changed."""
        before = self.status
        if passed:
            self.failing_streak = 0
            self.status = HEALTHY
        elif not (self.status == STARTING and
                  start - self.started_at < self.spec.start_period):
            self.failing_streak += 1
            if self.failing_streak >= self.spec.retries:
                self.status = UNHEALTHY
        self.next_probe_at = max(start + self.spec.interval, end)
        return self.status if self.status != before else None


class OutputTail:
    """The last LIMIT bytes of a stream, however long it is (a probe's output)."""

    def __init__(self, limit: int = MAX_OUTPUT_BYTES) -> None:
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        excess = len(self.data) - self.limit
        if excess > 0:
            del self.data[:excess]
            self.dropped += excess

    def text(self) -> str:
        return self.data.decode(errors="replace")


def describe(spec: HealthSpec, log: list[dict[str, Any]]) -> str:
    """Why a task is unhealthy, in one line: the streak and the last probe's exit and output."""
    last = log[-1] if log else {}
    output = " ".join(str(last.get("output") or "").split())[:200]
    return (f"health check failed {spec.retries} times in a row (last: exit "
            f"{last.get('exit_code')}{': ' + output if output else ''})")
