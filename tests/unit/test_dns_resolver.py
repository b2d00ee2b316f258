"""The DNS answer logic: name forms, rotation, scoping, truncation, errors and the cache."""

from __future__ import annotations

import itertools
import random
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.reversename
import dns.rrset
import pytest

from meshnet.dns import Drop, Forward, Resolver, TaskRecord
from meshnet.dns.wire import MIN_UDP_PAYLOAD

FRONT = frozenset({"front"})
BACK = frozenset({"back"})

RECORDS = [
    *(TaskRecord("web", i, f"web.{i}", "front", f"10.0.0.{i}") for i in range(1, 5)),
    TaskRecord("web", 1, "web.1", "back", "10.1.0.11"),
    TaskRecord("db", 1, "db.1", "back", "10.1.0.1"),
    TaskRecord("db", 2, "db.2", "back", "10.1.0.2"),
    TaskRecord("", None, "sandbox1", "front", "10.0.0.99"),
    TaskRecord("", None, "my.box", "back", "10.1.0.99"),
]
WEB_FRONT = {f"10.0.0.{i}" for i in range(1, 5)}
WEB_ALL = WEB_FRONT | {"10.1.0.11"}


def make_resolver(records: list[TaskRecord] | None = None, **kwargs: object) -> Resolver:
    r = Resolver(rng=random.Random(7), **kwargs)  # type: ignore[arg-type]
    r.set_records(RECORDS if records is None else records, 1)
    return r


def ask(
    r: Resolver,
    name: str,
    rdtype: str = "A",
    networks: frozenset[str] | None = None,
    *,
    tcp: bool = False,
    **query_kwargs: object,
) -> tuple[dns.message.Message, bytes]:
    q = dns.message.make_query(name, rdtype, **query_kwargs)  # type: ignore[arg-type]
    wire = q.to_wire()
    out = r.answer(wire, networks, tcp=tcp)
    assert isinstance(out, bytes), out
    reply = dns.message.from_wire(out)
    assert reply.id == q.id
    assert reply.question == q.question
    return reply, out


def addresses(reply: dns.message.Message) -> list[str]:
    return [rd.address for rrset in reply.answer for rd in rrset if rrset.rdtype == 1]


def a_set(r: Resolver, name: str, networks: frozenset[str] | None = None) -> tuple[str, set[str]]:
    reply, _ = ask(r, name, "A", networks)
    return dns.rcode.to_text(reply.rcode()), set(addresses(reply))


# -- name forms -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "networks", "expected"),
    [
        ("web", None, WEB_ALL),
        ("web", FRONT, WEB_FRONT),
        ("web.front", None, WEB_FRONT),
        ("web.back", None, {"10.1.0.11"}),
        ("tasks.web", None, WEB_ALL),
        ("tasks.web", FRONT, WEB_FRONT),
        ("tasks.web.front", None, WEB_FRONT),
        ("web.1", None, {"10.0.0.1", "10.1.0.11"}),
        ("web.1", BACK, {"10.1.0.11"}),
        ("web.2", None, {"10.0.0.2"}),
        ("web.1.front", None, {"10.0.0.1"}),
        ("db", BACK, {"10.1.0.1", "10.1.0.2"}),
        ("db.2", BACK, {"10.1.0.2"}),
        ("sandbox1", FRONT, {"10.0.0.99"}),
        ("my.box", BACK, {"10.1.0.99"}),
        ("web.meshnet.", FRONT, WEB_FRONT),
        ("web.back.meshnet.", None, {"10.1.0.11"}),
        ("tasks.web.front.meshnet.", None, WEB_FRONT),
        ("web.3.meshnet.", None, {"10.0.0.3"}),
        ("sandbox1.meshnet.", None, {"10.0.0.99"}),
    ],
)
def test_name_forms(name: str, networks: frozenset[str] | None, expected: set[str]) -> None:
    r = make_resolver()
    reply, _ = ask(r, name, "A", networks)
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.flags & dns.flags.AA
    assert set(addresses(reply)) == expected
    assert all(rrset.ttl == 2 for rrset in reply.answer)
    assert sorted(r.answer_name(name, "A", networks)) == sorted(expected)


def test_ptr_for_task_addresses() -> None:
    r = make_resolver()
    for ip, task in [("10.0.0.3", "web.3."), ("10.1.0.11", "web.1."), ("10.0.0.99", "sandbox1.")]:
        reply, _ = ask(r, dns.reversename.from_address(ip).to_text(), "PTR")
        assert reply.rcode() == dns.rcode.NOERROR
        assert [rd.to_text() for rrset in reply.answer for rd in rrset] == [task]
        assert r.answer_name(ip, "PTR") == [task.rstrip(".")]
        assert r.answer_name(f"{dns.reversename.from_address(ip)}", "PTR") == [task.rstrip(".")]


