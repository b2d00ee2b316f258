"""Adversarial (#14, "Replays and floods", the handshake part), in the sans-IO core on a fake
clock, with WireGuard's default timers (rekey 120 s, reject 180 s, retries every 5 s):

1. handshake-replay starvation: an attacker who captured one handshake initiation replays it
   20-100 times a second from the peer's own address while the genuine peers keep rekeying.
   Every genuine rekey must complete and the SAs must never expire.
2. replay after a responder restart: an initiation captured before the responder restarted is
   refused after the restart (the new process has no memory of the peer's timestamps).
"""

from __future__ import annotations

import heapq
import inspect
import random
from collections import Counter
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshnet.crypto.handshake import HandshakeError, MessageType, derive_psk
from meshnet.crypto.identity import public_bytes
from meshnet.crypto.sa import RecordError, open_record, seal_record
from meshnet.crypto.session import (
    HandshakeFailed,
    KeepaliveRequested,
    PeerSession,
    SessionConfig,
    SessionEstablished,
    SessionExpired,
)

Addr = tuple[str, int]

_K1 = X25519PrivateKey.from_private_bytes(bytes([41]) * 32)
_K2 = X25519PrivateKey.from_private_bytes(bytes([42]) * 32)
# A holds the smaller static key, so it keeps the initiator role when handshakes cross: the
# peer's own initiations cannot stand in for A's refused ones.
KA, KB = sorted((_K1, _K2), key=public_bytes)
PA, PB = public_bytes(KA), public_bytes(KB)
PSK = derive_psk(b"adversarial cluster key".ljust(32, b"."))
ADDR: dict[str, Addr] = {"a": ("10.9.0.1", 4790), "b": ("10.9.0.2", 4790)}
T0 = 1_000.0
CONFIG = SessionConfig()  # WireGuard's timers: what ships


# Sessions from before #14 took no source address: the attacks are shown against them as well.
_TAKES_SOURCE = "source" in inspect.signature(PeerSession.receive_handshake).parameters


def deliver(s: PeerSession, data: bytes, now: float, src: Addr) -> None:
    """A handshake datagram from SRC reaches S."""
    if _TAKES_SOURCE:
        s.receive_handshake(data, now, src)
    else:
        s.receive_handshake(data, now)


@dataclass(order=True)
class _Item:
    at: float
    seq: int
    kind: str = field(compare=False)  # "hs", "rec", "replay", "tick"
    dst: str = field(compare=False)
    data: bytes = field(compare=False, default=b"")


