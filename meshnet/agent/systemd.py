"""sd_notify over $NOTIFY_SOCKET, with no libsystemd: READY=1, RELOADING=1, STOPPING=1,
WATCHDOG=1 and STATUS= (the member count, throttled)."""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Mapping

# STATUS= follows membership, which changes in bursts (a join brings the whole list): at most
# one update a second, the last one always sent.
STATUS_INTERVAL_S = 1.0


def notify(message: str) -> bool:
    """Send one notification; returns False when not run under systemd (no socket)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError:
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half the deadline), or None if no watchdog is armed."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 1e6 / 2


def enabled() -> bool:
    """Whether systemd listens (so callers can skip building a status nobody reads)."""
    return bool(os.environ.get("NOTIFY_SOCKET"))


def reloading() -> str:
    """The message that starts a reload: Type=notify-reload needs the CLOCK_MONOTONIC time
    beside RELOADING=1; READY=1 ends it."""
    return f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"


def status_text(counts: Mapping[str, int]) -> str:
    """STATUS= for `systemctl status`: members alive (us included) and suspect."""
    alive = counts.get("alive", 0)
    return f"{alive} member{'' if alive == 1 else 's'} alive, {counts.get('suspect', 0)} suspect"


class StatusThrottle:
    """At most one STATUS= per INTERVAL: a change inside it is sent when the interval ends, as
    one update made then (so it carries the latest numbers). Sans-IO: the caller keeps time."""

    def __init__(self, interval: float = STATUS_INTERVAL_S) -> None:
        self.interval = interval
        self._last = -math.inf
        self._due: float | None = None

    def poke(self, now: float) -> float | None:
        """Something changed: when to send (now, or when the interval ends), or None if a send
        is already planned, which will carry this change too."""
        if self._due is not None:
            return None
        self._due = max(now, self._last + self.interval)
        return self._due

    def sent(self, now: float) -> None:
        self._last = now
        self._due = None
