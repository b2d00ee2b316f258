"""Service-discovery DNS answers, as a pure core (no asyncio, sockets, clocks or global random).

The agent builds :class:`TaskRecord` values from the replicated store and hands them to
:meth:`Resolver.set_records` on every store change; its UDP/TCP listeners hand each query to
:meth:`Resolver.answer` together with the networks the asking sandbox is attached to, and send
back whatever bytes come out, forward the query upstream (:class:`Forward`), or drop it
(:class:`Drop`).

Names (docs/design.md §4), all case-insensitive, each optionally followed by a domain suffix
(``meshnet.`` by default):

- ``<service>``, ``tasks.<service>``: the addresses of the service's running tasks, on every
  network the asker is attached to; ``<service>.<N>`` and ``tasks.<service>.<N>``: the same,
  on network ``N`` only. The order is rotated on every answer.
- A service with a VIP on network ``N`` (:class:`VipRecord`; endpoint mode ``vip``, issue 17)
  answers ``<service>`` and ``<service>.<N>`` on ``N`` with the VIP alone, even with no task
  serving; ``tasks.<service>`` still gives its task addresses. PTR of a VIP: the service.
- ``<task>`` (``<service>.<slot>``, e.g. ``web.1``, or a one-off sandbox's name) and
  ``<task>.<N>``: the addresses of that one task.
- ``<d>.<c>.<b>.<a>.in-addr.arpa`` PTR for a task's address: the task name.
- A known name asked for another type (AAAA, SRV, TXT, ...) gets NOERROR with no answer
  (NODATA). ANY is answered like A (or PTR for a reverse name).

A name the asker cannot see (a task on a network it is not attached to) is answered exactly as a
name that does not exist, so scoping leaks nothing but timing.

The mesh's own namespace
------------------------
A query name is *inside* the namespace, and so answered here and never forwarded, when it is

1. at or under one of ``domain_suffixes`` (``*.meshnet.`` and ``meshnet.`` itself), or
2. a single label (``web``; with ``ndots:0`` in sandboxes such names are never meant for the
   internet, and no public single-label name is worth leaking a query upstream for), or
3. a name that exists in the records on any network (``web.1``, ``tasks.web``, ``web.frontend``,
   a dotted one-off sandbox name), or that fits a mesh pattern: ``tasks.<x>``,
   ``<service>.<digits>`` for a known service, or any name whose last label is a known network
   (``<x>.<N>``), or
4. a reverse name ``<d>.<c>.<b>.<a>.in-addr.arpa`` of a known task address.

Known services and networks are those of any record (not only the asker's), plus the networks
given to :meth:`Resolver.set_records`, so the rule does not depend on who asks. A consequence:
a network or service named like a public TLD or host (``com``) shadows it inside the mesh; the
agent should refuse such names. Every other name is :class:`Forward`-ed to the upstream
resolvers. An unknown name inside the namespace gets an authoritative NXDOMAIN (RFC 8020: nothing
exists below it either). Negative answers carry no SOA, so resolvers do not cache them.

Cache
-----
Answers are cached as encoded bytes without the 2-byte ID, on two levels:

- a *template* per canonical question: (folded qname, qtype, qclass, asker's networks, tcp,
  UDP size class, EDNS present, DO bit, RD/CD bits). It holds the header flags and counts, the
  answer records (for a multi-address answer, the records twice over, so that any rotation is one
  slice), the OPT record, and the rotation counter;
- an *alias* per raw query: the query's bytes after the 2-byte ID (flags, counts, question as
  sent, OPT record) map to (header + question as sent, template). The hot path is one slice, two
  dict lookups and a concatenation, with no parsing at all: an alias is only created from a query
  that passed the full parse, and a hit is byte-identical to it but for the ID, so it is exactly
  as valid. The question is echoed as asked (0x20 case randomisation survives), while case and
  EDNS-option variants share one template and one rotation. Queries longer than
  ``MAX_ALIAS_QUERY_BYTES`` are answered from the template without an alias.

Only names that exist (somewhere, for someone) are cached, so random names cost their sender a
slow-path answer but never cache space; templates plus aliases are capped by
``MAX_CACHE_ENTRIES`` (clear-when-full). :meth:`Resolver.set_records` drops the whole cache
whenever the records change, so no answer is ever older than the records it was given.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import dns.exception
import dns.message
import dns.name

from meshnet.dns.wire import (
    CLASS_ANY,
    CLASS_IN,
    DEFAULT_EDNS_PAYLOAD,
    FLAG_AA,
    FLAG_CD,
    FLAG_QR,
    FLAG_RA,
    FLAG_RD,
    FLAG_TC,
    HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_NAME_BYTES,
    MIN_UDP_PAYLOAD,
    OPCODE_MASK,
    RCODE_BADVERS,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NOTIMP,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_ANY,
    TYPE_PTR,
    TYPE_SRV,
    DnsFormatError,
    NeedsFullParse,
    ParsedQuery,
    a_rr,
    encode_name,
    error_reply,
    opt_rr,
    parse_query,
    ptr_rr,
)

__all__ = [
    "DEFAULT_TTL",
    "MAX_CACHE_ENTRIES",
    "Answer",
    "Drop",
    "Forward",
    "Resolver",
    "TaskRecord",
    "VipRecord",
    "servfail_reply",
]

# DESIGN/issue 4: short, so that a task that moved or died stops being handed out within seconds
# (Docker's 600 s is what makes its stale answers hurt: moby#42833).
DEFAULT_TTL = 2

# Cap on cached query shapes (aliases) across all scopes. One is a few hundred bytes plus its
# share of a template (a 50-address answer is ~1.6 kB doubled), so the cap bounds the cache to a
# few MB. Only names that exist are cached, so reaching it takes many distinct (name, type,
# flags, EDNS, scope) combinations; then the cache is cleared and refills from the hot names.
MAX_CACHE_ENTRIES = 4096

# Only queries up to this size are remembered byte for byte (a plain query is 17 + name bytes, 28
# more with an OPT and a cookie), so MAX_CACHE_ENTRIES keys stay within 2 MB.
MAX_ALIAS_QUERY_BYTES = 512

# UDP size classes an EDNS client's advertised size is rounded down to, so that clients sharing
# a class share templates (then capped at the resolver's max_udp_payload).
_EDNS_SIZE_CLASSES = (MIN_UDP_PAYLOAD, 1232, 4096)

# Zone transfers and the obsolete mailbox meta-types: refused inside the namespace.
_REFUSED_QTYPES = frozenset({251, 252, 253, 254})

_A_RR_BYTES = 16
_IN_ADDR_ARPA = (b"in-addr", b"arpa")
_QTYPE_NAMES = {"A": TYPE_A, "AAAA": TYPE_AAAA, "PTR": TYPE_PTR, "SRV": TYPE_SRV, "ANY": TYPE_ANY}
_HEAD = struct.Struct("!HHHHH")  # flags and the four counts; the ID is spliced in per query


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One address of a running task (or one-off sandbox) on one network.

    ``slot`` is None for a one-off sandbox; ``service`` may then be empty. ``task`` is the task
    name (``web.1``) or the sandbox's name. ``ip`` is IPv4 text.
    """

    service: str
    slot: int | None
    task: str
    network: str
    ip: str