class Wire:
    """Two sessions on a 5 ms link, each sending a record every second, plus an attacker who
    replays captured initiations with the victim peer's source address."""

    def __init__(self, a: PeerSession, b: PeerSession, latency: float = 0.005) -> None:
        self.s = {"a": a, "b": b}
        self.now = T0
        self.latency = latency
        self.heap: list[_Item] = []
        self.n = 0
        # Every initiation seen on the wire, by sender (what a passive attacker captures).
        self.captured: dict[str, list[bytes]] = {"a": [], "b": []}
        self.refused: dict[str, Counter[str]] = {"a": Counter(), "b": Counter()}
        self.events: dict[str, list[object]] = {"a": [], "b": []}
        self.records_sent = Counter[str]()
        self.records_opened = Counter[str]()
        self.record_errors: list[tuple[str, str]] = []
        self.keyless_ticks: list[tuple[str, float]] = []  # a second with keys wanted, none usable
        self.established = {"a": False, "b": False}
        self.replays = 0
        self.traffic_until = float("inf")  # no records sealed after this
        for name in self.s:
            self.push(self.now + 1.0, "tick", name)

    def push(self, at: float, kind: str, dst: str, data: bytes = b"") -> None:
        self.n += 1
        heapq.heappush(self.heap, _Item(at, self.n, kind, dst, data))

    @staticmethod
    def other(name: str) -> str:
        return "b" if name == "a" else "a"

    def pump(self) -> None:
        for name, s in self.s.items():
            for m in s.handshakes_to_send():
                if m[4] == MessageType.INITIATION:
                    self.captured[name].append(m)
                self.push(self.now + self.latency, "hs", self.other(name), m)
            while (ev := s.next_event()) is not None:
                self.events[name].append(ev)
                if isinstance(ev, SessionEstablished):
                    self.established[name] = True
                if isinstance(ev, KeepaliveRequested):
                    self.send_record(name, b"")

    def send_record(self, src: str, payload: bytes) -> bool:
        out = self.s[src].outbound()
        if out is None:
            return False
        self.push(self.now + self.latency, "rec", self.other(src), seal_record(out, payload))
        if payload:
            self.records_sent[src] += 1
        return True

    def replay(self, victim: str, message: bytes, rate: float, start: float, end: float) -> None:
        """From START to END, RATE copies a second of MESSAGE to the peer of VICTIM, sent with
        VICTIM's source address (a spoofed or a shared one: the receiver cannot tell)."""
        t = start
        while t < end:
            self.push(t, "replay", self.other(victim), message)
            t += 1.0 / rate

    def run_until(self, end: float) -> None:
        self.pump()
        while True:
            timers = [t for s in self.s.values() if (t := s.get_timer()) is not None]
            nxt = min([*timers, *(self.heap[0].at for _ in self.heap[:1])], default=end)
            if nxt > end:
                self.now = end
                return
            self.now = max(self.now, nxt)
            while self.heap and self.heap[0].at <= self.now:
                item = heapq.heappop(self.heap)
                self.handle(item)
            for s in self.s.values():
                t = s.get_timer()
                if t is not None and t <= self.now:
                    s.handle_timer(self.now)
            self.pump()

    def handle(self, item: _Item) -> None:
        s = self.s[item.dst]
        src = self.other(item.dst)
        if item.kind in ("hs", "replay"):
            self.replays += item.kind == "replay"
            try:
                deliver(s, item.data, self.now, ADDR[src])
            except HandshakeError as e:
                self.refused[item.dst][e.reason] += 1
        elif item.kind == "rec":
            try:
                _, plain = open_record(s.inbound_sas(), item.data, self.now)
            except RecordError as e:
                self.record_errors.append((item.dst, e.reason))
            else:
                if plain:
                    self.records_opened[item.dst] += 1
        elif self.now <= self.traffic_until:  # this side's once-a-second record
            sent = self.send_record(item.dst, f"{item.dst}@{self.now:.3f}".encode())
            if not sent and self.established[item.dst]:
                self.keyless_ticks.append((item.dst, self.now))
            self.push(self.now + 1.0, "tick", item.dst)


def pair() -> tuple[PeerSession, PeerSession]:
    a = PeerSession(KA, PB, PSK, rng=random.Random(1), peer="b", config=CONFIG)
    b = PeerSession(KB, PA, PSK, rng=random.Random(2), peer="a", config=CONFIG)
    return a, b


def expired(w: Wire) -> list[tuple[str, object]]:
    return [(n, e) for n, evs in w.events.items() for e in evs
            if isinstance(e, SessionExpired | HandshakeFailed)]


