"""The encrypted datapath (meshnet/agent/encdp.py) on real namespaces (root).

Lab hosts (no agents), a plain bridge per host, one EncryptedDatapath per host running in this
process with netns=<host>, static test SAs, sandboxes on the bridges. A tcpdump on the
underlay switch (br0 in the underlay namespace) sees everything between the hosts.

"wire" mode sets gso_max_segs 1 on every host's eth0, so the kernel cuts our UDP GSO batches
into datagrams at the host's NIC, as a real NIC would, and the capture sees wire-sized
datagrams; "passthrough" leaves the veths' UDP segmentation offload on, so batches cross the
lab whole and arrive coalesced (the UDP_GRO path).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import UnderlayCapture, send_udp_from

from meshnet.agent.encdp import (
    EncryptedDatapath,
    InboundSA,
    OutboundSA,
    encrypted_overlay_mtu,
)
from meshnet.lab import Lab
from meshnet.platform import netns, nsfd
from meshnet.platform.sandbox import create_sandbox, delete_sandbox, sandbox_command

pytestmark = pytest.mark.netns

LabFactory = Callable[[], Lab]

VNI = 0x1234
BRIDGE = "mnbr-001234"
PORT = 4790
UNDERLAY_MTU = 1500
MTU = encrypted_overlay_mtu(UNDERLAY_MTU)
MARKER = b"MESHNET-PLAINTEXT-MARKER"
WAIT_S = 10.0


def sb_mac(i: int) -> str:
    return f"02:00:00:00:12:{i:02x}"


def sb_ip(i: int) -> str:
    return f"10.123.0.{i}"


@dataclass
class Env:
    lab: Lab
    n: int
    dps: dict[int, EncryptedDatapath] = field(default_factory=dict)
    sandboxes: list[tuple[str, str]] = field(default_factory=list)
    keys: dict[tuple[int, int], tuple[int, bytes]] = field(default_factory=dict)

    def host(self, i: int) -> str:
        return self.lab.host_ns(f"h{i}")

    def ip(self, i: int) -> str:
        return self.lab.underlay_ip(f"h{i}")

    def sb(self, i: int) -> str:
        return f"{self.lab.prefix}-s{i}"

    def key(self, a: int, b: int) -> tuple[int, bytes]:
        """The SA a -> b: (SPI, key); the same on both ends."""
        if (a, b) not in self.keys:
            self.keys[(a, b)] = (0x1000 * a + b, os.urandom(32))
        return self.keys[(a, b)]

    def install_sas(self) -> None:
        for a in range(1, self.n + 1):
            for b in range(1, self.n + 1):
                if a == b:
                    continue
                spi, key = self.key(a, b)
                self.dps[a].set_outbound(self.ip(b), OutboundSA(spi, key))
                rspi, rkey = self.key(b, a)
                self.dps[a].set_inbound(self.ip(b), {rspi: InboundSA(rspi, rkey)})


@contextlib.asynccontextmanager
async def build(lab_factory: LabFactory, n: int, *, wire: bool, sas: bool) -> AsyncIterator[Env]:
    lab = lab_factory()
    lab.up(n, start_agents=False)
    env = Env(lab, n)
    try:
        for i in range(1, n + 1):
            batch = [f"link add {BRIDGE} mtu {MTU} type bridge", f"link set {BRIDGE} up"]
            if wire:
                batch.append("link set dev eth0 gso_max_segs 1")
            netns.ip_batch(batch, ns=env.host(i))
        for i in range(1, n + 1):
            dp = EncryptedDatapath(env.ip(i), PORT, netns=env.host(i))
            env.dps[i] = dp
            await dp.start()
            tap = dp.add_network(VNI, BRIDGE, MTU)
            assert tap == f"mnet-{VNI:06x}"
            dp.set_macs(VNI, {sb_mac(j): env.ip(j) for j in range(1, n + 1)})
            dp.set_arp(VNI, {sb_ip(j): sb_mac(j) for j in range(1, n + 1)})
        if sas:
            env.install_sas()
        for i in range(1, n + 1):
            env.sandboxes.append((env.sb(i), env.host(i)))
            await create_sandbox(
                env.sb(i),
                BRIDGE,
                f"{sb_ip(i)}/24",
                sb_mac(i),
                MTU,
                host_netns=env.host(i),
                resolv_conf=None,
            )
        yield env
    finally:
        for dp in env.dps.values():
            await dp.close()
        for name, host in env.sandboxes:
            with contextlib.suppress(Exception):
                await delete_sandbox(name, host_netns=host)
            nsfd.delete_netns(name)
        for i in range(1, n + 1):
            links = netns.ip("-o", "link", ns=env.host(i)).stdout
            assert "mnet-" not in links, "a TAP outlived its datapath"
        assert nsfd.list_netns(f"{lab.prefix}-s") == []


@pytest.fixture(params=["wire", "passthrough"])
async def env3(request: pytest.FixtureRequest, lab_factory: LabFactory) -> AsyncIterator[Env]:
    async with build(lab_factory, 3, wire=request.param == "wire", sas=True) as env:
        yield env


@pytest.fixture
async def env2_no_sa(lab_factory: LabFactory) -> AsyncIterator[Env]:
    async with build(lab_factory, 2, wire=True, sas=False) as env:
        yield env


# ---------------------------------------------------------------- helpers


async def run(*argv: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return subprocess.CompletedProcess(argv, proc.returncode or 0, out, err)


async def ping(ns: str, ip: str, count: int = 1) -> bool:
    r = await run(*sandbox_command(ns, ["ping", "-n", "-q", f"-c{count}", "-W1", ip]))
    return r.returncode == 0


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S:g}s: {what}")
        await asyncio.sleep(0.05)


class Capture(UnderlayCapture):
    async def ready(self) -> None:
        await asyncio.to_thread(self.wait_ready)


def ipv4_udp(frame: bytes) -> tuple[int, int, int, int, bytes] | None:
    """(IP total length, flags+fragment offset, UDP source, UDP destination port, UDP payload)
    for an IPv4/UDP Ethernet frame, else None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    (tot,) = struct.unpack_from(">H", frame, 16)
    (frag,) = struct.unpack_from(">H", frame, 20)
    sport, dport = struct.unpack_from(">HH", frame, 14 + ihl)
    return tot, frag, sport, dport, frame[14 + ihl + 8 : 14 + tot]


