"""meshnetd's body: wires the cores to sockets, timers, signals, systemd and the control API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import signal
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgpack
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import meshnet
from meshnet import config as configmod
from meshnet.agent import identity, logs, preflight, systemd
from meshnet.agent import reload as reloadmod
from meshnet.agent.certificates import load_trust
from meshnet.agent.cluster_ops import ClusterOps
from meshnet.agent.control import ControlServer, Handler, OpError, SendEvent
from meshnet.agent.dns_server import DnsServer, Listener, read_resolv_conf
from meshnet.agent.encrypted import DPK, EncryptedOverlay, session_config
from meshnet.agent.eventhub import EventHub, serve_events
from meshnet.agent.gossip import STREAM_KEY_OP, GossipTransport, Sealer, StreamError
from meshnet.agent.ingress import Ingress, reserved_ports
from meshnet.agent.overlay import Overlay
from meshnet.agent.sandboxes import Sandboxes
from meshnet.agent.services import TASKS, Services
from meshnet.agent.state_service import StateService
from meshnet.agent.telemetry import Telemetry
from meshnet.agent.vips import VipBalancer
from meshnet.config import DEFAULT_CONFIG_PATH, Config
from meshnet.crypto.certs import ARMOR_REVOCATION, CertError, dearmor, decode_revocation, iso_time
from meshnet.crypto.identity import IdentityError, load_or_create_identity, public_bytes
from meshnet.crypto.keyring import Keyring, KeyringError, key_id, parse_key
from meshnet.crypto.trust import REQUEST_DOMAIN, Trust
from meshnet.dns import Resolver
from meshnet.fsutil import atomic_write
from meshnet.membership import (
    Member,
    MemberEvent,
    Membership,
    MembershipConfig,
    NodeMeta,
)
from meshnet.placement import NodeInfo
from meshnet.platform.container import hidden_paths
from meshnet.state import Store, StoreConfig, tombstone_ttl_for
from meshnet.state.authz import CERTS, REVOCATIONS, RecordPolicy, cert_key
from meshnet.state.store import LIFE_FIELD

log = logging.getLogger("meshnet.agent")

KEYRING_FILE = "keyring.json"
# The node's static X25519 key for the encrypted datapath's handshakes (0600).
DATAPATH_KEY_FILE = "datapath.key"
# Known peers, so a restarted agent finds its cluster again without --join (Serf's snapshot).
PEERS_FILE = "peers.json"
# Member changes come in bursts (a join brings the whole list); write the peers file once per burst.
PEERS_SAVE_DELAY_S = 1.0
# A restarted agent tries this many remembered peers; one answer is enough to rejoin.
MAX_REMEMBERED_PEERS = 16
# SIGTERM must finish within 5 s (systemd's patience is longer, a user's is not).
SHUTDOWN_BUDGET_S = 5.0
# Seeds that do not answer are retried with backoff up to this gap, forever (Consul's retry_join).
JOIN_RETRY_MAX_S = 10.0
# Key operations fan out to every member; this many at once keeps a big cluster from a storm.
KEY_OP_CONCURRENCY = 32
KEY_OPS = ("install", "use", "remove", "list")
# How often the loop-clock-to-Unix-time offset for certificate expiry is refreshed.
WALL_CLOCK_CHECK_S = 30.0
# A reload: what applies a group of live keys (Agent._reload_appliers).
ReloadApplier = Callable[[Config, Config], Awaitable[dict[str, Any]]]
IDENTITY_KEYS = ("ca_cert", "node_cert", "node_key")
# Run on every reload, changed or not: a renewed certificate keeps its file names, and
# /etc/resolv.conf (dns_upstreams unset) may have changed.
RELOAD_EVERY_TIME = frozenset({IDENTITY_KEYS, ("dns_upstreams",)})


# A signed key operation older than this is refused (clocks must agree to well within it).
KEY_OP_MAX_AGE_S = 300


def _key_op_signed(req: dict[str, Any]) -> bytes:
    return bytes(msgpack.packb([req.get("op"), req.get("key"), req.get("by"), req.get("at")]))


def parse_key_op_request(body: bytes) -> dict[str, Any]:
    """A key operation another member asks of us (what ``_key_op_request`` makes): a small map
    whose ``op`` and ``key`` (if given) are strings. ValueError for anything else."""
    try:
        req = msgpack.unpackb(body, raw=False, max_str_len=256, max_array_len=4,
                              max_map_len=8, max_bin_len=64)
    except (ValueError, msgpack.UnpackException) as e:  # msgpack's decoding errors
        raise ValueError(f"undecodable key operation: {e}") from None
    if not isinstance(req, dict):
        raise ValueError("not a map")
    if not isinstance(req.get("op"), str) or not isinstance(req.get("key", ""), str):
        raise ValueError("op and key must be strings")
    return req


def parse_key_op_reply(raw: bytes) -> list[str] | str:
    """A member's answer to a key operation (what ``_key_op_in`` sends): the keys it holds once
    it applied the operation, or why it did not, as text. Never raises: anything else is
    "bad reply"."""
    try:
        reply = msgpack.unpackb(raw, raw=False)
    except (ValueError, msgpack.UnpackException):  # msgpack's decoding errors
        return "bad reply"
    if not isinstance(reply, dict):
        return "bad reply"
    if not reply.get("ok"):
        error = reply.get("error", "failed")
        return error if isinstance(error, str) else "failed"
    keys = reply.get("keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        return "bad reply"
    return keys


class StartError(Exception):
    """The agent cannot start; the message is the one line meshnetd prints."""


# The agent's version rides in its gossiped metadata under this key (`members` shows it). It
# costs 5 + len(version) of the 512 bytes a node's metadata may take: with the rest of the
# fixed part at its largest (name 63, IPv6 host, port, node id, datapath key) and a version of
# 32 characters that is 225 bytes, leaving 287 for labels (tests/unit/test_version_gossip.py).
VERSION_META_KEY = "ver"
# A version as PEP 440 spells one (and no more): anything else from a peer is shown as unknown.
_VERSION_RE = re.compile(r"[0-9A-Za-z.+_-]{1,32}")


def gossiped_version(extra: Mapping[str, object]) -> str | None:
    """The agent version a member's metadata carries, or None (an older agent, or a value that
    is not a version). Never raises."""
    value = extra.get(VERSION_META_KEY)
    return value if isinstance(value, str) and _VERSION_RE.fullmatch(value) else None


def member_json(m: Member) -> dict[str, Any]:
    return {
        "name": m.name,
        "addr": f"{m.addr[0]}:{m.addr[1]}",
        "state": str(m.state.value if hasattr(m.state, "value") else m.state),
        "incarnation": m.incarnation,
        "labels": dict(m.meta.labels),
        "version": gossiped_version(m.meta.extra),
    }


def membership_config(config: Config) -> MembershipConfig:
    timings: MembershipConfig = configmod.membership_timings(config)
    return timings


CLOCK_SKEW_ENV = "MESHNET_TEST_CLOCK_SKEW_S"


def _test_clock_skew() -> float:
    """Seconds added to this agent's wall clock, from MESHNET_TEST_CLOCK_SKEW_S (tests only)."""
    text = os.environ.get(CLOCK_SKEW_ENV, "")
    try:
        skew = float(text) if text else 0.0
    except ValueError:
        log.warning("%s=%r is not a number of seconds; ignored", CLOCK_SKEW_ENV, text)
        return 0.0
    if skew:
        log.warning("test hook: this agent's clock runs %+.1f s off (%s)", skew, CLOCK_SKEW_ENV)
    return skew