@pytest.mark.parametrize("rate", [20.0, 100.0])
@pytest.mark.parametrize("scenario", ["one", "both-ways", "many"])
def test_replayed_initiation_cannot_starve_genuine_rekeys(rate: float, scenario: str) -> None:
    """one: A's first initiation, replayed to B from A's address. both-ways: and B's to A from
    B's. many: every initiation A sent in the hour before (~30, more than a session remembers),
    replayed round robin, so each copy reaches the load meters and the rate limits."""
    a, b = pair()
    w = Wire(a, b)
    a.start(T0)
    if scenario == "both-ways":
        b.start(T0)  # both initiate (the handshakes cross): the attacker captures one of each
    begin = T0 + 5.0
    if scenario == "many":
        begin = T0 + 3600.0
    w.run_until(begin)
    assert w.s["a"].outbound() is not None and w.s["b"].outbound() is not None
    # Replay for 11 minutes: long enough for five rekeys and three SA lifetimes.
    end = begin + 660.0
    if scenario == "many":
        captured = list(w.captured["a"])
        assert len(captured) > 16  # more than a session remembers (SEEN_INITIATIONS)
        for i, m in enumerate(captured):
            w.replay("a", m, rate / len(captured), begin + i / rate, end)
    else:
        w.replay("a", w.captured["a"][0], rate, begin, end)
    if scenario == "both-ways":
        w.replay("b", w.captured["b"][0], rate, begin, end)
    rekeys = a.stats.rekeys, b.stats.rekeys
    dh = b.stats.dh_operations
    handshakes = b.stats.handshakes_completed
    w.run_until(end)
    w.traffic_until = end
    w.run_until(end + 1.0)  # the last records land

    # Every genuine rekey completed: WireGuard's timers give at least 5 in 660 s, on each side.
    assert a.stats.rekeys >= rekeys[0] + 5 and b.stats.rekeys >= rekeys[1] + 5, (
        a.stats, b.stats, w.refused)
    # The SAs never expired and no handshake gave up; no second passed without usable keys.
    assert expired(w) == [], (expired(w), w.refused)
    assert w.keyless_ticks == [], (w.keyless_ticks[:5], w.refused)
    # Nothing lost: every record sealed was opened.
    assert w.record_errors == []
    assert w.records_opened["b"] == w.records_sent["a"] > 600
    assert w.records_opened["a"] == w.records_sent["b"] > 600
    # The replays were all refused, and before any DH: during the attack the responder did no
    # more DH operations than its genuine handshakes need (4 each), give or take a few.
    assert w.replays >= 0.9 * rate * 650 * (2 if scenario == "both-ways" else 1)
    refused_b = sum(w.refused["b"].values())
    assert refused_b >= 0.9 * rate * 650, w.refused
    assert b.stats.dh_operations - dh <= 4 * (b.stats.handshakes_completed - handshakes) + 8, (
        b.stats, w.refused)


def _handshake(w: Wire, initiator: str, until: float) -> None:
    w.s[initiator].start(w.now)
    w.run_until(until)


def test_initiation_captured_before_a_responder_restart_is_refused_after_it() -> None:
    a, b = pair()
    w = Wire(a, b)
    _handshake(w, "a", T0 + 2.0)
    assert b.stats.responses_sent >= 1
    captured = list(w.captured["a"])  # everything A sent B so far: all answered (or refused)
    assert captured

    # kill -9 B and start it again, 3 s later: a new process, the same identity, no memory.
    b2 = PeerSession(KB, PA, PSK, rng=random.Random(7), peer="a", config=CONFIG)
    w.s["b"] = b2
    w.established["b"] = False
    now = T0 + 5.0
    w.now = now
    b2.start(now)  # what the agent does with a new session: it initiates at once
    w.run_until(now + 2.0)
    assert b2.outbound() is not None and a.outbound() is not None  # keys again (B initiated)
    completed = b2.stats.handshakes_completed

    # The attacker replays every initiation it captured before the restart, from A's address,
    # right after the restart and again much later: each one is refused, none answered.
    for at in (now + 3.0, now + 60.0, now + 400.0):
        w.now = at
        for m in captured:
            b2.handshakes_to_send()  # drop anything queued before (keepalive answers etc.)
            with pytest.raises(HandshakeError) as e:
                deliver(b2, m, at, ADDR["a"])
            assert e.value.reason != "rate_limited", e.value  # refused for what it is
            sent = b2.handshakes_to_send()
            assert not [x for x in sent if x[4] == MessageType.RESPONSE], "replay answered"
    assert b2.stats.responses_sent == 0
    assert b2.stats.handshakes_completed == completed


def test_a_restarted_responder_still_answers_the_genuine_peer() -> None:
    """The other half of (2): the restarted responder refuses the old initiations but answers
    A's new ones, first thing after the restart (A initiates, not B)."""
    a, b = pair()
    w = Wire(a, b)
    _handshake(w, "a", T0 + 2.0)
    captured = list(w.captured["a"])
    b2 = PeerSession(KB, PA, PSK, rng=random.Random(7), peer="a", config=CONFIG)
    w.s["b"] = b2
    w.now = T0 + 5.0
    for m in captured:  # replayed before the genuine peer says anything
        with pytest.raises(HandshakeError):
            deliver(b2, m, w.now, ADDR["a"])
    assert b2.stats.responses_sent == 0
    a.close()
    a2 = PeerSession(KA, PB, PSK, rng=random.Random(8), peer="b", config=CONFIG)
    w.s["a"] = a2
    _handshake(w, "a", w.now + 3.0)
    assert a2.outbound() is not None and b2.outbound() is not None
    assert b2.stats.responses_sent >= 1
