"""PeerSession: handshakes, rekeying without loss, simultaneous initiation, abuse limits,
cookies and the initiation timestamp rules.

Two sessions are wired through a fake link on virtual time (no sleeps, no sockets).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.crypto.handshake import HandshakeError, MessageType, derive_psk
from meshnet.crypto.identity import public_bytes
from meshnet.crypto.sa import RecordError, SpiAllocator, open_record, seal_record
from meshnet.crypto.session import (
    HandshakeFailed,
    HandshakeGuard,
    InboundChanged,
    KeepaliveRequested,
    PeerSession,
    SessionConfig,
    SessionEstablished,
    SessionEvent,
    SessionExpired,
)

KA = X25519PrivateKey.from_private_bytes(bytes([11]) * 32)
KB = X25519PrivateKey.from_private_bytes(bytes([22]) * 32)
KC = X25519PrivateKey.from_private_bytes(bytes([33]) * 32)
PSK = derive_psk(b"cluster key 1".ljust(32, b"."))
OTHER_PSK = derive_psk(b"cluster key 2".ljust(32, b"."))
T0 = 1_000.0

# The default timers scaled down ~60x, keeping their proportions (rekey well before the send
# deadline, confirm_timeout = rekey_timeout).
FAST = SessionConfig(
    rekey_after_time=2.0,
    reject_after_time=4.0,
    rekey_timeout=0.5,
    rekey_jitter=0.1,
    max_attempts=3,
    slow_retry_interval=2.0,
    grace_time=0.5,
    confirm_timeout=0.5,
)


def session(
    local: X25519PrivateKey,
    remote: X25519PrivateKey,
    *,
    seed: int = 1,
    config: SessionConfig = FAST,
    psk: bytes = PSK,
    guard: HandshakeGuard | None = None,
    peer: str = "",
) -> PeerSession:
    return PeerSession(
        local,
        public_bytes(remote),
        psk,
        rng=random.Random(seed),
        peer=peer or public_bytes(remote).hex()[:6],
        config=config,
        guard=guard,
    )


def drain_events(s: PeerSession) -> list[SessionEvent]:
    out = []
    while (e := s.next_event()) is not None:
        out.append(e)
    return out


def kind(m: bytes) -> MessageType:
    return MessageType(m[4])


def exchange(a: PeerSession, b: PeerSession, now: float = T0) -> None:
    """Deliver what both sides have to send, instantly, until neither has anything (a
    responder's cookie reply, the initiator's retry with mac2, the response)."""
    for _ in range(10):
        moved = False
        for src, dst in ((a, b), (b, a)):
            for m in src.handshakes_to_send():
                moved = True
                with contextlib.suppress(HandshakeError):
                    dst.receive_handshake(m, now)
        if not moved:
            return
    raise AssertionError("handshake messages never stopped")


def handshake(a: PeerSession, b: PeerSession, now: float = T0) -> None:
    """a initiates, b responds (after a cookie round trip if b asks for one), a confirms with
    one record (instant delivery)."""
    a.start(now)
    exchange(a, b, now)
    out = a.outbound()
    assert out is not None
    open_record(b.inbound_sas(), seal_record(out, b""), now)


def first_initiation(a: PeerSession, b: PeerSession, now: float = T0) -> bytes:
    """Let a and b complete a handshake, then have a send a new initiation (a rekey) that b,
    which now knows a's timestamps, takes without a cookie; return it, undelivered."""
    handshake(a, b, now)
    a.handle_timer(now + FAST.rekey_after_time)
    [m] = a.handshakes_to_send()
    assert kind(m) is MessageType.INITIATION
    return m


def test_handshake_gives_working_sas_both_ways() -> None:
    a, b = session(KA, KB), session(KB, KA)
    a.start(T0)
    [m0] = a.handshakes_to_send()
    assert a.outbound() is None  # no keys yet: the caller queues or drops, never cleartext
    # b knows none of a's timestamps yet: a must show a cookie first (one round trip).
    with pytest.raises(HandshakeError) as e:
        b.receive_handshake(m0, T0)
    assert e.value.reason == "cookie" and b.stats.dh_operations == 0
    [cookie] = b.handshakes_to_send()
    assert kind(cookie) is MessageType.COOKIE_REPLY and not b.inbound_sas()
    a.receive_handshake(cookie, T0)
    [m1] = a.handshakes_to_send()  # at once, with mac2
    assert kind(m1) is MessageType.INITIATION and m1[-16:] != bytes(16)
    assert a.stats.cookies_received == a.stats.cookie_retries == 1
    b.receive_handshake(m1, T0)
    [m2] = b.handshakes_to_send()
    assert b.outbound() is None  # responder waits for confirmation
    assert len(b.inbound_sas()) == 1
    a.receive_handshake(m2, T0)
    ev = drain_events(a)
    assert any(isinstance(e, KeepaliveRequested) for e in ev)
    est = [e for e in ev if isinstance(e, SessionEstablished)]
    assert len(est) == 1 and est[0].initiator
    out_a = a.outbound()
    assert out_a is not None
    _sa, plain = open_record(b.inbound_sas(), seal_record(out_a, b"ping"), T0)
    assert plain == b"ping"
    out_b = b.outbound()  # confirmed by the record
    assert out_b is not None
    assert open_record(a.inbound_sas(), seal_record(out_b, b"pong"), T0)[1] == b"pong"
    assert out_a.spi in b.inbound_sas() and out_b.spi in a.inbound_sas()
    assert a.stats.handshakes_completed == b.stats.handshakes_completed == 1


