"""Probing: ping/ack, ping-req through k helpers, nacks, awareness, buddy system, round robin."""

from __future__ import annotations

import random

from meshnet.membership import Membership, MembershipConfig, MemberState, NodeMeta
from meshnet.membership.core import NACK_FRACTION
from meshnet.membership.messages import (
    Ack,
    Alive,
    IndirectPing,
    Message,
    Nack,
    Ping,
    Suspect,
    decode_packet,
)

CFG = MembershipConfig.lan()  # probe 1 s, timeout 0.5 s, 3 indirect checks, grace 0.5 s
# When an unanswered probe gives up and suspects: its interval plus the late-ack grace.
END = CFG.probe_interval + CFG.probe_grace


def addr(i: int) -> tuple[str, int]:
    return (f"10.0.0.{i}", 7946)


def node(i: int, peers: int = 0, now: float = 0.0, seed: int = 1) -> Membership:
    m = Membership(CFG, NodeMeta(f"n{i}", addr(i)), random.Random(seed), now)
    for j in range(1, peers + 1):
        if j != i:
            meta = NodeMeta(f"n{j}", addr(j))
            m.receive_datagram(Alive(0, meta, meta.encode()).encode(), addr(j), now)
    while m.next_event():
        pass
    return m


def sent(m: Membership, now: float) -> list[tuple[list[Message], tuple[str, int]]]:
    return [(decode_packet(d), a) for d, a in m.datagrams_to_send(now)]


def first(msgs: list[Message], cls: type) -> Message | None:
    return next((x for x in msgs if isinstance(x, cls)), None)


def start_probe(m: Membership) -> tuple[Ping, tuple[str, int], list[Message], float]:
    """Run timers until a ping goes out; return it, its destination, the packet, the time."""
    m.datagrams_to_send(0.0)
    for _ in range(50):
        t = m.get_timer()
        assert t is not None
        m.handle_timer(t)
        for msgs, a in sent(m, t):
            p = first(msgs, Ping)
            if p is not None:
                return p, a, msgs, t  # type: ignore[return-value]
    raise AssertionError("no probe sent")


def test_ping_ack_success_no_suspicion() -> None:
    m = node(1, peers=5)
    ping, dst, _, t0 = start_probe(m)
    assert ping.source == "n1" and ping.target == f"n{dst[0].rsplit('.', 1)[1]}"
    m.receive_datagram(Ack(ping.seq).encode(), dst, t0 + 0.01)
    # Past the timeout and the interval: no ping-req, no suspicion.
    m.handle_timer(t0 + 0.6)
    m.handle_timer(t0 + 1.0)
    assert all(first(msgs, IndirectPing) is None for msgs, _ in sent(m, t0 + 1.0))
    assert all(mb.state is MemberState.ALIVE for mb in m.members())
    assert m.stats["probe_failures"] == 0


def test_failed_probe_uses_k_helpers_then_suspects_and_tells_the_suspect() -> None:
    m = node(1, peers=6)
    ping, dst, _, t0 = start_probe(m)
    m.handle_timer(t0 + CFG.probe_timeout)
    out = sent(m, t0 + CFG.probe_timeout)
    reqs = [(first(msgs, IndirectPing), a) for msgs, a in out]
    reqs = [(r, a) for r, a in reqs if r is not None]
    assert len(reqs) == CFG.indirect_checks
    assert len({a for _, a in reqs}) == CFG.indirect_checks and dst not in {a for _, a in reqs}
    for r, _ in reqs:
        assert isinstance(r, IndirectPing)
        assert r.seq == ping.seq and r.target == ping.target and r.addr == dst and r.nack
    # Two of three helpers nack: one nack missing -> awareness +1.
    m.receive_datagram(Nack(ping.seq).encode(), reqs[0][1], t0 + 0.8)
    m.receive_datagram(Nack(ping.seq).encode(), reqs[1][1], t0 + 0.8)
    m.handle_timer(t0 + CFG.probe_interval)
    target = m.member(ping.target)
    assert target is not None and target.state is MemberState.ALIVE  # still in its grace
    sent(m, t0 + CFG.probe_interval)
    m.handle_timer(t0 + END)
    target = m.member(ping.target)
    assert target is not None and target.state is MemberState.SUSPECT
    assert m.health_score == 1
    out = sent(m, t0 + END)
    told = [msgs for msgs, a in out if a == dst and first(msgs, Suspect) is not None]
    assert told, "the suspect is told of its suspicion at once"


def test_failed_probe_with_all_nacks_does_not_hurt_health() -> None:
    m = node(1, peers=6)
    ping, _, _, t0 = start_probe(m)
    m.handle_timer(t0 + CFG.probe_timeout)
    helpers = [a for msgs, a in sent(m, t0 + 0.5) if first(msgs, IndirectPing)]
    for a in helpers:
        m.receive_datagram(Nack(ping.seq).encode(), a, t0 + 0.7)
    m.handle_timer(t0 + 1.0)
    m.handle_timer(t0 + END)
    assert m.health_score == 0
    assert m.member(ping.target).state is MemberState.SUSPECT  # type: ignore[union-attr]


