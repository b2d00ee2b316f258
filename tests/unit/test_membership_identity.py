"""Membership with identity (#13): only a node can say it is alive or that it left; claims about
it beyond what it signed are refused; members without a good certificate are never listed."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from meshnet.crypto.certs import (
    CaCert,
    NodeKeys,
    generate_node_keys,
    make_ca,
    sign_node,
    sign_revocation,
)
from meshnet.crypto.trust import ALIVE_DOMAIN, Trust
from meshnet.membership import (
    MAX_CLAIM_INCARNATION,
    MemberReaped,
    Membership,
    MembershipConfig,
    MemberState,
    NodeMeta,
)
from meshnet.membership.core import HELD_TTL, MAX_HELD
from meshnet.membership.messages import (
    Alive,
    AliveToken,
    Dead,
    PushPull,
    Suspect,
    alive_payload,
    decode_packet,
    decode_push_pull,
)

T0 = 1_800_000_000  # Unix time the simulated clock starts at
A, S, D, L = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT


@dataclass
class Pki:
    ca_key: object
    ca: CaCert

    def issue(self, name: str, days: int = 30, roles: tuple[str, ...] = ("admin",),
              now: int = T0) -> tuple[NodeKeys, Trust]:
        keys = generate_node_keys()
        cert = sign_node(self.ca_key, self.ca, name, list(roles), {}, keys.sign_pub,  # type: ignore[arg-type]
                         keys.dp_pub, now, days)
        return keys, Trust(self.ca, name, keys, cert, 0.0, wall_offset=T0)


@pytest.fixture(scope="module")
def pki() -> Pki:
    key, ca = make_ca("test-ca", T0 - 10 * 86_400, 365)
    return Pki(key, ca)


def addr(i: int) -> tuple[str, int]:
    return (f"10.0.0.{i}", 7946)


def node(pki: Pki, i: int) -> Membership:
    _, trust = pki.issue(f"n{i}")
    return Membership(MembershipConfig.lan(), NodeMeta(f"n{i}", addr(i)), random.Random(i), 0.0,
                      trust=trust)


def exchange(a: Membership, b: Membership, now: float) -> None:
    """Complete every push-pull ``a`` wants to open, against ``b``."""
    for req, dst in a.streams_to_open():
        assert dst == b.local().addr
        reply = b.handle_stream_request(req, a.local().addr, now)
        assert reply is not None
        a.receive_stream_reply(reply, dst, now)


def settle(nodes: list[Membership], now: float) -> None:
    """Complete every push-pull any node wants to open (certificate fetches included)."""
    by_addr = {m.local().addr: m for m in nodes}
    while True:
        work = [(m, req, dst) for m in nodes for req, dst in m.streams_to_open()]
        if not work:
            return
        for m, req, dst in work:
            reply = by_addr[dst].handle_stream_request(req, m.local().addr, now)
            assert reply is not None
            m.receive_stream_reply(reply, dst, now)


def joined(pki: Pki, n: int) -> list[Membership]:
    nodes = [node(pki, i) for i in range(1, n + 1)]
    for m in nodes[1:]:
        m.join([addr(1)], 0.0)
        settle(nodes, 0.0)
    for m in nodes[1:]:  # everyone learns everyone from n1; certificates it lacks it fetches
        m._start_push_pull(m._nodes["n1"], 1.0)
        settle(nodes, 1.0)
    return nodes


def gossip(src: Membership, dst: Membership, now: float) -> None:
    for data, to in src.datagrams_to_send(now):
        if to == dst.local().addr:
            dst.receive_datagram(data, src.local().addr, now)


def test_join_carries_certificates_and_signed_rows(pki: Pki) -> None:
    n1, n2, n3, n4 = joined(pki, 4)
    for m in (n1, n2, n3, n4):
        assert sorted(x.name for x in m.members() if x.state is A) == ["n1", "n2", "n3", "n4"]
    # a request carries only its sender's own signature; a reply signs what the requester
    # lacks, and sends the certificates of members it does not know
    req = decode_push_pull(n1._encode_state(False, 2.0))
    sigs = {r.name: r.alive_sig for r in req.states}
    assert len(sigs["n1"]) == 64 and sigs["n2"] == sigs["n3"] == sigs["n4"] == b""
    assert len(req.certs) == 1  # unasked: our own certificate only
    lacking = PushPull(False, [r for r in req.states if r.name != "n3"], b"")
    reply = decode_push_pull(n2._encode_state(False, 2.0, peer=lacking))
    sigs = {r.name: r.alive_sig for r in reply.states}
    # n3 is news to the requester; the requester's own row comes back with every proof (after
    # a restart it must learn the life it forgot); the responder signs its own; n4 needs none
    assert all(len(sigs[n]) == 64 for n in ("n1", "n2", "n3")) and sigs["n4"] == b"", sigs
    assert len(reply.certs) == 2  # n2's own and n3's


def test_an_alive_signed_by_someone_else_is_refused(pki: Pki) -> None:
    n1, _n2 = joined(pki, 2)
    forged_meta = NodeMeta("n2", ("10.6.6.6", 7946))
    for sig in (b"", b"\x00" * 64, n1._trust.sign(ALIVE_DOMAIN,
                                                  alive_payload(2**62, forged_meta.encode()))):
        n1.receive_datagram(Alive(2**62, forged_meta, forged_meta.encode(), sig).encode(),
                            addr(9), 1.0)
    m = n1.member("n2")
    assert m is not None and m.addr == addr(2) and m.incarnation < 10
    assert n1.stats["claims_unsigned"] >= 2


def test_forged_suspect_and_dead_above_what_the_node_signed_are_refused(pki: Pki) -> None:
    n1, n2 = joined(pki, 2)
    inc = n1.member("n2").incarnation  # type: ignore[union-attr]
    for msg in (Suspect(2**63 - 1, "n2", "n9"), Dead(2**63 - 1, "n2", "n9"),
                Suspect(inc + 1, "n2", "n9"), Dead(inc + 1, "n2", "n2")):
        n1.receive_datagram(msg.encode(), addr(9), 1.0)
    m = n1.member("n2")
    assert m is not None and m.state is A and m.incarnation == inc
    assert n1.stats["claims_above_signed"] == 3 and n1.stats["claims_unsigned"] == 1
    # sent to n2 itself, nothing pushes it to refute above the bound
    for msg in (Suspect(MAX_CLAIM_INCARNATION, "n2", "n9"), Dead(2**63 - 1, "n2", "n9")):
        n2.receive_datagram(msg.encode(), addr(9), 1.0)
    assert n2.incarnation < 10 and n2.stats["claims_above_signed"] == 2


def test_a_real_suspicion_is_still_refuted_and_the_refutation_verifies(pki: Pki) -> None:
    n1, n2 = joined(pki, 2)
    inc = n2.incarnation
    n2.receive_datagram(Suspect(inc, "n2", "n1").encode(), addr(1), 1.0)
    assert n2.incarnation == inc + 1
    n1.receive_datagram(Suspect(inc, "n2", "n1").encode(), addr(1), 1.0)
    assert n1.member("n2").state is S  # type: ignore[union-attr]
    gossip(n2, n1, 1.1)  # the refutation, signed by n2
    assert n1.member("n2").state is A and n1.member("n2").incarnation == inc + 1  # type: ignore[union-attr]


def test_a_signed_leave_counts_and_a_forged_one_does_not(pki: Pki) -> None:
    n1, _n2, n3 = joined(pki, 3)
    inc = n1.member("n3").incarnation  # type: ignore[union-attr]
    n1.receive_datagram(Dead(inc + 1, "n3", "n3").encode(), addr(9), 1.0)  # unsigned
    assert n1.member("n3").state is A  # type: ignore[union-attr]
    n3.leave(2.0)
    gossip(n3, n1, 2.0)
    n3.handle_timer(2.5)
    gossip(n3, n1, 2.5)
    assert n1.member("n3").state is L  # type: ignore[union-attr]


def test_an_alive_before_its_certificate_is_held_then_applied(pki: Pki) -> None:
    n1, _n2 = joined(pki, 2)
    n4 = node(pki, 4)  # n1 has never heard of n4 or its certificate
    alive = n4._alive_msg()
    n1.receive_datagram(alive, addr(2), 1.0)  # gossiped by n2, say
    assert n1.member("n4") is None and n1.stats["alives_held"] == 1
    # n1 asks n4 itself for its certificate, in a push-pull, and applies the held alive
    streams = n1.streams_to_open()
    assert [dst for _, dst in streams] == [addr(4)]
    assert decode_push_pull(streams[0][0]).want == ["n4"]
    reply = n4.handle_stream_request(streams[0][0], addr(1), 1.1)
    assert reply is not None
    n1.receive_stream_reply(reply, addr(4), 1.1)
    assert n1.member("n4") is not None and n1.member("n4").state is A  # type: ignore[union-attr]


def test_alives_held_are_bounded_and_given_up(pki: Pki) -> None:
    """Alives of names no certificate arrives for (garbage signatures: nobody could verify
    them) are held at most MAX_HELD at a time, never applied, and given up after HELD_TTL, so
    they neither keep their slots nor ride in every push-pull's `want` for good."""
    n1, _n2 = joined(pki, 2)
    now = 1.0

    def junk(i: int, inc: int = 1) -> bytes:
        meta = NodeMeta(f"x{i}", (f"10.9.{i >> 8}.{i & 255}", 7946))
        return Alive(inc, meta, meta.encode(), b"\x01" * 64).encode()

    for i in range(MAX_HELD + 10):
        n1.receive_datagram(junk(i), addr(2), now)
    n1.streams_to_open()
    assert len(n1._held) == MAX_HELD and n1.stats["alives_held_dropped"] == 10
    assert sorted(m.name for m in n1.members()) == ["n1", "n2"]  # none applied
    want = decode_push_pull(n1._encode_state(False, now)).want
    assert "x0" in want and len(want) == MAX_HELD
    # a newer alive of a held name replaces it, in place: it is still given up on time
    n1.receive_datagram(junk(0, inc=5), addr(2), now + HELD_TTL / 2)
    assert n1._held["x0"][0].incarnation == 5
    n1.handle_timer(now + HELD_TTL + n1.config.reconnect_interval + 1)
    assert n1._held == {} and n1.stats["alives_held_expired"] == MAX_HELD
    assert decode_push_pull(n1._encode_state(False, now + HELD_TTL + 20)).want == []
    # and a real newcomer's alive, gossiped before its certificate, is held again and applied
    n4 = node(pki, 4)
    later = now + HELD_TTL + 20
    n1.receive_datagram(n4._alive_msg(), addr(2), later)
    assert list(n1._held) == ["n4"]
    for req, dst in n1.streams_to_open():
        if dst == addr(4):
            reply = n4.handle_stream_request(req, addr(1), later)
            assert reply is not None
            n1.receive_stream_reply(reply, dst, later)
    assert n1.member("n4") is not None and n1.member("n4").state is A  # type: ignore[union-attr]