def test_wrong_cluster_key_fails_without_dh() -> None:
    a, b = session(KA, KB, psk=OTHER_PSK), session(KB, KA)
    a.start(T0)
    [m1] = a.handshakes_to_send()
    with pytest.raises(HandshakeError) as e:
        b.receive_handshake(m1, T0)
    assert e.value.reason == "mac"
    assert b.stats.dh_operations == 0 and b.stats.rejected["mac"] == 1


def test_rotation_accepts_any_installed_psk() -> None:
    a, b = session(KA, KB, psk=OTHER_PSK), session(KB, KA)
    b.set_psks([PSK, OTHER_PSK])
    handshake(a, b)
    assert b.outbound() is not None


def test_initiation_from_another_static_key_is_unknown_peer() -> None:
    c, b = session(KC, KB), session(KB, KA)  # b's session is for peer A
    c.start(T0)
    [m0] = c.handshakes_to_send()
    with pytest.raises(HandshakeError):
        b.receive_handshake(m0, T0)  # a cookie first
    c.receive_handshake(b.handshakes_to_send()[0], T0)
    [m1] = c.handshakes_to_send()
    with pytest.raises(HandshakeError) as e:
        b.receive_handshake(m1, T0)
    assert e.value.reason == "unknown_peer"
    assert b.handshakes_to_send() == [] and not b.inbound_sas()


def test_replayed_initiation_is_rejected() -> None:
    a, b = session(KA, KB), session(KB, KA)
    m1 = first_initiation(a, b)
    now = T0 + FAST.rekey_after_time
    b.receive_handshake(m1, now)
    b.handshakes_to_send()
    dh = b.stats.dh_operations
    with pytest.raises(HandshakeError) as e:
        b.receive_handshake(m1, now + 1)
    assert e.value.reason == "replay"
    assert b.handshakes_to_send() == []
    assert b.stats.dh_operations == dh  # an exact copy costs no DH


def test_older_initiation_is_rejected_after_a_newer_one() -> None:
    a, b = session(KA, KB), session(KB, KA)
    old = first_initiation(a, b)
    now = T0 + FAST.rekey_after_time
    a.handle_timer(now + 1)  # retry: newer timestamp
    [new] = a.handshakes_to_send()
    b.receive_handshake(new, now + 1)
    with pytest.raises(HandshakeError) as e:
        b.receive_handshake(old, now + 1)
    assert e.value.reason == "replay"
    assert b.stats.dh_operations > 4  # this one was decrypted: its timestamp said "replay"


def test_stray_response_is_unexpected() -> None:
    a, b = session(KA, KB), session(KB, KA)
    m1 = first_initiation(a, b)
    now = T0 + FAST.rekey_after_time
    b.receive_handshake(m1, now)
    [m2] = b.handshakes_to_send()
    a.receive_handshake(m2, now)
    with pytest.raises(HandshakeError) as e:
        a.receive_handshake(m2, T0)  # replayed response
    assert e.value.reason == "unexpected"


def test_not_alive_peer_is_dropped_before_dh() -> None:
    a, b = session(KA, KB), session(KB, KA)
    a.start(T0)
    [m1] = a.handshakes_to_send()
    b.set_peer_alive(False, T0)
    with pytest.raises(HandshakeError) as e:
        b.receive_handshake(m1, T0)
    assert e.value.reason == "not_alive" and b.stats.dh_operations == 0
    b.start(T0)
    assert b.handshakes_to_send() == []  # and we do not initiate to it either
    b.set_peer_alive(True, T0 + 1)
    assert len(b.handshakes_to_send()) == 1  # back: get keys


# ---- the link simulator ---------------------------------------------------------------------


@dataclass(order=True)
class _Delivery:
    at: float
    seq: int
    dst: str = field(compare=False)
    kind: str = field(compare=False)
    data: bytes = field(compare=False)


