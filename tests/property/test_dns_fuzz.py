"""Fuzz the DNS resolver: any input gives bytes, Forward or Drop; replies are well-formed."""

from __future__ import annotations

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet.dns import Drop, Forward, Resolver, TaskRecord

RECORDS = [
    *(TaskRecord("web", i, f"web.{i}", "front", f"10.0.0.{i}") for i in range(1, 41)),
    TaskRecord("web", 1, "web.1", "back", "10.1.0.11"),
    TaskRecord("db", 1, "db.1", "back", "10.1.0.1"),
    TaskRecord("", None, "sandbox1", "front", "10.0.0.99"),
]
RESOLVER = Resolver()
RESOLVER.set_records(RECORDS, 1)


def answer(
    resolver: Resolver, data: bytes, scope: frozenset[str] | None, tcp: bool = False
) -> bytes | Forward | Drop:
    """``resolver.answer``, which must not have needed its last-resort exception handler: it
    turns a bug into SERVFAIL and a count, which would otherwise pass every check here."""
    out = resolver.answer(data, scope, tcp=tcp)
    assert resolver.counters["internal_errors"] == 0, f"internal error on {data!r}"
    return out

SCOPES = st.sampled_from(
    [None, frozenset(), frozenset({"front"}), frozenset({"back"}), frozenset({"front", "back"})]
)
KNOWN = [
    "web",
    "web.front",
    "web.back",
    "tasks.web",
    "tasks.web.front",
    "web.1",
    "web.7",
    "web.99",
    "db",
    "db.1.back",
    "sandbox1",
    "web.meshnet.",
    "nosuch",
    "nosuch.meshnet.",
    "x.front",
    "example.com",
    "web.example.com",
    "1.0.0.10.in-addr.arpa",
    "11.0.1.10.in-addr.arpa",
    "1.2.3.4.in-addr.arpa",
    ".",
]
LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
NAMES = st.one_of(
    st.sampled_from(KNOWN),
    st.lists(LABEL, min_size=1, max_size=4).map(".".join),
    st.tuples(st.sampled_from(KNOWN[:11]), LABEL).map(lambda t: f"{t[0]}.{t[1]}"),
)
QTYPES = st.one_of(st.sampled_from([1, 12, 28, 33, 255, 16, 65, 252]), st.integers(1, 65535))


def random_case(name: str, data: st.DataObject) -> str:
    flips = data.draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if f else c for c, f in zip(name, flips, strict=True))


@st.composite
def queries(draw: st.DrawFn) -> tuple[bytes, dns.message.QueryMessage, int | None]:
    name = random_case(draw(NAMES), draw(st.data()))
    qtype = dns.rdatatype.RdataType.make(draw(QTYPES))
    edns = draw(st.one_of(st.none(), st.integers(0, 65535)))
    if edns is None:
        q = dns.message.make_query(name, qtype, use_edns=False)
    else:
        options: list[dns.edns.Option] = draw(
            st.lists(
                st.builds(
                    dns.edns.GenericOption, st.sampled_from([10, 8, 65001]), st.binary(max_size=16)
                ),
                max_size=2,
            )
        )
        q = dns.message.make_query(
            name, qtype, use_edns=0, payload=edns, want_dnssec=draw(st.booleans()), options=options
        )
    q.id = draw(st.integers(0, 0xFFFF))
    q.flags = dns.flags.Flag(draw(st.sampled_from([0, 0x0100, 0x0110, 0x0120, 0x0130])))
    return q.to_wire(), q, edns


def check_reply(query: bytes, out: bytes) -> dns.message.Message:
    reply = dns.message.from_wire(out)
    assert reply.id == int.from_bytes(query[:2], "big")
    assert reply.flags & dns.flags.QR
    return reply


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), SCOPES, st.booleans())
def test_random_bytes_never_raise(data: bytes, scope: frozenset[str] | None, tcp: bool) -> None:
    out = answer(RESOLVER, data, scope, tcp=tcp)
    assert isinstance(out, bytes | Forward | Drop)
    if len(data) < 12:
        assert isinstance(out, Drop)
    if isinstance(out, bytes):
        check_reply(data, out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queries(), SCOPES, st.booleans(), st.data())