def test_indirect_ack_counts_as_success() -> None:
    m = node(1, peers=6)
    ping, _, _, t0 = start_probe(m)
    m.handle_timer(t0 + 0.5)
    helper = next(a for msgs, a in sent(m, t0 + 0.5) if first(msgs, IndirectPing))
    m.receive_datagram(Ack(ping.seq).encode(), helper, t0 + 0.7)
    m.handle_timer(t0 + 1.0)
    assert m.member(ping.target).state is MemberState.ALIVE  # type: ignore[union-attr]


def test_probe_without_helpers_penalizes_health() -> None:
    m = node(1, peers=2)  # only n2: nobody to ask
    _ping, _, _, t0 = start_probe(m)
    m.handle_timer(t0 + 0.5)
    m.handle_timer(t0 + 1.0)
    m.handle_timer(t0 + END)
    assert m.health_score == 1


def test_awareness_stretches_probe_interval_and_timeout() -> None:
    m = node(1, peers=2)  # no helpers: each failed probe costs one point of health
    _, _, _, t0 = start_probe(m)
    m.handle_timer(t0 + CFG.probe_timeout)
    m.handle_timer(t0 + CFG.probe_interval)  # the next probe starts (at health 0)
    m.handle_timer(t0 + END)  # the first one fails at the end of its grace
    assert m.stats["probe_failures"] == 1 and m.health_score == 1
    m.datagrams_to_send(t0 + END)
    _, _, _, t1 = start_probe(m)  # started at health 1
    assert t1 == t0 + 2 * CFG.probe_interval
    probe = m._probe
    assert probe is not None
    assert probe.timeout_at == t1 + CFG.probe_timeout * 2
    assert m._probe_tick_at == t1 + CFG.probe_interval * 2
    m.receive_datagram(Ack(probe.seq).encode(), addr(2), t1 + 0.1)
    assert m.health_score == 0  # a successful probe gives one back


def test_helper_pings_target_forwards_ack() -> None:
    h = node(2, peers=4)
    h.receive_datagram(IndirectPing(77, "n3", addr(3), True).encode(), addr(1), 1.0)
    [(msgs, a)] = sent(h, 1.0)
    p = first(msgs, Ping)
    assert a == addr(3) and isinstance(p, Ping) and p.target == "n3" and p.source == "n2"
    h.receive_datagram(Ack(p.seq).encode(), addr(3), 1.1)
    [(msgs, a)] = sent(h, 1.1)
    ack = first(msgs, Ack)
    assert a == addr(1) and isinstance(ack, Ack) and ack.seq == 77
    assert first(msgs, Nack) is None


def test_helper_sends_nack_when_target_silent() -> None:
    h = node(2, peers=4)
    h.receive_datagram(IndirectPing(78, "n3", addr(3), True).encode(), addr(1), 1.0)
    sent(h, 1.0)
    assert h.get_timer() <= 1.0 + CFG.probe_timeout  # type: ignore[operator]
    h.handle_timer(1.0 + CFG.probe_timeout)
    nacks = [first(msgs, Nack) for msgs, a in sent(h, 1.5) if a == addr(1)]
    assert [x for x in nacks if x is not None] == [Nack(78)]


def test_ping_for_someone_else_is_dropped() -> None:
    m = node(1)
    m.receive_datagram(Ping(5, "n9", "n2").encode(), addr(2), 0.0)
    assert sent(m, 0.0) == [] and m.stats["misdirected_pings"] == 1


def test_ack_reply_to_ping() -> None:
    m = node(1)
    m.receive_datagram(Ping(5, "n1", "n2").encode(), addr(2), 0.0)
    [(msgs, a)] = sent(m, 0.0)
    assert a == addr(2) and msgs[0] == Ack(5)


def test_buddy_system_suspect_message_rides_first_with_the_ping() -> None:
    m = node(1, peers=2)  # only n2 to probe
    m.receive_datagram(Suspect(0, "n2", "n3").encode(), addr(3), 0.0)
    ping, dst, msgs, _ = start_probe(m)
    assert dst == addr(2)
    assert isinstance(msgs[0], Suspect) and msgs[0].node == "n2"
    assert msgs.index(ping) > 0


def test_suspect_refutes_and_acks_with_refutation() -> None:
    """The buddy packet makes the suspect refute; its ack carries the new alive."""
    s = node(2, peers=3)
    pkt_parts = [Suspect(0, "n2", "n1").encode(), Ping(9, "n2", "n1").encode()]
    from meshnet.membership.messages import make_compound

    s.receive_datagram(make_compound(pkt_parts), addr(1), 1.0)
    assert s.local().incarnation == 1
    out = sent(s, 1.0)
    # The accuser hears the refutation directly; a few random peers get it pushed at once.
    to_accuser = [msgs for msgs, a in out if a == addr(1)]
    assert any(isinstance(x, Alive) for msgs in to_accuser for x in msgs)
    assert any(msgs[0] == Ack(9) for msgs, _ in out)
    alives = [x for msgs, _ in out for x in msgs if isinstance(x, Alive) and x.node == "n2"]
    assert alives and all(x.incarnation == 1 for x in alives)


