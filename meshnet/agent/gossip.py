"""The membership core's asyncio shell: one UDP socket, one TCP listener, one timer.

Everything that leaves is sealed with the cluster keyring and everything that arrives is opened
with it first; a packet that fails is dropped and counted, never logged per packet.

**Datagrams** are ``[freshness 18][sealed]``: the freshness value (crypto/freshness.py) is the
seal's associated data, and a receiver drops a replay (a value it has seen, or one older than
its window) before spending a decryption on it.

**Streams** (push-pull, key operations, store anti-entropy, IPAM, logs) are one request and one
reply, each read and authenticated in small pieces so nothing large is held unauthenticated::

    request  [freshness 18][sealed head: service u8, body length u32][chunk 0][chunk 1]...
    reply    [sealed head, bound to the request's freshness][chunk 0]...

The request head has a fixed size, is read under HEAD_DEADLINE_S, and passes the freshness
window like a datagram; only then is its body length checked against the service's cap, and
the body read as sealed chunks of at most CHUNK_BYTES, each authenticated (its index and the
request's freshness are its associated data) before the next is read.

**No amplification.** A UDP source that is not a member at that address (per the membership
core, whose members' addresses come from their signed alives) is never sent more bytes than it
sent us: the core answers it bare, and this shell refuses anything beyond its credit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

from meshnet.crypto.freshness import FRESH_SIZE, Fresh, FreshnessWindows, FreshSender
from meshnet.crypto.keyring import (
    KIND_FRESH_PACKET,
    KIND_STREAM_CHUNK,
    KIND_STREAM_HEAD,
    KIND_STREAM_REPLY_HEAD,
    SEAL_OVERHEAD,
    Keyring,
    KeyringError,
)
from meshnet.membership import Addr, MemberEvent, Membership
from meshnet.wire import MAX_STREAM_BYTES

log = logging.getLogger("meshnet.gossip")

# First byte of a stream's plaintext: which service answers it.
STREAM_PUSH_PULL = 1
STREAM_KEY_OP = 2
STREAM_STATE = 3
STREAM_IPAM = 4
STREAM_LOGS = 5
# Task log lines with positions (`service logs --follow`, agent/tasklogs.py); 5 stays for
# agents from before it.
STREAM_LOG_LINES = 6

# The largest request body each service accepts, checked once the head has authenticated.
# Push-pull and anti-entropy carry a whole state (memberlist's 20 MiB); the others carry one
# small message: a key operation (~200 bytes), an IPAM claim (one signed record, < 4 KiB),
# a logs request (a service name, and a position per task: tasklogs.MAX_TASKS_PER_HOST).
REQUEST_CAPS = {
    STREAM_PUSH_PULL: MAX_STREAM_BYTES,
    STREAM_KEY_OP: 4096,
    STREAM_STATE: MAX_STREAM_BYTES,
    STREAM_IPAM: 65536,
    STREAM_LOGS: 4096,
    STREAM_LOG_LINES: 4096,
}
# A reply may be large for every service (a state, competing claims, task logs): a caller
# asks for less with `max_reply`.
# Stream bodies travel in sealed chunks this big: the most held unauthenticated per stream.
CHUNK_BYTES = 65536
# Larger than any UDP payload we send (1400 by default, configurable up to 64 KiB).
MAX_DATAGRAM_BYTES = 65535
# memberlist's TCPTimeout: a peer that takes longer than this is treated as unreachable.
STREAM_TIMEOUT_S = 10.0
# The request head is ~56 bytes: a peer that cannot send it this fast is idle or a slowloris.
HEAD_DEADLINE_S = 3.0
# memberlist allows 128 push-pulls in flight; inbound streams beyond that are refused.
MAX_INBOUND_STREAMS = 128
# Streams one source address may hold at once: a member opens at most a few (push-pull,
# anti-entropy, an IPAM confirmation, logs), so one address cannot take every slot.
MAX_STREAMS_PER_SOURCE = 8
# Bytes a non-member source may be answered with: at most what it sent (credit), capped,
# for this many sources (least recently heard dropped first).
MAX_CREDIT_BYTES = 65536
MAX_CREDIT_SOURCES = 4096
_HEAD = struct.Struct(">BI")

StreamHandler = Callable[[bytes, Addr], Awaitable[bytes | None]]


class StreamError(Exception):
    pass


class StaleError(Exception):
    """A message whose freshness value was seen before or is too old (a replay)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Sealer:
    """Seals with the keyring (or passes bytes through when encryption is explicitly off) and
    stamps and checks freshness."""

    def __init__(self, keyring: Keyring | None, name: str = "", last_epoch: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        """``clock``: wall time (the agent adds its test skew); ``last_epoch``: the highest
        freshness epoch a previous life of this node used."""
        self.keyring = keyring
        self.fresh = FreshSender(name, clock, last_epoch)
        self.windows = FreshnessWindows(clock)
        self.overhead = 0 if keyring is None else SEAL_OVERHEAD

    def seal(self, data: bytes, kind: int, context: bytes = b"") -> bytes:
        return data if self.keyring is None else self.keyring.seal(data, kind, context)

    def open(self, data: bytes, kind: int, context: bytes = b"") -> bytes:
        return data if self.keyring is None else self.keyring.open(data, kind, context)

    def seal_datagram(self, data: bytes) -> bytes:
        prefix = self.fresh.next().pack()
        return prefix + self.seal(data, KIND_FRESH_PACKET, prefix)

    def open_fresh(self, data: bytes, kind: int) -> tuple[bytes, bytes]:
        """(freshness value, plaintext) of ``[freshness][sealed]``: StaleError for a replay
        (checked before decrypting), KeyringError for anything that does not authenticate."""
        if len(data) < FRESH_SIZE:
            raise KeyringError("shorter than a freshness value")
        prefix = data[:FRESH_SIZE]
        fresh = Fresh.unpack(prefix)
        reason = self.windows.check(fresh)
        if reason is not None and reason != "fresh_skew":
            raise StaleError(reason)  # a replay of a known sender: no decryption spent
        # Garbage looks like an unknown sender far off in time: only a message that
        # authenticates is counted as skewed, the rest as what they are.
        plain = self.open(data[FRESH_SIZE:], kind, prefix)
        if reason is not None:
            raise StaleError(reason)
        self.windows.accept(fresh)
        return prefix, plain


def seal_datagram_as(keyring: Keyring, fresh: Fresh, data: bytes) -> bytes:
    """A datagram sealed with an arbitrary freshness value (tests play key holders with it)."""
    prefix = fresh.pack()
    return prefix + keyring.seal(data, KIND_FRESH_PACKET, prefix)


def _chunk_context(context: bytes, index: int) -> bytes:
    return context + index.to_bytes(4, "big")


async def stream_request(sealer: Sealer, addr: Addr, service: int, body: bytes,
                         max_reply: int = MAX_STREAM_BYTES) -> bytes:
    """One request on a new connection to a peer's stream port; its reply body."""
    async with asyncio.timeout(STREAM_TIMEOUT_S):
        reader, writer = await asyncio.open_connection(addr[0], addr[1])
        try:
            prefix = sealer.fresh.next().pack()
            head = sealer.seal(_HEAD.pack(service, len(body)), KIND_STREAM_HEAD, prefix)
            writer.write(prefix + head)
            await _write_body(sealer, writer, body, prefix + b"q")
            raw = await reader.readexactly(_HEAD.size + sealer.overhead)
            reply_service, length = _HEAD.unpack(sealer.open(raw, KIND_STREAM_REPLY_HEAD, prefix))
            if reply_service != service:
                raise StreamError("reply for another service")
            if length > max_reply:
                raise StreamError(f"reply of {length} bytes is over the limit")
            return await _read_body(sealer, reader, length, prefix + b"r")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _write_body(sealer: Sealer, writer: asyncio.StreamWriter, body: bytes,
                      context: bytes) -> None:
    view = memoryview(body)
    for index, off in enumerate(range(0, len(body), CHUNK_BYTES)):
        piece = bytes(view[off:off + CHUNK_BYTES])
        writer.write(sealer.seal(piece, KIND_STREAM_CHUNK, _chunk_context(context, index)))
        await writer.drain()
    await writer.drain()


async def _read_body(sealer: Sealer, reader: asyncio.StreamReader, length: int,
                     context: bytes) -> bytes:
    """``length`` bytes of body, each chunk authenticated before the next is read."""
    out = bytearray()
    index = 0
    while len(out) < length:
        size = min(CHUNK_BYTES, length - len(out))
        raw = await reader.readexactly(size + sealer.overhead)
        out += sealer.open(raw, KIND_STREAM_CHUNK, _chunk_context(context, index))
        index += 1
    return bytes(out)


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
        self.streams_by_source: dict[str, int] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stream_waiters: dict[Addr, list[asyncio.Future[bool]]] = {}
        # Bytes each recent non-member source may still be answered with.
        self.credit: OrderedDict[Addr, int] = OrderedDict()
        # Called with the peer after each push-pull we started succeeds (anti-entropy rides it).
        self.after_push_pull: list[Callable[[Addr], None]] = []
        self.counters = {
            "auth_failures": 0, "oversize_drops": 0, "stream_failures": 0,
            "amplification_drops": 0, "streams_refused_total": 0,
            "streams_refused_per_source": 0, "stream_head_timeouts": 0,
            "stream_over_cap": 0, "stream_handler_errors": 0,
        }

    def now(self) -> float:
        return self.loop.time()

    def stats(self) -> dict[str, int]:
        """Counters for `meshctl status`: ours and the freshness windows' drops."""
        return {**self.counters, **self.sealer.windows.drops,
                "fresh_senders": len(self.sealer.windows)}

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
                self._send_datagram(self.sealer.seal_datagram(data), addr)
        for data, addr in self.m.streams_to_open():
            self._spawn(self._push_pull_out(data, addr))
        while (event := self.m.next_event()) is not None:
            self.on_event(event)
        self._arm_timer()

    def _send_datagram(self, wire: bytes, addr: Addr) -> None:
        assert self.udp is not None
        if not self.m.verified_at(addr):
            # Only an answer can go to a non-member; never more than it sent us.
            credit = self.credit.get(addr, 0)
            if len(wire) > credit:
                self.counters["amplification_drops"] += 1
                return
            self.credit[addr] = credit - len(wire)
        self.udp.sendto(wire, addr)

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
            _, plain = self.sealer.open_fresh(data, KIND_FRESH_PACKET)
        except StaleError as e:
            self.sealer.windows.count(e.reason)
            return
        except KeyringError:
            self.counters["auth_failures"] += 1
            return
        credit = self.credit
        if len(credit) >= MAX_CREDIT_SOURCES and addr not in credit:
            credit.popitem(last=False)
        credit[addr] = min(credit.pop(addr, 0) + len(data), MAX_CREDIT_BYTES)
        self.m.receive_datagram(plain, (addr[0], addr[1]), self.now())
        self.pump()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # --- streams ------------------------------------------------------------------------------

    async def request(self, addr: Addr, service: int, body: bytes,
                      max_reply: int = MAX_STREAM_BYTES) -> bytes:
        """Send one sealed request to a peer's stream port and return its reply body."""
        return await stream_request(self.sealer, addr, service, body, max_reply)

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername") or ("", 0)
        source = str(peer[0])
        by_source = self.streams_by_source
        if self.inbound_streams >= MAX_INBOUND_STREAMS:
            self.counters["streams_refused_total"] += 1
            writer.close()
            return
        if by_source.get(source, 0) >= MAX_STREAMS_PER_SOURCE:
            self.counters["streams_refused_per_source"] += 1
            writer.close()
            return
        self.inbound_streams += 1
        by_source[source] = by_source.get(source, 0) + 1
        try:
            async with asyncio.timeout(STREAM_TIMEOUT_S):
                try:
                    async with asyncio.timeout(HEAD_DEADLINE_S):
                        raw = await reader.readexactly(FRESH_SIZE + _HEAD.size
                                                       + self.sealer.overhead)
                except TimeoutError:
                    self.counters["stream_head_timeouts"] += 1
                    return
                prefix, head = self.sealer.open_fresh(raw, KIND_STREAM_HEAD)
                service, length = _HEAD.unpack(head)
                handler = self.stream_handlers.get(service)
                if handler is None:
                    raise StreamError("unknown stream service")
                if length > REQUEST_CAPS.get(service, 0):
                    self.counters["stream_over_cap"] += 1
                    return
                body = await _read_body(self.sealer, reader, length, prefix + b"q")
                try:
                    reply = await handler(body, (source, int(peer[1])))
                except Exception as e:  # a handler bug must not end the listener
                    self.counters["stream_handler_errors"] += 1
                    log.warning("stream service %d: %s: %s", service, type(e).__name__, e)
                    return
                if reply is not None:
                    writer.write(self.sealer.seal(_HEAD.pack(service, len(reply)),
                                                  KIND_STREAM_REPLY_HEAD, prefix))
                    await _write_body(self.sealer, writer, reply, prefix + b"r")
        except StaleError as e:
            self.sealer.windows.count(e.reason)
        except KeyringError:
            self.counters["auth_failures"] += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError, StreamError, struct.error):
            self.counters["stream_failures"] += 1
        finally:
            self.inbound_streams -= 1
            left = by_source[source] - 1
            if left:
                by_source[source] = left
            else:
                del by_source[source]
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