@dataclass(frozen=True, slots=True)
class VipRecord:
    """A service's virtual IP on one network: ``<service>`` answers it there instead of the
    task addresses (which ``tasks.<service>`` keeps giving)."""

    service: str
    network: str
    ip: str


@dataclass(frozen=True, slots=True)
class Forward:
    """The name is outside the mesh's namespace: send the query to the upstream resolvers.

    ``qname`` is in presentation form with a trailing dot. If no upstream answers, reply with
    :func:`servfail_reply` of the original query.
    """

    qid: int
    qname: str
    qtype: int
    qclass: int


@dataclass(frozen=True, slots=True)
class Drop:
    """Send nothing (unreadable header, or a response rather than a query). Count ``reason``."""

    reason: str


DROP_SHORT = Drop("short")
DROP_RESPONSE = Drop("response")

Answer = bytes | Forward | Drop


def servfail_reply(query: bytes) -> bytes | None:
    """SERVFAIL for ``query`` (echoing its ID and question), or None if it cannot be answered."""
    return error_reply(query, RCODE_SERVFAIL)


def _fold(text: str) -> str:
    """Case-fold a record name the way DNS does: ASCII only, on its UTF-8 bytes.

    Query labels go through ``bytes.lower().decode('latin-1')``, so both sides meet here.
    """
    return text.encode("utf-8", "surrogatepass").lower().decode("latin-1")


