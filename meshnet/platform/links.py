"""The kernel side of a plain VXLAN overlay, in one network namespace (the host's).

Per overlay network (VNI) a host has:

    mnbr-XXXXXX   a Linux bridge (no STP, no address), where the sandboxes' veths plug in
    mnvx-XXXXXX   a kernel VXLAN device, a port of that bridge:
                  id VNI, local = the host's underlay IP, UDP port 4789, ttl 64, no UDP checksum
                  (RFC 7348 allows zero for IPv4), no group and no remote (unicast only),
                  learning off, l2miss/l3miss off, proxy ON, MTU = underlay MTU - 50

where XXXXXX is the VNI in 6 hex digits (a VNI is 24 bits), so names stay within IFNAMSIZ.

Every remote endpoint (a sandbox on another host) becomes three kernel entries, all static:

- an FDB entry on the VXLAN device ("self"):       MAC -> the remote host's VTEP IP;
- an FDB entry on the bridge for the VXLAN port ("master", static): MAC -> the VXLAN port, so
  the bridge sends frames for that MAC straight to the VXLAN port instead of flooding them to
  every local port, and so the bridge need not learn it (learning is turned off on that port:
  nothing from the overlay is ever learned, on the bridge or in the VXLAN device);
- a permanent neighbour entry on the VXLAN device: IP -> MAC.

Why neighbour entries on the VXLAN device and the proxy flag: ARP requests come from inside a
sandbox, which sits on the bridge at layer 2, so a request floods over the bridge to the VXLAN
port. The VXLAN device has no default destination (no all-zeros FDB entry), so a broadcast would
go nowhere; with `proxy` on, the device answers the ARP request itself from its neighbour table
(the kernel's arp_reduce) and nothing floods over the underlay. Docker's overlay driver does the
same (proxy + neighbour + FDB entries); Flannel puts its neighbour entries on the VXLAN device
too, but it routes at layer 3 on the host, which we do not.

The bridge carries no gateway address: a sandbox has its subnet on-link and a default route out
of its eth0 (see sandbox.py), which is all an isolated layer-2 overlay needs. (Docker's overlay
puts the gateway address on the bridge in its overlay namespace because it also routes out.)

Every operation reads the actual state first and applies only the difference, so calling it
again changes nothing and calling it after someone deleted a device or entry repairs it; that is
what the agent's level-triggered reconcile loop runs on.

The netlink side is pyroute2's AsyncIPRoute (pyroute2 0.9's core is asyncio; the sync IPRoute is a
wrapper that runs its own event loop per thread). For a named namespace (tests, the lab) the
netlink socket is created in that namespace by nsfd.call_in_netns from a short-lived thread,
never by pyroute2's `netns=` argument, which forks a child per socket.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from meshnet.platform import nsfd
from meshnet.platform.nsfd import PlatformError

VXLAN_PORT = 4789  # IANA; Linux defaults to 8472 unless told
# Outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8. (With an IPv6 underlay, 70.)
VXLAN_OVERHEAD_V4 = 50
VXLAN_OVERHEAD_V6 = 70
VXLAN_TTL = 64
VNI_MIN, VNI_MAX = 1, (1 << 24) - 1
DEFAULT_PREFIX = "mn"
IFNAMSIZ = 15  # usable characters of a Linux interface name
# Smallest MTU we accept for an overlay device (IPv4's minimum of 68 would be useless; 1280 is
# IPv6's minimum and what every sandbox workload can live with).
MIN_OVERLAY_MTU = 1280

# linux/neighbour.h
AF_BRIDGE = socket.AF_BRIDGE if hasattr(socket, "AF_BRIDGE") else 7
NTF_SELF = 0x02
NTF_MASTER = 0x04
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80

T = TypeVar("T")


class OverlayError(PlatformError):
    """A netlink operation on the overlay's devices failed."""


@dataclass(frozen=True)
class NetDevices:
    """One overlay network's devices as found in (or made in) the kernel.

    An index is None when that device is missing (a half network from a crash or a hand-deleted
    device); ensure_network completes it, remove_network removes what there is."""

    vni: int
    bridge: str
    vxlan: str
    bridge_index: int | None
    vxlan_index: int | None
    mtu: int | None = None
    local_ip: str | None = None
    port: int | None = None
    # The gso_max_size an endpoint's interface should have (None: the kernel's default).
    gso_max_size: int | None = None