def test_ptr_for_unknown_address_is_forwarded_and_scoped_ptr_is_nxdomain() -> None:
    r = make_resolver()
    q = dns.message.make_query("4.3.2.1.in-addr.arpa.", "PTR")
    out = r.answer(q.to_wire(), None)
    assert isinstance(out, Forward)
    assert out.qtype == dns.rdatatype.PTR
    reply, _ = ask(r, "1.0.1.10.in-addr.arpa.", "PTR", FRONT)  # db.1 lives on back
    assert reply.rcode() == dns.rcode.NXDOMAIN
    reply, _ = ask(r, "1.0.1.10.in-addr.arpa.", "A")  # exists, but has no A record
    assert reply.rcode() == dns.rcode.NOERROR and not reply.answer


def test_any_is_answered_like_a() -> None:
    reply, _ = ask(make_resolver(), "web", "ANY", FRONT)
    assert set(addresses(reply)) == WEB_FRONT


def test_ttl_is_configurable() -> None:
    reply, _ = ask(make_resolver(ttl=7), "web")
    assert {rrset.ttl for rrset in reply.answer} == {7}


def test_custom_domain_suffix() -> None:
    r = Resolver(domain_suffixes=("mesh.internal.",))
    r.set_records(RECORDS, 1)
    assert a_set(r, "web.mesh.internal")[1] == WEB_ALL
    assert a_set(r, "nothing.mesh.internal")[0] == "NXDOMAIN"
    out = r.answer(dns.message.make_query("web.front.meshnet.", "A").to_wire(), None)
    assert isinstance(out, Forward)  # meshnet. is no longer ours, and "meshnet" no network


# -- rotation -------------------------------------------------------------------------------


def test_rotation_changes_the_order_every_answer_and_covers_all() -> None:
    r = make_resolver()
    orders = [addresses(ask(r, "web", "A", FRONT)[0]) for _ in range(8)]
    base = sorted(WEB_FRONT, key=lambda ip: tuple(int(x) for x in ip.split(".")))
    for a, b in itertools.pairwise(orders):
        assert a != b
    for order in orders:
        assert set(order) == WEB_FRONT and len(order) == 4
        i = base.index(order[0])
        assert order == base[i:] + base[:i]  # a rotation of one fixed order
    assert {o[0] for o in orders[:4]} == WEB_FRONT  # every address gets to go first


def test_rotation_is_shared_across_query_ids_and_case_and_truncated_rotates_too() -> None:
    records = [
        TaskRecord("big", i, f"big.{i}", "n", f"10.9.{i // 250}.{i % 250}") for i in range(60)
    ]
    r = make_resolver(records)
    firsts = []
    for i in range(6):
        name = "BIG" if i % 2 else "big"
        reply, out = ask(r, name)
        assert reply.flags & dns.flags.TC and len(out) <= MIN_UDP_PAYLOAD
        firsts.append(addresses(reply)[0])
    assert len(set(firsts)) == 6


def test_seeded_rng_makes_rotation_deterministic() -> None:
    def orders(seed: int) -> list[list[str]]:
        r = Resolver(rng=random.Random(seed))
        r.set_records(RECORDS, 1)
        return [addresses(ask(r, "web")[0]) for _ in range(3)]

    assert orders(1) == orders(1)


# -- negative answers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "networks"),
    [
        ("nosuch", None),  # single label: ours
        ("nosuch.meshnet.", None),
        ("web.9", None),  # known service, unknown slot
        ("nosuch.front", None),  # known network
        ("tasks.nosuch", None),
        ("db", FRONT),  # exists, but on a network the asker is not on
        ("db.back", FRONT),
        ("tasks.db", FRONT),
        ("db.1", FRONT),
        ("web.back", FRONT),
        ("my.box", FRONT),
    ],
)
def test_nxdomain_inside_the_namespace(name: str, networks: frozenset[str] | None) -> None:
    reply, _ = ask(make_resolver(), name, "A", networks)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.flags & dns.flags.AA
    assert not reply.answer
    assert make_resolver().answer_name(name, "A", networks) == []


