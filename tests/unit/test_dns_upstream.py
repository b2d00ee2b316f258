"""Forwarding bookkeeping (meshnet.dns.upstream): ID rewriting, failover, timeouts, the bound."""

from __future__ import annotations

import random

import dns.message
import dns.rcode
import dns.rrset
import pytest

from meshnet.dns import ReplyClient, SendUpstream, UpstreamPool

UP1 = ("127.0.0.53", 53)
UP2 = ("127.0.0.54", 53)
UP3 = ("127.0.0.55", 5353)


def pool(*upstreams: tuple[str, int], **kwargs: object) -> UpstreamPool[str]:
    return UpstreamPool(list(upstreams), rng=random.Random(3), **kwargs)  # type: ignore[arg-type]


def query(name: str = "example.com", qid: int = 0x1234) -> bytes:
    q = dns.message.make_query(name, "A")
    q.id = qid
    return q.to_wire()


def upstream_reply(
    sent: bytes, rcode: dns.rcode.Rcode = dns.rcode.NOERROR, ip: str = "192.0.2.7"
) -> bytes:
    q = dns.message.from_wire(sent)
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if rcode == dns.rcode.NOERROR:
        r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", ip))
    return r.to_wire()


def sent(action: object) -> SendUpstream:
    assert isinstance(action, SendUpstream), action
    return action


def replied(action: object) -> ReplyClient[str]:
    assert isinstance(action, ReplyClient), action
    return action


def test_ids_are_rewritten_and_put_back() -> None:
    p = pool(UP1)
    a = sent(p.submit(query(qid=7), "client-a", 0.0))
    b = sent(p.submit(query(qid=7), "client-b", 0.0))
    assert a.addr == b.addr == UP1
    id_a, id_b = a.data[:2], b.data[:2]
    assert id_a != id_b  # same client id, no collision upstream
    assert a.data[2:] == query(qid=7)[2:]
    assert p.in_flight == 2
    rb = replied(p.receive(upstream_reply(b.data, ip="192.0.2.2"), UP1, 0.1))
    ra = replied(p.receive(upstream_reply(a.data, ip="192.0.2.1"), UP1, 0.1))
    assert (ra.client, rb.client) == ("client-a", "client-b")
    ma, mb = dns.message.from_wire(ra.data), dns.message.from_wire(rb.data)
    assert ma.id == mb.id == 7
    assert ma.answer[0][0].address == "192.0.2.1" and mb.answer[0][0].address == "192.0.2.2"
    assert p.in_flight == 0 and p.get_timer() is None


def test_replies_that_do_not_match_are_ignored() -> None:
    p = pool(UP1, UP2)
    s = sent(p.submit(query(), "c", 0.0))
    good = upstream_reply(s.data)
    assert p.receive(good, UP2, 0.1) is None  # not sent there (yet)
    assert (
        p.receive(upstream_reply(query("other.org", qid=int.from_bytes(s.data[:2]))), UP1, 0.1)
        is None
    )
    assert p.receive(s.data, UP1, 0.1) is None  # a query, not a reply
    assert p.receive(b"\x00\x01", UP1, 0.1) is None
    wrong_id = bytes([s.data[0] ^ 0xFF]) + good[1:]
    assert p.receive(wrong_id, UP1, 0.1) is None
    assert p.counters["unmatched"] == 5
    assert replied(p.receive(good.replace(b"example", b"EXAMPLE"), UP1, 0.1)).client == "c"
    assert p.receive(good, UP1, 0.2) is None  # a duplicate


def test_timeout_tries_the_next_upstream_then_servfails() -> None:
    p = pool(UP1, UP2, timeout=4.0)
    s = sent(p.submit(query(qid=99), "c", 10.0))
    assert s.addr == UP1
    assert p.get_timer() == 12.0  # each attempt gets timeout / upstreams
    assert p.handle_timer(11.9) == []
    retry = p.handle_timer(12.0)
    assert [sent(a).addr for a in retry] == [UP2]
    assert sent(retry[0]).data == s.data
    assert p.get_timer() == 14.0
    out = p.handle_timer(14.5)
    assert len(out) == 1
    r = replied(out[0])
    m = dns.message.from_wire(r.data)
    assert r.client == "c" and m.id == 99 and m.rcode() == dns.rcode.SERVFAIL
    assert str(m.question[0].name) == "example.com."
    assert p.in_flight == 0 and p.get_timer() is None
    assert p.counters["timeouts"] == 1


