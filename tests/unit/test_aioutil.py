"""run_to_end: teardown that a cancellation cannot stop halfway."""

from __future__ import annotations

import asyncio

import pytest

from meshnet.aioutil import run_to_end


async def test_a_cancelled_caller_still_waits_for_the_whole_teardown() -> None:
    steps: list[str] = []

    async def teardown() -> str:
        steps.append("first")
        await asyncio.sleep(0.05)
        steps.append("second")  # the step a plain await lost when its caller was cancelled
        return "done"

    async def caller() -> str:
        return await run_to_end(teardown())

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps == ["first", "second"]  # the caller ended only after the teardown had
    assert await run_to_end(teardown()) == "done"


async def test_an_error_in_the_teardown_reaches_the_caller() -> None:
    async def broken() -> None:
        raise OSError("netlink said no")

    with pytest.raises(OSError, match="netlink said no"):
        await run_to_end(broken())
