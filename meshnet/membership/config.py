"""Membership timings and profiles.

The LAN profile is memberlist's DefaultLANConfig except for ``suspicion_mult``, the Lifeguard
confirmation count ``suspicion_k`` (memberlist ties the two together: k = SuspicionMult - 2) and
the late-ack ``probe_grace``, which memberlist does not have.

Why suspicion_mult = 1.5 and k = 2 (LAN), not memberlist's 4
--------------------------------------------------------------
With SuspicionMult=4 the *shortest* suspicion at N=1000 is 4 x log10(1000) x 1 s = 12 s, so
crash -> everyone-holds-dead can never meet a 12 s budget. Our budget at p99 (the bench's p99 over
~40 crashes is their maximum): the first probe of a crashed node is ~Exp(1 s) away (randomized
round robin; the largest of 40 is ~4-5 s), the probe takes its interval plus the late-ack grace
(1.5 s), and the dead message needs ~1-1.5 s to reach the last of 1000 members. That leaves ~4.5 s
for the suspicion: mult 1.5 (min 4.5 s, max 27 s at N=1000).

The risk of a short suspicion is declaring a live-but-slow node dead. The minimum is only reached
with Lifeguard's k = 2 *independent* confirmations of the same incarnation (a lone suspicion,
e.g. from packet loss, lasts the 27 s maximum), and a suspect refutes well inside it: it hears of
the suspicion at once (buddy system, below), a slow inbox adds at most 1.5 s in the bench's worst
case, and its refutation goes to the accuser directly and to gossip_nodes random peers at once,
then reaches 99.99% of 1000 members in ~2.2 s (serf's convergence formula); each holder's timer
starts when *it* heard the suspicion, not when it was raised. Around that:

* **late-ack grace** (``probe_grace``, one probe timeout): a probe unanswered at the end of its
  interval still waits this long for an ack before it suspects. Our ping-req helpers listen that
  long anyway, and an answer 0.5 s late is proof of life; a suspicion raised and refuted instead
  costs the whole cluster two broadcasts (~2 x RetransmitMult x log10 n x N messages). The grace
  is paid by every true detection (+0.5 s), which is part of the budget above;
* **nacks before the deadline**: helpers nack at 80% of a probe timeout (Lifeguard's figure), so
  the nack reaches the origin while it still counts; a nack arriving after the probe closed used
  to be counted as missing and penalized a healthy prober's health;
* **health credit only for timely acks**: an ack that arrives after our own probe timeout may be
  late because *we* are slow, so it no longer lowers our awareness score (memberlist credits any
  success). A slow node now keeps the higher score that stretches its timeouts;
* **silent helpers withhold the suspicion**: when not one helper nacked, the silence is more
  likely ours (a slow inbox, a broken link) than the target's. The awareness penalty is applied
  and the suspicion withheld until our awareness is at its maximum, so a node cut off from
  everyone still suspects the others, a few probes later and with its timeouts stretched;
* the buddy system tells the suspect directly: on every probe of it, and (ours) the moment we
  raise the suspicion. The suspect pushes its refutation to the accuser and to gossip_nodes
  random peers at once, not at the next gossip tick;
* (ours) every *holder* of a suspicion that has not seen the refutation halfway to its deadline
  tells the suspect itself, and a suspect told of a suspicion (or death) older than its
  incarnation sends its current alive straight back. A push epidemic that retransmits
  RetransmitMult x log10 n times misses each member with probability ~e^-12 at N~1000; with
  hundreds of refutations a run (slow10) a few members never hear one, and nothing else would
  tell them before their timer declares a live node dead;
* (ours) a member in poor local health stretches its suspicion timeouts by its awareness
  multiplier, exactly as Lifeguard stretches its probe timeouts: a node with a slow inbox hears
  refutations late and must not be the one that declares others dead;
* (ours) a suspicion does not expire into "dead" while we hold fresh evidence of life (an ack,
  even a late one, to one of our own probes since the suspicion began): it is extended by one
  minimum period and the suspect is reminded;
* (ours, #17) **a helper's nack is a confirmation**: each indirect-probe helper that nacked the
  failed probe (its own ping of the target, from another vantage point, went unanswered) counts
  as one independent confirmation of the suspicion the probe raises, at the accuser only: it is
  never gossiped in the helper's name, so no other member's timer shortens. Without it a
  confirmation needs another member's own probe of the suspect, once per n-1 probe intervals
  each: in a 5-host cluster the minimum was reached in about half the crashes and the rest
  waited ~4.3 s with one confirmation (bench/failover.py). A nack is Lifeguard's own signal
  (the helper is alive and could not reach the target). Only an accuser in perfect health
  counts them (every helper nacked and its recent probes were answered): one cut off with its
  helpers (a partition) or stalled must be slower to accuse, not faster. What protects a live
  suspect is what protects any confirmed suspicion: the accuser is the member it answers first
  (told at once, answered at once, reminded at half time, vetoed on a late ack), and the
  minimum argued above. memberlist itself takes the minimum at once below k + 2 members;
* (ours, #17) a helper forwards a late ack for one more probe interval + grace after the
  origin's window closed: past the origin's earliest deadline at the minimum (1.5 s below 10
  members), the ack vetoes the death of a slow suspect whose own ack to the origin was lost;
* (ours, #17) the member that declares a death pushes it at once to gossip_nodes random peers,
  as a refutation is pushed: every member waits for it before it reschedules the dead member's
  tasks.

memberlist derives k from the multiplier (k = mult - 2), which at mult 1.5 would be negative and
turn the dynamic timeout off; we keep k as its own setting (2, memberlist's value at mult 4).
The numbers behind the choice are measured by ``bench/membership.py`` (N=1000, LAN timings) and
recorded in docs/design.md (§8, Membership); rerun it to check them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from meshnet import wire

# The memberlist cap on concurrent push-pull exchanges (maxPushPullRequests): more than this and
# a newly healed partition or a mass restart turns into a TCP storm (consul#4511).
MAX_PUSH_PULL_CONCURRENT = 128


@dataclass
class MembershipConfig:
    probe_interval: float = 1.0
    probe_timeout: float = 0.5
    # A probe unanswered at the end of its interval still waits this long for a late ack
    # before it raises a suspicion (see the module docstring).
    probe_grace: float = 0.5
    indirect_checks: int = 3
    suspicion_mult: float = 1.5
    suspicion_max_timeout_mult: float = 6.0
    # Lifeguard's K: independent confirmations that take a suspicion down to its minimum.
    suspicion_k: int = 2
    # Each indirect-probe helper that nacked the failed probe counts as one confirmation of the
    # suspicion it raises, at the accuser only (see the module docstring).
    nacks_confirm: bool = True
    retransmit_mult: int = 4
    gossip_interval: float = 0.2
    gossip_nodes: int = 3
    gossip_to_the_dead_time: float = 30.0
    push_pull_interval: float = 30.0
    awareness_max_multiplier: int = 8
    udp_payload: int = wire.DEFAULT_UDP_PAYLOAD
    # Dead and left members are forgotten after this long (memberlist#253: left never reaped).
    reap_after: float = 60.0
    # serf-style reconnect: every reconnect_interval, push-pull with one random failed member
    # with probability failed/alive, so a healed partition merges back. Failed: held dead, or
    # reaped while dead (its address kept, bounded) less than reconnect_timeout ago: serf's
    # reconnect_timeout, 24 h, so a partition that outlasts reap_after still heals.
    reconnect_interval: float = 10.0
    reconnect_timeout: float = 86_400.0
    max_push_pull_concurrent: int = MAX_PUSH_PULL_CONCURRENT
    max_push_pull_bytes: int = wire.MAX_STREAM_BYTES
    # An outbound push-pull the shell never reports back on is forgotten after this long
    # (memberlist's TCPTimeout), so a lost callback cannot pin a concurrency slot forever.
    stream_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.probe_timeout <= 0 or self.probe_interval <= 0:
            raise ValueError("probe_interval and probe_timeout must be positive")
        if self.probe_timeout > self.probe_interval:
            raise ValueError("probe_timeout must not exceed probe_interval")
        if not 0 <= self.probe_grace <= self.probe_interval:
            raise ValueError("probe_grace must be in 0..probe_interval")
        if self.gossip_interval <= 0 or self.push_pull_interval <= 0:
            raise ValueError("intervals must be positive")
        if self.reconnect_interval <= 0 or self.reconnect_timeout < 0:
            raise ValueError("reconnect_interval must be positive, reconnect_timeout >= 0")
        if not 200 <= self.udp_payload <= wire.MAX_DATAGRAM_BYTES:
            raise ValueError("udp_payload out of range")
        if self.awareness_max_multiplier < 1:
            raise ValueError("awareness_max_multiplier must be >= 1")
        if self.suspicion_mult <= 0 or self.suspicion_max_timeout_mult < 1:
            raise ValueError("bad suspicion multipliers")
        if self.max_push_pull_bytes > wire.MAX_STREAM_BYTES:
            raise ValueError("max_push_pull_bytes above MAX_STREAM_BYTES")

    @property
    def packet_budget(self) -> int:
        """Bytes a packet built by the core may use: the UDP payload minus encryption framing."""
        return self.udp_payload - wire.ENCRYPTION_OVERHEAD

    def retransmit_limit(self, n: int) -> int:
        """memberlist: RetransmitMult x ceil(log10(n + 1))."""
        return self.retransmit_mult * math.ceil(math.log10(n + 1))

    def push_pull_scaled(self, n: int) -> float:
        """memberlist's pushPullScale: x1 up to 32 members, one more x per doubling above."""
        if n <= 32:
            return self.push_pull_interval
        mult = math.ceil(math.log2(n) - math.log2(32)) + 1
        return self.push_pull_interval * mult

    def replace(self, **changes: object) -> MembershipConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def lan(cls) -> MembershipConfig:
        """memberlist DefaultLANConfig timings with our suspicion multiplier and grace."""
        return cls()

    @classmethod
    def lan_fast(cls) -> MembershipConfig:
        """Twice as fast as LAN: for tests and the lab on loopback/veth."""
        return cls(
            probe_interval=0.5,
            probe_timeout=0.25,
            probe_grace=0.25,
            gossip_interval=0.1,
            push_pull_interval=10.0,
            gossip_to_the_dead_time=15.0,
            reap_after=30.0,
            reconnect_interval=5.0,
            stream_timeout=5.0,
        )

    @classmethod
    def wan(cls) -> MembershipConfig:
        """memberlist DefaultWANConfig: probe 5/3 s, suspicion 6, push-pull 60 s, gossip 0.5 s x4"""
        return cls(
            probe_interval=5.0,
            probe_timeout=3.0,
            probe_grace=3.0,
            suspicion_mult=6.0,
            suspicion_k=4,
            gossip_interval=0.5,
            gossip_nodes=4,
            gossip_to_the_dead_time=60.0,
            push_pull_interval=60.0,
            reap_after=300.0,
            reconnect_interval=30.0,
            stream_timeout=30.0,
        )

    @classmethod
    def profile(cls, name: str) -> MembershipConfig:
        try:
            factory = PROFILES[name]
        except KeyError:
            raise ValueError(
                f"unknown membership profile {name!r} (have {sorted(PROFILES)})"
            ) from None
        return factory()


PROFILES = {
    "lan": MembershipConfig.lan,
    "lan-fast": MembershipConfig.lan_fast,
    "wan": MembershipConfig.wan,
}
