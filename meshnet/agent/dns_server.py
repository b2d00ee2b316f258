"""The DNS core's asyncio shell: UDP and TCP listeners, a socket per upstream query, one timer.

:class:`DnsServer` moves bytes between sockets and the pure cores of :mod:`meshnet.dns`: every
query goes to :meth:`Resolver.answer` with the asking listener's network scope; a
:class:`~meshnet.dns.Forward` goes to the :class:`~meshnet.dns.UpstreamPool` with the listener
as its owner, whose :class:`~meshnet.dns.SendUpstream` leave from a fresh socket each and whose
:class:`~meshnet.dns.ReplyClient` go back to the client on the listener it asked on.

Listeners come in two kinds (docs/design.md §4, issue 4):

- host-side ones (``--dns-listen``, tests, benchmarks): ``networks=None``, they see every name;
- one per sandbox on 127.0.0.11:53 inside the sandbox's network namespace, scoped to the networks
  the sandbox is attached to. The agent opens both sockets inside the namespace and passes them
  in (``sock_udp``/``sock_tcp``); the server never changes namespaces itself.

A listener is the unit of fairness (issue 14): each one may hold at most a quarter of the
forwarded queries in flight and a quarter of the TCP connections (but at least 8), and when
either runs out in total, a quiet listener takes the oldest slot of the busiest one
(:class:`~meshnet.dns.limits.FairSlots`), so no sandbox can starve another. Every refusal and
eviction is counted.

Forwarding (issue 14): every attempt of every forwarded query leaves from a new socket bound to
port 0, so its source port is random and fresh, and its ID comes from ``secrets``; an off-path
spoofer must guess both, within the attempt's lifetime, from the upstream's address. The socket
hears only replies to that attempt (checked by the pool: source, ID, question) and is closed
when the attempt ends. A query that came over TCP goes upstream over TCP (falling back to UDP
only if the upstream refuses, drops or does not accept the connection within
:data:`UPSTREAM_TCP_CONNECT_TIMEOUT`), so a large answer comes back whole; one that came over UDP
goes over UDP, and a truncated answer stays truncated for the client to retry over TCP (RFC 7766).
The number of upstream sockets is bounded by the in-flight cap, itself lowered to
:func:`upstream_fd_budget`.

The UDP hot path is one call into the resolver and one ``sendto``: no logging, no parsing, no
allocation beyond the answer bytes, and a counter. Everything unusual (forwarding, drops, TCP)
is off that path. Nothing a client or an upstream sends can raise out of a protocol callback or
grow memory without bound: forwarded queries are capped by the pool, TCP connections by
:data:`MAX_TCP_CONNECTIONS` with an idle timeout, and a TCP message by its 16-bit length.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import resource
import socket
import time
from collections.abc import Iterable
from pathlib import Path

from meshnet.agent.logs import LogOnce
from meshnet.dns import (
    DEFAULT_TIMEOUT,
    MAX_IN_FLIGHT,
    MAX_UPSTREAMS,
    Drop,
    FairSlots,
    Forward,
    Refuse,
    ReplyClient,
    Resolver,
    SendUpstream,
    UpstreamPool,
)
from meshnet.dns.wire import MAX_MESSAGE_BYTES
from meshnet.metrics import DNS_LATENCY_BUCKETS, Histogram

__all__ = [
    "EMBEDDED_DNS_IP",
    "MAX_TCP_CONNECTIONS",
    "MAX_UDP_QUERY_BYTES",
    "MIN_PER_LISTENER",
    "PER_LISTENER_SHARE",
    "TCP_IDLE_TIMEOUT",
    "UDP_BATCH",
    "UPSTREAM_FD_SHARE",
    "UPSTREAM_TCP_CONNECT_TIMEOUT",
    "DnsServer",
    "Listener",
    "parse_resolv_conf",
    "per_listener_share",
    "read_resolv_conf",
    "upstream_fd_budget",
]

Addr = tuple[str, int]

# The resolver address inside every sandbox (Docker's); never an upstream of itself.
EMBEDDED_DNS_IP = "127.0.0.11"

# Concurrent DNS-over-TCP connections across all listeners. TCP is the fallback after a TC
# answer, so real load is a handful; each connection costs a task and two small buffers, so 256
# bounds memory to well under a few MB while no sane client pool is refused. Beyond it a new
# connection is closed at once (the client retries or gives up, as with an overloaded server),
# unless its listener holds fewer than the busiest one (then that one's oldest is closed).
MAX_TCP_CONNECTIONS = 256

# By default one listener (sandbox) may hold 1/PER_LISTENER_SHARE of the forwarded queries in
# flight (256 of 1,024) and of the TCP connections (64 of 256), but never fewer than
# MIN_PER_LISTENER (or the whole, if smaller). Far above one sandbox's real need (a TCP
# connection per TC retry, closed after; glibc asks A and AAAA at once), and one flooding
# sandbox still leaves three quarters to the rest before fair eviction starts.
PER_LISTENER_SHARE = 4
MIN_PER_LISTENER = 8

# Upstream sockets may use at most 1/UPSTREAM_FD_SHARE of the process's descriptor limit
# (RLIMIT_NOFILE): each query in flight holds one, so the in-flight cap is lowered to fit. The
# systemd unit's 65,536 leaves the 1,024 cap alone; a shell's usual 1,024 makes it 256, so a DNS
# flood can never starve gossip, the control socket or netlink of descriptors.
UPSTREAM_FD_SHARE = 4

# Seconds a TCP connection may sit without completing a message (RFC 7766 §6.2.3 asks servers
# to time out idle clients; a few seconds is plenty for a resolver retrying after TC). Also the
# bound on writing one answer to a client that does not read.
TCP_IDLE_TIMEOUT = 10.0

# Listen backlog for a TCP listener; a burst beyond it is refused by the kernel.
TCP_BACKLOG = 128

# Datagrams read per readiness callback before yielding to the loop: amortises the wakeup over a
# burst while letting TCP, timers and other listeners run between batches.
UDP_BATCH = 64

# Seconds an upstream TCP connection may take to come up before that attempt goes over UDP
# instead. A LAN or loopback resolver accepts in well under a millisecond and a distant one within
# a few round trips; a firewall that silently drops TCP to port 53 would otherwise cost every
# TC-retrying client the whole attempt and then a SERVFAIL.
UPSTREAM_TCP_CONNECT_TIMEOUT = 1.0

# Datagrams read from one upstream socket per readiness callback. A socket serves one attempt of
# one query, so more than one datagram is junk (or a spoofer); this bounds what it costs a turn.
UPSTREAM_READ_BATCH = 8

# Bytes read per UDP datagram. A query is one question (a name is at most 255 bytes) and an OPT
# record with a few options, far below this; a longer datagram is cut here and answered FORMERR.
MAX_UDP_QUERY_BYTES = 4096

# Attempts at finding one port free for both UDP and TCP when a listener asks for port 0.
_PORT_ATTEMPTS = 16

_RCODE_SERVFAIL = 2

# A TCP connection that arrives at a listener being removed.
REFUSE_CLOSED = Refuse("closed")

# What the pool remembers as the client of a forwarded query: where to send its reply, and
# when the query arrived (perf_counter), for the latency histogram.
_UdpClient = tuple["_UdpListener", Addr, float]
_Client = _UdpClient | asyncio.Future[bytes]

log = logging.getLogger("meshnet.dns")


def per_listener_share(total: int) -> int:
    """The default cap of one listener out of ``total`` slots (see PER_LISTENER_SHARE)."""
    return max(1, min(total, max(MIN_PER_LISTENER, total // PER_LISTENER_SHARE)))


def upstream_fd_budget() -> int:
    """Most upstream sockets open at once: 1/UPSTREAM_FD_SHARE of RLIMIT_NOFILE (at least 16)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):  # pragma: no cover - Linux always has it
        return MAX_IN_FLIGHT
    if soft == resource.RLIM_INFINITY or soft >= UPSTREAM_FD_SHARE << 15:
        return 1 << 15
    return max(16, soft // UPSTREAM_FD_SHARE)


# -- upstreams from resolv.conf -------------------------------------------------------------------


def parse_resolv_conf(text: str, max_upstreams: int = MAX_UPSTREAMS) -> list[Addr]:
    """The ``nameserver`` addresses in resolv.conf ``text``, as ``(ip, 53)``, in file order.

    Like glibc: comments (``#``/``;``) are ignored, a line that does not hold a valid IP address
    is skipped, and at most ``max_upstreams`` (glibc's MAXNS, 3) are kept. Our own sandbox
    address 127.0.0.11 is skipped (forwarding to ourselves would loop), as are duplicates.
    """
    out: list[Addr] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0]
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            ip = ipaddress.ip_address(fields[1])
        except ValueError:
            continue
        if str(ip) == EMBEDDED_DNS_IP:
            continue
        entry = (str(ip), 53)
        if entry in out:
            continue
        out.append(entry)
        if len(out) >= max_upstreams:
            break
    return out


