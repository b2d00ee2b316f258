"""Per-peer key negotiation for encrypted overlays: a sans-IO state machine, and the handshake
rate limiter.

One `PeerSession` per pair of nodes that share an encrypted network. It follows DESIGN §2::

    session.start(now)                          # we want keys with this peer
    session.receive_handshake(data, now)        # a handshake message from this peer
    session.handle_timer(now) / get_timer()     # retries, rekeys, expiries
    session.handshakes_to_send() -> list[bytes] # to the peer's datapath address
    session.next_event() -> SessionEvent | None
    session.outbound() -> OutboundSA | None     # seal with this; None: queue briefly or drop
    session.inbound_sas() -> Mapping[int, InboundSA]

Rules (WireGuard's timers, IPsec's make-before-break):

- Rekey: the side that initiated the current SA pair starts a new handshake `rekey_after_time`
  (120 s) after it, or as soon as its outbound SA has sealed `rekey_after_messages` (2**40)
  records. The responder only steps in later (`responder_rekey_after_time`, 147.5 s by
  default), so the two sides rarely start at once.
- Lifetimes: the receiver refuses an SA `reject_after_time` (180 s) after installing it; the
  sender stops sealing with it `rekey_timeout` (5 s) earlier (`SessionConfig.send_after`),
  because the responder installs its copy one message delay before the initiator does, and
  records need time in flight. Reaching that point without a replacement (rekeying failed for
  55 s) gives `SessionExpired` and `outbound()` None until a handshake completes.
- Retry: an unanswered initiation is resent (new ephemeral, new SPI, new timestamp) every
  `rekey_timeout` (5 s) plus up to `rekey_jitter`; after `max_attempts` the session reports
  `HandshakeFailed` and keeps retrying every `slow_retry_interval` while the peer is alive.
- Make before break:
  * the initiator reserves its new inbound SPI when it sends the initiation (the keys only exist
    once the response arrives), then installs the new inbound SA and switches its outbound SA
    when the response arrives, and asks for a keepalive (`KeepaliveRequested`) so that the
    responder confirms at once;
  * the responder installs its new inbound SA when it sends the response, but keeps SENDING on
    its old outbound SA until the first record arrives on the new inbound SA: proof that the
    initiator has the keys (WireGuard's confirmation rule). It never sends on an unconfirmed SA,
    since its response may have been lost. If the confirmation is `confirm_timeout` overdue and
    it needs keys (its own rekey time came, or it has no usable SA), it initiates a handshake
    itself: a response is proof too;
  * a replaced inbound SA stays accepted until its own reject time, cut short to `grace_time`
    (10 s) after the first record arrives on the current inbound SA (the peer has switched;
    only records already in flight can still use the old one). At most `MAX_OLD_INBOUND` (2)
    are kept: the previous one, and one from handshakes that crossed.
  So every record sealed with an SA that `outbound()` returned meets an installed inbound SA,
  given one-way delays under `rekey_timeout / 2` (tests check it with handshake loss, record
  reordering and crossing rekeys).
- Simultaneous initiation: if an initiation arrives while ours is unanswered, the side with the
  smaller static public key keeps the initiator role (drops the peer's initiation, counted in
  `stats.simultaneous_dropped`); the other side drops its own initiation and responds. A side
  that has given up (`HandshakeFailed`) yields, since its initiations evidently do not arrive.
  A side that has just answered the peer's initiation does not start one of its own.
- Replayed initiations: the responder keeps the greatest timestamp seen from the peer and
  refuses older or equal ones. Timestamps come from `now + wall_offset`: the agent passes
  `wall_offset = time.time() - loop.time()` so they keep growing across restarts.
- Abuse: initiations pass the cheap gate (shape, version, mac1 keyed by the psk: no DH) and then
  the shared `HandshakeLimiter` (per peer and overall) BEFORE any DH. Messages while the peer is
  not an alive member are dropped (`set_peer_alive`). A session holds at most 5 SPIs (2 old,
  current, next, pending) and one pending handshake, whatever arrives.

Pure: no clock, no sockets, no global random (SPIs and jitter come from the injected
`random.Random`; X25519 key generation uses the OS RNG inside `cryptography`).
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict, deque
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshnet.crypto.handshake import (
    PSK_SIZE,
    TIMESTAMP_SIZE,
    HandshakeError,
    HandshakeResult,
    InitiatorState,
    MessageType,
    ReceivedInitiation,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    message_type,
    response_receiver_spi,
    tai64n,
    verify_initiation_mac,
)
from meshnet.crypto.sa import (
    CIPHERS,
    DEFAULT_CIPHER,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    InboundSA,
    OutboundSA,
    SpiAllocator,
)

__all__ = [
    "CONFIRM_TIMEOUT",
    "GLOBAL_BURST",
    "GLOBAL_RATE",
    "GRACE_TIME",
    "MAX_HANDSHAKE_ATTEMPTS",
    "MAX_LIMITER_ENTRIES",
    "MAX_PSKS",
    "PER_PEER_BURST",
    "PER_PEER_RATE",
    "REJECT_AFTER_MESSAGES",
    "REJECT_AFTER_TIME",
    "REKEY_AFTER_MESSAGES",
    "REKEY_AFTER_TIME",
    "REKEY_JITTER",
    "REKEY_TIMEOUT",
    "SLOW_RETRY_INTERVAL",
    "HandshakeFailed",
    "HandshakeLimiter",
    "InboundChanged",
    "KeepaliveRequested",
    "PeerSession",
    "SessionConfig",
    "SessionEstablished",
    "SessionEvent",
    "SessionExpired",
    "SessionStats",
]

# ---- timers (WireGuard's values unless said otherwise) --------------------------------------

REKEY_AFTER_TIME = 120.0
# REJECT_AFTER_TIME (180 s) lives in sa.py: the SAs enforce it.
# Far below the hard stop (sa.REJECT_AFTER_MESSAGES = 2**48) and far above what 120 s of traffic
# reaches (2**40 records at 10 Mpps is 30 hours): a safety net, not the usual trigger.
REKEY_AFTER_MESSAGES = 1 << 40
REKEY_TIMEOUT = 5.0
# Up to a third of a second added to each retry, so peers that lost packets together do not
# retry in lockstep.
REKEY_JITTER = 0.333
# 18 attempts x 5 s = 90 s, WireGuard's REKEY_ATTEMPT_TIME; then HandshakeFailed and slow retries.
MAX_HANDSHAKE_ATTEMPTS = 18
# Retry interval after giving up, while the peer is still an alive member.
SLOW_RETRY_INTERVAL = 30.0
# How long the previous inbound SA stays accepted after the peer is seen on the new one: far
# more than any RTT plus socket-buffer delay, far less than an SA's life.
GRACE_TIME = 10.0
# A responder waits this long for the initiator's first record on a new SA before, if it needs
# keys to send, it initiates a handshake itself (it never sends on an unconfirmed SA).
CONFIRM_TIMEOUT = REKEY_TIMEOUT

# ---- abuse limits ---------------------------------------------------------------------------

# Per peer: a handshake every 120 s is normal; retries add one per 5 s. 5/s with a burst of 10
# never bites a real peer and caps what a replaying attacker gets per peer address.
PER_PEER_RATE = 5.0
PER_PEER_BURST = 10.0
# Overall: WireGuard's 50 initiations per second. An authenticated initiation costs ~5 X25519
# operations (~0.5 ms here), so this bounds handshake CPU to a few percent of one core. A whole
# 1,000-node cluster restarting at once converges in ~20 s of retries.
GLOBAL_RATE = 50.0
GLOBAL_BURST = 50.0
# Peers tracked by the limiter: above any cluster we target (1,000 nodes) with headroom; ~200
# bytes an entry is under 1 MB. Beyond it the least recently seen entry is forgotten (it then
# starts with a full bucket, still under the global bucket).
MAX_LIMITER_ENTRIES = 4096
# Old inbound SAs kept besides current and next: the previous one after a rekey, plus one from
# a crossed handshake. With current, next and a pending SPI: at most 5 SPIs per peer.
MAX_OLD_INBOUND = 2
# Cluster keys tried on an incoming mac1 (all installed keys during a rotation): the keyring's
# MAX_KEYS. Each costs one HMAC on a garbage message, so it is bounded.
MAX_PSKS = 16


@dataclass(frozen=True, slots=True)
class SessionConfig:
    rekey_after_time: float = REKEY_AFTER_TIME
    reject_after_time: float = REJECT_AFTER_TIME
    rekey_after_messages: int = REKEY_AFTER_MESSAGES
    reject_after_messages: int = REJECT_AFTER_MESSAGES
    rekey_timeout: float = REKEY_TIMEOUT
    rekey_jitter: float = REKEY_JITTER
    max_attempts: int = MAX_HANDSHAKE_ATTEMPTS
    slow_retry_interval: float = SLOW_RETRY_INTERVAL
    grace_time: float = GRACE_TIME
    confirm_timeout: float = CONFIRM_TIMEOUT
    # None: halfway between rekey_after_time and the send deadline (147.5 s by default).
    responder_rekey_after_time: float | None = None
    cipher: str = DEFAULT_CIPHER

    def __post_init__(self) -> None:
        if not 0 < self.rekey_after_time < self.send_after:
            raise ValueError("need 0 < rekey_after_time < reject_after_time - rekey_timeout")
        if not 1 <= self.rekey_after_messages < self.reject_after_messages:
            raise ValueError("need 1 <= rekey_after_messages < reject_after_messages")
        if self.rekey_timeout <= 0 or self.rekey_jitter < 0 or self.max_attempts < 1:
            raise ValueError("need rekey_timeout > 0, rekey_jitter >= 0, max_attempts >= 1")
        if self.slow_retry_interval <= 0 or self.grace_time <= 0 or self.confirm_timeout <= 0:
            raise ValueError("slow_retry_interval, grace_time and confirm_timeout must be > 0")
        r = self.responder_rekey_after
        if not self.rekey_after_time <= r < self.send_after:
            raise ValueError(
                "need rekey_after_time <= responder_rekey_after_time"
                " < reject_after_time - rekey_timeout"
            )
        if self.cipher not in CIPHERS:
            raise ValueError(f"unknown cipher {self.cipher!r}")

    @property
    def send_after(self) -> float:
        """How long an SA may SEAL: `rekey_timeout` less than the receiver accepts it, because
        the receiver's copy of an SA can be older than the sender's by one handshake message's
        delay (the responder installs first), and records need time in flight."""
        return self.reject_after_time - self.rekey_timeout

    @property
    def responder_rekey_after(self) -> float:
        if self.responder_rekey_after_time is not None:
            return self.responder_rekey_after_time
        return (self.rekey_after_time + self.send_after) / 2


# ---- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionEvent:
    peer: str


@dataclass(frozen=True, slots=True)
class SessionEstablished(SessionEvent):
    """A handshake completed: new SAs exist (the responder's outbound waits for confirmation)."""

    inbound_spi: int
    outbound_spi: int
    initiator: bool


@dataclass(frozen=True, slots=True)
class InboundChanged(SessionEvent):
    """The set of accepted inbound SPIs changed: refresh the datapath's SPI table."""


@dataclass(frozen=True, slots=True)
class KeepaliveRequested(SessionEvent):
    """Seal one record (an empty payload is fine) soon, so the responder confirms the new SA.
    Not needed for correctness; it shortens the time both sides keep the old SA."""


@dataclass(frozen=True, slots=True)
class HandshakeFailed(SessionEvent):
    """`attempts` initiations went unanswered; retries continue slowly while the peer is alive."""

    attempts: int


@dataclass(frozen=True, slots=True)
class SessionExpired(SessionEvent):
    """The current SAs reached their send deadline (reject_after_time - rekey_timeout) with no
    replacement: `outbound()` is None until a handshake completes."""


@dataclass(slots=True)
class SessionStats:
    dh_operations: int = 0
    initiations_sent: int = 0
    responses_sent: int = 0
    handshakes_completed: int = 0
    rekeys: int = 0
    simultaneous_dropped: int = 0
    rejected: Counter[str] = field(default_factory=Counter)  # HandshakeError reasons


# ---- the limiter ----------------------------------------------------------------------------


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp

    def refill(self, now: float, rate: float, burst: float) -> None:
        if now > self.stamp:  # a clock that goes backwards refills nothing
            self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
            self.stamp = now


class HandshakeLimiter:
    """Token buckets for handshake initiations: one per peer key and one overall.

    Pure (`now` passed in) and bounded (`max_entries`). Share one per node. A message takes a
    token from both buckets or from neither, so one noisy peer cannot use up the global bucket
    beyond its own rate.
    """

    def __init__(
        self,
        per_peer_rate: float = PER_PEER_RATE,
        per_peer_burst: float = PER_PEER_BURST,
        global_rate: float = GLOBAL_RATE,
        global_burst: float = GLOBAL_BURST,
        max_entries: int = MAX_LIMITER_ENTRIES,
    ) -> None:
        if min(per_peer_rate, per_peer_burst, global_rate, global_burst) <= 0 or max_entries < 1:
            raise ValueError("rates, bursts and max_entries must be positive")
        self.per_peer_rate = per_peer_rate
        self.per_peer_burst = per_peer_burst
        self.global_rate = global_rate
        self.global_burst = global_burst
        self.max_entries = max_entries
        self._global: _Bucket | None = None
        self._peers: OrderedDict[Hashable, _Bucket] = OrderedDict()
        self.allowed = 0
        self.denied = 0

    def __len__(self) -> int:
        return len(self._peers)

    def allow(self, key: Hashable, now: float) -> bool:
        g = self._global
        if g is None:
            g = self._global = _Bucket(self.global_burst, now)
        g.refill(now, self.global_rate, self.global_burst)
        b = self._peers.get(key)
        if b is None:
            if len(self._peers) >= self.max_entries:
                self._peers.popitem(last=False)
            b = self._peers[key] = _Bucket(self.per_peer_burst, now)
        else:
            self._peers.move_to_end(key)
            b.refill(now, self.per_peer_rate, self.per_peer_burst)
        if b.tokens < 1 or g.tokens < 1:
            self.denied += 1
            return False
        b.tokens -= 1
        g.tokens -= 1
        self.allowed += 1
        return True


# ---- the session ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Keypair:
    inbound: InboundSA
    outbound: OutboundSA
    initiator: bool
    created_at: float


@dataclass(slots=True)
class _Pending:
    state: InitiatorState
    spi: int
    sent_at: float
    retry_at: float


def _next_timestamp(now_label: bytes, last: bytes) -> bytes:
    """Strictly increasing labels even when two initiations share a whitened instant."""
    if now_label > last:
        return now_label
    bumped = int.from_bytes(last, "big") + (1 << 24)
    return bumped.to_bytes(TIMESTAMP_SIZE, "big")


class PeerSession:
    """Keys with one peer: handshakes, rekeys, SAs. See the module docstring for the rules."""

    def __init__(
        self,
        local_key: X25519PrivateKey,
        remote_static: bytes,
        psk: bytes | Sequence[bytes],
        *,
        rng: random.Random,
        peer: str = "",
        config: SessionConfig | None = None,
        limiter: HandshakeLimiter | None = None,
        spis: SpiAllocator | None = None,
        wall_offset: float = 0.0,
        alive: bool = True,
    ) -> None:
        if len(remote_static) != 32:
            raise ValueError("remote static key must be 32 bytes")
        self.peer = peer
        self.config = config if config is not None else SessionConfig()
        self._local = local_key
        self._local_pub = local_key.public_key().public_bytes_raw()
        self._remote = bytes(remote_static)
        if self._remote == self._local_pub:
            raise ValueError("a session with ourselves")
        self._psks: tuple[bytes, ...] = ()
        self.set_psks(psk)
        self._rng = rng
        self._limiter = limiter if limiter is not None else HandshakeLimiter()
        self._spis = spis if spis is not None else SpiAllocator(rng)
        self._wall_offset = wall_offset
        self._alive = alive
        self.stats = SessionStats()

        self._current: _Keypair | None = None
        self._next: _Keypair | None = None  # responder side, awaiting confirmation
        # Older inbound SAs still accepted, oldest first, with when each was retired.
        self._old: list[tuple[InboundSA, float]] = []
        self._pending: _Pending | None = None  # our initiation awaiting its response
        self._inbound: dict[int, InboundSA] = {}
        self._attempts = 0
        self._gave_up = False
        self._rekey_wanted = False
        self._wanted = False  # keys were asked for (start) or agreed (a handshake completed)
        self._last_sent_timestamp = b""
        self._last_received_timestamp = b""
        self._last_now = 0.0
        self._out: list[bytes] = []
        self._events: deque[SessionEvent] = deque()

    # ---- configuration ----------------------------------------------------------------------

    @property
    def remote_static(self) -> bytes:
        return self._remote

    @property
    def alive(self) -> bool:
        return self._alive

    def set_psks(self, psk: bytes | Sequence[bytes]) -> None:
        """The psks to accept (all installed cluster keys); the first one is used to initiate."""
        psks = (bytes(psk),) if isinstance(psk, bytes | bytearray) else tuple(map(bytes, psk))
        if not 1 <= len(psks) <= MAX_PSKS or any(len(p) != PSK_SIZE for p in psks):
            raise ValueError(f"need 1..{MAX_PSKS} psks of {PSK_SIZE} bytes")
        self._psks = psks

    def set_peer_alive(self, alive: bool, now: float) -> None:
        """Membership says the peer is (not) an alive member. While not alive, its handshake
        messages are dropped and we stop initiating; existing SAs run out on their own."""
        self._last_now = now
        if alive == self._alive:
            return
        self._alive = alive
        if not alive:
            self._cancel_pending()
            self._rekey_wanted = False
        elif self._current is None and self._next is None:
            self.start(now)

    # ---- the sans-IO interface --------------------------------------------------------------

    def start(self, now: float) -> None:
        """We want keys with this peer (e.g. traffic is waiting). Idempotent."""
        self._last_now = now
        self._wanted = True
        if not self._alive:
            return
        p = self._pending
        if p is not None:
            # Slow-retrying after giving up: traffic is a reason to try again now.
            if self._gave_up and now - p.sent_at >= self.config.rekey_timeout:
                self._send_initiation(now)
            return
        if self._next is not None:
            return  # we just answered the peer's initiation; its confirmation is on the way
        cur = self._current
        if cur is not None and not self._rekey_wanted and now < self._rekey_deadline(cur):
            return
        self._begin_handshake(now)

    def receive_handshake(self, data: bytes, now: float) -> None:
        """A handshake message from this peer. Raises HandshakeError (counted in
        `stats.rejected`) for anything to drop; the caller counts, never logs per message."""
        self._last_now = now
        try:
            self._receive(data, now)
        except HandshakeError as e:
            self.stats.rejected[e.reason] += 1
            raise

    def handshakes_to_send(self) -> list[bytes]:
        out, self._out = self._out, []
        return out

    def next_event(self) -> SessionEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The next absolute deadline (a past one means: call handle_timer now)."""
        # Mirrors handle_timer: every deadline returned here is cleared or moved by it.
        cfg = self.config
        p = self._pending
        cur = self._current
        nxt = self._next
        deadlines: list[float] = []
        if p is not None:
            deadlines.append(p.retry_at)
        elif self._alive and nxt is not None:
            # Unconfirmed answer: initiate ourselves once it is overdue and we need keys.
            due = nxt.created_at + cfg.confirm_timeout
            if cur is not None:
                due = max(due, self._last_now if self._rekey_wanted else self._rekey_deadline(cur))
            deadlines.append(due)
        elif self._alive:
            if cur is not None:
                due = self._last_now if self._rekey_wanted else self._rekey_deadline(cur)
                deadlines.append(due)
            elif self._wanted:
                deadlines.append(self._last_now)
        if cur is not None:
            deadlines.append(cur.created_at + cfg.send_after)
        if nxt is not None:
            deadlines.append(nxt.created_at + cfg.send_after)
        deadlines.extend(self._old_until(sa, retired) for sa, retired in self._old)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        self._last_now = now
        cfg = self.config
        nxt = self._next
        if nxt is not None:
            cur = self._current
            if nxt.inbound.first_seen is not None:
                self._promote_next(now)
            elif now >= nxt.created_at + cfg.send_after:
                self._next = None  # never confirmed, too old to send with
                self._retire(nxt.inbound, now)
        for sa, retired in list(self._old):
            if now >= self._old_until(sa, retired):
                self._old.remove((sa, retired))
                self._drop_inbound(sa)
        cur = self._current
        if cur is not None and now >= cur.created_at + cfg.send_after:
            # Stop sealing; keep accepting until the receive side's own reject time.
            self._current = None
            self._retire(cur.inbound, now)
            self._events.append(SessionExpired(self.peer))
            cur = None
        if not self._alive:
            return
        p = self._pending
        if p is not None:
            if now >= p.retry_at:
                if self._attempts >= cfg.max_attempts and not self._gave_up:
                    self._gave_up = True
                    self._events.append(HandshakeFailed(self.peer, self._attempts))
                self._send_initiation(now)
        elif self._next is not None:
            # We answered the peer's initiation and wait for its first record. We never send on
            # an unconfirmed SA (our response may have been lost); if the confirmation is
            # overdue and we need keys, we initiate: a response is proof.
            nxt = self._next
            if now >= nxt.created_at + cfg.confirm_timeout and (
                cur is None or self._rekey_wanted or now >= self._rekey_deadline(cur)
            ):
                self._begin_handshake(now)
        elif cur is not None:
            if self._rekey_wanted or now >= self._rekey_deadline(cur):
                self._begin_handshake(now)
        elif self._wanted:
            self._begin_handshake(now)  # had keys, lost them: get new ones

    def outbound(self) -> OutboundSA | None:
        """The SA to seal with, or None (queue briefly or drop; never send cleartext)."""
        nxt = self._next
        if nxt is not None and nxt.inbound.first_seen is not None:
            self._promote_next(nxt.inbound.first_seen)
        cur = self._current
        if cur is None:
            return None
        out = cur.outbound
        if out.seq >= self.config.rekey_after_messages:
            self._rekey_wanted = True
            if out.exhausted:
                return None
        return out

    def inbound_sas(self) -> Mapping[int, InboundSA]:
        """Every inbound SA accepted for this peer now: old ones (grace), current, next."""
        return self._inbound

    def close(self) -> None:
        """Forget everything and give the SPIs back (the peer left the encrypted networks)."""
        self._cancel_pending()
        for spi in list(self._inbound):
            self._spis.release(spi)
        self._inbound.clear()
        self._current = self._next = None
        self._old.clear()
        self._wanted = False
        self._events.append(InboundChanged(self.peer))

    def info(self, now: float) -> dict[str, object]:
        """Per-peer numbers for `meshctl network inspect`."""
        cur = self._current
        return {
            "peer": self.peer,
            "established": cur is not None,
            "inbound_spi": cur.inbound.spi if cur else None,
            "outbound_spi": cur.outbound.spi if cur else None,
            "age": now - cur.created_at if cur else None,
            "packets_in": cur.inbound.packets if cur else 0,
            "bytes_in": cur.inbound.bytes if cur else 0,
            "packets_out": cur.outbound.packets if cur else 0,
            "bytes_out": cur.outbound.bytes if cur else 0,
            "rekeys": self.stats.rekeys,
            "handshakes": self.stats.handshakes_completed,
            "handshake_drops": dict(self.stats.rejected),
        }

    # ---- internals ----------------------------------------------------------------------------

    def _count_dh(self) -> None:
        self.stats.dh_operations += 1

    def _rekey_deadline(self, cur: _Keypair) -> float:
        cfg = self.config
        after = cfg.rekey_after_time if cur.initiator else cfg.responder_rekey_after
        return cur.created_at + after

    def _old_until(self, sa: InboundSA, retired: float) -> float:
        """An old inbound SA is accepted until its reject time, cut to `grace_time` once the
        peer has been seen on the current inbound SA (it has moved on; only records already in
        flight can still use the old one)."""
        until = sa.expires_at
        cur = self._current
        if cur is not None and cur.inbound.first_seen is not None:
            until = min(until, max(cur.inbound.first_seen, retired) + self.config.grace_time)
        return until

    def _retire(self, sa: InboundSA, now: float) -> None:
        self._old.append((sa, now))
        while len(self._old) > MAX_OLD_INBOUND:
            oldest, _ = self._old.pop(0)
            self._drop_inbound(oldest)

    def _receive(self, data: bytes, now: float) -> None:
        kind = message_type(data)
        if not self._alive:
            raise HandshakeError("not_alive")
        if kind is MessageType.INITIATION:
            psk = verify_initiation_mac(data, self._local_pub, self._psks)
            if not self._limiter.allow(self._remote, now):
                raise HandshakeError("rate_limited")
            received = consume_initiation(self._local, (psk,), data, self._count_dh)
            if received.initiator_static != self._remote:
                raise HandshakeError("unknown_peer", "initiator is not this session's peer")
            if received.timestamp <= self._last_received_timestamp:
                raise HandshakeError("replay", "initiation timestamp not newer")
            self._last_received_timestamp = received.timestamp
            if self._pending is not None:
                # Both sides initiated: the smaller static key keeps the initiator role, unless
                # it has given up (then its initiations are evidently not getting through).
                if self._local_pub < self._remote and not self._gave_up:
                    self.stats.simultaneous_dropped += 1
                    return
                self._cancel_pending()
            self._respond(received, now)
            return
        pending = self._pending
        if pending is None or response_receiver_spi(data) != pending.spi:
            raise HandshakeError("unexpected", "no pending initiation for this response")
        result = consume_response(pending.state, data, self._count_dh)
        self._pending = None  # its SPI now belongs to the new inbound SA
        self._complete_as_initiator(result, now)

    def _begin_handshake(self, now: float) -> None:
        self._attempts = 0
        self._gave_up = False
        self._send_initiation(now)

    def _send_initiation(self, now: float) -> None:
        cfg = self.config
        self._cancel_pending()
        spi = self._spis.allocate()
        stamp = _next_timestamp(tai64n(now + self._wall_offset), self._last_sent_timestamp)
        self._last_sent_timestamp = stamp
        message, state = create_initiation(
            self._local, self._remote, self._psks[0], spi, stamp, cfg.cipher, self._count_dh
        )
        self._attempts += 1
        if self._gave_up:
            interval = cfg.slow_retry_interval
        else:
            interval = cfg.rekey_timeout + self._rng.uniform(0.0, cfg.rekey_jitter)
        self._pending = _Pending(state, spi, now, now + interval)
        self._rekey_wanted = False
        self._out.append(message)
        self.stats.initiations_sent += 1

    def _cancel_pending(self) -> None:
        p = self._pending
        if p is not None:
            self._pending = None
            self._spis.release(p.spi)

    def _keypair(self, result: HandshakeResult, now: float) -> _Keypair:
        cfg = self.config
        inbound = InboundSA(
            result.inbound_spi,
            result.recv_key,
            result.cipher,
            now,
            lifetime=cfg.reject_after_time,
        )
        outbound = OutboundSA(
            result.outbound_spi,
            result.send_key,
            result.cipher,
            now,
            seq_limit=cfg.reject_after_messages,
        )
        self.stats.handshakes_completed += 1
        self._events.append(
            SessionEstablished(self.peer, result.inbound_spi, result.outbound_spi, result.initiator)
        )
        return _Keypair(inbound, outbound, result.initiator, now)

    def _respond(self, received: ReceivedInitiation, now: float) -> None:
        spi = self._spis.allocate()
        message, result = create_response(received, spi, self._count_dh)
        self._out.append(message)
        self.stats.responses_sent += 1
        if self._next is not None:  # an earlier answer, unconfirmed: keep accepting it a while
            old, self._next = self._next, None
            self._retire(old.inbound, now)
        kp = self._keypair(result, now)
        self._next = kp
        self._inbound[spi] = kp.inbound
        self._events.append(InboundChanged(self.peer))

    def _complete_as_initiator(self, result: HandshakeResult, now: float) -> None:
        if self._next is not None:
            # Handshakes crossed: we answered one of the peer's and it may already send on it
            # (it switches when our response arrives). Keep accepting it, as an old SA.
            old, self._next = self._next, None
            self._retire(old.inbound, now)
        self._install_current(self._keypair(result, now), now)
        self._events.append(KeepaliveRequested(self.peer))

    def _promote_next(self, now: float) -> None:
        kp = self._next
        assert kp is not None
        self._next = None
        self._install_current(kp, now)

    def _install_current(self, kp: _Keypair, now: float) -> None:
        old = self._current
        if old is not None:
            self._retire(old.inbound, now)
            self.stats.rekeys += 1
        self._current = kp
        self._inbound[kp.inbound.spi] = kp.inbound
        self._wanted = True
        self._attempts = 0
        self._gave_up = False
        self._rekey_wanted = False
        self._events.append(InboundChanged(self.peer))

    def _drop_inbound(self, sa: InboundSA) -> None:
        if self._inbound.pop(sa.spi, None) is not None:
            self._spis.release(sa.spi)
            self._events.append(InboundChanged(self.peer))
