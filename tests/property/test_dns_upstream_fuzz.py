"""Fuzz the upstream receive path (meshnet.dns.upstream) and the fair slots (meshnet.dns.limits).

Whatever arrives from an upstream, from wherever, on whichever query's socket: the pool never
raises, accounts for every message exactly once, and hands a client only a reply that carries
its query's ID, came from the upstream that query was sent to and asks its question.
"""

from __future__ import annotations

import random

import dns.message
import dns.rrset
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from meshnet.dns import Admit, FairSlots, Refuse, ReplyClient, SendUpstream, UpstreamPool

UP1 = ("127.0.0.53", 53)
UP2 = ("127.0.0.54", 5353)
ADDRS = st.sampled_from([UP1, UP2, ("127.0.0.53", 54), ("127.0.0.9", 53), ("::1", 53)])
NAMES = ["example.com", "ExAmPlE.org", "a.b.c.d.example.net", "x"]
ERROR_RCODES = {1, 2, 4, 5}


def query(name: str, rdtype: str, qid: int) -> bytes:
    q = dns.message.make_query(name, rdtype)
    q.id = qid
    return q.to_wire()


def good_reply(sent: bytes) -> bytes:
    q = dns.message.from_wire(sent)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", "192.0.2.7"))
    return r.to_wire()


@st.composite
def mutated(draw: st.DrawFn, base: bytes) -> bytes:
    wire = bytearray(base)
    for i, x in draw(
        st.lists(st.tuples(st.integers(0, len(wire) - 1), st.integers(1, 255)), max_size=3)
    ):
        wire[i] ^= x
    for i in draw(st.lists(st.integers(12, len(wire) - 1), max_size=4)):
        if 0x41 <= wire[i] <= 0x5A or 0x61 <= wire[i] <= 0x7A:
            wire[i] ^= 0x20  # letter case: still the same question
    cut = draw(st.integers(0, len(wire)))
    return bytes(wire[:cut]) + draw(st.binary(max_size=8))


