"""Bookkeeping for forwarding queries to upstream resolvers, as a pure core (``now`` passed in).

The agent's DNS shell calls :meth:`UpstreamPool.submit` for each :class:`~meshnet.dns.Forward`
decision, sends the returned :class:`SendUpstream` from its upstream socket, feeds every datagram
that socket receives to :meth:`UpstreamPool.receive`, and arms one timer at
:meth:`UpstreamPool.get_timer` that calls :meth:`UpstreamPool.handle_timer`. Whatever comes back
as :class:`ReplyClient` goes to that client.

- Upstreams are tried in resolv.conf order, at most ``max_upstreams`` of them (glibc's MAXNS,
  Docker's embedded DNS). Each attempt gets ``timeout / len(upstreams)``, so the client has an
  answer (SERVFAIL if no upstream gave one) within ``timeout``. A SERVFAIL or REFUSED answer
  moves on to the next upstream too; the last upstream's answer is passed on whatever it says.
- Every forwarded query gets a fresh random ID, unique among those in flight, so that clients
  using the same ID cannot collide and an off-path spoofer must guess it. The client's ID is put
  back into the reply. A reply is accepted only from an upstream the query was sent to, with the
  ID in flight and the same question (case-insensitively).
- At most ``max_in_flight`` queries wait at once; beyond that a query gets SERVFAIL at once, so
  a flood cannot grow memory.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from meshnet.dns.wire import (
    FLAG_QR,
    HEADER_BYTES,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    DnsFormatError,
    NeedsFullParse,
    error_reply,
    question_end,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_IN_FLIGHT",
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
# Also keeps random 16-bit IDs cheap to find: at most 1/64 of the space is ever in use.
MAX_IN_FLIGHT = 1024

# Total time a forwarded query may take before the client gets SERVFAIL: Docker's 4 s, under
# glibc's 5 s per-try timeout, so the client sees our answer rather than its own timeout.
DEFAULT_TIMEOUT = 4.0

# Most IDs one query may draw before falling back to a scan; with <= 1/64 of IDs in use, 16
# random draws all failing has probability 2^-96.
_ID_DRAWS = 16


@dataclass(frozen=True, slots=True)
class SendUpstream:
    """Send ``data`` to the upstream resolver at ``addr``."""

    addr: Addr
    data: bytes


@dataclass(frozen=True, slots=True)
class ReplyClient(Generic[C]):
    """Send ``data`` (a complete DNS reply with the client's own ID) to ``client``."""

    client: C
    data: bytes


class _Pending(Generic[C]):
    __slots__ = ("attempt", "client", "deadline", "query", "question", "route", "servfail")

    def __init__(
        self,
        client: C,
        query: bytes,
        question: bytes | None,
        route: tuple[Addr, ...],
        servfail: bytes,
        deadline: float,
    ) -> None:
        self.client = client
        self.query = query  # with our ID
        self.question = question  # lower-cased question section, if it could be found
        self.route = route
        self.servfail = servfail  # with the client's ID
        self.attempt = 0
        self.deadline = deadline


class UpstreamPool(Generic[C]):
    """In-flight forwarded queries: ID rewriting, upstream failover, timeouts, a bound."""

    def __init__(
        self,
        upstreams: Sequence[Addr],
        *,
        max_upstreams: int = MAX_UPSTREAMS,
        max_in_flight: int = MAX_IN_FLIGHT,
        timeout: float = DEFAULT_TIMEOUT,
        rng: random.Random | None = None,
    ) -> None:
        if not 1 <= max_in_flight <= 1 << 15:
            raise ValueError("max_in_flight must be in 1..32768")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if max_upstreams < 1:
            raise ValueError("max_upstreams must be at least 1")
        self.max_upstreams = max_upstreams
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self._rng = rng if rng is not None else random.Random()
        self._upstreams: tuple[Addr, ...] = ()
        self.set_upstreams(upstreams)
        self._pending: dict[int, _Pending[C]] = {}
        self._heap: list[tuple[float, int]] = []  # (deadline, our id); stale ones are skipped
        self.counters: dict[str, int] = {
            "forwarded": 0,
            "answered": 0,
            "timeouts": 0,
            "overflow": 0,
            "no_upstream": 0,
            "retries": 0,
            "unmatched": 0,
        }

    @property
    def upstreams(self) -> tuple[Addr, ...]:
        return self._upstreams

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def set_upstreams(self, upstreams: Sequence[Addr]) -> None:
        """Use these upstreams (in order, the first ``max_upstreams``) for new queries."""
        self._upstreams = tuple((str(a[0]), int(a[1])) for a in upstreams[: self.max_upstreams])

    def submit(self, query: bytes, client: C, now: float) -> SendUpstream | ReplyClient[C] | None:
        """Forward ``query`` for ``client``; None if it is not a query at all (drop it)."""
        servfail = error_reply(query, RCODE_SERVFAIL)
        if servfail is None:
            return None
        if not self._upstreams:
            self.counters["no_upstream"] += 1
            return ReplyClient(client, servfail)
        if len(self._pending) >= self.max_in_flight:
            self.counters["overflow"] += 1
            return ReplyClient(client, servfail)
        try:
            question: bytes | None = query[HEADER_BYTES : question_end(query)].lower()
        except (DnsFormatError, NeedsFullParse):
            question = None
        qid = self._new_id()
        rewritten = qid.to_bytes(2, "big") + query[2:]
        route = self._upstreams
        deadline = now + self.timeout / len(route)
        self._pending[qid] = _Pending(client, rewritten, question, route, servfail, deadline)
        heapq.heappush(self._heap, (deadline, qid))
        self._compact()
        self.counters["forwarded"] += 1
        return SendUpstream(route[0], rewritten)

    def receive(self, data: bytes, addr: Addr, now: float) -> SendUpstream | ReplyClient[C] | None:
        """A datagram from an upstream: the reply for its client, a retry, or None (ignore)."""
        if len(data) < HEADER_BYTES or not data[2] & (FLAG_QR >> 8):
            self.counters["unmatched"] += 1
            return None
        qid = int.from_bytes(data[:2], "big")
        p = self._pending.get(qid)
        source = (str(addr[0]), int(addr[1]))
        if p is None or source not in p.route[: p.attempt + 1]:
            self.counters["unmatched"] += 1
            return None
        if p.question is not None and (
            data[HEADER_BYTES : HEADER_BYTES + len(p.question)].lower() != p.question
        ):
            self.counters["unmatched"] += 1
            return None
        rcode = data[3] & 0x0F
        if rcode in (RCODE_SERVFAIL, RCODE_REFUSED) and p.attempt + 1 < len(p.route):
            return self._retry(qid, p, now)
        del self._pending[qid]
        self.counters["answered"] += 1
        return ReplyClient(p.client, p.servfail[:2] + data[2:])

    def handle_timer(self, now: float) -> list[SendUpstream | ReplyClient[C]]:
        """Retry or fail every query whose attempt has timed out by ``now``."""
        out: list[SendUpstream | ReplyClient[C]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            deadline, qid = heapq.heappop(heap)
            p = self._pending.get(qid)
            if p is None or p.deadline != deadline:
                continue  # answered, or retried with a later deadline
            if p.attempt + 1 < len(p.route):
                out.append(self._retry(qid, p, now))
            else:
                del self._pending[qid]
                self.counters["timeouts"] += 1
                out.append(ReplyClient(p.client, p.servfail))
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

    def _retry(self, qid: int, p: _Pending[C], now: float) -> SendUpstream:
        p.attempt += 1
        p.deadline = now + self.timeout / len(p.route)
        heapq.heappush(self._heap, (p.deadline, qid))
        self.counters["retries"] += 1
        return SendUpstream(p.route[p.attempt], p.query)

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
