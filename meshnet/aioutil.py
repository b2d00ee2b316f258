"""asyncio helpers shared by the agent's services."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def run_to_end(coro: Coroutine[Any, Any, T]) -> T:
    """Await CORO to its end even if our caller is cancelled meanwhile, then let the
    cancellation through. For teardown that must not stop halfway: a sandbox removed up to its
    first await kept its DNS sockets bound in its namespace, and its name."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        # Cancelled again while waiting: give up waiting; the teardown still runs to its end.
        await asyncio.wait([task])
        raise