def test_a_late_reply_from_the_first_upstream_is_still_taken() -> None:
    p = pool(UP1, UP2)
    s = sent(p.submit(query(), "c", 0.0))
    p.handle_timer(2.0)
    assert replied(p.receive(upstream_reply(s.data), UP1, 2.5)).client == "c"
    assert p.handle_timer(10.0) == []


def test_servfail_from_an_upstream_moves_on_and_the_last_answer_is_passed_on() -> None:
    p = pool(UP1, UP2)
    s = sent(p.submit(query(qid=5), "c", 0.0))
    nxt = sent(p.receive(upstream_reply(s.data, dns.rcode.SERVFAIL), UP1, 0.1))
    assert nxt.addr == UP2
    r = replied(p.receive(upstream_reply(nxt.data, dns.rcode.REFUSED), UP2, 0.2))
    m = dns.message.from_wire(r.data)
    assert m.id == 5 and m.rcode() == dns.rcode.REFUSED


def test_nxdomain_is_an_answer_not_a_failure() -> None:
    p = pool(UP1, UP2)
    s = sent(p.submit(query(), "c", 0.0))
    r = replied(p.receive(upstream_reply(s.data, dns.rcode.NXDOMAIN), UP1, 0.1))
    assert dns.message.from_wire(r.data).rcode() == dns.rcode.NXDOMAIN


def test_max_in_flight_overflow_gets_servfail_at_once() -> None:
    p = pool(UP1, max_in_flight=4)
    for i in range(4):
        sent(p.submit(query(qid=i), f"c{i}", 0.0))
    r = replied(p.submit(query(qid=42), "late", 0.0))
    m = dns.message.from_wire(r.data)
    assert r.client == "late" and m.id == 42 and m.rcode() == dns.rcode.SERVFAIL
    assert p.in_flight == 4 and p.counters["overflow"] == 1
    ids = set()
    for a in p.handle_timer(100.0):
        ids.add(dns.message.from_wire(replied(a).data).id)
    assert ids == {0, 1, 2, 3}
    sent(p.submit(query(), "again", 100.0))


def test_at_most_three_upstreams_and_none_means_servfail() -> None:
    p = pool(UP1, UP2, UP3, ("127.0.0.56", 53))
    assert p.upstreams == (UP1, UP2, UP3)
    empty = pool()
    r = replied(empty.submit(query(qid=3), "c", 0.0))
    assert dns.message.from_wire(r.data).rcode() == dns.rcode.SERVFAIL
    empty.set_upstreams([UP2])
    assert sent(empty.submit(query(), "c", 0.0)).addr == UP2


def test_garbage_is_not_forwarded() -> None:
    p = pool(UP1)
    assert p.submit(b"\x00" * 5, "c", 0.0) is None
    response = upstream_reply(query())
    assert p.submit(response, "c", 0.0) is None


def test_many_queries_keep_the_timer_heap_bounded() -> None:
    p = pool(UP1, max_in_flight=8, timeout=1.0)
    now = 0.0
    wire = query()
    for _ in range(500):
        s = sent(p.submit(wire, "c", now))
        reply = s.data[:2] + bytes([s.data[2] | 0x80]) + s.data[3:]  # QR set: an empty answer
        replied(p.receive(reply, UP1, now))
        now += 0.0001
    assert len(p._heap) <= 2 * 8 + 64
    assert p.in_flight == 0


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        UpstreamPool([UP1], max_in_flight=0)
    with pytest.raises(ValueError):
        UpstreamPool([UP1], timeout=0)
