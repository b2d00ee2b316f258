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
    are kept: the previous one, and one from handshakes that crossed. When more are replaced
    (answers the peer never got, our own SA it never confirmed), the one dropped is one the
    peer has never been seen on, else the one it was first seen on earliest: never simply the
    one we replaced first, since the peer may still be sealing with it (we retired our side of
    it when our own rekey completed, and the peer switches only when our first record on the
    new SA arrives; a peer that never sends leaves it there until its own rekey completes).
  So every record sealed with an SA that `outbound()` returned meets an installed inbound SA,
  given one-way delays under `rekey_timeout / 2` (tests check it with handshake loss, record
  reordering and crossing rekeys).
- Simultaneous initiation: if an initiation arrives while ours is unanswered, the side with the
  smaller static public key keeps the initiator role (drops the peer's initiation, counted in
  `stats.simultaneous_dropped`); the other side drops its own initiation and responds. A side
  that has given up (`HandshakeFailed`) yields, since its initiations evidently do not arrive.
  A side that has just answered the peer's initiation does not start one of its own.
- Replayed initiations (#14). Timestamps come from `now + wall_offset`: the agent passes
  `wall_offset = time.time() - loop.time()` so they keep growing across restarts. The responder
  refuses an initiation whose timestamp is not above the greatest one it accepted from the peer
  (`replay`), or is older than the session itself less `timestamp_skew` (30 s: `stale`). The
  greatest timestamp lives in memory only, so the second rule is what survives a restart: an
  initiation captured more than 30 s before the responder's session began (its process
  started, or the peer came back) is refused forever. Within those 30 s the cookie rule below
  covers it: a session that has accepted no initiation from its peer yet asks every initiation
  for a cookie first, and a copy captured before the restart carries no mac2 the new process
  can verify (its cookie secret is new), so it only ever gets a cookie reply, which goes to the
  genuine peer. The window is anchored to the session's start rather than sliding with the
  clock, so a peer whose clock is behind by more than the skew is refused only for that much
  after our start (and we initiate to it meanwhile) instead of for good.
  An exact copy of one of the last `SEEN_INITIATIONS` initiations the session acted on
  (answered, refused after DH, or answered with a cookie) is refused before any DH and before
  the load meters count it (`replay`).
- Abuse: initiations pass the cheap gate (shape, version, mac1 keyed by the psk: no DH), then
  the node's shared `HandshakeGuard` BEFORE any DH:
  * load: mac1-valid initiations are metered overall (`LOAD_RATE`) and per source IP
    (`SOURCE_LOAD_RATE`); while either is exceeded (and `LOAD_HOLD` after), and always for a
    session that has accepted no initiation yet, an initiation without a valid mac2 is
    answered with a cookie reply and nothing else (WireGuard's mechanism). A valid mac2 proves
    that the sender receives datagrams at its source address;
  * rate limits: per (source IP, initiator ephemeral), per source IP and overall (token
    buckets; a message takes from all three or from none). The first is what makes replays
    harmless: copies of one captured initiation drain their own bucket, while each genuine
    initiation has a new ephemeral and so a full one.
  Messages while the peer is not an alive member are dropped (`set_peer_alive`). A session
  holds at most 5 SPIs (2 old, current, next, pending) and one pending handshake, whatever
  arrives.
- Cookies on the initiator's side: a cookie reply that opens for our pending initiation (its
  mac1 is the associated data) is kept for `COOKIE_MAX_AGE` and puts mac2 on every initiation
  we send meanwhile; the first one for a pending initiation also re-sends it at once (new
  ephemeral and timestamp, same attempt), so a responder under load costs one round trip.

