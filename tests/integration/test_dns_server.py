"""The DNS server's asyncio shell on loopback: UDP, TCP, forwarding, scoping, bad input.

Everything runs in-process on 127.0.0.x with port 0; forwarding goes only to stubs on loopback
written here (never to the machine's resolvers).
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import dns.asyncquery
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from meshnet.agent.dns_server import DnsServer, Listener
from meshnet.dns import Resolver, TaskRecord

HOST_IP = "127.0.0.61"
SCOPED_IP = "127.0.0.62"
STUB_IP = "127.0.0.63"
NET_A = frozenset({"a"})

WEB = [f"10.0.0.{i}" for i in range(1, 4)]
BIG = [f"10.2.0.{i}" for i in range(1, 51)]
RECORDS = [
    *(TaskRecord("web", i, f"web.{i}", "a", ip) for i, ip in enumerate(WEB, 1)),
    TaskRecord("db", 1, "db.1", "b", "10.1.0.1"),
    *(TaskRecord("big", i, f"big.{i}", "a", ip) for i, ip in enumerate(BIG, 1)),
]
TIMEOUT = 3.0  # client-side bound on every query; a failure shows as an exception, not a hang


async def wait_until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Stub(asyncio.DatagramProtocol):
    """An upstream resolver on loopback: example.org A 192.0.2.7, NXDOMAIN for the rest."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None
        self.queries: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # 3.11: not a subclass

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        q = dns.message.from_wire(data)
        name = q.question[0].name
        self.queries.append(name.to_text())
        r = dns.message.make_response(q)
        if name.to_text().lower() == "example.org." and q.question[0].rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(name, 60, "IN", "A", "192.0.2.7"))
        else:
            r.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        self.transport.sendto(r.to_wire(), addr)


@pytest.fixture
async def stub() -> AsyncIterator[tuple[Stub, tuple[str, int]]]:
    loop = asyncio.get_running_loop()
    proto = Stub()
    transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=(STUB_IP, 0))
    try:
        yield proto, transport.get_extra_info("sockname")[:2]
    finally:
        transport.close()


def make_resolver() -> Resolver:
    r = Resolver(rng=random.Random(1))
    r.set_records(RECORDS, 1, networks=["a", "b"])
    return r


@pytest.fixture
async def make_server() -> AsyncIterator[Callable[..., Any]]:
    made: list[DnsServer] = []

    async def make(
        upstreams: list[tuple[str, int]] | None = None, **kwargs: Any
    ) -> tuple[DnsServer, Listener, Listener]:
        server = DnsServer(make_resolver(), upstreams or [], **kwargs)
        made.append(server)
        host = await server.add_listener((HOST_IP, 0), None)
        scoped = await server.add_listener((SCOPED_IP, 0), NET_A)
        return server, host, scoped

    yield make
    for server in made:
        await server.close()


async def udp(
    listener: Listener, name: str, rdtype: str = "A", **kw: Any
) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    r = await dns.asyncquery.udp(q, listener.addr[0], TIMEOUT, port=listener.addr[1], **kw)
    assert r.id == q.id
    return r


async def tcp(listener: Listener, name: str, rdtype: str = "A") -> dns.message.Message:
    q = dns.message.make_query(name, rdtype)
    r = await dns.asyncquery.tcp(q, listener.addr[0], TIMEOUT, port=listener.addr[1])
    assert r.id == q.id
    return r


def addrs(msg: dns.message.Message) -> list[str]:
    return [rd.address for rrset in msg.answer for rd in rrset]


async def test_service_answers_are_rotated(make_server: Callable[..., Any]) -> None:
    _, host, _ = await make_server()
    orders = []
    for _ in range(len(WEB)):
        r = await udp(host, "web")
        assert r.rcode() == dns.rcode.NOERROR
        assert r.flags & dns.flags.AA
        assert sorted(addrs(r)) == WEB
        orders.append(tuple(addrs(r)))
    assert len(set(orders)) == len(WEB), orders  # every rotation once


async def test_name_forms(make_server: Callable[..., Any]) -> None:
    _, host, _ = await make_server()
    assert sorted(addrs(await udp(host, "tasks.web"))) == WEB
    assert sorted(addrs(await udp(host, "web.a"))) == WEB
    assert sorted(addrs(await udp(host, "web.meshnet."))) == WEB
    assert addrs(await udp(host, "web.2")) == [WEB[1]]
    ptr = await udp(host, "2.0.0.10.in-addr.arpa.", "PTR")
    assert [rd.target.to_text() for rrset in ptr.answer for rd in rrset] == ["web.2."]


async def test_unknown_mesh_names_get_nxdomain(make_server: Callable[..., Any]) -> None:
    _, host, scoped = await make_server()
    for name in ("nosuch", "nosuch.meshnet.", "tasks.nosuch", "nosuch.a"):
        r = await udp(host, name)
        assert r.rcode() == dns.rcode.NXDOMAIN, name
        assert not r.answer
    assert (await tcp(scoped, "nosuch")).rcode() == dns.rcode.NXDOMAIN


