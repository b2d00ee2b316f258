"""The plain overlay's reconcile loop: desired state from the store, actual from netlink.

Per plain network, on every host: a bridge and a kernel VXLAN device (port 4789, learning off,
ARP proxy on, MTU = underlay - 50). Per remote endpoint: a static FDB entry (MAC -> the owner's
VTEP) and a permanent neighbour entry (IP -> MAC), so nothing floods and nothing is learned.
Level-triggered: every pass reads the kernel and applies the difference, so a device or entry
deleted by hand is back within one period, and a restart adopts what the last run left.

Encrypted networks get no VXLAN device, ever: their bridge and TAP are the EncryptedOverlay's
(encrypted.py), reconciled from here on every pass; without one (no cluster key) they carry no
traffic at all, and never fall back to cleartext.

Nothing in the store can stop this loop: the store's schema refuses bad values before they are
stored, and here, the second line, an endpoint whose MAC or IP the kernel would not take is left
out (counted once in `bad_endpoints`), one network's failure does not keep the others from
being reconciled, and any exception a pass raises is counted (`errors`) and logged once per kind
while the next pass runs as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshnet.agent.cluster_ops import ClusterOps
from meshnet.agent.logs import LogOnce
from meshnet.platform.links import NetDevices, OverlayKernel, norm_ip, norm_mac
from meshnet.platform.loopthread import LoopThread
from meshnet.platform.nsfd import PlatformError

if TYPE_CHECKING:
    from meshnet.agent.encrypted import EncryptedOverlay

log = logging.getLogger("meshnet.overlay")

# How often the loop re-reads the kernel even when nothing changed (repairs manual damage).
RECONCILE_PERIOD_S = 2.0
# Distinct bad endpoints / error kinds remembered (to count and log each once).
MAX_REMEMBERED_BAD = 1024


class Overlay:
    def __init__(self, ops: ClusterOps, local_ip: str,
                 vteps: Callable[[], dict[str, str]], period: float = RECONCILE_PERIOD_S) -> None:
        self.ops = ops
        self.store = ops.store
        self.local_ip = local_ip
        self.vteps = vteps  # live member name -> underlay IP
        self.period = period
        self.kernel = OverlayKernel()
        self.nl = LoopThread()  # pyroute2's netlink sockets cannot live on uvloop
        self.mtu = 1450
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.devices: dict[int, NetDevices] = {}
        self.counters = {"passes": 0, "errors": 0, "bad_endpoints": 0}
        self._bad_endpoints: set[tuple[str, str, str, str]] = set()
        self._log_once = LogOnce(log)
        self.encrypted: EncryptedOverlay | None = None

    def attach_encrypted(self, encrypted: EncryptedOverlay) -> None:
        self.encrypted = encrypted
        encrypted.attach(self.kernel, self.nl)

    async def start(self) -> None:
        await self.nl.run(self.kernel.open())
        try:
            self.mtu = await self.nl.run(self.kernel.overlay_mtu(self.local_ip))
        except PlatformError as e:
            log.warning("cannot find the underlay MTU (%s); assuming 1500", e)
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.encrypted is not None:
            await self.encrypted.close()
        self.nl.loop.call_soon_threadsafe(self.kernel.close)
        self.nl.stop()

    def kick(self) -> None:
        self.wake.set()

    async def _loop(self) -> None:
        while True:
            self.wake.clear()
            try:
                await self.reconcile()
            except (PlatformError, OSError) as e:
                self.counters["errors"] += 1
                log.warning("overlay reconcile failed: %s", e)
            except Exception as e:  # anything else is a bug: it must not stop the loop for good
                self.counters["errors"] += 1
                self._log_once("overlay reconcile", e, "errors")
            if self.encrypted is not None:  # on its own: a plain network's trouble is not its
                try:
                    await self.encrypted.reconcile()
                except (PlatformError, OSError, ValueError) as e:
                    self.encrypted.counters["errors"] += 1
                    log.warning("encrypted overlay reconcile failed: %s", e)
                except Exception as e:
                    self.encrypted.counters["errors"] += 1
                    self._log_once("encrypted overlay reconcile", e, "errors")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.period)

    def desired_vnis(self) -> dict[str, int]:
        vnis = self.ops.vnis()
        return {name: vnis[name] for name, net in self.store.networks().items()
                if not net.encrypted and name in vnis}

    async def ensure(self, network: str) -> NetDevices:
        """Make sure NETWORK's devices exist now (a sandbox is about to be plugged in)."""
        if self.encrypted is not None and network in self.encrypted.desired_vnis():
            return await self.encrypted.ensure(network)
        vni = self.desired_vnis().get(network)
        if vni is None:
            raise PlatformError(f"network {network} has no datapath here")
        dev = await self.nl.run(self.kernel.ensure_network(vni, self.local_ip, self.mtu))
        self.devices[vni] = dev
        return dev

    async def reconcile(self) -> None:
        self.counters["passes"] += 1
        desired = self.desired_vnis()
        encrypted = set(self.encrypted.desired_vnis().values()) if self.encrypted else set()
        actual = await self.nl.run(self.kernel.list_networks())
        for vni in set(actual) - set(desired.values()) - encrypted:
            await self.nl.run(self.kernel.remove_network(vni))
            self.devices.pop(vni, None)
        vteps = self.vteps()
        first_error: Exception | None = None
        for name, vni in sorted(desired.items()):
            try:  # one network's trouble is not the others'
                await self._reconcile_network(name, vni, vteps)
            except Exception as e:
                first_error = first_error or e
        if first_error is not None:
            raise first_error

    async def _reconcile_network(self, name: str, vni: int, vteps: dict[str, str]) -> None:
        self.devices[vni] = await self.nl.run(
            self.kernel.ensure_network(vni, self.local_ip, self.mtu))
        fdb: dict[str, str] = {}
        neigh: dict[str, str] = {}
        me = self.ops.node
        for ep in self.store.endpoints(name):
            if ep.node == me or ep.extra.get("pending") or ep.node not in vteps:
                continue
            try:
                mac, ip, vtep = norm_mac(ep.mac), norm_ip(ep.ip), norm_ip(vteps[ep.node])
            except (ValueError, TypeError, AttributeError) as e:
                self._bad_endpoint(ep.network, ep.name, ep.node, e)
                continue
            fdb[mac] = vtep
            neigh[ip] = mac
        await self.nl.run(self.kernel.sync_fdb(vni, fdb))
        await self.nl.run(self.kernel.sync_neighbors(vni, neigh))

    def _bad_endpoint(self, network: str, name: str, node: str, e: Exception) -> None:
        """An endpoint the kernel would not take: left out, counted and logged once."""
        key = (network, name, node, str(e)[:200])
        if key in self._bad_endpoints or len(self._bad_endpoints) >= MAX_REMEMBERED_BAD:
            return
        self._bad_endpoints.add(key)
        self.counters["bad_endpoints"] += 1
        log.warning("endpoint %s on %s (node %s) left out of the overlay: %s",
                    name[:80], network[:80], node[:80], e)

    def status(self) -> dict[str, object]:
        return {"kind": "vxlan", "mtu": self.mtu, "local_ip": self.local_ip,
                "networks": len(self.devices), **self.counters}