def test_other_ca_wrong_name_expired_never_listed(pki: Pki) -> None:
    n1, _n2 = joined(pki, 2)
    other_key, other_ca = make_ca("other", T0 - 10, 365)
    rogue = Pki(other_key, other_ca)
    candidates = []
    _, t = rogue.issue("n5")
    candidates.append(Membership(MembershipConfig.lan(), NodeMeta("n5", addr(5)),
                                 random.Random(5), 0.0, trust=t))
    # a certificate naming n7, used by a node calling itself n6
    _keys, _t7 = pki.issue("n7")
    t6 = Trust.__new__(Trust)
    t6.__dict__.update(_t7.__dict__)
    t6.name = "n6"
    candidates.append(Membership(MembershipConfig.lan(), NodeMeta("n6", addr(6)),
                                 random.Random(6), 0.0, trust=t6))
    _, t8 = pki.issue("n8", days=1, now=T0 - 86_400 + 1)  # expires 1 s into the run
    candidates.append(Membership(MembershipConfig.lan(), NodeMeta("n8", addr(8)),
                                 random.Random(8), 0.0, trust=t8))
    for c in candidates:
        c.join([addr(1)], 5.0)
        for req, _ in c.streams_to_open():
            n1.handle_stream_request(req, c.local().addr, 5.0)
        n1.receive_datagram(c._alive_msg(), c.local().addr, 5.0)
    assert sorted(m.name for m in n1.members()) == ["n1", "n2"]


