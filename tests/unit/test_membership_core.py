"""Leave, reaping, metadata bound, push-pull, delegate plumbing, bad input, profiles."""

from __future__ import annotations

import random

import pytest

from meshnet.membership import (
    MAX_META_BYTES,
    PROFILES,
    MemberDead,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    Membership,
    MembershipConfig,
    MemberState,
    NodeMeta,
)
from meshnet.membership.messages import (
    Alive,
    Dead,
    DecodeCache,
    Ping,
    Suspect,
    User,
    decode_packet,
    make_compound,
)

A, S, D, L = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT


def addr(i: int) -> tuple[str, int]:
    return (f"10.0.0.{i}", 7946)


def mk(i: int, cfg: MembershipConfig | None = None, **kw: object) -> Membership:
    return Membership(
        cfg or MembershipConfig.lan(), NodeMeta(f"n{i}", addr(i)), random.Random(i), 0.0,
        **kw,  # type: ignore[arg-type]
    )


def alive(i: int, inc: int = 0) -> bytes:
    meta = NodeMeta(f"n{i}", addr(i))
    return Alive(inc, meta, meta.encode()).encode()


def events(m: Membership) -> list[object]:
    out = []
    while (ev := m.next_event()) is not None:
        out.append(ev)
    return out


def push_pull(a: Membership, b: Membership, now: float) -> None:
    """Complete every stream ``a`` wants to open, against ``b``."""
    for req, dst in a.streams_to_open():
        assert dst == b.local().addr
        reply = b.handle_stream_request(req, a.local().addr, now)
        assert reply is not None
        a.receive_stream_reply(reply, dst, now)


# ---------------------------------------------------------------- metadata


def test_meta_roundtrip_and_bound() -> None:
    m = NodeMeta("n1", ("10.0.0.1", 7946), {"zone": "a"}, {"pub": b"\x01" * 32, "cap": 7})
    assert NodeMeta.decode(m.encode()) == m
    big = NodeMeta("n1", ("10.0.0.1", 7946), {"x": "y" * MAX_META_BYTES}, {})
    with pytest.raises(ValueError):
        big.encode()
    with pytest.raises(ValueError):
        Membership(MembershipConfig.lan(), big, random.Random(1), 0.0)
    exact = NodeMeta("n1", ("10.0.0.1", 7946), {"x": "y" * 450}, {})
    assert len(exact.encode()) <= MAX_META_BYTES


def test_meta_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        NodeMeta("n1", ("h", 1), {}, {"x": 1.5}).encode()  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        NodeMeta("", ("h", 1)).encode()


def test_update_meta_reannounces_with_higher_incarnation() -> None:
    a, b = mk(1), mk(2)
    a.receive_datagram(alive(2), addr(2), 0.0)
    b.receive_datagram(alive(1), addr(1), 0.0)
    events(b)
    a.update_meta(NodeMeta("n1", addr(1), {"role": "db"}), 1.0)
    assert a.local().incarnation == 1
    a.handle_timer(a.get_timer() or 1.2)
    for data, _ in a.datagrams_to_send(1.2):
        b.receive_datagram(data, addr(1), 1.2)
    got = b.member("n1")
    assert got is not None and got.incarnation == 1 and got.meta.labels == {"role": "db"}
    assert [type(e).__name__ for e in events(b)] == ["MemberUpdated"]


# ---------------------------------------------------------------- join / push-pull / leave


def test_join_via_push_pull_learns_everyone() -> None:
    seed = mk(1)
    for j in range(3, 8):
        seed.receive_datagram(alive(j), addr(j), 0.0)
    joiner = mk(2)
    joiner.join([addr(1)], 0.5)
    push_pull(joiner, seed, 0.5)
    names = {m.name for m in joiner.members()}
    assert names == {f"n{j}" for j in range(1, 8)}
    assert seed.member("n2") is not None and seed.member("n2").state is A  # type: ignore[union-attr]
    assert joiner.stats["push_pulls_completed"] == 1 and seed.stats["push_pulls_served"] == 1
    assert sum(isinstance(e, MemberJoined) for e in events(joiner)) == 6
    # The joiner does not re-gossip the members it just learned (no join storm) ...
    assert joiner.pending_broadcasts() == 1  # only its own alive
    # ... while the seed gossips the newcomer.
    assert seed.pending_broadcasts() >= 1