TCP_SERVER = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001)); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); n = 0; marks = 0; tail = b""
while True:
    d = c.recv(1 << 16)
    if not d: break
    n += len(d); marks += (tail + d).count(b"MESHNET-PLAINTEXT-MARKER"); tail = d[-23:]
c.sendall(f"{n} {marks}".encode()); c.close()
"""

TCP_CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], 5001), timeout=10)
c.sendall(b"MESHNET-PLAINTEXT-MARKER" * int(sys.argv[2])); c.shutdown(socket.SHUT_WR)
print(c.recv(100).decode())
"""


async def tcp_transfer(env: Env, src: int, dst: int, reps: int) -> tuple[int, int]:
    server = await asyncio.create_subprocess_exec(
        *sandbox_command(env.sb(dst), [sys.executable, "-c", TCP_SERVER]),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert server.stdout is not None
        assert (await asyncio.wait_for(server.stdout.readline(), 10)).strip() == b"ready"
        r = await run(
            *sandbox_command(env.sb(src), [sys.executable, "-c", TCP_CLIENT, sb_ip(dst), str(reps)])
        )
        assert r.returncode == 0, r.stderr.decode()
        n, marks = r.stdout.split()
        return int(n), int(marks)
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()


def drops(env: Env, host: int, peer: int) -> dict[str, int]:
    d = env.dps[host].stats()[env.ip(peer)]["drops"]
    assert isinstance(d, dict)
    return d


# ---------------------------------------------------------------- tests


async def test_encrypted_overlay_works_and_leaks_nothing(env3: Env, tmp_path: Path) -> None:
    env = env3
    cap = Capture(env.lab, tmp_path / "underlay.pcap")
    try:
        await cap.ready()
        await eventually(lambda: ping(env.sb(1), sb_ip(2)), "h1 -> h2 over the encrypted net")
        await eventually(lambda: ping(env.sb(3), sb_ip(1)), "h3 -> h1 over the encrypted net")
        # Big TCP writes: GSO super-frames, cut into records and glued back.
        reps = 40_000  # 960 KB
        n, marks = await tcp_transfer(env, 1, 2, reps)
        assert (n, marks) == (reps * len(MARKER), reps)
        await asyncio.sleep(0.2)
    finally:
        cap.stop()
    udp = [u for u in map(ipv4_udp, cap.packets()) if u is not None]
    raw = cap.path.read_bytes()
    assert MARKER not in raw, "plaintext on the underlay"
    ours = [u for u in udp if u[3] == PORT]
    # (tcpdump may drop some under load; most of the transfer must be there)
    assert sum(len(u[4]) for u in ours) > reps * len(MARKER) // 2, "the capture missed it"
    assert not [u for u in udp if 4789 in (u[2], u[3])], "cleartext VXLAN on the underlay"
    assert not [u for u in udp if u[1] & 0x3FFF], "IP fragments on the underlay"
    frags = await run(
        *netns.exec_argv(
            env.lab.underlay_ns, ["tcpdump", "-n", "-r", str(cap.path), "ip[6:2] & 0x3fff != 0"]
        )
    )
    assert frags.stdout.strip() == b"", frags.stdout
    assert env.dps[1].network_stats()["max_datagram"] == UNDERLAY_MTU
    stats = env.dps[1].stats()[env.ip(2)]
    assert isinstance(stats["tx_packets"], int) and stats["tx_packets"] > 600
    wire = "gso_max_segs 1" in netns.ip("-d", "link", "show", "eth0", ns=env.host(1)).stdout
    if wire:  # the NIC segmented: every datagram on the wire fits the MTU
        assert max(u[0] for u in ours) <= UNDERLAY_MTU

    # Replay: a captured single-record datagram h1 -> h2, sent again from h1's namespace.
    h2 = (env.ip(2), PORT)
    spi12 = env.key(1, 2)[0]
    sample = next(
        u[4]
        for u in ours
        if u[3] == PORT and len(u[4]) < 200 and struct.unpack_from(">I", u[4])[0] == spi12
    )
    before = drops(env, 2, 1)
    send_udp_from(env.host(1), sample, h2)
    await eventually(
        lambda: asyncio.sleep(0, drops(env, 2, 1)["replay"] > before["replay"]), "replay counted"
    )
    # Tampered: a fresh sequence number (so the window would let it in) with the old tag.
    forged = sample[:4] + struct.pack(">Q", struct.unpack_from(">Q", sample, 4)[0] + 100_000)
    forged += sample[12:]
    send_udp_from(env.host(1), forged, h2)
    flipped = bytearray(sample)
    flipped[-1] ^= 1
    flipped[4:12] = struct.pack(">Q", 2**40)
    send_udp_from(env.host(1), bytes(flipped), h2)
    await eventually(
        lambda: asyncio.sleep(0, drops(env, 2, 1)["auth"] >= before["auth"] + 2), "auth counted"
    )
    # Unknown SPI, and a too-short datagram: counted, never fatal.
    send_udp_from(env.host(1), struct.pack(">IQ", 0xDEAD, 1) + bytes(60), h2)
    send_udp_from(env.host(1), b"\x01\x02", h2)
    await eventually(
        lambda: asyncio.sleep(0, drops(env, 2, 1)["unknown_spi"] >= 1), "unknown SPI counted"
    )
    # The window moved only for verified records: traffic still flows.
    assert await ping(env.sb(1), sb_ip(2), 2)
    # Handshake datagrams (SPI 0) go to the agent unchanged.
    got: list[tuple[bytes, tuple[str, int]]] = []
    env.dps[2].on_handshake = lambda data, addr: got.append((data, addr))
    env.dps[1].send_handshake(b"\x00\x00\x00\x00hello", h2)
    await eventually(lambda: asyncio.sleep(0, bool(got)), "handshake delivered")
    assert got[0] == (b"\x00\x00\x00\x00hello", (env.ip(1), PORT))
    with pytest.raises(ValueError):
        env.dps[1].send_handshake(b"\x00\x00\x00\x01nope", h2)


async def test_no_sa_nothing_leaves_then_rekey(env2_no_sa: Env, tmp_path: Path) -> None:
    env = env2_no_sa
    cap = Capture(env.lab, tmp_path / "nosa.pcap")
    try:
        await cap.ready()
        assert not await ping(env.sb(1), sb_ip(2), 2)
        # Queued frames age out and are counted as no_sa.
        await eventually(
            lambda: asyncio.sleep(0, drops(env, 1, 2)["no_sa"] > 0), "no_sa drops counted"
        )
    finally:
        cap.stop()
    udp = [u for u in map(ipv4_udp, cap.packets()) if u is not None]
    assert udp == [], "something left a host without an SA"
    assert MARKER not in cap.path.read_bytes()

    # Unknown MAC: dropped and counted, nothing flooded.
    env.dps[1].set_arp(VNI, {"10.123.0.99": "02:00:00:00:99:99"})
    assert not await ping(env.sb(1), "10.123.0.99")
    assert env.dps[1].network_stats()["networks"][VNI]["unknown_mac"] > 0  # type: ignore[index]
    env.dps[1].set_arp(VNI, {sb_ip(j): sb_mac(j) for j in (1, 2)})

    # SAs arrive: traffic flows; on_first_inbound fires once per inbound SA.
    first: list[tuple[str, int]] = []
    env.dps[2].on_first_inbound = lambda ip, spi: first.append((ip, spi))
    env.install_sas()
    await eventually(lambda: ping(env.sb(1), sb_ip(2)), "ping once SAs are set")
    assert first == [(env.ip(1), env.key(1, 2)[0])]
    # Make before break: new inbound SAs installed next to the old ones, then the senders
    # switch; both keep working and the rekey is counted.
    for a, b in ((1, 2), (2, 1)):
        old_spi, old_key = env.key(a, b)
        new_spi, new_key = old_spi + 0x100, os.urandom(32)
        env.dps[b].set_inbound(
            env.ip(a), {old_spi: InboundSA(old_spi, old_key), new_spi: InboundSA(new_spi, new_key)}
        )
        env.dps[a].set_outbound(env.ip(b), OutboundSA(new_spi, new_key))
    assert await ping(env.sb(1), sb_ip(2), 2)
    s = env.dps[1].stats()[env.ip(2)]
    assert s["rekeys"] == 1 and s["spi"] == env.key(1, 2)[0] + 0x100
    # An expired outbound SA drops (never sends cleartext).
    spi, key = env.key(1, 2)
    env.dps[1].set_outbound(env.ip(2), OutboundSA(spi + 0x200, key, expires_at=time.monotonic()))
    assert not await ping(env.sb(1), sb_ip(2))
    assert drops(env, 1, 2)["expired"] > 0