class Agent:
    def __init__(self, config: Config, config_path: str | None = None,
                 flag_overrides: dict[str, Any] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.flag_overrides = flag_overrides or {}
        self.stopping = asyncio.Event()
        # What changed, for `meshctl events` (published from the handlers below).
        self.events = EventHub(self.wall_clock)
        self.started_at = time.monotonic()
        self.keyring: Keyring | None = None
        self.keyring_path = Path(config.state_dir) / KEYRING_FILE
        self.record = identity.NodeRecord("", config.name, 0, 0)
        # This life: the incarnation we started with (in our metadata and task records).
        self.life = 0
        self.membership: Membership | None = None
        self.state: StateService | None = None
        self.ops: ClusterOps | None = None
        self.dns: DnsServer | None = None
        self.overlay: Overlay | None = None
        self.encrypted: EncryptedOverlay | None = None
        self.datapath_key: X25519PrivateKey | None = None
        self.trust: Trust | None = None
        self.records: RecordPolicy | None = None
        self.sandboxes: Sandboxes | None = None
        self.services: Services | None = None
        self.ingress: Ingress | None = None
        self.vips: VipBalancer | None = None
        self.gossip: GossipTransport | None = None
        self.control: ControlServer | None = None
        self.telemetry: Telemetry | None = None  # metrics_listen
        self.background: set[asyncio.Task[Any]] = set()
        self.left = False
        self.peers_save: asyncio.Task[None] | None = None
        self.reload_lock = asyncio.Lock()
        self.meta_stale = False  # a reload changed what our metadata says: announce it
        self.host_dns: dict[tuple[str, int], Listener] = {}  # dns_listen's listeners
        self.status_throttle = systemd.StatusThrottle()
        # Lab hosts share one clock; tests give one agent a skewed wall clock with this.
        self.clock_skew_s = _test_clock_skew()

    def wall_clock(self) -> float:
        """Wall time as this agent sees it (the freshness of what it seals and accepts)."""
        return time.time() + self.clock_skew_s

    # --- start and stop -------------------------------------------------------------------

    def _load_keyring(self) -> Keyring | None:
        cfg = self.config
        try:
            if self.keyring_path.exists():
                return Keyring.load(self.keyring_path)
            if cfg.cluster_key_file:
                ring = Keyring.from_key_file(cfg.cluster_key_file)
                ring.save(self.keyring_path)
                return ring
        except KeyringError as e:
            raise StartError(str(e)) from None
        except OSError as e:
            raise StartError(f"cluster_key_file: cannot read {cfg.cluster_key_file}: "
                             f"{e.strerror}") from None
        if cfg.insecure_no_encryption:
            return None  # preflight logged the warning
        raise StartError(preflight.NO_CLUSTER_KEY)

    async def _publish_cert(self) -> None:
        """Our certificate in the store's certs table: whoever checks our records later (a node
        that joins after we left, say) finds it there."""
        assert self.trust is not None and self.state is not None
        cert = self.trust.cert
        if self.state.store.get(CERTS, cert_key(cert)) is None:
            await self.state.put(CERTS, cert_key(cert), {"cert": cert.raw})

    def _learn_from_store(self) -> None:
        """Certificates and revocations that arrived in the store feed the trust; a member
        whose every certificate is now revoked is dropped at once."""
        trust, store = self.trust, self.state.store if self.state else None
        if trust is None or store is None:
            return
        now = asyncio.get_running_loop().time()
        for value in store.view(CERTS).values():
            raw = value.get("cert")
            if isinstance(raw, bytes):
                trust.learn_cert(raw, now)
        dropped = []
        for value in store.view(REVOCATIONS).values():
            raw = value.get("revocation")
            if not isinstance(raw, bytes):
                continue
            try:
                rev = trust.learn_revocation(raw)
            except CertError:
                continue  # the authorizer admits only the CA's; this cannot happen
            if rev is not None and trust.revoked(rev.name):
                dropped.append(rev.name)
        for name in dropped:
            if name == self.config.name:
                log.error("this node's certificate was revoked: the cluster no longer "
                          "accepts it (sign a new one and restart)")
            elif self.membership is not None and self.membership.drop(name, now):
                log.warning("member %s dropped: its certificate was revoked", name)
        if dropped and self.gossip is not None:
            self.gossip.pump()

    async def _op_ca_revoke(self, args: dict[str, Any], send: SendEvent) -> Any:
        """`meshctl ca revoke`: store a CA-signed revocation, which the cluster gossips."""
        trust = self.trust
        if trust is None or self.state is None:
            raise OpError("this agent runs without identity (--insecure-no-identity)")
        text = args.get("revocation")
        if not isinstance(text, str) or len(text) > 8192:
            raise OpError("ca.revoke needs an armored revocation")
        try:
            raw = dearmor(ARMOR_REVOCATION, text)
            rev = decode_revocation(raw, trust.ca)
        except CertError as e:
            raise OpError(f"revocation refused: {e}") from None
        serial = rev.serial.hex() if rev.serial else "all"
        await self.state.put(REVOCATIONS, f"{rev.name}/{serial}/{rev.issued_at}",
                             {"revocation": raw})
        self._learn_from_store()
        return {"revoked": rev.name, "serial": serial, "issued_at": iso_time(rev.issued_at)}

    def _load_trust(self, loop_now: float) -> Trust | None:
        cfg = self.config
        if not cfg.ca_cert:
            if not cfg.insecure_no_identity:
                raise StartError(preflight.NO_IDENTITY)
            return None  # preflight logged the warning
        try:
            trust = load_trust(cfg, loop_now, time.time())
        except CertError as e:
            raise StartError(f"identity: {e}") from None
        log.info("identity: certificate for %s, roles %s, valid until %s", trust.cert.name,
                 ",".join(trust.cert.roles), iso_time(trust.cert.not_after))
        return trust

    def _meta(self) -> NodeMeta:
        return NodeMeta(
            name=self.config.name,
            addr=self.config.advertise_addr(),
            labels=dict(self.config.labels),
            extra={"id": self.record.node_id, VERSION_META_KEY: meshnet.__version__,
                   LIFE_FIELD: self.life,
                   **({DPK: public_bytes(self.datapath_key)} if self.datapath_key else {})},
        )

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        # The same checks as `meshnetd --check-config`, first: what it passes, we start with.
        found = preflight.check(self.config)
        for warning in found.warnings:
            log.warning("%s", warning)
        if found.errors:
            raise StartError(found.errors[0])
        try:
            self.record = identity.load_or_create(self.config.state_dir, self.config.name,
                                                  self.wall_clock())
        except identity.StateDirError as e:
            raise StartError(str(e)) from None
        self.life = self.record.incarnation
        self.keyring = self._load_keyring()
        self.trust = self._load_trust(loop.time())
        if self.trust is not None:
            # The certificate binds the datapath key: peers check it against the certificate.
            self.datapath_key = self.trust.keys.dp
        else:
            try:
                self.datapath_key = load_or_create_identity(
                    Path(self.config.state_dir) / DATAPATH_KEY_FILE)
            except (IdentityError, OSError, ValueError) as e:
                raise StartError(f"datapath key: {e}") from None
        try:
            mcfg = membership_config(self.config)
        except ValueError as e:  # config.py checks it; a Config built by hand may not fit
            raise StartError(f"membership: {e}") from None
        store = Store(self.config.name, StoreConfig(
            tombstone_ttl=tombstone_ttl_for(mcfg.reap_after, mcfg.push_pull_interval),
            owned_tables={"endpoints": "node", TASKS: "node"}))
        if self.trust is not None:
            # Our records are signed; others' are checked (state/authz.py) before they count.
            self.records = RecordPolicy(self.trust)
            store.set_signer(self.records.sign)
            store.set_authorizer(self.records.authorize)
        self.state = await StateService.open(self.config.state_dir, self.config.name, store)
        self.state.change_listeners.append(self.events.store_change)
        resolver = Resolver(ttl=self.config.dns_ttl)
        self.ops = ClusterOps(self.state, resolver, self.config.name, self.config.address_pool)
        if self.records is not None:
            self.ops.may_write = self.records.may_write
            self.state.listeners.append(self._learn_from_store)
            await self._publish_cert()
        self.state.listeners.append(self.ops.refresh_dns)
        self.ops.refresh_dns()
        try:
            self.membership = Membership(
                mcfg, self._meta(), random.Random(),
                loop.time(), delegate=self.state, incarnation=self.record.incarnation,
                trust=self.trust,
            )
        except ValueError as e:
            raise StartError(f"membership: {e}") from None
        sealer = Sealer(self.keyring, self.config.name, self.record.fresh_epoch, self.wall_clock)
        # Saved before the first message: a later life starts its freshness epochs above ours.
        self.record.fresh_epoch = sealer.fresh.epoch
        try:
            identity.save(self.config.state_dir, self.record)
        except OSError as e:
            raise StartError(f"state dir {self.config.state_dir}: {e.strerror}") from None
        self.gossip = GossipTransport(
            self.membership, sealer, self.config.bind, self._on_member_event
        )
        self.gossip.stream_handlers[STREAM_KEY_OP] = self._key_op_in
        self.state.attach(self.gossip)
        try:
            await self.gossip.start()
        except OSError as e:
            raise StartError(f"bind {self.config.bind[0]}:{self.config.bind[1]}: "
                             f"{e.strerror or e}") from None
        await self._start_dns(resolver)
        if self.config.datapath == "vxlan":
            await self._start_overlay()
        self.control = ControlServer(self.config.socket, self._handlers(),
                                     long_running=frozenset({"run", "service.logs", "events"}))
        try:
            await self.control.start()
        except OSError as e:
            await self.gossip.close()
            raise StartError(f"socket {self.config.socket}: {e.strerror or e}") from None

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._spawn_reload)
        seeds = list(self.config.join) + [p for p in self._remembered_peers()
                                          if p not in self.config.join]
        if seeds:
            self._spawn(self._retry_join(seeds))
        interval = systemd.watchdog_interval()
        if interval is not None:
            self._spawn(self._watchdog(interval))
        if self.trust is not None:
            self._spawn(self._track_wall_clock())
        if self.config.metrics_listen is not None:
            await self._start_metrics(self.config.metrics_listen)
        log.info("meshnetd %s serving", meshnet.__version__, extra={"fields": {
            "name": self.config.name, "bind": f"{self.config.bind[0]}:{self.config.bind[1]}",
            "socket": self.config.socket, "incarnation": self.record.incarnation}})
        systemd.notify(f"READY=1\nSTATUS={self._status_text()}")

        await self.stopping.wait()
        systemd.notify("STOPPING=1")
        try:
            async with asyncio.timeout(SHUTDOWN_BUDGET_S - 0.5):
                await self._shutdown()
        except TimeoutError:
            log.warning("shutdown took too long; exiting anyway")
        return 0

    async def _start_metrics(self, addr: tuple[str, int]) -> None:
        """/metrics and /health (issue 16) on ADDR, served from this loop."""
        self.telemetry = Telemetry(self)
        try:
            await self.telemetry.start(addr)
        except OSError as e:
            self.telemetry = None
            assert self.control is not None and self.gossip is not None
            await self.control.close()
            await self.gossip.close()
            raise StartError(f"metrics_listen {addr[0]}:{addr[1]}: {e.strerror or e}") from None

    async def _start_dns(self, resolver: Resolver) -> None:
        cfg = self.config
        upstreams = (list(cfg.dns_upstreams) if cfg.dns_upstreams is not None
                     else read_resolv_conf())
        self.dns = DnsServer(resolver, upstreams)
        for addr in cfg.dns_listen:
            try:
                self.host_dns[addr] = await self.dns.add_listener(addr, None)
            except OSError as e:
                raise StartError(f"dns_listen {addr[0]}:{addr[1]}: {e.strerror}") from None

    async def _start_overlay(self) -> None:
        assert self.ops is not None and self.state is not None and self.gossip is not None
        assert self.dns is not None
        self.overlay = Overlay(self.ops, self.config.advertise_addr()[0], self._vteps)
        try:
            await self.overlay.start()
        except OSError as e:
            raise StartError(f"overlay: {e}") from None
        self.state.listeners.append(self.overlay.kick)
        if self.keyring is not None and self.datapath_key is not None:
            # Encrypted networks authenticate handshakes with the cluster key: none, no datapath.
            self.encrypted = EncryptedOverlay(
                self.ops, self.config.advertise_addr()[0], self.datapath_key,
                self.keyring.keys(), self._all_members,
                session_config(self.config.rekey_after_s, self.config.reject_after_s,
                               self.config.overlay_cipher))
            self.overlay.attach_encrypted(self.encrypted)
            self.ops.encrypted_peers = self.encrypted.peers_info
        self.sandboxes = Sandboxes(self.ops, self.state, self.overlay, self.dns,
                                   self.gossip, self._peers, self.config.sandbox_prefix,
                                   self._hidden_from_tasks())
        self.sandboxes.life = self.life
        if self.trust is not None:
            trust = self.trust
            self.sandboxes.is_admin = lambda: trust.cert.is_admin
        await self.sandboxes.adopt()
        self.services = Services(self.state, self.sandboxes, self.gossip, self.config.name,
                                 self._placement_nodes, self._peers,
                                 Path(self.config.state_dir) / "logs",
                                 expect_company=bool(self.config.join or
                                                     self._remembered_peers()),
                                 life=self.life)
        self.state.listeners.append(self.services.kick)
        # VIPs: claimed at `service create`, balanced in every sandbox here (agent/vips.py)
        self.vips = VipBalancer(self.sandboxes, self.overlay.nl)
        self.sandboxes.on_wired = self.vips.on_wired
        self.services.vips = self.vips
        self.state.listeners.append(self.vips.kick)
        self.vips.start()
        await self.services.start()
        # Published ports (issue 17): host addresses and the routing mesh's nftables table
        self.ingress = Ingress(
            self.state, self.overlay, self.sandboxes, self.config.name,
            self.config.advertise_addr()[0], lambda: reserved_ports(self.config),
            self._member_ports)
        self.services.create_checks.append(self.ingress.check_create)
        self.state.listeners.append(self.ingress.kick)
        await self.ingress.start()

    def _hidden_from_tasks(self) -> list[str]:
        """The agent's state, socket, config, cluster key and identity (and their directories):
        never visible to a task (platform/container.py covers them in every task's file system)."""
        cfg = self.config
        config_file = self.config_path or (DEFAULT_CONFIG_PATH if Path(DEFAULT_CONFIG_PATH)
                                           .exists() else None)
        files = [f for f in (cfg.socket, cfg.cluster_key_file, config_file, cfg.node_key,
                             cfg.node_cert, cfg.ca_cert) if f]
        dirs = [cfg.state_dir, *(os.path.dirname(os.path.abspath(f)) for f in files),
                *cfg.task_hidden_paths]
        return hidden_paths(dirs, files)

    def _placement_nodes(self) -> list[NodeInfo]:
        assert self.membership is not None
        out = []
        for m in self.membership.members():
            if str(m.state.value) not in ("alive", "suspect"):
                continue
            weight = m.meta.extra.get("capacity", 1)
            out.append(NodeInfo(name=m.name, labels=dict(m.meta.labels),
                                weight=float(weight) if isinstance(weight, int) and weight > 0
                                else 1.0))
        return out

    def _all_members(self) -> list[Member]:
        """Members for the encrypted datapath: with identity, only those whose advertised
        datapath key is the one their certificate binds."""
        assert self.membership is not None
        members = list(self.membership.members())
        trust = self.trust
        if trust is None:
            return members
        now = asyncio.get_running_loop().time()
        out = []
        for m in members:
            cert = trust.current(m.name, now)
            if cert is not None and m.meta.extra.get(DPK) == cert.dp_key:
                out.append(m)
        return out

    def _vteps(self) -> dict[str, str]:
        assert self.membership is not None
        return {m.name: m.addr[0] for m in self.membership.members()
                if str(m.state.value) in ("alive", "suspect")}

    def _member_ports(self) -> dict[str, int]:
        """Alive or suspect members (this one too) -> their gossip port (agent/ingress.py)."""
        assert self.membership is not None
        return {m.name: m.addr[1] for m in self.membership.members()
                if str(m.state.value) in ("alive", "suspect")}

    def _peers(self) -> list[Member]:
        assert self.membership is not None
        return [m for m in self.membership.members()
                if m.name != self.config.name and str(m.state.value) in ("alive", "suspect")]

    async def _shutdown(self) -> None:
        log.info("shutting down")
        if self.services is not None:  # tasks stop and endpoints are withdrawn before `left`
            await self.services.close()
        if self.vips is not None:
            await self.vips.close()
        if self.sandboxes is not None:
            await self.sandboxes.close()
        if self.ingress is not None:  # host addresses withdrawn before `left`, table removed
            await self.ingress.close()
        if not self.left:
            await self._leave()
        for task in [*self.background, self.peers_save]:
            if task is not None:
                task.cancel()
        if self.control is not None:
            await self.control.close()
        if self.telemetry is not None:
            await self.telemetry.close()
        if self.gossip is not None:
            await self.gossip.close()
        if self.overlay is not None:
            await self.overlay.close()
        if self.dns is not None:
            await self.dns.close()
        if self.state is not None:
            await self.state.close()
        if self.membership is not None:
            self.record.incarnation = self.membership.local().incarnation
            with contextlib.suppress(OSError):
                identity.save(self.config.state_dir, self.record)

    async def _leave(self) -> None:
        """Announce `left` and give the gossip a few rounds to carry it."""
        assert self.membership is not None and self.gossip is not None
        self.left = True
        self.membership.leave(self.gossip.now())
        self.gossip.pump()
        if self.membership.num_alive() > 1:
            cfg = self.membership.config
            await asyncio.sleep(min(2.0, 4 * cfg.gossip_interval + cfg.probe_interval))

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def _track_wall_clock(self) -> None:
        """Certificates expire in Unix time, membership runs on the loop's clock: keep the
        offset between them current (the wall clock may be stepped)."""
        loop = asyncio.get_running_loop()
        while True:
            if self.trust is not None:
                self.trust.wall_offset = time.time() - loop.time()
            await asyncio.sleep(WALL_CLOCK_CHECK_S)

    async def _watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _retry_join(self, seeds: list[tuple[str, int]]) -> None:
        assert self.gossip is not None
        delay = 0.5
        while True:
            joined = await self.gossip.join(seeds)
            if joined:
                log.info("joined the cluster through %d of %d seeds", joined, len(seeds))
                return
            log.warning("no seed answered; retrying in %.1fs", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, JOIN_RETRY_MAX_S)

    def _spawn_reload(self) -> None:
        self._spawn(self._reload())

    async def _reload(self) -> None:
        """SIGHUP: read the config again, apply every key that changes live (config.py's table
        says which), and name in one line each changed key that waits for a restart. systemd
        hears RELOADING=1 when it starts and READY=1 when it is done."""
        async with self.reload_lock:  # two SIGHUPs in a row: one reload after the other
            systemd.notify(systemd.reloading())
            try:
                await self._apply_reload()
            except Exception as e:  # a bug: the agent runs on with what it had
                log.error("reload failed: %s", logs.error_line(e))
            finally:
                systemd.notify(f"READY=1\nSTATUS={self._status_text()}")

    async def _apply_reload(self) -> None:
        try:
            fresh = configmod.load(self.config_path, self.flag_overrides,
                                   explicit_path=self.config_path is not None)
        except configmod.ConfigError as e:
            log.error("reload refused, nothing changed: %s", "; ".join(e.problems))
            return
        running = self.config
        plan = reloadmod.plan(running, fresh)
        if plan.restart:
            log.warning("reload: %s changed but need%s a restart; running with the old value "
                        "until then", ", ".join(plan.restart), "" if len(plan.restart) > 1
                        else "s")
        in_effect: dict[str, Any] = {}
        for keys, apply in self._reload_appliers().items():
            if plan.live.intersection(keys) or keys in RELOAD_EVERY_TIME:
                in_effect.update(await apply(running, plan.config))
        self.config = replace(running, **in_effect)
        applied = reloadmod.changed_keys(running, self.config)
        if self.sandboxes is not None:  # for tasks started from now on
            self.sandboxes.hidden = self._hidden_from_tasks()
        if self.meta_stale and self.membership is not None and self.gossip is not None:
            # Re-announced, signed with the (possibly new) key; push-pulls carry the new
            # certificate.
            self.meta_stale = False
            self.membership.update_meta(self._meta(), self.gossip.now())
            self.gossip.pump()
        log.info("configuration reloaded", extra={"fields": {
            "applied": ",".join(applied) or "none",
            "restart_needed": ",".join(plan.restart) or "none"}})

    def _reload_appliers(self) -> dict[tuple[str, ...], ReloadApplier]:
        """What applies each live key (a test holds these to config.live_keys()). Each gets
        the running config and the one to run, and gives the fields now in effect (a key it
        could not apply keeps its running value)."""
        membership = tuple(sorted(k for k in configmod.live_keys()
                                  if k.startswith(reloadmod.MEMBERSHIP_PREFIX)))
        return {
            ("log_format", "log_level"): self._reload_logging,
            ("labels",): self._reload_labels,
            IDENTITY_KEYS: self._reload_certificates,
            ("join",): self._reload_join,
            ("dns_listen",): self._reload_dns_listen,
            ("dns_upstreams",): self._reload_dns_upstreams,
            ("dns_ttl",): self._reload_dns_ttl,
            ("metrics_listen",): self._reload_metrics,
            ("address_pool",): self._reload_address_pool,
            ("task_hidden_paths",): self._reload_hidden_paths,
            membership: self._reload_membership,
        }

    async def _reload_logging(self, old: Config, new: Config) -> dict[str, Any]:
        logs.setup(new.log_format, new.log_level)
        return {"log_format": new.log_format, "log_level": new.log_level}

    async def _reload_labels(self, old: Config, new: Config) -> dict[str, Any]:
        self.meta_stale = True
        return {"labels": new.labels}

    async def _reload_certificates(self, old: Config, new: Config) -> dict[str, Any]:
        # Every reload re-reads the files: a renewal writes new contents under the same names.
        if not self._reload_identity(new):
            return {}
        self.meta_stale = True
        return {k: getattr(new, k) for k in IDENTITY_KEYS}

    async def _reload_join(self, old: Config, new: Config) -> dict[str, Any]:
        added = [a for a in new.join if a not in old.join]
        if added:
            self._spawn(self._retry_join(added))
        return {"join": new.join}

    async def _reload_dns_listen(self, old: Config, new: Config) -> dict[str, Any]:
        assert self.dns is not None
        for addr in [a for a in self.host_dns if a not in new.dns_listen]:
            await self.dns.remove_listener(self.host_dns.pop(addr))
        for addr in [a for a in new.dns_listen if a not in self.host_dns]:
            try:
                self.host_dns[addr] = await self.dns.add_listener(addr, None)
            except OSError as e:
                log.error("reload: dns_listen %s:%d not served: %s", addr[0], addr[1],
                          e.strerror or e)
        return {"dns_listen": tuple(a for a in new.dns_listen if a in self.host_dns)}

    async def _reload_dns_upstreams(self, old: Config, new: Config) -> dict[str, Any]:
        assert self.dns is not None
        # None: the host's resolvers, which may have changed since (so every reload reads them)
        await self.dns.set_upstreams(list(new.dns_upstreams) if new.dns_upstreams is not None
                                     else read_resolv_conf())
        return {"dns_upstreams": new.dns_upstreams}

    async def _reload_dns_ttl(self, old: Config, new: Config) -> dict[str, Any]:
        assert self.dns is not None
        self.dns.resolver.set_ttl(new.dns_ttl)
        return {"dns_ttl": new.dns_ttl}

    async def _reload_metrics(self, old: Config, new: Config) -> dict[str, Any]:
        """Close the listener, then open the new one (the two may share a port); if that
        fails, back at the old address."""
        if self.telemetry is not None:
            await self.telemetry.close()
            self.telemetry = None
        for addr in (new.metrics_listen, old.metrics_listen):
            if addr is None:
                return {"metrics_listen": addr}
            telemetry = Telemetry(self)
            try:
                await telemetry.start(addr)
            except OSError as e:
                log.error("reload: metrics_listen %s:%d not served: %s", addr[0], addr[1],
                          e.strerror or e)
                continue
            self.telemetry = telemetry
            return {"metrics_listen": addr}
        return {"metrics_listen": None}

    async def _reload_address_pool(self, old: Config, new: Config) -> dict[str, Any]:
        if self.ops is not None:  # for networks created from now on
            self.ops.address_pool = new.address_pool
        return {"address_pool": new.address_pool}

    async def _reload_hidden_paths(self, old: Config, new: Config) -> dict[str, Any]:
        return {"task_hidden_paths": new.task_hidden_paths}  # _apply_reload passes them on

    async def _reload_membership(self, old: Config, new: Config) -> dict[str, Any]:
        """The core reads these timings at each use (probes, gossip rounds, new suspicions,
        reconnects), so a new MembershipConfig takes effect at once."""
        if self.membership is None:
            return {}
        try:
            self.membership.config = membership_config(new)
        except ValueError as e:
            log.error("reload: membership timings unchanged: %s", e)
            return {}
        return {"membership": new.membership}

    def _reload_identity(self, fresh: Config) -> bool:
        """SIGHUP re-reads the certificates (a renewal); True if ours changed. A new
        certificate must be for the same node and datapath key (the encrypted datapath keeps
        its key until a restart)."""
        trust = self.trust
        if trust is None or not fresh.ca_cert:
            if fresh.ca_cert and trust is None:
                log.warning("reload: identity can only be turned on by a restart")
            elif trust is not None:
                log.warning("reload: identity can only be turned off by a restart")
            return False
        loop = asyncio.get_running_loop()
        try:
            new = load_trust(replace(fresh, name=self.config.name), loop.time(), time.time())
        except CertError as e:
            log.error("reload: identity unchanged: %s", e)
            return False
        if new.ca.raw != trust.ca.raw:
            log.error("reload: identity unchanged: a new CA needs a restart of every node")
            return False
        if new.cert.raw == trust.cert.raw:
            return False
        if new.keys.dp_pub != trust.keys.dp_pub:
            log.error("reload: identity unchanged: the new certificate is for another datapath "
                      "key; restart meshnetd to change it")
            return False
        trust.renew(new.keys, new.cert, loop.time())
        self._spawn(self._publish_cert())
        log.info("identity renewed: serial %s, valid until %s", new.cert.serial.hex(),
                 iso_time(new.cert.not_after))
        return True

    def _remembered_peers(self) -> list[tuple[str, int]]:
        try:
            data = json.loads((Path(self.config.state_dir) / PEERS_FILE).read_bytes())
            peers = [configmod.parse_hostport("peer", p) for p in data["peers"]]
        except (OSError, ValueError, KeyError, TypeError, configmod.ConfigError):
            return []
        own = self.config.advertise_addr()
        return [p for p in peers if p != own][:MAX_REMEMBERED_PEERS]

    def _schedule_peers_save(self) -> None:
        if self.peers_save is None or self.peers_save.done():
            self.peers_save = asyncio.get_running_loop().create_task(self._save_peers())

    async def _save_peers(self) -> None:
        await asyncio.sleep(PEERS_SAVE_DELAY_S)
        assert self.membership is not None
        peers = [f"{m.addr[0]}:{m.addr[1]}" for m in self.membership.members()
                 if m.name != self.config.name and str(m.state.value) in ("alive", "suspect")]
        if not peers:  # keep the old list: an isolated node still wants to find its cluster
            return
        doc = json.dumps({"peers": peers[:MAX_REMEMBERED_PEERS]}).encode()
        try:
            atomic_write(Path(self.config.state_dir) / PEERS_FILE, doc)
        except OSError as e:
            log.warning("cannot save peers: %s", e)

    def _status_text(self) -> str:
        return systemd.status_text(self._member_counts()) if self.membership else "starting"

    def _poke_status(self) -> None:
        """Membership changed: STATUS= with the member count, at most once a second."""
        if not systemd.enabled():
            return
        loop = asyncio.get_running_loop()
        at = self.status_throttle.poke(loop.time())
        if at is not None:
            loop.call_at(at, self._send_status)

    def _send_status(self) -> None:
        self.status_throttle.sent(asyncio.get_running_loop().time())
        systemd.notify(f"STATUS={self._status_text()}")

    def _on_member_event(self, event: MemberEvent) -> None:
        self._poke_status()
        self.events.member(event)
        self._schedule_peers_save()
        if self.state is not None and self.membership is not None:
            self.state.on_member_event(event, self.membership.num_alive())
        if self.overlay is not None:
            self.overlay.kick()
        if self.services is not None:
            self.services.kick()
        if self.ingress is not None:
            self.ingress.kick()
        member = getattr(event, "member", None)
        name = type(event).__name__
        if member is not None:
            log.info("%s %s", name, member.name, extra={"fields": {
                "state": str(member.state.value), "incarnation": member.incarnation}})

    # --- control API --------------------------------------------------------------------------

    def _handlers(self) -> dict[str, Handler]:
        assert self.ops is not None
        extra: dict[str, Handler] = {}
        if self.sandboxes is not None:
            extra["run"] = self.sandboxes.op_run
        if self.services is not None:
            extra.update(self.services.handlers())
        return {
            **self.ops.handlers(),
            **extra,
            "status": self._op_status,
            "members": self._op_members,
            "join": self._op_join,
            "leave": self._op_leave,
            "keys": self._op_keys,
            "ca.revoke": self._op_ca_revoke,
            "events": lambda args, send: serve_events(self.events, args, send),
        }

    def _member_counts(self) -> dict[str, int]:
        counts = {"alive": 0, "suspect": 0, "dead": 0, "left": 0}
        assert self.membership is not None
        for m in self.membership.members():
            counts[str(m.state.value)] = counts.get(str(m.state.value), 0) + 1
        return counts

    async def _op_status(self, args: dict[str, Any], send: SendEvent) -> Any:
        assert self.membership is not None and self.gossip is not None
        addr = self.config.advertise_addr()
        return {
            "name": self.config.name,
            "version": meshnet.__version__,
            "node_id": self.record.node_id,
            "addr": f"{addr[0]}:{addr[1]}",
            "incarnation": self.membership.local().incarnation,
            "boots": self.record.boots,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "profile": self.config.profile,
            "encryption": "none (INSECURE)" if self.keyring is None else "aes-256-gcm",
            "identity": self._identity_status(),
            "members": self._member_counts(),
            "datapath": {"overlay": self.overlay.status() if self.overlay else "none",
                         "encrypted": self.encrypted.status() if self.encrypted else
                         "none (needs the vxlan datapath and a cluster key)",
                         **({"vip": self.vips.status()} if self.vips else {}),
                         **({"ingress": self.ingress.status()} if self.ingress else {})},
            "gossip": {**self.membership.stats, **self.gossip.stats()},
            "store": {"entries": sum(1 for _ in self.state.store.entries()),
                      **self.state.counters} if self.state else {},
            "dns": {**(self.dns.stats() if self.dns else {}),
                    **(self.ops.counters if self.ops else {})},
            # task placement, starts and address claims (IPAM confirmations)
            "tasks": {**(self.services.counters if self.services else {}),
                      **(self.sandboxes.counters if self.sandboxes else {})},
            "control": {"bad_requests": self.control.bad_requests, **self.control.counters}
            if self.control else {},
            "events": self.events.status(),
        }

    def _identity_status(self) -> dict[str, Any] | str:
        trust = self.trust
        if trust is None:
            return "none (INSECURE: any key holder is every node)"
        st = trust.stats
        return {"ca": trust.ca.fingerprint_hex, "roles": list(trust.cert.roles),
                "serial": trust.cert.serial.hex(), "expires": iso_time(trust.cert.not_after),
                "certs_known": len(trust.names()), "certs_learned": st.certs_learned,
                "certs_refused": st.certs_refused, "revocations": st.revocations,
                "claims_refused": st.claims_refused, "refusals": dict(st.refusals),
                "last_refusal": st.last_refusal}

    async def _op_members(self, args: dict[str, Any], send: SendEvent) -> Any:
        assert self.membership is not None
        out = [member_json(m) for m in self.membership.members()]
        if self.trust is not None:
            now = asyncio.get_running_loop().time()
            for doc in out:
                cert = self.trust.current(doc["name"], now)
                doc["roles"] = list(cert.roles) if cert else []
                doc["cert_expires"] = iso_time(cert.not_after) if cert else None
        return out

    async def _op_join(self, args: dict[str, Any], send: SendEvent) -> Any:
        assert self.gossip is not None
        raw = args.get("addrs")
        if not isinstance(raw, list) or not raw:
            raise OpError("join needs at least one IP:PORT")
        try:
            seeds = [configmod.parse_hostport("addr", a, configmod.DEFAULT_PORT) for a in raw]
        except configmod.ConfigError as e:
            raise OpError(str(e)) from None
        joined = await self.gossip.join(seeds)
        if not joined:
            raise OpError(f"none of {len(seeds)} address(es) answered a join")
        return {"joined": joined}

    async def _op_leave(self, args: dict[str, Any], send: SendEvent) -> Any:
        await self._leave()
        # A node that left stops its agent, as `serf leave` and `consul leave` do.
        asyncio.get_running_loop().call_soon(self.stopping.set)
        return {"left": True}

    # --- key rotation -------------------------------------------------------------------------

    def _apply_key_op(self, op: str, key: str, by: str | None = None) -> list[str]:
        """Apply one key operation to the local keyring and persist it; returns the keys. BY
        (who asked) goes into the `key` event."""
        if self.keyring is None:
            raise KeyringError("this agent runs without encryption (--insecure-no-encryption)")
        if op == "install":
            self.keyring.install(key)
        elif op == "use":
            self.keyring.use(key)
        elif op == "remove":
            self.keyring.remove(key)
        elif op != "list":
            raise KeyringError(f"unknown key operation {op!r}")
        if op != "list":
            self.keyring.save(self.keyring_path)
            if self.encrypted is not None:
                self.encrypted.set_cluster_keys(self.keyring.keys())
            self.events.key(op, key_id(parse_key(key)).hex(), by)
        return [entry["key"] for entry in self.keyring.list()]

    def _key_op_request(self, op: str, key: str) -> bytes:
        """A key operation for the other members; with identity, signed by us (only an
        admin's change counts) and stamped, so an old one cannot be passed off later."""
        req: dict[str, Any] = {"op": op, "key": key}
        if self.trust is not None:
            req.update(by=self.config.name, at=int(time.time()))
            req["sig"] = self.trust.sign(REQUEST_DOMAIN, _key_op_signed(req))
        return bytes(msgpack.packb(req))

    def _key_op_refusal(self, req: dict[str, Any]) -> str | None:
        """Why a received key operation does not count (None: it does)."""
        trust = self.trust
        if trust is None or req.get("op") == "list":
            return None
        by, at, sig = req.get("by"), req.get("at"), req.get("sig")
        if not isinstance(by, str) or not isinstance(at, int) or not isinstance(sig, bytes):
            return "key operations must be signed by an admin"
        if abs(time.time() - at) > KEY_OP_MAX_AGE_S:
            return "the key operation is too old (or from the future)"
        cert = trust.signer(by, REQUEST_DOMAIN, _key_op_signed(req), sig,
                            asyncio.get_running_loop().time())
        if cert is None or cert is False:
            return f"the key operation is not signed by {by}"
        if not cert.is_admin:
            return f"{by} is not an admin: only admins rotate keys"
        return None

    async def _key_op_in(self, body: bytes, addr: tuple[str, int]) -> bytes | None:
        try:
            req = parse_key_op_request(body)
            refusal = self._key_op_refusal(req)
            if refusal is not None:
                raise KeyringError(refusal)
            by = req.get("by")
            keys = self._apply_key_op(req["op"], req.get("key", ""),
                                      by if isinstance(by, str) else addr[0])
            reply: dict[str, Any] = {"ok": True, "keys": keys}
        except KeyringError as e:
            reply = {"ok": False, "error": str(e)}
        except ValueError:
            return None
        return bytes(msgpack.packb(reply))

    async def _op_keys(self, args: dict[str, Any], send: SendEvent) -> Any:
        assert self.membership is not None and self.gossip is not None
        op = args.get("op")
        key = str(args.get("key", ""))
        if op not in KEY_OPS:
            raise OpError(f"unknown keys operation {op!r}")
        if op == "use" and self.keyring is not None and key not in self.keyring:
            raise OpError("key is not installed here: install it on the cluster first")
        if op != "list" and self.trust is not None and not self.trust.cert.is_admin:
            raise OpError("this node's certificate is a worker's: only an admin rotates keys")
        try:
            local = self._apply_key_op(str(op), key, self.config.name)
        except KeyringError as e:
            raise OpError(str(e)) from None
        peers = [m for m in self.membership.members()
                 if m.name != self.config.name and str(m.state.value) in ("alive", "suspect")]
        body = self._key_op_request(str(op), key)
        sem = asyncio.Semaphore(KEY_OP_CONCURRENCY)

        async def ask(m: Member) -> tuple[str, list[str] | str]:
            async with sem:
                try:
                    raw = await self.gossip.request(m.addr, STREAM_KEY_OP, body)  # type: ignore[union-attr]
                except (OSError, TimeoutError, asyncio.IncompleteReadError, StreamError,
                        KeyringError, ValueError) as e:
                    return m.name, f"unreachable: {type(e).__name__}"
                return m.name, parse_key_op_reply(raw)

        answers = await asyncio.gather(*(ask(m) for m in peers))
        errors: dict[str, str] = {}
        key_counts: dict[str, int] = {k: 1 for k in local}
        acked = 1
        for name, reply in answers:
            if isinstance(reply, list):
                acked += 1
                for k in set(reply):  # a key listed twice is still one member's
                    key_counts[k] = key_counts.get(k, 0) + 1
            else:
                errors[name] = reply
        result: dict[str, Any] = {"op": op, "members": len(peers) + 1, "acked": acked,
                                  "errors": errors}
        if op == "list":
            assert self.keyring is not None
            primary = self.keyring.list()[0]["key"]
            result["keys"] = [{"key": k, "primary": k == primary, "members": n}
                              for k, n in sorted(key_counts.items())]
        return result