def oracle_matches(
    data: bytes, sent: bytes, addr: tuple[str, int], upstreams: set[tuple[str, int]]
) -> bool:
    """Could ``data`` from ``addr`` be an answer to ``sent`` (sent to ``upstreams``)? Written
    independently of the pool, from the rules in its docstring."""
    if len(data) < 12 or not data[2] & 0x80 or data[:2] != sent[:2] or addr not in upstreams:
        return False
    qlen = len(sent) - 12  # the queries here have no OPT record: the question runs to the end
    if data[4:6] == b"\x00\x01" and len(data) >= 12 + qlen:
        name_end = 12 + qlen - 4
        same_name = data[12:name_end].lower() == sent[12:name_end].lower()
        if same_name and data[name_end : 12 + qlen] == sent[name_end:]:
            return True
    return data[4:10] == bytes(6) and data[3] & 0x0F in ERROR_RCODES


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_whatever_an_upstream_sends_only_a_true_reply_reaches_a_client(data: st.DataObject) -> None:
    pool: UpstreamPool[str] = UpstreamPool([UP1, UP2], rng=random.Random(data.draw(st.integers())))
    sent: dict[int, tuple[SendUpstream, str]] = {}
    for i in range(data.draw(st.integers(1, 4))):
        name = data.draw(st.sampled_from(NAMES))
        rdtype = data.draw(st.sampled_from(["A", "AAAA", "TXT"]))
        [s] = pool.submit(query(name, rdtype, i), f"client{i}", 0.0)
        assert isinstance(s, SendUpstream)
        sent[s.qid] = (s, f"client{i}")
    delivered: set[str] = set()
    tried = {qid: {UP1} for qid in sent}
    for _ in range(data.draw(st.integers(1, 12))):
        qid = data.draw(st.sampled_from(sorted(sent)))
        s = sent[qid][0]
        kind = data.draw(st.sampled_from(["good", "error", "mutated", "random", "other"]))
        if kind == "good":
            msg = good_reply(s.data)
        elif kind == "error":  # SERVFAIL, REFUSED, ...: the first upstream's moves on
            reply = good_reply(s.data)
            msg = reply[:3] + bytes([reply[3] & 0xF0 | data.draw(st.sampled_from([2, 3, 5]))])
            msg += reply[4:]
        elif kind == "mutated":
            msg = data.draw(mutated(good_reply(s.data)))
        elif kind == "other":
            other = good_reply(sent[data.draw(st.sampled_from(sorted(sent)))][0].data)
            msg = data.draw(st.one_of(st.just(other), mutated(other)))
        else:
            msg = data.draw(st.binary(max_size=80))
        addr = data.draw(st.one_of(st.just(UP1), ADDRS))
        on_socket = data.draw(st.sampled_from([None, qid]))
        before = dict(pool.counters)
        was_pending = pool.is_pending(qid)
        out = pool.receive(msg, addr, 0.1, qid=on_socket)
        event(f"{kind}: {type(out).__name__}")
        moved = {k: pool.counters[k] - before[k] for k in ("answered", "retries", "unmatched")}
        assert sum(moved.values()) == 1, moved  # every message is accounted for once
        if isinstance(out, ReplyClient):
            assert out.qid is not None
            target, target_client = sent[out.qid]
            assert out.client == target_client and target_client not in delivered
            assert oracle_matches(msg, target.data, addr, tried[out.qid]), (msg, addr)
            assert on_socket in (None, out.qid)
            # The client's own ID, and its question as it spelled it (if echoed at all).
            client_id = int(target_client.removeprefix("client"))
            assert out.data[:2] == client_id.to_bytes(2, "big")
            assert out.data[2:] == msg[2:] or (
                out.data[12 : len(target.data)] == target.data[12:]
                and out.data[len(target.data) :] == msg[len(target.data) :]
            )
            delivered.add(target_client)
        elif isinstance(out, SendUpstream):  # SERVFAIL/REFUSED from the first: the second
            assert out.addr == UP2 and out.qid in sent and UP2 not in tried[out.qid]
            assert oracle_matches(msg, sent[out.qid][0].data, addr, tried[out.qid])
            assert msg[3] & 0x0F in (2, 5)
            tried[out.qid].add(UP2)
        else:
            assert out is None
            if was_pending and on_socket in (None, qid):
                assert not oracle_matches(msg, s.data, addr, tried[qid]), (msg, addr)
        assert pool.in_flight == len(sent) - len(delivered)
        assert len(pool._slots) == pool.in_flight  # no slot leaks
    for out in pool.handle_timer(100.0):  # whatever is left times out into SERVFAIL
        assert not isinstance(out, ReplyClient) or out.client not in delivered
    pool.handle_timer(200.0)
    assert pool.in_flight == 0 and len(pool._slots) == 0 and pool.get_timer() is None


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 12),
    st.integers(1, 12),
    st.lists(st.tuples(st.booleans(), st.integers(0, 4), st.integers(0, 30)), max_size=80),
)
def test_fair_slots_keep_their_caps_and_only_evict_from_the_busiest(
    total: int, per_owner: int, ops: list[tuple[bool, int, int]]
) -> None:
    slots: FairSlots[int, int] = FairSlots(total, per_owner)
    held: dict[int, set[int]] = {}
    next_item = 0
    for acquire, owner, pick in ops:
        counts = {o: len(items) for o, items in held.items() if items}
        have = counts.get(owner, 0)
        if acquire:
            item = next_item
            next_item += 1
            got = slots.acquire(owner, item)
            if isinstance(got, Refuse):
                if got.reason == "owner":
                    assert have >= slots.per_owner and have < total
                else:
                    assert sum(counts.values()) == total
                    assert have >= slots.per_owner or max(counts.values()) <= have + 1
            else:
                assert isinstance(got, Admit)
                assert have < slots.per_owner
                if got.evicted is None:
                    assert sum(counts.values()) < total
                else:
                    victim, victim_item = got.evicted
                    assert sum(counts.values()) == total
                    assert counts[victim] == max(counts.values()) >= have + 2
                    assert min(held[victim]) == victim_item  # its oldest
                    held[victim].discard(victim_item)
                held.setdefault(owner, set()).add(item)
        else:
            mine = sorted(held.get(owner, ()))
            if mine:
                item = mine[pick % len(mine)]
                assert slots.release(owner, item)
                held[owner].discard(item)
            else:
                assert not slots.release(owner, pick)
        assert len(slots) == sum(len(v) for v in held.values()) <= total
        for o, items in held.items():
            assert slots.count(o) == len(items) <= slots.per_owner
            assert slots.items(o) == sorted(items)