def test_mutated_valid_queries_never_raise(
    q: tuple[bytes, dns.message.QueryMessage, int | None],
    scope: frozenset[str] | None,
    tcp: bool,
    data: st.DataObject,
) -> None:
    wire = bytearray(q[0])
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(wire) - 1), st.integers(1, 255)), max_size=4)
    )
    for i, x in flips:
        wire[i] ^= x
    cut = data.draw(st.integers(0, len(wire)))
    mutated = bytes(wire[:cut]) + data.draw(st.binary(max_size=8))
    for _ in range(2):  # the second time may come from the cache
        out = answer(RESOLVER, mutated, scope, tcp=tcp)
        assert isinstance(out, bytes | Forward | Drop)
        if isinstance(out, bytes):
            check_reply(mutated, out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(queries(), SCOPES, st.booleans())
def test_valid_queries_get_well_formed_consistent_replies(
    q: tuple[bytes, dns.message.QueryMessage, int | None],
    scope: frozenset[str] | None,
    tcp: bool,
) -> None:
    wire, query, edns = q
    results = [answer(RESOLVER, wire, scope, tcp=tcp) for _ in range(3)]  # miss, then hits
    first = results[0]
    if isinstance(first, Forward):
        assert all(r == first for r in results)
        assert first.qid == query.id and first.qtype == query.question[0].rdtype
        assert dns.name.from_text(first.qname) == query.question[0].name
        return
    seen = []
    for out in results:
        assert isinstance(out, bytes)
        reply = check_reply(wire, out)
        assert reply.question == query.question
        assert (reply.edns >= 0) == (edns is not None)
        if edns is not None and reply.edns >= 0:
            assert bool(reply.ednsflags & dns.flags.DO) == bool(query.ednsflags & dns.flags.DO)
        if not tcp:
            limit = 512 if edns is None else max(512, min(edns, 1232))
            assert len(out) <= limit
        addrs = sorted(rd.address for rrset in reply.answer for rd in rrset if rrset.rdtype == 1)
        seen.append((reply.rcode(), addrs))
        if reply.rcode() == dns.rcode.NOERROR and query.question[0].rdtype in (1, 255):
            name = query.question[0].name.to_text()
            expected = RESOLVER.answer_name(name, "A", scope)
            assert set(addrs) <= set(expected)
            if not reply.flags & dns.flags.TC:
                assert sorted(addrs) == sorted(expected)
    rcodes = {s[0] for s in seen}
    assert len(rcodes) == 1
    if not any(dns.message.from_wire(r).flags & dns.flags.TC for r in results):  # type: ignore[arg-type]
        assert all(s == seen[0] for s in seen)


POOL = [
    TaskRecord(svc, slot, f"{svc}.{slot}", net, f"10.{n}.{k}.{slot}")
    for n, net in enumerate(["front", "back"])
    for k, svc in enumerate(["web", "db", "api"])
    for slot in range(1, 5)
]
CACHE_NAMES = ["web", "db", "api", "tasks.web", "web.front", "db.back", "api.2", "web.1.back"]


def summary(out: object) -> object:
    if isinstance(out, Forward):
        return out
    assert isinstance(out, bytes)
    reply = dns.message.from_wire(out)
    addrs = sorted(rd.address for rrset in reply.answer for rd in rrset if rrset.rdtype == 1)
    return reply.rcode(), addrs, bool(reply.flags & dns.flags.TC)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sets(st.sampled_from(POOL)),
            st.lists(st.tuples(st.sampled_from(CACHE_NAMES), SCOPES), min_size=1, max_size=6),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_cached_answers_are_never_older_than_the_records(
    steps: list[tuple[set[TaskRecord], list[tuple[str, frozenset[str] | None]]]],
) -> None:
    cached = Resolver()
    for version, (records, asks) in enumerate(steps):
        cached.set_records(records, version)
        fresh = Resolver()
        fresh.set_records(records, version)
        for name, scope in asks:
            wire = dns.message.make_query(name, "A").to_wire()
            for _ in range(2):
                got = summary(answer(cached, wire, scope))
                assert got == summary(answer(fresh, wire, scope))


def test_the_internal_error_check_bites() -> None:
    """A bug caught by the resolver's last resort still fails the fuzz tests above."""
    broken = Resolver()
    broken.set_records(RECORDS, 1)

    def boom(*_: object) -> object:
        raise KeyError("bug")

    broken._miss = boom  # type: ignore[method-assign,assignment]
    wire = dns.message.make_query("web", "A").to_wire()
    with pytest.raises(AssertionError, match="internal error"):
        answer(broken, wire, None)
