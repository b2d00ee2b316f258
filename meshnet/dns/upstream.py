"""Bookkeeping for forwarding queries to upstream resolvers, as a pure core (``now`` passed in).

The agent's DNS shell calls :meth:`UpstreamPool.submit` for each :class:`~meshnet.dns.Forward`
decision, with the *owner* (the listener, i.e. the sandbox, it came from) and whether it came over
TCP. It sends every :class:`SendUpstream` it gets back over that transport from a fresh socket of
that query's attempt (``qid``, ``attempt``), feeds what comes back on that socket to
:meth:`UpstreamPool.receive` with the same ``qid`` and ``attempt``, and arms one timer at
:meth:`UpstreamPool.get_timer` that calls :meth:`UpstreamPool.handle_timer`. Whatever comes back
as :class:`ReplyClient` goes to that client; one with a ``qid`` also ends that query, so the shell
closes its socket.

- Upstreams are tried in resolv.conf order, at most ``max_upstreams`` of them (glibc's MAXNS,
  Docker's embedded DNS). Each attempt gets ``timeout / len(upstreams)``, so the client has an
  answer (SERVFAIL if no upstream gave one) within ``timeout``. A SERVFAIL or REFUSED answer
  moves on to the next upstream too; the last upstream's answer is passed on whatever it says.
- Every forwarded query gets a fresh ID from a cryptographic generator (``secrets``), unique
  among those in flight, so that clients using the same ID cannot collide and an off-path
  spoofer must guess it (together with the source port, which the shell picks afresh for every
  query). The client's ID and its question (with its own 0x20 letter case) are put back into
  the reply.
- A reply is accepted only if it is a response, carries that query's ID (the ``qid`` of the
  socket it came on), comes from the upstream that attempt was sent to (without ``attempt``: any
  the query was sent to so far), and asks the same question: one question, the same name (ASCII
  case-insensitively), type and class; or no question at all in an error reply with no records
  (what an upstream that cannot parse the query sends). Every other message is dropped and
  counted by reason (``bad_reply``, ``bad_id``, ``bad_source``, ``bad_question``; ``unmatched``
  is their sum).
- At most ``max_in_flight`` queries wait at once, and at most ``max_in_flight_per_owner`` of one
  owner; beyond an owner's cap its query gets SERVFAIL at once (``owner_overflow``). When all
  are taken, a query of an owner holding at least two fewer than the busiest owner takes that
  owner's oldest slot (which gets SERVFAIL, ``evicted``); otherwise it gets SERVFAIL at once
  (``overflow``); see :class:`~meshnet.dns.limits.FairSlots`. So a flood can neither grow memory
  nor starve a quiet sandbox.
"""

from __future__ import annotations

import contextlib
import heapq
import ipaddress
import random
import secrets
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from meshnet.dns.limits import FairSlots, Refuse
from meshnet.dns.wire import (
    FLAG_QR,
    HEADER_BYTES,
    RCODE_FORMERR,
    RCODE_NOTIMP,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    DnsFormatError,
    error_reply,
    reply_question,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_IN_FLIGHT",
    "MAX_IN_FLIGHT_PER_OWNER",
    "MAX_UPSTREAMS",
    "Addr",
    "ReplyClient",
    "SendUpstream",
    "UpstreamPool",
]

Addr = tuple[str, int]
C = TypeVar("C")

# glibc reads at most 3 nameservers from resolv.conf (MAXNS), and so does Docker's embedded DNS.
MAX_UPSTREAMS = 3

# Docker's embedded DNS allows 1,024 concurrent forwarded queries; beyond that, SERVFAIL at once.
# Also keeps random 16-bit IDs cheap to find: at most 1/64 of the space is ever in use. Each one
# holds a socket of its own in the shell, which may lower this to fit its descriptor budget.
MAX_IN_FLIGHT = 1024

# One owner (sandbox) may hold a quarter of the slots: far above what a sandbox needs (glibc asks
# A and AAAA, two per lookup; 256 in flight is 12,800 queries/s at a 20 ms upstream, or 64/s
# sustained against an upstream that never answers), and low enough that one flooding sandbox
# leaves three quarters of the slots to the others before fair eviction even starts.
MAX_IN_FLIGHT_PER_OWNER = MAX_IN_FLIGHT // 4