def test_join_failure_is_counted() -> None:
    j = mk(2)
    j.join([addr(1), addr(3)], 0.0)
    assert len(j.streams_to_open()) == 2
    j.stream_failed(addr(1), 1.0)
    assert j.stats["push_pulls_failed"] == 1


def test_periodic_push_pull_and_concurrency_cap() -> None:
    cfg = MembershipConfig.lan().replace(push_pull_interval=1.0, max_push_pull_concurrent=2)
    m = mk(1, cfg)
    for j in range(2, 40):
        m.receive_datagram(alive(j), addr(j), 0.0)
    opened: list[tuple[bytes, tuple[str, int]]] = []
    t = 0.0
    while t < 200:
        t = m.get_timer() or t + 1
        m.handle_timer(t)
        m.datagrams_to_send(t)
        opened += m.streams_to_open()  # never answered: they stay in flight until timeout
    assert opened
    assert m.stats["push_pulls_skipped"] > 0  # the cap held them back
    assert m.stats["push_pulls_failed"] >= len(opened) - 2  # timed out, slots freed


def test_push_pull_scale() -> None:
    cfg = MembershipConfig.lan()
    assert cfg.push_pull_scaled(10) == 30
    assert cfg.push_pull_scaled(32) == 30
    assert cfg.push_pull_scaled(64) == 60
    assert cfg.push_pull_scaled(1000) == 180  # memberlist pushPullScale: ceil(log2(n/32)) + 1


def test_leave_announces_left_not_dead() -> None:
    a, b = mk(1), mk(2)
    a.receive_datagram(alive(2), addr(2), 0.0)
    b.receive_datagram(alive(1), addr(1), 0.0)
    events(b)
    a.leave(5.0)
    assert a.local().state is L and a.local().incarnation == 1
    t = a.get_timer()
    assert t is not None
    a.handle_timer(t)
    pkts = a.datagrams_to_send(t)
    assert any(isinstance(x, Dead) for d, _ in pkts for x in decode_packet(d))
    # Whatever the gossip target, deliver to b:
    for d, _ in pkts:
        b.receive_datagram(d, addr(1), t)
    got = b.member("n1")
    assert got is not None and (got.state, got.incarnation) == (L, 1)
    evs = events(b)
    assert [type(e) for e in evs] == [MemberLeft]
    assert b.stats["deaths_declared"] == 0  # never counted as a failure


def test_leave_then_rejoin_comes_back_higher() -> None:
    a = mk(1)
    a.leave(1.0)
    a.join([addr(2)], 2.0)
    assert a.local().state is A and a.local().incarnation == 2


def test_dead_and_left_are_reaped_then_tombstoned() -> None:
    cfg = MembershipConfig.lan().replace(reap_after=60.0)
    m = mk(1, cfg)
    m.receive_datagram(alive(2), addr(2), 0.0)
    m.receive_datagram(alive(3), addr(3), 0.0)
    m.receive_datagram(Dead(0, "n2", "n9").encode(), addr(9), 10.0)
    m.receive_datagram(Dead(0, "n3", "n3").encode(), addr(3), 20.0)
    events(m)
    t = 0.0
    while t < 79.0:
        t = min(m.get_timer() or 79.0, 79.0)
        m.handle_timer(t)
        m.datagrams_to_send(t)
    assert m.member("n2") is None and m.member("n3") is not None
    t = 0.0
    while t < 81.0:
        t = min(m.get_timer() or 81.0, 81.0)
        m.handle_timer(t)
        m.datagrams_to_send(t)
    assert m.member("n3") is None
    evs = [e for e in events(m) if isinstance(e, MemberReaped)]
    assert sorted(e.member.name for e in evs) == ["n2", "n3"]
    assert m.stats["reaped"] == 2
    # A stale alive from a lagging peer does not resurrect a reaped member ...
    m.receive_datagram(alive(2, inc=0), addr(5), 90.0)
    assert m.member("n2") is None
    # ... a real rejoin (higher incarnation) does.
    m.receive_datagram(alive(2, inc=1), addr(2), 91.0)
    assert m.member("n2") is not None and m.member("n2").state is A  # type: ignore[union-attr]