def test_randomized_round_robin_probes_each_member_once_per_round() -> None:
    n = 12
    m = node(1, peers=n)
    targets = []
    t = 0.0
    for _ in range(3 * (n - 1)):
        ping, dst, _, t = start_probe(m)
        targets.append(ping.target)
        m.receive_datagram(Ack(ping.seq).encode(), dst, t + 0.01)
    rounds = [targets[i : i + n - 1] for i in range(0, len(targets), n - 1)]
    for r in rounds:
        assert sorted(r) == sorted(f"n{j}" for j in range(2, n + 1))
    assert rounds[0] != rounds[1] or rounds[1] != rounds[2]  # shuffled each round


def test_new_member_inserted_at_random_position() -> None:
    positions = set()
    for seed in range(20):
        m = node(1, peers=10, seed=seed)
        meta = NodeMeta("new", addr(99))
        m.receive_datagram(Alive(0, meta, meta.encode()).encode(), addr(99), 0.0)
        ring = [x.name for x in m._ring]
        positions.add(ring.index("new"))
    assert len(positions) > 3


def test_late_ack_inside_the_grace_prevents_the_suspicion() -> None:
    m = node(1, peers=6)
    ping, dst, _, t0 = start_probe(m)
    m.handle_timer(t0 + CFG.probe_timeout)  # ping-reqs go out
    m.handle_timer(t0 + CFG.probe_interval)  # interval over: the probe waits out its grace
    assert m.member(ping.target).state is MemberState.ALIVE  # type: ignore[union-attr]
    m.receive_datagram(Ack(ping.seq).encode(), dst, t0 + CFG.probe_interval + 0.3)
    m.handle_timer(t0 + END + 0.01)
    assert m.member(ping.target).state is MemberState.ALIVE  # type: ignore[union-attr]
    assert m.stats["probe_failures"] == 0 and m.stats["suspicions_raised"] == 0
    assert m.health_score == 0


def test_ack_after_our_timeout_earns_no_health_credit() -> None:
    """Only a timely ack says we are healthy: a late one may be late because we are slow."""
    m = node(1, peers=6)
    m._awareness.apply_delta(2)
    ping, dst, _, t0 = start_probe(m)
    timeout = 3 * CFG.probe_timeout  # scaled by health 2
    m.handle_timer(t0 + timeout)
    m.receive_datagram(Ack(ping.seq).encode(), dst, t0 + timeout + 0.1)
    assert m.health_score == 2
    ping, dst, _, t1 = start_probe(m)
    m.receive_datagram(Ack(ping.seq).encode(), dst, t1 + 0.1)  # timely
    assert m.health_score == 1


def test_no_nack_at_all_withholds_the_suspicion_until_health_is_worst() -> None:
    """Silent helpers point at ourselves (Lifeguard): penalize our health, accuse nobody yet;
    a node cut off from everyone still suspects once its health is at its worst."""
    m = node(1, peers=6)
    ping, _, _, t0 = start_probe(m)
    m.handle_timer(t0 + CFG.probe_timeout)
    m.handle_timer(t0 + CFG.probe_interval)
    m.handle_timer(t0 + END)
    assert m.health_score == CFG.indirect_checks
    assert m.member(ping.target).state is MemberState.ALIVE  # type: ignore[union-attr]
    assert m.stats["suspicions_withheld"] == 1
    # Keep failing with silent helpers: health saturates, then the suspicion is raised.
    t = t0 + END
    for _ in range(40):
        if m.stats["suspicions_raised"]:
            break
        t = m.get_timer()  # type: ignore[assignment]
        m.handle_timer(t)
        m.datagrams_to_send(t)
    assert m.stats["suspicions_raised"] == 1
    assert m.health_score == CFG.awareness_max_multiplier - 1


def test_helper_nacks_before_the_origin_gives_up() -> None:
    h = node(2, peers=4)
    h.receive_datagram(IndirectPing(79, "n3", addr(3), True).encode(), addr(1), 1.0)
    sent(h, 1.0)
    # The origin sent this a probe timeout into its probe and listens until interval + grace.
    assert NACK_FRACTION * CFG.probe_timeout + CFG.probe_timeout < END
    at = 1.0 + NACK_FRACTION * CFG.probe_timeout

    def nacks(t: float) -> list[Message]:
        h.handle_timer(t)
        return [x for msgs, a in sent(h, t) if a == addr(1) for x in msgs if isinstance(x, Nack)]

    assert nacks(at - 0.01) == []
    assert nacks(at) == [Nack(79)]