class Sim:
    """Two sessions, a lossless link with latency (and optional jitter), a stream of records."""

    def __init__(
        self,
        a: PeerSession,
        b: PeerSession,
        *,
        latency: float = 0.02,
        jitter: float = 0.0,
        seed: int = 0,
        keepalives: bool = True,
        handshake_loss: float = 0.0,
    ) -> None:
        self.s = {"a": a, "b": b}
        self.now = T0
        self.latency = latency
        self.jitter = jitter
        self.rng = random.Random(seed)
        self.keepalives = keepalives
        self.handshake_loss = handshake_loss
        self.heap: list[_Delivery] = []
        self.n = 0
        self.queue: dict[str, list[bytes]] = {"a": [], "b": []}
        self.sent: dict[str, int] = {"a": 0, "b": 0}
        self.opened: dict[str, list[bytes]] = {"a": [], "b": []}
        self.errors: list[tuple[str, str]] = []
        self.cookies = 0  # initiations answered with a cookie reply (not errors)
        self.events: dict[str, list[SessionEvent]] = {"a": [], "b": []}

    def _ship(self, src: str, kind: str, data: bytes) -> None:
        if kind == "hs" and self.rng.random() < self.handshake_loss:
            return
        dst = "b" if src == "a" else "a"
        delay = self.latency + self.rng.uniform(0, self.jitter)
        self.n += 1
        heapq.heappush(self.heap, _Delivery(self.now + delay, self.n, dst, kind, data))

    def _pump(self) -> None:
        for name, s in self.s.items():
            for m in s.handshakes_to_send():
                self._ship(name, "hs", m)
            while (e := s.next_event()) is not None:
                self.events[name].append(e)
                if isinstance(e, KeepaliveRequested) and self.keepalives:
                    self.send(name, b"")
            self.flush(name)

    def send(self, src: str, payload: bytes) -> None:
        self.queue[src].append(payload)
        self.flush(src)

    def flush(self, src: str) -> None:
        out = self.s[src].outbound()
        if out is None:
            return
        for p in self.queue[src]:
            self._ship(src, "rec", seal_record(out, p))
            self.sent[src] += 1 if p else 0
        self.queue[src].clear()

    def run_until(self, end: float, *, stream: dict[str, float] | None = None) -> None:
        """Advance to `end`; `stream` maps a sender to its record interval."""
        stream = stream or {}
        next_send = {k: self.now for k in stream}
        counter = 0
        self._pump()
        while True:
            candidates = [d.at for d in self.heap[:1]]
            candidates += [t for s in self.s.values() if (t := s.get_timer()) is not None]
            candidates += list(next_send.values())
            t = min(candidates, default=end)
            if t > end:
                self.now = end
                return
            self.now = max(self.now, t)
            while self.heap and self.heap[0].at <= self.now:
                d = heapq.heappop(self.heap)
                s = self.s[d.dst]
                if d.kind == "hs":
                    try:
                        s.receive_handshake(d.data, self.now)
                    except HandshakeError as e:
                        if e.reason == "cookie":
                            self.cookies += 1
                        else:
                            self.errors.append((d.dst, e.reason))
                else:
                    try:
                        _, plain = open_record(s.inbound_sas(), d.data, self.now)
                    except RecordError as e:
                        self.errors.append((d.dst, e.reason))
                    else:
                        if plain:
                            self.opened[d.dst].append(plain)
            for s in self.s.values():
                timer = s.get_timer()
                if timer is not None and timer <= self.now:
                    s.handle_timer(self.now)
            for src, at in next_send.items():
                if at <= self.now:
                    counter += 1
                    self.send(src, f"{src}{counter}".encode())
                    next_send[src] = at + stream[src]
            self._pump()


def rekeys(s: PeerSession) -> int:
    return s.stats.rekeys


@pytest.mark.parametrize("jitter", [0.0, 0.015])
def test_stream_across_many_rekeys_loses_nothing(jitter: float) -> None:
    a, b = session(KA, KB, seed=1), session(KB, KA, seed=2)
    sim = Sim(a, b, jitter=jitter, seed=3)
    a.start(T0)
    sim.run_until(T0 + 12.0, stream={"a": 0.005, "b": 0.007})
    sim.run_until(T0 + 12.5)  # let the last records land
    assert sim.errors == []
    assert sim.sent["a"] > 2000 and sim.sent["b"] > 1500
    assert len(sim.opened["b"]) == sim.sent["a"] and len(sim.opened["a"]) == sim.sent["b"]
    # In order, nothing duplicated.
    assert len(set(sim.opened["b"])) == sim.sent["a"]
    assert rekeys(a) >= 4 and rekeys(b) >= 4  # rekey every 2 s over 12 s
    assert not any(isinstance(e, SessionExpired) for e in sim.events["a"] + sim.events["b"])
    # Make before break bounds the state: previous + current (+ next) per side.
    assert len(a.inbound_sas()) <= 3 and len(b.inbound_sas()) <= 3


@pytest.mark.parametrize("initiator", ["a", "b"])
def test_one_way_stream_without_keepalives_loses_nothing(initiator: str) -> None:
    # The receiver never sends anything (not even the requested keepalive): the responder must
    # still never switch to an SA the initiator cannot open.
    a, b = session(KA, KB, seed=1), session(KB, KA, seed=2)
    sim = Sim(a, b, keepalives=False)
    (a if initiator == "a" else b).start(T0)
    sim.run_until(T0 + 10.0, stream={"a": 0.004})
    sim.run_until(T0 + 10.5)
    assert sim.errors == []
    assert sim.sent["a"] > 2000 and len(sim.opened["b"]) == sim.sent["a"]
    assert rekeys(a) >= 3


@settings(max_examples=25, deadline=None)
@given(
    case=st.fixed_dictionaries({
        "latency": st.sampled_from([0.001, 0.01, 0.05, 0.1]),
        "jitter": st.sampled_from([0.0, 0.01, 0.05]),
        "handshake_loss": st.sampled_from([0.0, 0.2, 0.5]),
        "starters": st.sampled_from(["a", "b", "ab"]),
        "responder_rekey": st.sampled_from([None, 2.0, 2.05]),
        "keepalives": st.booleans(),
        "two_way": st.booleans(),
        "seed": st.integers(0, 2**16),
    })
)
def test_no_record_ever_meets_a_missing_sa(case: dict[str, Any]) -> None:
    """Crossing rekeys, lost handshake messages, reordered records, peers that never send:
    whatever outbound() hands out, the peer can open (one-way delay < rekey_timeout / 2)."""
    _no_record_meets_a_missing_sa(**case)


