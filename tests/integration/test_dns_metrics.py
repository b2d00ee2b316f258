"""The DNS server counts its answers by RCODE and times them (#16: /metrics'
meshnet_dns_answers_total and meshnet_dns_latency_seconds), on every path: the UDP hot path,
a forwarded query (whose latency includes the upstream's), TCP, and SERVFAIL.

In-process on loopback with port 0; the only upstream is a stub written here.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rrset
import pytest

from meshnet.agent.dns_server import DnsServer, Listener
from meshnet.dns import Resolver, TaskRecord

SERVER_IP = "127.0.0.71"
STUB_IP = "127.0.0.72"
TIMEOUT = 3.0
# The stub answers this long after a query, so a forwarded answer's latency shows it.
STUB_DELAY_S = 0.05


class SlowStub(asyncio.DatagramProtocol):
    """An upstream that answers example.org A after STUB_DELAY_S, NXDOMAIN for the rest."""

    def __init__(self) -> None:
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        q = dns.message.from_wire(data)
        r = dns.message.make_response(q)
        if q.question[0].name.to_text() == "example.org.":
            r.answer.append(dns.rrset.from_text(q.question[0].name, 60, "IN", "A", "192.0.2.7"))
        else:
            r.set_rcode(dns.rcode.NXDOMAIN)
        assert self.transport is not None
        transport = self.transport
        asyncio.get_running_loop().call_later(STUB_DELAY_S, transport.sendto, r.to_wire(), addr)


@pytest.fixture
async def served() -> AsyncIterator[tuple[DnsServer, Listener]]:
    loop = asyncio.get_running_loop()
    stub_transport, _ = await loop.create_datagram_endpoint(SlowStub, local_addr=(STUB_IP, 0))
    resolver = Resolver()
    resolver.set_records([TaskRecord("web", 1, "web.1", "a", "10.0.0.1")], 1, networks=["a"])
    server = DnsServer(resolver, [stub_transport.get_extra_info("sockname")[:2]])
    try:
        listener = await server.add_listener((SERVER_IP, 0), None)
        yield server, listener
    finally:
        await server.close()
        stub_transport.close()


async def ask(listener: Listener, name: str, tcp: bool = False) -> int:
    q = dns.message.make_query(name, "A")
    query = dns.asyncquery.tcp if tcp else dns.asyncquery.udp
    r = await query(q, listener.addr[0], TIMEOUT, port=listener.addr[1])
    return r.rcode()


async def test_answers_are_counted_by_rcode_and_timed_on_every_path(
        served: tuple[DnsServer, Listener]) -> None:
    server, listener = served
    assert await ask(listener, "web") == dns.rcode.NOERROR  # the hot path
    assert await ask(listener, "web", tcp=True) == dns.rcode.NOERROR
    assert await ask(listener, "nosuch") == dns.rcode.NXDOMAIN  # in the mesh, unknown
    assert server.latency.count == 3
    # all three local: well under the stub's delay
    assert server.latency.sum < STUB_DELAY_S

    assert await ask(listener, "example.org") == dns.rcode.NOERROR  # forwarded
    assert await ask(listener, "other.example") == dns.rcode.NXDOMAIN  # forwarded
    assert await ask(listener, "example.org", tcp=True) == dns.rcode.NOERROR  # forwarded
    assert server.rcodes[dns.rcode.NOERROR] == 4
    assert server.rcodes[dns.rcode.NXDOMAIN] == 2
    assert sum(server.rcodes) == server.latency.count == 6
    # the forwarded three waited for the upstream
    cumulative = dict(server.latency.cumulative())
    assert cumulative[0.025] == 3
    assert server.latency.sum >= 3 * STUB_DELAY_S


async def test_a_query_no_upstream_answers_is_counted_as_servfail() -> None:
    resolver = Resolver()
    server = DnsServer(resolver, [])  # nowhere to forward: SERVFAIL at once
    try:
        listener = await server.add_listener((SERVER_IP, 0), None)
        assert await ask(listener, "example.org") == dns.rcode.SERVFAIL
        assert server.rcodes[dns.rcode.SERVFAIL] == 1
        assert server.latency.count == 1
    finally:
        await server.close()
