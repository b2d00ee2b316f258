"""The membership core's asyncio shell: one UDP socket, one TCP listener, one timer.

Everything that leaves is sealed with the cluster keyring and everything that arrives is opened
with it first; a packet that fails is dropped and counted, never logged per packet. Streams
(push-pull, key operations) are one sealed request frame and one sealed reply frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from meshnet.crypto.keyring import KIND_PACKET, KIND_STREAM, Keyring, KeyringError
from meshnet.membership import Addr, MemberEvent, Membership

log = logging.getLogger("meshnet.gossip")

# Additional-data kinds for the keyring, so a sealed datagram can never be replayed as a stream.
SEAL_DATAGRAM = KIND_PACKET
SEAL_STREAM = KIND_STREAM

# First byte of a stream's plaintext: which service answers it.
STREAM_PUSH_PULL = 1
STREAM_KEY_OP = 2
STREAM_STATE = 3
STREAM_IPAM = 4
STREAM_LOGS = 5

# memberlist caps a remote state at 20 MiB; a sealed frame adds a little on top.
MAX_STREAM_BYTES = 24 << 20
# Larger than any UDP payload we send (1400 by default, configurable up to 64 KiB).
MAX_DATAGRAM_BYTES = 65535
# memberlist's TCPTimeout: a peer that takes longer than this is treated as unreachable.
STREAM_TIMEOUT_S = 10.0
# memberlist allows 128 push-pulls in flight; inbound streams beyond that are refused.
MAX_INBOUND_STREAMS = 128
_LEN = struct.Struct(">I")

StreamHandler = Callable[[bytes, Addr], Awaitable[bytes | None]]


class StreamError(Exception):
    pass


class Sealer:
    """Seals with the keyring, or passes bytes through when encryption is explicitly off."""

    def __init__(self, keyring: Keyring | None) -> None:
        self.keyring = keyring

    def seal(self, data: bytes, kind: int) -> bytes:
        return data if self.keyring is None else self.keyring.seal(data, kind)

    def open(self, data: bytes, kind: int) -> bytes:
        return data if self.keyring is None else self.keyring.open(data, kind)


class GossipTransport:
    def __init__(
        self,
        membership: Membership,
        sealer: Sealer,
        bind: Addr,
        on_event: Callable[[MemberEvent], None],
    ) -> None:
        self.m = membership
        self.sealer = sealer
        self.bind = bind
        self.on_event = on_event
        self.loop = asyncio.get_running_loop()
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.AbstractServer | None = None
        self.stream_handlers: dict[int, StreamHandler] = {STREAM_PUSH_PULL: self._push_pull_in}
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.inbound_streams = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stream_waiters: dict[Addr, list[asyncio.Future[bool]]] = {}
        # Called with the peer after each push-pull we started succeeds (anti-entropy rides it).
        self.after_push_pull: list[Callable[[Addr], None]] = []
        self.counters = {"auth_failures": 0, "oversize_drops": 0, "stream_failures": 0}

    def now(self) -> float:
        return self.loop.time()

    async def start(self) -> None:
        self.udp, _ = await self.loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=self.bind, reuse_port=False
        )
        self.tcp = await asyncio.start_server(self._serve_stream, self.bind[0], self.bind[1])
        self.pump()

    async def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.tcp is not None:
            self.tcp.close()
        for task in list(self.tasks):
            task.cancel()
        if self.udp is not None:
            self.udp.close()

    # --- the sans-IO loop -------------------------------------------------------------------

    def pump(self) -> None:
        """Move everything the core wants sent onto the wire, drain events, re-arm the timer."""
        now = self.now()
        if self.udp is not None:
            for data, addr in self.m.datagrams_to_send(now):
                self.udp.sendto(self.sealer.seal(data, SEAL_DATAGRAM), addr)
        for data, addr in self.m.streams_to_open():
            self._spawn(self._push_pull_out(data, addr))
        while (event := self.m.next_event()) is not None:
            self.on_event(event)
        self._arm_timer()

    def _arm_timer(self) -> None:
        deadline = self.m.get_timer()
        if deadline == self.timer_at:
            return
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = deadline
        self.timer = None if deadline is None else self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        self.timer_at = None
        self.m.handle_timer(self.now())
        self.pump()

    def on_datagram(self, data: bytes, addr: Addr) -> None:
        if len(data) > MAX_DATAGRAM_BYTES:
            self.counters["oversize_drops"] += 1
            return
        try:
            plain = self.sealer.open(data, SEAL_DATAGRAM)
        except KeyringError:
            self.counters["auth_failures"] += 1
            return
        self.m.receive_datagram(plain, (addr[0], addr[1]), self.now())
        self.pump()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- streams ------------------------------------------------------------------------------

    async def request(self, addr: Addr, service: int, body: bytes) -> bytes:
        """Send one sealed request to a peer's stream port and return its reply body."""
        async with asyncio.timeout(STREAM_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(addr[0], addr[1])
            try:
                await self._write_frame(writer, bytes([service]) + body)
                reply = await self._read_frame(reader)
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
        if not reply or reply[0] != service:
            raise StreamError("reply for another service")
        return reply[1:]

    async def _write_frame(self, writer: asyncio.StreamWriter, plain: bytes) -> None:
        sealed = self.sealer.seal(plain, SEAL_STREAM)
        writer.write(_LEN.pack(len(sealed)) + sealed)
        await writer.drain()

    async def _read_frame(self, reader: asyncio.StreamReader) -> bytes:
        (length,) = _LEN.unpack(await reader.readexactly(4))
        if length > MAX_STREAM_BYTES:
            raise StreamError(f"frame of {length} bytes is over the limit")
        return self.sealer.open(await reader.readexactly(length), SEAL_STREAM)

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        if self.inbound_streams >= MAX_INBOUND_STREAMS:
            writer.close()
            return
        self.inbound_streams += 1
        try:
            async with asyncio.timeout(STREAM_TIMEOUT_S):
                plain = await self._read_frame(reader)
                handler = self.stream_handlers.get(plain[0]) if plain else None
                if handler is None:
                    raise StreamError("unknown stream service")
                reply = await handler(plain[1:], (peer[0], peer[1]))
                if reply is not None:
                    await self._write_frame(writer, plain[:1] + reply)
        except KeyringError:
            self.counters["auth_failures"] += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError, StreamError):
            self.counters["stream_failures"] += 1
        finally:
            self.inbound_streams -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            self.pump()

    async def _push_pull_in(self, body: bytes, addr: Addr) -> bytes | None:
        return self.m.handle_stream_request(body, addr, self.now())

    async def _push_pull_out(self, data: bytes, addr: Addr) -> None:
        ok = False
        try:
            reply = await self.request(addr, STREAM_PUSH_PULL, data)
            self.m.receive_stream_reply(reply, addr, self.now())
            ok = True
            for hook in self.after_push_pull:
                hook(addr)
        except KeyringError:
            self.counters["auth_failures"] += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError, StreamError):
            self.counters["stream_failures"] += 1
        if not ok:
            self.m.stream_failed(addr, self.now())
        for waiter in self.stream_waiters.pop(addr, []):
            if not waiter.done():
                waiter.set_result(ok)
        self.pump()

    async def join(self, seeds: list[Addr]) -> int:
        """Push-pull with each seed; returns how many answered."""
        waiters = []
        for seed in seeds:
            fut: asyncio.Future[bool] = self.loop.create_future()
            self.stream_waiters.setdefault(seed, []).append(fut)
            waiters.append(fut)
        self.m.join(seeds, self.now())
        self.pump()
        results = await asyncio.gather(*waiters)
        return sum(results)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, transport: GossipTransport) -> None:
        self.owner = transport

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.owner.on_datagram(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for dead peers: the failure detector handles them