def test_revocation_and_expiry_drop_a_member(pki: Pki) -> None:
    n1, _n2, n3 = joined(pki, 3)
    rev = sign_revocation(pki.ca_key, pki.ca, "n3", None, T0 + 100)  # type: ignore[arg-type]
    assert n1._trust.learn_revocation(rev.raw) is not None
    assert n1.drop("n3", 200.0)
    assert n1.member("n3") is None
    evs = []
    while (ev := n1.next_event()) is not None:
        evs.append(ev)
    assert any(isinstance(e, MemberReaped) and e.member.name == "n3" for e in evs)
    # its alive no longer counts
    n1.receive_datagram(n3._alive_msg(), addr(3), 201.0)
    assert n1.member("n3") is None
    # expiry: n2's certificate runs out; the periodic check drops it
    n1.handle_timer(31 * 86_400.0)
    assert n1.member("n2") is None


def test_push_pull_certificates_on_request_and_join(pki: Pki) -> None:
    n1, _n2, _n3 = joined(pki, 3)
    join = decode_push_pull(node(pki, 9)._encode_state(True, 1.0))
    reply = decode_push_pull(n1._encode_state(False, 1.0, peer=join))
    assert len(reply.certs) == 3  # a joiner gets every member's certificate
    everyone = decode_push_pull(n1._encode_state(False, 1.0)).states
    ask = PushPull(False, everyone, b"", certs=[], want=["n3"])
    reply = decode_push_pull(n1._encode_state(False, 1.0, peer=ask))
    assert len(reply.certs) == 2  # ours, and n3's as asked


