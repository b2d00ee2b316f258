"""A stock asyncio loop on its own thread, for libraries uvloop cannot host.

pyroute2's asyncio netlink sockets need AF_NETLINK datagram endpoints, which uvloop refuses
("invalid family 16"). The agent keeps uvloop for its own sockets and runs every netlink
coroutine on this loop instead, awaiting the result from its own loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "netlink") -> None:
        self.loop = asyncio.SelectorEventLoop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run CORO on the thread's loop; await it from any other loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=2)
        if not self.thread.is_alive():
            self.loop.close()