def test_suspicion_timeout_declares_dead_event() -> None:
    cfg = MembershipConfig.lan()
    m = mk(1, cfg)
    m.receive_datagram(alive(2), addr(2), 0.0)
    from meshnet.membership.messages import Suspect

    m.receive_datagram(Suspect(0, "n2", "n3").encode(), addr(3), 1.0)
    t = 1.0
    while m.member("n2").state is not D and t < 100:  # type: ignore[union-attr]
        t = m.get_timer() or t + 1
        m.handle_timer(t)
        m.datagrams_to_send(t)
    assert any(isinstance(e, MemberDead) for e in events(m))


# ---------------------------------------------------------------- delegate


class Recorder:
    def __init__(self, name: str) -> None:
        self.name = name
        self.messages: list[bytes] = []
        self.merged: list[tuple[bytes, bool]] = []
        self.outbox = [f"hello from {name}".encode()]

    def get_broadcasts(self, overhead: int, limit_bytes: int) -> list[bytes]:
        out, self.outbox = self.outbox, []
        return out

    def notify_message(self, data: bytes) -> None:
        self.messages.append(data)

    def local_state(self, join: bool) -> bytes:
        return f"state of {self.name} join={join}".encode()

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        self.merged.append((data, join))


def test_delegate_plumbing() -> None:
    da, db = Recorder("a"), Recorder("b")
    a = mk(1, delegate=da)
    b = mk(2, delegate=db)
    b.join([addr(1)], 0.0)
    push_pull(b, a, 0.0)
    assert da.merged == [(b"state of b join=True", True)]
    assert db.merged == [(b"state of a join=False", False)]
    # User messages ride in spare room of gossip packets.
    t = a.get_timer()
    assert t is not None
    a.handle_timer(t)
    for d, _ in a.datagrams_to_send(t):
        b.receive_datagram(d, addr(1), t)
    assert db.messages == [b"hello from a"]


class Filler:
    """A store-like delegate: what it hands out counts as sent (as the store's DeltaQueue), so
    a message the core then drops is a transmission lost."""

    def __init__(self, n: int, size: int) -> None:
        self.outbox = [bytes([i % 256]) * size for i in range(n)]
        self.taken: list[bytes] = []

    def get_broadcasts(self, overhead: int, limit_bytes: int) -> list[bytes]:
        out: list[bytes] = []
        while self.outbox and len(self.outbox[0]) + overhead <= limit_bytes:
            limit_bytes -= len(self.outbox[0]) + overhead
            out.append(self.outbox.pop(0))
        self.taken += out
        return out

    def notify_message(self, data: bytes) -> None:
        pass

    def local_state(self, join: bool) -> bytes:
        return b""

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        pass


def test_every_delegate_message_taken_is_sent_when_they_fill_the_packet() -> None:
    """The core tells the delegate each message's framing, so a queue that fills the packet to
    the byte loses nothing (the store's queue was told 0 and lost the last deltas of a burst)."""
    filler, got = Filler(60, 97), Recorder("b")
    a = mk(1, delegate=filler)
    b = mk(2, delegate=got)
    got.outbox = []
    a.receive_datagram(alive(2), addr(2), 0.0)
    t = 0.0
    while filler.outbox and t < 30:
        t = a.get_timer() or t + 0.1
        a.handle_timer(t)
        for d, dst in a.datagrams_to_send(t):
            if dst == addr(2):
                b.receive_datagram(d, addr(1), t)
    assert not filler.outbox and len(filler.taken) == 60
    assert a.stats["user_dropped"] == 0
    assert sorted(got.messages) == sorted(filler.taken)