def _no_record_meets_a_missing_sa(
    latency: float,
    jitter: float,
    handshake_loss: float,
    starters: str,
    responder_rekey: float | None,
    keepalives: bool,
    two_way: bool,
    seed: int,
) -> None:
    # The stated assumption: the longest one-way delay (latency + jitter) is under half of
    # rekey_timeout.
    assert latency + jitter < FAST.rekey_timeout / 2
    cfg = dataclasses.replace(FAST, responder_rekey_after_time=responder_rekey)
    a = session(KA, KB, seed=seed, config=cfg)
    b = session(KB, KA, seed=seed + 1, config=cfg)
    sim = Sim(
        a,
        b,
        latency=latency,
        jitter=jitter,
        seed=seed,
        keepalives=keepalives,
        handshake_loss=handshake_loss,
    )
    for name in starters:
        sim.s[name].start(T0)
    stream = {"a": 0.01, "b": 0.013} if two_way else {"a": 0.01}
    sim.run_until(T0 + 8.0, stream=stream)
    assert [e for e in sim.errors if e[1] != "unexpected"] == []  # stale responses only
    if handshake_loss == 0.0:
        assert rekeys(a) >= 2 and rekeys(b) >= 2
        assert not any(isinstance(e, SessionExpired) for e in sim.events["a"] + sim.events["b"])


def test_no_record_meets_a_missing_sa_silent_responder_and_lost_response() -> None:
    """The example hypothesis found (max one-way delay 0.06 s, under rekey_timeout / 2 =
    0.25 s): b never sends; b's own rekey is never confirmed, so a keeps sealing on the SA
    b retired; a's rekey loses one response and the retry completes. When a's first record
    on the new SA arrived, b had three old SAs and dropped the one a's records in flight
    were still sealed with, instead of one a never used."""
    _no_record_meets_a_missing_sa(
        latency=0.01,
        jitter=0.05,
        handshake_loss=0.2,
        starters="ab",
        responder_rekey=2.0,
        keepalives=False,
        two_way=False,
        seed=65535,
    )


def test_old_sa_the_peer_still_uses_outlives_ones_it_never_used() -> None:
    """The same sequence, step by step. b, which never sends, rekeys: it switches to its new
    SA and retires s0, but a keeps sealing on s0 (it waits for b's first record). a rekeys;
    b's answer is lost (z1, never used by a), a's retry completes (z2). a's first record on
    z2 reaches b before a's last records on s0. b now has three replaced SAs for two places
    (s0, z1 and its own unconfirmed one): it must keep s0."""
    cfg = dataclasses.replace(FAST, responder_rekey_after_time=2.0, rekey_jitter=0.0)
    a, b = session(KA, KB, seed=1, config=cfg), session(KB, KA, seed=2, config=cfg)
    handshake(a, b)
    s0, b0 = a.outbound(), b.outbound()
    assert s0 is not None and b0 is not None
    now = T0 + 2.0
    b.handle_timer(now)  # b's rekey
    exchange(b, a, now)  # with the cookie round trip a asks for
    assert b.outbound() not in (None, b0)  # b switched
    assert s0.spi in b.inbound_sas() and a.outbound() is s0  # a did not (no record from b)
    now = T0 + 2.5  # a's confirmation is overdue and its own rekey is due: a initiates
    a.handle_timer(now)
    [n1] = a.handshakes_to_send()
    b.receive_handshake(n1, now)
    b.handshakes_to_send()  # z1: the response is lost
    now += cfg.rekey_timeout
    a.handle_timer(now)  # the retry
    [n2] = a.handshakes_to_send()
    b.receive_handshake(n2, now)
    [resp] = b.handshakes_to_send()
    late = seal_record(s0, b"late")  # sealed on s0 just before the response arrives
    a.receive_handshake(resp, now)
    z2 = a.outbound()
    assert z2 is not None and z2 is not s0
    open_record(b.inbound_sas(), seal_record(z2, b"first"), now)
    b.outbound()  # b promotes z2's pair and retires its own unconfirmed SA
    assert len(b.inbound_sas()) <= 3  # still bounded: two old and the current one
    assert open_record(b.inbound_sas(), late, now + 0.05)[1] == b"late"


def test_rekey_after_messages() -> None:
    cfg = SessionConfig(rekey_after_time=100.0, reject_after_time=150.0, rekey_after_messages=50)
    a, b = session(KA, KB, config=cfg), session(KB, KA, config=cfg)
    handshake(a, b)
    out = a.outbound()
    assert out is not None
    assert out.seq == 1  # handshake() sealed one confirmation record
    for _ in range(48):
        seal_record(out, b"x")
    assert a.outbound() is out
    t = a.get_timer()
    assert t is not None and t > T0 + 50  # nothing due yet
    seal_record(out, b"x")  # the 50th
    assert a.outbound() is out  # still usable while the new handshake runs
    assert a.get_timer() == T0  # due now
    a.handle_timer(T0)
    assert len(a.handshakes_to_send()) == 1


