"""SWIM + Lifeguard membership as a sans-IO state machine (DESIGN §2).

Nothing here reads a clock, opens a socket or touches global randomness: every entry point takes
``now`` and the instance owns an injected ``random.Random``. The caller (the agent shell, or the
simulator) moves bytes and arms one timer at ``get_timer()``.

State rules (one total order, so any set of updates converges whatever the order)
----------------------------------------------------------------------------------
A claim about member X is ``(incarnation, rank)`` with rank alive < suspect < dead < left; a
claim replaces the held one iff it is larger. Concretely:

* alive@a replaces anything held at incarnation < a (suspect refuted, dead/left rejoined);
  never a claim at the same incarnation;
* suspect@s replaces alive@<=s, and suspect/dead/left only from a newer incarnation;
* dead@d replaces alive/suspect@<=d; left stays left (dead@<=l is ignored);
* left@l (a ``dead`` sent by the node about itself) replaces everything at <=l;
* claims about an unknown member other than alive are ignored (we could not probe it);
* claims about ourselves that are not alive at or above our incarnation are refuted by
  raising our incarnation above the claim (unless we are leaving). A restarted node learns its
  old incarnation from the first push-pull and comes back above it.

Lifeguard: awareness scales probe interval and timeout; suspicion timeouts start at the maximum
and shrink with independent confirmations; a suspect hears of its suspicion first (buddy system)
and, beyond memberlist, hears of it at once from the accuser, and answers the accuser directly.
Also beyond memberlist: a holder still without a refutation halfway to its deadline tells the
suspect itself, and a member told of a suspicion or death older than its incarnation answers the
teller with its current alive (a member the refutation's gossip missed learns it in time).
Also beyond memberlist (argued in config.py): an unanswered probe waits ``probe_grace`` past its
interval for a late ack before it suspects; helpers nack at 80% of the probe timeout, so the nack
arrives in time; only an ack before our probe timeout credits our health; and a probe that no
helper nacked penalizes our health without accusing the target until our health is at its worst.
And (#17): a healthy accuser counts the helpers that nacked as confirmations of its suspicion;
helpers forward late acks for one more interval + grace; a declared death is pushed at once.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable, Mapping
from types import MappingProxyType

from meshnet import wire
from meshnet.crypto.incchain import CHAIN_LENGTH, IncChain, reaches
from meshnet.crypto.trust import ALIVE_DOMAIN, LEFT_DOMAIN, Trust
from meshnet.membership.broadcast import BroadcastQueue
from meshnet.membership.config import MembershipConfig
from meshnet.membership.lifeguard import (
    Awareness,
    Suspicion,
    suspicion_bounds,
    suspicion_timeout,
)
from meshnet.membership.messages import (
    CACHE_STAT_KEYS,
    COMPOUND_OVERHEAD,
    COMPOUND_PART_OVERHEAD,
    MAX_CLAIM_INCARNATION,
    MAX_COMPOUND_PARTS,
    MAX_PUSH_PULL_MEMBERS,
    MAX_WANT,
    SEQ_MOD,
    Ack,
    Alive,
    AliveToken,
    Dead,
    DecodeCache,
    IndirectPing,
    Message,
    MsgType,
    Nack,
    Ping,
    PushPull,
    PushPullOverBudget,
    PushPullState,
    Suspect,
    User,
    alive_payload,
    decode_push_pull,
    encode_push_pull_raw,
    left_payload,
    make_compound,
)
from meshnet.membership.types import (
    STATE_CODES,
    STATE_RANK,
    Addr,
    Delegate,
    Member,
    MemberAlive,
    MemberDead,
    MemberEvent,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MembershipProtocolError,
    MemberState,
    MemberSuspect,
    MemberUpdated,
    NodeMeta,
)

ALIVE = MemberState.ALIVE
SUSPECT = MemberState.SUSPECT
DEAD = MemberState.DEAD
LEFT = MemberState.LEFT

# Most members we track. Matches the largest push-pull we accept; a peer announcing more (bug or
# attack) cannot grow our tables past it.
MAX_MEMBERS = MAX_PUSH_PULL_MEMBERS
# Indirect pings we relay at once. Each failed probe in the cluster asks indirect_checks helpers,
# so at N=1000 with a few percent of probes failing we relay a handful; 1024 leaves a wide margin
# and bounds what a flood of ping-reqs can make us hold.
MAX_RELAYS = 1024
# Answers (acks, stale-claim answers) to one source address, per second and in a burst. A
# member pings us about once per probe interval, plus relayed pings when it helps others: tens
# a second would be a flood, or replays, which no member needs answered.
ANSWER_RATE = 50.0
ANSWER_BURST = 100.0
# Source addresses whose answer allowance we track; all forgotten at once when full (a full
# table means a flood, and forgetting only gives each source its burst again).
MAX_ANSWER_SOURCES = 4096
# A delegate (user) message in a compound packet: its type byte and its part's length prefix.
USER_PART_OVERHEAD = 1 + COMPOUND_PART_OVERHEAD
# Events not yet drained by the shell. Past this the oldest are dropped (and counted): a shell
# that stops draining must not make us grow without bound.
MAX_PENDING_EVENTS = 65_536
# Reaped members remembered (name -> incarnation) so that a stale alive from a lagging peer does
# not resurrect them. FIFO-evicted; each entry is ~100 bytes.
MAX_TOMBSTONES = 10_000
# Members reaped while dead (failed, never left or revoked) whose address we keep trying, as
# While a member died less than reap_after ago, reconnect this many times as often (#15: after
# a 40 s partition one side held the other dead 13.7 s after the heal, waiting for a reconnect).
RECENT_DEAD_SPEEDUP = 5
# serf keeps its failed members for reconnect_timeout: name -> (addr, incarnation, reaped at).
# FIFO-evicted; each entry is ~150 bytes, so at most ~1.5 MB.
MAX_FORMER = 10_000
# Local health (Lifeguard awareness, 0..7 on the LAN profile) from which the first timely ack
# starts a push-pull with its sender (at most once per reconnect_interval). A score this high
# takes several probes in a row that failed with no helper answering either: we were cut off,
# not merely losing the odd packet (a failed probe that helpers nack adds nothing).
RESYNC_AWARENESS = 4

# A helper nacks this fraction of a probe timeout after an unanswered ping-req (the Lifeguard
# paper's 80%). The origin sent the ping-req one probe timeout T into its probe and listens until
# interval + grace (>= T + T), so the nack always arrives while the origin still counts nacks; one
# arriving after it gave up would wrongly count against the origin's own health.
NACK_FRACTION = 0.8

_STATE_CODE = {state: i for i, state in enumerate(STATE_CODES)}

# Heap timer kinds.
_T_SUSPICION = 0
_T_RELAY = 1
_T_REAP = 2
_T_STREAM = 3
_T_REMIND = 4

_STAT_KEYS = (
    "packets_received",
    "bytes_received",
    "packets_sent",
    "bytes_sent",
    "bad_packets",
    "misdirected_pings",
    "probes",
    "probe_failures",
    "indirect_probes",
    "relays",
    "relays_dropped",
    "nacks_sent",
    "acks_forwarded",
    "suspicions_raised",
    "suspicions_withheld",
    "deaths_declared",
    "deaths_vetoed",
    "nack_confirmations",
    "deaths_pushed",
    "suspicion_reminders",
    "stale_claims_answered",
    "refutations_pushed",
    "refuted_suspicions",
    "push_pulls_started",
    "push_pulls_completed",
    "push_pulls_failed",
    "push_pulls_served",
    "push_pulls_bad",
    "push_pulls_over_budget",
    "push_pulls_skipped",
    "reconnects",
    "reconnects_former",
    "resyncs",
    "former_returned",
    "former_expired",
    "told_dead",
    "reaped",
    "user_messages",
    "user_dropped",
    "events_dropped",
    "members_refused",
    "claims_out_of_bound",
    "claims_unsigned",
    "claims_above_signed",
    "alives_held",
    "alives_held_dropped",
    "alives_held_expired",
    "cert_fetches",
    "members_dropped",
    "answers_bare",
    "stale_answers_withheld",
    "answers_limited",
    "relays_refused",
    *CACHE_STAT_KEYS,
)
# Alive messages held until their sender's certificate arrives (by name, newest kept).
MAX_HELD = 1024
# A held alive whose certificate has not arrived this long after it was first held is given
# up (checked every reconnect_interval): one that never will (a name no certificate is for)
# must not keep its slot, nor its name in every push-pull's `want`, for good. If it is gossiped
# again, it is held again.
HELD_TTL = 60.0
# A held alive asks its sender for the certificate at most this often (seconds).
CERT_FETCH_INTERVAL = 5.0


class _Node:
    __slots__ = (
        "addr",
        "alive_sig",
        "anchor",
        "heard_at",
        "incarnation",
        "left_sig",
        "meta",
        "meta_bytes",
        "meta_inc",
        "name",
        "signed_inc",
        "state",
        "state_changed_at",
        "suspicion",
        "tok_inc",
        "token",
    )

    def __init__(
        self, meta: NodeMeta, meta_bytes: bytes, incarnation: int, state: MemberState, now: float
    ) -> None:
        self.name = meta.name
        self.addr = meta.addr
        self.meta = meta
        self.meta_bytes = meta_bytes
        self.meta_inc = incarnation  # incarnation of the alive that carried ``meta``
        self.incarnation = incarnation
        self.state = state
        self.state_changed_at = now
        self.suspicion: Suspicion | None = None
        self.heard_at = -1.0  # last ack from it to a probe of ours (direct, late or relayed)
        # With identity: the highest incarnation the node itself has signed (no claim about it
        # above that counts), and its signatures of the alive that carried meta and of a leave.
        self.signed_inc = incarnation
        self.alive_sig = b""
        self.left_sig = b""
        # Its hash chain (crypto/incchain.py): the anchor its signed alive committed to, and
        # the newest token we checked (for incarnation tok_inc), so the next check is one hash.
        self.anchor = b""
        self.tok_inc = 0
        self.token = b""

    def snapshot(self) -> Member:
        return Member(
            self.name, self.addr, self.state, self.incarnation, self.meta, self.state_changed_at
        )


_NO_HELPERS: Mapping[Addr, str] = MappingProxyType({})


class _Probe:
    __slots__ = (
        "acked",
        "expected_nacks",
        "grace_until",
        "helpers",
        "incarnation",
        "indirect_sent",
        "nackers",
        "nacks",
        "node",
        "seq",
        "timeout_at",
    )

    def __init__(self, node: _Node, seq: int, timeout_at: float) -> None:
        self.node = node
        self.seq = seq
        self.incarnation = node.incarnation
        self.timeout_at = timeout_at
        self.acked = False
        self.indirect_sent = False
        self.expected_nacks = 0
        self.nacks = 0
        self.grace_until = 0.0
        # The helpers asked to ping the target for us (address -> name), and those of them that
        # nacked: each one's own ping of the target went unanswered (see _confirm_by_nackers).
        # Shared empty defaults: a probe is made every interval, and few need either.
        self.helpers: Mapping[Addr, str] = _NO_HELPERS
        self.nackers: tuple[str, ...] = ()


class _Relay:
    __slots__ = ("nack", "origin", "origin_seq", "stage")

    def __init__(self, origin: Addr, origin_seq: int, nack: bool) -> None:
        self.origin = origin
        self.origin_seq = origin_seq
        self.nack = nack
        self.stage = 0


class Membership:
    """One member's view of the cluster. See the module docstring for the rules."""

    # Slots, not a __dict__: a simulator holds a thousand of these and touches a random one at
    # every step, so each attribute read is one cache line instead of a hash-table probe.
    __slots__ = (
        "_answers",
        "_at_addr",
        "_awareness",
        "_cert_gen",
        "_chain",
        "_chain_meta",
        "_decode_cache",
        "_delegate",
        "_events",
        "_fetched",
        "_former",
        "_gossip_at",
        "_grace",
        "_heap",
        "_heap_ok",
        "_heap_seq",
        "_held",
        "_inflight",
        "_joining",
        "_leaving",
        "_limit",
        "_limit_n",
        "_me",
        "_n_dead",
        "_n_live",
        "_nodes",
        "_out",
        "_probe",
        "_probe_index",
        "_probe_tick_at",
        "_push_pull_at",
        "_queue",
        "_recent_probes",
        "_reconnect_at",
        "_relays",
        "_resync_at",
        "_returned",
        "_ring",
        "_rng",
        "_seq",
        "_streams",
        "_tombstones",
        "_trust",
        "_want",
        "config",
        "name",
        "stats",
    )

    def __init__(
        self,
        config: MembershipConfig,
        meta: NodeMeta,
        rng: random.Random,
        now: float,
        delegate: Delegate | None = None,
        incarnation: int = 0,
        decode_cache: DecodeCache | None = None,
        trust: Trust | None = None,
    ) -> None:
        """``decode_cache``: memo of decoded broadcasts; a simulator shares one between cores.
        ``trust``: identity (crypto/trust.py): our claims are signed and only members with good
        certificates count; None runs without identity (tests, the cluster key alone)."""
        if trust is not None and trust.name != meta.name:
            raise ValueError(f"trust is {trust.name}'s, not {meta.name}'s")
        if not 0 <= incarnation <= MAX_CLAIM_INCARNATION:
            raise ValueError(f"incarnation {incarnation} outside 0..{MAX_CLAIM_INCARNATION}")
        self.config = config
        self._rng = rng
        self._delegate = delegate
        self._trust = trust
        # alives waiting for their sender's certificate, and when each name was first held
        # (insertion order is that order: a newer alive replaces an older one in place)
        self._held: dict[str, tuple[Alive, float]] = {}
        self._want: set[str] = set()  # names whose certificates we lack
        self._fetched: dict[str, float] = {}  # name -> when we last asked for its certificate
        # trust.generation at our last scan of members' certificates (see _check_certs)
        self._cert_gen = trust.generation if trust is not None else 0
        self._chain: IncChain | None = None  # ours, for the metadata in _chain_meta
        self._chain_meta = b""
        meta_bytes = meta.encode()  # ValueError if over MAX_META_BYTES
        self._me = _Node(meta, meta_bytes, incarnation, ALIVE, now)
        self.name = meta.name
        self._nodes: dict[str, _Node] = {self.name: self._me}
        # Other members by the address their signed alive names: the only sources we answer
        # with more than they sent us (no UDP amplification, see `verified_at`).
        self._at_addr: dict[Addr, _Node] = {}
        self._answers: dict[Addr, list[float]] = {}  # source -> [tokens, at]
        self._ring: list[_Node] = [self._me]  # probe order and random selection
        self._probe_index = 0
        self._n_live = 1  # alive + suspect, including us
        self._n_dead = 0  # members held dead (not left): _reconnect's odds, without a scan
        self._leaving = False
        self._seq = rng.randrange(SEQ_MOD)
        self._awareness = Awareness(config.awareness_max_multiplier)
        self._queue = BroadcastQueue()
        self._limit_n = -1  # retransmit limit memo: (member count it was computed for, limit)
        self._limit = 0
        self.stats: dict[str, int] = dict.fromkeys(_STAT_KEYS, 0)
        # A cache of our own counts its clears in our stats (a shared one keeps its own).
        self._decode_cache = decode_cache if decode_cache is not None else DecodeCache(
            stats=self.stats)
        self._decode_cache.meta.setdefault(meta_bytes, meta)
        self._tombstones: dict[str, int] = {}
        # Failed members past reap_after that we still try to reach (see _reconnect).
        self._former: dict[str, tuple[Addr, int, float]] = {}
        self._returned = False  # set when a former member comes back (see _merge_and_chain)
        self._heap: list[tuple[float, int, int, object]] = []
        self._heap_seq = 0
        self._heap_ok: tuple[float, int, int, object] | None = None  # top known valid
        self._relays: dict[int, _Relay] = {}
        self._out: list[tuple[bytes, Addr]] = []
        self._streams: list[tuple[bytes, Addr]] = []
        self._inflight: dict[Addr, float] = {}  # outbound push-pull -> expiry
        self._joining: set[Addr] = set()  # seeds we sent a join push-pull to
        self._events: deque[MemberEvent] = deque()

        self._probe: _Probe | None = None
        # Probes past their interval, unanswered, still listening for a late ack (see _probe_tick).
        self._grace: list[_Probe] = []
        # Recently finished probes, so that a late ack still counts as evidence of life.
        self._recent_probes: deque[_Probe] = deque(maxlen=4)
        # Stagger the periodic work so that nodes started together do not tick together.
        self._probe_tick_at = now + rng.random() * config.probe_interval
        self._gossip_at: float | None = None
        self._push_pull_at = now + config.push_pull_interval * rng.random()
        self._reconnect_at = now + config.reconnect_interval * (0.5 + rng.random())
        self._resync_at = now  # the earliest a recovery push-pull may start (see _on_ack)
        # Announce ourselves (memberlist's setAlive).
        self._broadcast(self.name, self._alive_msg(), now)

    # ------------------------------------------------------------------ queries

    def verified_at(self, addr: Addr) -> bool:
        """Whether ``addr`` is another member's address, as named by its (signed) alive.

        Only such a source may be sent more bytes than it sent us: anyone else (a spoofed
        source, a replay) gets bare answers no bigger than its question."""
        return addr in self._at_addr

    def members(self) -> list[Member]:
        return [n.snapshot() for n in sorted(self._nodes.values(), key=lambda n: n.name)]

    def local(self) -> Member:
        return self._me.snapshot()

    def member(self, name: str) -> Member | None:
        node = self._nodes.get(name)
        return node.snapshot() if node is not None else None

    def state_of(self, name: str) -> MemberState | None:
        """Cheap lookup for hot loops (the simulator's observers)."""
        node = self._nodes.get(name)
        return node.state if node is not None else None

    def num_alive(self) -> int:
        """Members believed alive or suspect, including ourselves."""
        return self._n_live

    @property
    def incarnation(self) -> int:
        return self._me.incarnation

    @property
    def health_score(self) -> int:
        """Lifeguard local health: 0 (healthy) .. awareness_max_multiplier - 1."""
        return self._awareness.score

    def pending_broadcasts(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ commands

    def join(self, seeds: list[Addr], now: float) -> None:
        """Queue a join push-pull to each seed (any member's address will do)."""
        if self._leaving:
            # Rejoin after leave: come back above the incarnation we left with.
            self._leaving = False
            self._me.incarnation += 1
            self._me.state = ALIVE
            self._me.state_changed_at = now
            self._n_live += 1
            self._broadcast(self.name, self._alive_msg(), now)
        payload = self._encode_state(join=True, now=now)
        for addr in seeds:
            if addr == self._me.addr:
                continue
            self._streams.append((payload, addr))
            self._joining.add(addr)
            expires = now + self.config.stream_timeout
            self._inflight[addr] = expires
            self._push_timer(expires, _T_STREAM, addr)
            self.stats["push_pulls_started"] += 1

    def leave(self, now: float) -> None:
        """Announce a graceful leave: ``left`` at a higher incarnation. Never counted as failure."""
        if self._leaving:
            return
        self._leaving = True
        me = self._me
        me.incarnation += 1
        me.state = LEFT
        me.state_changed_at = now
        self._n_live -= 1
        self._probe = None
        self._grace.clear()
        sig = b""
        if self._trust is not None:
            sig = self._trust.sign(LEFT_DOMAIN, left_payload(me.incarnation, self.name))
            me.left_sig, me.signed_inc = sig, me.incarnation
        self._broadcast(self.name, Dead(me.incarnation, self.name, self.name, sig).encode(), now)

    def update_meta(self, meta: NodeMeta, now: float) -> None:
        """Re-announce ourselves alive at incarnation + 1 with new metadata."""
        if meta.name != self.name:
            raise ValueError("cannot rename a member; start a new one")
        raw = meta.encode()
        me = self._me
        me.meta = meta
        me.meta_bytes = raw
        me.addr = meta.addr
        me.incarnation += 1
        self._broadcast(self.name, self._alive_msg(), now)

    def drop(self, name: str, now: float) -> bool:
        """Forget member NAME at once: its certificate was revoked or expired (the agent
        learns revocations from the store). It is dead, then reaped, on this node; others do
        the same when they learn it. True if it was a member."""
        node = self._nodes.get(name)
        self._held.pop(name, None)
        self._want.discard(name)
        self._fetched.pop(name, None)
        self._former.pop(name, None)  # never tried again
        if node is None or node is self._me:
            return False
        self.stats["members_dropped"] += 1
        if node.state is not DEAD and node.state is not LEFT:
            self._set_state(node, DEAD, now)
            self._emit(MemberDead, node)
        self._reap(node, now)
        return True

    def _check_certs(self, now: float) -> None:
        """Drop members whose certificates expired or were revoked (checked every
        reconnect_interval: expiry is rare and a scan of the members is cheap)."""
        trust = self._trust
        if trust is None:
            return
        if self._held:
            self._expire_held(now)
        # Nothing can have changed unless a revocation arrived or a certificate expired.
        if trust.generation == self._cert_gen and trust.wall(now) < trust.soonest_expiry(now):
            return
        self._cert_gen = trust.generation
        for node in list(self._nodes.values()):
            if node is not self._me and trust.current(node.name, now) is None:
                self.drop(node.name, now)

    # ------------------------------------------------------------------ UDP

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """Handle one datagram. Malformed input is dropped and counted, never raised."""
        stats = self.stats
        stats["packets_received"] += 1
        stats["bytes_received"] += len(data)
        if len(data) > wire.MAX_DATAGRAM_BYTES:
            stats["bad_packets"] += 1
            return
        try:
            msgs = self._decode_cache.decode(data)
        except MembershipProtocolError:
            stats["bad_packets"] += 1
            return
        handle = self._handle
        for msg in msgs:
            handle(msg, addr, now)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        out = self._out
        self._out = []
        return out

    def next_event(self) -> MemberEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        t = self._probe_tick_at
        p = self._probe
        if p is not None and not p.acked and not p.indirect_sent and p.timeout_at < t:
            t = p.timeout_at
        for g in self._grace:
            if g.grace_until < t:
                t = g.grace_until
        if self._gossip_at is not None and self._gossip_at < t:
            t = self._gossip_at
        if self._push_pull_at < t:
            t = self._push_pull_at
        if self._reconnect_at < t:
            t = self._reconnect_at
        heap = self._heap
        if heap and heap[0] is not self._heap_ok:
            while heap and not self._timer_valid(heap[0]):
                heapq.heappop(heap)
            # Checked once per new top, not at every call: a top that turns stale later (its
            # suspicion refuted) costs one early wake-up, where handle_timer drops it.
            self._heap_ok = heap[0] if heap else None
        if heap and heap[0][0] < t:
            t = heap[0][0]
        return t

    def handle_timer(self, now: float) -> None:
        p = self._probe
        if p is not None and not p.acked and not p.indirect_sent and now >= p.timeout_at:
            self._send_indirect(p, now)
        if self._grace:
            self._end_grace(now)
        if now >= self._probe_tick_at:
            self._probe_tick(now)
        if self._gossip_at is not None and now >= self._gossip_at:
            self._gossip(now)
        if now >= self._push_pull_at:
            self._periodic_push_pull(now)
        if now >= self._reconnect_at:
            self._reconnect(now)
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if self._timer_valid(entry):
                self._fire(entry, now)

    # ------------------------------------------------------------------ TCP push-pull

    def streams_to_open(self) -> list[tuple[bytes, Addr]]:
        out = self._streams
        self._streams = []
        return out

    def handle_stream_request(self, data: bytes, addr: Addr, now: float) -> bytes | None:
        """An inbound push-pull: merge the peer's state, return ours (None: drop the stream)."""
        try:
            pp = decode_push_pull(data, self.config.max_push_pull_bytes, self._cache())
        except PushPullOverBudget:
            self.stats["push_pulls_over_budget"] += 1
            return None
        except MembershipProtocolError:
            self.stats["push_pulls_bad"] += 1
            return None
        self.stats["push_pulls_served"] += 1
        self._merge_and_chain(pp, now)
        return self._encode_state(join=False, now=now, peer=pp,
                                  extra=self._told_dead(pp, addr, now))

    def receive_stream_reply(self, data: bytes, addr: Addr, now: float) -> None:
        self._inflight.pop(addr, None)
        joined = addr in self._joining
        self._joining.discard(addr)
        try:
            pp = decode_push_pull(data, self.config.max_push_pull_bytes, self._cache())
        except PushPullOverBudget:
            self.stats["push_pulls_over_budget"] += 1
            return
        except MembershipProtocolError:
            self.stats["push_pulls_bad"] += 1
            return
        self.stats["push_pulls_completed"] += 1
        # A joiner learns the whole cluster from this reply; re-gossiping every member to a
        # cluster that already knows them would be a broadcast storm of N messages per joiner.
        inc = self._me.incarnation
        self._merge_and_chain(pp, now, quiet_new=joined)
        # The other half of _told_dead: a responder we reaped is told so, once at once and
        # then by _reconnect (it is kept as a former member), until it refutes.
        extra = None
        for name, at, tomb in self._reaped_senders(pp, addr, now):
            if name not in self._former:
                self._remember(name, at, tomb, now)
                extra = [self._dead_row(name, at, tomb)]
        # If it told us we are dead (_told_dead), it holds us reaped and our refutation's
        # gossip may reach nobody on its side: hand the new alive over in person.
        told = self._me.incarnation > inc and any(
            st.name == self.name and st.state is DEAD for st in pp.states)
        if extra is None and not told:
            return
        if self._start_push_pull_to(addr, now, extra) and extra is not None:
            self.stats["reconnects_former"] += 1

    def _merge_and_chain(self, pp: PushPull, now: float, quiet_new: bool = False) -> None:
        """_merge; if that brought back a member we had reaped as failed, a partition has
        probably healed: at once try one more such member (one push-pull per member that
        came back, so the chain is bounded by the former list and ends where nobody answers)."""
        self._returned = False
        self._merge(pp, now, quiet_new)
        if self._returned:
            self._returned = False
            self._reconnect_former(now, None)

    def _told_dead(self, pp: PushPull, addr: Addr, now: float) -> list[list[object]] | None:
        """Rows for a reply: a requester we reaped, whose own row is not above the incarnation
        we reaped it at, is told so (dead at that incarnation). It is evidently running: it
        refutes with a signed alive above our tombstone, which we would otherwise ignore
        forever."""
        if not self._tombstones:
            return None
        return [self._dead_row(*r) for r in self._reaped_senders(pp, addr, now)] or None

    def _reaped_senders(self, pp: PushPull, addr: Addr,
                        now: float) -> list[tuple[str, Addr, int]]:
        """(name, address, tombstone) of the sender's own alive row in PP if we reaped it at
        or above that incarnation; never for a member whose certificate is revoked or expired
        (nor for one that left: its own row says left)."""
        tombs = self._tombstones
        out: list[tuple[str, Addr, int]] = []
        if not tombs:
            return out
        trust = self._trust
        for st in pp.states:
            tomb = tombs.get(st.name)
            if tomb is None or st.incarnation > tomb or st.state is not ALIVE:
                continue  # above it: _merge_signed takes it back if its chain proves it
            # The sender's own row: with identity the one it signs, else its address's.
            if trust is not None:
                if not st.alive_sig or trust.current(st.name, now) is None:
                    continue
            elif st.meta.addr[0] != addr[0]:
                continue
            out.append((st.name, st.meta.addr, tomb))
        return out

    def _dead_row(self, name: str, addr: Addr, inc: int) -> list[object]:
        """A push-pull row saying NAME is dead at INC (the metadata is a stub: a dead row's
        metadata is never applied)."""
        self.stats["told_dead"] += 1
        return [name, inc, _STATE_CODE[DEAD], NodeMeta(name, addr).encode()]

    def stream_failed(self, addr: Addr, now: float) -> None:
        self._inflight.pop(addr, None)
        self._joining.discard(addr)
        self.stats["push_pulls_failed"] += 1

    # ------------------------------------------------------------------ internals: timers

    def _push_timer(self, when: float, kind: int, key: object) -> None:
        self._heap_seq += 1
        heapq.heappush(self._heap, (when, self._heap_seq, kind, key))

    def _timer_valid(self, entry: tuple[float, int, int, object]) -> bool:
        when, _, kind, key = entry
        if kind == _T_SUSPICION:
            node = self._nodes.get(key)  # type: ignore[call-overload]
            return node is not None and node.suspicion is not None and (
                node.suspicion.deadline == when
            )
        if kind == _T_REMIND:
            node = self._nodes.get(key)  # type: ignore[call-overload]
            susp = None if node is None else node.suspicion
            return susp is not None and not susp.reminded and susp.remind_at == when
        if kind == _T_RELAY:
            return key in self._relays
        if kind == _T_REAP:
            node = self._nodes.get(key)  # type: ignore[call-overload]
            return (
                node is not None
                and node is not self._me
                and node.state in (DEAD, LEFT)
                and node.state_changed_at + self.config.reap_after == when
            )
        expiry: float | None = self._inflight.get(key)  # type: ignore[call-overload]
        return expiry == when

    def _fire(self, entry: tuple[float, int, int, object], now: float) -> None:
        _, _, kind, key = entry
        if kind == _T_SUSPICION:
            node = self._nodes[key]  # type: ignore[index]
            susp = node.suspicion
            assert susp is not None
            base = susp.start + suspicion_timeout(susp.confirmations, susp.k, susp.lo, susp.hi)
            due = susp.start + (base - susp.start) * (self._awareness.score + 1)
            if now < due:
                # Lifeguard, one step further: a member in poor local health (its own probes
                # fail, it is late to hear refutations) is slower to declare others dead.
                susp.deadline = due
                self._arm_suspicion(node)
                return
            if node.heard_at > susp.start and now - node.heard_at < susp.hi:
                # It answered one of our probes after the suspicion began: slow, not dead. Give
                # its refutation another minimum period, and remind it (buddy system).
                self.stats["deaths_vetoed"] += 1
                susp.deadline = now + susp.lo
                self._arm_suspicion(node)
                self._send([Suspect(node.incarnation, node.name, self.name).encode()], node.addr)
                return
            self.stats["deaths_declared"] += 1
            dead = Dead(node.incarnation, node.name, self.name)
            self._on_dead(dead, now)
            # (#17) Start the epidemic now rather than at the next gossip tick, as a refutation
            # does: every member waits for it before it reschedules the dead member's tasks.
            self.stats["deaths_pushed"] += 1
            self._push_bare(dead.encode())
        elif kind == _T_REMIND:
            # Buddy system, from every holder: halfway to our deadline and still no refutation,
            # so tell the suspect ourselves. Its refutation, or its current alive if it refuted
            # long ago (see _answer_stale), comes straight back with half the timeout to spare.
            # Bare: a packet to a node that may be dead must not use up broadcast transmits.
            node = self._nodes[key]  # type: ignore[index]
            assert node.suspicion is not None
            node.suspicion.reminded = True
            self.stats["suspicion_reminders"] += 1
            self._send_bare(Suspect(node.incarnation, node.name, self.name).encode(), node.addr)
        elif kind == _T_RELAY:
            seq = key
            relay = self._relays[seq]  # type: ignore[index]
            if relay.stage == 0:
                if relay.nack:
                    self.stats["nacks_sent"] += 1
                    self._send([Nack(relay.origin_seq).encode()], relay.origin)
                # Keep listening: a late ack is still forwarded. The origin waits for one until
                # the end of its probe interval and grace, and (#17) one that comes later still
                # vetoes the death of a member it went on to suspect (a slow inbox, whose ack to
                # the origin itself was lost), so we listen one more interval and grace: past
                # the origin's earliest deadline at Lifeguard's minimum in a small cluster.
                relay.stage = 1
                cfg = self.config
                self._push_timer(
                    now + 2 * cfg.probe_interval + cfg.probe_grace
                    - NACK_FRACTION * cfg.probe_timeout,
                    _T_RELAY,
                    seq,
                )
            else:
                del self._relays[seq]  # type: ignore[arg-type]
        elif kind == _T_REAP:
            self._reap(self._nodes[key], now, remember=True)  # type: ignore[index]
        else:
            self._inflight.pop(key, None)  # type: ignore[call-overload]
            self.stats["push_pulls_failed"] += 1

    # ------------------------------------------------------------------ internals: probing

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % SEQ_MOD
        return self._seq

    def _probe_tick(self, now: float) -> None:
        p = self._probe
        if p is not None:
            if p.acked:
                self._recent_probes.append(p)
            else:
                # The ack window is the probe interval plus a grace (one probe timeout, scaled
                # by our health like the rest): our helpers listen that long for the target's
                # late ack, and an answer that arrives in it costs nothing, while a suspicion
                # raised and refuted half a second later costs the cluster two broadcasts.
                p.grace_until = now + self._awareness.scale(self.config.probe_grace)
                self._grace.append(p)
                if self.config.probe_grace <= 0:
                    self._end_grace(now)
        self._probe = None
        interval = self._awareness.scale(self.config.probe_interval)
        self._probe_tick_at = now + interval
        if self._leaving:
            return
        node = self._next_probe_target()
        if node is None:
            return
        seq = self._next_seq()
        self._probe = _Probe(node, seq, now + self._awareness.scale(self.config.probe_timeout))
        self.stats["probes"] += 1
        parts = []
        if node.state is SUSPECT:
            # Buddy system: the suspect hears of its suspicion before the ping, and the refutation
            # it queues rides back on the ack.
            parts.append(Suspect(node.incarnation, node.name, self.name).encode())
        parts.append(Ping(seq, node.name, self.name).encode())
        self._send(parts, node.addr)

    def _end_grace(self, now: float) -> None:
        """Fail the probes whose grace has run out without an ack."""
        keep: list[_Probe] = []
        for p in self._grace:
            if now >= p.grace_until:
                self._recent_probes.append(p)
                self._probe_failed(p, now)
            else:
                keep.append(p)
        self._grace = keep

    def _next_probe_target(self) -> _Node | None:
        ring = self._ring
        checked = 0
        while checked <= len(ring):
            if self._probe_index >= len(ring):
                self._rng.shuffle(ring)
                self._probe_index = 0
                checked += 1
                continue
            node = ring[self._probe_index]
            self._probe_index += 1
            checked += 1
            if node is self._me or node.state is DEAD or node.state is LEFT:
                continue
            return node
        return None

    def _send_indirect(self, p: _Probe, now: float) -> None:
        p.indirect_sent = True
        target = p.node
        helpers = self._k_random(
            self.config.indirect_checks,
            lambda n: n is not target and n.state is ALIVE,
        )
        p.expected_nacks = len(helpers)
        if not helpers:
            return
        p.helpers = {h.addr: h.name for h in helpers}
        self.stats["indirect_probes"] += 1
        msg = IndirectPing(p.seq, target.name, target.addr, True).encode()
        for h in helpers:
            self._send([msg], h.addr)

    def _probe_failed(self, p: _Probe, now: float) -> None:
        self.stats["probe_failures"] += 1
        if p.expected_nacks > 0:
            missing = p.expected_nacks - p.nacks
            if missing > 0:
                self._awareness.apply_delta(missing)
        else:
            self._awareness.apply_delta(1)
        node = p.node
        if self._nodes.get(node.name) is not node or node.state not in (ALIVE, SUSPECT):
            return
        if node.incarnation != p.incarnation:
            return  # it refuted while we probed: our failure is about an older life
        aw = self._awareness
        if p.expected_nacks > 0 and p.nacks == 0 and aw.score < aw.max_multiplier - 1:
            # Not one helper answered either: the silence is more likely ours (a slow inbox,
            # a broken link) than the target's, and the penalty above already says so. Accuse
            # only once our health is at its worst: a node cut off from everyone still ends up
            # suspecting the others, a few probes later and with its timeouts fully stretched.
            self.stats["suspicions_withheld"] += 1
            return
        msg = Suspect(p.incarnation, node.name, self.name)
        self._on_suspect(msg, now)
        self._confirm_by_nackers(p, node)
        # Tell the suspect at once (Lifeguard's buddy system, without waiting for the next probe).
        self._send([msg.encode()], node.addr)

    def _confirm_by_nackers(self, p: _Probe, node: _Node) -> None:
        """Count each helper that nacked this probe as an independent confirmation of our
        suspicion (``nacks_confirm``): its own ping of the target, from another vantage point,
        went unanswered, which is what a confirming member's suspicion says. Local only: we
        never gossip a suspicion in a helper's name, so only our own timer shortens, and we are
        the member the suspect answers first (buddy system). Only while our own health is
        perfect: a member whose probes fail is likely cut off with its helpers (a partition, a
        stall), and Lifeguard makes it slower to accuse, not faster. See config.py."""
        susp = node.suspicion
        if not self.config.nacks_confirm or susp is None or node.state is not SUSPECT or \
                node.incarnation != p.incarnation or self._awareness.score > 0:
            return
        counted = sum(1 for name in p.nackers if susp.confirm(name))
        if counted:
            self.stats["nack_confirmations"] += counted
            self._arm_suspicion(node)

    # ------------------------------------------------------------------ internals: dispatch

    def _handle(self, msg: Message, addr: Addr, now: float) -> None:
        # Most frequent first: at scale, nearly every part is a gossiped suspect or alive.
        t = type(msg)
        if t is Suspect:
            self._on_suspect(msg, now, addr)  # type: ignore[arg-type]
        elif t is Alive:
            self._on_alive(msg, now)  # type: ignore[arg-type]
        elif t is AliveToken:
            self._on_alive_token(msg, now)  # type: ignore[arg-type]
        elif t is Ping:
            self._on_ping(msg, addr, now)  # type: ignore[arg-type]
        elif t is Ack:
            self._on_ack(msg, now)  # type: ignore[arg-type]
        elif t is Dead:
            self._on_dead(msg, now, addr)  # type: ignore[arg-type]
        elif t is IndirectPing:
            self._on_indirect_ping(msg, addr, now)  # type: ignore[arg-type]
        elif t is Nack:
            seq = msg.seq  # type: ignore[union-attr]
            p = self._probe
            if p is not None and p.seq == seq:
                self._on_nack(p, addr)
            else:
                for g in self._grace:
                    if g.seq == seq:
                        self._on_nack(g, addr)
        elif t is User:
            self.stats["user_messages"] += 1
            if self._delegate is not None:
                self._delegate.notify_message(msg.data)  # type: ignore[union-attr]

    @staticmethod
    def _on_nack(p: _Probe, addr: Addr) -> None:
        p.nacks += 1
        helper = p.helpers.get(addr)
        if helper is not None and helper not in p.nackers:
            p.nackers = (*p.nackers, helper)  # once per helper asked, however many nacks it sends

    def _may_answer(self, addr: Addr, now: float) -> bool:
        """A token bucket per source: ANSWER_RATE answers a second, ANSWER_BURST at once."""
        answers = self._answers
        bucket = answers.get(addr)
        if bucket is None:
            if len(answers) >= MAX_ANSWER_SOURCES:
                answers.clear()
            bucket = answers[addr] = [ANSWER_BURST, now]
        else:
            bucket[0] = min(ANSWER_BURST, bucket[0] + (now - bucket[1]) * ANSWER_RATE)
            bucket[1] = now
        if bucket[0] < 1.0:
            self.stats["answers_limited"] += 1
            return False
        bucket[0] -= 1.0
        return True

    def _on_ping(self, msg: Ping, addr: Addr, now: float) -> None:
        if msg.target != self.name:
            self.stats["misdirected_pings"] += 1
            return
        if not self._may_answer(addr, now):
            return
        ack = Ack(msg.seq).encode()
        src = self._at_addr.get(addr)
        if src is None:
            # Not a member's address: the ack alone, which is smaller than the ping.
            self.stats["answers_bare"] += 1
            self._send_bare(ack, addr)
            return
        parts = [ack]
        if src.name == msg.source and src.state in (SUSPECT, DEAD):
            # It is evidently running but we hold it suspect/dead: tell it, so it refutes.
            if src.state is SUSPECT:
                parts.append(Suspect(src.incarnation, src.name, self.name).encode())
            else:
                parts.append(Dead(src.incarnation, src.name, self.name).encode())
        self._send(parts, addr)

    def _on_ack(self, msg: Ack, now: float) -> None:
        p = self._probe
        if p is not None and p.seq == msg.seq:
            p.node.heard_at = now
            if not p.acked:
                p.acked = True
                if self._awareness.score >= RESYNC_AWARENESS and now >= self._resync_at:
                    # Our probes were failing with no helper answering: we were cut off (a
                    # partition, a dead link, a stall) and the first member to answer is the
                    # way back. Sync with it now instead of waiting out push_pull_interval:
                    # we learn what changed meanwhile (restarts, deaths, our own death, which
                    # we then refute), and it learns we are back.
                    self._resync_at = now + self.config.reconnect_interval
                    if self._start_push_pull(p.node, now):
                        self.stats["resyncs"] += 1
                if not p.indirect_sent:
                    # Only a timely answer is evidence of our own health: an ack we process
                    # after our probe timeout may be late because *we* are slow (Lifeguard).
                    self._awareness.apply_delta(-1)
            return
        grace = self._grace
        for i, g in enumerate(grace):
            if g.seq == msg.seq:
                # Late but inside the grace: the target lives, no suspicion (and, being late,
                # no health credit).
                g.node.heard_at = now
                g.acked = True
                del grace[i]
                self._recent_probes.append(g)
                return
        for old in self._recent_probes:
            if old.seq == msg.seq:
                old.node.heard_at = now  # late, but alive
                return
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            self.stats["acks_forwarded"] += 1
            self._send([Ack(relay.origin_seq).encode()], relay.origin)

    def _on_indirect_ping(self, msg: IndirectPing, addr: Addr, now: float) -> None:
        target = self._nodes.get(msg.target)
        if target is None or target is self._me or target.addr != msg.addr:
            # We ping only members, at the address they signed, for members: never an address
            # a message names (that would make us a reflector).
            self.stats["relays_refused"] += 1
            return
        if len(self._relays) >= MAX_RELAYS:
            self.stats["relays_dropped"] += 1
            return
        self.stats["relays"] += 1
        seq = self._next_seq()
        self._relays[seq] = _Relay(addr, msg.seq, msg.nack)
        # Nack before the origin's deadline (Lifeguard sends it at 80% of the probe timeout): a
        # nack arriving after the origin gave up would count against the origin's health.
        self._push_timer(now + NACK_FRACTION * self.config.probe_timeout, _T_RELAY, seq)
        self._send([Ping(seq, msg.target, self.name).encode()], msg.addr)

    # ------------------------------------------------------------------ internals: state

    def _cache(self) -> DecodeCache:
        return self._decode_cache

    def _set_state(self, node: _Node, state: MemberState, now: float) -> None:
        was_live = node.state is ALIVE or node.state is SUSPECT
        is_live = state is ALIVE or state is SUSPECT
        self._n_live += is_live - was_live
        self._n_dead += (state is DEAD) - (node.state is DEAD)
        if node.state is not state:
            node.state = state
            node.state_changed_at = now
        if state is not SUSPECT:
            node.suspicion = None
        if state is DEAD or state is LEFT:
            self._push_timer(now + self.config.reap_after, _T_REAP, node.name)

    def _emit(self, cls: type[MemberEvent], node: _Node) -> None:
        if len(self._events) >= MAX_PENDING_EVENTS:
            self._events.popleft()
            self.stats["events_dropped"] += 1
        self._events.append(cls(node.snapshot()))

    def _alive_msg(self) -> bytes:
        """Our alive at our incarnation. With identity: a refutation with unchanged metadata
        is proved by the next token of our hash chain (16 bytes); otherwise a full alive signed
        with our key, committing to a fresh chain."""
        me = self._me
        trust = self._trust
        if trust is None:
            return Alive(me.incarnation, me.meta, me.meta_bytes).encode()
        me.signed_inc = max(me.signed_inc, me.incarnation)
        chain = self._chain
        d = me.incarnation - me.meta_inc
        if chain is not None and self._chain_meta == me.meta_bytes and 0 < d <= CHAIN_LENGTH:
            me.tok_inc, me.token = me.incarnation, chain.token(d)
            return AliveToken(me.incarnation, self.name, me.token).encode()
        if chain is None or self._chain_meta != me.meta_bytes or d != 0:
            chain = self._chain = IncChain(trust.chain_seed(me.incarnation, me.meta_bytes))
            self._chain_meta = me.meta_bytes
        me.meta_inc = me.incarnation
        me.anchor, me.tok_inc, me.token = chain.anchor, 0, b""
        me.alive_sig = trust.sign(ALIVE_DOMAIN,
                                  alive_payload(me.incarnation, me.meta_bytes, chain.anchor))
        return Alive(me.incarnation, me.meta, me.meta_bytes, me.alive_sig, chain.anchor).encode()

    def _refute(self, claimed: int, accuser: str | None, now: float, full: bool = False) -> None:
        """Someone says we are not alive at ``claimed``: come back above it."""
        me = self._me
        if claimed > me.incarnation or full:
            # A life of ours we do not remember (we restarted) holds a higher incarnation, or
            # another metadata at ours: the cluster holds another chain of ours, so this is a
            # full signed alive, with the chain later refutations are proved by.
            self._chain = None
        me.incarnation = max(me.incarnation, claimed) + 1
        self.stats["refuted_suspicions"] += 1
        self._awareness.apply_delta(1)
        msg = self._alive_msg()
        self._broadcast(self.name, msg, now)
        if accuser is not None and accuser != self.name:
            acc = self._nodes.get(accuser)
            if acc is not None and (acc.state is ALIVE or acc.state is SUSPECT):
                self._send([msg], acc.addr)
        self._push_refutation(msg)

    def _signed_alive(self, a: Alive, now: float) -> bool:
        """With identity: did the node itself sign this alive? Without its certificate the
        alive is held (bounded) and the certificate asked for; it is never applied unverified."""
        trust = self._trust
        if trust is None:
            return True
        name = a.meta.name
        ok = trust.verify(name, ALIVE_DOMAIN,
                          alive_payload(a.incarnation, a.meta_bytes, a.anchor), a.sig, now)
        if ok is None:
            self._hold(a, now)
            return False
        if not ok:
            self.stats["claims_unsigned"] += 1
        return ok

    def _hold(self, a: Alive, now: float) -> None:
        name = a.meta.name
        held = self._held.get(name)
        if held is None and len(self._held) >= MAX_HELD:
            self.stats["alives_held_dropped"] += 1
            return
        if held is None:
            self._held[name] = (a, now)
            self.stats["alives_held"] += 1
        elif a.incarnation > held[0].incarnation:
            self._held[name] = (a, held[1])
            self.stats["alives_held"] += 1
        self._want.add(name)
        last = self._fetched.get(name)
        # The node itself surely has its certificate: ask it (any member would do).
        if (last is None or now - last >= CERT_FETCH_INTERVAL) and \
                self._start_push_pull_to(a.meta.addr, now):
            self._fetched[name] = now
            self.stats["cert_fetches"] += 1

    def _release_held(self, name: str, now: float) -> None:
        """NAME's certificate arrived: apply what we held for it."""
        self._want.discard(name)
        self._fetched.pop(name, None)
        held = self._held.pop(name, None)
        if held is not None:
            self._on_alive(held[0], now)

    def _expire_held(self, now: float) -> None:
        """Give up the alives held longer than HELD_TTL (oldest first: insertion order)."""
        held = self._held
        while held:
            name, (_, since) = next(iter(held.items()))
            if now - since < HELD_TTL:
                return
            del held[name]
            self._want.discard(name)
            self._fetched.pop(name, None)
            self.stats["alives_held_expired"] += 1

    def _on_alive(self, a: Alive, now: float, quiet: bool = False, proven: int = -1) -> None:
        """PROVEN: a newer incarnation of the node that a token checked against this alive's
        anchor proves (a push-pull row, see _merge_signed); it counts against a tombstone."""
        if a.incarnation > MAX_CLAIM_INCARNATION:
            self.stats["claims_out_of_bound"] += 1
            return
        name = a.meta.name
        node = self._nodes.get(name)
        if node is self._me:
            if self._leaving:
                return
            # Only our own signature (a previous life of ours) may push us up.
            if (a.incarnation > self._me.incarnation or (
                a.incarnation == self._me.incarnation and a.meta_bytes != self._me.meta_bytes
            )) and self._signed_alive(a, now):
                self._refute(a.incarnation, None, now, full=True)
            return
        if node is None:
            tomb = self._tombstones.get(name)
            if tomb is not None and a.incarnation <= tomb and proven <= tomb:
                return
            if len(self._nodes) >= MAX_MEMBERS:
                self.stats["members_refused"] += 1
                return
            if not self._signed_alive(a, now):
                return
            self._tombstones.pop(name, None)
            if self._former and self._former.pop(name, None) is not None:
                self.stats["former_returned"] += 1
                self._returned = True
            node = _Node(a.meta, a.meta_bytes, a.incarnation, ALIVE, now)
            node.alive_sig, node.anchor = a.sig, a.anchor
            self._nodes[name] = node
            self._at_addr[node.addr] = node
            self._n_live += 1
            ring = self._ring
            ring.append(node)
            # Random position, as memberlist: appending everyone would make fresh members wait
            # a whole round before their first probe.
            off = int(self._rng.random() * len(ring))
            ring[off], ring[-1] = ring[-1], ring[off]
            if not quiet:
                self._broadcast(name, a.encode(), now)
            self._emit(MemberJoined, node)
            return
        if a.incarnation <= node.incarnation:
            if a.incarnation > node.meta_inc and self._signed_alive(a, now):
                # Metadata travels only in alive messages: keep the newest even when a newer
                # suspicion already overtook it, so views converge whatever the order.
                node.meta, node.meta_bytes = a.meta, a.meta_bytes
                self._move(node, a.meta.addr)
                node.meta_inc = a.incarnation
                node.alive_sig, node.anchor, node.tok_inc, node.token = a.sig, a.anchor, 0, b""
                node.signed_inc = max(node.signed_inc, a.incarnation)
            return
        if not self._signed_alive(a, now):
            return
        old = node.state
        meta_changed = a.meta_bytes != node.meta_bytes
        node.incarnation = a.incarnation
        node.meta = a.meta
        node.meta_bytes = a.meta_bytes
        node.meta_inc = a.incarnation
        node.alive_sig, node.anchor, node.tok_inc, node.token = a.sig, a.anchor, 0, b""
        node.signed_inc = max(node.signed_inc, a.incarnation)
        self._move(node, a.meta.addr)
        self._broadcast(name, a.encode(), now)
        if old is not ALIVE:
            self._set_state(node, ALIVE, now)
            self._emit(MemberAlive if old is SUSPECT else MemberJoined, node)

        elif meta_changed:
            self._emit(MemberUpdated, node)

    def _on_alive_token(self, t: AliveToken, now: float) -> None:
        """A refutation proved by the node's hash chain: alive at a newer incarnation with the
        metadata (and anchor) of its last signed alive. Checked only when it is news."""
        node = self._nodes.get(t.node)
        if node is None or node is self._me or self._trust is None:
            return  # unknown, ours (a previous life's: push-pull brings the signed form), or
            # without identity, where tokens mean nothing
        if t.incarnation > MAX_CLAIM_INCARNATION:
            self.stats["claims_out_of_bound"] += 1
            return
        if t.incarnation <= node.incarnation:
            return
        if node.tok_inc > node.meta_inc and node.tok_inc < t.incarnation:
            start_inc, start = node.tok_inc, node.token
        else:
            start_inc, start = node.meta_inc, node.anchor
        if not start or not reaches(t.token, t.incarnation - start_inc, start):
            self.stats["claims_unsigned"] += 1
            return
        old = node.state
        node.incarnation = t.incarnation
        node.signed_inc = max(node.signed_inc, t.incarnation)
        node.tok_inc, node.token = t.incarnation, t.token
        self._broadcast(node.name, t.encode(), now)
        if old is not ALIVE:
            self._set_state(node, ALIVE, now)
            self._emit(MemberAlive if old is SUSPECT else MemberJoined, node)

    def _push_refutation(self, msg: bytes) -> None:
        """Send our refutation at once to ``gossip_nodes`` random peers (bare, no piggyback).

        Every holder of the suspicion is racing its own timer; starting the epidemic now rather
        than at the next gossip tick buys a round. The message also goes through the queue for
        its normal retransmissions.
        """
        self.stats["refutations_pushed"] += 1
        self._push_bare(msg)

    def _push_bare(self, msg: bytes) -> None:
        """``msg`` at once to ``gossip_nodes`` random alive peers, bare; the broadcast queue
        still carries it for its normal retransmissions."""
        for peer in self._k_random(self.config.gossip_nodes, lambda n: n.state is ALIVE):
            self._send_bare(msg, peer.addr)

    def _answer_stale(self, src: Addr, now: float) -> None:
        """``src`` says we are suspect or dead at an incarnation we already refuted.

        It holds (or gossips) a view our refutation's epidemic missed: a push epidemic that
        retransmits RetransmitMult x log10 n times leaves each member uninformed with
        probability ~e^-(that count), and once it has died out nothing would ever tell it, so
        its timer would declare us dead. One alive message straight back fixes its view.
        """
        if src not in self._at_addr:
            # Our alive is bigger than a claim: only a member's own address gets it (a
            # replayed or spoofed claim must not turn us into an amplifier).
            self.stats["stale_answers_withheld"] += 1
            return
        if self._may_answer(src, now):
            self.stats["stale_claims_answered"] += 1
            self._send_bare(self._alive_msg(), src)

    def _arm_suspicion(self, node: _Node) -> None:
        """Heap entries for a suspicion's deadline and, until it is sent, its reminder."""
        susp = node.suspicion
        assert susp is not None
        self._push_timer(susp.deadline, _T_SUSPICION, node.name)
        if not susp.reminded:
            self._push_timer(susp.remind_at, _T_REMIND, node.name)

    def _on_suspect(self, s: Suspect, now: float, src: Addr | None = None) -> None:
        """``src``: the datagram's source, when the claim came in one (not a merge)."""
        if s.incarnation > MAX_CLAIM_INCARNATION:
            self.stats["claims_out_of_bound"] += 1
            return
        node = self._nodes.get(s.node)
        if node is None:
            return
        if self._trust is not None and s.incarnation > node.signed_inc:
            # Nobody can suspect a life the node never announced: a forgery (or a claim from
            # before we heard the node's own alive, which gossip brings again).
            self.stats["claims_above_signed"] += 1
            return
        if node is self._me:
            if self._leaving:
                return
            if s.incarnation >= node.incarnation:
                self._refute(s.incarnation, s.sender, now)
            elif src is not None:
                self._answer_stale(src, now)
            return
        if s.incarnation < node.incarnation:
            return
        if node.state is SUSPECT and s.incarnation == node.incarnation:
            assert node.suspicion is not None
            if node.suspicion.confirm(s.sender):
                self._arm_suspicion(node)
                self._broadcast(node.name, s.encode(), now)
            return
        if node.state is not ALIVE and s.incarnation == node.incarnation:
            return  # dead/left at the same incarnation outrank suspect
        # A new suspicion (or one about a newer incarnation than the one we suspected: the
        # confirmations we counted were about the older life, so the timer starts afresh).
        was_suspect = node.state is SUSPECT
        node.incarnation = s.incarnation
        self._set_state(node, SUSPECT, now)
        n = self._n_live
        k = self.config.suspicion_k
        if n - 2 < k:
            k = 0
        lo, hi = suspicion_bounds(
            self.config.suspicion_mult,
            self.config.suspicion_max_timeout_mult,
            n,
            self.config.probe_interval,
        )
        node.suspicion = Suspicion(now, s.sender, k, lo, hi)
        self._arm_suspicion(node)
        if s.sender == self.name:
            self.stats["suspicions_raised"] += 1
        self._broadcast(node.name, s.encode(), now)
        if not was_suspect:
            self._emit(MemberSuspect, node)

    def _on_dead(self, d: Dead, now: float, src: Addr | None = None) -> None:
        """``src``: the datagram's source, when the claim came in one (not a merge)."""
        if d.incarnation > MAX_CLAIM_INCARNATION:
            self.stats["claims_out_of_bound"] += 1
            return
        node = self._nodes.get(d.node)
        if node is None:
            if d.sender == d.node and self._former and d.node in self._former and (
                self._trust is None or self._trust.verify(
                    d.node, LEFT_DOMAIN, left_payload(d.incarnation, d.node), d.sig, now
                ) is True
            ):
                del self._former[d.node]  # it left while we held it failed: let it go
            return
        trust = self._trust
        if trust is not None:
            if d.sender == d.node:
                # Only the node itself can leave: its signature, or nothing.
                if trust.verify(d.node, LEFT_DOMAIN, left_payload(d.incarnation, d.node),
                                d.sig, now) is not True:
                    self.stats["claims_unsigned"] += 1
                    return
                if node is not self._me:
                    node.signed_inc = max(node.signed_inc, d.incarnation)
                    node.left_sig = d.sig
            elif d.incarnation > node.signed_inc:
                self.stats["claims_above_signed"] += 1
                return
        if node is self._me:
            if self._leaving:
                return
            if d.incarnation >= node.incarnation:
                self._refute(d.incarnation, None if d.sender == d.node else d.sender, now)
            elif src is not None:
                self._answer_stale(src, now)
            return
        new = LEFT if d.sender == d.node else DEAD
        if d.incarnation < node.incarnation:
            return
        if d.incarnation == node.incarnation and STATE_RANK[new] <= STATE_RANK[node.state]:
            return
        old = node.state
        node.incarnation = d.incarnation
        self._set_state(node, new, now)
        self._broadcast(node.name, d.encode(), now)
        if old is not new:
            self._emit(MemberLeft if new is LEFT else MemberDead, node)

    def _move(self, node: _Node, addr: Addr) -> None:
        """A member's address changed (its newest signed alive names another)."""
        at = self._at_addr
        if at.get(node.addr) is node:
            del at[node.addr]
        node.addr = addr
        at[addr] = node

    def _remember(self, name: str, addr: Addr, incarnation: int, now: float) -> None:
        """Keep a failed member we reaped for _reconnect (FIFO-bounded by MAX_FORMER)."""
        former = self._former
        former.pop(name, None)
        if len(former) >= MAX_FORMER:
            del former[next(iter(former))]
        former[name] = (addr, incarnation, now)

    def _reap(self, node: _Node, now: float, remember: bool = False) -> None:
        """Forget NODE. REMEMBER (the reap timer): if it failed (dead, not left), keep its
        address for _reconnect; a member dropped for its certificate or that left is not."""
        if remember and node.state is DEAD:
            self._remember(node.name, node.addr, node.incarnation, now)
        del self._nodes[node.name]
        if self._at_addr.get(node.addr) is node:
            del self._at_addr[node.addr]
        self._n_dead -= node.state is DEAD
        idx = self._ring.index(node)
        del self._ring[idx]
        if idx < self._probe_index:
            self._probe_index -= 1
        self._queue.remove(node.name)
        tombs = self._tombstones
        if len(tombs) >= MAX_TOMBSTONES:
            del tombs[next(iter(tombs))]
        tombs[node.name] = node.incarnation
        self.stats["reaped"] += 1
        self._emit(MemberReaped, node)

    # ------------------------------------------------------------------ internals: push-pull

    def _encode_state(self, join: bool, now: float = 0.0, peer: PushPull | None = None,
                      extra: list[list[object]] | None = None) -> bytes:
        """Our push-pull state. With identity each row carries the node's own signature of its
        metadata (and of its leave), our certificate always goes along, and so do those the
        peer asked for (all of them when it is joining). EXTRA: rows about members we no longer
        hold (_dead_row), appended."""
        code = _STATE_CODE
        user = b""
        if self._delegate is not None:
            user = self._delegate.local_state(join)
        trust = self._trust
        if trust is None:
            rows = [
                [n.name, n.incarnation, code[n.state], n.meta_bytes]
                for n in self._nodes.values()
            ]
            if extra:
                rows += extra
            return encode_push_pull_raw(join, rows, user)
        # Signatures (64 bytes a row, as much again as a row itself) go only where they are
        # news: in a request, on our own row (the peer may not know us yet); in a reply, on the
        # rows the requester's own rows show it lacks. What a request carries unsigned, the
        # responder learns by gossip or when it pulls in turn.
        theirs: dict[str, tuple[int, MemberState, int]] = {}
        requester = None
        if peer is not None:
            theirs = {st.name: (st.incarnation, st.state, st.meta_inc or 0)
                      for st in peer.states if not peer.join}
            # The one row a request signs is its sender's: tell it all we hold about it, with
            # every proof (after a restart it must learn the life it forgot, and trust it).
            requester = next((st.name for st in peer.states if st.alive_sig), None)
        certs = [trust.cert.raw]
        if peer is None:
            # A request (the hot path): no proofs but our own row's.
            me = self._me
            rows = [[n.name, n.incarnation, code[n.state], n.meta_bytes]
                    if n.meta_inc == n.incarnation else
                    [n.name, n.incarnation, code[n.state], n.meta_bytes, n.meta_inc]
                    for n in self._nodes.values() if n is not me]
            mine = [me.name, me.incarnation, code[me.state], me.meta_bytes, me.meta_inc,
                    me.alive_sig, me.left_sig, me.anchor,
                    me.token if me.tok_inc == me.incarnation > me.meta_inc else b""]
            rows.append(mine)
            if extra:
                rows += extra
            return encode_push_pull_raw(join, rows, user, certs, sorted(self._want)[:MAX_WANT])
        rows = []
        for n in self._nodes.values():
            alive_sig = left_sig = anchor = token = b""
            has_token = n.tok_inc == n.incarnation and n.tok_inc > n.meta_inc
            if n is self._me or n.name == requester:
                alive_sig, left_sig, anchor = n.alive_sig, n.left_sig, n.anchor
                token = n.token if has_token else b""
            elif peer is not None:
                known = theirs.get(n.name)
                if known is None or known[2] < n.meta_inc:
                    alive_sig, anchor = n.alive_sig, n.anchor
                    if known is None and not peer.join:
                        raw = trust.raw_cert(n.name, now)
                        if raw is not None:
                            certs.append(raw)
                if has_token and (known is None or known[0] < n.incarnation):
                    token = n.token
                if n.state is LEFT and (known is None or known[:2] != (n.incarnation, LEFT)):
                    left_sig = n.left_sig
            if alive_sig or left_sig or token or n.meta_inc != n.incarnation:
                row = [n.name, n.incarnation, code[n.state], n.meta_bytes, n.meta_inc,
                       alive_sig, left_sig]
                if anchor or token:
                    row += [anchor, token]
                rows.append(row)
            else:  # the common row: nothing to prove, meta from this very incarnation
                rows.append([n.name, n.incarnation, code[n.state], n.meta_bytes])
        if peer is not None:
            names = list(self._nodes) if peer.join else peer.want
            for name in names:
                raw = trust.raw_cert(name, now)
                if raw is not None and raw not in certs:
                    certs.append(raw)
        if extra:
            rows += extra
        want = sorted(self._want)[:MAX_WANT]
        return encode_push_pull_raw(join, rows, user, certs, want)

    def _merge(self, pp: PushPull, now: float, quiet_new: bool = False) -> None:
        if self._trust is not None:
            self._merge_signed(pp, now, quiet_new)
            return
        for st in pp.states:
            if st.incarnation > MAX_CLAIM_INCARNATION:
                self.stats["claims_out_of_bound"] += 1
                continue
            if st.name == self.name:
                me = self._me
                if self._leaving:
                    continue
                if st.state is ALIVE:
                    if st.incarnation > me.incarnation:
                        self._refute(st.incarnation, None, now)
                elif st.incarnation >= me.incarnation:
                    self._refute(st.incarnation, None, now)
                continue
            node = self._nodes.get(st.name)
            if node is not None and node.state is st.state and node.incarnation == st.incarnation:
                continue
            if st.state is ALIVE:
                self._on_alive(
                    Alive(st.incarnation, st.meta, st.meta_bytes), now, quiet=quiet_new
                )
            elif st.state is LEFT:
                self._on_dead(Dead(st.incarnation, st.name, st.name), now)
            else:
                # memberlist: a remote "dead" only makes us suspect, giving the node a chance
                # to refute to us before we declare it ourselves.
                self._on_suspect(Suspect(st.incarnation, st.name, self.name), now)
        if self._delegate is not None:
            self._delegate.merge_remote_state(pp.user_state, pp.join)

    def _merge_signed(self, pp: PushPull, now: float, quiet_new: bool) -> None:
        """_merge with identity: certificates first, then each row as the claims it stands for
        (the node's signed alive, then the state), each checked like a gossiped one."""
        trust = self._trust
        assert trust is not None
        for raw in pp.certs:
            cert = trust.learn_cert(raw, now)
            if cert is not None and cert.name in self._held:
                self._release_held(cert.name, now)
            elif cert is not None:
                self._want.discard(cert.name)
        for st in pp.states:
            if st.incarnation > MAX_CLAIM_INCARNATION:
                self.stats["claims_out_of_bound"] += 1
                continue
            if st.meta_inc is None:  # a short row: meta of that incarnation, nothing signed
                st.meta_inc = st.incarnation
            node = self._nodes.get(st.name)
            if node is self._me:
                self._merge_own_row(st, now)
                continue
            if node is not None and node.state is st.state and \
                    node.incarnation == st.incarnation and node.meta_inc >= st.meta_inc:
                continue  # nothing new: no signature to check
            if node is None and st.state is not ALIVE:
                if st.state is LEFT and st.left_sig and st.name in self._former:
                    self._on_dead(Dead(st.incarnation, st.name, st.name, st.left_sig), now)
                continue  # as unsigned: a member we never saw alive is not taken on hearsay
            if st.alive_sig:
                proven = -1
                if node is None and st.token and st.anchor and st.incarnation > st.meta_inc \
                        and st.name in self._tombstones and \
                        reaches(st.token, st.incarnation - st.meta_inc, st.anchor):
                    # Reaped at an incarnation its signed alive is not above, but its chain
                    # proves a later refutation (made while we were apart): it is back.
                    proven = st.incarnation
                self._on_alive(Alive(st.meta_inc, st.meta, st.meta_bytes, st.alive_sig,
                                     st.anchor), now, quiet=quiet_new, proven=proven)
            if st.token and st.incarnation > st.meta_inc:
                self._on_alive_token(AliveToken(st.incarnation, st.name, st.token), now)
            if st.state is LEFT:
                if st.left_sig:
                    self._on_dead(Dead(st.incarnation, st.name, st.name, st.left_sig), now)
            elif st.state is not ALIVE:
                # memberlist: a remote "dead" only makes us suspect (see _merge). Unsigned, and
                # bounded by what the node signed (_on_suspect).
                self._on_suspect(Suspect(st.incarnation, st.name, self.name), now)
        if self._delegate is not None:
            self._delegate.merge_remote_state(pp.user_state, pp.join)

    def _merge_own_row(self, st: PushPullState, now: float) -> None:
        """A peer's row about us. Above our incarnation it is a life of ours we do not
        remember (we restarted) if our own signature and chain prove it, and we come back above
        it; unproven, it is a forgery and changes nothing."""
        me = self._me
        trust = self._trust
        assert trust is not None and st.meta_inc is not None
        if self._leaving or st.incarnation < me.incarnation:
            return
        conflict = st.state is ALIVE and st.meta_inc == me.incarnation and \
            st.meta_bytes != me.meta_bytes
        ours = (st.incarnation > me.signed_inc or conflict) and bool(st.alive_sig) and \
            trust.verify(self.name, ALIVE_DOMAIN,
                         alive_payload(st.meta_inc, st.meta_bytes, st.anchor), st.alive_sig, now)
        if ours and st.incarnation > me.signed_inc:
            proven = st.meta_inc
            if st.token and st.anchor and st.incarnation > st.meta_inc and \
                    reaches(st.token, st.incarnation - st.meta_inc, st.anchor):
                proven = st.incarnation
            me.signed_inc = max(me.signed_inc, proven)
        if st.incarnation > me.signed_inc:
            self.stats["claims_above_signed"] += 1
            return
        if st.state is ALIVE:
            if st.incarnation > me.incarnation:
                self._refute(st.incarnation, None, now, full=True)
            elif conflict and ours:
                self._refute(st.incarnation, None, now, full=True)  # a forgotten life's meta
        elif st.state is LEFT and not st.left_sig:
            return
        elif st.incarnation >= me.incarnation:
            # Told we are dead in a push-pull: the teller may have reaped us (a reconnect, see
            # _reconnect), and its tombstone takes only a signed alive above it, not a token.
            self._refute(st.incarnation, None, now, full=st.state is DEAD)

    def _start_push_pull(self, node: _Node, now: float) -> bool:
        return self._start_push_pull_to(node.addr, now)

    def _start_push_pull_to(self, addr: Addr, now: float,
                            extra: list[list[object]] | None = None) -> bool:
        if len(self._inflight) >= self.config.max_push_pull_concurrent or (
            addr in self._inflight
        ) or addr == self._me.addr:
            self.stats["push_pulls_skipped"] += 1
            return False
        self._streams.append((self._encode_state(join=False, now=now, extra=extra), addr))
        expires = now + self.config.stream_timeout
        self._inflight[addr] = expires
        self._push_timer(expires, _T_STREAM, addr)
        self.stats["push_pulls_started"] += 1
        return True

    def _periodic_push_pull(self, now: float) -> None:
        # Tick at the base interval and exchange with probability base/scaled: the mean period
        # follows the cluster size as it changes, with no phase to carry over.
        cfg = self.config
        self._push_pull_at = now + cfg.push_pull_interval
        if self._leaving:
            return
        if self._rng.random() * cfg.push_pull_scaled(self._n_live) >= cfg.push_pull_interval:
            return
        peers = self._k_random(1, lambda n: n.state is ALIVE)
        if peers:
            self._start_push_pull(peers[0], now)

    def _reconnect(self, now: float) -> None:
        """serf's reconnect: push-pull with a random failed member, with probability
        failed/alive. Failed: held dead, or reaped while dead less than reconnect_timeout ago
        (_former; serf keeps its failed members that long), so a partition that outlasts
        reap_after still heals."""
        self._reconnect_at = now + self.config.reconnect_interval
        self._check_certs(now)
        if self._leaving:
            return
        former = self._former
        if former:
            self._expire_former(now)
        n = self._n_dead + len(former)
        if not n:
            return
        dead = [m for m in self._ring if m.state is DEAD] if self._n_dead else []
        if any(now - m.state_changed_at < self.config.reap_after for m in dead):
            # A member died lately: likely a partition that may heal any moment, and until a
            # push-pull crosses it both sides hold each other dead (gossip to the dead ends
            # after gossip_to_the_dead_time). Try more often while such deaths are fresh.
            self._reconnect_at = now + self.config.reconnect_interval / RECENT_DEAD_SPEEDUP
        if self._rng.random() >= n / max(1, self._n_live):
            return
        i = int(self._rng.random() * n)
        if i >= self._n_dead:
            self._reconnect_former(now, i - self._n_dead)
            return
        node = dead[i]
        if self._start_push_pull(node, now):
            self.stats["reconnects"] += 1

    def _expire_former(self, now: float) -> None:
        """Forget former members reaped more than reconnect_timeout ago (oldest first)."""
        former = self._former
        cutoff = now - self.config.reconnect_timeout
        while former:
            name = next(iter(former))
            if former[name][2] > cutoff:
                break
            del former[name]
            self.stats["former_expired"] += 1

    def _reconnect_former(self, now: float, index: int | None) -> None:
        """Push-pull with former member number INDEX (None: a random one), telling it that it
        is dead (_dead_row): it refutes with a signed alive above our tombstone, and its reply
        brings it back to us."""
        former = self._former
        if not former or self._leaving:
            return
        if index is None:
            index = int(self._rng.random() * len(former))
        name = next(itertools.islice(former, index, None))
        addr = former[name][0]
        trust = self._trust
        if addr in self._at_addr or (trust is not None and trust.current(name, now) is None):
            # Another member holds its address now, or its certificate expired or was revoked.
            del former[name]
            return
        if self._start_push_pull_to(addr, now, [self._dead_row(name, addr, former[name][1])]):
            self.stats["reconnects_former"] += 1

    # ------------------------------------------------------------------ internals: sending

    def _k_random(self, k: int, accept: Callable[[_Node], bool]) -> list[_Node]:
        """Up to k distinct random members (never us) that ``accept`` admits."""
        ring = self._ring
        n = len(ring)
        out: list[_Node] = []
        if k <= 0 or n <= 1:
            return out
        rnd = self._rng.random
        me = self._me
        for _ in range(3 * n):
            node = ring[int(rnd() * n)]
            if node is me or node in out or not accept(node):
                continue
            out.append(node)
            if len(out) >= k:
                break
        return out

    def _broadcast(self, key: str, msg: bytes, now: float) -> None:
        self._queue.queue(key, msg)
        if self._gossip_at is None:
            self._gossip_at = now + self.config.gossip_interval

    def _piggyback(self, room: int, max_parts: int, user: bool = True) -> list[bytes]:
        """Queued broadcasts, then (with USER) delegate messages, fitting ``room`` bytes
        (framing included)."""
        if self._queue:
            n = self._n_live
            if n != self._limit_n:
                self._limit_n = n
                self._limit = self.config.retransmit_limit(n)
            extra = self._queue.get(COMPOUND_PART_OVERHEAD, room, self._limit, max_parts)
        else:
            extra = []
        if self._delegate is not None and user:
            used = sum(len(m) + COMPOUND_PART_OVERHEAD for m in extra)
            left = room - used
            if left > COMPOUND_PART_OVERHEAD + 2 and len(extra) < max_parts:
                # The framing is the delegate's to count: a message taken from its queue counts
                # as sent, so one dropped here for want of room would be a transmission lost.
                for data in self._delegate.get_broadcasts(USER_PART_OVERHEAD, left):
                    cost = len(data) + USER_PART_OVERHEAD
                    if cost > left or len(extra) >= max_parts:
                        self.stats["user_dropped"] += 1
                        continue
                    left -= cost
                    extra.append(bytes((MsgType.USER,)) + data)
        return extra

    def _send_bare(self, msg: bytes, addr: Addr) -> None:
        """Send one message alone, without piggybacked broadcasts."""
        self._out.append((msg, addr))
        self.stats["packets_sent"] += 1
        self.stats["bytes_sent"] += len(msg)

    def _send(self, parts: list[bytes], addr: Addr) -> None:
        """Send ``parts`` to ``addr`` in one packet, filling spare room with broadcasts (only
        for a member's address: anyone else gets what it asked for and no more)."""
        budget = self.config.packet_budget
        used = COMPOUND_OVERHEAD + sum(len(p) + COMPOUND_PART_OVERHEAD for p in parts)
        if used < budget and (self._queue or self._delegate is not None) \
                and addr in self._at_addr:
            extra = self._piggyback(budget - used, MAX_COMPOUND_PARTS - len(parts))
            if extra:
                parts = parts + [e for e in extra if e not in parts]
        pkt = make_compound(parts)
        self._out.append((pkt, addr))
        self.stats["packets_sent"] += 1
        self.stats["bytes_sent"] += len(pkt)

    def _gossip(self, now: float) -> None:
        cfg = self.config
        if self._delegate is None and not self._queue:
            self._gossip_at = None
            return
        self._gossip_at = now + cfg.gossip_interval
        dead_cutoff = now - cfg.gossip_to_the_dead_time

        def accept(n: _Node) -> bool:
            s = n.state
            if s is ALIVE or s is SUSPECT:
                return True
            return s is DEAD and n.state_changed_at > dead_cutoff

        budget = cfg.packet_budget - COMPOUND_OVERHEAD
        last: list[bytes] = []
        pkt = b""
        for node in self._k_random(cfg.gossip_nodes, accept):
            # A dead member hears only membership news (so it can refute): a store write sent
            # to it is a transmission wasted, and the failover's task records ran short of them.
            extra = self._piggyback(budget, MAX_COMPOUND_PARTS, user=node.state is not DEAD)
            if not extra:
                continue
            if extra != last:  # usually the whole queue fits: the same packet for every peer
                last = extra
                pkt = make_compound(extra)
            self._send_bare(pkt, node.addr)
