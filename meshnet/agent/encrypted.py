"""The glue of `--encrypted` networks: key negotiation (meshnet/crypto/session.py) driving the
user-space datapath (encdp.py), reconciled from the store and membership like the plain overlay.

One `EncryptedOverlay` per agent. It

- owns one `EncryptedDatapath`, started when the first encrypted network exists and stopped
  (sessions, SAs, UDP port, pump thread) when the last one is removed;
- keeps one `PeerSession` per member whose metadata carries a datapath key (`dpk`), while any
  encrypted network exists: networks exist on every host, so every such pair shares one. The
  session is told when membership says the peer is (not) alive; a member that is gone from the
  list (reaped) or changed its key or address gets a fresh session;
- routes handshake datagrams to the session of the sender's underlay IP (unknown senders are
  dropped and counted) with their source address (what a cookie proves), sends what the
  sessions want sent, and arms ONE loop timer, at the earliest deadline of all sessions. One
  `HandshakeGuard` (load meters, cookie secret, rate limits) serves every session;
- after every interaction with a session pushes its SAs into the datapath: the outbound SA it
  seals with (or none: frames queue briefly, then drop; never cleartext) and the inbound SAs it
  accepts. The datapath's first record on an inbound SA (`on_first_inbound`) is the proof the
  session's make-before-break rule waits for; a `KeepaliveRequested` becomes one empty record;
- per encrypted network: the bridge (OverlayKernel.ensure_bridge, which also deletes any VXLAN
  device of that VNI: such a network has none, ever), the datapath's TAP on it, and the MAC ->
  peer and IP -> MAC tables from the store's endpoints (published, owner alive).

The crypto SAs and the datapath's SAs are different structs (the datapath's are shaped for its
pump thread): the glue makes a datapath SA per crypto SA, sharing its key and, inbound, its
replay window. Clocks: sessions run on the loop's clock (`loop.time()`); the datapath's
deadlines are `time.monotonic()` values, converted at the moment the SA is handed over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, cast

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshnet.agent import encdp
from meshnet.agent.cluster_ops import ClusterOps
from meshnet.crypto.handshake import HandshakeError, MessageType, derive_psk, message_type
from meshnet.crypto.sa import DEFAULT_CIPHER, InboundSA, OutboundSA, SaExhausted, SpiAllocator
from meshnet.crypto.session import (
    REKEY_TIMEOUT,
    HandshakeFailed,
    HandshakeGuard,
    KeepaliveRequested,
    PeerSession,
    SessionConfig,
    SessionEstablished,
    SessionExpired,
)
from meshnet.membership import Member
from meshnet.platform.links import NetDevices, OverlayKernel
from meshnet.platform.loopthread import LoopThread
from meshnet.platform.nsfd import PlatformError

log = logging.getLogger("meshnet.encrypted")

# The metadata key carrying a node's datapath public key (32 raw bytes: 35 of the 512 bytes a
# node's metadata may take).
DPK = "dpk"
DPK_SIZE = 32
# A session deadline already in the past is served at once, but never more often than this: a
# core bug that kept returning a past deadline must not spin the loop.
MIN_TIMER_S = 0.005


def session_config(rekey_after: float, reject_after: float,
                   cipher: str = DEFAULT_CIPHER) -> SessionConfig:
    """Timers for the configured rekey and reject times, and the cipher we propose. The
    retry/confirmation timeout is WireGuard's 5 s, or half the gap between the two when that is
    shorter (test-short intervals), so that an SA may still seal for a while after the rekey
    is due."""
    timeout = min(REKEY_TIMEOUT, (reject_after - rekey_after) / 2)
    return SessionConfig(rekey_after_time=rekey_after, reject_after_time=reject_after,
                         rekey_timeout=timeout, confirm_timeout=timeout, cipher=cipher)


@dataclass
class _Peer:
    name: str
    ip: str
    dpk: bytes
    session: PeerSession
    # The crypto SA last handed to the datapath, and the datapath's copy of it.
    out: OutboundSA | None = None
    dp_out: encdp.OutboundSA | None = None
    inbound: dict[int, tuple[InboundSA, encdp.InboundSA]] = field(default_factory=dict)
    failed: bool = False
    last_initiation: bytes | None = None
    stale_logged: bool = False


class EncryptedOverlay:
    def __init__(self, ops: ClusterOps, local_ip: str, local_key: X25519PrivateKey,
                 cluster_keys: Iterable[bytes], members: Callable[[], list[Member]],
                 config: SessionConfig, port: int = encdp.DEFAULT_PORT) -> None:
        self.ops = ops
        self.store = ops.store
        self.node = ops.node
        self.local_ip = local_ip
        self.local_key = local_key
        self.public = local_key.public_key().public_bytes_raw()
        self.members = members  # () -> every member we know of, any state
        self.config = config
        self.port = port
        self.psks = [derive_psk(k) for k in cluster_keys]
        self.rng = random.Random()
        self.guard = HandshakeGuard()
        self.spis = SpiAllocator(self.rng)
        self.dp: encdp.EncryptedDatapath | None = None
        self.mtu = encdp.encrypted_overlay_mtu(encdp.DEFAULT_UNDERLAY_MTU)
        self.kernel: OverlayKernel | None = None
        self.nl: LoopThread | None = None
        self.peers: dict[str, _Peer] = {}  # member name -> peer
        self.by_ip: dict[str, _Peer] = {}
        self.taps: dict[int, str] = {}  # VNI -> TAP name
        self.lock = asyncio.Lock()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at: float | None = None
        self.counters = {"handshakes_unknown_sender": 0, "handshakes_rejected": 0,
                         "handshakes_failed": 0, "initiations_resent": 0, "sessions_expired": 0,
                         "errors": 0}

    def attach(self, kernel: OverlayKernel, nl: LoopThread) -> None:
        """The plain overlay's netlink side, shared (one netlink socket, one thread)."""
        self.kernel = kernel
        self.nl = nl

    # --- desired state -----------------------------------------------------------------------

    def desired_vnis(self) -> dict[str, int]:
        vnis = self.ops.vnis()
        return {name: vnis[name] for name, net in self.store.networks().items()
                if net.encrypted and name in vnis}

    # --- lifecycle ---------------------------------------------------------------------------

    async def _start(self) -> encdp.EncryptedDatapath:
        if self.dp is not None:
            return self.dp
        dp = encdp.EncryptedDatapath(self.local_ip, self.port)
        dp.on_handshake = self._on_handshake
        dp.on_first_inbound = self._on_first_inbound
        await dp.start()
        self.dp = dp
        self.mtu = encdp.encrypted_overlay_mtu(dp.mtu)
        log.info("encrypted datapath up on %s:%d (underlay MTU %d, overlay MTU %d, GSO %s, "
                 "GRO %s)", self.local_ip, self.port, dp.mtu, self.mtu, dp.gso, dp.gro)
        return dp

    async def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.timer_at = None
        for p in list(self.peers.values()):
            p.session.close()
        self.peers.clear()
        self.by_ip.clear()
        dp, self.dp = self.dp, None
        if dp is not None:
            await dp.close()  # its TAPs go with it; the bridges are the plain overlay's to remove
        self.taps.clear()

    def set_cluster_keys(self, keys: Iterable[bytes]) -> None:
        """Key rotation: accept every installed cluster key, initiate with the primary's."""
        self.psks = [derive_psk(k) for k in keys]
        for p in self.peers.values():
            p.session.set_psks(self.psks)

    # --- reconcile (called from the overlay's loop on every pass) -----------------------------

    async def reconcile(self) -> None:
        desired = self.desired_vnis()
        if not desired:
            if self.dp is not None:
                # The last encrypted network is gone: sessions, SAs, the UDP port and the pump
                # thread go too (the next encrypted network starts them again).
                async with self.lock:
                    if not self.desired_vnis():
                        await self.close()
                        log.info("no encrypted network left: encrypted datapath stopped")
            return
        async with self.lock:
            dp = await self._start()
            self._sync_peers()
            for vni in set(self.taps) - set(desired.values()):
                dp.remove_network(vni)
                del self.taps[vni]
            for name, vni in sorted(desired.items()):
                await self._ensure_locked(vni)
                self._sync_tables(name, vni)

    async def ensure(self, network: str) -> NetDevices:
        """NETWORK's bridge and TAP exist now (a sandbox is about to be plugged in)."""
        vni = self.desired_vnis().get(network)
        if vni is None:
            raise PlatformError(f"network {network} is not an encrypted network")
        async with self.lock:
            await self._start()
            self._sync_peers()
            devs = await self._ensure_locked(vni)
            self._sync_tables(network, vni)
        return devs

    async def _ensure_locked(self, vni: int) -> NetDevices:
        assert self.kernel is not None and self.nl is not None and self.dp is not None
        tap = self.taps.get(vni)
        devs, missing = await self.nl.run(
            self.kernel.ensure_bridge(vni, self.mtu, [tap] if tap else []))
        if tap is not None and missing:
            log.warning("TAP %s of VNI %d vanished; making it again", tap, vni)
            self.dp.remove_network(vni)
            del self.taps[vni]
        if vni not in self.taps:
            self.taps[vni] = self.dp.add_network(vni, devs.bridge, self.mtu)
        return replace(devs, gso_max_size=self.dp.frame_gso_max())

    def _sync_tables(self, network: str, vni: int) -> None:
        assert self.dp is not None
        ips = self._alive_ips()
        macs: dict[str, str] = {}
        arp: dict[str, str] = {}
        for ep in self.store.endpoints(network):
            if ep.extra.get("pending"):
                continue
            if ep.node == self.node:
                macs[ep.mac] = self.local_ip  # local: the bridge delivers it, not the TAP
            elif ep.node in ips:
                macs[ep.mac] = ips[ep.node]
                arp[ep.ip] = ep.mac
        self.dp.set_macs(vni, macs)
        self.dp.set_arp(vni, arp)

    def _alive_ips(self) -> dict[str, str]:
        return {m.name: m.addr[0] for m in self.members()
                if m.name != self.node and _alive(m)}

    # --- sessions ----------------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _sync_peers(self) -> None:
        """One session per member with a datapath key; alive or not as membership says."""
        if not self.psks:
            return
        now = self._now()
        seen: set[str] = set()
        for m in self.members():
            dpk = m.meta.extra.get(DPK)
            if m.name == self.node or not isinstance(dpk, bytes) or len(dpk) != DPK_SIZE \
                    or dpk == self.public:
                continue
            seen.add(m.name)
            alive, ip = _alive(m), m.addr[0]
            p = self.peers.get(m.name)
            if p is not None and (p.dpk != dpk or p.ip != ip):
                self._drop_peer(p)  # a new identity or a new address: start over
                p = None
            if p is None:
                if not alive or ip in self.by_ip:
                    continue
                p = self._new_peer(m.name, ip, dpk, now)
            else:
                p.session.set_peer_alive(alive, now)
            self._service(p, now)
        for name in set(self.peers) - seen:
            self._drop_peer(self.peers[name])
        self._arm()

    def _new_peer(self, name: str, ip: str, dpk: bytes, now: float) -> _Peer:
        session = PeerSession(
            self.local_key, dpk, self.psks, rng=self.rng, peer=name, config=self.config,
            guard=self.guard, spis=self.spis, wall_offset=time.time() - now, now=now)
        p = _Peer(name, ip, dpk, session)
        self.peers[name] = p
        self.by_ip[ip] = p
        session.start(now)
        return p

    def _drop_peer(self, p: _Peer) -> None:
        p.session.close()
        self.peers.pop(p.name, None)
        if self.by_ip.get(p.ip) is p:
            del self.by_ip[p.ip]
        if self.dp is not None:
            self.dp.set_outbound(p.ip, None)
            self.dp.set_inbound(p.ip, {})

    def _service(self, p: _Peer, now: float) -> None:
        """Run the session's due timers, send its handshakes, push its SAs, act on events."""
        s = p.session
        self._sync_seq(p)
        deadline = s.get_timer()
        if deadline is not None and deadline <= now:
            s.handle_timer(now)
        self._push(p, now)
        dp = self.dp
        if dp is not None:
            for message in s.handshakes_to_send():
                if message_type(message) is MessageType.INITIATION:
                    p.last_initiation = message
                dp.send_handshake(message, (p.ip, self.port))
        keepalive = False
        while (ev := s.next_event()) is not None:
            if isinstance(ev, KeepaliveRequested):
                keepalive = True
            elif isinstance(ev, SessionEstablished):
                p.failed = False
                log.debug("keys with %s: in %#010x out %#010x (%s)", p.name, ev.inbound_spi,
                          ev.outbound_spi, "initiator" if ev.initiator else "responder")
            elif isinstance(ev, HandshakeFailed):
                self.counters["handshakes_failed"] += 1
                if not p.failed:
                    log.warning("no handshake with %s after %d attempts; retrying slowly",
                                p.name, ev.attempts)
                p.failed = True
            elif isinstance(ev, SessionExpired):
                self.counters["sessions_expired"] += 1
                log.info("keys with %s expired before new ones were agreed", p.name)
        if keepalive and dp is not None:
            dp.send_keepalive(p.ip)

    def _sync_seq(self, p: _Peer) -> None:
        """Tell the crypto SA how many sequence numbers the datapath used, so the session's
        rekey-after-messages rule sees them."""
        if p.out is None or p.dp_out is None:
            return
        used = p.dp_out.seq - 1
        if used > p.out.seq:
            with contextlib.suppress(SaExhausted, ValueError):
                p.out.next_seq(min(used, p.out.seq_limit) - p.out.seq)

    def _push(self, p: _Peer, now: float) -> None:
        """Hand the session's current SAs to the datapath (only what changed)."""
        dp = self.dp
        if dp is None:
            return
        s = p.session
        mono = time.monotonic() - now  # loop time -> monotonic time
        out = s.outbound()
        if out is not p.out:
            p.out = out
            if out is None:
                p.dp_out = None
            else:
                p.dp_out = encdp.OutboundSA(
                    out.spi, out.key, out.cipher, seq=out.seq + 1, max_seq=out.seq_limit,
                    expires_at=out.created_at + s.config.send_after + mono)
            dp.set_outbound(p.ip, p.dp_out)
        sas = s.inbound_sas()
        if {spi: sa for spi, (sa, _) in p.inbound.items()} != dict(sas):
            fresh: dict[int, tuple[InboundSA, encdp.InboundSA]] = {}
            for spi, sa in sas.items():
                have = p.inbound.get(spi)
                if have is not None and have[0] is sa:
                    fresh[spi] = have
                else:
                    fresh[spi] = (sa, encdp.InboundSA(spi, sa.key, sa.cipher,
                                                      expires_at=sa.expires_at + mono,
                                                      window=sa.window))
            p.inbound = fresh
            dp.set_inbound(p.ip, {spi: d for spi, (_, d) in fresh.items()})

    def _arm(self) -> None:
        """One loop timer for the earliest deadline of all sessions."""
        deadlines = [t for p in self.peers.values() if (t := p.session.get_timer()) is not None]
        if not deadlines:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.timer_at = None
            return
        loop = asyncio.get_running_loop()
        when = max(min(deadlines), loop.time() + MIN_TIMER_S)
        if self.timer is not None and self.timer_at is not None and \
                self.timer_at <= when and not self.timer.cancelled():
            return  # an earlier (or the same) wake-up is armed; it re-arms after serving
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = when
        self.timer = loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = self.timer_at = None
        now = self._now()
        for p in list(self.peers.values()):
            deadline = p.session.get_timer()
            if deadline is not None and deadline <= now:
                self._service(p, now)
        self._arm()

    # --- datapath callbacks (on the event loop) ------------------------------------------------

    def _on_handshake(self, data: bytes, addr: tuple[str, int]) -> None:
        p = self.by_ip.get(addr[0])
        if p is None:
            self.counters["handshakes_unknown_sender"] += 1
            return
        now = self._now()
        s = p.session
        crossed = s.stats.simultaneous_dropped
        try:
            s.receive_handshake(data, now, addr)
        except HandshakeError as e:
            self.counters["handshakes_rejected"] += 1  # by reason in the session's stats
            if e.reason == "stale" and not p.stale_logged:
                # Authentic, but stamped before this session began: a replay, or a peer whose
                # clock is behind ours by more than the skew. Once per session: the counter
                # (handshake_stale) says how often.
                p.stale_logged = True
                log.warning("refusing handshake initiations from %s stamped more than %g s "
                            "before this session began (replays, or its clock is behind)",
                            p.name, s.config.timestamp_skew)
        if s.stats.simultaneous_dropped > crossed and p.last_initiation is not None \
                and self.dp is not None:
            # The peer initiated while ours is pending, and we keep the initiator role: ours
            # may have been lost (the peer's datapath was not up yet), and the peer, having
            # yielded nothing, would wait a whole retry interval. Send the SAME initiation
            # again: if it did arrive before, the peer refuses the copy (same timestamp).
            self.counters["initiations_resent"] += 1
            self.dp.send_handshake(p.last_initiation, (p.ip, self.port))
        self._service(p, now)
        self._arm()

    def _on_first_inbound(self, peer_ip: str, spi: int) -> None:
        """The first authentic record on an inbound SA: the peer has the keys (confirmation)."""
        p = self.by_ip.get(peer_ip)
        if p is None:
            return
        now = self._now()
        sa = p.session.inbound_sas().get(spi)
        if sa is not None and sa.first_seen is None:
            sa.first_seen = now
        self._service(p, now)
        self._arm()

    # --- views -------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """The datapath and the cipher we propose (a peer's initiation may pick the other)."""
        return f"userspace-{self.config.cipher}"

    def status(self) -> dict[str, Any]:
        """`meshctl status` datapath.encrypted. Handshake refusals: `handshakes_rejected` in
        all, `handshake_drops` by reason (summed over the current peers' sessions, the same
        reasons `network inspect` shows per peer as handshake_*), `handshakes_dropped` (the
        datapath's queue to us was full), `handshakes_unknown_sender`, and `handshake_guard`:
        the node's load state, cookie replies and rate-limit refusals by limit."""
        dp = self.dp
        guard = self.guard.info(self._now())
        if dp is None:
            return {"kind": self.kind, "running": False, "peers": len(self.peers),
                    "handshake_guard": guard}
        net = dp.network_stats()
        drops: Counter[str] = Counter()
        for p in self.peers.values():
            drops.update(p.session.stats.rejected)
        return {
            "kind": self.kind, "running": True, "port": self.port, "gso": dp.gso, "gro": dp.gro,
            "underlay_mtu": dp.mtu, "overlay_mtu": self.mtu,
            "max_datagram": net.get("max_datagram"),
            "peers": len(self.peers),
            "established": sum(1 for p in self.peers.values() if p.out is not None),
            "networks": len(self.taps),
            "handshakes_in": net.get("handshakes_in"),
            "handshakes_dropped": net.get("handshakes_dropped"),
            "handshake_drops": dict(sorted(drops.items())),
            "cookies_sent": sum(p.session.stats.cookies_sent for p in self.peers.values()),
            "cookies_received": sum(p.session.stats.cookies_received
                                    for p in self.peers.values()),
            "handshake_guard": guard,
            **self.counters,
        }

    def peers_info(self) -> list[dict[str, Any]]:
        """Per peer, for `meshctl network inspect`: SPIs, age, packets, bytes, rekeys, drops."""
        stats = self.dp.stats() if self.dp is not None else {}
        now = self._now()
        out = []
        for p in sorted(self.peers.values(), key=lambda p: p.name):
            s = p.session
            info = s.info(now)
            st = stats.get(p.ip, {})
            drops: dict[str, Any] = dict(cast(dict[str, int], st.get("drops") or {}))
            for reason, n in s.stats.rejected.items():
                drops[f"handshake_{reason}"] = n
            age = info.get("age")
            out.append({
                "node": p.name,
                "addr": p.ip,
                "alive": s.alive,
                "established": p.out is not None,
                "spi": p.out.spi if p.out is not None else None,
                "cipher": p.out.cipher if p.out is not None else None,
                "inbound_spis": sorted(s.inbound_sas()),
                "age": round(age, 3) if isinstance(age, float) else None,
                "packets": st.get("packets", 0),
                "bytes": st.get("bytes", 0),
                "tx_packets": st.get("tx_packets", 0),
                "rx_packets": st.get("rx_packets", 0),
                "tx_bytes": st.get("tx_bytes", 0),
                "rx_bytes": st.get("rx_bytes", 0),
                "queued": st.get("queued", 0),
                "rekeys": s.stats.rekeys,
                "handshakes": s.stats.handshakes_completed,
                "initiations_sent": s.stats.initiations_sent,
                "cookies_sent": s.stats.cookies_sent,
                "cookies_received": s.stats.cookies_received,
                "drops": drops,
            })
        return out


def _alive(m: Member) -> bool:
    return str(m.state.value) in ("alive", "suspect")