@dataclass(frozen=True, slots=True)
class _Rec:
    network: str  # folded
    ip: bytes  # packed IPv4
    task: str  # as given, for PTR targets


class _Index:
    """Lookup tables over the current records; immutable once built."""

    __slots__ = ("by_ip", "by_service", "by_task", "by_tasks", "networks")

    def __init__(self, records: Iterable[TaskRecord], networks: Iterable[str],
                 vips: Iterable[VipRecord] = ()) -> None:
        by_task: dict[str, dict[_Rec, None]] = {}
        by_service: dict[str, dict[_Rec, None]] = {}  # what <service> answers
        by_tasks: dict[str, dict[_Rec, None]] = {}  # what tasks.<service> answers
        by_ip: dict[bytes, dict[_Rec, None]] = {}
        nets = {_fold(n) for n in networks}
        with_vip: set[tuple[str, str]] = set()  # (service, network): <service> is the VIP
        for v in vips:
            rec = _Rec(_fold(v.network), ipaddress.IPv4Address(v.ip).packed, v.service)
            nets.add(rec.network)
            with_vip.add((_fold(v.service), rec.network))
            by_service.setdefault(_fold(v.service), {})[rec] = None
            by_ip.setdefault(rec.ip, {})[rec] = None
        for r in records:
            rec = _Rec(_fold(r.network), ipaddress.IPv4Address(r.ip).packed, r.task)
            nets.add(rec.network)
            by_task.setdefault(_fold(r.task), {})[rec] = None
            if r.service:
                service = _fold(r.service)
                by_tasks.setdefault(service, {})[rec] = None
                if (service, rec.network) not in with_vip:
                    by_service.setdefault(service, {})[rec] = None
                if r.slot is not None:
                    by_task.setdefault(_fold(f"{r.service}.{r.slot}"), {})[rec] = None
            by_ip.setdefault(rec.ip, {})[rec] = None
        self.by_task = {k: tuple(v) for k, v in by_task.items()}
        self.by_service = {k: tuple(v) for k, v in by_service.items()}
        self.by_tasks = {k: tuple(v) for k, v in by_tasks.items()}
        self.by_ip = {k: tuple(v) for k, v in by_ip.items()}
        self.networks = frozenset(nets)


class _Resolution(NamedTuple):
    inside: bool  # in the mesh's namespace (else forward)
    exists: bool  # exists for someone (so the answer may be cached)
    apex: bool  # a domain suffix itself
    a: tuple[_Rec, ...]  # visible to the asker
    ptr: tuple[_Rec, ...]  # visible to the asker


_OUTSIDE = _Resolution(False, False, False, (), ())


class _Outcome(NamedTuple):
    rcode: int
    rrs: tuple[bytes, ...]
    rotate: bool  # rrs are uniform A records: rotate per answer
    aa: bool


class _Template:
    """The cached answer for one canonical question, minus ID and question section."""

    __slots__ = ("head", "off", "rrs", "span", "static", "step_end", "tail")

    def __init__(self, head: bytes, rrs: bytes, span: int, tail: bytes, start: int) -> None:
        self.head = head  # flags + counts (10 bytes)
        self.rrs = rrs  # rotating: all records twice over; static: the records sent
        self.span = span  # bytes of records per answer (rotating only)
        self.tail = tail  # OPT record or b""
        self.step_end = len(rrs) // 2  # rotating: wrap point of the byte offset
        self.off = start  # rotating: byte offset of the next answer's first record
        self.static = span == 0


def _scope(networks: frozenset[str] | None) -> frozenset[str] | None:
    return None if networks is None else frozenset(_fold(n) for n in networks)


def _visible(
    recs: tuple[_Rec, ...], scope: frozenset[str] | None, net: str | None
) -> tuple[_Rec, ...]:
    return tuple(
        r
        for r in recs
        if (net is None or r.network == net) and (scope is None or r.network in scope)
    )


def _reverse_ip(core: tuple[bytes, ...]) -> bytes | None:
    """Packed IPv4 from a folded ``d.c.b.a.in-addr.arpa`` name, or None."""
    if len(core) != 6 or core[4:] != _IN_ADDR_ARPA:
        return None
    out = bytearray()
    for label in reversed(core[:4]):
        if not (1 <= len(label) <= 3 and label.isdigit()):
            return None
        value = int(label)
        if value > 255 or (len(label) > 1 and label[0] == 0x30):  # no leading zeros
            return None
        out.append(value)
    return bytes(out)


