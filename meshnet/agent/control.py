"""The control API server: a unix socket (0600) speaking meshnet.api frames.

A bad frame gets an error reply and the connection is closed; nothing a client sends can raise
out of here or make the agent buffer more than MAX_REQUEST_BYTES per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from meshnet import api
from meshnet.agent.logs import LogOnce

log = logging.getLogger("meshnet.control")

SendEvent = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[dict[str, Any], SendEvent], Awaitable[Any]]
# A client that sends nothing for this long is holding a slot for no reason.
IDLE_TIMEOUT_S = 30.0
# Bounds the agent's memory and file descriptors against a client that opens many connections.
MAX_CONNECTIONS = 256


class OpError(Exception):
    """An operation failed for a reason the user should read (exit code 1)."""

    def __init__(self, message: str, code: str = "failed") -> None:
        super().__init__(message)
        self.code = code


class ControlServer:
    def __init__(self, path: str, handlers: dict[str, Handler],
                 long_running: frozenset[str] = frozenset()) -> None:
        self.path = path
        self.handlers = handlers
        # Ops that run until their client goes away or they finish (run, logs): a client that
        # hangs up cancels them, so their processes and sandboxes are cleaned up at once.
        self.long_running = long_running
        self.server: asyncio.AbstractServer | None = None
        self.connections = 0
        self.bad_requests = 0
        self.counters = {"internal_errors": 0}
        self._log_once = LogOnce(log)

    async def start(self) -> None:
        sock_path = Path(self.path)
        sock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()  # a stale socket from a crashed run
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others connect
        try:
            self.server = await asyncio.start_unix_server(self._serve, path=self.path)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            writer.close()
            return
        self.connections += 1
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self.connections -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; False ends the connection."""
        try:
            header = await asyncio.wait_for(reader.readexactly(4), IDLE_TIMEOUT_S)
        except asyncio.IncompleteReadError:
            return False
        as_json = False
        try:
            length = api.frame_length(header, api.MAX_REQUEST_BYTES)
            data = await asyncio.wait_for(reader.readexactly(length), IDLE_TIMEOUT_S)
            body, as_json = api.decode_body(data)
            op, args = api.parse_request(body)
        except api.ApiError as e:
            self.bad_requests += 1
            await self._send(writer, api.error(f"bad request: {e}", "bad_request"), as_json)
            return False

        async def send_event(payload: dict[str, Any]) -> None:
            await self._send(writer, api.event(payload), as_json)

        handler = self.handlers.get(op)
        if handler is None:
            reply = api.error(f"unknown operation {op!r}", "unknown_op")
        else:
            try:
                if op in self.long_running:
                    result = await self._until_hangup(handler(args, send_event), reader)
                else:
                    result = await handler(args, send_event)
                reply = api.ok(result)
            except OpError as e:
                reply = api.error(str(e), e.code)
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception as e:  # a bug in a handler must not take the agent down
                self.counters["internal_errors"] += 1
                self._log_once(f"control operation {op}", e, "control.internal_errors")
                reply = api.error(f"internal error in {op}: {e}", "internal")
        await self._send(writer, reply, as_json)
        return True

    @staticmethod
    async def _until_hangup(work: Awaitable[Any], reader: asyncio.StreamReader) -> Any:
        task = asyncio.ensure_future(work)
        hangup = asyncio.ensure_future(reader.read(1))
        try:
            done, _ = await asyncio.wait({task, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise ConnectionResetError("the client hung up")
            return task.result()
        finally:
            hangup.cancel()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, body: dict[str, Any], as_json: bool) -> None:
        writer.write(api.encode(body, as_json))
        await writer.drain()