Pure: no clock, no sockets, no global random (SPIs and jitter come from the injected
`random.Random`; X25519 key generation, the cookie secrets and the cookie reply nonces use the
OS RNG, through `cryptography` and `HandshakeGuard(token_bytes=os.urandom)`).
"""

from __future__ import annotations

import os
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshnet.crypto.handshake import (
    COOKIE_NONCE_SIZE,
    COOKIE_SECRET_SIZE,
    PSK_SIZE,
    TIMESTAMP_SIZE,
    HandshakeError,
    HandshakeResult,
    InitiatorState,
    MessageType,
    ReceivedInitiation,
    consume_cookie_reply,
    consume_initiation,
    consume_response,
    cookie_reply_receiver_spi,
    create_cookie_reply,
    create_initiation,
    create_response,
    initiation_ephemeral,
    initiation_mac1,
    make_cookie,
    message_type,
    response_receiver_spi,
    source_bytes,
    tai64n,
    verify_initiation_mac,
    verify_mac2,
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
    "COOKIE_MAX_AGE",
    "COOKIE_SECRET_MAX_AGE",
    "EPHEMERAL_BURST",
    "EPHEMERAL_RATE",
    "GLOBAL_BURST",
    "GLOBAL_RATE",
    "GRACE_TIME",
    "LOAD_BURST",
    "LOAD_HOLD",
    "LOAD_RATE",
    "MAX_HANDSHAKE_ATTEMPTS",
    "MAX_LIMITER_ENTRIES",
    "MAX_PSKS",
    "REJECT_AFTER_MESSAGES",
    "REJECT_AFTER_TIME",
    "REKEY_AFTER_MESSAGES",
    "REKEY_AFTER_TIME",
    "REKEY_JITTER",
    "REKEY_TIMEOUT",
    "SEEN_INITIATIONS",
    "SLOW_RETRY_INTERVAL",
    "SOURCE_BURST",
    "SOURCE_LOAD_BURST",
    "SOURCE_LOAD_RATE",
    "SOURCE_RATE",
    "TIMESTAMP_SKEW",
    "Addr",
    "HandshakeFailed",
    "HandshakeGuard",
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

# ---- abuse limits (#14: replays and floods) --------------------------------------------------

# Load, metered over initiations whose mac1 is valid (anything else costs two HMACs and is
# dropped before it counts) that are not exact copies of one the session already acted on.
# Overall: half the DH budget (GLOBAL_RATE). A 1,000-node cluster rekeys ~8 times a second
# (999 peers / 120 s); above 25 a second sustained, every source must show a cookie, so a
# flood from spoofed addresses gets a 56-byte reply and no DH long before it could use up the
# budget that genuine peers need.
LOAD_RATE = 25.0
LOAD_BURST = 25.0
# Per source IP: a peer sends one initiation per rekey, a retry every 5 s, and at most a few at
# once (a cookie retry, the re-send when handshakes cross): more than one a second after a
# burst of 4 is not a peer's handshaking, and that source alone must show a cookie.
SOURCE_LOAD_RATE = 1.0
SOURCE_LOAD_BURST = 4.0
# A load lasts this long after the last message over its rate (WireGuard's 1 s), so the
# cookie requirement does not flicker message by message.
LOAD_HOLD = 1.0
# Rate limits, applied to every initiation past the cookie check, before any DH; a message
# takes a token from each of the three buckets or from none:
# - per (source IP, initiator ephemeral key): an ephemeral is made for one initiation, and the
#   same one comes again only as a copy (the agent re-sends a pending initiation once when
#   handshakes cross). 2, then one a minute: copies of a captured initiation drain their own
#   bucket, never the genuine peer's allowance (each of its initiations has a new ephemeral).
EPHEMERAL_BURST = 2.0
EPHEMERAL_RATE = 1.0 / 60.0
# - per source IP: what one address may cost once it has shown it is one (the old per-peer
#   limit; ~10 DH operations a second): far above a peer's needs, and one member with the
#   cluster key cannot take the whole budget.
SOURCE_RATE = 5.0
SOURCE_BURST = 10.0
# - overall: WireGuard's 50 initiations per second. An authenticated initiation costs ~5 X25519
#   operations (~0.5 ms here), so this bounds handshake CPU to a few percent of one core. A
#   whole 1,000-node cluster restarting at once converges in ~20 s of retries.
GLOBAL_RATE = 50.0
GLOBAL_BURST = 50.0
# Entries per table (sources, (source, ephemeral) pairs): above any cluster we target (1,000
# nodes) with headroom; ~200 bytes an entry, under 1 MB a table. Beyond it the least recently
# seen entry is forgotten (it then starts with a full bucket, still under the global bucket).
MAX_LIMITER_ENTRIES = 4096
# Cookies: the responder's secret is replaced every 2 minutes (WireGuard's
# COOKIE_SECRET_MAX_AGE) and the previous one is still accepted for as long, so a cookie is
# good for 2 to 4 minutes at the responder; the initiator uses one for 2 minutes less 5 s of
# travel (WireGuard's COOKIE_SECRET_LATENCY), then waits to be given a new one.
COOKIE_SECRET_MAX_AGE = 120.0
COOKIE_MAX_AGE = COOKIE_SECRET_MAX_AGE - 5.0
# Initiations (their mac1s) a session remembers having acted on: an exact copy of one is refused
# before any DH and is not metered. 16 covers half an hour of a peer's rekeys or a minute of
# its retries, for 256 bytes a peer.
SEEN_INITIATIONS = 16
# A session refuses initiations stamped more than this before it began (see the module
# docstring). It must exceed the clock skew between hosts plus the age of an initiation on
# arrival (the agent re-sends a pending one up to rekey_timeout, 5 s, after making it). Hosts
# run NTP (certificates and key operations already depend on their wall clocks), which keeps
# them within milliseconds; 30 s also covers a VM clock left to drift for days. A larger
# value only widens the window in which an initiation captured before a restart is judged by
# the cookie rule alone (which stops everyone without the cluster key); a smaller one makes a
# host whose clock is behind wait longer after our start before its initiations count.
TIMESTAMP_SKEW = 30.0
# Old inbound SAs kept besides current and next: the previous one after a rekey, plus one from
# a crossed handshake. With current, next and a pending SPI: at most 5 SPIs per peer. Beyond
# it, the one the peer is least likely to still use goes (`_eviction_order`).
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
    timestamp_skew: float = TIMESTAMP_SKEW

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
        if not self.timestamp_skew > 0:
            raise ValueError("timestamp_skew must be > 0")

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
    cookies_sent: int = 0  # cookie replies we answered the peer's initiations with
    cookies_received: int = 0  # cookie replies that opened for our pending initiation
    cookie_retries: int = 0  # initiations re-sent at once with a fresh cookie
    rejected: Counter[str] = field(default_factory=Counter)  # HandshakeError reasons


# ---- the guard ------------------------------------------------------------------------------

Addr = tuple[str, int]


class _Bucket:
    __slots__ = ("stamp", "tokens", "until")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.until = -float("inf")  # a load meter's: over its rate until then

    def refill(self, now: float, rate: float, burst: float) -> None:
        if now > self.stamp:  # a clock that goes backwards refills nothing
            self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
            self.stamp = now


class _Buckets:
    """Token buckets by key, bounded: the least recently seen key is forgotten first."""

    __slots__ = ("burst", "max_entries", "rate", "table")

    def __init__(self, rate: float, burst: float, max_entries: int) -> None:
        self.rate = rate
        self.burst = burst
        self.max_entries = max_entries
        self.table: OrderedDict[Hashable, _Bucket] = OrderedDict()

    def get(self, key: Hashable, now: float) -> _Bucket:
        b = self.table.get(key)
        if b is None:
            if len(self.table) >= self.max_entries:
                self.table.popitem(last=False)
            b = self.table[key] = _Bucket(self.burst, now)
        else:
            self.table.move_to_end(key)
            b.refill(now, self.rate, self.burst)
        return b


def _meter(b: _Bucket, now: float, hold: float) -> bool:
    """Count one message on load meter B; True if it started a load episode."""
    if b.tokens >= 1:
        b.tokens -= 1
        return False
    started = now >= b.until
    b.until = now + hold
    return started


_GUARD_COUNTERS = (
    "initiations", "admitted", "cookie_replies", "limited_ephemeral", "limited_source",
    "limited_global", "load_episodes", "source_load_episodes", "secret_rotations",
)


class HandshakeGuard:
    """What a node decides about an initiation before any DH: is it under load (then the
    sender must show a cookie), and may it spend a DH on it (rate limits). One per node,
    shared by its sessions. Pure (`now` passed in) and bounded (`max_entries` per table); the
    cookie secrets and reply nonces come from `token_bytes` (the OS RNG by default).

    `counters`: initiations (metered), admitted, cookie_replies, limited_ephemeral,
    limited_source, limited_global, load_episodes, source_load_episodes, secret_rotations.
    """

    def __init__(
        self,
        *,
        load_rate: float = LOAD_RATE,
        load_burst: float = LOAD_BURST,
        source_load_rate: float = SOURCE_LOAD_RATE,
        source_load_burst: float = SOURCE_LOAD_BURST,
        load_hold: float = LOAD_HOLD,
        ephemeral_rate: float = EPHEMERAL_RATE,
        ephemeral_burst: float = EPHEMERAL_BURST,
        source_rate: float = SOURCE_RATE,
        source_burst: float = SOURCE_BURST,
        global_rate: float = GLOBAL_RATE,
        global_burst: float = GLOBAL_BURST,
        max_entries: int = MAX_LIMITER_ENTRIES,
        secret_max_age: float = COOKIE_SECRET_MAX_AGE,
        token_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        rates = (load_rate, load_burst, source_load_rate, source_load_burst, ephemeral_rate,
                 ephemeral_burst, source_rate, source_burst, global_rate, global_burst)
        if min(rates) <= 0 or max_entries < 1 or load_hold < 0 or secret_max_age <= 0:
            raise ValueError("rates, bursts, max_entries and secret_max_age must be positive")
        self.load_hold = load_hold
        self.secret_max_age = secret_max_age
        self._token_bytes = token_bytes
        self._load = _Bucket(load_burst, -float("inf"))
        self._load_rate, self._load_burst = load_rate, load_burst
        self._source_load = _Buckets(source_load_rate, source_load_burst, max_entries)
        self._ephemeral = _Buckets(ephemeral_rate, ephemeral_burst, max_entries)
        self._source = _Buckets(source_rate, source_burst, max_entries)
        self._global = _Bucket(global_burst, -float("inf"))
        self._global_rate, self._global_burst = global_rate, global_burst
        self._secret = b""
        self._previous = b""
        self._rotated_at = -float("inf")
        self.counters: Counter[str] = Counter()

    # ---- the decision ---------------------------------------------------------------------

    def admit(
        self, data: bytes, source: Addr | None, now: float, *, want_cookie: bool = False
    ) -> bool:
        """Decide about an initiation whose mac1 verified, from SOURCE. True: go on with the
        DH (a token was taken from each rate limit). False: answer with `cookie_reply` and
        nothing else (under load, or WANT_COOKIE, and no valid mac2). Raises
        HandshakeError("rate_limited")."""
        self.counters["initiations"] += 1
        ip = source[0] if source is not None else None
        loaded = self._metered(ip, now)
        if (loaded or want_cookie) and not verify_mac2(data, self._cookies(source, now)):
            return False
        e = self._ephemeral.get((ip, initiation_ephemeral(data)), now)
        s = self._source.get(ip, now)
        g = self._global
        g.refill(now, self._global_rate, self._global_burst)
        for bucket, name in ((e, "ephemeral"), (s, "source"), (g, "global")):
            if bucket.tokens < 1:
                self.counters[f"limited_{name}"] += 1
                raise HandshakeError("rate_limited", f"{name} limit")
        e.tokens -= 1
        s.tokens -= 1
        g.tokens -= 1
        self.counters["admitted"] += 1
        return True

    def cookie_reply(
        self, initiation: bytes, source: Addr | None, now: float, local_static: bytes, psk: bytes
    ) -> bytes:
        """The cookie reply to INITIATION: the cookie of SOURCE under the current secret."""
        self._rotate(now)
        self.counters["cookie_replies"] += 1
        cookie = make_cookie(self._secret, source_bytes(source))
        nonce = self._token_bytes(COOKIE_NONCE_SIZE)
        return create_cookie_reply(initiation, cookie, local_static, psk, nonce)

    def under_load(self, now: float, source: Addr | None = None) -> bool:
        """Overall, or for SOURCE's IP (read only: nothing is metered)."""
        if now < self._load.until:
            return True
        if source is None:
            return False
        b = self._source_load.table.get(source[0])
        return b is not None and now < b.until

    def info(self, now: float) -> dict[str, object]:
        """For `meshctl status` (datapath.encrypted.handshake_guard)."""
        sources = sum(1 for b in self._source_load.table.values() if now < b.until)
        counters = {name: self.counters[name] for name in _GUARD_COUNTERS}
        return {"under_load": now < self._load.until, "sources_under_load": sources, **counters}

    # ---- internals --------------------------------------------------------------------------

    def _metered(self, ip: str | None, now: float) -> bool:
        g = self._load
        g.refill(now, self._load_rate, self._load_burst)
        if _meter(g, now, self.load_hold):
            self.counters["load_episodes"] += 1
        b = self._source_load.get(ip, now)
        if _meter(b, now, self.load_hold):
            self.counters["source_load_episodes"] += 1
        return now < g.until or now < b.until

    def _rotate(self, now: float) -> None:
        if now - self._rotated_at >= self.secret_max_age or not self._secret:
            fresh = now - self._rotated_at < 2 * self.secret_max_age
            self._previous = self._secret if fresh else b""
            self._secret = self._token_bytes(COOKIE_SECRET_SIZE)
            self._rotated_at = now
            self.counters["secret_rotations"] += 1

    def _cookies(self, source: Addr | None, now: float) -> list[bytes]:
        """SOURCE's cookie under each secret still accepted: the current one, and the previous
        one for `secret_max_age` after it was replaced."""
        self._rotate(now)
        src = source_bytes(source)
        out = [make_cookie(self._secret, src)]
        if self._previous and now - self._rotated_at < self.secret_max_age:
            out.append(make_cookie(self._previous, src))
        return out


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
    mac1: bytes  # the initiation's: a cookie reply to it carries it as associated data
    cookie_retry: bool  # sent at once because a cookie reply came (at most once per attempt)