@dataclass(frozen=True)
class SyncResult:
    """What a sync_* call changed, counted per key (MAC or IP). ``invalid``: desired entries
    left out because their MAC or IP does not parse (the others are still synced)."""

    added: int = 0
    removed: int = 0
    changed: int = 0
    invalid: int = 0

    @property
    def total(self) -> int:
        return self.added + self.removed + self.changed


def vxlan_overhead(local_ip: str) -> int:
    return VXLAN_OVERHEAD_V6 if ipaddress.ip_address(local_ip).version == 6 else VXLAN_OVERHEAD_V4


def norm_mac(mac: str) -> str:
    """aa:bb:cc:dd:ee:ff; ValueError for anything else (any type)."""
    if not isinstance(mac, str) or len(mac) > 64:
        raise ValueError(f"bad MAC address {mac!r:.80}")
    parts = mac.strip().lower().replace("-", ":").split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9a-f]{1,2}", p) for p in parts):
        raise ValueError(f"bad MAC address {mac!r}")
    return ":".join(p.zfill(2) for p in parts)


def norm_ip(ip: str) -> str:
    """An IP address's canonical text; ValueError for anything else (any type)."""
    if not isinstance(ip, str) or len(ip) > 64:
        raise ValueError(f"bad IP address {ip!r:.80}")
    return str(ipaddress.ip_address(ip.strip()))


def _valid_pairs(desired: Mapping[Any, Any], key: Any, value: Any) -> tuple[dict[str, str], int]:
    """DESIRED normalized by KEY/VALUE; pairs that do not parse are left out and counted, so one
    bad value (a peer's MAC "zz") never keeps the good ones from being synced."""
    out: dict[str, str] = {}
    bad = 0
    for k, v in desired.items():
        try:
            out[key(k)] = value(v)
        except ValueError:
            bad += 1
    return out, bad


def _errcode(e: NetlinkError) -> int:
    return int(getattr(e, "code", 0) or 0)