def _name_wire(text: str) -> bytes | None:
    """Wire form of a task name for a PTR target, or None if it is not a valid DNS name."""
    labels = tuple(label.encode("utf-8", "surrogatepass") for label in text.split("."))
    if any(not 0 < len(label) <= 63 for label in labels):
        return None
    wire = encode_name(labels)
    return wire if len(wire) <= MAX_NAME_BYTES else None


class Resolver:
    """The answer logic of meshnet's DNS server (see the module docstring)."""

    def __init__(
        self,
        domain_suffixes: Iterable[str] = ("meshnet.",),
        ttl: int = DEFAULT_TTL,
        *,
        max_udp_payload: int = DEFAULT_EDNS_PAYLOAD,
        max_cache_entries: int = MAX_CACHE_ENTRIES,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 <= ttl <= 0x7FFFFFFF:
            raise ValueError("ttl must fit in 31 bits")
        if not MIN_UDP_PAYLOAD <= max_udp_payload <= MAX_MESSAGE_BYTES:
            raise ValueError("max_udp_payload must be in 512..65535")
        self.ttl = ttl
        self.max_udp_payload = max_udp_payload
        self._suffixes = tuple(
            tuple(label.encode().lower() for label in s.strip(".").split("."))
            for s in domain_suffixes
            if s.strip(".")
        )
        self._size_classes = tuple(
            sorted(
                {c for c in _EDNS_SIZE_CLASSES if c <= max_udp_payload} | {max_udp_payload},
                reverse=True,
            )
        )
        self._max_cache = max_cache_entries
        # A private generator for the first rotation offset of each answer (not the global one).
        self._rng = rng if rng is not None else random.Random()
        self.version = -1
        self._records: frozenset[TaskRecord] = frozenset()
        self._vips: frozenset[VipRecord] = frozenset()
        self._index = _Index((), ())
        self._known_networks: frozenset[str] = frozenset()
        # scope -> query bytes after the ID -> (the reply after the ID if the template is static,
        # else the header + question part of it; the template if rotating, else None)
        self._udp: dict[frozenset[str] | None, dict[bytes, tuple[bytes, _Template | None]]]
        self._tcp: dict[frozenset[str] | None, dict[bytes, tuple[bytes, _Template | None]]]
        self._udp, self._tcp = {}, {}
        self._templates: dict[tuple[object, ...], _Template] = {}
        self._cached = 0
        self.counters: dict[str, int] = {
            "misses": 0,
            "forwarded": 0,
            "dropped": 0,
            "formerr": 0,
            "notimp": 0,
            "internal_errors": 0,
            "cache_clears": 0,
            "bad_records": 0,
        }

    # -- records ----------------------------------------------------------------------------

    def set_records(
        self, records: Iterable[TaskRecord], version: int, *, networks: Iterable[str] = (),
        vips: Iterable[VipRecord] = (),
    ) -> None:
        """Replace the view with ``records`` and ``vips`` (from store ``version``) and drop the
        answer cache.

        ``networks`` names extra networks (ones without tasks yet) so that ``<x>.<N>`` on them
        is answered NXDOMAIN rather than forwarded. Records whose IP is not IPv4 text are
        skipped and counted. If nothing changed, the cache is kept.
        """
        good: list[TaskRecord] = []
        for r in records:
            try:
                ipaddress.IPv4Address(r.ip)
            except ValueError:
                self.counters["bad_records"] += 1
                continue
            good.append(r)
        good_vips: list[VipRecord] = []
        for v in vips:
            try:
                ipaddress.IPv4Address(v.ip)
            except ValueError:
                self.counters["bad_records"] += 1
                continue
            good_vips.append(v)
        new = frozenset(good)
        new_vips = frozenset(good_vips)
        nets = frozenset(_fold(n) for n in networks)
        self.version = version
        if new == self._records and nets == self._known_networks and new_vips == self._vips:
            return
        self._records = new
        self._vips = new_vips
        self._known_networks = nets
        self._index = _Index(sorted(new, key=lambda r: (r.network, r.ip, r.task)), nets,
                             sorted(new_vips, key=lambda v: (v.network, v.ip, v.service)))
        self._clear_cache()

    def set_ttl(self, ttl: int) -> None:
        """Answer with TTL from now on (the agent's reload); cached answers carry the old one,
        so the cache goes."""
        if not 0 <= ttl <= 0x7FFFFFFF:
            raise ValueError("ttl must fit in 31 bits")
        if ttl != self.ttl:
            self.ttl = ttl
            self._clear_cache()

    def _make_room(self) -> bool:
        """Clear the cache if it is full; True if it was cleared."""
        if self._cached < self._max_cache:
            return False
        self.counters["cache_clears"] += 1
        self._clear_cache()
        return True

    def _clear_cache(self) -> None:
        self._udp = {}
        self._tcp = {}
        self._templates = {}
        self._cached = 0

    # -- the hot path -----------------------------------------------------------------------

    def answer(self, query: bytes, networks: frozenset[str] | None, tcp: bool = False) -> Answer:
        """Answer one DNS query from a client attached to ``networks`` (None: sees all).

        Returns reply bytes (UDP: at most 512 bytes, or the client's EDNS size capped at
        ``max_udp_payload``, with TC set when records were left out; TCP: up to 65,535), a
        :class:`Forward`, or a :class:`Drop`. Never raises.
        """
        try:
            scoped = (self._tcp if tcp else self._udp).get(networks)
            if scoped is not None:
                hit = scoped.get(query[2:])
                if hit is not None:
                    t = hit[1]
                    if t is None:
                        return query[:2] + hit[0]
                    off = t.off
                    nxt = off + _A_RR_BYTES
                    t.off = 0 if nxt == t.step_end else nxt
                    # One join, not three concatenations (each a copy of the answer so far).
                    return b"".join((query[:2], hit[0], t.rrs[off : off + t.span], t.tail))
            return self._miss(query, networks, tcp)
        except Exception:  # a bug; never let it reach the server loop
            self.counters["internal_errors"] += 1
            try:
                reply = error_reply(query, RCODE_SERVFAIL)
            except Exception:
                reply = None
            return reply if reply is not None else Drop("internal error")

    # -- the slow path ----------------------------------------------------------------------

    def _miss(self, query: bytes, networks: frozenset[str] | None, tcp: bool) -> Answer:
        self.counters["misses"] += 1
        n = len(query)
        if n < HEADER_BYTES:
            self.counters["dropped"] += 1
            return DROP_SHORT
        flags = (query[2] << 8) | query[3]
        if flags & FLAG_QR:
            self.counters["dropped"] += 1
            return DROP_RESPONSE
        if flags & OPCODE_MASK:
            self.counters["notimp"] += 1
            return self._error(query, RCODE_NOTIMP)
        if n > MAX_MESSAGE_BYTES:
            return self._error(query, RCODE_FORMERR)
        aliasable = True
        try:
            p = parse_query(query)
        except DnsFormatError:
            return self._error(query, RCODE_FORMERR)
        except NeedsFullParse:
            full = _full_parse(query)
            if full is None:
                return self._error(query, RCODE_FORMERR)
            p = full
            aliasable = False
        if p.edns and p.edns_version != 0:
            return self._error(query, RCODE_BADVERS)

        scope = _scope(networks)
        res = self._resolve(p.labels, scope)
        if not res.inside:
            self.counters["forwarded"] += 1
            return Forward(p.qid, _qname_text(p.labels), p.qtype, p.qclass)
        outcome = self._outcome(res, p.qtype, p.qclass)

        if tcp:
            limit = MAX_MESSAGE_BYTES
        elif p.edns:
            size = min(max(p.edns_payload, MIN_UDP_PAYLOAD), self.max_udp_payload)
            limit = next(c for c in self._size_classes if c <= size)
        else:
            limit = MIN_UDP_PAYLOAD
        qbits = flags & (FLAG_RD | FLAG_CD)
        key = (
            tuple(label.lower() for label in p.labels),
            p.qtype,
            p.qclass,
            networks,
            tcp,
            limit,
            p.edns,
            p.edns_do,
            qbits,
        )
        t = self._templates.get(key) if res.exists else None
        if t is None:
            t = self._build(outcome, len(p.question), limit, p.edns, p.edns_do, qbits)
            if res.exists:
                self._make_room()
                self._templates[key] = t
                self._cached += 1
        qid = query[:2]
        if t.static:
            body = t.head + p.question + t.rrs + t.tail
            reply = qid + body
        else:
            body = t.head + p.question
            off = t.off
            nxt = off + _A_RR_BYTES
            t.off = 0 if nxt == t.step_end else nxt
            reply = b"".join((qid, body, t.rrs[off : off + t.span], t.tail))
        # Alias this exact query (minus its ID) to the template: a later query that is
        # byte-identical after the ID is exactly as valid as this one, so the hot path needs no
        # parsing at all.
        if res.exists and aliasable and n <= MAX_ALIAS_QUERY_BYTES:
            if self._make_room():
                self._templates[key] = t
                self._cached += 1
            by_scope = self._tcp if tcp else self._udp
            by_scope.setdefault(networks, {})[query[2:]] = (body, None if t.static else t)
            self._cached += 1
        return reply

    def _error(self, query: bytes, rcode: int) -> Answer:
        if rcode == RCODE_FORMERR:
            self.counters["formerr"] += 1
        reply = error_reply(query, rcode, self.max_udp_payload)
        if reply is None:
            self.counters["dropped"] += 1
            return DROP_RESPONSE
        return reply

    def _build(
        self, outcome: _Outcome, qlen: int, limit: int, edns: bool, do: bool, qbits: int
    ) -> _Template:
        tail = opt_rr(self.max_udp_payload, do) if edns else b""
        room = limit - HEADER_BYTES - qlen - len(tail)
        rrs = outcome.rrs
        if outcome.rotate and len(rrs) > 1:
            fit = min(len(rrs), max(0, room // _A_RR_BYTES))
        else:
            fit = 0
            used = 0
            for rr in rrs:
                if used + len(rr) > room:
                    break
                used += len(rr)
                fit += 1
        flags = (
            FLAG_QR
            | FLAG_RA
            | qbits
            | (FLAG_AA if outcome.aa else 0)
            | (FLAG_TC if fit < len(rrs) else 0)
            | outcome.rcode
        )
        head = _HEAD.pack(flags, 1, fit, 0, 1 if edns else 0)
        if outcome.rotate and len(rrs) > 1 and fit > 0:
            once = b"".join(rrs)
            start = self._rng.randrange(len(rrs)) * _A_RR_BYTES
            return _Template(head, once + once, fit * _A_RR_BYTES, tail, start)
        return _Template(head, b"".join(rrs[:fit]), 0, tail, 0)

    # -- names --------------------------------------------------------------------------------

    def _resolve(self, labels: tuple[bytes, ...], scope: frozenset[str] | None) -> _Resolution:
        folded = tuple(label.lower() for label in labels)
        core = folded
        under_suffix = False
        for suffix in self._suffixes:
            k = len(suffix)
            if len(folded) >= k and folded[len(folded) - k :] == suffix:
                core = folded[: len(folded) - k]
                under_suffix = True
                break
        idx = self._index
        if under_suffix and not core:
            return _Resolution(True, True, True, (), ())
        if core[-2:] == _IN_ADDR_ARPA and not under_suffix:
            ip = _reverse_ip(core)
            recs = idx.by_ip.get(ip) if ip is not None else None
            if not recs:
                return _OUTSIDE
            return _Resolution(True, True, False, (), _visible(recs, scope, None))
        if any(b"." in label for label in core):
            # Such a label cannot be spelled as a record name; nothing exists here.
            inside = under_suffix or len(core) == 1
            return _Resolution(inside, False, False, (), ())
        text = [label.decode("latin-1") for label in core]
        name = ".".join(text)
        candidates: list[tuple[tuple[_Rec, ...], str | None]] = []
        self._candidates(name, None, candidates)
        if len(text) >= 2 and text[-1] in idx.networks:
            self._candidates(".".join(text[:-1]), text[-1], candidates)
        exists = False
        visible: tuple[_Rec, ...] = ()
        for recs, net in candidates:
            if net is None or any(r.network == net for r in recs):
                exists = True
            visible = _visible(recs, scope, net)
            if visible:
                break
        inside = (
            exists
            or under_suffix
            or len(text) == 1
            or (len(text) == 2 and text[0] == "tasks")
            or (len(text) == 2 and text[1].isascii() and text[1].isdigit()
                and text[0] in idx.by_service)
            or (len(text) >= 2 and text[-1] in idx.networks)
        )
        return _Resolution(inside, exists, False, visible, ())

    def _candidates(
        self, name: str, net: str | None, out: list[tuple[tuple[_Rec, ...], str | None]]
    ) -> None:
        idx = self._index
        recs = idx.by_service.get(name)
        if recs:
            out.append((recs, net))
        if name.startswith("tasks."):
            recs = idx.by_tasks.get(name[6:])
            if recs:
                out.append((recs, net))
        recs = idx.by_task.get(name)
        if recs:
            out.append((recs, net))

    def _outcome(self, res: _Resolution, qtype: int, qclass: int) -> _Outcome:
        if qclass not in (CLASS_IN, CLASS_ANY) or qtype in _REFUSED_QTYPES:
            return _Outcome(RCODE_REFUSED, (), False, False)
        if not (res.apex or res.a or res.ptr):
            return _Outcome(RCODE_NXDOMAIN, (), False, True)
        if qtype in (TYPE_A, TYPE_ANY) and res.a:
            ips = sorted({r.ip for r in res.a})
            return _Outcome(RCODE_NOERROR, tuple(a_rr(ip, self.ttl) for ip in ips), True, True)
        if qtype in (TYPE_PTR, TYPE_ANY) and res.ptr:
            targets = sorted({r.task for r in res.ptr})
            wires = [w for w in (_name_wire(t) for t in targets) if w is not None]
            return _Outcome(RCODE_NOERROR, tuple(ptr_rr(w, self.ttl) for w in wires), False, True)
        return _Outcome(RCODE_NOERROR, (), False, True)  # NODATA

    # -- meshctl dns lookup -------------------------------------------------------------------

    def answer_name(
        self, name: str, qtype: str | int = "A", networks: frozenset[str] | None = None
    ) -> list[str]:
        """What :meth:`answer` would give for ``name``, as text, for ``meshctl dns lookup``.

        A (and ANY): IPv4 addresses, sorted (not rotated). PTR: task names, without a trailing
        dot; ``name`` may be an IPv4 address or its in-addr.arpa name. Other types, unknown names
        and names outside the namespace: []. Raises ValueError for an unknown type name.
        """
        rdtype = _QTYPE_NAMES.get(qtype.upper()) if isinstance(qtype, str) else qtype
        if rdtype is None:
            raise ValueError(f"unsupported record type {qtype!r}")
        text = name.strip().rstrip(".")
        if rdtype == TYPE_PTR:
            with contextlib.suppress(ValueError):
                text = ipaddress.IPv4Address(text).reverse_pointer
        if not text:
            return []
        labels = tuple(label.encode("utf-8", "surrogatepass") for label in text.split("."))
        if any(not 0 < len(label) <= 63 for label in labels):
            return []
        res = self._resolve(labels, _scope(networks))
        if not res.inside:
            return []
        outcome = self._outcome(res, rdtype, CLASS_IN)
        if outcome.rcode != RCODE_NOERROR or not outcome.rrs:
            return []
        if outcome.rotate:
            return [str(ipaddress.IPv4Address(rr[-4:])) for rr in outcome.rrs]
        return sorted({r.task for r in res.ptr})


def _qname_text(labels: tuple[bytes, ...]) -> str:
    try:
        return dns.name.Name((*labels, b"")).to_text()
    except dns.exception.DNSException:
        return ".".join(label.decode("latin-1") for label in labels) + "."


def _full_parse(query: bytes) -> ParsedQuery | None:
    """Parse an unusual but maybe valid query with dnspython; None if it is malformed."""
    try:
        msg = dns.message.from_wire(query)
        if len(msg.question) != 1:
            return None
        q = msg.question[0]
        labels = tuple(q.name.labels[:-1])
        question = encode_name(labels) + struct.pack("!HH", q.rdtype, q.rdclass)
    except Exception:  # dnspython raises many kinds on garbage
        return None
    return ParsedQuery(
        qid=msg.id,
        flags=msg.flags,
        labels=labels,
        qtype=int(q.rdtype),
        qclass=int(q.rdclass),
        question=question,
        qend=-1,
        edns=msg.edns >= 0,
        edns_payload=msg.payload if msg.edns >= 0 else 0,
        edns_version=max(msg.edns, 0),
        edns_do=bool(msg.ednsflags & 0x8000),
    )