def read_resolv_conf(path: str | Path = "/etc/resolv.conf") -> list[Addr]:
    """:func:`parse_resolv_conf` of the file at ``path``; [] if it cannot be read."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return parse_resolv_conf(text)


# -- UDP ------------------------------------------------------------------------------------------


class _UdpListener:
    """The hot path: a batch of recvfrom, and per query one resolver call and one sendto.

    The socket is read directly from a reader callback rather than through a transport and a
    protocol: the per-datagram work left is the kernel's two syscalls, the answer bytes and the
    address tuple. Under dnsperf (bench/dns.py) this costs about 17.5-18 us of server CPU per
    query against 19-20 us through uvloop's datagram transport, and dnsmasq's 17.5-19.5 us;
    py-spy puts over 80% of it in the kernel (sendto alone about half, as loopback delivery
    runs in the sender), and under 10% in Python. Replies are sent at once and never queued:
    if the socket's send buffer is full the reply is dropped and counted, and the client
    retries, as after any lost datagram (dnsmasq does the same).
    """

    __slots__ = (
        "answer",
        "answered",
        "closed",
        "fd",
        "latency",
        "networks",
        "rcodes",
        "recvfrom",
        "sendto",
        "server",
        "sock",
    )

    def __init__(
        self, server: DnsServer, networks: frozenset[str] | None, sock: socket.socket
    ) -> None:
        self.server = server
        self.networks = networks
        self.sock = sock
        self.fd = sock.fileno()
        self.recvfrom = sock.recvfrom
        self.sendto = sock.sendto
        self.answer = server.resolver.answer
        self.answered = 0
        self.closed = False
        self.rcodes = server.rcodes
        self.latency = server.latency

    def on_readable(self) -> None:
        recvfrom = self.recvfrom
        sendto = self.sendto
        answer = self.answer
        networks = self.networks
        # For /metrics every answer sent here is counted by RCODE and its latency observed, at a
        # few bytecodes a query. One clock read a query ends its time and starts the next one's:
        # a query's latency runs from the start of its recvfrom to the end of its sendto. A query
        # only checks that it is NOERROR and within the first bucket, as nearly all are; those
        # are added once per batch (answers minus the others), with their latencies' sum taken
        # per run of them as its last read minus its first. The others are counted one by one,
        # their latencies through Histogram.observe.
        rcodes = self.rcodes
        hist = self.latency
        first = hist.bounds[0]
        clock = time.perf_counter
        answered = 0
        not_noerror = 0  # answers counted in rcodes[1:] (or with no RCODE at all)
        observed = 0  # answers given to Histogram.observe: beyond the first bucket, or NaN
        spent = 0.0  # the latency sum of the ended runs of first-bucket answers
        t0 = start = clock()  # the end of the last query; the start of the current run
        try:
            for _ in range(UDP_BATCH):
                try:
                    data, addr = recvfrom(MAX_UDP_QUERY_BYTES)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    self.server.counters["recv_errors"] += 1
                    break
                reply = answer(data, networks)
                if reply.__class__ is bytes:
                    try:
                        sendto(reply, addr)
                    except OSError:
                        self.server.counters["send_errors"] += 1
                        if t0 > start:  # (False for an empty run, or one NaN read)
                            spent += t0 - start
                        t0 = start = clock()
                        continue
                    t1 = clock()
                    answered += 1
                    try:
                        if reply[3] & 0x0F:
                            rcodes[reply[3] & 0x0F] += 1
                            not_noerror += 1
                    except IndexError:  # pragma: no cover - a reply has a whole header
                        not_noerror += 1
                    if not t1 - t0 <= first:  # rare: a later bucket (or a NaN read)
                        if t0 > start:
                            spent += t0 - start
                        observed += 1
                        hist.observe(t1 - t0)
                        start = t1
                    t0 = t1
                else:
                    if t0 > start:
                        spent += t0 - start
                    self.server._udp_slow(self, data, addr, reply, t0)
                    t0 = start = clock()
        finally:
            if t0 > start:
                spent += t0 - start
            self.answered += answered
            if answered:
                rcodes[0] += answered - not_noerror
                hist.add_first_bucket(answered - observed, spent)

    def send(self, data: bytes, addr: Addr) -> None:
        """Send one reply from the slow paths (forwarded answers, SERVFAIL)."""
        if self.closed:
            self.server.counters["reply_dropped"] += 1
            return
        try:
            self.sendto(data, addr)
        except OSError:
            self.server.counters["send_errors"] += 1


# -- listeners ------------------------------------------------------------------------------------


class Listener:
    """One address served over UDP and TCP with a fixed network scope."""

    def __init__(
        self,
        addr: Addr,
        networks: frozenset[str] | None,
        udp: _UdpListener,
        tcp: asyncio.AbstractServer,
    ) -> None:
        self.addr = addr
        self.networks = networks
        self.udp = udp
        self.tcp = tcp
        self.tcp_sessions: set[_TcpSession] = set()
        self.closed = False

    def __repr__(self) -> str:
        scope = "all" if self.networks is None else ",".join(sorted(self.networks))
        return f"<Listener {self.addr[0]}:{self.addr[1]} networks={scope}>"


# -- the server -----------------------------------------------------------------------------------


class _Exchange:
    """One forwarded query's sockets: the current attempt's UDP socket or TCP task, never both.

    Every attempt gets a fresh socket bound to port 0 (so a fresh random source port) and the
    previous attempt's is closed first; the last is closed when the pool ends the query.
    """

    __slots__ = ("attempt", "closed", "qid", "sock", "task")

    def __init__(self, qid: int) -> None:
        self.qid = qid
        self.attempt = -1
        self.sock: socket.socket | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False


class _TcpSession:
    """One client TCP connection: its task and writer, and the forwarded query it waits for."""

    __slots__ = ("fut", "qid", "task", "writer")

    def __init__(self, task: asyncio.Task[None], writer: asyncio.StreamWriter) -> None:
        self.task = task
        self.writer = writer
        self.fut: asyncio.Future[bytes] | None = None
        self.qid: int | None = None


class DnsServer:
    """Serves :class:`Resolver` answers on any number of listeners, forwarding the rest.

    ``upstreams`` are ``(ip, port)`` pairs (see :func:`read_resolv_conf`); [] answers every
    forwarded name SERVFAIL at once. ``timeout`` goes to the :class:`UpstreamPool`, and so do
    ``max_in_flight`` (lowered to :func:`upstream_fd_budget`) and ``max_in_flight_per_listener``
    (default: :func:`per_listener_share` of it, a quarter). ``max_tcp_connections`` and
    ``max_tcp_per_listener`` (the same default) cap client TCP connections. Every listener is
    one owner for both caps (see :class:`~meshnet.dns.limits.FairSlots`). The resolver is
    shared: the agent calls ``resolver.set_records`` on every store change and the next query
    sees it.
    """

    def __init__(
        self,
        resolver: Resolver,
        upstreams: Iterable[Addr],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_in_flight_per_listener: int | None = None,
        max_tcp_connections: int = MAX_TCP_CONNECTIONS,
        max_tcp_per_listener: int | None = None,
        tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
    ) -> None:
        self.resolver = resolver
        total = max(1, min(max_in_flight, upstream_fd_budget()))
        self.pool: UpstreamPool[_Client] = UpstreamPool(
            list(upstreams),
            max_in_flight=total,
            max_in_flight_per_owner=(
                max_in_flight_per_listener
                if max_in_flight_per_listener is not None
                else per_listener_share(total)
            ),
            timeout=timeout,
        )
        self.max_tcp_connections = max_tcp_connections
        self.tcp_idle_timeout = tcp_idle_timeout
        self._tcp_slots: FairSlots[_UdpListener, _TcpSession] = FairSlots(
            max_tcp_connections,
            max_tcp_per_listener
            if max_tcp_per_listener is not None
            else per_listener_share(max_tcp_connections),
        )
        self.listeners: list[Listener] = []
        self.counters: dict[str, int] = {
            "queries": 0,  # off the hot path only; stats() adds the hot path's answers
            "answered": 0,  # likewise, plus those of removed listeners
            "forwarded": 0,
            "servfail": 0,
            "dropped": 0,
            "reply_dropped": 0,  # a forwarded answer for a listener removed meanwhile
            "tcp": 0,
            "tcp_refused": 0,  # every refused connection, of which:
            "tcp_refused_listener": 0,  # its listener had its cap
            "tcp_evicted": 0,  # a busier listener's oldest connection closed for a quiet one
            "tcp_timeouts": 0,  # idle connections closed
            "send_errors": 0,
            "recv_errors": 0,
            "upstream_errors": 0,  # receive errors on upstream sockets
            "upstream_socket_errors": 0,  # an upstream socket could not be opened
            "upstream_tcp_errors": 0,  # TCP to an upstream failed (refused, reset, cut short)
            "upstream_tcp_fallbacks": 0,  # ... so that attempt went over UDP instead
            "internal_errors": 0,  # a bug caught at the boundary (the fuzz tests want 0)
        }
        # For /metrics: answers sent by their header's RCODE, and seconds from a query's
        # arrival to its answer (a forwarded one includes the upstream's round trip).
        self.rcodes = [0] * 16
        self.latency = Histogram(DNS_LATENCY_BUCKETS)
        self._log_once = LogOnce(log)
        self._loop: asyncio.AbstractEventLoop | None = None
        # address family -> the address upstream sockets are bound to (port 0)
        self._bind: dict[int, str] = {}
        self._set_bind()
        self._exchanges: dict[int, _Exchange] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # upstream TCP attempts
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------

    async def add_listener(
        self,
        addr: Addr,
        networks: frozenset[str] | None,
        sock_udp: socket.socket | None = None,
        sock_tcp: socket.socket | None = None,
    ) -> Listener:
        """Serve UDP and TCP on ``addr`` for clients that see ``networks`` (None: all).

        With ``sock_udp`` and ``sock_tcp`` (both or neither; e.g. opened inside a sandbox's
        network namespace) those bound sockets are served instead and ``addr`` only names them;
        the listener owns them from now on. With port 0 one port free for both is picked.
        ``networks`` is kept as given: pass the same object for the life of the listener.
        """
        if self._closed:
            raise RuntimeError("DnsServer is closed")
        if (sock_udp is None) != (sock_tcp is None):
            raise ValueError("pass both sock_udp and sock_tcp, or neither")
        loop = self._loop = asyncio.get_running_loop()
        if sock_udp is None or sock_tcp is None:
            sock_udp, sock_tcp = _bind_pair(addr)
        addr = (addr[0], addr[1] or int(sock_udp.getsockname()[1]))
        sock_udp.setblocking(False)
        sock_tcp.setblocking(False)
        udp = _UdpListener(self, networks, sock_udp)
        try:
            loop.add_reader(udp.fd, udp.on_readable)
        except BaseException:
            sock_udp.close()
            sock_tcp.close()
            raise
        holder: list[Listener] = []

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._serve_tcp(holder[0], reader, writer)

        try:
            tcp = await asyncio.start_server(serve, sock=sock_tcp, backlog=TCP_BACKLOG)
        except BaseException:
            self._close_udp(udp)
            sock_tcp.close()
            raise
        listener = Listener(addr, networks, udp, tcp)
        holder.append(listener)
        self.listeners.append(listener)
        return listener

    async def remove_listener(self, listener: Listener) -> None:
        """Stop serving ``listener``: close its sockets and TCP connections, and forget the
        queries it forwarded (their slots are free at once)."""
        if listener.closed:
            return
        listener.closed = True
        with contextlib.suppress(ValueError):
            self.listeners.remove(listener)
        self.counters["answered"] += listener.udp.answered
        self.counters["queries"] += listener.udp.answered
        listener.udp.answered = 0
        self._close_udp(listener.udp)
        listener.tcp.close()
        sessions = list(listener.tcp_sessions)
        for session in sessions:
            self._end_session(session)
        if sessions:
            tasks = [session.task for session in sessions]
            _, late = await asyncio.wait(tasks, timeout=1.0)
            for task in late:  # pragma: no cover - an ended session returns at its next await
                task.cancel()
        for qid in self.pool.cancel_owner(listener.udp):
            self._close_exchange(qid)
        self._arm_timer()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(listener.tcp.wait_closed(), 1.0)

    async def close(self) -> None:
        """Remove every listener (ending TCP sessions, forwarded queries and all), stop the
        timer and close every upstream socket. Replies still due to UDP clients are dropped."""
        self._closed = True
        for listener in list(self.listeners):
            await self.remove_listener(listener)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        for qid in list(self._exchanges):
            self._close_exchange(qid)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def set_upstreams(self, upstreams: Iterable[Addr]) -> None:
        """Forward new queries to ``upstreams`` (e.g. after resolv.conf changed)."""
        self.pool.set_upstreams(list(upstreams))
        self._set_bind()

    def stats(self) -> dict[str, int]:
        """Counters: queries, answered, forwarded, servfail, dropped, tcp, ... (all ints)."""
        out = dict(self.counters)
        hot = sum(listener.udp.answered for listener in self.listeners)
        out["answered"] += hot
        out["queries"] += hot
        out["listeners"] = len(self.listeners)
        out["tcp_connections"] = len(self._tcp_slots)
        out["max_tcp_connections"] = self._tcp_slots.total
        out["max_tcp_per_listener"] = self._tcp_slots.per_owner
        out["in_flight"] = self.pool.in_flight
        out["max_in_flight"] = self.pool.max_in_flight
        out["max_in_flight_per_listener"] = self.pool.max_in_flight_per_owner
        out["upstream_sockets"] = sum(
            (ex.sock is not None) + (ex.task is not None) for ex in self._exchanges.values()
        )
        for k, v in self.pool.counters.items():
            out[f"upstream_{k}"] = v
        for k, v in self.resolver.counters.items():
            out[f"resolver_{k}"] = v
        return out

    def _close_udp(self, udp: _UdpListener) -> None:
        if udp.closed:
            return
        udp.closed = True
        if self._loop is not None:
            self._loop.remove_reader(udp.fd)
        udp.sock.close()

    def _set_bind(self) -> None:
        """Where upstream sockets are bound, per family: the loopback address when every
        upstream of that family is on loopback (so nothing outside can reach them), else the
        wildcard; always port 0, so the kernel picks a random free port for each."""
        for family, any_ip, lo_ip in (
            (socket.AF_INET, "0.0.0.0", "127.0.0.1"),
            (socket.AF_INET6, "::", "::1"),
        ):
            v6 = family == socket.AF_INET6
            ours = [a[0] for a in self.pool.upstreams if (":" in a[0]) == v6]
            self._bind[family] = lo_ip if all(_is_loopback(ip) for ip in ours) else any_ip

    # -- slow paths: forwarding, drops ------------------------------------------------------------

    def _udp_slow(
        self, proto: _UdpListener, data: bytes, addr: Addr, reply: bytes | Forward | Drop,
        t0: float,
    ) -> None:
        c = self.counters
        c["queries"] += 1
        if isinstance(reply, Drop):
            c["dropped"] += 1
            return
        if isinstance(reply, Forward):
            self._forward(data, (proto, addr, t0), proto, tcp=False)
        else:  # pragma: no cover - the hot path handles bytes
            proto.send(reply, addr)
            proto.answered += 1
            self._answered(reply, t0)

    def _answered(self, reply: bytes, t0: float) -> None:
        """Count an answer off the hot path: its RCODE and its latency since ``t0``."""
        if len(reply) > 3:
            self.rcodes[reply[3] & 0x0F] += 1
        self.latency.observe(time.perf_counter() - t0)

    def _forward(self, query: bytes, client: _Client, owner: _UdpListener, tcp: bool) -> int | None:
        """Hand ``query`` to the pool for ``client`` of listener ``owner``; the upstream query
        id if it was sent upstream (None: answered or dropped at once)."""
        loop = self._loop
        assert loop is not None
        c = self.counters
        try:
            outs = self.pool.submit(query, client, loop.time(), owner=owner, tcp=tcp)
        except Exception as e:  # a bug; never let it reach the loop or end a TCP session
            c["internal_errors"] += 1
            self._log_once("answering a DNS query", e, "dns.internal_errors")
            outs = []
        if not outs:
            c["dropped"] += 1
            if isinstance(client, asyncio.Future) and not client.done():
                client.set_result(b"")
            return None
        c["forwarded"] += 1
        qid: int | None = None
        for out in outs:
            if isinstance(out, SendUpstream):
                qid = out.qid
            self._dispatch(out)
        self._arm_timer()
        return qid

    def _dispatch(self, out: SendUpstream | ReplyClient[_Client]) -> None:
        if isinstance(out, SendUpstream):
            self._start_attempt(out)
            return
        if out.qid is not None:
            self._close_exchange(out.qid)
        data = out.data
        if len(data) >= 4 and data[3] & 0x0F == _RCODE_SERVFAIL:
            self.counters["servfail"] += 1
        client = out.client
        if isinstance(client, tuple):
            listener, addr, t0 = client
            if not listener.closed:  # else dropped (reply_dropped), not answered
                self._answered(data, t0)
            listener.send(data, addr)
        elif not client.done():
            client.set_result(data)

    # -- upstream sockets: one per attempt ------------------------------------------------------

    def _start_attempt(self, out: SendUpstream) -> None:
        ex = self._exchanges.get(out.qid)
        if ex is None:
            ex = self._exchanges[out.qid] = _Exchange(out.qid)
        self._end_attempt(ex)
        ex.attempt = out.attempt
        if out.tcp:
            loop = self._loop
            assert loop is not None
            task = loop.create_task(self._tcp_attempt(ex, out.attempt, out.addr, out.data))
            ex.task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        else:
            self._udp_attempt(ex, out.addr, out.data)

    def _udp_attempt(self, ex: _Exchange, addr: Addr, data: bytes) -> None:
        """Send ``data`` to ``addr`` from a new UDP socket bound to port 0, and listen on it.

        If no socket can be had (out of descriptors) or the send fails, the attempt is
        counted and left to time out like a lost datagram.
        """
        loop = self._loop
        assert loop is not None
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        sock: socket.socket | None = None
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.bind((self._bind[family], 0))
            loop.add_reader(sock.fileno(), self._on_upstream_udp, ex, sock, ex.attempt)
        except (OSError, ValueError):
            self.counters["upstream_socket_errors"] += 1
            if sock is not None:
                sock.close()
            return
        ex.sock = sock
        try:
            sock.sendto(data, addr)
        except (OSError, ValueError):
            self.counters["send_errors"] += 1

    def _on_upstream_udp(self, ex: _Exchange, sock: socket.socket, attempt: int) -> None:
        for _ in range(UPSTREAM_READ_BATCH):
            if ex.sock is not sock:
                return  # the query ended, or moved on to another attempt, meanwhile
            try:
                data, addr = sock.recvfrom(MAX_MESSAGE_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.counters["upstream_errors"] += 1
                return
            self._from_upstream(data, addr, ex.qid, attempt)

    async def _tcp_attempt(self, ex: _Exchange, attempt: int, addr: Addr, data: bytes) -> None:
        """One attempt over TCP: connect from a fresh port, send the framed query, read one
        framed reply. If TCP fails before a reply arrives (an upstream that only does UDP, or a
        firewall that drops TCP to port 53 so the connection is not up within
        UPSTREAM_TCP_CONNECT_TIMEOUT), the same attempt goes over UDP, whose answer may then
        come back truncated: still better than none."""
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(UPSTREAM_TCP_CONNECT_TIMEOUT):  # TimeoutError: an OSError
                reader, writer = await asyncio.open_connection(
                    addr[0], addr[1], local_addr=(self._bind[family], 0)
                )
            writer.write(len(data).to_bytes(2, "big") + data)
            await writer.drain()
            head = await reader.readexactly(2)
            msg = await reader.readexactly(int.from_bytes(head, "big"))
        except (OSError, EOFError, ValueError):  # IncompleteReadError is an EOFError
            self.counters["upstream_tcp_errors"] += 1
            if ex.closed or ex.attempt != attempt or ex.task is not asyncio.current_task():
                return
            ex.task = None
            self.counters["upstream_tcp_fallbacks"] += 1
            self._udp_attempt(ex, addr, data)
            return
        finally:  # one query per connection; also when the attempt is cancelled
            if writer is not None:
                writer.transport.abort()
        if ex.closed or ex.attempt != attempt:
            return
        # A reply that does not match is dropped and counted; the attempt then times out.
        self._from_upstream(msg, addr, ex.qid, attempt)

    def _from_upstream(self, data: bytes, addr: Addr, qid: int, attempt: int) -> None:
        loop = self._loop
        assert loop is not None
        try:
            out = self.pool.receive(data, addr, loop.time(), qid=qid, attempt=attempt)
        except Exception as e:  # a bug; never let it reach the loop
            self.counters["internal_errors"] += 1
            self._log_once("reading an upstream DNS reply", e, "dns.internal_errors")
            return
        if out is not None:
            self._dispatch(out)
            self._arm_timer()

    def _end_attempt(self, ex: _Exchange) -> None:
        sock = ex.sock
        if sock is not None:
            ex.sock = None
            if self._loop is not None:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        task = ex.task
        if task is not None:
            ex.task = None
            if task is not asyncio.current_task():
                task.cancel()

    def _close_exchange(self, qid: int) -> None:
        ex = self._exchanges.pop(qid, None)
        if ex is not None:
            ex.closed = True
            self._end_attempt(ex)

    def _arm_timer(self) -> None:
        deadline = self.pool.get_timer()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None and self._loop is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        loop = self._loop
        assert loop is not None
        for out in self.pool.handle_timer(loop.time()):
            self._dispatch(out)
        self._arm_timer()

    # -- TCP ------------------------------------------------------------------------------------

    async def _serve_tcp(
        self, listener: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        c = self.counters
        task = asyncio.current_task()
        assert task is not None
        owner = listener.udp
        session = _TcpSession(task, writer)
        got = REFUSE_CLOSED if listener.closed else self._tcp_slots.acquire(owner, session)
        if isinstance(got, Refuse):
            c["tcp_refused"] += 1
            if got.reason == "owner":
                c["tcp_refused_listener"] += 1
            writer.transport.abort()
            return
        if got.evicted is not None:
            c["tcp_evicted"] += 1
            self._end_session(got.evicted[1])  # its slot is ours already
        listener.tcp_sessions.add(session)
        try:
            await self._tcp_session(listener, session, reader, writer)
        except TimeoutError:
            c["tcp_timeouts"] += 1
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._tcp_slots.release(owner, session)
            listener.tcp_sessions.discard(session)
            writer.transport.abort()

    def _end_session(self, session: _TcpSession) -> None:
        """Close a TCP session from outside (eviction, removal) without cancelling its task
        (which would be logged): its connection is aborted, so its next read ends it, and a
        forwarded query it waits for is forgotten and its wait ended."""
        session.writer.transport.abort()
        fut = session.fut
        if fut is not None and not fut.done():
            fut.set_result(b"")
            qid = session.qid
            if qid is not None and self.pool.cancel(qid):
                self._close_exchange(qid)
                self._arm_timer()

    async def _tcp_session(
        self,
        listener: Listener,
        session: _TcpSession,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        idle = self.tcp_idle_timeout
        c = self.counters
        while True:  # bounded by the idle timeout and the client closing
            async with asyncio.timeout(idle):
                head = await reader.readexactly(2)
                query = await reader.readexactly(int.from_bytes(head, "big"))
            c["queries"] += 1
            c["tcp"] += 1
            t0 = time.perf_counter()
            reply = self.resolver.answer(query, listener.networks, tcp=True)
            if isinstance(reply, Forward):
                reply = await self._forward_tcp(query, listener, session)
            elif isinstance(reply, Drop):
                c["dropped"] += 1
                continue
            else:
                c["answered"] += 1
            if not reply:
                continue
            self._answered(reply, t0)
            writer.write(len(reply).to_bytes(2, "big") + reply)
            async with asyncio.timeout(idle):
                await writer.drain()

    async def _forward_tcp(self, query: bytes, listener: Listener, session: _TcpSession) -> bytes:
        """The upstream's reply to ``query`` (asked over TCP), or SERVFAIL; b"" if it is no
        query or the session was ended. If this session ends first, the upstream query is
        forgotten with it."""
        loop = self._loop
        assert loop is not None
        fut: asyncio.Future[bytes] = loop.create_future()
        qid = self._forward(query, fut, listener.udp, tcp=True)
        session.fut, session.qid = fut, qid
        try:
            # The pool answers every submitted query within its timeout (SERVFAIL at worst).
            return await fut
        except asyncio.CancelledError:
            if qid is not None and fut.cancelled() and self.pool.cancel(qid):
                self._close_exchange(qid)
                self._arm_timer()
            raise
        finally:
            session.fut = session.qid = None


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _bind_pair(addr: Addr) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket bound to ``addr``; with port 0, to one port free for both."""
    family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    attempts = _PORT_ATTEMPTS if addr[1] == 0 else 1
    last: OSError | None = None
    for _ in range(attempts):
        u = socket.socket(family, socket.SOCK_DGRAM)
        try:
            u.bind(addr)
        except OSError:
            u.close()
            raise
        port = int(u.getsockname()[1])
        t = socket.socket(family, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            t.bind((addr[0], port))
        except OSError as exc:
            u.close()
            t.close()
            last = exc
            continue
        return u, t
    assert last is not None
    raise last
