"""Sandboxes: what a task lives in.

A sandbox is

- a named network namespace NS (`ip netns add` semantics: a bind mount under /run/netns);
- a veth pair: the host end `mnv<11 hex digits of a hash of NS>` is a port of the network's
  bridge (in the host's namespace), the other end is `eth0` inside NS with the endpoint's MAC,
  the overlay MTU and the endpoint's address;
- `lo` up, and a default route out of eth0: "default dev eth0" (the subnet is on-link and
  the overlay routes nowhere else) or "default via GATEWAY dev eth0" when a gateway is given;
- /etc/netns/NS/resolv.conf saying `nameserver 127.0.0.11` and `options ndots:0`, which
  `ip netns exec` bind-mounts over /etc/resolv.conf for the processes it starts.

An agent names NS with sandbox_ns_name(PREFIX, NODE, NAME): at most 64 characters whatever the
lengths of NODE and NAME (nsfd's limit), and a hash keeps names that share a long beginning
apart:

    <PREFIX>-<NODE's first 8>.<6 hex of a hash of NODE>-<NAME cut to fit>-<10 hex of a hash
    of (NODE, NAME)>

e.g. `mns-host1.17eac5-web.1-8855f3c0a5`; task `.10` of a 60-character service keeps its
`.10` and loses the service's end: `mns-host1.17eac5-svcxxx...xxx.10-7ed0ce74b3` (64 long).
Every sandbox of one agent starts with sandbox_node_prefix(PREFIX, NODE), `<PREFIX>-<node
tag>-`, and no other node's does: a tag is 8 to 15 long with any `-` in its first 8, so one
tag followed by `-` never begins another. A restarted agent sweeps exactly its own.

create_sandbox is an "ensure": run it again and it converges what is there (and repairs a
missing veth) instead of failing. If it fails on a sandbox it was creating, it removes what it
made. delete_sandbox deletes the host end of the veth explicitly, because a namespace lives on
after its unmount while anything still holds it (a DNS socket opened in it with
nsfd.open_socket_in_netns does), and with it the veth would stay on the bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import ipaddress
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from meshnet.platform import netns as netns_tool
from meshnet.platform import nsfd
from meshnet.platform.links import dump, norm_mac, open_iproute
from meshnet.platform.nsfd import PlatformError

SANDBOX_IFNAME = "eth0"
HOST_IFNAME_PREFIX = "mnv"
# 11 hex digits (44 bits) of SHA-256 of the namespace name: "mnv" + 11 = 14 characters, within
# IFNAMSIZ, and a collision needs ~4 million sandboxes on one host.
HOST_IFNAME_HEX = 11
NETNS_ETC = Path("/etc/netns")
DNS_SERVER = "127.0.0.11"
RESOLV_CONF = f"nameserver {DNS_SERVER}\noptions ndots:0\n"
RT_SCOPE_LINK = 253
RTNH_F_ONLINK = 4
IFF_UP = 1
# Sandbox namespace names (sandbox_ns_name): the node's first NODE_CHARS characters and
# NODE_HEX hex digits of a hash of its whole name make the node tag; NAME_HEX hex digits of a
# hash of (node, name) end the name (40 bits: one collision becomes likely only with about a
# million sandboxes on one host, and is refused, never shared, when it happens).
NETNS_NAME_MAX = nsfd.NETNS_NAME_MAX
SANDBOX_NODE_CHARS = 8
SANDBOX_NODE_HEX = 6
SANDBOX_NAME_HEX = 10
_NS_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_SLOT_RE = re.compile(r"[0-9]{1,10}")
_PID_RE = re.compile(r"[0-9]{1,10}")


class SandboxError(PlatformError):
    """Making, changing or removing a sandbox failed."""


class SandboxExists(SandboxError):
    """create_sandbox(exclusive=True) found a namespace of that name already there."""


@dataclass(frozen=True)
class Sandbox:
    ns: str
    host_ifname: str
    bridge: str
    ip_cidr: str
    mac: str
    mtu: int
    gateway: str | None = None
    host_netns: str | None = None
    ifname: str = SANDBOX_IFNAME
    gso_max_size: int | None = None  # None: the kernel's default

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_interface(self.ip_cidr).ip)


def _hash_hex(digits: int, *parts: str) -> str:
    data = b"".join(len(b).to_bytes(4, "big") + b for b in (p.encode() for p in parts))
    return hashlib.blake2b(data, digest_size=8, person=b"meshnet-sandbox").hexdigest()[:digits]


def _node_tag(node: str) -> str:
    if not isinstance(node, str) or not node:
        raise SandboxError("a sandbox needs its node's name")
    return f"{_NS_UNSAFE.sub('_', node[:SANDBOX_NODE_CHARS])}.{_hash_hex(SANDBOX_NODE_HEX, node)}"


def sandbox_node_prefix(prefix: str, node: str) -> str:
    """What the name of every sandbox NODE's agent makes starts with (and no other node's)."""
    if not isinstance(prefix, str) or not nsfd.NETNS_NAME_RE.fullmatch(prefix):
        raise SandboxError(f"bad sandbox prefix {str(prefix)[:80]!r}: use A-Z a-z 0-9 _ . -")
    return f"{prefix}-{_node_tag(node)}-"


def sandbox_ns_name(prefix: str, node: str, name: str) -> str:
    """The namespace of sandbox NAME (a task `<service>.<slot>` or a `run`'s name) of NODE's
    agent: `<prefix>-<node tag>-<NAME cut to fit>-<hash of NODE, NAME>`, at most 64 characters
    (exactly 64 when NAME had to be cut), the hash's digits always there, a task's `.<slot>`
    kept when NAME is cut. SandboxError if PREFIX leaves no room for the rest."""
    if not isinstance(name, str) or not name:
        raise SandboxError("a sandbox needs a name")
    head = sandbox_node_prefix(prefix, node)
    digest = _hash_hex(SANDBOX_NAME_HEX, node, name)
    room = NETNS_NAME_MAX - len(head) - len(digest) - 1  # 1: the "-" after the readable part
    if room < 0:
        raise SandboxError(f"sandbox prefix {prefix!r} is too long: namespace names of node "
                           f"{node[:80]!r} would exceed {NETNS_NAME_MAX} characters")
    readable = _readable(_NS_UNSAFE.sub("_", name), room)
    return f"{head}{readable}-{digest}" if readable else f"{head}{digest}"


def _readable(name: str, room: int) -> str:
    """NAME, or as much of it as fits in ROOM characters, keeping a `.<slot>` ending."""
    if len(name) <= room:
        return name
    head, dot, slot = name.rpartition(".")
    if dot and head and _SLOT_RE.fullmatch(slot) and len(slot) + 2 <= room:
        return f"{head[: room - len(slot) - 1]}.{slot}"
    return name[:room]


def is_node_sandbox(ns_name: str, prefix: str, node: str) -> bool:
    """Whether NS_NAME is a name sandbox_ns_name gives a sandbox of NODE's agent."""
    head = sandbox_node_prefix(prefix, node)
    return re.fullmatch(rf"{re.escape(head)}(?:[A-Za-z0-9_.-]+-)?[0-9a-f]{{{SANDBOX_NAME_HEX}}}",
                        ns_name) is not None and len(ns_name) <= NETNS_NAME_MAX


def node_sandboxes(prefix: str, node: str) -> list[str]:
    """The sandboxes on this host named by NODE's agent (what a restarted agent sweeps)."""
    return [n for n in list_sandboxes(sandbox_node_prefix(prefix, node))
            if is_node_sandbox(n, prefix, node)]


def node_sandbox_leftovers(prefix: str, node: str) -> list[str]:
    """NODE's sandboxes as node_sandboxes, plus those whose namespace is gone but whose
    /etc/netns/NAME directory stayed (a namespace's name can die with its agent's mount
    namespace; the directory is on the host's /etc). What a restarted agent removes."""
    head = sandbox_node_prefix(prefix, node)
    try:
        dirs = [p.name for p in NETNS_ETC.iterdir() if p.name.startswith(head)]
    except OSError:
        dirs = []
    names = set(node_sandboxes(prefix, node))
    names.update(n for n in dirs if is_node_sandbox(n, prefix, node))
    return sorted(names)


def host_ifname(ns_name: str) -> str:
    """The name of the host end of NS_NAME's veth."""
    digest = hashlib.sha256(ns_name.encode()).hexdigest()[:HOST_IFNAME_HEX]
    return f"{HOST_IFNAME_PREFIX}{digest}"


def resolv_conf_path(ns_name: str) -> Path:
    return NETNS_ETC / nsfd.check_name(ns_name) / "resolv.conf"


def list_sandboxes(prefix: str) -> list[str]:
    """Names of the named namespaces starting with PREFIX (the agent's sandbox prefix)."""
    return nsfd.list_netns(prefix)


def processes_with_env(marker: str) -> list[int]:
    """Processes whose (initial) environment holds the exact entry MARKER ("NAME=value").
    Agents carry the lab's marker; tasks carry nothing of the agent's environment (they are
    found through their cgroups, platform/cgroups.py)."""
    want = marker.encode()
    found = []
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if not _PID_RE.fullmatch(pid) or pid == me:
            continue
        with contextlib.suppress(OSError), open(f"/proc/{pid}/environ", "rb") as f:
            if want in f.read().split(b"\0"):
                found.append(int(pid))
    return found


def etc_files(ns_name: str) -> dict[str, str]:
    """/etc files a task of sandbox NS_NAME sees, and where their content lives on the host."""
    base = NETNS_ETC / nsfd.check_name(ns_name)
    return {f"/etc/{n}": str(base / n) for n in ("resolv.conf", "hosts", "hostname")}


async def write_identity(ns_name: str, hostname: str, ip: str) -> None:
    """/etc/netns/NS_NAME/{hosts,hostname}: the task's name resolves to its own address, as in
    a Docker container."""
    base = NETNS_ETC / nsfd.check_name(ns_name)
    hosts = (f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
             f"{ip}\t{hostname}\n")
    await asyncio.to_thread(_write_text, base / "hosts", hosts)
    await asyncio.to_thread(_write_text, base / "hostname", hostname + "\n")


def sandbox_command(ns_name: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ARGV inside sandbox NS_NAME (`ip netns exec`, which also bind-mounts
    /etc/netns/NS_NAME/resolv.conf)."""
    return netns_tool.exec_argv(nsfd.check_name(ns_name), argv)


async def create_sandbox(
    ns_name: str,
    bridge: str,
    ip_cidr: str,
    mac: str,
    mtu: int,
    gateway: str | None = None,
    *,
    host_netns: str | None = None,
    resolv_conf: str | None = RESOLV_CONF,
    gso_max_size: int | None = None,
    exclusive: bool = False,
) -> Sandbox:
    """Make (or converge) sandbox NS_NAME on BRIDGE, which lives in HOST_NETNS (None: ours).

    RESOLV_CONF is written to /etc/netns/NS_NAME/resolv.conf (None: write none).
    GSO_MAX_SIZE caps the frames the sandbox's interface hands on (encdp.frame_gso_max).
    EXCLUSIVE: the namespace must be new; SandboxExists (and nothing touched) if a namespace of
    that name is already there, whoever made it."""
    nsfd.check_name(ns_name)
    iface = ipaddress.ip_interface(ip_cidr)
    if iface.network.prefixlen == iface.max_prefixlen:
        raise SandboxError(f"{ip_cidr}: give the address with the subnet's prefix length")
    sb = Sandbox(
        ns=ns_name,
        host_ifname=host_ifname(ns_name),
        bridge=bridge,
        ip_cidr=str(iface),
        mac=norm_mac(mac),
        mtu=mtu,
        gateway=str(ipaddress.ip_address(gateway)) if gateway else None,
        host_netns=host_netns,
        gso_max_size=gso_max_size,
    )
    created = await asyncio.to_thread(nsfd.create_netns, ns_name)
    if exclusive and not created:
        raise SandboxExists(f"sandbox {ns_name}: a network namespace of that name already "
                            "exists on this host; not sharing it")
    try:
        await _converge(sb)
        if resolv_conf is not None:
            await asyncio.to_thread(_write_text, resolv_conf_path(ns_name), resolv_conf)
    except BaseException as e:
        if created:
            with contextlib.suppress(Exception):
                await delete_sandbox(ns_name, host_netns=host_netns)
        if isinstance(e, NetlinkError):
            raise SandboxError(f"sandbox {ns_name}: {_nlmsg(e)}") from e
        if isinstance(e, OSError) and not isinstance(e, PlatformError):
            raise SandboxError(f"sandbox {ns_name}: {e.strerror or e}") from e
        raise
    return sb


async def delete_sandbox(ns_name: str, *, host_netns: str | None = None) -> bool:
    """Remove sandbox NS_NAME: the host end of its veth (the other end goes with it), the
    namespace, and /etc/netns/NS_NAME. Idempotent; True if anything was there."""
    nsfd.check_name(ns_name)
    removed = False
    host = await open_iproute(host_netns)
    try:
        try:
            await host.link("del", ifname=host_ifname(ns_name))
            removed = True
        except NetlinkError as e:
            if e.code not in (errno.ENODEV, errno.ENOENT):
                raise SandboxError(f"delete veth of {ns_name}: {_nlmsg(e)}") from e
    finally:
        host.close()
    removed = await asyncio.to_thread(nsfd.delete_netns, ns_name) or removed
    etc = NETNS_ETC / ns_name
    if etc.exists():
        await asyncio.to_thread(shutil.rmtree, etc, True)
        removed = True
    return removed


# ---------------------------------------------------------------- internals


async def _converge(sb: Sandbox) -> None:
    host = await open_iproute(sb.host_netns)
    inner: Any = None
    try:
        inner = await open_iproute(sb.ns)
        bridge = await _get_link(host, sb.bridge)
        if bridge is None:
            raise SandboxError(f"no bridge {sb.bridge}" + _where(sb.host_netns))
        br_index = int(bridge["index"])

        # The veth pair: both ends must exist and be veths; otherwise start over.
        h = await _get_link(host, sb.host_ifname)
        e = await _get_link(inner, sb.ifname)
        if h is None or e is None or _kind(h) != "veth" or _kind(e) != "veth":
            if h is not None:
                await _del(host, sb.host_ifname)
            if e is not None:
                await _del(inner, sb.ifname)
            fd = os.open(nsfd.netns_path(sb.ns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                await host.link(
                    "add",
                    ifname=sb.host_ifname,
                    kind="veth",
                    mtu=sb.mtu,
                    peer={"ifname": sb.ifname, "net_ns_fd": fd, "address": sb.mac, "mtu": sb.mtu},
                )
            finally:
                os.close(fd)
            h = await _get_link(host, sb.host_ifname)
            e = await _get_link(inner, sb.ifname)
            if h is None or e is None:
                raise SandboxError(f"veth of {sb.ns} vanished right after it was made")

        # Host end: on the bridge, MTU, up.
        hi = int(h["index"])
        if int(h.get("mtu")) != sb.mtu:
            await host.link("set", index=hi, mtu=sb.mtu)
        if h.get("master") != br_index:
            await host.link("set", index=hi, master=br_index)
        if not int(h.get("flags") or 0) & IFF_UP:
            await host.link("set", index=hi, state="up")

        # Inside: lo up; eth0 with MAC, MTU, exactly our address, up; the default route.
        lo = await _get_link(inner, "lo")
        if lo is not None and not int(lo.get("flags") or 0) & IFF_UP:
            await inner.link("set", index=int(lo["index"]), state="up")
        ei = int(e["index"])
        if norm_mac(str(e.get("address"))) != sb.mac:
            await inner.link("set", index=ei, address=sb.mac)
        if int(e.get("mtu")) != sb.mtu:
            await inner.link("set", index=ei, mtu=sb.mtu)
        if sb.gso_max_size is not None and e.get("gso_max_size") != sb.gso_max_size:
            await inner.link("set", index=ei, gso_max_size=sb.gso_max_size)
        await _ensure_address(inner, ei, sb.ip_cidr)
        if not int(e.get("flags") or 0) & IFF_UP:
            await inner.link("set", index=ei, state="up")
        default = "0.0.0.0/0" if ipaddress.ip_interface(sb.ip_cidr).version == 4 else "::/0"
        if sb.gateway is None:
            await inner.route("replace", dst=default, oif=ei, scope=RT_SCOPE_LINK)
        else:
            await inner.route(
                "replace", dst=default, gateway=sb.gateway, oif=ei, flags=RTNH_F_ONLINK
            )
    finally:
        host.close()
        if inner is not None:
            inner.close()


async def _ensure_address(ipr: Any, index: int, ip_cidr: str) -> None:
    want = ipaddress.ip_interface(ip_cidr)
    family = socket.AF_INET if want.version == 4 else socket.AF_INET6
    have: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    for msg in await dump("dump addresses", ipr.addr("dump", index=index, family=family)):
        if msg.get("index") != index:
            continue
        addr = msg.get("address")
        if addr is None:
            continue
        iface = ipaddress.ip_interface(f"{addr}/{msg['prefixlen']}")
        if iface.version == 6 and iface.ip.is_link_local:
            continue
        have.append(iface)
    for iface in have:
        if iface != want:
            await ipr.addr(
                "del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
            )
    if want not in have:
        await ipr.addr("add", index=index, address=str(want.ip), prefixlen=want.network.prefixlen)


async def _get_link(ipr: Any, name: str) -> Any | None:
    try:
        res = await ipr.link("get", ifname=name)
    except NetlinkError as e:
        if e.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise
    return res[0] if res else None


async def _del(ipr: Any, name: str) -> None:
    try:
        await ipr.link("del", ifname=name)
    except NetlinkError as e:
        if e.code not in (errno.ENODEV, errno.ENOENT):
            raise


def _kind(msg: Any) -> str | None:
    kind = msg.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
    return None if kind is None else str(kind)


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _nlmsg(e: NetlinkError) -> str:
    return str(e.args[1]) if len(e.args) > 1 else str(e)


def _where(netns: str | None) -> str:
    return f" in netns {netns}" if netns else ""