def test_gossip_to_a_dead_member_carries_no_delegate_messages() -> None:
    """memberlist gossips to the recently dead so they can refute; a store write sent there is
    a transmission the live members never get."""
    filler = Filler(10_000, 40)
    a = mk(1, delegate=filler)
    for i in (2, 3, 4):
        a.receive_datagram(alive(i), addr(i), 0.0)
    a.receive_datagram(Dead(0, "n3", "n2").encode(), addr(2), 0.1)
    assert a.member("n3").state is D  # type: ignore[union-attr]
    to_dead = to_live = 0
    t = 0.1
    while t < 5.0:
        t = a.get_timer() or t + 0.1
        a.handle_timer(t)
        for d, dst in a.datagrams_to_send(t):
            users = [m for m in decode_packet(d) if isinstance(m, User)]
            if dst == addr(3):
                to_dead += 1
                assert users == []
            else:
                to_live += len(users)
    assert to_dead > 0 and to_live > 0  # the dead member was gossiped to, with no user part


# ---------------------------------------------------------------- bad input, profiles


def test_bad_packets_are_counted_never_raised() -> None:
    m = mk(1)
    for junk in (b"", b"\x00", b"\x07\x02\x00", b"\xff\xff", b"\x04\x92\x01\xc4\x01x", b"\x0c"):
        m.receive_datagram(junk, addr(2), 0.0)
    assert m.stats["bad_packets"] == 6
    assert m.handle_stream_request(b"\x06garbage", addr(2), 0.0) is None
    m.receive_stream_reply(b"junk", addr(2), 0.0)
    assert m.stats["push_pulls_bad"] == 2


@pytest.mark.parametrize(
    ("parts", "kept"),
    [
        ([Suspect(1, "a", "b").encode(), Dead(2, "c", "d").encode()], True),  # gossip
        ([Suspect(1, "a", "b").encode()], True),  # one bare broadcast
        ([Ping(7, "a", "b").encode(), Suspect(1, "a", "b").encode()], False),  # unique to a probe
        ([b"\x63junk", Suspect(1, "a", "b").encode()], True),  # unknown type skipped
    ],
)
def test_decode_cache_keeps_packets_of_broadcasts_only(parts: list[bytes], kept: bool) -> None:
    cache = DecodeCache()
    pkt = make_compound(parts)
    got = cache.decode(pkt)
    assert list(got) == decode_packet(pkt)  # what decoding says, cached or not
    assert (pkt in cache.packets) is kept
    if kept:
        assert cache.decode(bytes(bytearray(pkt))) is got  # equal bytes: decoded once


def test_profiles() -> None:
    assert set(PROFILES) == {"lan", "lan-fast", "wan"}
    lan = MembershipConfig.profile("lan")
    assert (lan.probe_interval, lan.probe_timeout, lan.retransmit_mult) == (1.0, 0.5, 4)
    assert (lan.gossip_interval, lan.gossip_nodes, lan.push_pull_interval) == (0.2, 3, 30.0)
    assert (lan.indirect_checks, lan.awareness_max_multiplier, lan.udp_payload) == (3, 8, 1400)
    fast = MembershipConfig.profile("lan-fast")
    assert fast.probe_interval < lan.probe_interval and fast.reap_after == 30.0
    wan = MembershipConfig.profile("wan")
    assert (wan.probe_interval, wan.probe_timeout, wan.suspicion_mult) == (5.0, 3.0, 6.0)
    assert (wan.push_pull_interval, wan.gossip_interval, wan.gossip_nodes) == (60.0, 0.5, 4)
    with pytest.raises(ValueError):
        MembershipConfig.profile("nope")
    with pytest.raises(ValueError):
        MembershipConfig(probe_timeout=2.0, probe_interval=1.0)


def test_members_sorted_and_includes_self() -> None:
    m = mk(5)
    for j in (9, 2, 7):
        m.receive_datagram(alive(j), addr(j), 0.0)
    assert [x.name for x in m.members()] == ["n2", "n5", "n7", "n9"]
    assert m.num_alive() == 4
    assert m.local().name == "n5"