def test_simultaneous_initiation_resolves_to_one_handshake() -> None:
    # Both sides rekey at the same instant (each knows the other's timestamps already, so no
    # cookie is asked for).
    cfg = dataclasses.replace(FAST, responder_rekey_after_time=2.0, rekey_jitter=0.0)
    a, b = session(KA, KB, seed=1, config=cfg), session(KB, KA, seed=2, config=cfg)
    a.start(T0)
    b.start(T0)  # both initiate at first too, so each learns the other's timestamps
    exchange(a, b, T0)
    small, large = (a, b) if public_bytes(KA) < public_bytes(KB) else (b, a)
    out = small.outbound()
    assert out is not None  # the smaller key kept the initiator role
    open_record(large.inbound_sas(), seal_record(out, b""), T0)  # confirms large's SA
    assert large.outbound() is not None
    dropped = small.stats.simultaneous_dropped
    now = T0 + 2.1
    a.handle_timer(now)
    b.handle_timer(now)
    [ma] = a.handshakes_to_send()
    [mb] = b.handshakes_to_send()
    a.receive_handshake(mb, now)
    b.receive_handshake(ma, now)
    assert small.stats.simultaneous_dropped == dropped + 1
    assert small.handshakes_to_send() == []  # the smaller key keeps the initiator role
    [resp] = large.handshakes_to_send()  # the larger dropped its own and responded
    assert kind(resp) is MessageType.RESPONSE
    small.receive_handshake(resp, now)
    out_s = small.outbound()
    assert out_s is not None
    open_record(large.inbound_sas(), seal_record(out_s, b"hi"), now)
    out_l = large.outbound()
    assert out_l is not None
    assert open_record(small.inbound_sas(), seal_record(out_l, b"yo"), now)[1] == b"yo"
    assert small.stats.handshakes_completed == large.stats.handshakes_completed == 2
    # The larger side's own pending SPI was given back: the new SA and one old one each.
    assert large._pending is None
    assert len(large.inbound_sas()) == len(small.inbound_sas()) == 2


def test_simultaneous_rekey_in_the_sim_loses_nothing() -> None:
    # Both sides rekey at the same instant, every time: responder_rekey_after == rekey_after.
    cfg = dataclasses.replace(FAST, responder_rekey_after_time=2.0, rekey_jitter=0.0)
    a, b = session(KA, KB, seed=1, config=cfg), session(KB, KA, seed=2, config=cfg)
    sim = Sim(a, b, latency=0.01)
    a.start(T0)
    b.start(T0)
    sim.run_until(T0 + 9.0, stream={"a": 0.005, "b": 0.005})
    sim.run_until(T0 + 9.5)
    assert sim.errors == []
    assert len(sim.opened["b"]) == sim.sent["a"] and len(sim.opened["a"]) == sim.sent["b"]
    assert a.stats.simultaneous_dropped + b.stats.simultaneous_dropped >= 1
    assert rekeys(a) >= 3


def test_retries_then_gives_up_then_retries_slowly() -> None:
    a = session(KA, KB)
    a.start(T0)
    spis = []
    now = T0
    for _ in range(3):
        [m] = a.handshakes_to_send()
        spis.append(int.from_bytes(m[8:12], "big"))
        t = a.get_timer()
        assert t is not None and 0.5 <= t - now <= 0.6  # rekey_timeout + jitter
        now = t
        a.handle_timer(now)
    assert len(set(spis)) == 3  # a new SPI per attempt; old ones given back
    failed = [e for e in drain_events(a) if isinstance(e, HandshakeFailed)]
    assert failed == [HandshakeFailed(a.peer, 3)]
    a.handshakes_to_send()
    t = a.get_timer()
    assert t is not None and t - now == pytest.approx(2.0)  # slow retries
    a.start(now + 0.6)  # traffic waiting: try again now
    assert len(a.handshakes_to_send()) == 1


def test_sas_expire_when_rekeying_fails_and_keys_come_back() -> None:
    a, b = session(KA, KB), session(KB, KA)
    handshake(a, b)
    # b goes silent: a keeps retrying, its SAs expire at reject_after_time.
    now = T0
    expired = False
    while now < T0 + 4.5:
        t = a.get_timer()
        assert t is not None
        now = t
        a.handle_timer(now)
        a.handshakes_to_send()
        expired = expired or any(isinstance(e, SessionExpired) for e in drain_events(a))
    assert expired and a.outbound() is None and not a.inbound_sas()
    # b answers again: keys are back.
    a.handle_timer(now + 5)
    [m1] = a.handshakes_to_send()
    b.receive_handshake(m1, now + 5)
    [m2] = b.handshakes_to_send()
    a.receive_handshake(m2, now + 5)
    assert a.outbound() is not None


def test_restarted_peer_gets_keys_again() -> None:
    a, b = session(KA, KB), session(KB, KA)
    handshake(a, b)
    out = a.outbound()
    assert out is not None
    # kill -9 b: a new session with the same identity and no memory.
    b2 = session(KB, KA, seed=9)
    with pytest.raises(RecordError) as e:
        open_record(b2.inbound_sas(), seal_record(out, b"x"), T0 + 1)
    assert e.value.reason == "unknown_spi"
    handshake(b2, a, T0 + 1)
    out_a = a.outbound()
    assert out_a is not None and out_a is not out
    assert open_record(b2.inbound_sas(), seal_record(out_a, b"x"), T0 + 1)[1] == b"x"


def test_inbound_changed_events_track_the_spi_table() -> None:
    a, b = session(KA, KB), session(KB, KA)
    handshake(a, b)
    assert any(isinstance(e, InboundChanged) for e in drain_events(b))
    assert set(b.inbound_sas()) == {a.outbound().spi}  # type: ignore[union-attr]


# ---- abuse limits ---------------------------------------------------------------------------

