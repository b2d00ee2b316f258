"""Table-driven tests of every member state transition (core.py module docstring is the spec)."""

from __future__ import annotations

import random

import pytest

from meshnet.membership import (
    MemberAlive,
    MemberDead,
    MemberEvent,
    MemberJoined,
    MemberLeft,
    Membership,
    MembershipConfig,
    MemberState,
    MemberSuspect,
    MemberUpdated,
    NodeMeta,
)
from meshnet.membership.messages import Alive, Dead, Suspect, decode_packet

A, S, D, L = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT
X = "x"
X_ADDR = ("10.0.0.9", 7946)


def meta(name: str = X, tag: str = "v1", addr: tuple[str, int] = X_ADDR) -> NodeMeta:
    return NodeMeta(name, addr, {"tag": tag}, {})


class Msg(bytes):
    kind: str


def _msg(kind: str, data: bytes) -> Msg:
    out = Msg(data)
    out.kind = kind
    return out


def alive(inc: int, tag: str = "v1", name: str = X) -> Msg:
    m = meta(name, tag)
    return _msg("alive", Alive(inc, m, m.encode()).encode())


def suspect(inc: int, sender: str = "y", name: str = X) -> Msg:
    return _msg("suspect", Suspect(inc, name, sender).encode())


def dead(inc: int, sender: str = "y", name: str = X) -> Msg:
    return _msg("dead", Dead(inc, name, sender).encode())


def left(inc: int, name: str = X) -> Msg:
    return _msg("left", Dead(inc, name, name).encode())


def new_node(name: str = "me", now: float = 0.0, host: str = "10.0.0.1") -> Membership:
    return Membership(
        MembershipConfig.lan(), NodeMeta(name, (host, 7946)), random.Random(1), now
    )


def drain(m: Membership) -> list[MemberEvent]:
    out = []
    while (ev := m.next_event()) is not None:
        out.append(ev)
    return out


def put(m: Membership, state: MemberState, inc: int) -> None:
    """Bring X into ``state`` at ``inc`` through the public API."""
    m.receive_datagram(alive(inc), X_ADDR, 0.0)
    if state is S:
        m.receive_datagram(suspect(inc), X_ADDR, 0.0)
    elif state is D:
        m.receive_datagram(dead(inc), X_ADDR, 0.0)
    elif state is L:
        m.receive_datagram(left(inc), X_ADDR, 0.0)
    got = m.member(X)
    assert got is not None and got.state is state and got.incarnation == inc
    drain(m)


# (held state, held incarnation, incoming message, expected state, expected inc, expected event)
TABLE: list[tuple[MemberState | None, int, Msg, MemberState | None, int, type | None]] = [
    # unknown member: only alive creates it
    (None, 0, alive(0), A, 0, MemberJoined),
    (None, 0, suspect(0), None, 0, None),
    (None, 0, dead(0), None, 0, None),
    (None, 0, left(0), None, 0, None),
    # alive
    (A, 1, alive(0), A, 1, None),
    (A, 1, alive(1), A, 1, None),
    (A, 1, alive(1, "v2"), A, 1, None),  # same incarnation never replaces
    (A, 1, alive(2), A, 2, None),
    (A, 1, alive(2, "v2"), A, 2, MemberUpdated),
    (A, 1, suspect(0), A, 1, None),
    (A, 1, suspect(1), S, 1, MemberSuspect),
    (A, 1, suspect(2), S, 2, MemberSuspect),
    (A, 1, dead(0), A, 1, None),
    (A, 1, dead(1), D, 1, MemberDead),  # dead at i beats alive at i
    (A, 1, dead(2), D, 2, MemberDead),
    (A, 1, left(1), L, 1, MemberLeft),
    (A, 1, left(0), A, 1, None),
    # suspect
    (S, 1, alive(1), S, 1, None),
    (S, 1, alive(2), A, 2, MemberAlive),  # refuted by a higher incarnation
    (S, 1, suspect(0), S, 1, None),
    (S, 1, suspect(1, "z"), S, 1, None),  # a confirmation, not a transition
    (S, 1, suspect(2), S, 2, None),
    (S, 1, dead(0), S, 1, None),
    (S, 1, dead(1), D, 1, MemberDead),
    (S, 1, left(1), L, 1, MemberLeft),
    # dead
    (D, 1, alive(1), D, 1, None),
    (D, 1, alive(2), A, 2, MemberJoined),  # rejoin after death needs a higher incarnation
    (D, 1, suspect(1), D, 1, None),
    (D, 1, suspect(2), S, 2, MemberSuspect),  # a newer life, itself suspected
    (D, 1, dead(1, "z"), D, 1, None),
    (D, 1, dead(2), D, 2, None),
    (D, 1, left(1), L, 1, MemberLeft),
    # left: terminal until reaped, except a rejoin at a higher incarnation
    (L, 1, alive(1), L, 1, None),
    (L, 1, alive(0), L, 1, None),
    (L, 1, alive(2), A, 2, MemberJoined),
    (L, 1, suspect(1), L, 1, None),
    (L, 1, dead(1), L, 1, None),
    (L, 1, dead(0), L, 1, None),
    (L, 1, left(1), L, 1, None),
    (L, 1, dead(2), D, 2, MemberDead),  # only possible after a rejoin at 2
]


