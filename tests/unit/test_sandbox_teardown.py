"""A sandbox's teardown survives failed steps (#14, "loops survive bad values"): each failure is
counted and logged in one line, and every later step still runs, so nothing of the sandbox is
left behind because an earlier step failed. Only the kernel and the store are faked."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from meshnet.agent import sandboxes as sb
from meshnet.agent.logs import LogOnce


def test_every_teardown_step_runs_when_each_fails(caplog: pytest.LogCaptureFixture) -> None:
    attempted: list[str] = []

    def failing(what: str) -> Any:
        async def step(*args: Any) -> None:
            attempted.append(what)
            raise OSError(f"{what} failed")
        return step

    def destroy(cgroup: object) -> None:  # runs in a thread, like the real one
        attempted.append("cgroup")
        raise OSError("cgroup busy")

    handle = sb.SandboxHandle(name="web.1", network="n", ns="mns-x-web.1-0", ip="10.9.0.5",
                              key="n/web.1@a", listener=object(),  # type: ignore[arg-type]
                              cgroup=object(), ns_taken=True)  # type: ignore[arg-type]
    fake = SimpleNamespace(
        live={handle.ns: handle}, holders={handle.ns: handle.name},
        state=SimpleNamespace(delete=failing("endpoint")),
        dns=SimpleNamespace(remove_listener=failing("listener")),
        cgroups=SimpleNamespace(destroy=destroy),
        counters={"sandbox_teardown_errors": 0}, _log_once=LogOnce(logging.getLogger("t")))
    fake._teardown = lambda what, step: sb.Sandboxes._teardown(fake, what, step)  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="t"):
        asyncio.run(sb.Sandboxes._remove(fake, handle))  # type: ignore[arg-type]
    assert attempted == ["endpoint", "listener", "cgroup"]
    assert fake.counters["sandbox_teardown_errors"] == 3
    assert fake.live == {} and fake.holders == {}
    assert len(caplog.records) == 3 and all(r.exc_info is None for r in caplog.records)
    assert all("counted in tasks.sandbox_teardown_errors" in r.getMessage()
               for r in caplog.records)