SRC = ("10.0.0.1", 4790)
NO_LOAD: dict[str, Any] = {"load_rate": 1e9, "load_burst": 1e9, "source_load_rate": 1e9,
           "source_load_burst": 1e9}


def initiation(key: X25519PrivateKey = KA, cookie: bytes | None = None, stamp: float = T0) -> bytes:
    from meshnet.crypto.handshake import create_initiation, tai64n

    m, _ = create_initiation(key, public_bytes(KB), PSK, 1234, tai64n(stamp), cookie=cookie)
    return m


def cookie_of(guard: HandshakeGuard, source: tuple[str, int] | None, now: float) -> bytes:
    """The cookie GUARD gives SOURCE, read from a cookie reply as the initiator would."""
    from meshnet.crypto.handshake import consume_cookie_reply, initiation_mac1

    m = initiation()
    reply = guard.cookie_reply(m, source, now, public_bytes(KB), PSK)
    return consume_cookie_reply(reply, public_bytes(KB), PSK, initiation_mac1(m))


def test_guard_limits_each_ephemeral_not_the_source() -> None:
    g = HandshakeGuard(**NO_LOAD)
    m = initiation()
    assert g.admit(m, SRC, T0) and g.admit(m, SRC, T0)  # EPHEMERAL_BURST = 2
    with pytest.raises(HandshakeError) as e:
        g.admit(m, SRC, T0)
    assert e.value.reason == "rate_limited" and g.counters["limited_ephemeral"] == 1
    for _ in range(5):  # the same source's new initiations (new ephemerals) still pass
        assert g.admit(initiation(), SRC, T0 + 0.01)
    assert g.admit(m, SRC, T0 + 61)  # one more a minute
    with pytest.raises(HandshakeError):
        g.admit(m, SRC, T0 + 61)


def test_guard_limits_per_source_and_overall() -> None:
    g = HandshakeGuard(**NO_LOAD)
    assert sum(_admitted(g, initiation(), SRC, T0) for _ in range(30)) == 10  # SOURCE_BURST
    assert g.counters["limited_source"] == 20
    assert g.admit(initiation(), ("10.0.0.2", 4790), T0)  # another source has its own
    assert sum(_admitted(g, initiation(), SRC, T0 + 1.0) for _ in range(30)) == 5  # 5/s
    g2 = HandshakeGuard(**NO_LOAD, max_entries=100)
    sources = [(f"10.1.{i // 250}.{i % 250}", 4790) for i in range(120)]
    m = [initiation() for _ in range(120)]
    assert sum(_admitted(g2, m[i], sources[i], T0) for i in range(120)) == 50  # GLOBAL_BURST
    assert g2.counters["limited_global"] == 70
    assert len(g2._source.table) == 100 and len(g2._ephemeral.table) == 100  # bounded
    # Time going backwards refills nothing.
    assert not _admitted(g2, initiation(), ("10.2.0.1", 4790), T0 - 5)


def _admitted(g: HandshakeGuard, m: bytes, source: tuple[str, int], now: float) -> bool:
    try:
        return g.admit(m, source, now)
    except HandshakeError as e:
        assert e.reason == "rate_limited"
        return False


def test_guard_asks_for_cookies_under_load_and_takes_them() -> None:
    g = HandshakeGuard()
    sources = [(f"10.3.0.{i}", 4790) for i in range(1, 31)]
    # 25 initiations in an instant from different sources: not yet a load.
    assert all(g.admit(initiation(), src, T0) for src in sources[:25])
    assert not g.under_load(T0)
    # The 26th is over the overall rate: load, and no mac2 gets no DH, whoever sends it.
    assert not g.admit(initiation(), sources[25], T0)
    assert g.under_load(T0) and g.counters["load_episodes"] == 1
    assert not g.admit(initiation(), sources[0], T0 + 0.5)
    # A valid mac2 (the cookie of its own source address) passes.
    cookie = cookie_of(g, sources[26], T0 + 0.5)
    assert g.admit(initiation(cookie=cookie), sources[26], T0 + 0.5)
    # ... and only from that address: the same cookie from another source does not.
    assert not g.admit(initiation(cookie=cookie), sources[27], T0 + 0.5)
    # The load passes LOAD_HOLD after the last message over the rate, once the meter refilled.
    assert not g.under_load(T0 + 2.0)
    assert g.admit(initiation(), sources[28], T0 + 2.0)


def test_guard_load_per_source() -> None:
    g = HandshakeGuard()
    noisy, quiet = ("10.4.0.1", 4790), ("10.4.0.2", 4790)
    assert all(g.admit(initiation(), noisy, T0 + i * 0.01) for i in range(4))  # burst 4
    assert not g.admit(initiation(), noisy, T0 + 0.05)  # 5 in 50 ms: over 1/s
    assert g.under_load(T0 + 0.05, noisy) and not g.under_load(T0 + 0.05, quiet)
    assert not g.under_load(T0 + 0.05)  # the node as a whole is not
    assert g.admit(initiation(), quiet, T0 + 0.05)  # others are not asked for cookies
    cookie = cookie_of(g, noisy, T0 + 0.1)
    assert g.admit(initiation(cookie=cookie), noisy, T0 + 0.1)
    assert g.counters["source_load_episodes"] == 1