class OverlayKernel:
    """The overlay's devices and entries in one network namespace.

    netns=None means the namespace of the calling process (the agent on a real host); a name
    means that named namespace (a lab host). Use as `async with OverlayKernel() as k:` or call
    close(). Calls are serialized by a lock, so concurrent reconcile tasks cannot interleave
    their read-modify-write sequences.
    """

    def __init__(self, netns: str | None = None, *, prefix: str = DEFAULT_PREFIX) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", prefix):
            raise ValueError(f"bad device prefix {prefix!r}: 1-6 of a-z 0-9, starting a-z")
        self.netns = netns
        self.prefix = prefix
        self._ipr: Any = None
        self._lock = asyncio.Lock()
        self._name_re = re.compile(rf"{re.escape(prefix)}(br|vx)-([0-9a-f]{{6}})")

    # ------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> OverlayKernel:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def open(self) -> None:
        if self._ipr is None:
            self._ipr = await open_iproute(self.netns)

    def close(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

    async def _nl(self) -> Any:
        await self.open()
        return self._ipr

    # ------------------------------------------------------------ names

    def bridge_name(self, vni: int) -> str:
        return f"{self.prefix}br-{_check_vni(vni):06x}"

    def vxlan_name(self, vni: int) -> str:
        return f"{self.prefix}vx-{_check_vni(vni):06x}"

    def _parse_name(self, ifname: str) -> tuple[str, int] | None:
        m = self._name_re.fullmatch(ifname)
        return (m.group(1), int(m.group(2), 16)) if m else None

    # ------------------------------------------------------------ reading

    async def _links(self) -> dict[str, Any]:
        ipr = await self._nl()
        out: dict[str, Any] = {}
        for msg in await dump("dump links", ipr.link("dump")):
            name = msg.get("ifname")
            if name:
                out[str(name)] = msg
        return out

    async def _link(self, name: str) -> Any | None:
        ipr = await self._nl()
        try:
            res = await ipr.link("get", ifname=name)
        except NetlinkError as e:
            if _errcode(e) in (errno.ENODEV, errno.ENOENT):
                return None
            raise OverlayError(f"get link {name}: {e}") from e
        return res[0] if res else None

    async def underlay_mtu(self, local_ip: str) -> int:
        """MTU of the device that holds LOCAL_IP."""
        async with self._lock:
            ip = norm_ip(local_ip)
            ipr = await self._nl()
            index = None
            for msg in await dump("dump addresses", ipr.addr("dump")):
                if msg.get("address") == ip or msg.get("local") == ip:
                    index = msg["index"]
                    break
            if index is None:
                raise OverlayError(f"no device holds {ip}" + _where(self.netns))
            for msg in await _call("get link", ipr.link("get", index=index)):
                return int(msg.get("mtu"))
            raise OverlayError(f"device {index} holding {ip} vanished")

    async def overlay_mtu(self, local_ip: str) -> int:
        """The VXLAN device MTU for an underlay on LOCAL_IP: underlay MTU - 50 (IPv4)."""
        return await self.underlay_mtu(local_ip) - vxlan_overhead(local_ip)

    async def list_networks(self) -> dict[int, NetDevices]:
        """Our networks in this namespace, found by device name (mnbr-/mnvx-), complete or not,
        so that a restarted agent can adopt them or remove those that no longer belong."""
        async with self._lock:
            links = await self._links()
        found: dict[int, dict[str, Any]] = {}
        for name, msg in links.items():
            parsed = self._parse_name(name)
            if parsed is None:
                continue
            kind, vni = parsed
            if not VNI_MIN <= vni <= VNI_MAX:
                continue
            found.setdefault(vni, {})[kind] = msg
        out: dict[int, NetDevices] = {}
        for vni, devs in sorted(found.items()):
            br, vx = devs.get("br"), devs.get("vx")
            data = _vxlan_data(vx) if vx is not None else None
            out[vni] = NetDevices(
                vni=vni,
                bridge=self.bridge_name(vni),
                vxlan=self.vxlan_name(vni),
                bridge_index=int(br["index"]) if br is not None else None,
                vxlan_index=int(vx["index"]) if vx is not None else None,
                mtu=int(vx.get("mtu")) if vx is not None else None,
                local_ip=_opt_str(data.get("IFLA_VXLAN_LOCAL")) if data is not None else None,
                port=_opt_int(data.get("IFLA_VXLAN_PORT")) if data is not None else None,
            )
        return out

    # ------------------------------------------------------------ networks

    async def ensure_network(
        self, vni: int, local_ip: str, mtu: int, port: int = VXLAN_PORT
    ) -> NetDevices:
        """Make the bridge and VXLAN device of VNI exist, configured as the module doc says,
        enslaved and up. A device with wrong immutable attributes (kind, VNI, local address,
        port, flags) is deleted and recreated; wrong mutable ones (MTU, master, up, STP, port
        learning) are set in place. Returns the devices."""
        _check_vni(vni)
        local = norm_ip(local_ip)
        if mtu < MIN_OVERLAY_MTU:
            raise OverlayError(f"overlay MTU {mtu} is below {MIN_OVERLAY_MTU}")
        if not 0 < port < 65536:
            raise ValueError(f"bad UDP port {port}")
        brname, vxname = self.bridge_name(vni), self.vxlan_name(vni)
        async with self._lock:
            ipr = await self._nl()
            links = await self._links()
            br = await self._ensure_bridge(ipr, links, brname, mtu)
            br_index = int(br["index"])

            # The VXLAN device.
            vx = links.get(vxname)
            if vx is not None and not _vxlan_matches(vx, vni, local, port):
                await self._del_link(vxname)
                vx = None
            if vx is None:
                await _call(
                    f"add vxlan {vxname}",
                    ipr.link(
                        "add",
                        ifname=vxname,
                        kind="vxlan",
                        vxlan_id=vni,
                        vxlan_local=local,
                        vxlan_port=port,
                        vxlan_ttl=VXLAN_TTL,
                        vxlan_learning=0,
                        vxlan_proxy=1,
                        vxlan_l2miss=0,
                        vxlan_l3miss=0,
                        vxlan_udp_csum=0,
                        mtu=mtu,
                    ),
                )
                vx = await self._require_link(vxname)
            vx_index = int(vx["index"])

            # Mutable settings: MTU (bridge MTU set explicitly so it no longer follows its
            # ports), master, port learning off, both up.
            if int(vx.get("mtu")) != mtu:
                await _call(f"set {vxname} mtu", ipr.link("set", index=vx_index, mtu=mtu))
            if _opt_int(vx.get("master")) != br_index:
                await _call(
                    f"enslave {vxname} to {brname}",
                    ipr.link("set", index=vx_index, master=br_index),
                )
                vx = await self._require_link(vxname)
            if _port_learning(vx) != 0:
                await _call(
                    f"set {vxname} bridge port learning off",
                    ipr.brport("set", index=vx_index, learning=0),
                )
            if not _is_up(vx):
                await _call(f"set {vxname} up", ipr.link("set", index=vx_index, state="up"))
        return NetDevices(vni, brname, vxname, br_index, vx_index, mtu, local, port)

    async def ensure_bridge(
        self, vni: int, mtu: int, ports: Sequence[str] = ()
    ) -> tuple[NetDevices, list[str]]:
        """For a network whose overlay port is not a kernel VXLAN device (an encrypted
        network's TAP): VNI's bridge as ensure_network makes it, NO VXLAN device (one found is
        deleted: such a network never carries cleartext), and each existing device of PORTS a
        port of the bridge, at MTU and up. Returns the devices and the PORTS that do not exist."""
        _check_vni(vni)
        if mtu < MIN_OVERLAY_MTU:
            raise OverlayError(f"overlay MTU {mtu} is below {MIN_OVERLAY_MTU}")
        brname, vxname = self.bridge_name(vni), self.vxlan_name(vni)
        missing: list[str] = []
        async with self._lock:
            ipr = await self._nl()
            links = await self._links()
            if vxname in links:
                await self._del_link(vxname)
            br = await self._ensure_bridge(ipr, links, brname, mtu)
            br_index = int(br["index"])
            for name in ports:
                msg = links.get(name)
                if msg is None:
                    missing.append(name)
                    continue
                index = int(msg["index"])
                if _opt_int(msg.get("master")) != br_index:
                    await _call(f"enslave {name} to {brname}",
                                ipr.link("set", index=index, master=br_index))
                if int(msg.get("mtu")) != mtu:
                    await _call(f"set {name} mtu", ipr.link("set", index=index, mtu=mtu))
                if not _is_up(msg):
                    await _call(f"set {name} up", ipr.link("set", index=index, state="up"))
        return NetDevices(vni, brname, vxname, br_index, None, mtu), missing

    async def _ensure_bridge(self, ipr: Any, links: dict[str, Any], brname: str, mtu: int) -> Any:
        """The bridge BRNAME: a bridge, STP off, MTU set explicitly (so it no longer follows
        its ports), up. Returns its link message. Call with the lock held."""
        br = links.get(brname)
        if br is not None and _kind(br) != "bridge":
            await self._del_link(brname)
            br = None
        if br is None:
            await _call(
                f"add bridge {brname}",
                ipr.link("add", ifname=brname, kind="bridge", br_stp_state=0, mtu=mtu),
            )
            br = await self._require_link(brname)
        else:
            data = _info_data(br)
            if data is not None and _opt_int(data.get("IFLA_BR_STP_STATE")):
                await _call(
                    f"set {brname} stp off",
                    ipr.link("set", index=br["index"], kind="bridge", br_stp_state=0),
                )
        br_index = int(br["index"])
        if int(br.get("mtu")) != mtu:
            await _call(f"set {brname} mtu", ipr.link("set", index=br_index, mtu=mtu))
        if not _is_up(br):
            await _call(f"set {brname} up", ipr.link("set", index=br_index, state="up"))
        return br

    async def remove_network(self, vni: int) -> bool:
        """Delete VNI's VXLAN device and bridge (their FDB and neighbour entries go with them).
        True if anything was there. Sandbox veths on the bridge are detached, not deleted."""
        async with self._lock:
            a = await self._del_link(self.vxlan_name(vni))
            b = await self._del_link(self.bridge_name(vni))
        return a or b

    async def _del_link(self, name: str) -> bool:
        ipr = await self._nl()
        try:
            await ipr.link("del", ifname=name)
        except NetlinkError as e:
            if _errcode(e) in (errno.ENODEV, errno.ENOENT):
                return False
            raise OverlayError(f"delete link {name}: {e}") from e
        return True

    async def _require_link(self, name: str) -> Any:
        msg = await self._link(name)
        if msg is None:
            raise OverlayError(f"link {name} vanished right after it was made")
        return msg

    async def _vxlan_index(self, vni: int) -> int:
        name = self.vxlan_name(vni)
        msg = await self._link(name)
        if msg is None or _kind(msg) != "vxlan":
            raise OverlayError(f"no VXLAN device {name} for VNI {vni}" + _where(self.netns))
        return int(msg["index"])

    # ------------------------------------------------------------ FDB

    async def _fdb(self, vx_index: int) -> tuple[dict[str, str], set[str]]:
        """(self entries MAC -> VTEP IP, MACs with a static master entry) on the VXLAN port."""
        ipr = await self._nl()
        selfs: dict[str, str] = {}
        masters: set[str] = set()
        for msg in await dump("dump fdb", ipr.neigh("dump", family=AF_BRIDGE, ifindex=vx_index)):
            if msg.get("ifindex") != vx_index:
                continue
            mac = msg.get("lladdr")
            if not mac:
                continue
            flags, state = int(msg.get("flags") or 0), int(msg.get("state") or 0)
            try:
                if flags & NTF_SELF:
                    dst = msg.get("dst")
                    if dst:
                        selfs[norm_mac(mac)] = norm_ip(dst)
                elif msg.get("master") is not None and not state & NUD_PERMANENT:
                    # NUD_PERMANENT on a bridge entry means "local" (the port's own address).
                    masters.add(norm_mac(mac))
            except ValueError:
                continue  # not one of ours (an entry we never make has an odd form)
        return selfs, masters

    async def list_fdb(self, vni: int) -> dict[str, str]:
        """The VXLAN device's static entries: MAC -> remote VTEP IP."""
        async with self._lock:
            selfs, _ = await self._fdb(await self._vxlan_index(vni))
        return selfs

    async def sync_fdb(self, vni: int, desired: Mapping[str, str]) -> SyncResult:
        """Make VNI's FDB hold exactly DESIRED (MAC -> remote VTEP IP): a "self" entry on the
        VXLAN device and a static "master" entry on the bridge per MAC. Entries not desired
        are removed, missing ones added, ones pointing at another VTEP replaced."""
        want, invalid = _valid_pairs(desired, norm_mac, norm_ip)
        added = removed = changed = 0
        async with self._lock:
            ipr = await self._nl()
            vx = await self._vxlan_index(vni)
            selfs, masters = await self._fdb(vx)
            for mac in sorted((set(selfs) | masters) - set(want)):
                if mac in selfs:
                    await _ignore_missing(
                        f"del fdb {mac}",
                        ipr.neigh("del", family=AF_BRIDGE, ifindex=vx, lladdr=mac, flags=NTF_SELF),
                    )
                if mac in masters:
                    await _ignore_missing(
                        f"del fdb {mac} master",
                        ipr.neigh(
                            "del", family=AF_BRIDGE, ifindex=vx, lladdr=mac, flags=NTF_MASTER
                        ),
                    )
                removed += 1
            for mac, dst in sorted(want.items()):
                touched = False
                if selfs.get(mac) != dst:
                    # For a unicast MAC the kernel keeps one remote; "replace" sets it (append
                    # would be ignored for a MAC that has one already).
                    await _call(
                        f"set fdb {mac} dst {dst}",
                        ipr.neigh(
                            "replace",
                            family=AF_BRIDGE,
                            ifindex=vx,
                            lladdr=mac,
                            dst=dst,
                            state=NUD_NOARP | NUD_PERMANENT,
                            flags=NTF_SELF,
                        ),
                    )
                    touched = True
                if mac not in masters:
                    await _call(
                        f"set fdb {mac} master",
                        ipr.neigh(
                            "replace",
                            family=AF_BRIDGE,
                            ifindex=vx,
                            lladdr=mac,
                            state=NUD_NOARP,  # "static"; PERMANENT would mean local to the bridge
                            flags=NTF_MASTER,
                        ),
                    )
                    touched = True
                if touched:
                    if mac in selfs or mac in masters:
                        changed += 1
                    else:
                        added += 1
        return SyncResult(added, removed, changed, invalid)

    # ------------------------------------------------------------ neighbours

    async def _neighbors(self, vx_index: int) -> dict[str, str]:
        ipr = await self._nl()
        out: dict[str, str] = {}
        for family in (socket.AF_INET, socket.AF_INET6):
            for msg in await dump(
                "dump neighbours", ipr.neigh("dump", family=family, ifindex=vx_index)
            ):
                if msg.get("ifindex") != vx_index:
                    continue
                if not int(msg.get("state") or 0) & NUD_PERMANENT:
                    continue
                ip, mac = msg.get("dst"), msg.get("lladdr")
                if ip and mac:
                    try:
                        out[norm_ip(ip)] = norm_mac(mac)
                    except ValueError:
                        continue  # not one of ours
        return out

    async def list_neighbors(self, vni: int) -> dict[str, str]:
        """The VXLAN device's permanent neighbour entries: IP -> MAC."""
        async with self._lock:
            return await self._neighbors(await self._vxlan_index(vni))

    async def sync_neighbors(self, vni: int, desired: Mapping[str, str]) -> SyncResult:
        """Make the VXLAN device's permanent neighbour entries exactly DESIRED (IP -> MAC);
        the device answers ARP from them (proxy)."""
        want, invalid = _valid_pairs(desired, norm_ip, norm_mac)
        added = removed = changed = 0
        async with self._lock:
            ipr = await self._nl()
            vx = await self._vxlan_index(vni)
            have = await self._neighbors(vx)
            for ip in sorted(set(have) - set(want)):
                await _ignore_missing(f"del neigh {ip}", ipr.neigh("del", ifindex=vx, dst=ip))
                removed += 1
            for ip, mac in sorted(want.items()):
                if have.get(ip) == mac:
                    continue
                await _call(
                    f"set neigh {ip} lladdr {mac}",
                    ipr.neigh("replace", ifindex=vx, dst=ip, lladdr=mac, state=NUD_PERMANENT),
                )
                if ip in have:
                    changed += 1
                else:
                    added += 1
        return SyncResult(added, removed, changed, invalid)


# ---------------------------------------------------------------- helpers


async def open_iproute(netns: str | None) -> Any:
    """An AsyncIPRoute whose netlink socket lives in NETNS (None: ours), made without forking."""
    if netns is None:
        return AsyncIPRoute()
    sock = await asyncio.to_thread(
        nsfd.open_socket_in_netns, netns, socket.AF_NETLINK, socket.SOCK_DGRAM, None
    )
    return AsyncIPRoute(fileno=sock.detach())


async def dump(what: str, aw: Awaitable[Any]) -> list[Any]:
    """All messages of a pyroute2 dump (an awaitable giving an async iterator), with netlink
    errors, whether raised by the request or while reading the answer, as OverlayError."""
    try:
        return [msg async for msg in await aw]
    except NetlinkError as e:
        raise OverlayError(f"{what}: {e.args[1] if len(e.args) > 1 else e}") from e


async def _call(what: str, aw: Awaitable[T]) -> T:
    try:
        return await aw
    except NetlinkError as e:
        raise OverlayError(f"{what}: {e.args[1] if len(e.args) > 1 else e}") from e


async def _ignore_missing(what: str, aw: Awaitable[Any]) -> None:
    try:
        await aw
    except NetlinkError as e:
        if _errcode(e) not in (errno.ENOENT, errno.ENODEV, errno.ESRCH):
            raise OverlayError(f"{what}: {e}") from e


def _check_vni(vni: int) -> int:
    if not isinstance(vni, int) or not VNI_MIN <= vni <= VNI_MAX:
        raise ValueError(f"bad VNI {vni!r}: must be in [{VNI_MIN}, {VNI_MAX}]")
    return vni


def _where(netns: str | None) -> str:
    return f" in netns {netns}" if netns else ""


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _kind(msg: Any) -> str | None:
    return _opt_str(msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND"))


def _info_data(msg: Any) -> Any:
    return msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")


def _vxlan_data(msg: Any) -> Any:
    return _info_data(msg) if _kind(msg) == "vxlan" else None


def _is_up(msg: Any) -> bool:
    return bool(int(msg.get("flags") or 0) & 1)  # IFF_UP


def _port_learning(msg: Any) -> int | None:
    data = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA")
    return None if data is None else _opt_int(data.get("IFLA_BRPORT_LEARNING"))


def _vxlan_matches(msg: Any, vni: int, local: str, port: int) -> bool:
    """Whether an existing device has every attribute that cannot be changed in place."""
    data = _vxlan_data(msg)
    if data is None:
        return False
    group = data.get("IFLA_VXLAN_GROUP")
    want: dict[str, Any] = {
        "IFLA_VXLAN_ID": vni,
        "IFLA_VXLAN_LOCAL": local,
        "IFLA_VXLAN_PORT": port,
        "IFLA_VXLAN_LEARNING": 0,
        "IFLA_VXLAN_PROXY": 1,
        "IFLA_VXLAN_L2MISS": 0,
        "IFLA_VXLAN_L3MISS": 0,
        "IFLA_VXLAN_TTL": VXLAN_TTL,
        "IFLA_VXLAN_UDP_CSUM": 0,
    }
    for key, value in want.items():
        if data.get(key) != value:
            return False
    link = data.get("IFLA_VXLAN_LINK")
    return group in (None, "0.0.0.0") and not link and not data.get("IFLA_VXLAN_COLLECT_METADATA")
