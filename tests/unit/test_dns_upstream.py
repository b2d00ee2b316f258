"""Forwarding bookkeeping (meshnet.dns.upstream): ID rewriting, failover, timeouts, the bound."""

from __future__ import annotations

import random
import secrets

import dns.message
import dns.rcode
import dns.rdatatype
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


def only(action: object) -> object:
    """The one action in a list (what submit gives), or the action itself (receive)."""
    if isinstance(action, list):
        assert len(action) == 1, action
        return action[0]
    return action


def sent(action: object) -> SendUpstream:
    action = only(action)
    assert isinstance(action, SendUpstream), action
    return action


def replied(action: object) -> ReplyClient[str]:
    action = only(action)
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
    assert (p.counters["bad_source"], p.counters["bad_question"]) == (1, 1)
    assert (p.counters["bad_reply"], p.counters["bad_id"]) == (2, 1)
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
    assert p.submit(b"\x00" * 5, "c", 0.0) == []
    response = upstream_reply(query())
    assert p.submit(response, "c", 0.0) == []
    assert p.counters["not_query"] == 2


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


# -- issue 14: unguessable IDs, strict reply matching, per-owner caps -----------------------------


def test_ids_come_from_the_os_csprng_by_default() -> None:
    p: UpstreamPool[str] = UpstreamPool([UP1])
    assert isinstance(p._rng, secrets.SystemRandom)
    ids = {sent(p.submit(query(qid=1), "c", 0.0)).qid for _ in range(200)}
    assert len(ids) == 200  # unique among those in flight


def forged(sent_query: bytes, name: str = "example.com", rdtype: str = "A",
           rdclass: str = "IN") -> bytes:
    """A reply with the ID of ``sent_query`` but the question (name, rdtype, rdclass)."""
    q = dns.message.make_query(name, rdtype, rdclass)
    q.id = int.from_bytes(sent_query[:2], "big")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("example.com.", 30, "IN", "A", "6.6.6.6"))
    return r.to_wire()


def test_a_reply_must_ask_the_same_question() -> None:
    p = pool(UP1)
    s = sent(p.submit(query(), "c", 0.0))
    for bad in (
        forged(s.data, "other.com"),
        forged(s.data, rdtype="AAAA"),
        forged(s.data, rdclass="CH"),
        forged(s.data, "example.com.other"),
        # No question, an answer whose first bytes are the question's: not a match.
        s.data[:2] + b"\x81\x80\x00\x00\x00\x01\x00\x00\x00\x00" + s.data[12:]
        + b"\x00\x00\x01\x2c\x00\x04\x06\x06\x06\x06",
        # Two questions, the first one right.
        s.data[:2] + b"\x81\x80\x00\x02" + s.data[6:] + s.data[12:],
    ):
        assert p.receive(bad, UP1, 0.1, qid=s.qid) is None
    assert p.counters["bad_question"] == 6
    assert p.in_flight == 1


def test_types_and_classes_are_compared_exactly_names_without_case() -> None:
    p = pool(UP1)
    # Type 0x41 is 'A' in ASCII: folding it like a letter of the name would be a bug.
    q = dns.message.make_query("example.com", dns.rdatatype.RdataType.make(0x41))
    s = sent(p.submit(q.to_wire(), "c", 0.0))
    assert p.receive(forged(s.data, rdtype="TYPE97"), UP1, 0.1, qid=s.qid) is None  # 'a'
    assert p.counters["bad_question"] == 1
    ok = forged(s.data, "EXAMPLE.com", rdtype="TYPE65")
    assert replied(p.receive(ok, UP1, 0.1, qid=s.qid)).client == "c"


def test_the_client_gets_its_own_spelling_of_the_question_back() -> None:
    p = pool(UP1)
    s = sent(p.submit(query("ExAmPlE.cOm", qid=77), "c", 0.0))
    lower = upstream_reply(s.data.replace(b"ExAmPlE", b"example").replace(b"cOm", b"com"))
    m = dns.message.from_wire(replied(p.receive(lower, UP1, 0.1, qid=s.qid)).data)
    assert m.id == 77 and m.question[0].name.to_text() == "ExAmPlE.cOm."
    assert m.answer[0][0].address == "192.0.2.7"


def test_an_error_without_a_question_is_taken_but_not_an_answer() -> None:
    p = pool(UP1)
    s = sent(p.submit(query(qid=5), "c", 0.0))
    noerror = s.data[:2] + b"\x81\x80" + bytes(8)
    assert p.receive(noerror, UP1, 0.1, qid=s.qid) is None
    formerr = s.data[:2] + b"\x81\x81" + bytes(8)
    m = dns.message.from_wire(replied(p.receive(formerr, UP1, 0.1, qid=s.qid)).data)
    assert m.id == 5 and m.rcode() == dns.rcode.FORMERR


