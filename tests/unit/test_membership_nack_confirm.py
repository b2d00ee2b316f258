"""A failed probe's nacking helpers confirm the suspicion it raises (#17, config nacks_confirm).

Each helper whose own ping of the target went unanswered counts once, at the accuser only; the
suspicion then runs Lifeguard's shorter timeout. Nothing is gossiped in a helper's name.
"""

from __future__ import annotations

import random

from meshnet.membership import Membership, MembershipConfig, MemberState, NodeMeta
from meshnet.membership.lifeguard import suspicion_bounds, suspicion_timeout
from meshnet.membership.messages import (
    Ack,
    Alive,
    Dead,
    IndirectPing,
    Message,
    Nack,
    Ping,
    Suspect,
    decode_packet,
)

CFG = MembershipConfig.lan()
END = CFG.probe_interval + CFG.probe_grace  # an unanswered probe suspects this long after its ping
PEERS = 6  # n1 and five others: k = 2 applies (n - 2 >= k)
LO, HI = suspicion_bounds(CFG.suspicion_mult, CFG.suspicion_max_timeout_mult, PEERS, 1.0)
Addr = tuple[str, int]


def addr(i: int) -> Addr:
    return (f"10.0.0.{i}", 7946)


def node(cfg: MembershipConfig = CFG) -> Membership:
    m = Membership(cfg, NodeMeta("n1", addr(1)), random.Random(1), 0.0)
    for j in range(2, PEERS + 1):
        meta = NodeMeta(f"n{j}", addr(j))
        m.receive_datagram(Alive(0, meta, meta.encode()).encode(), addr(j), 0.0)
    while m.next_event():
        pass
    return m


def sent(m: Membership, now: float) -> list[tuple[list[Message], Addr]]:
    return [(decode_packet(d), a) for d, a in m.datagrams_to_send(now)]


def failed_probe(m: Membership, nack_from: list[int | Addr]) -> tuple[str, float, list[Addr]]:
    """Probe until a ping goes out, let it fail with nacks from the given helpers (an index into
    the helpers asked, or any address), and return (target, time of the suspicion, helpers)."""
    m.datagrams_to_send(0.0)
    ping: Ping | None = None
    t0 = 0.0
    while ping is None:
        t0 = m.get_timer()  # type: ignore[assignment]
        m.handle_timer(t0)
        ping = next((x for msgs, _ in sent(m, t0) for x in msgs if isinstance(x, Ping)), None)
    m.handle_timer(t0 + CFG.probe_timeout)
    helpers = [a for msgs, a in sent(m, t0 + CFG.probe_timeout)
               if any(isinstance(x, IndirectPing) for x in msgs)]
    assert len(helpers) == m.config.indirect_checks
    for h in nack_from:
        src = helpers[h] if isinstance(h, int) else h
        m.receive_datagram(Nack(ping.seq).encode(), src, t0 + 0.9)
    m.handle_timer(t0 + CFG.probe_interval)
    answer(m, ping.target, t0 + CFG.probe_interval)
    m.handle_timer(t0 + END)
    answer(m, ping.target, t0 + END)
    assert m.state_of(ping.target) is MemberState.SUSPECT
    return ping.target, t0 + END, helpers


def answer(m: Membership, target: str, now: float, silent: bool = True) -> None:
    """A healthy cluster around a silent target: every other member acks m's pings at once, and
    every helper asked about the target nacks (m's own health, which stretches its suspicion
    timers, stays perfect). Not ``silent``: the target acks too."""
    for msgs, dst in sent(m, now):
        for x in msgs:
            if isinstance(x, Ping) and (x.target != target or not silent):
                m.receive_datagram(Ack(x.seq).encode(), dst, now)
            elif isinstance(x, IndirectPing) and x.target == target:
                m.receive_datagram(Nack(x.seq).encode(), dst, now)


def state_at(m: Membership, target: str, t: float, silent: bool = True) -> MemberState | None:
    """Run m's timers up to t (see answer) and say how m holds the target."""
    while (due := m.get_timer()) is not None and due <= t:
        m.handle_timer(due)
        answer(m, target, due, silent)
    m.handle_timer(t)
    answer(m, target, t, silent)
    return m.state_of(target)


def test_k_nacking_helpers_take_the_suspicion_to_its_minimum() -> None:
    m = node()
    target, start, _ = failed_probe(m, [0, 1, 2])
    assert m.stats["nack_confirmations"] == CFG.suspicion_k  # counted up to k
    assert state_at(m, target, start + LO - 0.01) is MemberState.SUSPECT
    assert state_at(m, target, start + LO) is MemberState.DEAD
    assert m.stats["deaths_declared"] == 1


