"""sd_notify messages (agent/systemd.py) against a fake NOTIFY_SOCKET, and the STATUS= throttle."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from meshnet.agent import systemd


def test_notify_reaches_the_socket_and_reloading_carries_the_monotonic_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd.enabled()
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert systemd.notify(systemd.reloading())
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        fields = dict(line.split("=", 1) for line in listener.recv(4096).decode().splitlines())
        assert fields["RELOADING"] == "1"
        assert before <= int(fields["MONOTONIC_USEC"]) <= after
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.enabled() and not systemd.notify("READY=1")


def test_status_text_counts_members() -> None:
    assert systemd.status_text({"alive": 5, "suspect": 0, "dead": 2}) == \
        "5 members alive, 0 suspect"
    assert systemd.status_text({"alive": 1, "suspect": 1}) == "1 member alive, 1 suspect"


def test_status_throttle_sends_at_once_then_once_per_interval() -> None:
    t = systemd.StatusThrottle(1.0)
    assert t.poke(10.0) == 10.0  # the first change goes at once
    assert t.poke(10.1) is None  # already planned: that send carries this change too
    t.sent(10.0)
    assert t.poke(10.2) == 11.0  # inside the interval: when it ends
    assert t.poke(10.5) is None and t.poke(10.9) is None  # a burst: one send
    t.sent(11.0)
    assert t.poke(15.0) == 15.0  # quiet since: at once again