async def test_large_answer_truncated_over_udp_whole_over_tcp(
    make_server: Callable[..., Any],
) -> None:
    server, host, _ = await make_server()
    r = await udp(host, "big")  # dnspython returns a TC reply as is
    assert r.flags & dns.flags.TC
    assert 0 < len(addrs(r)) < len(BIG)
    assert set(addrs(r)) <= set(BIG)
    t = await tcp(host, "big")
    assert not t.flags & dns.flags.TC
    assert sorted(addrs(t), key=lambda ip: int(ip.rsplit(".", 1)[1])) == BIG
    assert server.stats()["tcp"] >= 1


async def test_forwarding_through_a_loopback_stub(
    make_server: Callable[..., Any], stub: tuple[Stub, tuple[str, int]]
) -> None:
    proto, stub_addr = stub
    server, host, scoped = await make_server([stub_addr])
    r = await udp(host, "example.org.")
    assert r.rcode() == dns.rcode.NOERROR
    assert addrs(r) == ["192.0.2.7"]
    r = await udp(scoped, "EXAMPLE.org.")  # sandbox listeners forward too; 0x20 case kept
    assert addrs(r) == ["192.0.2.7"]
    assert r.question[0].name.to_text() == "EXAMPLE.org."
    r = await tcp(host, "example.org.")
    assert addrs(r) == ["192.0.2.7"]
    r = await udp(host, "nosuch.example.org.")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert "nosuch.example.org." in proto.queries
    assert not any("web" in q or "meshnet" in q for q in proto.queries)  # mesh names stay here
    stats = server.stats()
    assert stats["forwarded"] == 4
    assert stats["upstream_answered"] == 4
    assert stats["in_flight"] == 0


async def test_dead_upstream_gives_servfail(make_server: Callable[..., Any]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((STUB_IP, 0))
        dead = s.getsockname()[:2]  # closed below: nothing listens there
    server, host, _ = await make_server([dead], timeout=0.3)
    r = await udp(host, "example.org.")
    assert r.rcode() == dns.rcode.SERVFAIL
    r = await tcp(host, "example.org.")
    assert r.rcode() == dns.rcode.SERVFAIL
    stats = server.stats()
    assert stats["servfail"] == 2
    assert stats["upstream_timeouts"] == 2
    assert stats["in_flight"] == 0


async def test_dead_first_upstream_fails_over_to_the_next(
    make_server: Callable[..., Any], stub: tuple[Stub, tuple[str, int]]
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((STUB_IP, 0))
        dead = s.getsockname()[:2]
    server, host, _ = await make_server([dead, stub[1]], timeout=0.4)
    r = await udp(host, "example.org.")
    assert addrs(r) == ["192.0.2.7"]
    stats = server.stats()
    assert stats["upstream_retries"] == 1
    assert stats["in_flight"] == 0


async def test_no_upstreams_gives_servfail_at_once(make_server: Callable[..., Any]) -> None:
    server, host, _ = await make_server([])
    assert (await udp(host, "example.org.")).rcode() == dns.rcode.SERVFAIL
    assert server.stats()["upstream_no_upstream"] == 1


async def test_listener_scope(make_server: Callable[..., Any]) -> None:
    _, host, scoped = await make_server()
    assert addrs(await udp(host, "db")) == ["10.1.0.1"]
    assert addrs(await udp(host, "db.b")) == ["10.1.0.1"]
    for name in ("db", "db.b", "db.1", "tasks.db"):
        r = await udp(scoped, name)
        assert r.rcode() == dns.rcode.NXDOMAIN, name
        assert (await tcp(scoped, name)).rcode() == dns.rcode.NXDOMAIN, name
    assert sorted(addrs(await udp(scoped, "web"))) == WEB
    ptr = await udp(scoped, "1.0.1.10.in-addr.arpa.", "PTR")
    assert not ptr.answer


async def test_record_updates_show_on_the_next_query(make_server: Callable[..., Any]) -> None:
    server, host, scoped = await make_server()
    assert sorted(addrs(await udp(host, "web"))) == WEB
    moved = [r for r in RECORDS if r.task != "web.1"]
    moved.append(TaskRecord("web", 1, "web.1", "a", "10.0.0.99"))
    moved.append(TaskRecord("db", 2, "db.2", "a", "10.0.0.77"))
    server.resolver.set_records(moved, 2, networks=["a", "b"])
    assert sorted(addrs(await udp(host, "web"))) == ["10.0.0.2", "10.0.0.3", "10.0.0.99"]
    assert sorted(addrs(await tcp(host, "web"))) == ["10.0.0.2", "10.0.0.3", "10.0.0.99"]
    assert addrs(await udp(scoped, "db")) == ["10.0.0.77"]  # now visible on "a"


async def test_garbage_does_not_kill_the_server(make_server: Callable[..., Any]) -> None:
    server, host, _ = await make_server()
    rng = random.Random(4)
    sent = [0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        junk = [b"", b"\x00", b"\xff" * 11, bytes(12), b"\x12\x34\x81\x80" + bytes(8)]
        junk += [rng.randbytes(rng.randrange(1, 600)) for _ in range(200)]
        for i, blob in enumerate(junk):
            s.sendto(blob, host.addr)
            sent[0] += 1
            if i % 20 == 0:  # let the server drain, so no datagram is lost to a full buffer
                await wait_until(lambda: server.stats()["queries"] >= sent[0] - 1, "junk counted")
    # Stream garbage: a frame of junk, a truncated frame, a zero-length frame, a bare byte.
    for blob in (b"\x00\x05hello", b"\x01\x00abc", b"\x00\x00", b"\x07"):
        reader, writer = await asyncio.open_connection(*host.addr)
        writer.write(blob)
        writer.write_eof()
        await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
    await wait_until(
        lambda: server.stats()["queries"] >= sent[0] - 1, "the junk to be counted"
    )  # the empty datagram may or may not count
    assert sorted(addrs(await udp(host, "web"))) == WEB
    assert sorted(addrs(await tcp(host, "web"))) == WEB
    stats = server.stats()
    assert stats["dropped"] > 0
    assert stats["resolver_internal_errors"] == 0


async def test_tcp_pipelined_queries_on_one_connection(make_server: Callable[..., Any]) -> None:
    _, host, _ = await make_server()
    reader, writer = await asyncio.open_connection(*host.addr)
    try:
        queries = [dns.message.make_query(n, "A") for n in ("web", "db", "nosuch")]
        for q in queries:
            wire = q.to_wire()
            writer.write(struct.pack("!H", len(wire)) + wire)
        await writer.drain()
        for q in queries:
            n = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2), TIMEOUT))[0]
            r = dns.message.from_wire(await asyncio.wait_for(reader.readexactly(n), TIMEOUT))
            assert r.id == q.id and r.question == q.question
    finally:
        writer.close()