def test_a_reply_on_another_querys_socket_or_attempt_is_dropped() -> None:
    p = pool(UP1, UP2)
    a = sent(p.submit(query(), "a", 0.0))
    b = sent(p.submit(query(), "b", 0.0))
    assert p.receive(upstream_reply(b.data), UP1, 0.1, qid=a.qid) is None  # b's, on a's socket
    assert p.counters["bad_id"] == 1
    retry = sent(p.handle_timer(2.0)[0])
    assert (retry.qid, retry.attempt, retry.addr) == (a.qid, 1, UP2)
    # On the second attempt's socket only the second upstream is heard, and only for it.
    assert p.receive(upstream_reply(a.data), UP1, 2.1, qid=a.qid, attempt=1) is None
    assert p.receive(upstream_reply(a.data), UP2, 2.1, qid=a.qid, attempt=0) is None
    assert p.counters["bad_source"] == 2
    r = replied(p.receive(upstream_reply(a.data), UP2, 2.1, qid=a.qid, attempt=1))
    assert (r.client, r.qid) == ("a", a.qid)


def test_tcp_queries_are_retried_over_tcp() -> None:
    p = pool(UP1, UP2)
    s = sent(p.submit(query(), "c", 0.0, tcp=True))
    assert s.tcp and p.counters["forwarded_tcp"] == 1
    assert sent(p.handle_timer(2.0)[0]).tcp


def test_a_query_whose_question_cannot_be_matched_is_not_sent() -> None:
    compressed = query()[:12] + b"\xc0\x0c\x00\x01\x00\x01"
    p = pool(UP1)
    r = replied(p.submit(compressed, "c", 0.0))
    assert dns.message.from_wire(r.data).rcode() == dns.rcode.SERVFAIL
    assert r.qid is None and p.counters["bad_query"] == 1 and p.in_flight == 0


def test_an_owner_is_capped_and_a_quiet_owner_takes_the_busiest_ones_oldest_slot() -> None:
    p = pool(UP1, max_in_flight=8, max_in_flight_per_owner=6)
    loud = [sent(p.submit(query(qid=i), f"loud{i}", 0.0, owner="L")) for i in range(6)]
    r = replied(p.submit(query(qid=6), "loud6", 0.0, owner="L"))
    assert dns.message.from_wire(r.data).rcode() == dns.rcode.SERVFAIL
    assert p.counters["owner_overflow"] == 1 and p.owner_in_flight("L") == 6
    for i in range(2):
        sent(p.submit(query(qid=10 + i), f"mid{i}", 0.0, owner="M"))
    assert p.in_flight == 8
    # Full: a quiet owner takes the oldest slot of the busiest (L), which gets SERVFAIL now.
    evicted, new = p.submit(query(qid=20), "quiet", 0.0, owner="Q")
    evicted = replied(evicted)
    assert (evicted.client, evicted.qid) == ("loud0", loud[0].qid)
    assert dns.message.from_wire(evicted.data).rcode() == dns.rcode.SERVFAIL
    assert sent(new).addr == UP1
    assert p.counters["evicted"] == 1 and p.in_flight == 8
    assert p.receive(upstream_reply(loud[0].data), UP1, 0.1, qid=loud[0].qid) is None
    # L 5, M 2, Q 1: Q takes from L until no one is busier than another by more than one.
    for i in range(2):
        assert len(p.submit(query(qid=21 + i), "quiet", 0.0, owner="Q")) == 2
    assert [p.owner_in_flight(o) for o in "LMQ"] == [3, 2, 3]
    r = replied(p.submit(query(qid=30), "quiet", 0.0, owner="Q"))
    assert p.counters["overflow"] == 1 and r.qid is None
    assert [p.owner_in_flight(o) for o in "LMQ"] == [3, 2, 3]


def test_cancel_frees_the_slot_without_a_reply() -> None:
    p = pool(UP1, max_in_flight=3)
    a = sent(p.submit(query(), "a", 0.0, owner="A"))
    sent(p.submit(query(), "b", 0.0, owner="A"))
    assert p.cancel(a.qid) and not p.cancel(a.qid)
    assert p.counters["cancelled"] == 1 and p.in_flight == 1
    assert p.receive(upstream_reply(a.data), UP1, 0.1) is None
    c = sent(p.submit(query(), "c", 0.0, owner="A"))
    sent(p.submit(query(), "d", 0.0, owner="D"))
    assert c.qid in p.cancel_owner("A")
    assert p.in_flight == 1 and p.owner_in_flight("A") == 0
    assert p.cancel_owner("D") and p.in_flight == 0 and p.get_timer() is None
    assert p.handle_timer(100.0) == []


def test_upstream_addresses_are_matched_as_the_kernel_spells_them() -> None:
    p = pool(("0:0::1", 53))
    s = sent(p.submit(query(), "c", 0.0))
    assert s.addr == ("::1", 53)
    assert replied(p.receive(upstream_reply(s.data), ("::1", 53, 0, 0), 0.1)).client == "c"
