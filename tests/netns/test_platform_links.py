"""platform/links.py on real namespaces: VXLAN overlays between lab hosts (root).

Hosts are a lab's h1..h3 (namespaces on 10.99.0.0/24, no agents); every network device of the
overlay lives in a host's namespace and every sandbox is a namespace of its own, named after the
lab's prefix. The `world` fixture removes the sandboxes and the lab, pass or fail, and checks
that nothing of ours is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from meshnet.lab import Lab
from meshnet.platform import nsfd
from meshnet.platform.links import (
    NetDevices,
    OverlayError,
    OverlayKernel,
    SyncResult,
)
from meshnet.platform.sandbox import NETNS_ETC, create_sandbox, host_ifname

pytestmark = pytest.mark.netns

LabFactory = Callable[[], Lab]  # the lab_factory fixture (tests/netns/conftest.py)

SUBNETS = {5000: "10.10.0", 5001: "10.10.1"}
OVERLAY_MTU = 1450  # the lab's underlay MTU 1500 - 50
POSITIVE_WAIT_S = 10.0


@dataclass(frozen=True)
class Ep:
    """An endpoint: a sandbox on a host, in a network."""

    name: str
    host: str
    vni: int
    n: int  # host part of its address, and of its MAC

    @property
    def ip(self) -> str:
        return f"{SUBNETS[self.vni]}.{self.n}"

    @property
    def mac(self) -> str:
        return f"02:00:{self.vni >> 8:02x}:{self.vni & 0xFF:02x}:00:{self.n:02x}"


@dataclass
class World:
    lab: Lab
    sandboxes: list[str] = field(default_factory=list)

    def ns(self, host: str) -> str:
        return self.lab.host_ns(host)

    def sb(self, name: str) -> str:
        return f"{self.lab.prefix}-s{name}"

    def vtep(self, host: str) -> str:
        return self.lab.underlay_ip(host)


@pytest.fixture
def world(lab_factory: LabFactory) -> Iterator[World]:
    lab = lab_factory()
    lab.up(3, start_agents=False)
    w = World(lab)
    etc_existed = NETNS_ETC.exists()
    yield w
    # Sandboxes first (their veths die with them, or with the host namespaces when the lab goes
    # down in lab_factory's teardown); then check that none of ours is left.
    for name in {*w.sandboxes, *nsfd.list_netns(w.sb(""))}:
        nsfd.delete_netns(name)
        shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
    if not etc_existed:
        with contextlib.suppress(OSError):  # only if empty: another run may be using it
            NETNS_ETC.rmdir()
    assert nsfd.list_netns(w.sb("")) == []
    root_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for name in w.sandboxes:
        assert host_ifname(name) not in root_links
        assert not (NETNS_ETC / name).exists()


# ---------------------------------------------------------------- helpers


async def sh(*argv: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {err.decode().strip()}")
    return out.decode()


async def ping(ns: str, ip: str) -> bool:
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, "ping", "-n", "-q", "-c1", "-W1", ip,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return await proc.wait() == 0


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + POSITIVE_WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {POSITIVE_WAIT_S:g}s: {what}")
        await asyncio.sleep(0.05)


async def reaches(w: World, a: Ep, b: Ep) -> None:
    await eventually(lambda: ping(w.sb(a.name), b.ip), f"{a.name} pings {b.name} ({b.ip})")


async def cannot_reach(w: World, pairs: list[tuple[Ep, str]]) -> None:
    """None of (endpoint, ip) pings succeed; run in parallel, one second each."""
    results = await asyncio.gather(*(ping(w.sb(a.name), ip) for a, ip in pairs))
    leaked = [f"{a.name} -> {ip}" for (a, ip), ok in zip(pairs, results, strict=True) if ok]
    assert not leaked, f"isolation broken: {leaked}"


async def link_json(ns: str, dev: str) -> dict[str, object]:
    out = await sh("ip", "-n", ns, "-d", "-s", "-j", "link", "show", "dev", dev)
    data = json.loads(out)
    assert isinstance(data, list) and len(data) == 1
    result: dict[str, object] = data[0]
    return result


async def rx_packets(ns: str, dev: str) -> int:
    stats = (await link_json(ns, dev))["stats64"]
    assert isinstance(stats, dict)
    return int(stats["rx"]["packets"])


@contextlib.asynccontextmanager
async def kernels(w: World, hosts: list[str]) -> AsyncIterator[dict[str, OverlayKernel]]:
    ks = {h: OverlayKernel(w.ns(h)) for h in hosts}
    try:
        for k in ks.values():
            await k.open()
        yield ks
    finally:
        for k in ks.values():
            k.close()


async def make_sandboxes(w: World, eps: list[Ep], ks: dict[str, OverlayKernel]) -> None:
    for ep in eps:
        w.sandboxes.append(w.sb(ep.name))
        await create_sandbox(
            w.sb(ep.name),
            ks[ep.host].bridge_name(ep.vni),
            f"{ep.ip}/24",
            ep.mac,
            OVERLAY_MTU,
            host_netns=w.ns(ep.host),
        )


async def program(
    w: World, ks: dict[str, OverlayKernel], eps: list[Ep], vnis: list[int]
) -> dict[tuple[str, int], tuple[NetDevices, SyncResult, SyncResult]]:
    """What the agent's reconcile loop does: on every host, every network exists and holds an
    FDB and a neighbour entry for each endpoint on another host."""
    out = {}
    for host, k in ks.items():
        for vni in vnis:
            devs = await k.ensure_network(vni, w.vtep(host), OVERLAY_MTU)
            remote = [e for e in eps if e.vni == vni and e.host != host]
            fdb = await k.sync_fdb(vni, {e.mac: w.vtep(e.host) for e in remote})
            neigh = await k.sync_neighbors(vni, {e.ip: e.mac for e in remote})
            out[host, vni] = (devs, fdb, neigh)
    return out


A = Ep("a", "h1", 5000, 1)
B = Ep("b", "h2", 5000, 2)
C = Ep("c", "h1", 5001, 1)
D = Ep("d", "h2", 5001, 2)
E = Ep("e", "h3", 5001, 3)
ALL = [A, B, C, D, E]
HOSTS = ["h1", "h2", "h3"]
VNIS = [5000, 5001]


async def setup_world(w: World, ks: dict[str, OverlayKernel]) -> None:
    for host, k in ks.items():
        for vni in VNIS:
            await k.ensure_network(vni, w.vtep(host), OVERLAY_MTU)
    await make_sandboxes(w, ALL, ks)
    await program(w, ks, ALL, VNIS)


# ---------------------------------------------------------------- tests


async def test_overlay_reaches_across_hosts_and_isolates_networks(world: World) -> None:
    w = world
    async with kernels(w, HOSTS) as ks:
        assert await ks["h1"].underlay_mtu(w.vtep("h1")) == 1500
        assert await ks["h1"].overlay_mtu(w.vtep("h1")) == OVERLAY_MTU
        with pytest.raises(OverlayError, match="no device holds"):
            await ks["h1"].underlay_mtu("10.99.0.200")
        await setup_world(w, ks)

        # Devices as specified.
        vx = await link_json(w.ns("h1"), "mnvx-001388")
        info = vx["linkinfo"]
        assert isinstance(info, dict)
        data = info["info_data"]
        assert data["id"] == 5000 and data["port"] == 4789 and data["local"] == w.vtep("h1")
        assert data["learning"] is False and data["proxy"] is True
        assert "group" not in data and "remote" not in data
        assert vx["mtu"] == OVERLAY_MTU and vx["master"] == "mnbr-001388"
        assert info["info_slave_data"]["learning"] is False
        br = await link_json(w.ns("h1"), "mnbr-001388")
        assert br["mtu"] == OVERLAY_MTU and br["linkinfo"]["info_data"]["stp_state"] == 0  # type: ignore[index]
        assert "UP" in br["flags"] and "UP" in vx["flags"]  # type: ignore[operator]

        # The entries: the FDB (self and static master) and the neighbours.
        assert await ks["h1"].list_fdb(5000) == {B.mac: w.vtep("h2")}
        assert await ks["h1"].list_neighbors(5000) == {B.ip: B.mac}
        assert await ks["h3"].list_fdb(5001) == {C.mac: w.vtep("h1"), D.mac: w.vtep("h2")}
        fdb = await sh("bridge", "-n", w.ns("h1"), "fdb", "show", "dev", "mnvx-001388")
        assert f"{B.mac} dst {w.vtep('h2')} self permanent" in fdb
        assert f"{B.mac} master mnbr-001388 static" in fdb

        # Reachability, both ways, over each network.
        rx_h3 = await rx_packets(w.ns("h3"), "mnvx-001388")
        await reaches(w, A, B)
        await reaches(w, B, A)
        await reaches(w, C, D)
        await reaches(w, D, E)
        await reaches(w, E, C)
        # A <-> B neither flooded to h3 (its VNI 5000 device saw nothing) nor was learned.
        assert await rx_packets(w.ns("h3"), "mnvx-001388") == rx_h3 == 0
        assert await ks["h1"].list_fdb(5000) == {B.mac: w.vtep("h2")}
        # The ARP answer came from h1's VXLAN proxy: A resolved B without any ARP crossing.
        neigh = await sh("ip", "netns", "exec", w.sb("a"), "ip", "neigh", "show", B.ip)
        assert B.mac in neigh

        # Isolation: nothing on 5000 reaches 5001, on the same host or another, and back.
        await cannot_reach(w, [(A, C.ip), (A, D.ip), (A, E.ip), (C, A.ip), (D, B.ip), (E, A.ip)])
        # Even with ARP forged inside A, D's MAC is unknown to VNI 5000: frames go nowhere.
        a = w.sb("a")
        await sh("ip", "netns", "exec", a, "ip", "route", "add", "10.10.1.0/24", "dev", "eth0")
        await sh(
            "ip", "netns", "exec", a, "ip", "neigh", "replace", D.ip, "lladdr", D.mac,
            "dev", "eth0", "nud", "permanent",
        )  # fmt: skip
        rx_d = await rx_packets(w.ns("h2"), "mnvx-001389")
        await cannot_reach(w, [(A, D.ip)])
        assert await rx_packets(w.ns("h2"), "mnvx-001389") == rx_d


async def test_idempotent_calls_change_nothing(world: World) -> None:
    w = world
    async with kernels(w, HOSTS) as ks:
        await setup_world(w, ks)
        before = {h: await k.list_networks() for h, k in ks.items()}
        again = await program(w, ks, ALL, VNIS)
        for (host, vni), (devs, fdb, neigh) in again.items():
            assert fdb == SyncResult() and neigh == SyncResult(), (host, vni)
            assert before[host][vni].vxlan_index == devs.vxlan_index
            assert before[host][vni].bridge_index == devs.bridge_index
        veth = await link_json(w.ns("h1"), host_ifname(w.sb("a")))
        await make_sandboxes(w, [A], ks)  # converges, recreates nothing
        assert (await link_json(w.ns("h1"), host_ifname(w.sb("a"))))["ifindex"] == veth["ifindex"]
        await reaches(w, A, B)


async def test_repair_after_hand_deletion(world: World) -> None:
    w = world
    async with kernels(w, HOSTS) as ks:
        await setup_world(w, ks)
        await reaches(w, A, B)

        # The VXLAN device on h1 goes: its entries with it. One reconcile restores all.
        await sh("ip", "-n", w.ns("h1"), "link", "del", "mnvx-001388")
        assert 5000 in await ks["h1"].list_networks()  # the bridge alone: a half network
        assert (await ks["h1"].list_networks())[5000].vxlan_index is None
        await cannot_reach(w, [(A, B.ip)])
        res = await program(w, ks, ALL, VNIS)
        assert res["h1", 5000][1] == SyncResult(added=1) == res["h1", 5000][2]
        assert res["h2", 5000][1].total == 0
        await reaches(w, A, B)

        # The bridge on h2 goes: the VXLAN port and the sandbox veth lose their master, and the
        # master FDB entry goes with the bridge. The network and the sandbox are re-ensured.
        await sh("ip", "-n", w.ns("h2"), "link", "del", "mnbr-001388")
        res = await program(w, ks, ALL, VNIS)
        assert res["h2", 5000][1] == SyncResult(changed=1)  # self entry kept, master re-added
        await make_sandboxes(w, [B], ks)
        await reaches(w, A, B)
        await reaches(w, B, A)

        # Single entries deleted by hand.
        await sh(
            "bridge", "-n", w.ns("h1"), "fdb", "del", B.mac, "dev", "mnvx-001388", "self"
        )  # fmt: skip
        await sh("ip", "-n", w.ns("h2"), "neigh", "del", A.ip, "dev", "mnvx-001388")
        res = await program(w, ks, ALL, VNIS)
        assert res["h1", 5000][1] == SyncResult(changed=1)  # master entry was still there
        assert res["h2", 5000][2] == SyncResult(added=1)
        await reaches(w, A, B)
        await reaches(w, B, A)

        # An entry pointing at the wrong VTEP is replaced.
        await ks["h1"].sync_fdb(5000, {B.mac: w.vtep("h3")})
        await cannot_reach(w, [(A, B.ip)])
        res = await program(w, ks, ALL, VNIS)
        assert res["h1", 5000][1] == SyncResult(changed=1)
        await reaches(w, A, B)


async def test_sync_to_nothing_removes_entries_and_remove_network(world: World) -> None:
    w = world
    async with kernels(w, HOSTS) as ks:
        await setup_world(w, ks)
        await reaches(w, C, E)
        k = ks["h3"]
        assert await k.sync_fdb(5001, {}) == SyncResult(removed=2)
        assert await k.sync_neighbors(5001, {}) == SyncResult(removed=2)
        assert await k.list_fdb(5001) == {} and await k.list_neighbors(5001) == {}
        fdb = await sh("bridge", "-n", w.ns("h3"), "fdb", "show", "dev", "mnvx-001389")
        assert C.mac not in fdb and D.mac not in fdb  # master entries too
        assert await k.sync_fdb(5001, {}) == SyncResult()
        await cannot_reach(w, [(E, C.ip)])

        assert await k.remove_network(5001)
        assert not await k.remove_network(5001)
        assert set(await k.list_networks()) == {5000}
        with pytest.raises(OverlayError, match="no VXLAN device"):
            await k.sync_fdb(5001, {})
        links = await sh("ip", "-n", w.ns("h3"), "-o", "link")
        assert "mnvx-001389" not in links and "mnbr-001389" not in links


async def test_list_networks_adopts_and_wrong_devices_are_recreated(world: World) -> None:
    w = world
    ns, local = w.ns("h1"), w.vtep("h1")
    # What a previous run (or someone else) left: a VXLAN device on the wrong port and without
    # proxy, a lone bridge of another VNI, and devices that are not ours.
    await sh(
        "ip", "-n", ns, "link", "add", "mnvx-001388", "type", "vxlan", "id", "5000",
        "dstport", "8472", "local", local,
    )  # fmt: skip
    await sh("ip", "-n", ns, "link", "add", "mnbr-001389", "type", "bridge")
    await sh("ip", "-n", ns, "link", "add", "mnbr-zz", "type", "bridge")
    await sh("ip", "-n", ns, "link", "add", "xbr-001390", "type", "bridge")
    async with OverlayKernel(ns) as k:
        found = await k.list_networks()
        assert set(found) == {5000, 5001}
        assert found[5000].port == 8472 and found[5000].local_ip == local
        assert found[5000].bridge_index is None and found[5001].vxlan_index is None
        old = found[5000].vxlan_index

        devs = await k.ensure_network(5000, local, OVERLAY_MTU)
        assert devs.vxlan_index != old
        vx = await link_json(ns, "mnvx-001388")
        data = vx["linkinfo"]["info_data"]  # type: ignore[index]
        assert data["port"] == 4789 and data["proxy"] is True and data["learning"] is False
        assert vx["master"] == "mnbr-001388"
        # A device of the wrong kind under our name is replaced as well.
        await k.remove_network(5000)
        await sh("ip", "-n", ns, "link", "add", "mnvx-001388", "type", "bridge")
        devs = await k.ensure_network(5000, local, OVERLAY_MTU)
        assert (await link_json(ns, "mnvx-001388"))["linkinfo"]["info_kind"] == "vxlan"  # type: ignore[index]
        # A new local address means a new device.
        await sh("ip", "-n", ns, "addr", "add", "10.99.0.201/24", "dev", "eth0")
        moved = await k.ensure_network(5000, "10.99.0.201", OVERLAY_MTU)
        assert moved.vxlan_index != devs.vxlan_index and moved.local_ip == "10.99.0.201"
        # An MTU change is made in place.
        smaller = await k.ensure_network(5000, "10.99.0.201", 1400)
        assert smaller.vxlan_index == moved.vxlan_index
        assert (await link_json(ns, "mnbr-001388"))["mtu"] == 1400

        # Adoption by a fresh instance (an agent restart), then removal of what is not wanted.
        async with OverlayKernel(ns) as k2:
            assert set(await k2.list_networks()) == {5000, 5001}
            assert await k2.remove_network(5001)
            assert set(await k2.list_networks()) == {5000}
        links = await sh("ip", "-n", ns, "-o", "link")
        assert "mnbr-zz" in links and "xbr-001390" in links  # not ours: untouched
        for bad in (0, 1 << 24):
            with pytest.raises(ValueError):
                await k.ensure_network(bad, local, OVERLAY_MTU)
        with pytest.raises(OverlayError, match="below"):
            await k.ensure_network(5000, local, 600)