def test_cookie_secret_rotation_and_restart() -> None:
    g = HandshakeGuard(**NO_LOAD)
    src = SRC
    cookie = cookie_of(g, src, T0)
    m = initiation(cookie=cookie)
    assert g.admit(m, src, T0, want_cookie=True)
    # Replaced after COOKIE_SECRET_MAX_AGE (120 s), the secret is still accepted for as long.
    assert g.admit(initiation(cookie=cookie), src, T0 + 200, want_cookie=True)
    assert g.counters["secret_rotations"] == 2
    assert g.admit(initiation(cookie=cookie), src, T0 + 319, want_cookie=True)
    assert not g.admit(initiation(cookie=cookie), src, T0 + 320, want_cookie=True)  # rotated
    # A restarted responder (a new guard, a new secret) accepts no cookie of its past life.
    fresh = cookie_of(g, src, T0 + 320)
    assert g.admit(initiation(cookie=fresh), src, T0 + 320, want_cookie=True)
    assert not HandshakeGuard(**NO_LOAD).admit(initiation(cookie=fresh), src, T0 + 321,
                                               want_cookie=True)
    assert not g.admit(initiation(cookie=bytes(16)), src, T0 + 320, want_cookie=True)


def test_flood_of_bogus_initiations_costs_no_dh() -> None:
    a, b = session(KA, KB), session(KB, KA)
    a.start(T0)
    [m1] = a.handshakes_to_send()
    rng = random.Random(5)
    for i in range(10_000):
        with pytest.raises(HandshakeError):
            b.receive_handshake(_bogus(rng, m1), T0 + i * 1e-4)
    assert b.stats.dh_operations == 0
    assert b.stats.rejected["mac"] == 10_000
    assert b.handshakes_to_send() == [] and not b.inbound_sas()


def _bogus(rng: random.Random, valid: bytes) -> bytes:
    body = bytearray(rng.randbytes(len(valid)))
    body[:8] = valid[:8]  # right marker, type, version, cipher: only mac1 can tell
    return bytes(body)


def test_flood_of_copies_of_an_initiation_costs_no_dh() -> None:
    a, b = session(KA, KB), session(KB, KA)
    m1 = first_initiation(a, b)
    now = T0 + FAST.rekey_after_time
    dh = b.stats.dh_operations
    for i in range(10_000):
        with contextlib.suppress(HandshakeError):
            b.receive_handshake(m1, now + i / 1000, SRC)
    assert b.stats.dh_operations == dh + 4  # the first one, answered
    assert b.stats.rejected["replay"] == 9_999
    assert len(b.handshakes_to_send()) == 1  # answered once
    assert len(b.inbound_sas()) == 2  # bounded state: the current SA and the new one


def test_flood_of_old_initiations_gets_cookie_replies_not_dh() -> None:
    """Many different captured initiations, more than a session remembers, replayed round
    robin from the peer's address: the source goes under load, each copy gets a cookie reply
    (to the genuine peer, which drops it) and no DH; the peer's own next initiation gets
    through with its cookie."""
    a, b = session(KA, KB), session(KB, KA)
    handshake(a, b)
    captured = []
    now = T0 + FAST.rekey_after_time
    for _ in range(40):  # a's rekey and its retries: the attacker captures them, b gets none
        now += 1.0
        a.handle_timer(now)
        captured += a.handshakes_to_send()
    assert len(captured) > 16  # more than a session remembers
    b.receive_handshake(captured[-1], now, SRC)  # ... but the last
    b.handshakes_to_send()
    dh, cookies = b.stats.dh_operations, b.stats.cookies_sent
    replies = 0
    for i in range(4_000):
        with contextlib.suppress(HandshakeError):
            b.receive_handshake(captured[i % len(captured)], now + i / 1000, SRC)
        replies += len(b.handshakes_to_send())
    # The first few (SOURCE_LOAD_BURST), before the load showed, were decrypted and refused.
    assert b.stats.dh_operations - dh <= 2 * 4
    assert b.stats.rejected["cookie"] >= 3_900 and replies == b.stats.cookies_sent - cookies
    # a's genuine retry: a cookie reply, then the retry with mac2 is answered.
    now += 4.0
    a.handle_timer(now + 100)
    [m] = a.handshakes_to_send()
    with pytest.raises(HandshakeError) as e:
        b.receive_handshake(m, now, SRC)
    assert e.value.reason == "cookie"
    [reply] = b.handshakes_to_send()
    a.receive_handshake(reply, now)
    [retry] = a.handshakes_to_send()
    b.receive_handshake(retry, now, SRC)
    [resp] = b.handshakes_to_send()
    a.receive_handshake(resp, now)
    assert a.stats.handshakes_completed == 2