def _row_id(row: tuple[object, ...]) -> str:
    held, inc, msg, want, want_inc, _ = row
    return f"{held}@{inc}+{msg.kind}->{want}@{want_inc}"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("held", "inc", "msg", "want", "want_inc", "event"), TABLE, ids=[_row_id(r) for r in TABLE]
)
def test_transition(
    held: MemberState | None,
    inc: int,
    msg: Msg,
    want: MemberState | None,
    want_inc: int,
    event: type | None,
) -> None:
    m = new_node()
    if held is not None:
        put(m, held, inc)
    m.receive_datagram(msg, ("10.0.0.7", 7946), 1.0)
    got = m.member(X)
    if want is None:
        assert got is None
    else:
        assert got is not None
        assert (got.state, got.incarnation) == (want, want_inc)
    events = drain(m)
    if event is None:
        assert events == []
    else:
        assert [type(e) for e in events] == [event]
        assert events[0].member.name == X
    assert m.stats["bad_packets"] == 0


def test_every_state_pair_is_in_the_table() -> None:
    covered = {(held, msg.kind) for held, _, msg, *_ in TABLE}
    for held in (None, A, S, D, L):
        for kind in ("alive", "suspect", "dead", "left"):
            assert (held, kind) in covered


def self_state(m: Membership) -> tuple[MemberState, int]:
    me = m.local()
    return me.state, me.incarnation


SELF_TABLE = [
    # (our incarnation, message about us, expected incarnation after, refuted?, answered?)
    # "answered": a claim older than our incarnation gets our current alive sent straight back
    # to the datagram's source, which evidently missed our refutation.
    (0, suspect(0, name="me"), 1, True, False),
    (3, suspect(1, name="me"), 3, False, True),  # stale
    (3, suspect(7, name="me"), 8, True, False),  # come back above the claim
    (0, dead(0, name="me"), 1, True, False),
    (3, dead(2, name="me"), 3, False, True),  # stale
    (0, left(0, name="me"), 1, True, False),  # somebody claims we left: we did not
    (3, left(2, name="me"), 3, False, True),  # an old leave of ours, still gossiped
    (0, alive(5, name="me"), 6, True, False),  # an older life of ours had a higher incarnation
    (2, alive(1, name="me"), 2, False, False),  # stale, but no accusation: nothing to answer
]
SRC = ("10.0.0.7", 7946)