# Total time a forwarded query may take before the client gets SERVFAIL: Docker's 4 s, under
# glibc's 5 s per-try timeout, so the client sees our answer rather than its own timeout.
DEFAULT_TIMEOUT = 4.0

# Most IDs one query may draw before falling back to a scan; with <= 1/64 of IDs in use, 16
# random draws all failing has probability 2^-96.
_ID_DRAWS = 16

# Error replies an upstream may send without echoing the question (it could not parse it).
_QUESTIONLESS_RCODES = frozenset({RCODE_FORMERR, RCODE_SERVFAIL, RCODE_NOTIMP, RCODE_REFUSED})
_NO_SECTIONS = bytes(6)  # QDCOUNT, ANCOUNT, NSCOUNT all zero


@dataclass(frozen=True, slots=True)
class SendUpstream:
    """Send ``data`` to the upstream resolver at ``addr``, for query ``qid``'s ``attempt``.

    ``tcp``: over TCP (the client asked over TCP), else UDP; either way from a socket of this
    query's own, whose replies go to :meth:`UpstreamPool.receive` with ``qid``.
    """

    addr: Addr
    data: bytes
    qid: int = 0
    attempt: int = 0
    tcp: bool = False


@dataclass(frozen=True, slots=True)
class ReplyClient(Generic[C]):
    """Send ``data`` (a complete DNS reply with the client's own ID) to ``client``.

    ``qid`` is the upstream query this ends (close its sockets), None if none was sent.
    """

    client: C
    data: bytes
    qid: int | None = None


Action = SendUpstream | ReplyClient[C]


class _Pending(Generic[C]):
    __slots__ = (
        "attempt",
        "client",
        "deadline",
        "owner",
        "qend",
        "query",
        "question",
        "route",
        "servfail",
        "tcp",
    )

    def __init__(
        self,
        client: C,
        owner: Hashable,
        query: bytes,
        question: bytes,
        route: tuple[Addr, ...],
        servfail: bytes,
        deadline: float,
        tcp: bool,
    ) -> None:
        self.client = client
        self.owner = owner
        self.query = query  # with our ID
        self.question = question  # folded, as reply_question gives it
        self.qend = HEADER_BYTES + len(question)
        self.route = route
        self.servfail = servfail  # with the client's ID
        self.attempt = 0
        self.deadline = deadline
        self.tcp = tcp


def _normal_addr(addr: Sequence[object]) -> Addr:
    """``(ip, port)`` with the IP spelled the way the kernel reports a datagram's source."""
    host = str(addr[0])
    with contextlib.suppress(ValueError):
        host = str(ipaddress.ip_address(host))
    return (host, int(str(addr[1])))


