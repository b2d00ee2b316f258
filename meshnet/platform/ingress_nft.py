"""The routing mesh in the host's network namespace: one nftables table and the bridge addresses.

``render`` (pure) turns the published ports into the table ``ip meshnet_ingress``; ``apply``
loads it with one ``nft -f`` (a delete and an add in one transaction, so the kernel never holds
half a ruleset) and ``remove`` deletes it. No other table is ever touched.

The table, for published port P -> target T of a service whose serving tasks are A, B (kube-proxy's
nftables mode, without IPVS, which this kernel lacks):

    prerouting (nat, -100)   to a local address (`fib daddr type local`): jump published
    output (nat, -100)       the same for this host's own connections (not to 127/8: a loopback
                             source cannot be routed out to a task)
    published                tcp dport P dnat to numgen random mod 2 map { 0 : A, 1 : B } : T
                             a port with no serving task, or whose network has no host address
                             here yet: reject (a reset / port unreachable at once, not a hang)
    postrouting (nat, 100)   out a bridge, DNATed: snat to this host's address on that network,
                             so the task's reply comes back through this host wherever it runs
    forward, input (filter)  the bridges carry an address now, so the host could route between
                             overlays or from an overlay to the underlay, and a sandbox could
                             reach the host's own services: only DNATed connections (and frames
                             bridged within one overlay, seen here under br_netfilter) pass

NAT happens on a connection's first packet; conntrack carries the rest, so a ruleset change
never moves an established connection. Priorities are numeric (nft 1.0.6 wants them so on
some hooks).

``BridgeAddresses`` puts each host address on its network's bridge, with the bridge's MAC set
to the address's (02:42:<ip>, what the endpoint record says), so peers' FDB and neighbour
entries for the host endpoint point at the bridge itself; and turns IPv4 forwarding on for the
underlay device and those bridges only.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from meshnet.platform.links import dump, open_iproute
from meshnet.platform.netns import NetnsError, _tool
from meshnet.platform.nsfd import PlatformError

__all__ = ["TABLE", "BridgeAddresses", "HostAddress", "NftPort", "apply", "remove", "render"]

TABLE = "meshnet_ingress"
NFT_TIMEOUT_S = 10.0
_BRIDGE_RE = re.compile(r"[a-z][a-z0-9]{0,5}br-[0-9a-f]{6}")


class IngressError(PlatformError):
    """Loading or removing the ingress table, or a bridge address, failed."""


@dataclass(frozen=True, slots=True)
class NftPort:
    protocol: str  # tcp | udp
    published: int
    target: int
    network: str
    backends: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class HostAddress:
    bridge: str
    ip: str
    prefixlen: int
    mac: str


def _checked_ip(ip: str) -> str:
    return str(ipaddress.IPv4Address(ip))  # ValueError for anything else: never into the text


def render(ports: Sequence[NftPort], hosts: Mapping[str, HostAddress],
           skip: Collection[tuple[str, int]] = ()) -> str | None:
    """The nft script for PORTS (HOSTS: network -> this host's address there; SKIP: (protocol,
    port) pairs never to touch, the agent's own), or None when there is nothing to install."""
    bridges = sorted({h.bridge for h in hosts.values() if _BRIDGE_RE.fullmatch(h.bridge)})
    rules: list[str] = []
    for p in ports:
        if p.protocol not in ("tcp", "udp") or (p.protocol, p.published) in skip:
            continue
        if not (1 <= p.published <= 65535 and 1 <= p.target <= 65535):
            continue
        match = f"{p.protocol} dport {p.published}"
        backends = []
        for ip in p.backends:
            try:
                backends.append(_checked_ip(ip))
            except ValueError:
                continue
        if not backends or p.network not in hosts:
            reject = "reject with tcp reset" if p.protocol == "tcp" else "reject"
            rules.append(f"{match} {reject}")
            continue
        elements = ", ".join(f"{i} : {ip}" for i, ip in enumerate(backends))
        rules.append(f"{match} dnat to numgen random mod {len(backends)} map "
                     f"{{ {elements} }} : {p.target}")
    if not rules and not bridges:
        return None
    out = [f"table ip {TABLE}", f"delete table ip {TABLE}", f"table ip {TABLE} {{"]
    out += _chain("prerouting", "type nat hook prerouting priority -100; policy accept;",
                  ["fib daddr type local jump published"])
    out += _chain("output", "type nat hook output priority -100; policy accept;",
                  ["ip daddr != 127.0.0.0/8 fib daddr type local jump published"])
    out += _chain("published", None, rules)
    snat = []
    for net in sorted(hosts):
        h = hosts[net]
        if h.bridge in bridges:
            snat.append(f'oifname "{h.bridge}" ct status dnat snat to {_checked_ip(h.ip)}')
    out += _chain("postrouting", "type nat hook postrouting priority 100; policy accept;", snat)
    guard_fwd: list[str] = []
    guard_in: list[str] = []
    if bridges:
        names = ", ".join(f'"{b}"' for b in bridges)
        same = ", ".join(f'"{b}" . "{b}"' for b in bridges)
        guard_fwd = [f"iifname . oifname {{ {same} }} accept",
                     "ct status dnat accept",
                     f"iifname {{ {names} }} drop",
                     f"oifname {{ {names} }} drop"]
        guard_in = [f"iifname {{ {names} }} ct state established,related accept",
                    f"iifname {{ {names} }} drop"]
    out += _chain("forward", "type filter hook forward priority 0; policy accept;", guard_fwd)
    out += _chain("input", "type filter hook input priority 0; policy accept;", guard_in)
    out.append("}")
    return "\n".join(out) + "\n"


