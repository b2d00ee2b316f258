"""Discrete-event simulator for the membership core (DESIGN §2).

One heap of ``(at, seq, kind, node, payload)`` entries, one ``now`` and one seeded rng. Entries
are datagram deliveries, push-pull stream legs and node timers (each node has at most one live
timer entry: the value of its ``get_timer()`` when last asked; older entries are skipped). The
very same ``Membership`` class the agent runs is driven here; nothing is reimplemented.

Models: per-packet latency (uniform, optional per-link override), uniform and per-link loss,
partitions (groups), crashes (no delivery, no timers), restarts (a fresh core at the same
address), slow nodes (everything addressed to the node is handled ``delay`` seconds late), and
push-pull streams in memory with latency. Bytes are counted per node including the encryption
framing the shell would add (``ENCRYPTION_OVERHEAD`` per datagram and per stream message).

Identity (on by default, as in the agent): one CA, a certificate and a ``Trust`` per node, so the
cores sign and verify their claims with the code that ships. Ed25519 verification is too slow to
do for real 1000 x 1000 times, so the nodes share one VerifyCache keyed by the signed bytes (each
distinct signature is checked once, for real), and each node is charged VERIFY_COST_S of virtual
time per verification it asks for: what it sends while handling that input leaves that much
later, so detection figures include the cost.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshnet.crypto.certs import NodeCert, VerifyCache, generate_node_keys, make_ca, sign_node
from meshnet.crypto.trust import ALIVE_DOMAIN, Trust
from meshnet.membership import MemberEvent, Membership, MembershipConfig, MemberState, NodeMeta
from meshnet.membership.messages import DecodeCache, PushPull, PushPullState, alive_payload
from meshnet.wire import ENCRYPTION_OVERHEAD

Addr = tuple[str, int]
EventHook = Callable[[float, int, MemberEvent], None]

_DELIVER = 0
_TIMER = 1
_STREAM_REQ = 2
_STREAM_REPLY = 3
_STREAM_FAIL = 4

# How long a stream to an unreachable (partitioned) peer takes to fail: a TCP connect timeout.
STREAM_CONNECT_TIMEOUT = 1.0
# Virtual seconds one Ed25519 verification costs its node: measured on the lab machine (Intel
# Xeon, 2 vCPUs) through VerifyCache.verify on a miss, ~90 us (the figure, confirmed).
VERIFY_COST_S = 90e-6
# Unix time virtual time 0 stands for; the simulated CA and certificates are valid around it.
SIM_EPOCH = 1_800_000_000

__all__ = ["STREAM_CONNECT_TIMEOUT", "SimNode", "Simulator"]


@dataclass(slots=True)
class SimNode:
    index: int
    name: str
    addr: Addr
    core: Membership
    meta: NodeMeta
    crashed: bool = False
    epoch: int = 0  # bumped by restart so stale timers/stream replies are ignored
    slow_delay: float = 0.0
    group: int = 0
    armed: float | None = None
    bytes_sent: int = 0
    packets_sent: int = 0
    bytes_received: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    trust: Trust | None = None
    verifications: int = 0  # charged so far (see VERIFY_COST_S)


class Simulator:
    def __init__(
        self,
        config: MembershipConfig,
        seed: int = 0,
        *,
        latency: tuple[float, float] = (0.0005, 0.002),
        loss: float = 0.0,
        identity: bool = True,
    ) -> None:
        self.config = config
        self.rng = random.Random(seed)
        self.now = 0.0
        self.latency = latency
        self.loss = loss
        self.link_loss: dict[tuple[int, int], float] = {}
        self.link_latency: dict[tuple[int, int], float] = {}
        self.nodes: list[SimNode] = []
        self._by_addr: dict[Addr, int] = {}
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._seq = 0
        self.partitioned = False
        self.on_event: EventHook | None = None
        self.steps = 0
        # One memo of decoded broadcasts for all cores: the same update bytes reach every node
        # ~RetransmitMult x log10(n) times. Decoding is pure, so this changes no outcome.
        self.decode_cache = DecodeCache()
        self.identity = identity
        self.verify_cache = VerifyCache()
        self.cert_memo: dict[bytes, NodeCert] = {}
        self.ca_key, self.ca = make_ca("sim-ca", SIM_EPOCH - 86_400, 3650)

    # ------------------------------------------------------------------ topology

    def add_node(
        self,
        name: str | None = None,
        *,
        incarnation: int = 0,
        labels: dict[str, str] | None = None,
    ) -> SimNode:
        i = len(self.nodes)
        name = name or f"n{i:05d}"
        addr = (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 7946)
        meta = NodeMeta(name, addr, labels or {}, {})
        trust = self._trust(name) if self.identity else None
        core = Membership(
            self.config, meta, random.Random(self.rng.getrandbits(64)), self.now,
            incarnation=incarnation, decode_cache=self.decode_cache, trust=trust,
        )
        node = SimNode(i, name, addr, core, meta, trust=trust)
        self.nodes.append(node)
        self._by_addr[addr] = i
        self._after(node)
        return node

    def join(self, i: int, seeds: list[int]) -> None:
        node = self.nodes[i]
        node.core.join([self.nodes[s].addr for s in seeds], self.now)
        self._after(node)

    def leave(self, i: int) -> None:
        node = self.nodes[i]
        node.core.leave(self.now)
        self._after(node)

    def crash(self, i: int) -> None:
        node = self.nodes[i]
        node.crashed = True
        node.epoch += 1
        node.armed = None

    def restart(self, i: int, seeds: list[int], incarnation: int = 0) -> SimNode:
        """A fresh core (state lost) at the same name and address, joining ``seeds``."""
        node = self.nodes[i]
        node.crashed = False
        node.epoch += 1
        node.armed = None
        node.core = Membership(
            self.config, node.meta, random.Random(self.rng.getrandbits(64)), self.now,
            incarnation=incarnation, decode_cache=self.decode_cache, trust=node.trust,
        )
        self.join(i, seeds)
        return node

    def set_slow(self, i: int, delay: float) -> None:
        self.nodes[i].slow_delay = delay

    def partition(self, groups: list[list[int]]) -> None:
        """Nodes in different groups cannot reach each other; unlisted nodes form group 0."""
        for n in self.nodes:
            n.group = 0
        for g, members in enumerate(groups, start=1):
            for i in members:
                self.nodes[i].group = g
        self.partitioned = True

    def heal(self) -> None:
        for n in self.nodes:
            n.group = 0
        self.partitioned = False

    def reachable(self, a: int, b: int) -> bool:
        return not self.partitioned or self.nodes[a].group == self.nodes[b].group

    # ------------------------------------------------------------------ running

    def run_until(self, t_end: float) -> None:
        heap = self._heap
        nodes = self.nodes
        pop = heapq.heappop
        after = self._after
        while heap and heap[0][0] <= t_end:
            at, _, kind, i, payload = pop(heap)
            self.now = at
            node = nodes[i]
            if node.crashed:
                continue
            self.steps += 1
            if kind == _DELIVER:  # by far the most common
                src, data = payload
                node.bytes_received += len(data) + ENCRYPTION_OVERHEAD
                node.core.receive_datagram(data, nodes[src].addr, at)
            elif kind == _TIMER:
                epoch, when = payload
                if epoch != node.epoch or node.armed != when:
                    continue  # superseded by a later get_timer() of the node
                node.armed = None
                node.core.handle_timer(at)
            elif kind == _STREAM_REQ:
                src, src_epoch, data = payload
                reply = node.core.handle_stream_request(data, nodes[src].addr, at)
                if reply is None:
                    fail_at = at + self._latency(i, src)
                    self._push(fail_at, _STREAM_FAIL, src, (src_epoch, node.addr))
                else:
                    node.bytes_sent += len(reply) + ENCRYPTION_OVERHEAD
                    if self.reachable(i, src):
                        busy = self._busy(node)  # the merge's signature checks
                        at2 = at + busy + self._latency(i, src) + nodes[src].slow_delay
                        self._push(at2, _STREAM_REPLY, src, (src_epoch, node.addr, reply))
                    else:
                        self._push(at + STREAM_CONNECT_TIMEOUT, _STREAM_FAIL, src,
                                   (src_epoch, node.addr))
            elif kind == _STREAM_REPLY:
                epoch, addr, data = payload
                if epoch != node.epoch:
                    continue
                node.bytes_received += len(data) + ENCRYPTION_OVERHEAD
                node.core.receive_stream_reply(data, addr, at)
            else:  # _STREAM_FAIL
                epoch, addr = payload
                if epoch != node.epoch:
                    continue
                node.core.stream_failed(addr, at)
            after(node)
        self.now = max(self.now, t_end)

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def run_until_true(
        self, pred: Callable[[], bool], timeout: float, check_every: float = 0.5
    ) -> bool:
        """Run in steps of ``check_every`` until ``pred()`` or ``timeout`` virtual seconds pass."""
        end = self.now + timeout
        while self.now < end:
            if pred():
                return True
            self.run_until(min(end, self.now + check_every))
        return pred()

    def bootstrap(self) -> None:
        """Give every node the full alive view now, as if each had joined one seed and pulled
        it: one push-pull reply holding every node alive at its incarnation 0 (signed by the
        node itself, with every certificate, when identity is on)."""
        states = []
        for n in self.nodes:
            raw = n.meta.encode()
            if n.trust is None:
                states.append(PushPullState(n.name, 0, MemberState.ALIVE, n.meta, raw))
            else:  # the very alive the node announced at start, with its chain's anchor
                me = n.core.member(n.name)
                assert me is not None and me.incarnation == 0
                anchor = n.core._me.anchor
                sig = n.trust.sign(ALIVE_DOMAIN, alive_payload(0, raw, anchor))
                states.append(PushPullState(n.name, 0, MemberState.ALIVE, n.meta, raw, 0, sig,
                                            b"", anchor))
        certs = [n.trust.cert.raw for n in self.nodes if n.trust is not None]
        blob = PushPull(False, states, b"", certs).encode()
        seed_addr = self.nodes[0].addr
        for node in self.nodes:
            if node.addr != seed_addr:
                node.core.join([seed_addr], self.now)
                node.core.streams_to_open()  # answered just below, in memory
            node.core.receive_stream_reply(blob, seed_addr, self.now)
            self._after(node)

    # ------------------------------------------------------------------ views

    def live(self) -> list[SimNode]:
        return [n for n in self.nodes if not n.crashed]

    def state_seen(self, observer: int, subject: int) -> MemberState | None:
        return self.nodes[observer].core.state_of(self.nodes[subject].name)

    def all_see(self, subject: int, states: tuple[MemberState, ...]) -> bool:
        name = self.nodes[subject].name
        return all(
            n.core.state_of(name) in states
            for n in self.nodes
            if not n.crashed and n.index != subject
        )

    def converged_alive(self) -> bool:
        """Every live node sees every live node alive (and nobody else as alive)."""
        live = [n.name for n in self.nodes if not n.crashed]
        for n in self.nodes:
            if n.crashed:
                continue
            core = n.core
            for name in live:
                if core.state_of(name) is not MemberState.ALIVE:
                    return False
        return True

    def total_bytes_sent(self) -> int:
        return sum(n.bytes_sent for n in self.nodes)

    # ------------------------------------------------------------------ internals

    def _trust(self, name: str) -> Trust:
        """A node's keys and certificate from the simulated CA (its Trust survives restarts,
        as its key files would)."""
        keys = generate_node_keys()
        cert = sign_node(self.ca_key, self.ca, name, ["admin"], {}, keys.sign_pub, keys.dp_pub,
                         SIM_EPOCH - 3600, 3000)
        return Trust(self.ca, name, keys, cert, self.now, cache=self.verify_cache,
                     wall_offset=SIM_EPOCH, cert_memo=self.cert_memo)

    def _busy(self, node: SimNode) -> float:
        """Virtual time the node spent verifying signatures since last asked."""
        trust = node.trust
        if trust is None:
            return 0.0
        n = trust.stats.verifications
        spent = (n - node.verifications) * VERIFY_COST_S
        node.verifications = n
        return spent

    def _push(self, at: float, kind: int, i: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, kind, i, payload))

    def _latency(self, a: int, b: int) -> float:
        if self.link_latency:
            fixed = self.link_latency.get((a, b))
            if fixed is not None:
                return fixed
        lo, hi = self.latency
        return lo + (hi - lo) * self.rng.random()

    def _lost(self, a: int, b: int) -> bool:
        p = self.loss
        if self.link_loss:
            p = max(p, self.link_loss.get((a, b), 0.0), self.link_loss.get((b, a), 0.0))
        return p > 0.0 and self.rng.random() < p

    def _deliver_simple(self, i: int, out: list[tuple[bytes, Addr]], busy: float) -> None:
        """Queue deliveries with no per-link overrides and no partition (the common case):
        the same rng draws, in the same order, as _lost() then _latency() in _after."""
        by_addr = self._by_addr
        nodes = self.nodes
        rnd = self.rng.random
        loss = self.loss
        lo, hi = self.latency
        span = hi - lo
        now = self.now + busy
        heap = self._heap
        push = heapq.heappush
        seq = self._seq
        for data, addr in out:
            j = by_addr.get(addr)
            if j is None:
                continue
            if loss > 0.0 and rnd() < loss:
                continue
            dst = nodes[j]
            if dst.crashed:
                continue
            seq += 1
            push(heap, (now + lo + span * rnd() + dst.slow_delay, seq, _DELIVER, j, (i, data)))
        self._seq = seq

    def _after(self, node: SimNode) -> None:
        """Collect what ``node`` wants to send, its events and its next timer."""
        core = node.core
        i = node.index
        out = core.datagrams_to_send(self.now)
        # What the node sends leaves once it is done verifying what it received.
        now = self.now + self._busy(node)
        if out:
            node.packets_sent += len(out)
            node.bytes_sent += sum(map(len, (d for d, _ in out))) + ENCRYPTION_OVERHEAD * len(out)
            if not self.link_loss and not self.link_latency and not self.partitioned:
                self._deliver_simple(i, out, now - self.now)
            else:
                for data, addr in out:
                    j = self._by_addr.get(addr)
                    if j is None or not self.reachable(i, j) or self._lost(i, j):
                        continue
                    dst = self.nodes[j]
                    if dst.crashed:
                        continue
                    self._push(
                        now + self._latency(i, j) + dst.slow_delay, _DELIVER, j, (i, data)
                    )
        streams = core.streams_to_open()
        for data, addr in streams:
            node.bytes_sent += len(data) + ENCRYPTION_OVERHEAD
            j = self._by_addr.get(addr)
            if j is None or not self.reachable(i, j):
                self._push(now + STREAM_CONNECT_TIMEOUT, _STREAM_FAIL, i, (node.epoch, addr))
                continue
            dst = self.nodes[j]
            if dst.crashed:  # connection refused after a round trip
                self._push(now + 2 * self._latency(i, j), _STREAM_FAIL, i, (node.epoch, addr))
                continue
            self._push(
                now + self._latency(i, j) + dst.slow_delay, _STREAM_REQ, j, (i, node.epoch, data)
            )
        hook = self.on_event
        ev = core.next_event()
        while ev is not None:
            if hook is not None:
                hook(self.now, i, ev)
            ev = core.next_event()
        t = core.get_timer()
        if t is not None and t != node.armed:
            node.armed = t
            self._push(max(t, self.now), _TIMER, i, (node.epoch, t))
