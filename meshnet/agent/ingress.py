"""The routing mesh (issue 17): published ports answer on every host's addresses.

The shell around state/ingress.py (what to do) and platform/ingress_nft.py (the kernel side).
A level-triggered loop, woken by every store and membership change (so the DNAT map follows the
serving tasks within one pass) and every RECONCILE_PERIOD_S:

1. this host's address on every network a service with published ports is on: claimed through
   IPAM exactly as a task's address is (Sandboxes.allocate: a pending claim confirmed with every
   member), put on the network's bridge with the bridge's MAC set to the endpoint's, then
   published as an endpoint of kind "host" (peers program FDB and ARP for it; DNS, VIPs and
   published ports ignore it: Endpoint.serving is False). Withdrawn when no service with ports
   is left on the network, when the network is removed, and when the agent stops;
2. the bridges' addresses and per-device forwarding, synced every pass (a bridge recreated by
   the overlay gets its address back);
3. the nftables table, rendered from the plan and loaded with one `nft -f` only when it changed
   (and every REPAIR_PASSES passes, which repairs a table deleted by hand); removed on stop.

`service create --publish` is checked here too (``check_create``): a port another service
publishes, or one of the agents' own ports, is refused in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshnet.agent.control import OpError
from meshnet.agent.logs import LogOnce
from meshnet.config import Config
from meshnet.platform import ingress_nft
from meshnet.platform.ingress_nft import BridgeAddresses, HostAddress, NftPort
from meshnet.platform.links import VXLAN_PORT
from meshnet.platform.nsfd import PlatformError
from meshnet.state.ingress import IngressPlan, plan, service_ports
from meshnet.state.ports import HOST_KIND, clash, host_endpoint_name
from meshnet.state.tables import ENDPOINTS, Endpoint, Service, endpoint_key

if TYPE_CHECKING:
    from meshnet.agent.overlay import Overlay
    from meshnet.agent.sandboxes import Sandboxes
    from meshnet.agent.state_service import StateService

log = logging.getLogger("meshnet.ingress")

RECONCILE_PERIOD_S = 2.0
# Re-load the table this often even when it did not change: repairs one deleted by hand.
REPAIR_PASSES = 15
# A host address claim that failed is tried again after this long (not on every store change).
CLAIM_RETRY_S = 2.0
# encdp.DEFAULT_PORT, named here without importing the encrypted datapath.
ENCRYPTED_PORT = 4790


def reserved_ports(config: Config) -> dict[tuple[str, int], str]:
    """(protocol, port) -> what of this agent listens there: never published, never DNATed."""
    out: dict[tuple[str, int], str] = {}
    for addr in config.dns_listen:
        for proto in ("udp", "tcp"):
            out[(proto, addr[1])] = "a DNS listener's port of the agent (dns_listen)"
    if config.metrics_listen is not None:
        out[("tcp", config.metrics_listen[1])] = "the agent's metrics port (metrics_listen)"
    out[("udp", ENCRYPTED_PORT)] = "the encrypted overlay's port"
    out[("udp", VXLAN_PORT)] = "VXLAN's port"
    for proto in ("tcp", "udp"):
        out[(proto, config.bind[1])] = "the agent's gossip port"
    return out


@dataclass
class _Held:
    key: str
    ip: str
    prefixlen: int
    mac: str
    # Peers have heard of it (pending cleared), so they can send tasks' replies to it: only
    # then is anything DNATed toward its network.
    published: bool = True


class Ingress:
    def __init__(self, state: StateService, overlay: Overlay, sandboxes: Sandboxes,
                 node: str, local_ip: str, reserved: Callable[[], dict[tuple[str, int], str]],
                 members: Callable[[], dict[str, int]],
                 period: float = RECONCILE_PERIOD_S) -> None:
        self.state = state
        self.store = state.store
        self.overlay = overlay
        self.sandboxes = sandboxes
        self.node = node
        self.local_ip = local_ip
        self.reserved = reserved  # this agent's own ports
        self.members = members  # alive or suspect member -> its gossip port
        self.period = period
        self.kernel = BridgeAddresses(overlay.kernel.prefix)
        self.held: dict[str, _Held] = {}  # network -> this host's confirmed address on it
        self.claiming: dict[str, asyncio.Task[None]] = {}
        self.retry_at: dict[str, float] = {}
        # The script loaded last (None: no table). At start unknown: a run killed with -9 may
        # have left a table, which the first pass replaces or removes.
        self.applied: str | None = "# unknown\n"
        # Whether our bridges may carry addresses not in `held` (a previous run's): an idle host
        # then skips the netlink dumps of the sync.
        self.bridges_dirty = True
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.closing = False
        self.counters = {"passes": 0, "errors": 0, "rulesets_loaded": 0,
                         "host_address_claims": 0, "host_address_errors": 0,
                         "host_addresses_released": 0, "forwarding_errors": 0}
        self._last_plan = IngressPlan()
        self._log_once = LogOnce(log)
        self._lock = asyncio.Lock()  # a claim runs a pass of its own; kernel syncs never overlap

    # --- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        self._adopt()
        self.task = asyncio.get_running_loop().create_task(self._loop())

    def kick(self) -> None:
        self.wake.set()

    def _adopt(self) -> None:
        """A host address published by a previous run of this agent is still ours (it stayed
        in every store, owned by us): keep it. A claim it left pending is withdrawn."""
        for entry in self.store.owned_by(self.node):
            data = entry.data() or {}
            if entry.table != ENDPOINTS or data.get("kind") != HOST_KIND:
                continue
            ep = Endpoint.from_value(data)
            if ep is None or data.get("pending") or ep.network in self.held:
                self.store.delete(ENDPOINTS, entry.key, time.time())
                continue
            self.held[ep.network] = _Held(entry.key, ep.ip, int(data.get("prefixlen") or 24),
                                          ep.mac)
        self.state.changed()

    async def close(self) -> None:
        """Withdraw every host address, then take the table and the addresses away. Runs
        before the agent leaves (so peers drop our FDB entries) and before the overlay stops
        (whose netlink thread this uses)."""
        self.closing = True
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.task
        for t in list(self.claiming.values()):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for entry in list(self.store.owned_by(self.node)):
            if entry.table == ENDPOINTS and (entry.data() or {}).get("kind") == HOST_KIND:
                await self._step("withdrawing a host address", self.state.delete(
                    ENDPOINTS, entry.key))
        self.held.clear()
        if self.applied is not None:
            await self._step("removing the ingress table", ingress_nft.remove())
            self.applied = None
        await self._step("removing the bridges' host addresses",
                         self.overlay.nl.run(self.kernel.sync({}, self.local_ip)))
        self.overlay.nl.loop.call_soon_threadsafe(self.kernel.close)

    async def _step(self, what: str, step: Any) -> None:
        try:
            await step
        except Exception as e:
            self.counters["errors"] += 1
            self._log_once(what, e, "datapath.ingress.errors")

    # --- the loop -----------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            self.wake.clear()
            try:
                await self.reconcile()
            except Exception as e:  # the kernel's refusal or a bug: the next pass tries again
                self.counters["errors"] += 1
                self._log_once("ingress reconcile", e, "datapath.ingress.errors")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.period)

    def _usable_networks(self) -> dict[str, int]:
        """Networks with a datapath on this host -> their VNI (an encrypted one without the
        encrypted datapath carries nothing here, so it gets no host address)."""
        vnis = dict(self.overlay.desired_vnis())
        if self.overlay.encrypted is not None:
            vnis.update(self.overlay.encrypted.desired_vnis())
        return vnis

    async def reconcile(self) -> None:
        async with self._lock:
            await self._reconcile()

    async def _reconcile(self) -> None:
        if self.closing:
            return
        self.counters["passes"] += 1
        p = plan(self.store.services(), self.store.endpoints(), self.store.networks(),
                 self.members())
        self._last_plan = p
        vnis = self._usable_networks()
        wanted = {n for n in p.networks if n in vnis}
        for network in sorted(set(self.held) - wanted):
            await self._release(network)
        now = time.monotonic()
        for network in sorted(wanted - set(self.held) - set(self.claiming)):
            if self.retry_at.get(network, 0.0) <= now:
                self.claiming[network] = asyncio.get_running_loop().create_task(
                    self._claim(network))
        addrs = {n: HostAddress(self.overlay.kernel.bridge_name(vnis[n]), h.ip, h.prefixlen,
                                h.mac)
                 for n, h in self.held.items() if n in vnis}
        devices: list[str] = []
        if addrs or self.bridges_dirty:
            devices = await self.overlay.nl.run(self.kernel.sync(addrs, self.local_ip))
            self.bridges_dirty = bool(addrs)
        # Forwarding on for the underlay device (DNATed connections arrive there and leave by
        # a bridge) and the bridges (the tasks' replies arrive there and leave by the underlay).
        # Per device, not the host-wide ip_forward: nothing else on this host starts routing.
        # Checked every pass (a read unless it was turned off); a failure here still lets the
        # ruleset below be loaded.
        for ifname in devices if addrs else []:
            try:
                ingress_nft.set_forwarding(ifname)
            except PlatformError as e:
                self.counters["forwarding_errors"] += 1
                self._log_once("turning forwarding on", e, "datapath.ingress.forwarding_errors")
        ready = {n for n, h in self.held.items() if h.published}
        ports = [NftPort(x.protocol, x.published, x.target, x.network,
                         x.backends if x.network in ready else ())  # not yet: reject
                 for x in p.ports]
        script = ingress_nft.render(ports, addrs, set(self.reserved()))
        repair = self.counters["passes"] % REPAIR_PASSES == 0
        if script != self.applied or (repair and script is not None):
            if script is None:
                await ingress_nft.remove()
            else:
                await ingress_nft.apply(script)
                self.counters["rulesets_loaded"] += 1
            self.applied = script

    async def _claim(self, network: str) -> None:
        """Claim and confirm an address (as a task's), wire it, then publish it."""
        name = host_endpoint_name(self.node)
        key = f"{endpoint_key(network, name)}@{self.node}"
        self.counters["host_address_claims"] += 1
        try:
            await self.overlay.ensure(network)
            ep = await self.sandboxes.allocate(network, name, {"kind": HOST_KIND})
            prefixlen = ipaddress.IPv4Network(self.store.networks()[network].subnet).prefixlen
            held = self.held[network] = _Held(key, ep.ip, prefixlen, ep.mac, published=False)
            # on the bridge before peers hear of it, so their first frames find it
            await self.reconcile()
            value = ep.to_value()
            value.pop("pending", None)
            await self.state.put(ENDPOINTS, key, value)
            held.published = True
            log.info("host address %s on %s", ep.ip, network)
        except asyncio.CancelledError:
            self.held.pop(network, None)
            self._withdraw(key)
            raise
        except Exception as e:
            self.held.pop(network, None)
            self._withdraw(key)
            self.counters["host_address_errors"] += 1
            self.retry_at[network] = time.monotonic() + CLAIM_RETRY_S
            self._log_once(f"claiming a host address on {network[:80]}", e,
                           "datapath.ingress.host_address_errors")
        finally:
            self.claiming.pop(network, None)
            self.kick()

    def _withdraw(self, key: str) -> None:
        """A claim that failed or was cancelled leaves nothing behind (synchronous: it may run
        while being cancelled)."""
        held = self.store.entry(ENDPOINTS, key)
        if held is not None and held.value is not None and held.writer == self.node:
            self.store.delete(ENDPOINTS, key, time.time())
            self.state.changed()

    async def _release(self, network: str) -> None:
        """No service with ports is left on NETWORK (or it is gone): withdraw the endpoint
        first, so no peer keeps sending to it; the bridge loses the address in this pass."""
        held = self.held.pop(network)
        self.retry_at.pop(network, None)
        await self.state.delete(ENDPOINTS, held.key)
        self.counters["host_addresses_released"] += 1
        log.info("host address %s on %s released", held.ip, network)

    # --- service create -----------------------------------------------------------------------

    def check_create(self, svc: Service) -> None:
        """OpError in one line if SVC publishes a port another service publishes, or one of
        the agents' own: ours (gossip, VXLAN, encrypted overlay, DNS and metrics listeners) and
        every member's gossip port."""
        ports = service_ports(svc)
        if not ports:
            return
        reserved = dict(self.reserved())
        for member, port in sorted(self.members().items()):
            if member != self.node:
                for proto in ("tcp", "udp"):
                    reserved.setdefault((proto, port), f"the gossip port of member {member}")
        others = {name: service_ports(s) for name, s in self.store.services().items()
                  if name != svc.name}
        problem = clash(ports, others, reserved)
        if problem is not None:
            raise OpError(problem)

    def status(self) -> dict[str, Any]:
        """Counters, and as text (no metric): the ports, this host's addresses, and the ports
        lost to a clash that create could not see."""
        p = self._last_plan
        return {"published": [f"{x.published}/{x.protocol} -> {x.service}:{x.target} "
                              f"({len(x.backends)} serving)" for x in p.ports],
                "host_addresses": {n: h.ip for n, h in sorted(self.held.items())},
                "shadowed": list(p.shadowed), **self.counters}