def test_later_refutations_are_proved_by_chain_tokens(pki: Pki) -> None:
    n1, n2 = joined(pki, 2)
    sent: list[bytes] = []

    def refute(inc: int, now: float) -> None:
        n2.receive_datagram(Suspect(inc, "n2", "n1").encode(), addr(1), now)
        out = [d for d, _ in n2.datagrams_to_send(now)]
        sent.extend(out)
        for d in out:
            n1.receive_datagram(d, addr(2), now)

    def kinds() -> set[type]:
        return {type(m) for d in sent for m in decode_packet(d)}

    for k in range(3):  # refutations are 16-byte tokens of the chain n2's alive committed to
        inc = n2.incarnation
        n1.receive_datagram(Suspect(inc, "n2", "n1").encode(), addr(1), 2.0 + k)
        assert n1.member("n2").state is S  # type: ignore[union-attr]
        refute(inc, 2.0 + k)
        assert n1.member("n2").state is A  # type: ignore[union-attr]
        assert n1.member("n2").incarnation == inc + 1  # type: ignore[union-attr]
    assert AliveToken in kinds() and Alive not in kinds()  # tokens only, 16 bytes each
    assert n1.stats["claims_unsigned"] == 0
    # a forged token, and one far ahead of the chain, are refused
    inc = n2.incarnation
    n1.receive_datagram(AliveToken(inc + 1, "n2", b"\x00" * 16).encode(), addr(9), 9.0)
    n1.receive_datagram(AliveToken(inc + 5000, "n2", b"\x01" * 16).encode(), addr(9), 9.0)
    assert n1.member("n2").incarnation == inc  # type: ignore[union-attr]
    assert n1.stats["claims_unsigned"] == 2


def test_a_token_skipping_incarnations_still_verifies(pki: Pki) -> None:
    n1, n2 = joined(pki, 2)
    for _ in range(4):  # refutations n1 never hears of
        n2.receive_datagram(Suspect(n2.incarnation, "n2", "n1").encode(), addr(1), 2.0)
        n2.datagrams_to_send(2.0)
    msg = n2._alive_msg()
    assert [type(m) for m in decode_packet(msg)] == [AliveToken]
    n1.receive_datagram(msg, addr(2), 3.0)
    assert n1.member("n2").incarnation == n2.incarnation  # type: ignore[union-attr]


def test_a_restarted_node_with_its_old_incarnation_and_metadata_keeps_its_chain(pki: Pki) -> None:
    """The chain's seed comes from the node's key, its incarnation and metadata: a node that
    restarts at the same ones (state lost) proves its refutations to holders of the old life."""
    n1, n2 = joined(pki, 2)
    trust = n2._trust
    again = Membership(MembershipConfig.lan(), NodeMeta("n2", addr(2)), random.Random(7), 5.0,
                       trust=trust)
    assert again._chain is not None and n2._chain is not None
    assert again._chain.anchor == n2._chain.anchor
    again.receive_datagram(Suspect(0, "n2", "n1").encode(), addr(1), 6.0)
    assert again.incarnation == 1
    msg = again._alive_msg()  # what its refutation gossips
    assert [type(m) for m in decode_packet(msg)] == [AliveToken]
    n1.receive_datagram(msg, addr(2), 6.0)
    assert n1.member("n2").incarnation == 1 and n1.stats["claims_unsigned"] == 0  # type: ignore[union-attr]