def _chain(name: str, hook: str | None, rules: list[str]) -> list[str]:
    lines = [f"\tchain {name} {{"]
    if hook:
        lines.append(f"\t\t{hook}")
    lines += [f"\t\t{r}" for r in rules]
    lines.append("\t}")
    return lines


async def _nft(script: str) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            _tool("nft"), "-f", "-", stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    except (OSError, NetnsError) as e:
        raise IngressError(f"nft: {e}") from None
    try:
        _, err = await asyncio.wait_for(proc.communicate(script.encode()), NFT_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise IngressError(f"nft did not finish in {NFT_TIMEOUT_S:g} s") from None
    if proc.returncode != 0:
        first = err.decode(errors="replace").strip().splitlines()[:1]
        raise IngressError(f"nft -f failed: {first[0][:200] if first else proc.returncode}")


async def apply(script: str) -> None:
    """Load a script from ``render`` (it replaces the table in one transaction)."""
    await _nft(script)


async def remove() -> None:
    """Delete the table if it is there (the `table` line makes the delete always succeed)."""
    await _nft(f"table ip {TABLE}\ndelete table ip {TABLE}\n")


def set_forwarding(ifname: str, proc_root: Path = Path("/proc/sys/net/ipv4/conf")) -> bool:
    """IPv4 forwarding on for packets that arrive on IFNAME (the per-device switch, not the
    host-wide ip_forward: only the underlay and the bridges with a host address route).
    True if it was off."""
    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,15}", ifname) or ifname in (".", ".."):
        raise IngressError(f"bad interface name {ifname!r}")
    path = proc_root / ifname / "forwarding"
    try:
        if path.read_text().strip() == "1":
            return False
        path.write_text("1\n")
    except OSError as e:
        raise IngressError(f"{path}: {os.strerror(e.errno or errno.EIO)}") from None
    return True


class BridgeAddresses:
    """The host addresses on our bridges, in the calling process's namespace (the agent's).
    Runs on the overlay's netlink thread (links.py says why)."""

    def __init__(self, prefix: str, netns: str | None = None) -> None:
        # Only bridges named as OverlayKernel(prefix=PREFIX) names them are ever touched.
        self.bridge_re = re.compile(rf"{re.escape(prefix)}br-[0-9a-f]{{6}}")
        self.netns = netns
        self._ipr: Any = None

    async def _nl(self) -> Any:
        if self._ipr is None:
            self._ipr = await open_iproute(self.netns)
        return self._ipr

    def close(self) -> None:
        if self._ipr is not None:
            ipr, self._ipr = self._ipr, None
            ipr.close()

    async def sync(self, desired: Mapping[str, HostAddress], local_ip: str) -> list[str]:
        """Make DESIRED's bridges hold exactly their host address (and its MAC), and every other
        bridge of ours no IPv4 address. Returns the underlay device's name (holding LOCAL_IP)
        and the bridges that now carry an address: the devices that must forward."""
        ipr = await self._nl()
        links = {int(m["index"]): m for m in await dump("dump links", ipr.link("dump"))}
        by_name = {str(m.get("ifname")): i for i, m in links.items()}
        addrs: dict[int, set[tuple[str, int]]] = {}
        underlay = None
        for a in await dump("dump addresses", ipr.addr("dump", family=2)):
            ip, index = a.get("local") or a.get("address"), int(a["index"])
            addrs.setdefault(index, set()).add((str(ip), int(a["prefixlen"])))
            if ip == local_ip and index in links:
                underlay = str(links[index].get("ifname"))
        forwarding = [underlay] if underlay else []
        for name, index in sorted(by_name.items()):
            if not self.bridge_re.fullmatch(name):
                continue
            want = next((h for h in desired.values() if h.bridge == name), None)
            have = addrs.get(index, set())
            for ip, plen in sorted(have):
                if want is None or (ip, plen) != (want.ip, want.prefixlen):
                    await self._addr("del", index, ip, plen)
            if want is None:
                continue
            mac = links[index].get("address")
            if str(mac).lower() != want.mac:
                try:
                    await ipr.link("set", index=index, address=want.mac)
                except NetlinkError as e:
                    raise IngressError(f"set {name} address {want.mac}: {e}") from None
            if (want.ip, want.prefixlen) not in have:
                await self._addr("add", index, want.ip, want.prefixlen)
            forwarding.append(name)
        return forwarding

    async def _addr(self, op: str, index: int, ip: str, prefixlen: int) -> None:
        ipr = await self._nl()
        try:
            await ipr.addr(op, index=index, address=ip, prefixlen=prefixlen)
        except NetlinkError as e:
            code = int(getattr(e, "code", 0) or 0)
            if (op, code) in (("add", errno.EEXIST), ("del", errno.EADDRNOTAVAIL)):
                return
            raise IngressError(f"{op} address {ip}/{prefixlen}: {e}") from None