def test_one_nack_is_one_confirmation() -> None:
    m = node(CFG.replace(indirect_checks=1))
    target, start, _ = failed_probe(m, [0])
    assert m.stats["nack_confirmations"] == 1
    one = suspicion_timeout(1, CFG.suspicion_k, LO, HI)
    assert LO < one < HI
    assert state_at(m, target, start + one - 0.01) is MemberState.SUSPECT
    assert state_at(m, target, start + one) is MemberState.DEAD


def test_an_unhealthy_accuser_counts_no_nacks() -> None:
    """A helper that did not nack costs us a point of health (Lifeguard: the silence is more
    likely ours), and a member in poor health is made slower to accuse, never faster."""
    m = node()
    target, start, _ = failed_probe(m, [0, 1])
    assert m.health_score == 1
    assert m.stats["nack_confirmations"] == 0
    assert state_at(m, target, start + HI - 0.01) is MemberState.SUSPECT
    del start


def test_off_a_lone_suspicion_runs_the_maximum() -> None:
    m = node(CFG.replace(nacks_confirm=False))
    target, start, _ = failed_probe(m, [0, 1, 2])
    assert m.stats["nack_confirmations"] == 0
    assert state_at(m, target, start + HI - 0.01) is MemberState.SUSPECT
    assert state_at(m, target, start + HI) is MemberState.DEAD


def test_repeated_nacks_and_nacks_from_strangers_do_not_count() -> None:
    m = node()
    # The same helper three times (three nacks keep our health), and a member we did not ask:
    # one confirmation, not three.
    target, start, helpers = failed_probe(m, [0, 0, 0])
    stranger = next(addr(j) for j in range(2, PEERS + 1) if addr(j) not in helpers
                    and m.state_of(f"n{j}") is MemberState.ALIVE)
    assert m.stats["nack_confirmations"] == 1
    m2 = node()
    target2, start2, _ = failed_probe(m2, [stranger] * 3)  # our health is kept, even so
    assert m2.health_score == 0 and m2.stats["nack_confirmations"] == 0
    assert state_at(m2, target2, start2 + suspicion_timeout(1, 2, LO, HI)) is MemberState.SUSPECT
    del target, start


def test_nothing_is_gossiped_in_a_helpers_name() -> None:
    m = node()
    target, start, _ = failed_probe(m, [0, 1, 2])
    senders = set()
    t = start
    for _ in range(10):  # a few gossip rounds
        t += CFG.gossip_interval
        m.handle_timer(t)
        senders |= {x.sender for msgs, _ in sent(m, t) for x in msgs
                    if isinstance(x, Suspect) and x.node == target}
    assert senders == {"n1"}


def test_a_refutation_inside_the_minimum_still_wins() -> None:
    m = node()
    target, start, _ = failed_probe(m, [0, 1, 2])
    meta = NodeMeta(target, addr(int(target[1:])))
    m.receive_datagram(Alive(1, meta, meta.encode()).encode(), meta.addr, start + LO / 2)
    assert state_at(m, target, start + HI, silent=False) is MemberState.ALIVE
    assert m.stats["deaths_declared"] == 0


def test_helper_forwards_an_ack_until_past_the_origins_earliest_deadline() -> None:
    """A late ack vetoes the death of a slow member whose own ack to the origin was lost, so a
    helper forwards one that comes an ack window after the origin gave up."""
    h = node()
    h.receive_datagram(IndirectPing(80, "n3", addr(3), True).encode(), addr(2), 1.0)
    [ping] = [x for msgs, _ in sent(h, 1.0) for x in msgs if isinstance(x, Ping)]
    # The origin pinged at 0.5 and gave up at 0.5 + END = 2.0; at Lifeguard's minimum (1.5 s in
    # a small cluster) its deadline is 3.5: an ack at 3.2 still counts there.
    late = 3.2
    t = 1.0
    while (due := h.get_timer()) is not None and due <= late:
        h.handle_timer(due)
        h.datagrams_to_send(due)
        t = due
    assert t < late
    h.receive_datagram(Ack(ping.seq).encode(), addr(3), late)
    forwarded = [x for msgs, a in sent(h, late) if a == addr(2) for x in msgs
                 if isinstance(x, Ack)]
    assert forwarded == [Ack(80)]


def test_the_declarer_pushes_the_death_at_once() -> None:
    """Bare, to gossip_nodes live peers, at the moment of the declaration: not at the next
    gossip tick (everyone waits for it before rescheduling the dead member's tasks)."""
    m = node()
    target, start, _ = failed_probe(m, [0, 1, 2])
    state_at(m, target, start + LO - 0.01)
    m.handle_timer(start + LO)
    bare = [a for msgs, a in sent(m, start + LO)
            if len(msgs) == 1 and isinstance(msgs[0], Dead) and msgs[0].node == target]
    assert len(set(bare)) == len(bare) == CFG.gossip_nodes
    assert addr(int(target[1:])) not in bare
    assert m.stats["deaths_pushed"] == 1
