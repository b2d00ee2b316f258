"""VIPs in the agent (issue 17): claimed at `service create`, load-balanced in every sandbox.

Claiming. A vip service gets one VIP per network of its spec, allocated without consensus by
the admin node that creates it, exactly as a task's address is (state/ipam.py): the VIP is
first an endpoint *claim* (`pending`, `kind: "vip"`, named `<service>.0`, keyed to this node)
confirmed with every alive member, the loser of a tie re-picking. Only then is the service
record written, with the VIP in its `vips`. The claim is not withdrawn then: it stays, pending
(so in no DNS answer and no peer's FDB), for as long as the record holds that VIP, and every
node's IPAM counts both the claims and every record's `vips` as taken. Why both:

- A task claim T racing the VIP claim V is ipam.py's case unchanged: both are endpoint claims
  confirmed with every member, so whenever both exist each claimant sees the other and the
  shared (HLC, writer) order keeps one. The argument needs V to exist for as long as the VIP is
  in use; hence the claim lives as long as the record.
- Two admins creating services at once: two claims, the same argument.
- The record's `vips` covers the window in which a node has the record but not yet the claim
  (gossip delivers entries in no set order), and a claim whose owner has been reaped.
- The owner withdraws its claim once no record holds it (service removed, or its record
  replaced by another admin's create of the same name), on its reconcile pass; a claim being
  confirmed (not yet in a record) is never withdrawn meanwhile. A third node that still holds
  the record but no longer the claim keeps the address taken: safe.

Balancing. In every sandbox this node runs (tasks and `meshctl run`), the table `ip
meshnet_vip` maps each VIP of the sandbox's network to its service's serving tasks
(lb/core.py has the ruleset and why). It is written with one `nft -f` (atomic) inside the
sandbox's namespace before the sandbox's process starts (Sandboxes.on_wired), then again by the
reconcile loop, which runs on every store change (one pass follows every endpoint change) and
every RECONCILE_PERIOD_S, but only where the sandbox's map changed. When a backend leaves a
map, the conntrack entries in that sandbox whose DNAT target was that backend are deleted
(pyroute2's conntrack API, on a netlink socket opened in the namespace), so the client's next
packet meets the ruleset's reset instead of a silent backend. A VIP newly in a map also has
its un-NATed entries deleted: a SYN sent before the map arrived left one, and its
retransmissions would otherwise never be translated.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import socket
import time
from collections.abc import AsyncIterator, Mapping
from types import MappingProxyType
from typing import Any

from pyroute2 import AsyncConntrack
from pyroute2.netlink.exceptions import NetlinkError

from meshnet.agent.control import OpError
from meshnet.agent.logs import LogOnce
from meshnet.agent.sandboxes import Sandboxes, SandboxHandle
from meshnet.health import DRAINING
from meshnet.lb.core import (
    DNSRR,
    ENDPOINT_MODES,
    VIP,
    VIP_CLAIM_KIND,
    VipMap,
    check_vip_map,
    dropped_backends,
    endpoint_mode,
    hold_draining,
    is_vip_claim,
    ruleset,
    vip_claim_name,
    vip_maps,
)
from meshnet.platform import netns, nsfd
from meshnet.platform.loopthread import LoopThread
from meshnet.state.tables import ENDPOINTS, Service, endpoint_key

log = logging.getLogger("meshnet.vips")

# The loop re-checks even with no change, so a lost wake-up never leaves a map stale for long.
RECONCILE_PERIOD_S = 2.0
NETLINK_NETFILTER = 12


def parse_endpoint_mode(value: object) -> str:
    """`service create --endpoint-mode`: vip (the default, as Docker's) or dnsrr."""
    if value is None:
        return VIP
    if value not in ENDPOINT_MODES:
        raise OpError(f"--endpoint-mode must be one of {', '.join(ENDPOINT_MODES)}, "
                      f"not {str(value)[:40]!r}")
    return str(value)


def _with_fields(svc: Service, fields: Mapping[str, Any]) -> Service:
    return dataclasses.replace(svc, extra=MappingProxyType({**svc.extra, **fields}))


class VipBalancer:
    def __init__(self, sandboxes: Sandboxes, nl: LoopThread,
                 period: float = RECONCILE_PERIOD_S) -> None:
        self.sandboxes = sandboxes
        self.state = sandboxes.state
        self.store = sandboxes.store
        self.node = sandboxes.node
        self.nl = nl  # pyroute2's asyncio sockets cannot live on uvloop
        self.period = period
        # namespace -> the VIP map its table was last written with
        self.applied: dict[str, dict[str, tuple[str, ...]]] = {}
        # namespace -> vip -> backends out of its map that are draining: their connections are
        # deleted once they stop draining (gone, or back), not when they leave the map
        self.held: dict[str, dict[str, frozenset[str]]] = {}
        self.draining: frozenset[str] = frozenset()
        # keys of VIP claims being confirmed (not in a service record yet): never withdrawn
        self.allocating: set[str] = set()
        self.lock = asyncio.Lock()  # one writer of the sandboxes' tables at a time
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.counters = {"passes": 0, "errors": 0, "rulesets_applied": 0, "apply_errors": 0,
                         "conntrack_deleted": 0, "conntrack_errors": 0, "vip_claims": 0,
                         "vip_claims_withdrawn": 0}
        self._log_once = LogOnce(log)

    # --- claims -----------------------------------------------------------------------------

    def _claim_key(self, network: str, service: str) -> str:
        return f"{endpoint_key(network, vip_claim_name(service))}@{self.node}"

    @contextlib.asynccontextmanager
    async def claimed(self, svc: Service, mode: object) -> AsyncIterator[Service]:
        """SVC with its endpoint mode and, for vip, a confirmed VIP per network of its spec;
        the caller writes the record inside the block. If the block (or a claim) fails, the
        claims made are withdrawn."""
        mode = parse_endpoint_mode(mode)
        if mode == DNSRR:
            yield _with_fields(svc, {"endpoint_mode": DNSRR})
            return
        networks = [str(n) for n in svc.spec.get("networks") or []]
        keys = [self._claim_key(n, svc.name) for n in networks]
        self.allocating.update(keys)
        try:
            got = await asyncio.gather(
                *(self.sandboxes.allocate(n, vip_claim_name(svc.name),
                                          {"service": svc.name, "kind": VIP_CLAIM_KIND})
                  for n in networks), return_exceptions=True)
            for result in got:
                if isinstance(result, BaseException):
                    raise result
            self.counters["vip_claims"] += len(networks)
            vips = {n: ep.ip for n, ep in zip(networks, got, strict=True)
                    if not isinstance(ep, BaseException)}
            yield _with_fields(svc, {"endpoint_mode": VIP, "vips": vips})
        except BaseException:
            for key in keys:
                held = self.store.entry(ENDPOINTS, key)
                if held is not None and held.value is not None and held.writer == self.node:
                    self.store.delete(ENDPOINTS, key, time.time())
                    self.state.changed()
            raise
        finally:
            self.allocating.difference_update(keys)

    async def _withdraw_orphan_claims(self) -> None:
        """Our VIP claims that no service record holds any more: withdrawn (see the module's
        docstring for why they live as long as the record)."""
        services = self.store.services()
        for entry in self.store.owned_by(self.node):
            if entry.table != ENDPOINTS or entry.key in self.allocating:
                continue
            data = entry.data() or {}
            if not is_vip_claim(data):
                continue
            svc = services.get(str(data.get("service")))
            vips = svc.extra.get("vips") if svc is not None and endpoint_mode(svc) == VIP \
                else None
            if isinstance(vips, Mapping) and vips.get(data.get("network")) == data.get("ip"):
                continue
            await self.state.delete(ENDPOINTS, entry.key)
            self.counters["vip_claims_withdrawn"] += 1

    # --- the loop ---------------------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def kick(self) -> None:
        self.wake.set()

    async def _loop(self) -> None:
        while True:
            self.wake.clear()
            try:
                await self.reconcile()
            except Exception as e:  # a bug must not stop the loop for good
                self.counters["errors"] += 1
                self._log_once("VIP reconcile", e, "vip.errors")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.period)

    def desired(self) -> dict[str, dict[str, tuple[str, ...]]]:
        """network -> VIP map, from the replicated state alone (lb/core.py vip_maps)."""
        subnets = {name: net.subnet for name, net in self.store.networks().items()}
        return vip_maps(self.store.services(), subnets, self.store.endpoints())

    async def reconcile(self) -> None:
        self.counters["passes"] += 1
        await self._withdraw_orphan_claims()
        maps = self.desired()
        self.draining = frozenset(ep.ip for ep in self.store.endpoints()
                                  if ep.extra.get("health") == DRAINING)
        async with self.lock:
            live = dict(self.sandboxes.live)
            for ns in [ns for ns in self.applied if ns not in live]:
                del self.applied[ns]  # the sandbox is gone, and its table with it
                self.held.pop(ns, None)
            await self._release_drained()
            for ns, handle in sorted(live.items()):
                want = maps.get(handle.network, {})
                have = self.applied.get(ns)
                if want == (have if have is not None else {}) or not nsfd.netns_exists(ns):
                    continue
                await self._apply(ns, have or {}, want)

    async def on_wired(self, handle: SandboxHandle) -> None:
        """A sandbox was just made: its VIP table goes in before any of its processes can open
        a connection (one made before would be tracked un-NATed). Never raises: the loop
        retries a table that could not be written."""
        try:
            want = self.desired().get(handle.network, {})
            if want:
                await self.program(handle.ns, want)
        except Exception as e:  # a bug here must not keep the sandbox from starting
            self.counters["errors"] += 1
            self._log_once("writing a new sandbox's VIP table", e, "vip.errors")

    async def program(self, ns: str, want: VipMap) -> None:
        """Make NS's VIP table WANT now (if it is not already), forgetting the connections of
        the backends that left it. Never raises: a failure is counted and logged once."""
        async with self.lock:
            have = self.applied.get(ns)
            if have is None or have != want:
                await self._apply(ns, have or {}, want)

    async def _apply(self, ns: str, have: VipMap, want: VipMap) -> None:
        try:
            check_vip_map(want)
            await asyncio.to_thread(netns.nft, ruleset(want), ns=ns)
        except (netns.NetnsError, ValueError, OSError) as e:
            self.counters["apply_errors"] += 1
            self._log_once("writing a sandbox's VIP table", e, "vip.apply_errors")
            return
        self.counters["rulesets_applied"] += 1
        self.applied[ns] = dict(want)
        dropped, held = hold_draining(dropped_backends(have, want), self.draining)
        if held:
            kept = self.held.setdefault(ns, {})
            for vip, ips in held.items():
                kept[vip] = kept.get(vip, frozenset()) | ips
        fresh = frozenset(vip for vip, backends in want.items()
                          if backends and not have.get(vip))
        if dropped or fresh:
            try:
                self.counters["conntrack_deleted"] += await self._forget_connections(
                    ns, dropped, fresh)
            except (OSError, NetlinkError, nsfd.PlatformError) as e:
                self.counters["conntrack_errors"] += 1
                self._log_once("deleting conntrack entries", e, "vip.conntrack_errors")

    async def _release_drained(self) -> None:
        """Backends that were draining and no longer are (stopped, or back in service): the
        connections to them that are still tracked go now, as for any dropped backend."""
        for ns, held in list(self.held.items()):
            mapped = self.applied.get(ns, {})
            done = {vip: ips - self.draining - frozenset(mapped.get(vip, ()))
                    for vip, ips in held.items()}
            done = {vip: ips for vip, ips in done.items() if ips}
            if not done:
                continue
            rest = {vip: ips - done.get(vip, frozenset()) for vip, ips in held.items()}
            self.held[ns] = {vip: ips for vip, ips in rest.items() if ips}
            try:
                self.counters["conntrack_deleted"] += await self._forget_connections(
                    ns, done, frozenset())
            except (OSError, NetlinkError, nsfd.PlatformError) as e:
                self.counters["conntrack_errors"] += 1
                self._log_once("deleting conntrack entries", e, "vip.conntrack_errors")

    async def _forget_connections(self, ns: str, dropped: Mapping[str, frozenset[str]],
                                  fresh: frozenset[str]) -> int:
        """Delete NS's conntrack entries to a VIP whose backend is in DROPPED[vip], and those to
        a VIP in FRESH that were never translated. Returns how many went."""
        sock = await asyncio.to_thread(nsfd.open_socket_in_netns, ns, socket.AF_NETLINK,
                                       socket.SOCK_DGRAM, None, proto=NETLINK_NETFILTER)
        return await self.nl.run(_delete_entries(sock.detach(), dropped, fresh))

    def status(self) -> dict[str, object]:
        return dict(self.counters)


async def _delete_entries(fd: int, dropped: Mapping[str, frozenset[str]],
                          fresh: frozenset[str]) -> int:
    ct = AsyncConntrack(fileno=fd)
    try:
        victims: dict[tuple[Any, ...], Any] = {}
        async for e in await ct.dump_entries():
            orig, reply = e.tuple_orig, e.tuple_reply
            gone = dropped.get(orig.daddr)
            if (gone is not None and reply.saddr in gone) or \
                    (orig.daddr in fresh and reply.saddr == orig.daddr):
                victims[(orig.proto, orig.saddr, orig.daddr, orig.sport, orig.dport)] = e
        deleted = 0
        for e in victims.values():
            try:
                await ct.delete(e)
                deleted += 1
            except NetlinkError as err:
                if err.code != errno.ENOENT:  # gone meanwhile: what we wanted
                    raise
        return deleted
    finally:
        ct.close()
