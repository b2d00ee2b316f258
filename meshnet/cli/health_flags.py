"""meshctl's `--health-*` flags (issue 17), shared by `service create` and `service update`.

The flags go to the agent as request keys (`health_cmd`, `health_interval`, ...; seconds as
numbers); the agent turns them into the spec's `health` map with meshnet/health.py
`health_from_args`, which `service update` also uses, with the current spec's check as the
base, so a flag left out keeps its value.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from meshnet.events import parse_duration
from meshnet.health import MAX_PERIOD_S, MAX_RETRIES


def seconds_arg(text: str) -> float:
    """`30`, `2.5`, `30s`, `500ms`, `1m30s` -> seconds (the agent checks the bounds)."""
    try:
        value = float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r} is not a duration: give seconds (30, 2.5) or a number and a unit "
            "(30s, 500ms, 1m30s)") from None
    if not math.isfinite(value) or value > MAX_PERIOD_S:
        raise argparse.ArgumentTypeError(f"at most {MAX_PERIOD_S:g} seconds")
    return value


def retries_arg(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text[:4]) <= MAX_RETRIES:
        raise argparse.ArgumentTypeError(f"give a whole number 1..{MAX_RETRIES}")
    return int(text)


def add_health_flags(p: argparse.ArgumentParser) -> None:
    """Docker's `--health-*` flags (defaults: interval 30s, timeout 30s, retries 3, start
    period 0s)."""
    p.add_argument("--health-cmd", metavar="CMD",
                   help="a health check run inside each task by /bin/sh -c, healthy when it "
                        "exits 0; only healthy tasks get DNS answers and traffic, and an "
                        "unhealthy one is restarted, e.g. --health-cmd 'test -e /tmp/ready'")
    p.add_argument("--health-interval", type=seconds_arg, metavar="DURATION",
                   help="time between probes (default 30s; at least 0.1s), e.g. 5s")
    p.add_argument("--health-timeout", type=seconds_arg, metavar="DURATION",
                   help="a probe running longer is killed and fails (default 30s), e.g. 2s")
    p.add_argument("--health-retries", type=retries_arg, metavar="N",
                   help="consecutive failures that make a task unhealthy (default 3)")
    p.add_argument("--health-start-period", type=seconds_arg, metavar="DURATION",
                   help="failures in this time after a task starts do not count until a "
                        "probe passes (default 0s), e.g. 1m")
    p.add_argument("--no-healthcheck", action="store_true",
                   help="no health check (service update: remove it)")


def health_args(ns: argparse.Namespace) -> dict[str, Any]:
    """The request keys of the flags add_health_flags made (None: not given)."""
    return {"health_cmd": ns.health_cmd, "health_interval": ns.health_interval,
            "health_timeout": ns.health_timeout, "health_retries": ns.health_retries,
            "health_start_period": ns.health_start_period,
            "no_healthcheck": bool(ns.no_healthcheck)}