@pytest.mark.parametrize("rdtype", ["AAAA", "SRV", "TXT", "MX", "HTTPS"])
def test_nodata_for_other_types_of_known_names(rdtype: str) -> None:
    r = make_resolver()
    for name in ("web", "tasks.web", "web.front", "web.1", "meshnet."):
        reply, _ = ask(r, name, rdtype)
        assert reply.rcode() == dns.rcode.NOERROR
        assert not reply.answer
    reply, _ = ask(r, "nosuch", rdtype)
    assert reply.rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize(
    "name", ["example.com.", "www.example.org.", "web.example.com.", "web.1.example.com.", "."]
)
def test_names_outside_the_namespace_are_forwarded(name: str) -> None:
    r = make_resolver()
    q = dns.message.make_query(name, "AAAA")
    out = r.answer(q.to_wire(), FRONT)
    assert out == Forward(q.id, name, dns.rdatatype.AAAA, dns.rdataclass.IN)
    assert r.answer_name(name) == []


def test_other_classes_are_refused_inside_and_forwarded_outside() -> None:
    r = make_resolver()
    q = dns.message.make_query("web", "A", rdclass="CH")
    reply = dns.message.from_wire(r.answer(q.to_wire(), None))  # type: ignore[arg-type]
    assert reply.rcode() == dns.rcode.REFUSED
    q = dns.message.make_query("version.bind", "TXT", rdclass="CH")
    assert isinstance(r.answer(q.to_wire(), None), Forward)


def test_zone_transfer_is_refused() -> None:
    reply, _ = ask(make_resolver(), "meshnet.", "AXFR", tcp=True)
    assert reply.rcode() == dns.rcode.REFUSED


# -- scoping ----------------------------------------------------------------------------------


def test_a_sandbox_on_one_network_cannot_resolve_another_networks_names() -> None:
    r = make_resolver()
    assert a_set(r, "db", FRONT) == ("NXDOMAIN", set())
    assert a_set(r, "db", BACK) == ("NOERROR", {"10.1.0.1", "10.1.0.2"})
    assert a_set(r, "db", None) == ("NOERROR", {"10.1.0.1", "10.1.0.2"})
    assert a_set(r, "db", frozenset({"front", "back"}))[1] == {"10.1.0.1", "10.1.0.2"}
    assert a_set(r, "sandbox1", BACK) == ("NXDOMAIN", set())
    assert a_set(r, "web", frozenset()) == ("NXDOMAIN", set())
    assert a_set(r, "web", frozenset({"FRONT"}))[1] == WEB_FRONT  # network names fold case


def test_scopes_do_not_share_cached_answers() -> None:
    r = make_resolver()
    q = dns.message.make_query("db", "A").to_wire()
    assert isinstance(r.answer(q, None), bytes)
    assert isinstance(r.answer(q, None), bytes)  # now cached for the host scope
    reply = dns.message.from_wire(r.answer(q, FRONT))  # type: ignore[arg-type]
    assert reply.rcode() == dns.rcode.NXDOMAIN


def test_empty_networks_are_known_for_the_namespace_rule() -> None:
    r = Resolver()
    r.set_records(RECORDS, 1, networks=["lonely"])
    assert a_set(r, "web.lonely")[0] == "NXDOMAIN"
    r.set_records(RECORDS, 2)
    assert isinstance(r.answer(dns.message.make_query("web.lonely", "A").to_wire(), None), Forward)


# -- truncation and EDNS --------------------------------------------------------------------

BIG = [TaskRecord("big", i, f"big.{i}", "n", f"10.8.{i // 200}.{i % 200 + 1}") for i in range(100)]


def test_udp_without_edns_is_truncated_at_512() -> None:
    r = make_resolver(BIG)
    for _ in range(3):  # miss, then cached
        reply, out = ask(r, "big")
        assert len(out) <= 512
        assert reply.flags & dns.flags.TC
        assert reply.edns == -1
        got = addresses(reply)
        assert len(got) == (512 - 12 - len("\x03big\x00") - 4) // 16
        assert len(set(got)) == len(got)


@pytest.mark.parametrize(
    ("payload", "limit", "truncated"), [(1232, 1232, True), (4096, 1232, True), (1000, 512, True)]
)
def test_udp_with_edns_is_truncated_at_the_edns_size(
    payload: int, limit: int, truncated: bool
) -> None:
    r = make_resolver(BIG)
    for _ in range(2):
        reply, out = ask(r, "big", use_edns=0, payload=payload)
        assert len(out) <= min(payload, limit)
        assert bool(reply.flags & dns.flags.TC) == truncated
        assert reply.edns == 0  # answered with an OPT
        assert reply.payload == 1232
        assert len(addresses(reply)) == (min(payload, limit) - 12 - 9 - 11) // 16