def _eviction_order(entry: tuple[InboundSA, float]) -> tuple[bool, float]:
    """Which replaced inbound SA to drop first when more than MAX_OLD_INBOUND remain: one the
    peer has never been seen on (an answer it never got or gave up on, our own SA it never
    confirmed: short of records in flight at that very moment, nothing comes on it), then the
    one it was first seen on earliest (it switches SAs in the order we made them, so that is
    the one it left longest ago). Not the one retired first: retiring is our move, not the
    peer's, and the peer may still be sealing with an SA we retired (the responder switches
    only when our first record on the new SA arrives)."""
    first_seen = entry[0].first_seen
    return (first_seen is not None, 0.0 if first_seen is None else first_seen)


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
        guard: HandshakeGuard | None = None,
        spis: SpiAllocator | None = None,
        wall_offset: float = 0.0,
        alive: bool = True,
        now: float | None = None,
    ) -> None:
        """NOW: when the session begins (loop clock), which anchors the timestamp window;
        None takes the first `now` any call passes."""
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
        self._guard = guard if guard is not None else HandshakeGuard()
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
        self._began: float | None = now
        # mac1s of initiations acted on, least recently seen first (a copy refreshes its entry,
        # so one replayed again and again stays remembered).
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self._cookie: bytes | None = None  # the peer's last cookie for us
        self._cookie_at = 0.0
        self._last_now = 0.0 if now is None else now
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
        self._touch(now)
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
        self._touch(now)
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

    def receive_handshake(self, data: bytes, now: float, source: Addr | None = None) -> None:
        """A handshake message from this peer, received from SOURCE (IP, port: what a cookie
        proves; None for callers without addresses). Raises HandshakeError (counted in
        `stats.rejected`) for anything to drop, including an initiation answered with a cookie
        reply ("cookie"); the caller counts, never logs per message."""
        self._touch(now)
        try:
            self._receive(data, now, source)
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
        self._touch(now)
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
            "cookies_sent": self.stats.cookies_sent,
            "cookies_received": self.stats.cookies_received,
            "handshake_drops": dict(self.stats.rejected),
        }

    # ---- internals ----------------------------------------------------------------------------

    def _count_dh(self) -> None:
        self.stats.dh_operations += 1

    def _touch(self, now: float) -> None:
        self._last_now = now
        if self._began is None:
            self._began = now

    def _remember(self, mac1: bytes) -> None:
        self._seen[mac1] = None
        if len(self._seen) > SEEN_INITIATIONS:
            self._seen.popitem(last=False)

    def _timestamp_floor(self) -> bytes:
        """Initiations stamped before this are refused: the session's start less the skew."""
        began = self._began if self._began is not None else self._last_now
        return tai64n(began + self._wall_offset - self.config.timestamp_skew)

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
            victim = min(self._old, key=_eviction_order)  # the first of equals: oldest retired
            self._old.remove(victim)
            self._drop_inbound(victim[0])

    def _receive(self, data: bytes, now: float, source: Addr | None) -> None:
        kind = message_type(data)
        if not self._alive:
            raise HandshakeError("not_alive")
        if kind is MessageType.INITIATION:
            self._receive_initiation(data, now, source)
        elif kind is MessageType.COOKIE_REPLY:
            self._receive_cookie_reply(data, now)
        else:
            self._receive_response(data, now)

    def _receive_initiation(self, data: bytes, now: float, source: Addr | None) -> None:
        psk = verify_initiation_mac(data, self._local_pub, self._psks)
        mac1 = initiation_mac1(data)
        if mac1 in self._seen:
            self._seen.move_to_end(mac1)
            raise HandshakeError("replay", "a copy of an initiation already acted on")
        # Knowing no timestamp of the peer's, we cannot tell a replay from a new initiation by
        # its timestamp: ask for proof of the source address first.
        fresh = not self._last_received_timestamp
        if not self._guard.admit(data, source, now, want_cookie=fresh):
            self._remember(mac1)  # one cookie reply per initiation, however many copies
            self._out.append(self._guard.cookie_reply(data, source, now, self._local_pub, psk))
            self.stats.cookies_sent += 1
            raise HandshakeError("cookie", "answered with a cookie reply")
        try:
            received = consume_initiation(self._local, (psk,), data, self._count_dh)
        except HandshakeError:
            self._remember(mac1)
            raise
        self._remember(mac1)
        if received.initiator_static != self._remote:
            raise HandshakeError("unknown_peer", "initiator is not this session's peer")
        if received.timestamp <= self._last_received_timestamp:
            raise HandshakeError("replay", "initiation timestamp not newer")
        if received.timestamp < self._timestamp_floor():
            raise HandshakeError("stale", "initiation older than this session")
        self._last_received_timestamp = received.timestamp
        if self._pending is not None:
            # Both sides initiated: the smaller static key keeps the initiator role, unless it
            # has given up (then its initiations are evidently not getting through).
            if self._local_pub < self._remote and not self._gave_up:
                self.stats.simultaneous_dropped += 1
                return
            self._cancel_pending()
        self._respond(received, now)

    def _receive_response(self, data: bytes, now: float) -> None:
        pending = self._pending
        if pending is None or response_receiver_spi(data) != pending.spi:
            raise HandshakeError("unexpected", "no pending initiation for this response")
        result = consume_response(pending.state, data, self._count_dh)
        self._pending = None  # its SPI now belongs to the new inbound SA
        self._complete_as_initiator(result, now)

    def _receive_cookie_reply(self, data: bytes, now: float) -> None:
        pending = self._pending
        if pending is None or cookie_reply_receiver_spi(data) != pending.spi:
            raise HandshakeError("unexpected", "no pending initiation for this cookie reply")
        self._cookie = consume_cookie_reply(data, self._remote, pending.state.psk, pending.mac1)
        self._cookie_at = now
        self.stats.cookies_received += 1
        if not pending.cookie_retry:
            # The responder is under load (or just met us): show it the cookie at once, rather
            # than at the next retry. Once per attempt, so cookie replies cannot make us loop.
            self.stats.cookie_retries += 1
            self._send_initiation(now, cookie_retry=True)

    def _begin_handshake(self, now: float) -> None:
        self._attempts = 0
        self._gave_up = False
        self._send_initiation(now)

    def _send_initiation(self, now: float, *, cookie_retry: bool = False) -> None:
        cfg = self.config
        self._cancel_pending()
        spi = self._spis.allocate()
        stamp = _next_timestamp(tai64n(now + self._wall_offset), self._last_sent_timestamp)
        self._last_sent_timestamp = stamp
        cookie = self._cookie
        if cookie is not None and not 0 <= now - self._cookie_at < COOKIE_MAX_AGE:
            cookie = self._cookie = None  # too old: the responder has replaced its secret
        message, state = create_initiation(
            self._local, self._remote, self._psks[0], spi, stamp, cfg.cipher, self._count_dh,
            cookie,
        )
        if not cookie_retry:
            self._attempts += 1
        if self._gave_up:
            interval = cfg.slow_retry_interval
        else:
            interval = cfg.rekey_timeout + self._rng.uniform(0.0, cfg.rekey_jitter)
        self._pending = _Pending(
            state, spi, now, now + interval, initiation_mac1(message), cookie_retry
        )
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
