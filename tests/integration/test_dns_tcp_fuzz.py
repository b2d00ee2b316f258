"""Fuzz DNS-over-TCP framing on the real DnsServer, in-process on loopback (hypothesis).

Both directions of the 2-byte length framing (RFC 1035 §4.2.2, RFC 7766):

- a client's stream: valid queries, garbage and empty frames, a cut-off last frame, all split
  into arbitrary chunks. Every valid query is answered, in order, with its own ID; nothing else
  is answered out of thin air; the connection ends cleanly at EOF;
- an upstream's stream, after we forward a TCP query to it over TCP: a good reply, replies to
  another question or ID, garbage, zero-length or cut-off frames, in arbitrary chunks, then a
  close or silence. The client gets exactly one answer: the upstream's if its first complete
  frame is the reply; the UDP fallback's if the connection ended before any complete frame;
  SERVFAIL (at the attempt's timeout) otherwise.

Either way the server's and the resolver's internal-error counters stay 0. Upstreams are stubs
on 127.0.0.9x; nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import struct
from collections.abc import Awaitable, Callable
from typing import Any, cast

import dns.message
import dns.rcode
import dns.rrset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from meshnet.agent.dns_server import DnsServer
from meshnet.dns import Resolver, TaskRecord

TCP_REAL = "192.0.2.7"  # what the stub answers over TCP
UDP_REAL = "192.0.2.8"  # ... and over UDP (so the fallback shows)
TIMEOUT = 0.25  # the server's upstream timeout: a failing example costs this much
READ_TIMEOUT = 5.0

def make_resolver() -> Resolver:
    r = Resolver(rng=random.Random(1))
    r.set_records([TaskRecord("web", 1, "web.1", "a", "10.0.0.1")], 1, networks=["a"])
    return r


def frame(payload: bytes) -> bytes:
    return struct.pack("!H", len(payload)) + payload


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    return [stream[a:b] for a, b in itertools.pairwise(points) if b > a]


def reply(query: bytes, ip: str, *, name: str | None = None, qid: int | None = None) -> bytes:
    q = dns.message.from_wire(query)
    if name is not None:
        q = dns.message.make_query(name, "A")
        q.id = dns.message.from_wire(query).id
    if qid is not None:
        q.id = qid
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", ip))
    return r.to_wire()


class _UdpAnswers(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.transport.sendto(reply(data, UDP_REAL), addr)


async def with_stub(
    ip: str,
    on_tcp: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    body: Callable[[DnsServer, tuple[str, int]], Awaitable[None]],
) -> DnsServer:
    """Run ``body`` against a server whose one upstream is a UDP stub plus ``on_tcp``."""
    loop = asyncio.get_running_loop()
    udp, _ = await loop.create_datagram_endpoint(_UdpAnswers, local_addr=(ip, 0))
    port = udp.get_extra_info("sockname")[1]
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await on_tcp(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    tcp = await asyncio.start_server(serve, ip, port, reuse_address=True)
    server = DnsServer(make_resolver(), [(ip, port)], timeout=TIMEOUT)
    try:
        listener = await server.add_listener(("127.0.0.91", 0), None)
        await body(server, listener.addr)
    finally:
        await server.close()
        tcp.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        udp.close()
    return server


async def read_frames(reader: asyncio.StreamReader) -> list[bytes]:
    """Every framed message until EOF (a cut-off one would fail the test)."""
    out: list[bytes] = []
    while True:
        head = await asyncio.wait_for(reader.read(2), READ_TIMEOUT)
        if not head:
            return out
        if len(head) == 1:
            head += await asyncio.wait_for(reader.readexactly(1), READ_TIMEOUT)
        n = struct.unpack("!H", head)[0]
        out.append(await asyncio.wait_for(reader.readexactly(n), READ_TIMEOUT))


# -- a client's stream ------------------------------------------------------------------------

NAMES = ["web", "web.1", "nosuch", "tasks.web", "example.org."]
CLIENT_FRAMES = st.one_of(
    st.tuples(st.just("query"), st.sampled_from(NAMES), st.integers(0, 0xFFFF)),
    st.tuples(st.just("garbage"), st.binary(max_size=40), st.just(0)),
    st.tuples(st.just("empty"), st.just(b""), st.just(0)),
)
TAILS = st.one_of(
    st.just(b""),
    st.just(b"\x00"),
    st.binary(min_size=1, max_size=10).map(lambda b: struct.pack("!H", len(b) + 5) + b),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(CLIENT_FRAMES, max_size=6), TAILS, st.lists(st.integers(0, 1 << 16), max_size=8))
def test_a_clients_tcp_stream_in_any_framing(
    frames: list[tuple[str, object, int]], tail: bytes, cuts: list[int]
) -> None:
    payloads: list[tuple[bytes, bool]] = []  # (frame payload, must be answered)
    for kind, what, qid in frames:
        if kind == "query":
            q = dns.message.make_query(cast(str, what), "A")
            q.id = qid
            payloads.append((q.to_wire(), True))
        else:
            payloads.append((cast(bytes, what), False))
    stream = b"".join(frame(p) for p, _ in payloads) + tail

    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            n = struct.unpack("!H", await reader.readexactly(2))[0]
            writer.write(frame(reply(await reader.readexactly(n), TCP_REAL)))
            await writer.drain()

    async def body(server: DnsServer, addr: tuple[str, int]) -> None:
        reader, writer = await asyncio.open_connection(*addr)
        try:
            for piece in chunked(stream, cuts):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0)
            writer.write_eof()
            replies = await read_frames(reader)
        finally:
            writer.close()
        # Replies come in order: each matches a later frame, and no query frame is skipped.
        i = 0
        for r in replies:
            while i < len(payloads) and payloads[i][0][:2] != r[:2]:
                assert not payloads[i][1], f"query {i} was not answered"
                i += 1
            assert i < len(payloads), f"a reply to no frame: {r!r}"
            if payloads[i][1]:
                m = dns.message.from_wire(r)
                q = dns.message.from_wire(payloads[i][0])
                assert m.question == q.question and m.rcode() != dns.rcode.SERVFAIL
                if q.question[0].name.to_text() == "example.org.":
                    assert [rd.address for rs in m.answer for rd in rs] == [TCP_REAL]
            i += 1
        assert not any(must for _, must in payloads[i:]), "queries left unanswered"
        event(f"replies: {min(len(replies), 3)}")
        stats = server.stats()
        assert stats["internal_errors"] == 0 and stats["resolver_internal_errors"] == 0
        assert stats["upstream_tcp_fallbacks"] == 0

    asyncio.run(with_stub("127.0.0.92", on_tcp, body))


# -- an upstream's stream -----------------------------------------------------------------------

UPSTREAM_PIECES = st.lists(
    st.sampled_from(["good", "other-name", "other-id", "garbage", "empty", "cut", "half"]),
    max_size=3,
)


def upstream_bytes(piece: str, query: bytes, rng: random.Random) -> tuple[bytes, bool]:
    """The bytes of one piece, and whether they hold a complete frame."""
    if piece == "good":
        return frame(reply(query, TCP_REAL)), True
    if piece == "other-name":
        return frame(reply(query, TCP_REAL, name="other.example.")), True
    if piece == "other-id":
        qid = dns.message.from_wire(query).id ^ 0x0101
        return frame(reply(query, TCP_REAL, qid=qid)), True
    if piece == "garbage":
        return frame(rng.randbytes(rng.randrange(1, 60))), True
    if piece == "empty":
        return b"\x00\x00", True
    if piece == "cut":  # a length and less than that
        return struct.pack("!H", 300) + rng.randbytes(rng.randrange(0, 100)), False
    return b"\x01", False  # "half": one byte of a length


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    UPSTREAM_PIECES,
    st.booleans(),
    st.lists(st.integers(0, 1 << 16), max_size=6),
    st.integers(0, 1 << 32),
)
def test_an_upstreams_tcp_stream_in_any_framing(
    pieces: list[str], close: bool, cuts: list[int], seed: int
) -> None:
    rng = random.Random(seed)
    expected: list[str] = []

    async def on_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
        query = await reader.readexactly(n)
        stream = b""
        outcome = None
        for piece in pieces:
            data, complete = upstream_bytes(piece, query, rng)
            stream += data
            if complete:
                outcome = "tcp" if piece == "good" else "servfail"
            if not complete:
                break  # nothing after a cut-off frame is a frame of its own
            if outcome is not None:
                break
        if outcome is None:
            outcome = "udp" if close else "servfail"
        expected.append(outcome)
        for piece_bytes in chunked(stream, cuts):
            writer.write(piece_bytes)
            await writer.drain()
            await asyncio.sleep(0)
        if close:  # after what was written is on its way
            writer.close()
            await writer.wait_closed()
            return
        await asyncio.sleep(10)  # silence until the server gives up (and we are cancelled)

    async def body(server: DnsServer, addr: tuple[str, int]) -> None:
        q = dns.message.make_query("fuzz.example.", "A")
        reader, writer = await asyncio.open_connection(*addr)
        try:
            writer.write(frame(q.to_wire()))
            writer.write_eof()
            replies = await read_frames(reader)
        finally:
            writer.close()
        assert len(replies) == 1
        m = dns.message.from_wire(replies[0])
        assert m.id == q.id and m.question == q.question
        got = [rd.address for rs in m.answer for rd in rs]
        [want] = expected
        event(f"upstream stream gives: {want}")
        if want == "tcp":
            assert got == [TCP_REAL] and m.rcode() == dns.rcode.NOERROR
        elif want == "udp":
            assert got == [UDP_REAL] and m.rcode() == dns.rcode.NOERROR
            assert server.stats()["upstream_tcp_fallbacks"] == 1
        else:
            assert m.rcode() == dns.rcode.SERVFAIL and not got
        stats = server.stats()
        assert stats["internal_errors"] == 0 and stats["resolver_internal_errors"] == 0
        assert stats["in_flight"] == 0 and stats["upstream_sockets"] == 0

    asyncio.run(with_stub("127.0.0.93", on_tcp, body))
