"""The metrics listener (``metrics_listen``): GET /metrics and GET /health on the agent's loop.

A thin asyncio shell around meshnet/httphead.py. It must never hurt the agent it reports on,
whoever connects, so everything a client can make it hold is bounded:

- at most MAX_CONNECTIONS connections; at the cap, a new one takes the place of the
  connection idle the longest (a keep-alive between requests), else it is refused;
- a request head must arrive whole within READ_TIMEOUT_S of its first byte (a slow client,
  slowloris-style, is cut off: 408) and be at most MAX_HEAD_BYTES with MAX_HEADERS fields;
- a connection idle between requests is closed after IDLE_TIMEOUT_S, one whose response does
  not drain within WRITE_TIMEOUT_S is aborted, and while one request is answered no other
  is read (pipelined requests wait in at most one read's worth of buffer);
- only GET and HEAD of the configured paths (404 otherwise, 405 for another method);
- a handler that raises gives a 500 and is counted and logged once, like every other error.

Counters are in ``counters`` and ``responses`` (by status); telemetry exports them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import cast

from meshnet.agent.logs import LogOnce
from meshnet.httphead import HttpError, RequestHead, RequestReader, response

__all__ = ["IDLE_TIMEOUT_S", "MAX_CONNECTIONS", "READ_TIMEOUT_S", "WRITE_TIMEOUT_S",
           "MetricsServer", "Reply"]

log = logging.getLogger("meshnet.metrics")

# Prometheus holds one connection per target, curl and a health checker one each; 16 leaves
# room for several scrapers and a few people, and bounds what a flood of connections costs.
MAX_CONNECTIONS = 16
# A request head (a few hundred bytes) arrives in one packet; 5 s is generous on any network.
READ_TIMEOUT_S = 5.0
# Longer than Prometheus' default scrape interval (15 s), so one connection serves every scrape.
IDLE_TIMEOUT_S = 30.0
# A /metrics body is tens of KB; a client that cannot take it in 10 s is not reading.
WRITE_TIMEOUT_S = 10.0
LISTEN_BACKLOG = 64


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Handler = Callable[[], Awaitable[Reply]]


class _Conn(asyncio.Protocol):
    def __init__(self, server: MetricsServer) -> None:
        self.server = server
        self.loop = server.loop
        self.reader = RequestReader()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.busy = False  # a request is being answered
        self.closing = False
        self.idle_since: float | None = None  # between requests, nothing buffered
        self.write_paused = False
        self.drained: asyncio.Future[None] | None = None
        self.eof = False  # the client will send nothing more

    # -- asyncio callbacks (none of them may raise) -------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        if not self.server._admit(self):
            self.transport.abort()
            return
        self._arm(READ_TIMEOUT_S)

    def data_received(self, data: bytes) -> None:
        try:
            self.reader.feed(data)
            self._pump()
        except Exception as e:  # a bug: this connection ends, the listener goes on
            self.server._internal_error("reading a request", e)
            self._abort()

    def eof_received(self) -> bool | None:
        self.eof = True
        if not self.busy:
            self._abort()
        return True  # keep our side open until the answer in progress is written

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self._disarm()
        self.server._release(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    # -- requests -------------------------------------------------------------------------------

    def _pump(self) -> None:
        """Start answering the next complete request, if no other is being answered."""
        if self.closing:
            return
        if self.busy:
            if self.reader.buffered > 0 and self.transport is not None:
                self.transport.pause_reading()  # one request at a time
            return
        try:
            head = self.reader.next_request()
        except HttpError as e:
            self.server.counters["bad_requests"] += 1
            self._send_and_close(e.status, f"{e.why}\n".encode())
            return
        if head is None:
            if self.reader.buffered and self.idle_since is not None:
                # The first bytes of the next request: from now on it has READ_TIMEOUT_S.
                self.idle_since = None
                self._arm(READ_TIMEOUT_S)
            return
        self.busy = True
        self.idle_since = None
        self._disarm()
        self.task = self.loop.create_task(self._answer(head))

    async def _answer(self, head: RequestHead) -> None:
        server = self.server
        server.counters["requests"] += 1
        handler = server.routes.get(head.path)
        extra: tuple[tuple[str, str], ...] = ()
        if handler is None:
            reply = Reply(404, b"not found: try /metrics or /health\n")
        elif head.method not in ("GET", "HEAD"):
            reply = Reply(405, b"only GET and HEAD\n")
            extra = (("Allow", "GET, HEAD"),)
        else:
            try:
                reply = await handler()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                server._internal_error(f"answering {head.path}", e)
                reply = Reply(500, b"internal error\n")
        server.responses[reply.status] += 1
        keep = head.keep_alive and reply.status != 500 and not self.eof
        if not await self._write(response(reply.status, reply.body,
                                          content_type=reply.content_type, keep_alive=keep,
                                          head_only=head.method == "HEAD", extra=extra)):
            return
        if not keep:
            self._close()
            return
        self.busy = False
        self.idle_since = self.loop.time()
        self._arm(IDLE_TIMEOUT_S)
        if self.transport is not None:
            self.transport.resume_reading()
        self._pump()  # a pipelined request already here

    async def _write(self, data: bytes) -> bool:
        """Write and wait until the transport takes it in; False if the connection ended."""
        transport = self.transport
        if transport is None or self.closing:
            return False
        transport.write(data)
        if self.write_paused:
            self.drained = self.loop.create_future()
            try:
                await asyncio.wait_for(self.drained, WRITE_TIMEOUT_S)
            except TimeoutError:
                self.server.counters["write_timeouts"] += 1
                self._abort()
                return False
        return not self.closing

    def _send_and_close(self, status: int, body: bytes) -> None:
        self.server.responses[status] += 1
        if self.transport is not None and not self.closing:
            self.transport.write(response(status, body, keep_alive=False))
        self._close()

    # -- timers and closing ---------------------------------------------------------------------

    def _arm(self, delay: float) -> None:
        self._disarm()
        self.timer = self.loop.call_later(delay, self._timed_out)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.busy or self.closing:
            return
        if self.idle_since is not None:
            self.server.counters["idle_closed"] += 1
            self._close()
        else:
            self.server.counters["read_timeouts"] += 1
            self._send_and_close(408, b"request head not received in time\n")

    def _close(self) -> None:
        self.closing = True
        self._disarm()
        if self.transport is not None:
            self.transport.close()  # after what is buffered is written

    def _abort(self) -> None:
        self.closing = True
        self._disarm()
        if self.transport is not None:
            self.transport.abort()


class MetricsServer:
    """Serves ``routes`` (path -> async handler) on ``addr``; ``start`` binds, ``close`` ends
    every connection."""

    def __init__(self, addr: tuple[str, int], routes: Mapping[str, Handler]) -> None:
        self.addr = addr
        self.routes = dict(routes)
        self.loop = asyncio.get_running_loop()
        self.server: asyncio.AbstractServer | None = None
        self.conns: dict[_Conn, None] = {}  # ordered: oldest first
        self.counters = {"connections": 0, "connections_refused": 0, "idle_evicted": 0,
                         "idle_closed": 0, "requests": 0, "bad_requests": 0,
                         "read_timeouts": 0, "write_timeouts": 0, "internal_errors": 0}
        self.responses: Counter[int] = Counter()
        self._log_once = LogOnce(log)

    async def start(self) -> None:
        self.server = await self.loop.create_server(
            lambda: _Conn(self), self.addr[0], self.addr[1], backlog=LISTEN_BACKLOG,
            reuse_address=True)
        if self.addr[1] == 0:  # tests: the port the kernel chose
            sock = self.server.sockets[0]
            self.addr = (self.addr[0], int(sock.getsockname()[1]))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in list(self.conns):
            conn._abort()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)

    def _admit(self, conn: _Conn) -> bool:
        if len(self.conns) >= MAX_CONNECTIONS:
            idle = [c for c in self.conns if c.idle_since is not None and not c.busy]
            if not idle:
                self.counters["connections_refused"] += 1
                return False
            oldest = min(idle, key=lambda c: c.idle_since or 0.0)
            self.counters["idle_evicted"] += 1
            oldest._close()
            self.conns.pop(oldest, None)
        self.conns[conn] = None
        self.counters["connections"] += 1
        return True

    def _release(self, conn: _Conn) -> None:
        self.conns.pop(conn, None)

    def _internal_error(self, what: str, e: BaseException) -> None:
        self.counters["internal_errors"] += 1
        self._log_once(what, e, "metrics internal_errors")