def test_small_answers_fit_and_edns_do_bit_is_echoed() -> None:
    r = make_resolver()
    reply, _ = ask(r, "web", use_edns=0, payload=1232, want_dnssec=True)
    assert not reply.flags & dns.flags.TC
    assert reply.ednsflags & dns.flags.DO
    assert set(addresses(reply)) == WEB_ALL
    reply, _ = ask(r, "web", use_edns=0, payload=1232)
    assert not reply.ednsflags & dns.flags.DO


def test_tcp_answers_are_not_truncated() -> None:
    r = make_resolver(BIG)
    reply, out = ask(r, "big", tcp=True)
    assert not reply.flags & dns.flags.TC
    assert len(addresses(reply)) == 100
    assert len(out) > 512


def test_edns_options_are_ignored() -> None:
    r = make_resolver()
    cookie = dns.edns.GenericOption(dns.edns.OptionType.COOKIE, b"12345678")
    for _ in range(2):
        reply, _ = ask(r, "web", use_edns=0, payload=1232, options=[cookie])
        assert set(addresses(reply)) == WEB_ALL


def test_unknown_edns_version_gets_badvers() -> None:
    reply, _ = ask(make_resolver(), "web", use_edns=1)
    assert reply.rcode() == dns.rcode.BADVERS


# -- header flags, case, malformed input ----------------------------------------------------


def test_header_flags() -> None:
    r = make_resolver()
    q = dns.message.make_query("web", "A")
    q.flags |= dns.flags.CD
    reply = dns.message.from_wire(r.answer(q.to_wire(), None))  # type: ignore[arg-type]
    assert reply.flags & dns.flags.QR and reply.flags & dns.flags.AA
    assert reply.flags & dns.flags.RD and reply.flags & dns.flags.RA and reply.flags & dns.flags.CD
    q = dns.message.make_query("web", "A")
    q.flags &= ~dns.flags.RD
    for _ in range(2):
        reply = dns.message.from_wire(r.answer(q.to_wire(), None))  # type: ignore[arg-type]
        assert not reply.flags & dns.flags.RD and not reply.flags & dns.flags.CD


def test_names_are_case_insensitive_and_the_question_is_echoed_as_asked() -> None:
    r = make_resolver()
    for name in ("WEB", "Web.Front", "TASKS.web.FRONT", "wEb.MeshNet."):
        reply, out = ask(r, name, "A", FRONT)
        assert set(addresses(reply)) == WEB_FRONT
        assert name.split(".")[0].encode() in out  # 0x20 bits survive
    reply, _ = ask(r, "3.0.0.10.IN-ADDR.ARPA.", "PTR")
    assert reply.answer


def header(flags: int = 0x0100, qd: int = 1, an: int = 0, ns: int = 0, ar: int = 0) -> bytes:
    return struct.pack("!HHHHHH", 0xBEEF, flags, qd, an, ns, ar)


QUESTION = b"\x03web\x00\x00\x01\x00\x01"


@pytest.mark.parametrize(
    "query",
    [
        header() + b"\x03we",  # question cut short
        header() + b"\x03web\x00\x00\x01",  # type/class cut short
        header(qd=0),
        header(qd=2) + QUESTION + QUESTION,
        header() + QUESTION + b"junk",
        header() + b"\x40abc\x00\x00\x01\x00\x01",  # extended label type
        header()
        + b"\x3f"
        + b"a" * 63
        + b"\x3f"
        + b"a" * 63
        + b"\x3f"
        + b"a" * 63
        + b"\x3f"
        + b"a" * 63
        + b"\x00\x00\x01\x00\x01",  # name over 255 bytes
        header(ar=1) + QUESTION + b"\x00\x00\x29\x04",  # OPT cut short
        header(ar=1) + QUESTION + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x05ab",
        header() + b"\xc0\x0c\x00\x01\x00\x01",  # compression loop
        header() + b"\xff" * 40,
    ],
)
def test_formerr_on_garbage_with_a_readable_header(query: bytes) -> None:
    r = make_resolver()
    for _ in range(2):
        out = r.answer(query, None)
        assert isinstance(out, bytes)
        reply = dns.message.from_wire(out)
        assert reply.id == 0xBEEF
        assert reply.rcode() == dns.rcode.FORMERR
        assert reply.flags & dns.flags.QR and reply.flags & dns.flags.RD