async def test_tcp_connection_limit_and_idle_timeout(make_server: Callable[..., Any]) -> None:
    server, host, _ = await make_server(max_tcp_connections=2, tcp_idle_timeout=0.3)
    conns = [await asyncio.open_connection(*host.addr) for _ in range(2)]
    await wait_until(lambda: server.stats()["tcp_connections"] == 2, "two connections")
    reader, writer = await asyncio.open_connection(*host.addr)
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""  # refused: closed at once
    writer.close()
    assert server.stats()["tcp_refused"] == 1
    for r, _ in conns:  # idle ones are closed by the server
        assert await asyncio.wait_for(r.read(), TIMEOUT) == b""
    for _, w in conns:
        w.close()
    await wait_until(lambda: server.stats()["tcp_connections"] == 0, "connections to close")
    assert sorted(addrs(await tcp(host, "web"))) == WEB


async def test_premade_sockets_and_removal(make_server: Callable[..., Any]) -> None:
    server, host, _ = await make_server()
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.64", 0))
    port = u.getsockname()[1]
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.bind(("127.0.0.64", port))
    listener = await server.add_listener(("127.0.0.64", port), NET_A, sock_udp=u, sock_tcp=t)
    assert listener.addr == ("127.0.0.64", port)
    assert sorted(addrs(await udp(listener, "web"))) == WEB
    assert sorted(addrs(await tcp(listener, "web"))) == WEB
    assert (await udp(listener, "db")).rcode() == dns.rcode.NXDOMAIN
    before = server.stats()["answered"]
    await server.remove_listener(listener)
    assert listener not in server.listeners
    assert server.stats()["answered"] == before  # counts of removed listeners are kept
    # Its sockets are closed: the address can be bound again.
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.64", port))
    with pytest.raises(ValueError):
        await server.add_listener(("127.0.0.64", 0), None, sock_udp=socket.socket())
    assert sorted(addrs(await udp(host, "web"))) == WEB


async def test_close_releases_everything(stub: tuple[Stub, tuple[str, int]]) -> None:
    server = DnsServer(make_resolver(), [stub[1]])
    listener = await server.add_listener((HOST_IP, 0), None)
    reader, writer = await asyncio.open_connection(*listener.addr)
    await wait_until(lambda: server.stats()["tcp_connections"] == 1, "a connection")
    await server.close()
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    writer.close()
    assert server.stats()["tcp_connections"] == 0
    assert server.listeners == []
    with pytest.raises(RuntimeError):
        await server.add_listener((HOST_IP, 0), None)


def test_serves_on_uvloop() -> None:
    """The agent runs on uvloop: UDP (reader callback), TCP and forwarding work there too."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        proto = Stub()
        transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=(STUB_IP, 0))
        server = DnsServer(make_resolver(), [transport.get_extra_info("sockname")[:2]])
        try:
            host = await server.add_listener((HOST_IP, 0), None)
            orders = {tuple(addrs(await udp(host, "web"))) for _ in range(len(WEB))}
            assert len(orders) == len(WEB)
            big = addrs(await tcp(host, "big"))
            assert len(big) == len(BIG) and set(big) == set(BIG)
            assert addrs(await udp(host, "example.org.")) == ["192.0.2.7"]
            assert addrs(await tcp(host, "example.org.")) == ["192.0.2.7"]
        finally:
            await server.close()
            transport.close()

    uvloop.run(main())
