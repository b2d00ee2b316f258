"""platform/sandbox.py and platform/nsfd.py on real namespaces (root).

One lab host (a namespace, no agent) holds a network's bridge; sandboxes are namespaces named
after the lab's prefix. The `host` fixture removes them and the lab, pass or fail, and checks
that nothing of ours is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

import pytest

from meshnet.lab import Lab
from meshnet.platform import nsfd
from meshnet.platform.links import OverlayKernel
from meshnet.platform.nsfd import PlatformError
from meshnet.platform.sandbox import (
    NETNS_ETC,
    RESOLV_CONF,
    SandboxError,
    create_sandbox,
    delete_sandbox,
    host_ifname,
    list_sandboxes,
    resolv_conf_path,
    sandbox_command,
)

pytestmark = pytest.mark.netns

LabFactory = Callable[[], Lab]  # the lab_factory fixture (tests/netns/conftest.py)

MTU = 1450
GSO_CAP = 62910
VNI = 5000
BRIDGE = "mnbr-001388"
WAIT_S = 10.0
VETH_RE = re.compile(r"\bmnv[0-9a-f]{11}\b")  # host ends of sandbox veths


@dataclass
class Host:
    lab: Lab
    made: list[str] = field(default_factory=list)

    @property
    def ns(self) -> str:
        return self.lab.host_ns("h1")

    def sb(self, name: str) -> str:
        full = f"{self.lab.prefix}-s{name}"
        self.made.append(full)
        return full


@pytest.fixture
def host(lab_factory: LabFactory) -> Iterator[Host]:
    lab = lab_factory()
    lab.up(1, start_agents=False)
    h = Host(lab)
    etc_existed = NETNS_ETC.exists()
    yield h
    for name in {*h.made, *nsfd.list_netns(f"{lab.prefix}-s")}:
        nsfd.delete_netns(name)
        shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
    if not etc_existed:
        with contextlib.suppress(OSError):  # only if empty: another run may be using it
            NETNS_ETC.rmdir()
    assert nsfd.list_netns(f"{lab.prefix}-s") == []
    for name in h.made:
        assert not (NETNS_ETC / name).exists()


async def sh(*argv: str, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {err.decode().strip()}")
    return out.decode()


async def in_ns(ns: str, *argv: str) -> str:
    return await sh(*sandbox_command(ns, argv))


async def ping(ns: str, ip: str) -> bool:
    proc = await asyncio.create_subprocess_exec(
        *sandbox_command(ns, ["ping", "-n", "-q", "-c1", "-W1", ip]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return await proc.wait() == 0


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S:g}s: {what}")
        await asyncio.sleep(0.05)


async def network(h: Host) -> None:
    async with OverlayKernel(h.ns) as k:
        await k.ensure_network(VNI, h.lab.underlay_ip("h1"), MTU)


async def host_links(h: Host) -> str:
    return await sh("ip", "-n", h.ns, "-o", "link")


async def test_sandbox_is_configured_and_reaches_its_neighbour(host: Host) -> None:
    h = host
    await network(h)
    s1, s2 = h.sb("one"), h.sb("two")
    sb1 = await create_sandbox(
        s1, BRIDGE, "10.10.0.1/24", "02:00:00:00:00:01", MTU, host_netns=h.ns
    )
    await create_sandbox(
        s2, BRIDGE, "10.10.0.2/24", "02:00:00:00:00:02", MTU, "10.10.0.254", host_netns=h.ns,
        gso_max_size=GSO_CAP,
    )
    assert sb1.ip == "10.10.0.1" and sb1.host_ifname == host_ifname(s1)
    assert len(sb1.host_ifname) <= 15 and sb1.host_ifname.startswith("mnv")
    assert list_sandboxes(f"{h.lab.prefix}-s") == sorted([s1, s2])

    # Inside: eth0 with MAC, MTU, address, up; lo up; the default route.
    eth0 = json.loads(await in_ns(s1, "ip", "-j", "-d", "addr", "show", "dev", "eth0"))[0]
    assert eth0["address"] == "02:00:00:00:00:01" and eth0["mtu"] == MTU
    assert eth0["linkinfo"]["info_kind"] == "veth" and "UP" in eth0["flags"]
    assert eth0["gso_max_size"] == 65536  # not capped unless asked (an encrypted network asks)
    two = json.loads(await in_ns(s2, "ip", "-j", "-d", "link", "show", "dev", "eth0"))[0]
    assert two["gso_max_size"] == GSO_CAP
    v4 = [(a["local"], a["prefixlen"]) for a in eth0["addr_info"] if a["family"] == "inet"]
    assert v4 == [("10.10.0.1", 24)]
    assert "UP" in json.loads(await in_ns(s1, "ip", "-j", "link", "show", "lo"))[0]["flags"]
    route = (await in_ns(s1, "ip", "route", "show", "default")).split()
    assert route[:3] == ["default", "dev", "eth0"] and "via" not in route
    assert route[route.index("scope") + 1] == "link"
    assert "default via 10.10.0.254 dev eth0" in await in_ns(s2, "ip", "route", "show", "default")
    # The host end: on the bridge, MTU, up.
    veth = json.loads(await sh("ip", "-n", h.ns, "-j", "link", "show", "dev", sb1.host_ifname))[0]
    assert veth["master"] == BRIDGE and veth["mtu"] == MTU and "UP" in veth["flags"]
    # resolv.conf, as `ip netns exec` shows it to the task.
    assert resolv_conf_path(s1).read_text() == RESOLV_CONF
    assert await in_ns(s1, "cat", "/etc/resolv.conf") == RESOLV_CONF

    await eventually(lambda: ping(s1, "10.10.0.2"), "one pings two")
    await eventually(lambda: ping(s2, "10.10.0.1"), "two pings one")

    # Idempotent: a second create recreates nothing and changes nothing.
    index = veth["ifindex"]
    await create_sandbox(s1, BRIDGE, "10.10.0.1/24", "02:00:00:00:00:01", MTU, host_netns=h.ns)
    veth = json.loads(await sh("ip", "-n", h.ns, "-j", "link", "show", "dev", sb1.host_ifname))[0]
    assert veth["ifindex"] == index

    # Converges: a changed address replaces the old one; a lost veth is remade.
    await create_sandbox(s1, BRIDGE, "10.10.0.3/24", "02:00:00:00:00:01", MTU, host_netns=h.ns)
    eth0 = json.loads(await in_ns(s1, "ip", "-j", "addr", "show", "dev", "eth0"))[0]
    assert [a["local"] for a in eth0["addr_info"] if a["family"] == "inet"] == ["10.10.0.3"]
    await sh("ip", "-n", h.ns, "link", "del", sb1.host_ifname)
    await create_sandbox(s1, BRIDGE, "10.10.0.1/24", "02:00:00:00:00:01", MTU, host_netns=h.ns)
    await eventually(lambda: ping(s2, "10.10.0.1"), "two pings one after repair")

    # Delete: no veth, no namespace, no /etc/netns entry; twice is fine.
    assert await delete_sandbox(s1, host_netns=h.ns)
    assert not await delete_sandbox(s1, host_netns=h.ns)
    assert sb1.host_ifname not in await host_links(h)
    assert not nsfd.netns_exists(s1) and not resolv_conf_path(s1).parent.exists()
    assert list_sandboxes(f"{h.lab.prefix}-s") == [s2]
    assert await delete_sandbox(s2, host_netns=h.ns)
    assert not VETH_RE.search(await host_links(h))


async def test_failed_create_leaves_nothing(host: Host) -> None:
    h = host
    s = h.sb("bad")
    with pytest.raises(SandboxError, match="no bridge"):
        await create_sandbox(
            s, "mnbr-nothere", "10.10.0.1/24", "02:00:00:00:00:01", MTU, host_netns=h.ns
        )
    assert not nsfd.netns_exists(s) and not resolv_conf_path(s).parent.exists()
    assert not VETH_RE.search(await host_links(h))
    with pytest.raises(SandboxError, match="prefix length"):
        await create_sandbox(s, BRIDGE, "10.10.0.1/32", "02:00:00:00:00:01", MTU, host_netns=h.ns)
    with pytest.raises(PlatformError, match="bad namespace name"):
        await create_sandbox("../x", BRIDGE, "10.10.0.1/24", "02:00:00:00:00:01", MTU)


async def test_dns_socket_inside_a_sandbox(host: Host) -> None:
    """The agent's DNS listener: a socket bound to 127.0.0.11:53 inside the sandbox, opened from
    this process; a process inside the sandbox sends to it and we receive here."""
    h = host
    await network(h)
    s = h.sb("dns")
    sb = await create_sandbox(s, BRIDGE, "10.10.0.9/24", "02:00:00:00:00:09", MTU, host_netns=h.ns)
    sock = nsfd.open_socket_in_netns(s, socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.11", 53))
    try:
        sock.settimeout(WAIT_S)
        assert sock.getsockname() == ("127.0.0.11", 53)
        code = (
            "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
            "s.settimeout(5); s.sendto(b'query', ('127.0.0.11', 53)); print(s.recv(100).decode())"
        )
        proc = await asyncio.create_subprocess_exec(
            *sandbox_command(s, [sys.executable, "-c", code]), stdout=subprocess.PIPE
        )
        data, addr = await asyncio.to_thread(sock.recvfrom, 100)
        assert data == b"query" and addr[0] == "127.0.0.1"
        sock.sendto(b"answer", addr)
        out, _ = await proc.communicate()
        assert proc.returncode == 0 and out.decode().strip() == "answer"
        # The socket is in the sandbox, not here: our namespace has no such listener.
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind(("127.0.0.11", 53))  # would be EADDRINUSE if it were ours
        except OSError as e:
            pytest.fail(f"127.0.0.11:53 is taken in the test's own namespace: {e}")
        finally:
            probe.close()
        # A namespace held by a socket outlives its unmount; delete_sandbox still takes the
        # veth off the bridge.
        assert await delete_sandbox(s, host_netns=h.ns)
        assert sb.host_ifname not in await host_links(h)
    finally:
        sock.close()


def test_nsfd_names_and_errors(host: Host) -> None:
    s = host.sb("raw")
    assert nsfd.create_netns(s)
    assert not nsfd.create_netns(s)
    assert nsfd.netns_exists(s) and s in nsfd.list_netns(host.lab.prefix)
    # A thread inside sees only the namespace's own lo.
    names = nsfd.call_in_netns(s, lambda: [n for _, n in socket.if_nameindex()])
    assert names == ["lo"]
    assert nsfd.delete_netns(s)
    assert not nsfd.delete_netns(s)
    with pytest.raises(PlatformError, match="does not exist"):
        nsfd.open_socket_in_netns(s, socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.1", 0))
    with pytest.raises(PlatformError, match="bad namespace name"):
        nsfd.create_netns("a/b")
    # A failed bind is a clear error, not a traceback from a thread.
    nsfd.create_netns(s)
    first = nsfd.open_socket_in_netns(s, socket.AF_INET, socket.SOCK_DGRAM, ("0.0.0.0", 5353))
    try:
        with pytest.raises(PlatformError, match=r"cannot open socket.*in use"):
            nsfd.open_socket_in_netns(s, socket.AF_INET, socket.SOCK_DGRAM, ("0.0.0.0", 5353))
    finally:
        first.close()
    nsfd.delete_netns(s)


async def test_many_sandboxes_at_once(host: Host) -> None:
    """The agent starts many tasks at the same moment: concurrent creates and deletes on one
    bridge neither collide nor leave anything behind."""
    h = host
    await network(h)
    names = [h.sb(f"m{i}") for i in range(24)]
    await asyncio.gather(
        *(
            create_sandbox(
                n, BRIDGE, f"10.10.0.{i + 1}/24", f"02:00:00:00:01:{i:02x}", MTU, host_netns=h.ns
            )
            for i, n in enumerate(names)
        )
    )
    assert list_sandboxes(f"{h.lab.prefix}-sm") == sorted(names)
    ports = VETH_RE.findall(await sh("ip", "-n", h.ns, "-o", "link", "show", "master", BRIDGE))
    assert sorted(ports) == sorted(host_ifname(n) for n in names)
    await eventually(lambda: ping(names[0], "10.10.0.24"), "first pings last")
    done = await asyncio.gather(*(delete_sandbox(n, host_netns=h.ns) for n in names))
    assert all(done)
    assert list_sandboxes(f"{h.lab.prefix}-sm") == []
    assert not VETH_RE.search(await host_links(h))