class UpstreamPool(Generic[C]):
    """In-flight forwarded queries: ID rewriting, reply checks, failover, timeouts, the caps."""

    def __init__(
        self,
        upstreams: Sequence[Addr],
        *,
        max_upstreams: int = MAX_UPSTREAMS,
        max_in_flight: int = MAX_IN_FLIGHT,
        max_in_flight_per_owner: int = MAX_IN_FLIGHT_PER_OWNER,
        timeout: float = DEFAULT_TIMEOUT,
        rng: random.Random | None = None,
    ) -> None:
        if not 1 <= max_in_flight <= 1 << 15:
            raise ValueError("max_in_flight must be in 1..32768")
        if max_in_flight_per_owner < 1:
            raise ValueError("max_in_flight_per_owner must be at least 1")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_upstreams < 1:
            raise ValueError("max_upstreams must be at least 1")
        self.max_upstreams = max_upstreams
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        # IDs must be unguessable: the OS's CSPRNG, unless a test injects a seeded generator.
        self._rng: random.Random = rng if rng is not None else secrets.SystemRandom()
        self._upstreams: tuple[Addr, ...] = ()
        self.set_upstreams(upstreams)
        self._pending: dict[int, _Pending[C]] = {}
        self._slots: FairSlots[Hashable, int] = FairSlots(max_in_flight, max_in_flight_per_owner)
        self._heap: list[tuple[float, int]] = []  # (deadline, our id); stale ones are skipped
        self.counters: dict[str, int] = {
            "forwarded": 0,
            "forwarded_tcp": 0,
            "answered": 0,
            "timeouts": 0,
            "overflow": 0,
            "owner_overflow": 0,
            "evicted": 0,
            "cancelled": 0,
            "no_upstream": 0,
            "not_query": 0,
            "bad_query": 0,
            "retries": 0,
            "unmatched": 0,
            "bad_reply": 0,
            "bad_id": 0,
            "bad_source": 0,
            "bad_question": 0,
        }

    @property
    def upstreams(self) -> tuple[Addr, ...]:
        return self._upstreams

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def max_in_flight_per_owner(self) -> int:
        return self._slots.per_owner

    def owner_in_flight(self, owner: Hashable) -> int:
        return self._slots.count(owner)

    def is_pending(self, qid: int) -> bool:
        return qid in self._pending

    def set_upstreams(self, upstreams: Sequence[Addr]) -> None:
        """Use these upstreams (in order, the first ``max_upstreams``) for new queries."""
        self._upstreams = tuple(_normal_addr(a) for a in upstreams[: self.max_upstreams])

    def submit(
        self, query: bytes, client: C, now: float, *, owner: Hashable = None, tcp: bool = False
    ) -> list[Action[C]]:
        """Forward ``query`` for ``client`` of ``owner``; [] if it is not a query at all (drop).

        Gives the first :class:`SendUpstream`, or a SERVFAIL :class:`ReplyClient` at once; and
        before it, when a slot had to be taken from a busier owner, that query's SERVFAIL.
        """
        servfail = error_reply(query, RCODE_SERVFAIL)
        if servfail is None:
            self.counters["not_query"] += 1
            return []
        if not self._upstreams:
            self.counters["no_upstream"] += 1
            return [ReplyClient(client, servfail)]
        try:
            question = reply_question(query)
        except DnsFormatError:  # no reply could be matched to it: do not send it
            self.counters["bad_query"] += 1
            return [ReplyClient(client, servfail)]
        qid = self._new_id()
        got = self._slots.acquire(owner, qid)
        if isinstance(got, Refuse):
            self.counters["overflow" if got.reason == "total" else "owner_overflow"] += 1
            return [ReplyClient(client, servfail)]
        out: list[Action[C]] = []
        if got.evicted is not None:
            victim = got.evicted[1]
            v = self._pending.pop(victim)
            self.counters["evicted"] += 1
            out.append(ReplyClient(v.client, v.servfail, victim))
        rewritten = qid.to_bytes(2, "big") + query[2:]
        route = self._upstreams
        deadline = now + self.timeout / len(route)
        self._pending[qid] = _Pending(
            client, owner, rewritten, question, route, servfail, deadline, tcp
        )
        heapq.heappush(self._heap, (deadline, qid))
        self._compact()
        self.counters["forwarded"] += 1
        if tcp:
            self.counters["forwarded_tcp"] += 1
        out.append(SendUpstream(route[0], rewritten, qid, 0, tcp))
        return out

    def receive(
        self,
        data: bytes,
        addr: Sequence[object],
        now: float,
        *,
        qid: int | None = None,
        attempt: int | None = None,
    ) -> Action[C] | None:
        """A message from upstream ``addr`` on the socket of query ``qid``'s ``attempt``.

        Without ``qid``, the message may be for any query in flight; without ``attempt``, from
        any upstream that query was sent to so far. Gives the reply for its client, a retry, or
        None: no reply to that query (dropped and counted).
        """
        if len(data) < HEADER_BYTES or not data[2] & (FLAG_QR >> 8):
            self._mismatch("bad_reply")
            return None
        rid = (data[0] << 8) | data[1]
        if qid is not None and rid != qid:
            self._mismatch("bad_id")
            return None
        p = self._pending.get(rid)
        if p is None:
            self._mismatch("bad_id")
            return None
        source = _normal_addr(addr)
        if attempt is None:
            ok = source in p.route[: p.attempt + 1]
        else:  # a socket of an earlier attempt is closed when the next one starts
            ok = attempt == p.attempt and source == p.route[attempt]
        if not ok:
            self._mismatch("bad_source")
            return None
        rcode = data[3] & 0x0F
        try:
            matched = reply_question(data) == p.question
            echoed = True
        except DnsFormatError:
            matched = data[4:10] == _NO_SECTIONS and rcode in _QUESTIONLESS_RCODES
            echoed = False
        if not matched:
            self._mismatch("bad_question")
            return None
        if rcode in (RCODE_SERVFAIL, RCODE_REFUSED) and p.attempt + 1 < len(p.route):
            return self._retry(rid, p, now)
        self._finish(rid, p)
        self.counters["answered"] += 1
        # The client's ID, and its question as it spelled it (same length: equal but for case).
        if echoed:
            return ReplyClient(
                p.client, p.servfail[:2] + data[2:HEADER_BYTES] + p.query[HEADER_BYTES : p.qend]
                + data[p.qend :], rid
            )
        return ReplyClient(p.client, p.servfail[:2] + data[2:], rid)

    def handle_timer(self, now: float) -> list[Action[C]]:
        """Retry or fail every query whose attempt has timed out by ``now``."""
        out: list[Action[C]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, qid = heapq.heappop(heap)
            p = self._pending.get(qid)
            if p is None or p.deadline != deadline:
                continue  # answered, or retried with a later deadline
            if p.attempt + 1 < len(p.route):
                out.append(self._retry(qid, p, now))
            else:
                self._finish(qid, p)
                self.counters["timeouts"] += 1
                out.append(ReplyClient(p.client, p.servfail, qid))
        return out

    def get_timer(self) -> float | None:
        """The earliest attempt deadline, or None when nothing is in flight."""
        heap = self._heap
        while heap:
            deadline, qid = heap[0]
            p = self._pending.get(qid)
            if p is not None and p.deadline == deadline:
                return deadline
            heapq.heappop(heap)
        return None

    def cancel(self, qid: int) -> bool:
        """Forget query ``qid`` without a reply (its client is gone); False if not in flight."""
        p = self._pending.get(qid)
        if p is None:
            return False
        self._finish(qid, p)
        self.counters["cancelled"] += 1
        return True

    def cancel_owner(self, owner: Hashable) -> list[int]:
        """Forget every query of ``owner`` (its listener is gone); their ids."""
        qids = self._slots.items(owner)
        for qid in qids:
            self.cancel(qid)
        return qids

    def _finish(self, qid: int, p: _Pending[C]) -> None:
        del self._pending[qid]
        self._slots.release(p.owner, qid)

    def _mismatch(self, reason: str) -> None:
        self.counters[reason] += 1
        self.counters["unmatched"] += 1

    def _retry(self, qid: int, p: _Pending[C], now: float) -> SendUpstream:
        p.attempt += 1
        p.deadline = now + self.timeout / len(p.route)
        heapq.heappush(self._heap, (p.deadline, qid))
        self.counters["retries"] += 1
        return SendUpstream(p.route[p.attempt], p.query, qid, p.attempt, p.tcp)

    def _new_id(self) -> int:
        pending = self._pending
        for _ in range(_ID_DRAWS):
            qid = self._rng.getrandbits(16)
            if qid not in pending:
                return qid
        start = self._rng.getrandbits(16)  # pragma: no cover - astronomically unlikely
        for i in range(1 << 16):  # pragma: no cover
            qid = (start + i) & 0xFFFF
            if qid not in pending:
                return qid
        raise AssertionError("no free DNS id")  # pragma: no cover - max_in_flight <= 32768

    def _compact(self) -> None:
        """Drop stale heap entries once they outnumber live ones, to bound the heap."""
        if len(self._heap) > 2 * self.max_in_flight + 64:
            self._heap = [(p.deadline, qid) for qid, p in self._pending.items()]
            heapq.heapify(self._heap)
