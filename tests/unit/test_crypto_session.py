"""PeerSession: handshakes, rekeying without loss, simultaneous initiation, abuse limits.

Two sessions are wired through a fake link on virtual time (no sleeps, no sockets).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import random
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.crypto.handshake import HandshakeError, derive_psk
from meshnet.crypto.identity import public_bytes
from meshnet.crypto.sa import RecordError, SpiAllocator, open_record, seal_record
from meshnet.crypto.session import (
    PER_PEER_BURST,
    HandshakeFailed,
    HandshakeLimiter,
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
    limiter: HandshakeLimiter | None = None,
    peer: str = "",
) -> PeerSession:
    return PeerSession(
        local,
        public_bytes(remote),
        psk,
        rng=random.Random(seed),
        peer=peer or public_bytes(remote).hex()[:6],
        config=config,
        limiter=limiter,
    )


def drain_events(s: PeerSession) -> list[SessionEvent]:
    out = []
    while (e := s.next_event()) is not None:
        out.append(e)
    return out


def handshake(a: PeerSession, b: PeerSession, now: float = T0) -> None:
    """a initiates, b responds, a confirms with one record (instant delivery)."""
    a.start(now)
    for m in a.handshakes_to_send():
        b.receive_handshake(m, now)
    for m in b.handshakes_to_send():
        a.receive_handshake(m, now)
    out = a.outbound()
    assert out is not None
    open_record(b.inbound_sas(), seal_record(out, b""), now)


def test_handshake_gives_working_sas_both_ways() -> None:
    a, b = session(KA, KB), session(KB, KA)
    a.start(T0)
    [m1] = a.handshakes_to_send()
    assert a.outbound() is None  # no keys yet: the caller queues or drops, never cleartext
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
    [m1] = c.handshakes_to_send()
    with pytest.raises(HandshakeError) as e:
        b.receive_handshake(m1, T0)
    assert e.value.reason == "unknown_peer"
    assert b.handshakes_to_send() == [] and not b.inbound_sas()


def test_replayed_initiation_is_rejected() -> None:
    a, b = session(KA, KB), session(KB, KA)
    a.start(T0)
    [m1] = a.handshakes_to_send()
    b.receive_handshake(m1, T0)
    b.handshakes_to_send()
    with pytest.raises(HandshakeError) as e:
        b.receive_handshake(m1, T0 + 1)
    assert e.value.reason == "replay"
    assert b.handshakes_to_send() == []


def test_older_initiation_is_rejected_after_a_newer_one() -> None:
    a, b = session(KA, KB), session(KB, KA)
    a.start(T0)
    [old] = a.handshakes_to_send()
    a.handle_timer(T0 + 5)  # retry: newer timestamp
    [new] = a.handshakes_to_send()
    b.receive_handshake(new, T0 + 5)
    with pytest.raises(HandshakeError) as e:
        b.receive_handshake(old, T0 + 5)
    assert e.value.reason == "replay"


def test_stray_response_is_unexpected() -> None:
    a, b = session(KA, KB), session(KB, KA)
    a.start(T0)
    [m1] = a.handshakes_to_send()
    b.receive_handshake(m1, T0)
    [m2] = b.handshakes_to_send()
    a.receive_handshake(m2, T0)
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
    latency=st.sampled_from([0.001, 0.01, 0.05, 0.1]),
    jitter=st.sampled_from([0.0, 0.01, 0.05]),
    handshake_loss=st.sampled_from([0.0, 0.2, 0.5]),
    starters=st.sampled_from(["a", "b", "ab"]),
    responder_rekey=st.sampled_from([None, 2.0, 2.05]),
    keepalives=st.booleans(),
    two_way=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_no_record_ever_meets_a_missing_sa(
    latency: float,
    jitter: float,
    handshake_loss: float,
    starters: str,
    responder_rekey: float | None,
    keepalives: bool,
    two_way: bool,
    seed: int,
) -> None:
    """Crossing rekeys, lost handshake messages, reordered records, peers that never send:
    whatever outbound() hands out, the peer can open (one-way delay < rekey_timeout / 2)."""
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
    a, b = session(KA, KB, seed=1), session(KB, KA, seed=2)
    small, large = (a, b) if public_bytes(KA) < public_bytes(KB) else (b, a)
    a.start(T0)
    b.start(T0)
    [ma] = a.handshakes_to_send()
    [mb] = b.handshakes_to_send()
    a.receive_handshake(mb, T0)
    b.receive_handshake(ma, T0)
    assert small.stats.simultaneous_dropped == 1
    assert small.handshakes_to_send() == []  # the smaller key keeps the initiator role
    [resp] = large.handshakes_to_send()  # the larger dropped its own and responded
    small.receive_handshake(resp, T0)
    out_s = small.outbound()
    assert out_s is not None
    open_record(large.inbound_sas(), seal_record(out_s, b"hi"), T0)
    out_l = large.outbound()
    assert out_l is not None
    assert open_record(small.inbound_sas(), seal_record(out_l, b"yo"), T0)[1] == b"yo"
    assert small.stats.handshakes_completed == large.stats.handshakes_completed == 1
    # The larger side's own pending SPI was given back.
    assert len(large.inbound_sas()) == 1 and len(small.inbound_sas()) == 1


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


def test_limiter_per_peer_and_refill() -> None:
    lim = HandshakeLimiter(per_peer_rate=5, per_peer_burst=10, global_rate=1000, global_burst=1000)
    assert sum(lim.allow("p", T0) for _ in range(100)) == 10
    assert sum(lim.allow("p", T0 + 1.0) for _ in range(100)) == 5
    assert lim.allow("q", T0 + 1.0)  # another peer has its own bucket
    assert not lim.allow("p", T0 + 0.5)  # time going backwards refills nothing


def test_limiter_global_and_bounded_table() -> None:
    lim = HandshakeLimiter(global_rate=50, global_burst=50, max_entries=100)
    assert sum(lim.allow(i, T0) for i in range(10_000)) == 50
    assert len(lim) == 100
    assert sum(lim.allow(i, T0 + 1.0) for i in range(10_000, 20_000)) == 50


def _bogus(rng: random.Random, valid: bytes) -> bytes:
    body = bytearray(rng.randbytes(len(valid)))
    body[:8] = valid[:8]  # right marker, type, version, cipher: only mac1 can tell
    return bytes(body)


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


def test_flood_of_replayed_initiations_is_rate_limited_before_dh() -> None:
    a, b = session(KA, KB), session(KB, KA)
    a.start(T0)
    [m1] = a.handshakes_to_send()
    for _ in range(10_000):
        with contextlib.suppress(HandshakeError):
            b.receive_handshake(m1, T0)
    # One real handshake (es, ss, ee, se) plus es+ss for each replay the bucket let through.
    assert b.stats.dh_operations <= 4 + 2 * (PER_PEER_BURST - 1)
    assert b.stats.rejected["rate_limited"] >= 10_000 - PER_PEER_BURST
    assert len(b.handshakes_to_send()) == 1  # answered once
    assert len(b.inbound_sas()) == 1  # bounded state


def test_flood_over_time_is_bounded_by_the_rate() -> None:
    a, b = session(KA, KB), session(KB, KA)
    a.start(T0)
    [m1] = a.handshakes_to_send()
    for i in range(10_000):  # 1,000 a second for 10 s
        with contextlib.suppress(HandshakeError):
            b.receive_handshake(m1, T0 + i / 1000)
    admitted = PER_PEER_BURST + 5.0 * 10
    assert b.stats.dh_operations <= 2 + 2 * admitted + 1


def test_global_limit_across_peers() -> None:
    lim = HandshakeLimiter(global_rate=50, global_burst=50)
    b_key = KB
    total_dh = 0
    admitted = 0
    for i in range(120):
        peer_key = X25519PrivateKey.from_private_bytes(bytes([100 + (i % 100), i // 100 + 1]) * 16)
        initiator = session(peer_key, b_key, seed=i)
        responder = session(b_key, peer_key, limiter=lim)
        initiator.start(T0)
        [m1] = initiator.handshakes_to_send()
        try:
            responder.receive_handshake(m1, T0)
            admitted += 1
        except HandshakeError as e:
            assert e.reason == "rate_limited"
        total_dh += responder.stats.dh_operations
    assert admitted == 50 and total_dh == 4 * 50


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
