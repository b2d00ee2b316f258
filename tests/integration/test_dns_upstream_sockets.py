"""The DNS server's upstream sockets on loopback: one per attempt, closed after, and bounded.

In-process DnsServer; upstreams are stubs on 127.0.0.10x written here.
"""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rrset
import pytest

from meshnet.agent.dns_server import DnsServer, upstream_fd_budget
from meshnet.dns import Resolver

TIMEOUT = 5.0


async def wait_until(cond: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Stub(asyncio.DatagramProtocol):
    """Answers 192.0.2.7 unless ``silent``; remembers where every query came from."""

    def __init__(self, silent: bool = False) -> None:
        self.silent = silent
        self.sources: list[tuple[str, int]] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self.sources.append((str(addr[0]), int(addr[1])))
        if self.silent:
            return
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", "192.0.2.7"))
        assert self.transport is not None
        self.transport.sendto(r.to_wire(), addr)


@pytest.fixture
async def stubs() -> AsyncIterator[Callable[..., Any]]:
    made: list[asyncio.DatagramTransport] = []

    async def make(ip: str, silent: bool = False) -> tuple[Stub, tuple[str, int]]:
        loop = asyncio.get_running_loop()
        proto = Stub(silent)
        transport, _ = await loop.create_datagram_endpoint(lambda: proto, local_addr=(ip, 0))
        made.append(transport)
        return proto, transport.get_extra_info("sockname")[:2]

    yield make
    for t in made:
        t.close()


async def ask(addr: tuple[str, int], name: str, tcp: bool = False) -> dns.message.Message:
    q = dns.message.make_query(name, "A")
    if tcp:
        return await dns.asyncquery.tcp(q, addr[0], TIMEOUT, port=addr[1])
    return await dns.asyncquery.udp(q, addr[0], TIMEOUT, port=addr[1])


def addrs(msg: dns.message.Message) -> list[str]:
    return [rd.address for rrset in msg.answer for rd in rrset]


async def test_every_attempt_leaves_from_a_fresh_port_closed_after(
    stubs: Callable[..., Any],
) -> None:
    silent, silent_addr = await stubs("127.0.0.101", silent=True)
    good, good_addr = await stubs("127.0.0.102")
    server = DnsServer(Resolver(), [silent_addr, good_addr], timeout=0.6)
    try:
        listener = await server.add_listener(("127.0.0.103", 0), None)
        for _ in range(3):
            assert addrs(await ask(listener.addr, "example.org.")) == ["192.0.2.7"]
        # Each query tried the silent upstream first, then the good one, each from its own port.
        ports = [p for _, p in silent.sources] + [p for _, p in good.sources]
        assert len(ports) == 6 and len(set(ports)) == 6
        assert all(ip == "127.0.0.1" for ip, _ in silent.sources + good.sources)  # loopback only
        stats = server.stats()
        assert stats["upstream_retries"] == 3 and stats["upstream_sockets"] == 0
        # A late answer to a closed attempt finds no one: the port is closed.
        late = dns.message.make_response(dns.message.make_query("example.org.", "A")).to_wire()
        assert silent.transport is not None
        silent.transport.sendto(late, silent.sources[0])
        await asyncio.sleep(0.05)
        assert server.stats()["upstream_unmatched"] == 0
    finally:
        await server.close()


async def test_tcp_to_an_upstream_that_never_accepts_falls_back_to_udp(
    stubs: Callable[..., Any],
) -> None:
    _, addr = await stubs("127.0.0.104")
    # A TCP listener on the same port whose accept queue is full: further SYNs are dropped, as
    # by a firewall that blackholes TCP to port 53.
    blackhole = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blackhole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blackhole.bind(addr)
    blackhole.listen(0)
    fillers = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex(addr)
        fillers.append(s)
    await asyncio.sleep(0.1)
    server = DnsServer(Resolver(), [addr], timeout=4.0)
    try:
        listener = await server.add_listener(("127.0.0.105", 0), None)
        loop = asyncio.get_running_loop()
        start = loop.time()
        r = await ask(listener.addr, "example.org.", tcp=True)
        assert addrs(r) == ["192.0.2.7"] and r.rcode() == dns.rcode.NOERROR
        assert loop.time() - start < 3.0  # well before the 4 s attempt would have timed out
        stats = server.stats()
        assert stats["upstream_tcp_fallbacks"] == 1 and stats["upstream_tcp_errors"] == 1
    finally:
        await server.close()
        for s in fillers:
            s.close()
        blackhole.close()


async def test_removing_a_listener_forgets_its_forwarded_queries(
    stubs: Callable[..., Any],
) -> None:
    _, addr = await stubs("127.0.0.106", silent=True)
    server = DnsServer(Resolver(), [addr], timeout=30.0)
    try:
        gone = await server.add_listener(("127.0.0.107", 0), None)
        stays = await server.add_listener(("127.0.0.108", 0), None)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.bind(("127.0.0.1", 0))
            for i in range(10):
                q = dns.message.make_query(f"q{i}.example.org.", "A")
                c.sendto(q.to_wire(), gone.addr)
                c.sendto(q.to_wire(), stays.addr)
            await wait_until(lambda: server.stats()["in_flight"] == 20, "20 in flight")
        assert server.stats()["upstream_sockets"] == 20
        await server.remove_listener(gone)
        stats = server.stats()
        assert stats["in_flight"] == 10 and stats["upstream_sockets"] == 10
        assert stats["upstream_cancelled"] == 10
        assert server.pool.owner_in_flight(stays.udp) == 10
    finally:
        await server.close()
    assert server.stats()["upstream_sockets"] == 0


def test_the_in_flight_cap_fits_the_descriptor_limit() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert upstream_fd_budget() == 256
        server = DnsServer(Resolver(), [("127.0.0.1", 53)])
        stats = server.stats()
        assert stats["max_in_flight"] == 256 and stats["max_in_flight_per_listener"] == 64
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft >= 4 * 1024:
        assert DnsServer(Resolver(), []).stats()["max_in_flight"] == 1024


def test_default_caps() -> None:
    stats = DnsServer(Resolver(rng=random.Random(1)), []).stats()
    assert stats["max_tcp_connections"] == 256 and stats["max_tcp_per_listener"] == 64