def test_short_messages_and_responses_are_dropped() -> None:
    r = make_resolver()
    for query in (b"", b"\x00", header()[:11]):
        assert isinstance(r.answer(query, None), Drop)
    assert isinstance(r.answer(header(flags=0x8100) + QUESTION, None), Drop)
    assert r.counters["dropped"] == 4


@pytest.mark.parametrize("opcode", [1, 2, 4, 5, 15])
def test_unsupported_opcodes_get_notimp(opcode: int) -> None:
    out = make_resolver().answer(header(flags=opcode << 11) + QUESTION, None)
    assert isinstance(out, bytes)
    reply = dns.message.from_wire(out, question_only=True)
    assert reply.rcode() == dns.rcode.NOTIMP
    assert reply.opcode() == opcode


def test_unusual_but_valid_queries_fall_back_to_a_full_parse() -> None:
    r = make_resolver()
    q = dns.message.make_query("web", "A", use_edns=0)
    q.additional.append(dns.rrset.from_text("extra.", 60, "IN", "A", "192.0.2.1"))
    wire = q.to_wire()
    for _ in range(2):
        reply = dns.message.from_wire(r.answer(wire, None))  # type: ignore[arg-type]
        assert set(addresses(reply)) == WEB_ALL
    q = dns.message.make_query("example.com", "A")
    q.additional.append(dns.rrset.from_text("extra.", 60, "IN", "A", "192.0.2.1"))
    assert isinstance(r.answer(q.to_wire(), None), Forward)


def test_internal_errors_never_escape() -> None:
    r = make_resolver()
    wire = dns.message.make_query("web", "A").to_wire()
    out = r.answer(wire, {"front"})  # type: ignore[arg-type]  # unhashable: a caller bug
    assert isinstance(out, bytes)
    assert dns.message.from_wire(out).rcode() == dns.rcode.SERVFAIL
    assert r.counters["internal_errors"] == 1


# -- the cache ----------------------------------------------------------------------------------


def test_set_records_invalidates_cached_answers() -> None:
    r = make_resolver()
    wire = dns.message.make_query("web", "A").to_wire()
    for _ in range(3):
        r.answer(wire, FRONT)
    moved = [
        rec
        if rec.service != "web"
        else TaskRecord("web", rec.slot, rec.task, rec.network, "10.0.5.5")
        for rec in RECORDS
    ]
    r.set_records(moved, 2)
    assert r.version == 2
    reply = dns.message.from_wire(r.answer(wire, FRONT))  # type: ignore[arg-type]
    assert set(addresses(reply)) == {"10.0.5.5"}
    r.set_records([rec for rec in RECORDS if rec.service != "web"], 3)
    reply = dns.message.from_wire(r.answer(wire, FRONT))  # type: ignore[arg-type]
    assert reply.rcode() == dns.rcode.NXDOMAIN


def test_unchanged_records_keep_the_cache_and_hits_skip_the_slow_path() -> None:
    r = make_resolver()
    wire = dns.message.make_query("web", "A").to_wire()
    r.answer(wire, FRONT)
    misses = r.counters["misses"]
    r.set_records(list(reversed(RECORDS)), 2)
    for _ in range(5):
        r.answer(wire, FRONT)
    assert r.counters["misses"] == misses
    assert r.version == 2


def test_the_cache_is_bounded_and_random_names_are_not_cached() -> None:
    r = make_resolver(max_cache_entries=16)
    rng = random.Random(1)
    for i in range(500):
        name = f"nosuch{rng.getrandbits(32)}"
        r.answer(dns.message.make_query(name, "A").to_wire(), None)
        r.answer(
            dns.message.make_query(f"web.{i % 5}", rng.choice(["A", "TXT", "MX"])).to_wire(), FRONT
        )
    assert r._cached <= 16
    assert r.counters["cache_clears"] > 0
    assert set(addresses(ask(r, "web", "A", FRONT)[0])) == WEB_FRONT


def test_bad_records_are_skipped_and_counted() -> None:
    r = Resolver()
    r.set_records([*RECORDS, TaskRecord("x", 1, "x.1", "front", "not-an-ip")], 1)
    assert r.counters["bad_records"] == 1
    assert a_set(r, "x")[0] == "NXDOMAIN"


def test_answer_name_types() -> None:
    r = make_resolver()
    assert r.answer_name("web", "AAAA") == []
    assert r.answer_name("web", "SRV") == []
    assert r.answer_name("web.", 1, FRONT) == sorted(WEB_FRONT)
    assert r.answer_name("example.com") == []
    with pytest.raises(ValueError):
        r.answer_name("web", "BOGUS")
