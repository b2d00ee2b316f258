"""The DNS core's asyncio shell: UDP and TCP listeners, one upstream socket, one timer.

:class:`DnsServer` moves bytes between sockets and the two pure cores of :mod:`meshnet.dns`:
every query goes to :meth:`Resolver.answer` with the asking listener's network scope; a
:class:`~meshnet.dns.Forward` goes to the :class:`~meshnet.dns.UpstreamPool`, whose
:class:`~meshnet.dns.SendUpstream` leave from one ephemeral UDP socket owned by the server and
whose :class:`~meshnet.dns.ReplyClient` go back to the client on the listener it asked on.

Listeners come in two kinds (DESIGN.md §4, issue 4):

- host-side ones (``--dns-listen``, tests, benchmarks): ``networks=None``, they see every name;
- one per sandbox on 127.0.0.11:53 inside the sandbox's network namespace, scoped to the networks
  the sandbox is attached to. The agent opens both sockets inside the namespace and passes them
  in (``sock_udp``/``sock_tcp``); the server never changes namespaces itself.

The UDP hot path is one call into the resolver and one ``sendto``: no logging, no parsing, no
allocation beyond the answer bytes, and a counter. Everything unusual (forwarding, drops, TCP)
is off that path. Nothing a client sends can raise out of a protocol callback or grow memory
without bound: forwarded queries are capped by the pool, TCP connections by
:data:`MAX_TCP_CONNECTIONS` with an idle timeout, and a TCP message by its 16-bit length.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Iterable
from pathlib import Path

from meshnet.dns import (
    DEFAULT_TIMEOUT,
    MAX_IN_FLIGHT,
    MAX_UPSTREAMS,
    Drop,
    Forward,
    ReplyClient,
    Resolver,
    SendUpstream,
    UpstreamPool,
)

__all__ = [
    "EMBEDDED_DNS_IP",
    "MAX_TCP_CONNECTIONS",
    "MAX_UDP_QUERY_BYTES",
    "TCP_IDLE_TIMEOUT",
    "UDP_BATCH",
    "DnsServer",
    "Listener",
    "parse_resolv_conf",
    "read_resolv_conf",
]

Addr = tuple[str, int]

# The resolver address inside every sandbox (Docker's); never an upstream of itself.
EMBEDDED_DNS_IP = "127.0.0.11"

# Concurrent DNS-over-TCP connections across all listeners. TCP is the fallback after a TC
# answer, so real load is a handful; each connection costs a task and two small buffers, so 256
# bounds memory to well under a few MB while no sane client pool is refused. Beyond it a new
# connection is closed at once (the client retries or gives up, as with an overloaded server).
MAX_TCP_CONNECTIONS = 256

# Seconds a TCP connection may sit without completing a message (RFC 7766 §6.2.3 asks servers
# to time out idle clients; a few seconds is plenty for a resolver retrying after TC). Also the
# bound on writing one answer to a client that does not read.
TCP_IDLE_TIMEOUT = 10.0

# Listen backlog for a TCP listener; a burst beyond it is refused by the kernel.
TCP_BACKLOG = 128

# Datagrams read per readiness callback before yielding to the loop: amortises the wakeup over a
# burst while letting TCP, timers and other listeners run between batches.
UDP_BATCH = 64

# Bytes read per UDP datagram. A query is one question (a name is at most 255 bytes) and an OPT
# record with a few options, far below this; a longer datagram is cut here and answered FORMERR.
MAX_UDP_QUERY_BYTES = 4096

# Attempts at finding one port free for both UDP and TCP when a listener asks for port 0.
_PORT_ATTEMPTS = 16

_RCODE_SERVFAIL = 2

# What the pool remembers as the client of a forwarded query: where to send its reply.
_UdpClient = tuple["_UdpListener", Addr]
_Client = _UdpClient | asyncio.Future[bytes]


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
        "networks",
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

    def on_readable(self) -> None:
        recvfrom = self.recvfrom
        sendto = self.sendto
        answer = self.answer
        networks = self.networks
        answered = 0
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
                    continue
                answered += 1
            else:
                self.server._udp_slow(self, data, addr, reply)
        self.answered += answered

    def send(self, data: bytes, addr: Addr) -> None:
        """Send one reply from the slow paths (forwarded answers, SERVFAIL)."""
        if self.closed:
            return
        try:
            self.sendto(data, addr)
        except OSError:
            self.server.counters["send_errors"] += 1


class _UpstreamProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.server._upstream_reply(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.server.counters["upstream_errors"] += 1


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
        self.tcp_tasks: set[asyncio.Task[None]] = set()
        self.closed = False

    def __repr__(self) -> str:
        scope = "all" if self.networks is None else ",".join(sorted(self.networks))
        return f"<Listener {self.addr[0]}:{self.addr[1]} networks={scope}>"


# -- the server -----------------------------------------------------------------------------------


class DnsServer:
    """Serves :class:`Resolver` answers on any number of listeners, forwarding the rest.

    ``upstreams`` are ``(ip, port)`` pairs (see :func:`read_resolv_conf`); [] answers every
    forwarded name SERVFAIL at once. ``timeout`` and ``max_in_flight`` go to the
    :class:`UpstreamPool`. The resolver is shared: the agent calls ``resolver.set_records`` on
    every store change and the next query sees it.
    """

    def __init__(
        self,
        resolver: Resolver,
        upstreams: Iterable[Addr],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_tcp_connections: int = MAX_TCP_CONNECTIONS,
        tcp_idle_timeout: float = TCP_IDLE_TIMEOUT,
    ) -> None:
        self.resolver = resolver
        self.pool: UpstreamPool[_Client] = UpstreamPool(
            list(upstreams), max_in_flight=max_in_flight, timeout=timeout
        )
        self.max_tcp_connections = max_tcp_connections
        self.tcp_idle_timeout = tcp_idle_timeout
        self.listeners: list[Listener] = []
        self.counters: dict[str, int] = {
            "queries": 0,  # off the hot path only; stats() adds the hot path's answers
            "answered": 0,  # likewise, plus those of removed listeners
            "forwarded": 0,
            "servfail": 0,
            "dropped": 0,
            "tcp": 0,
            "tcp_refused": 0,
            "send_errors": 0,
            "recv_errors": 0,
            "upstream_errors": 0,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        # address family -> (the upstream socket's transport, the address it is bound to)
        self._upstream: dict[int, tuple[asyncio.DatagramTransport, str]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._tcp_open = 0
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
        await self._ensure_upstream()
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
        """Stop serving ``listener``: close its sockets and its TCP connections."""
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
        tasks = list(listener.tcp_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(listener.tcp.wait_closed(), 1.0)

    async def close(self) -> None:
        """Remove every listener (ending TCP sessions, forwarded queries and all), stop the
        timer and close the upstream socket(s). Replies still due to UDP clients are dropped."""
        self._closed = True
        for listener in list(self.listeners):
            await self.remove_listener(listener)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        for transport, _ in self._upstream.values():
            transport.close()
        self._upstream.clear()

    async def set_upstreams(self, upstreams: Iterable[Addr]) -> None:
        """Forward new queries to ``upstreams`` (e.g. after resolv.conf changed)."""
        self.pool.set_upstreams(list(upstreams))
        if self._loop is not None and not self._closed:
            await self._ensure_upstream()

    def stats(self) -> dict[str, int]:
        """Counters: queries, answered, forwarded, servfail, dropped, tcp, ... (all ints)."""
        out = dict(self.counters)
        hot = sum(listener.udp.answered for listener in self.listeners)
        out["answered"] += hot
        out["queries"] += hot
        out["listeners"] = len(self.listeners)
        out["tcp_connections"] = self._tcp_open
        out["in_flight"] = self.pool.in_flight
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

    # -- upstream socket ------------------------------------------------------------------------

    async def _ensure_upstream(self) -> None:
        """Open (or re-open, if it cannot reach the upstreams) the upstream UDP socket(s).

        One IPv4 socket, bound to 127.0.0.1 when every IPv4 upstream is on loopback (so nothing
        outside can reach it) and to 0.0.0.0 otherwise, plus one IPv6 socket only if there are
        IPv6 upstreams; ports are ephemeral.
        """
        loop = asyncio.get_running_loop()
        for family, any_ip, lo_ip in (
            (socket.AF_INET, "0.0.0.0", "127.0.0.1"),
            (socket.AF_INET6, "::", "::1"),
        ):
            ips = [ipaddress.ip_address(a[0]) for a in self.pool.upstreams]
            ips = [ip for ip in ips if (ip.version == 6) == (family == socket.AF_INET6)]
            if family == socket.AF_INET6 and not ips:
                continue
            bind = lo_ip if all(ip.is_loopback for ip in ips) else any_ip
            old = self._upstream.get(family)
            if old is not None and (old[1] == bind or not ips):
                continue
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _UpstreamProtocol(self), local_addr=(bind, 0), family=family
            )
            if old is not None:
                old[0].close()  # replies to queries sent from it are lost; they time out
            self._upstream[family] = (transport, bind)

    # -- slow paths: forwarding, drops ------------------------------------------------------------

    def _udp_slow(
        self, proto: _UdpListener, data: bytes, addr: Addr, reply: bytes | Forward | Drop
    ) -> None:
        c = self.counters
        c["queries"] += 1
        if isinstance(reply, Drop):
            c["dropped"] += 1
            return
        if isinstance(reply, Forward):
            self._forward(data, (proto, addr))
        else:  # pragma: no cover - the hot path handles bytes
            proto.send(reply, addr)
            proto.answered += 1

    def _forward(self, query: bytes, client: _Client) -> None:
        loop = self._loop
        assert loop is not None
        c = self.counters
        out = self.pool.submit(query, client, loop.time())
        if out is None:
            c["dropped"] += 1
            if isinstance(client, asyncio.Future) and not client.done():
                client.set_result(b"")
            return
        c["forwarded"] += 1
        self._dispatch(out)
        self._arm_timer()

    def _dispatch(self, out: SendUpstream | ReplyClient[_Client]) -> None:
        if isinstance(out, SendUpstream):
            family = socket.AF_INET6 if ":" in out.addr[0] else socket.AF_INET
            up = self._upstream.get(family)
            if up is None:
                self.counters["send_errors"] += 1
                return
            try:
                up[0].sendto(out.data, out.addr)
            except (OSError, ValueError):
                self.counters["send_errors"] += 1
            return
        data = out.data
        if len(data) >= 4 and data[3] & 0x0F == _RCODE_SERVFAIL:
            self.counters["servfail"] += 1
        client = out.client
        if isinstance(client, tuple):
            client[0].send(data, client[1])
        elif not client.done():
            client.set_result(data)

    def _upstream_reply(self, data: bytes, addr: Addr) -> None:
        loop = self._loop
        assert loop is not None
        out = self.pool.receive(data, addr, loop.time())
        if out is not None:
            self._dispatch(out)
            self._arm_timer()

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
        if self._tcp_open >= self.max_tcp_connections or listener.closed:
            self.counters["tcp_refused"] += 1
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tcp_open += 1
        listener.tcp_tasks.add(task)
        try:
            await self._tcp_session(listener, reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, OSError):
            pass
        finally:
            self._tcp_open -= 1
            listener.tcp_tasks.discard(task)
            writer.transport.abort()

    async def _tcp_session(
        self, listener: Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        idle = self.tcp_idle_timeout
        c = self.counters
        while True:  # bounded by the idle timeout and the client closing
            async with asyncio.timeout(idle):
                head = await reader.readexactly(2)
                query = await reader.readexactly(int.from_bytes(head, "big"))
            c["queries"] += 1
            c["tcp"] += 1
            reply = self.resolver.answer(query, listener.networks, tcp=True)
            if isinstance(reply, Forward):
                reply = await self._forward_tcp(query)
            elif isinstance(reply, Drop):
                c["dropped"] += 1
                continue
            else:
                c["answered"] += 1
            if not reply:
                continue
            writer.write(len(reply).to_bytes(2, "big") + reply)
            async with asyncio.timeout(idle):
                await writer.drain()

    async def _forward_tcp(self, query: bytes) -> bytes:
        """The upstream's (UDP) reply to ``query``, or SERVFAIL; b"" if it is no query."""
        loop = self._loop
        assert loop is not None
        fut: asyncio.Future[bytes] = loop.create_future()
        self._forward(query, fut)
        # The pool answers every submitted query within its timeout (SERVFAIL at worst).
        return await fut


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
