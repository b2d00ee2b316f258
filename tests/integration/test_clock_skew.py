"""Clock skew between hosts and gossip freshness (#14), with the agents' skew hook: hosts share
one clock here, so MESHNET_TEST_CLOCK_SKEW_S shifts one agent's."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from conftest import wait_for

from meshnet.agent.agent import CLOCK_SKEW_ENV
from meshnet.crypto.freshness import MAX_CLOCK_SKEW_S


def alive(agent: Any) -> set[str]:
    return {n for n, m in agent.members().items() if m["state"] == "alive"}


def test_a_host_skewed_within_the_bound_is_a_member(agents: Any, key_file: Path) -> None:
    a = agents("a", key_file).start()
    b = agents("b", key_file).start(
        join=[a.addr], env=dict(os.environ, **{CLOCK_SKEW_ENV: str(MAX_CLOCK_SKEW_S / 2)}))
    wait_for(lambda: alive(a) == alive(b) == {"a", "b"}, 15, "a and b to see each other")
    assert a.ctl_json("status")["gossip"]["fresh_skew"] == 0


def test_a_host_skewed_beyond_the_bound_is_refused_and_counted(
        agents: Any, key_file: Path) -> None:
    a = agents("a", key_file).start()
    b = agents("b", key_file).start(
        join=[a.addr], env=dict(os.environ, **{CLOCK_SKEW_ENV: str(MAX_CLOCK_SKEW_S * 3)}))
    wait_for(lambda: a.ctl_json("status")["gossip"]["fresh_skew"] > 0, 15,
             "a to count b's skewed messages")
    time.sleep(2)
    assert "b" not in a.members()
    assert not b.exited()
    assert "clock runs +360.0 s off" in b.log.read_text()