@pytest.mark.parametrize(("inc", "msg", "want_inc", "refuted", "answered"), SELF_TABLE)
def test_self_refutation(
    inc: int, msg: bytes, want_inc: int, refuted: bool, answered: bool
) -> None:
    m = Membership(
        MembershipConfig.lan(), NodeMeta("me", ("10.0.0.1", 7946)), random.Random(1), 0.0,
        incarnation=inc,
    )
    y = meta("y", addr=SRC)
    m.receive_datagram(Alive(1, y, y.encode()).encode(), SRC, 0.0)  # the claim's source, a member
    m.datagrams_to_send(0.0)  # our own announcement
    m.receive_datagram(msg, SRC, 1.0)
    assert self_state(m) == (A, want_inc)
    assert m.stats["refuted_suspicions"] == int(refuted)
    if refuted:
        assert m.health_score == 1  # Lifeguard: a refutation costs local health
    assert m.stats["stale_claims_answered"] == int(answered)
    if answered:
        assert m.health_score == 0  # nothing new about us: no health cost, no new incarnation
        [(data, dst)] = m.datagrams_to_send(1.0)
        [reply] = decode_packet(data)
        assert dst == SRC and isinstance(reply, Alive)
        assert (reply.node, reply.incarnation) == ("me", inc)


@pytest.mark.parametrize("msg", [suspect(1, name="me"), dead(2, name="me")])
def test_stale_claim_from_a_non_member_is_not_answered(msg: bytes) -> None:
    """A replayed or spoofed stale claim must not draw our (larger) alive to its source."""
    m = Membership(
        MembershipConfig.lan(), NodeMeta("me", ("10.0.0.1", 7946)), random.Random(1), 0.0,
        incarnation=3,
    )
    m.datagrams_to_send(0.0)
    m.receive_datagram(msg, SRC, 1.0)
    assert m.stats["stale_claims_answered"] == 0
    assert m.stats["stale_answers_withheld"] == 1
    assert m.datagrams_to_send(1.0) == []


def test_leaving_node_does_not_refute() -> None:
    m = new_node()
    m.leave(1.0)
    state, inc = self_state(m)
    assert state is L and inc == 1
    m.receive_datagram(dead(1, name="me"), ("10.0.0.7", 7946), 2.0)
    m.receive_datagram(suspect(1, name="me"), ("10.0.0.7", 7946), 2.0)
    m.receive_datagram(suspect(0, name="me"), ("10.0.0.7", 7946), 2.0)  # stale too
    assert self_state(m) == (L, 1)
    assert m.stats["refuted_suspicions"] == 0
    assert m.stats["stale_claims_answered"] == 0


def test_restarted_node_comes_back_above_old_incarnation_via_push_pull() -> None:
    """A restarted node (incarnation 0) learns from a seed that it is dead at 5: it refutes at 6."""
    seed = new_node("seed", host="10.0.0.2")
    seed.receive_datagram(alive(5, name="me"), X_ADDR, 0.0)
    seed.receive_datagram(dead(5, name="me"), X_ADDR, 0.0)
    me = new_node("me")
    me.join([("10.0.0.2", 7946)], 1.0)
    [(req, addr)] = me.streams_to_open()
    assert addr == ("10.0.0.2", 7946)
    reply = seed.handle_stream_request(req, ("10.0.0.1", 7946), 1.0)
    assert reply is not None
    me.receive_stream_reply(reply, addr, 1.1)
    assert self_state(me) == (A, 6)
    # The refutation is queued for gossip; once the seed hears it, it holds us alive at 6.
    me.handle_timer(me.get_timer() or 2.0)
    for data, _ in me.datagrams_to_send(2.0):
        seed.receive_datagram(data, ("10.0.0.1", 7946), 2.0)
    for _ in range(20):
        t = me.get_timer()
        assert t is not None
        me.handle_timer(t)
        for data, _ in me.datagrams_to_send(t):
            seed.receive_datagram(data, ("10.0.0.1", 7946), t)
    got = seed.member("me")
    assert got is not None and (got.state, got.incarnation) == (A, 6)