def test_global_limit_across_peers() -> None:
    guard = HandshakeGuard()
    b_key = KB
    total_dh = 0
    admitted = 0
    for i in range(120):
        peer_key = X25519PrivateKey.from_private_bytes(bytes([100 + (i % 100), i // 100 + 1]) * 16)
        initiator = session(peer_key, b_key, seed=i)
        responder = session(b_key, peer_key, guard=guard)
        src = (f"10.5.0.{i + 1}", 4790)
        initiator.start(T0)
        [m0] = initiator.handshakes_to_send()
        with pytest.raises(HandshakeError):  # the responder knows nobody yet: a cookie first
            responder.receive_handshake(m0, T0, src)
        initiator.receive_handshake(responder.handshakes_to_send()[0], T0)
        [m1] = initiator.handshakes_to_send()
        try:
            responder.receive_handshake(m1, T0, src)
            admitted += 1
        except HandshakeError as e:
            assert e.reason == "rate_limited"
        total_dh += responder.stats.dh_operations
    assert admitted == 50 and total_dh == 4 * 50
    assert guard.counters["limited_global"] == 70


# ---- cookies and timestamps ------------------------------------------------------------------


def test_cookie_reply_must_match_the_pending_initiation() -> None:
    a, b = session(KA, KB), session(KB, KA)
    a.start(T0)
    [m0] = a.handshakes_to_send()
    with pytest.raises(HandshakeError):
        b.receive_handshake(m0, T0, SRC)
    [reply] = b.handshakes_to_send()
    # A forged reply: another initiation's mac1 as associated data (bound to one initiation).
    other = initiation()
    forged = b._guard.cookie_reply(other, SRC, T0, public_bytes(KB), PSK)
    forged = forged[:8] + reply[8:12] + forged[12:]  # a's pending SPI
    with pytest.raises(HandshakeError) as e:
        a.receive_handshake(forged, T0)
    assert e.value.reason == "auth" and a.handshakes_to_send() == []
    # Made with another cluster key: does not open either.
    bad = session(KB, KA, psk=OTHER_PSK)._guard.cookie_reply(m0, SRC, T0, public_bytes(KB),
                                                             OTHER_PSK)
    with pytest.raises(HandshakeError) as e:
        a.receive_handshake(bad, T0)
    assert e.value.reason == "auth"
    a.receive_handshake(reply, T0)  # the genuine one: the retry with mac2 goes out at once
    [retry] = a.handshakes_to_send()
    with pytest.raises(HandshakeError) as e:
        a.receive_handshake(reply, T0)  # to an initiation no longer pending
    assert e.value.reason == "unexpected"
    b.receive_handshake(retry, T0, SRC)
    assert kind(b.handshakes_to_send()[0]) is MessageType.RESPONSE


def test_one_immediate_retry_per_attempt_and_cookies_expire() -> None:
    a, b = session(KA, KB), session(KB, KA)
    a.start(T0)
    [m0] = a.handshakes_to_send()
    with pytest.raises(HandshakeError):
        b.receive_handshake(m0, T0, SRC)
    a.receive_handshake(b.handshakes_to_send()[0], T0)
    [m1] = a.handshakes_to_send()
    # The responder replaced its secret meanwhile (a restart): it asks again; the initiator
    # keeps the new cookie but does not re-send at once a second time (no loops).
    b2 = session(KB, KA, seed=9)
    with pytest.raises(HandshakeError):
        b2.receive_handshake(m1, T0, SRC)
    a.receive_handshake(b2.handshakes_to_send()[0], T0)
    assert a.handshakes_to_send() == []
    assert a.stats.cookies_received == 2 and a.stats.cookie_retries == 1
    a.handle_timer(T0 + 1.0)  # the next attempt carries the new cookie
    [m2] = a.handshakes_to_send()
    b2.receive_handshake(m2, T0 + 1.0, SRC)
    assert kind(b2.handshakes_to_send()[0]) is MessageType.RESPONSE
    # Past COOKIE_MAX_AGE the initiator sends no mac2 (the responder will ask again).
    a.close()
    a.start(T0 + 200)
    [m3] = a.handshakes_to_send()
    assert m3[-16:] == bytes(16)


def test_initiation_older_than_the_session_is_stale() -> None:
    """A peer whose clock is 100 s behind: its initiations are stamped before our session began
    (less the 10 s skew), so they are refused as stale... until its clock passes that point;
    meanwhile our own initiations reach it (its window is anchored to its own start)."""
    late = PeerSession(KA, public_bytes(KB), PSK, rng=random.Random(1), config=FAST,
                       wall_offset=-100.0)
    b = PeerSession(KB, public_bytes(KA), PSK, rng=random.Random(2), config=FAST, now=T0)
    late.start(T0)
    with pytest.raises(HandshakeError):
        b.receive_handshake(late.handshakes_to_send()[0], T0, SRC)
    late.receive_handshake(b.handshakes_to_send()[0], T0)
    with pytest.raises(HandshakeError) as e:
        b.receive_handshake(late.handshakes_to_send()[0], T0, SRC)
    assert e.value.reason == "stale" and b.stats.rejected["stale"] == 1
    # b initiates: late answers (b's timestamps are ahead of its clock, not behind).
    late.close()
    b.start(T0)
    exchange(b, late, T0)
    assert b.outbound() is not None
    # Once late's clock has passed b's start less the skew, its initiations are accepted.
    now = T0 + 100 - FAST.timestamp_skew + 1
    late.close()
    late.start(now)
    exchange(late, b, now)
    assert late.outbound() is not None and b.stats.rejected["stale"] == 1


def test_spi_allocator_shared_across_sessions_has_no_leaks() -> None:
    spis = SpiAllocator(random.Random(3))
    a = PeerSession(KA, public_bytes(KB), PSK, rng=random.Random(1), config=FAST, spis=spis)
    b = session(KB, KA)
    sim = Sim(a, b)
    a.start(T0)
    sim.run_until(T0 + 8.0, stream={"a": 0.01, "b": 0.01})
    assert sim.errors == []
    live = set(a.inbound_sas())
    pending = 1 if a._pending is not None else 0
    assert len(spis) == len(live) + pending
    a.close()
    assert len(spis) == 0
