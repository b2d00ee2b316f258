"""The UDP hot path's /metrics accounting, against a scripted clock and a fake socket.

``_UdpListener.on_readable`` counts answers by RCODE and fills the latency histogram with one
clock read a query and per-batch sums (see its comments). These tests check that what it leaves
in ``server.rcodes`` and ``server.latency`` is exactly what counting each answer and calling
``Histogram.observe`` on each answer's latency would leave: a query's latency runs from the
clock read before its recvfrom (the previous query's last) to the one after its sendto.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from types import SimpleNamespace

import dns.message
import dns.rcode
import pytest

from meshnet.agent import dns_server
from meshnet.agent.dns_server import DnsServer, _UdpListener
from meshnet.dns import Resolver, TaskRecord
from meshnet.metrics import DNS_LATENCY_BUCKETS, Histogram

ADDR = ("127.0.0.1", 5300)


def query(name: str) -> bytes:
    return dns.message.make_query(name, "A").to_wire()


class FakeSocket:
    """Hands out ``datagrams`` then BlockingIOError; sendto number ``i`` in ``fail`` raises."""

    def __init__(self, datagrams: list[bytes], fail: set[int] | None = None) -> None:
        self.datagrams = list(datagrams)
        self.fail = fail or set()
        self.sends = 0
        self.sent: list[bytes] = []

    def fileno(self) -> int:
        return -1

    def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        if not self.datagrams:
            raise BlockingIOError
        return self.datagrams.pop(0), ADDR

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        i = self.sends
        self.sends += 1
        if i in self.fail:
            raise OSError("send buffer full")
        self.sent.append(data)
        return len(data)


class ScriptedClock:
    def __init__(self, reads: list[float]) -> None:
        self.reads = list(reads)

    def __call__(self) -> float:
        return self.reads.pop(0)


def run_batch(
    monkeypatch: pytest.MonkeyPatch, sock: FakeSocket, reads: list[float]
) -> tuple[DnsServer, _UdpListener, ScriptedClock]:
    clock = ScriptedClock(reads)
    monkeypatch.setattr(dns_server, "time", SimpleNamespace(perf_counter=clock))

    async def main() -> tuple[DnsServer, _UdpListener]:
        resolver = Resolver()
        resolver.set_records([TaskRecord("web", 1, "web.1", "net", "10.0.0.2")], 1)
        server = DnsServer(resolver, [])  # no upstreams: a forwarded name is SERVFAIL at once
        server._loop = asyncio.get_running_loop()
        udp = _UdpListener(server, None, sock)  # type: ignore[arg-type]
        udp.on_readable()
        await server.close()
        return server, udp

    server, udp = asyncio.run(main())
    return server, udp, clock


def assert_same_histogram(hist: Histogram, latencies: list[float]) -> None:
    want = Histogram(DNS_LATENCY_BUCKETS)
    for dt in latencies:
        want.observe(dt)
    assert hist.counts == want.counts
    assert hist.count == want.count
    assert math.isclose(hist.sum, want.sum, rel_tol=1e-9, abs_tol=1e-15)


def test_hot_path_metrics_match_observe_per_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = FakeSocket(
        [
            query("web."),  # NOERROR, exactly the first bound (counts in it: le)
            query("nope."),  # NXDOMAIN, first bucket
            query("example.com."),  # forwarded: SERVFAIL from the slow path
            query("web."),  # NOERROR, first bucket, after the slow path
            query("web."),  # NOERROR, slow: a later bucket
            query("web."),  # NOERROR, first bucket, after the slow one
            query("web."),  # its sendto fails: no RCODE, no latency
            query("web."),  # NOERROR, first bucket, after the failed send
        ],
        fail={6},
    )
    r = [0.0, 0.0001, 0.00015, 0.00815, 0.009, 0.00902, 0.01202, 0.01204, 0.5, 0.50003]
    server, udp, clock = run_batch(monkeypatch, sock, r)
    assert clock.reads == []  # one read a query, one per restart, one at the batch's start
    assert len(sock.sent) == 7
    assert server.counters["send_errors"] == 1
    assert udp.answered == 6  # the hot path's (the forwarded one is counted by the slow path)
    assert server.rcodes[dns.rcode.NOERROR] == 5
    assert server.rcodes[dns.rcode.NXDOMAIN] == 1
    assert server.rcodes[dns.rcode.SERVFAIL] == 1
    assert sum(server.rcodes) == 7
    latencies = [
        r[1] - r[0],
        r[2] - r[1],
        r[3] - r[2],  # the forwarded one: from its recvfrom to its SERVFAIL
        r[5] - r[4],
        r[6] - r[5],
        r[7] - r[6],
        r[9] - r[8],
    ]
    assert_same_histogram(server.latency, latencies)
    assert server.latency.counts[0] == 5
    assert server.latency.counts[DNS_LATENCY_BUCKETS.index(0.005)] == 1
    assert server.latency.counts[DNS_LATENCY_BUCKETS.index(0.01)] == 1


def test_a_nan_clock_read_is_never_observed(monkeypatch: pytest.MonkeyPatch) -> None:
    sock = FakeSocket([query("web."), query("web."), query("web."), query("web.")])
    r = [0.0, math.nan, 0.00002, 0.00005, 0.2]
    server, udp, _ = run_batch(monkeypatch, sock, r)
    assert udp.answered == 4
    assert server.rcodes[dns.rcode.NOERROR] == 4  # answers are counted whatever the clock says
    # NaN, NaN (from the NaN read), then 0.00003 and 0.19995: only the last two observed
    assert_same_histogram(server.latency, [r[1] - r[0], r[2] - r[1], r[3] - r[2], r[4] - r[3]])
    assert server.latency.count == 2
    assert not math.isnan(server.latency.sum)


def test_a_nan_first_read_and_a_batch_of_first_bucket_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = dns_server.UDP_BATCH + 3  # one batch takes UDP_BATCH; the rest wait for the next
    sock = FakeSocket([query("web.")] * n)
    r = [math.nan] + [0.00001 * i for i in range(1, dns_server.UDP_BATCH + 1)]
    server, udp, clock = run_batch(monkeypatch, sock, r)
    assert clock.reads == []
    assert udp.answered == dns_server.UDP_BATCH
    assert len(sock.datagrams) == 3
    assert server.rcodes[dns.rcode.NOERROR] == dns_server.UDP_BATCH
    assert_same_histogram(server.latency, [b - a for a, b in itertools.pairwise(r)])
    assert server.latency.count == dns_server.UDP_BATCH - 1
