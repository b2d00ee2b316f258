"""The user-space datapath of `--encrypted` networks.

Per network a TAP device (platform/tap.py: IFF_VNET_HDR, CSUM/TSO offloads) is a port of the
network's bridge in place of the kernel VXLAN device. A frame the TAP gives us (up to a 64 KB
GSO super-frame behind its 10-byte virtio-net header) goes to the host that owns its
destination MAC, as a run of records on one UDP socket (port 4790):

    datagram  = SPI (4, BE) | seq (8, BE) | AEAD(key, nonce = aad = SPI|seq, plaintext)
    plaintext = VXLAN header (8, RFC 7348: I flag, VNI) | frame id (4) | index (1) | count (1)
                | the next P bytes of  virtio-net header | Ethernet frame

P is what fills a datagram to the underlay MTU (1430 for 1500 over IPv4), so no datagram is
ever larger than the MTU, the socket sets DF (IP_PMTUDISC_DO) and nothing is fragmented. The
records of one super-frame go out in one sendmsg with UDP_SEGMENT (at most 44 records of 1472
bytes, the 64 KB a UDP datagram can hold), and come back, where the kernel coalesces them, in
one recvmsg with UDP_GRO; the receiver glues the payloads back together and writes the
super-frame, virtio-net header and all, to its TAP in one writev: the kernel segments it, or
does not need to. SPI 0 marks a handshake datagram, handed to the agent unchanged. A record
whose plaintext is the inner header alone is a keepalive (send_keepalive): it confirms an SA
and carries nothing.

Threads. One per host, started by start(): the pump, an epoll loop over the socket, the TAPs
and a wake-up eventfd, giving each ready source a budget (TAP_BATCH super-frames, RX_BUDGET
records) before the others get a turn. cryptography's AEAD calls hold the GIL (measured: two
threads sealing 64 KB each take as long as one doing both), so a second crypto thread would not
add a core, and a TX and an RX thread only fought over the GIL (up to a 5 ms switch interval for
the ACKs of the other direction). Control calls come from the agent's event loop; they swap
whole dicts (atomic under the GIL) and never wait on the pump except for a per-TAP lock held
for one read or write. A host that needs more than one core for crypto would run the pump in a
worker process per host (the keys crossing a pipe); bench/encdp_micro.py runs each host's
datapath in its own process for that reason.

Cleartext never leaves: the only send calls are for sealed records and for send_handshake,
which refuses anything that does not start with SPI 0. A frame for a peer with no outbound SA
is queued (at most QUEUE_FRAMES per peer, for at most QUEUE_AGE_S) and sealed when the SA
arrives; an expired SA drops the frame. Every drop is counted by reason.

Inbound: the SA is found by SPI, its replay window (crypto/replay.py) is asked (check) before
the decryption, and updated only after the tag verified (update).

Per record, Python costs more than the AEAD call itself, so both hot loops work a burst at a
time, with the per-record steps driven by map() over views made once (no Python bytecode per
record): TX reads the TAP with one readv straight into record-shaped slots (_TxBuf), writes every
inner header, then every record header, then seals every record; RX takes a GRO run of one SA
with consecutive sequence numbers above its window (a GSO burst: the common case) in one
decrypt pass and one window update (_rx_burst), and anything else, or any failed tag, record by
record (_rx_each), which is the reference behaviour.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import os
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import repeat

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from meshnet.crypto.replay import ReplayWindow
from meshnet.platform import nsfd
from meshnet.platform.tap import VNET_HDR_LEN, LinkControl, Tap, open_tap

DEFAULT_PORT = 4790
DEFAULT_UNDERLAY_MTU = 1500
AES_256_GCM = "aes-256-gcm"
CHACHA20_POLY1305 = "chacha20-poly1305"
# Python 3.11's socket module lacks these (linux/udp.h, linux/in.h).
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
IP_MTU_DISCOVER = 10
IP_PMTUDISC_DO = 2
# Record layout.
SPI_SEQ = struct.Struct(">IQ")
REC_HDR = SPI_SEQ.size  # 12: SPI + seq, also the AAD
TAG_LEN = 16
INNER = struct.Struct(">IIIBB")  # VXLAN flags word, VNI << 8, frame id, index, count
INNER_LEN = INNER.size  # 14
VXLAN_FLAGS = 0x08000000  # the I bit
RECORD_OVERHEAD = REC_HDR + TAG_LEN + INNER_LEN  # 42 bytes per datagram on top of IP/UDP
IPV4_UDP = 28
IPV6_UDP = 48
ETH_HDR = 14
# The largest frame the TAP hands us: 64 KB of GSO payload plus headers, behind the vnet
# header. Reads are sized for it; larger frames are not produced by the kernel.
MAX_FRAME = 65536 + 1024
MIN_RECORD_PAYLOAD = 512
# UDP_SEGMENT: one sendmsg may carry at most 64 KB of UDP payload and UDP_MAX_SEGMENTS (64 on
# older kernels) segments.
GSO_MAX_BYTES = 65535 - IPV4_UDP
GSO_MAX_SEGS = 64
# Per turn of the pump: super-frames read from one TAP, records received from the socket,
# before the other sources get a turn (a 64 KB super-frame is ~46 records, ~0.2-0.5 ms).
TAP_BATCH = 4
RX_BUDGET = 192
# No-SA queue: long enough for a handshake round trip on a LAN, short enough that a stale
# frame is not worth delivering; small enough to bound memory (peers x 64 x 64 KB worst case).
QUEUE_FRAMES = 64
QUEUE_AGE_S = 1.0
# Super-frames being reassembled at once (across peers); the oldest is dropped beyond it.
MAX_REASSEMBLY = 128
# Handshake datagrams waiting for the agent's event loop; more are dropped (a flood must not
# grow memory).
MAX_PENDING_HANDSHAKES = 1024
# Keepalive requests waiting for the pump (one per handshake; more than this at once means a
# burst of handshakes, and losing one only delays a confirmation).
MAX_PENDING_KEEPALIVES = 1024
SOCK_BUF = 4 << 20
# See EncryptedDatapath(busy_poll_us=...). Off by default: on the 2-vCPU lab machine it did
# not lower the round trip measurably and it takes CPU from the work itself.
DEFAULT_BUSY_POLL_US = 0
POLL_S = 0.25
SEND_RETRY_S = 0.05

DROP_REASONS = ("replay", "auth", "unknown_spi", "expired", "no_sa", "unknown_mac", "queue_full")
_ZERO_SPI = b"\x00\x00\x00\x00"
# Runs an iterator of calls to its end, keeping nothing.
_drain: Callable[[Iterable[object]], None] = deque[object](maxlen=0).extend
_VNET_NONE = bytes(VNET_HDR_LEN)
_ARP = struct.Struct(">HHBBH6s4s6s4s")


def make_aead(cipher: str, key: bytes) -> AESGCM | ChaCha20Poly1305:
    if cipher == AES_256_GCM:
        if len(key) != 32:
            raise ValueError("aes-256-gcm needs a 32-byte key")
        return AESGCM(key)
    if cipher == CHACHA20_POLY1305:
        return ChaCha20Poly1305(key)
    raise ValueError(f"unknown cipher {cipher!r}")


@dataclass(eq=False)
class OutboundSA:
    """What the sender needs. `seq` is the next sequence number; the TX thread advances it
    (the agent may read it to decide when to rekey). Never wraps: past max_seq the SA is
    expired and frames are dropped."""

    spi: int
    key: bytes = field(repr=False)
    cipher: str = AES_256_GCM
    seq: int = 1
    max_seq: int = 2**64 - 1
    expires_at: float | None = None  # time.monotonic() deadline
    aead: AESGCM | ChaCha20Poly1305 = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.spi < 2**32:
            raise ValueError(f"bad SPI {self.spi}: 1..2^32-1 (0 is the handshake)")
        if self.seq < 1:
            raise ValueError("sequence numbers start at 1")
        self.aead = make_aead(self.cipher, self.key)


@dataclass(eq=False)
class InboundSA:
    spi: int
    key: bytes = field(repr=False)
    cipher: str = AES_256_GCM
    expires_at: float | None = None  # time.monotonic() deadline
    window: ReplayWindow = field(default_factory=ReplayWindow, repr=False)
    aead: AESGCM | ChaCha20Poly1305 = field(init=False, repr=False)
    seen: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        if not 0 < self.spi < 2**32:
            raise ValueError(f"bad SPI {self.spi}: 1..2^32-1 (0 is the handshake)")
        self.aead = make_aead(self.cipher, self.key)


class _Peer:
    __slots__ = (
        "addr",
        "drops",
        "ip",
        "out",
        "out_since",
        "queue",
        "rekeys",
        "rx_bytes",
        "rx_packets",
        "tx_bytes",
        "tx_packets",
    )  # fmt: skip

    def __init__(self, ip: str, port: int) -> None:
        self.ip = ip
        self.addr = (ip, port)
        self.out: OutboundSA | None = None
        self.out_since = 0.0
        self.rekeys = 0
        self.tx_packets = self.tx_bytes = self.rx_packets = self.rx_bytes = 0
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self.queue: deque[tuple[float, int, bytes]] = deque()  # (queued at, vni, frame)


class _Asm:
    """A super-frame being glued back together."""

    __slots__ = ("missing", "pieces")

    def __init__(self, count: int) -> None:
        self.pieces: list[memoryview | None] = [None] * count
        self.missing = count


class _Net:
    __slots__ = ("arp", "bridge", "closed", "counters", "lock", "macs", "tap", "vni")

    def __init__(self, vni: int, tap: Tap, bridge: str) -> None:
        self.vni = vni
        self.tap = tap
        self.bridge = bridge
        self.lock = threading.Lock()
        self.closed = False
        self.macs: dict[bytes, _Peer | None] = {}  # None: a local MAC, not ours to carry
        self.arp: dict[bytes, bytes] = {}
        self.counters = {
            "tx_frames": 0, "rx_frames": 0, "unknown_mac": 0, "multicast": 0,
            "arp_replies": 0, "tap_errors": 0,
        }  # fmt: skip


class _TxBuf:
    """The TX buffer, laid out as records. Slot i holds record i's plaintext: the inner header
    (INNER_LEN) then the next P bytes of the (vnet header | frame) stream. The TAP is read
    with one readv into the P-byte parts, so every plaintext is contiguous where it lies. The
    sealed records go to `out`, SEG bytes apart, in the layout UDP_SEGMENT sends."""

    def __init__(self, payload: int, seg: int) -> None:
        self.payload = payload
        slot = INNER_LEN + payload
        n = -(-MAX_FRAME // payload)
        self.buf = bytearray(n * slot)
        view = memoryview(self.buf)
        self.into = [view[i * slot + INNER_LEN : (i + 1) * slot] for i in range(n)]
        self.plain = [view[i * slot : (i + 1) * slot] for i in range(n)]
        self.inner_at = [i * slot for i in range(n)]
        self.out = bytearray(n * seg)
        self.oview = memoryview(self.out)
        self.hdrs = [self.oview[i * seg : i * seg + REC_HDR] for i in range(n)]
        self.sealed = [self.oview[i * seg + REC_HDR : (i + 1) * seg] for i in range(n)]

    def frame(self, n: int) -> bytes:
        """The N stream bytes read into the slots, as one piece (to queue it)."""
        P = self.payload
        return b"".join(self.into[i][: min(P, n - i * P)] for i in range(-(-n // P)))

    def load(self, data: bytes) -> None:
        """Put a queued (vnet header | frame) back into the slots."""
        P = self.payload
        for i in range(0, len(data), P):
            self.into[i // P][: min(P, len(data) - i)] = data[i : i + P]


class _RxBuf:
    """The receive buffer (`buf`), the buffer a burst is decrypted into (`pbuf`), and a
    _Layout of both for each segment size seen lately (ours first)."""

    MAX_LAYOUTS = 4

    def __init__(self, seg: int) -> None:
        self.buf = bytearray(65536)
        self.view = memoryview(self.buf)
        # A run of COUNT records of SEG bytes decrypts into COUNT slots of SEG - 28 bytes.
        self.pbuf = bytearray(2 * len(self.buf))
        self.pview = memoryview(self.pbuf)
        self._layouts: dict[int, _Layout] = {}
        self.layout(seg)

    def layout(self, seg: int) -> _Layout | None:
        """The layout of runs of SEG-byte records; None for a segment size no peer of ours
        would send (too small to carry MIN_RECORD_PAYLOAD)."""
        lay = self._layouts.get(seg)
        if lay is None:
            if seg < MIN_RECORD_PAYLOAD + RECORD_OVERHEAD:
                return None
            if len(self._layouts) >= self.MAX_LAYOUTS:
                del self._layouts[next(iter(self._layouts))]
            lay = self._layouts[seg] = _Layout(self, seg)
        return lay


class _Layout:
    """For runs of SEG-byte records in _RxBuf: record i's header and sealed part in `buf`, and
    its plaintext slot (inner header | piece) in `pbuf`, as views made once."""

    def __init__(self, rx: _RxBuf, seg: int) -> None:
        self.slot = slot = seg - REC_HDR - TAG_LEN
        n = -(-len(rx.buf) // seg)
        view, pview = rx.view, rx.pview
        self.hdrs = [view[i * seg : i * seg + REC_HDR] for i in range(n)]
        self.sealed = [view[i * seg + REC_HDR : (i + 1) * seg] for i in range(n)]
        self.plain = [pview[i * slot : (i + 1) * slot] for i in range(n)]
        self.pieces = [pview[i * slot + INNER_LEN : (i + 1) * slot] for i in range(n)]


# Our segment size and up to 3 peers' (_RxBuf.MAX_LAYOUTS), two header kinds, counts to ~130.
@functools.lru_cache(maxsize=1024)
def _strided(one: struct.Struct, stride: int, count: int) -> struct.Struct:
    """COUNT copies of ONE, STRIDE bytes apart: one call packs or unpacks them all (packing
    zeroes the bytes between them)."""
    fmt = one.format.lstrip(">")
    return struct.Struct(">" + f"{fmt}{stride - one.size}x" * (count - 1) + fmt)


def _mac(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", "").replace("-", ""))
    if len(raw) != 6:
        raise ValueError(f"bad MAC {text!r}")
    return raw


def record_payload(underlay_mtu: int, ipv6: bool = False) -> int:
    """Bytes of the (vnet header | frame) stream one record carries."""
    return underlay_mtu - (IPV6_UDP if ipv6 else IPV4_UDP) - RECORD_OVERHEAD


def encrypted_overlay_mtu(underlay_mtu: int, ipv6: bool = False) -> int:
    """The overlay MTU at which a full-sized non-GSO packet still fits one record."""
    return record_payload(underlay_mtu, ipv6) - VNET_HDR_LEN - ETH_HDR


def records_per_send(underlay_mtu: int, ipv6: bool = False) -> int:
    """Full records one UDP_SEGMENT sendmsg carries."""
    seg = record_payload(underlay_mtu, ipv6) + RECORD_OVERHEAD
    return min(GSO_MAX_SEGS, GSO_MAX_BYTES // seg)


def frame_gso_max(underlay_mtu: int, ipv6: bool = False) -> int:
    """The gso_max_size of an endpoint's interface on an encrypted network: the largest frame
    (Ethernet header on, as the kernel counts it) whose records fit one UDP_SEGMENT send. A
    64 KB super-frame needs 46 records at MTU 1500 and one send holds 44, so an uncapped one
    costs two sends and, on the far side, two receives glued back together (capped: +14%
    throughput, measured with bench/encdp_micro.py)."""
    return records_per_send(underlay_mtu, ipv6) * record_payload(underlay_mtu, ipv6) - VNET_HDR_LEN


class EncryptedDatapath:
    def __init__(
        self,
        local_ip: str,
        port: int = DEFAULT_PORT,
        underlay_mtu: int | None = None,
        netns: str | None = None,
        *,
        udp_gso: bool | None = None,
        udp_gro: bool | None = None,
        busy_poll_us: int = DEFAULT_BUSY_POLL_US,
    ) -> None:
        """UDP_GSO / UDP_GRO: None probes the kernel at start; False never uses them.
        BUSY_POLL_US: how long the pump keeps polling (yielding the CPU between polls) after
        the last packet before it sleeps; 0 sleeps at once."""
        self._spin_s = busy_poll_us / 1e6
        self.local_ip = str(ipaddress.ip_address(local_ip))
        self._ipv6 = ipaddress.ip_address(local_ip).version == 6
        self.port = port
        self.netns = netns
        self._underlay_mtu = underlay_mtu
        self._want_gso = udp_gso
        self._want_gro = udp_gro
        self.gso = False
        self.gro = False
        self.on_handshake: Callable[[bytes, tuple[str, int]], None] | None = None
        self.on_first_inbound: Callable[[str, int], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._ctl: LinkControl | None = None
        self._nets: dict[int, _Net] = {}
        self._nets_by_fd: dict[int, _Net] = {}
        self._peers: dict[str, _Peer] = {}
        self._inbound: dict[str, dict[int, InboundSA]] = {}
        self._by_spi: dict[int, tuple[_Peer, InboundSA]] = {}
        self._queued: set[_Peer] = set()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._ep: select.epoll | None = None
        self._wake = -1
        self._fid = 0
        self._pending_hs = 0
        self.counters = {
            "unknown_spi": 0, "malformed": 0, "handshakes_in": 0, "handshakes_dropped": 0,
            "send_errors": 0, "reassembly_dropped": 0, "gso_fallbacks": 0,
            "keepalives_in": 0, "keepalives_out": 0,
        }  # fmt: skip
        self._keepalives: deque[str] = deque(maxlen=MAX_PENDING_KEEPALIVES)
        self.mtu = underlay_mtu or DEFAULT_UNDERLAY_MTU
        self.payload = record_payload(self.mtu, self._ipv6)
        self.seg = self.payload + RECORD_OVERHEAD

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._open)
        self._thread = threading.Thread(target=self._pump, name="encdp", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        fam = socket.AF_INET6 if self._ipv6 else socket.AF_INET
        self._ctl = LinkControl(self.netns)
        try:
            if self._underlay_mtu is None and not self._ipv6:
                self.mtu = self._ctl.mtu_of_address(self.local_ip) or DEFAULT_UNDERLAY_MTU
            self.payload = record_payload(self.mtu, self._ipv6)
            if self.payload < MIN_RECORD_PAYLOAD:
                raise ValueError(f"underlay MTU {self.mtu} is too small")
            self.seg = self.payload + RECORD_OVERHEAD
            sock = nsfd.open_socket_in_netns(
                self.netns, fam, socket.SOCK_DGRAM, (self.local_ip, self.port)
            )
        except BaseException:
            self._ctl.close()
            self._ctl = None
            raise
        self._sock = sock
        sock.setblocking(False)
        if not self._ipv6:
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
        for opt, force in ((socket.SO_SNDBUF, 32), (socket.SO_RCVBUF, 33)):  # *BUFFORCE
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, SOCK_BUF)
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        self.gso = self._want_gso is not False and _probe(sock, UDP_SEGMENT, self.seg)
        self.gro = self._want_gro is not False and _probe(sock, UDP_GRO, 1)
        self._ep = select.epoll()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK)
        self._ep.register(self._wake, select.EPOLLIN)
        self._ep.register(sock.fileno(), select.EPOLLIN)

    async def close(self) -> None:
        self._stopping = True
        self._wake_pump()
        t, self._thread = self._thread, None
        if t is not None:
            await asyncio.to_thread(t.join, 5.0)
        for vni in list(self._nets):
            self.remove_network(vni)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None
        if self._ep is not None:
            self._ep.close()
            self._ep = None
        if self._wake >= 0:
            os.close(self._wake)
            self._wake = -1

    # ------------------------------------------------------------ control API

    def add_network(self, vni: int, bridge: str, mtu: int) -> str:
        """Create the TAP of VNI on BRIDGE (which must exist) with MTU; return its name."""
        if self._ctl is None or self._ep is None:
            raise RuntimeError("start() first")
        if vni in self._nets:
            return self._nets[vni].tap.name
        name = f"mnet-{vni:06x}"
        tap = open_tap(name, self.netns)
        try:
            self._ctl.set_mtu(name, mtu)
            self._ctl.add_to_bridge(bridge, name)
            self._ctl.set_up(name)
        except BaseException:
            tap.close()
            raise
        net = _Net(vni, tap, bridge)
        self._nets = {**self._nets, vni: net}
        self._nets_by_fd = {**self._nets_by_fd, tap.fd: net}
        self._ep.register(tap.fd, select.EPOLLIN)
        return name

    def remove_network(self, vni: int) -> None:
        net = self._nets.get(vni)
        if net is None:
            return
        self._nets = {k: v for k, v in self._nets.items() if k != vni}
        self._nets_by_fd = {k: v for k, v in self._nets_by_fd.items() if v is not net}
        with net.lock:
            net.closed = True
            if self._ep is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._ep.unregister(net.tap.fd)
            net.tap.close()  # the device goes with its last file descriptor

    def set_macs(self, vni: int, mac_to_peer: Mapping[str, str]) -> None:
        net = self._nets[vni]
        macs: dict[bytes, _Peer | None] = {}
        for mac, ip in mac_to_peer.items():
            ip = str(ipaddress.ip_address(ip))
            macs[_mac(mac)] = None if ip == self.local_ip else self._peer(ip)
        net.macs = macs

    def set_arp(self, vni: int, ip_to_mac: Mapping[str, str]) -> None:
        net = self._nets[vni]
        net.arp = {ipaddress.IPv4Address(ip).packed: _mac(m) for ip, m in ip_to_mac.items()}

    def set_outbound(self, peer_ip: str, sa: OutboundSA | None) -> None:
        p = self._peer(str(ipaddress.ip_address(peer_ip)))
        old = p.out
        if sa is not None and old is not None and sa.spi != old.spi:
            p.rekeys += 1
        if sa is not old:
            p.out_since = time.monotonic()
        p.out = sa
        if sa is not None and p.queue:
            self._wake_pump()

    def set_inbound(self, peer_ip: str, sas: Mapping[int, InboundSA]) -> None:
        ip = str(ipaddress.ip_address(peer_ip))
        p = self._peer(ip)
        for spi, sa in sas.items():
            if spi != sa.spi:
                raise ValueError(f"SPI {spi} maps to an SA with SPI {sa.spi}")
        inbound = {**self._inbound, ip: dict(sas)}
        by_spi: dict[int, tuple[_Peer, InboundSA]] = {}
        for pip, m in inbound.items():
            for spi, sa in m.items():
                if spi in by_spi:
                    raise ValueError(f"SPI {spi:#x} is in use by {by_spi[spi][0].ip}")
                by_spi[spi] = (self._peers[pip] if pip != ip else p, sa)
        self._inbound = inbound
        self._by_spi = by_spi

    def send_keepalive(self, peer_ip: str) -> None:
        """Seal one empty record to PEER_IP on its outbound SA (soon, on the pump thread, which
        alone hands out sequence numbers): the responder of a handshake takes it as proof that
        we have the new keys. Nothing is sent if there is no usable outbound SA."""
        self._keepalives.append(str(ipaddress.ip_address(peer_ip)))
        self._wake_pump()

    def send_handshake(self, data: bytes, addr: tuple[str, int]) -> None:
        """Send a handshake datagram (it must start with SPI 0) to ADDR; dropped if the
        socket's buffer is full (the handshake retries)."""
        if data[:4] != _ZERO_SPI:
            raise ValueError("a handshake datagram starts with SPI 0")
        if self._sock is None:
            raise RuntimeError("start() first")
        try:
            self._sock.sendto(data, addr)
        except OSError:
            self.counters["send_errors"] += 1

    def stats(self) -> dict[str, dict[str, object]]:
        now = time.monotonic()
        out: dict[str, dict[str, object]] = {}
        for ip, p in list(self._peers.items()):
            sa = p.out
            out[ip] = {
                "spi": sa.spi if sa is not None else None,
                "seq": sa.seq if sa is not None else None,
                "inbound_spis": sorted(self._inbound.get(ip, {})),
                "age": round(now - p.out_since, 3) if sa is not None else None,
                "packets": p.tx_packets + p.rx_packets,
                "bytes": p.tx_bytes + p.rx_bytes,
                "tx_packets": p.tx_packets,
                "tx_bytes": p.tx_bytes,
                "rx_packets": p.rx_packets,
                "rx_bytes": p.rx_bytes,
                "rekeys": p.rekeys,
                "queued": len(p.queue),
                "drops": dict(p.drops),
            }
        return out

    def frame_gso_max(self) -> int:
        """What an endpoint's interface on our networks should have as gso_max_size."""
        return frame_gso_max(self.mtu, self._ipv6)

    def network_stats(self) -> dict[str, object]:
        """Counters not tied to a peer: per network, and for the socket."""
        return {
            "gso": self.gso,
            "gro": self.gro,
            "underlay_mtu": self.mtu,
            "max_datagram": self.seg + (IPV6_UDP if self._ipv6 else IPV4_UDP),
            "networks": {
                vni: {"tap": n.tap.name, **n.counters} for vni, n in list(self._nets.items())
            },
            **self.counters,
        }

    def _peer(self, ip: str) -> _Peer:
        p = self._peers.get(ip)
        if p is None:
            p = _Peer(ip, self.port)
            self._peers = {**self._peers, ip: p}
        return p

    def _wake_pump(self) -> None:
        if self._wake >= 0:
            with contextlib.suppress(OSError):
                os.eventfd_write(self._wake, 1)

    # ------------------------------------------------------------ the pump thread

    def _pump(self) -> None:
        """One thread for both directions: epoll over the socket, the TAPs and the wake-up
        eventfd; each ready source gets a budget of records before the others get a turn."""
        ep, sock = self._ep, self._sock
        assert ep is not None and sock is not None
        sockfd = sock.fileno()
        tx = _TxBuf(self.payload, self.seg)
        rx = _RxBuf(self.seg)
        asm: dict[tuple[int, int], _Asm] = {}
        spin = self._spin_s
        clock = time.perf_counter
        active = clock()
        while not self._stopping:
            try:
                events = ep.poll(0)
                if not events:
                    # Busy-poll a little after the last event: waking a sleeping thread costs
                    # 100-300 us on a VM (an IPI per hop), four hops per round trip.
                    if clock() - active < spin:
                        os.sched_yield()
                        continue
                    events = ep.poll(POLL_S)
            except InterruptedError:
                continue
            active = clock()
            for fd, _ in events:
                if fd == sockfd:
                    self._rx_batch(sock, rx, asm)
                elif fd == self._wake:
                    with contextlib.suppress(OSError):
                        os.eventfd_read(fd)
                else:
                    net = self._nets_by_fd.get(fd)
                    if net is not None:
                        self._tx_batch(net, tx)
            if self._queued:
                self._service_queues(tx)
            while self._keepalives:
                self._send_keepalive(self._keepalives.popleft())

    def _tx_batch(self, net: _Net, tx: _TxBuf) -> None:
        fd = net.tap.fd
        for _ in range(TAP_BATCH):
            with net.lock:
                if net.closed:
                    return
                try:
                    n = os.readv(fd, tx.into)
                except BlockingIOError:
                    return
                except OSError:
                    net.counters["tap_errors"] += 1
                    return
            self._tx_frame(net, n, tx)

    def _tx_frame(self, net: _Net, n: int, tx: _TxBuf) -> None:
        eth = INNER_LEN + VNET_HDR_LEN  # the frame starts in slot 0, after the vnet header
        if n < VNET_HDR_LEN + ETH_HDR:
            return
        buf = tx.buf
        if buf[eth] & 1:
            self._tx_multicast(net, buf, eth, n - VNET_HDR_LEN)
            return
        dst = bytes(buf[eth : eth + 6])
        try:
            peer = net.macs[dst]
        except KeyError:
            net.counters["unknown_mac"] += 1
            return
        if peer is None:
            return  # a local endpoint; the bridge delivers it
        sa = peer.out
        if sa is None:
            self._enqueue(peer, net.vni, tx.frame(n))
            return
        self._seal_send(peer, sa, net.vni, n, tx)
        net.counters["tx_frames"] += 1

    def _seal_send(self, peer: _Peer, sa: OutboundSA, vni: int, n: int, tx: _TxBuf) -> None:
        """Seal the n-byte (vnet header | frame) in TX's slots as records and send them."""
        P = self.payload
        count = -(-n // P)
        seq = sa.seq
        if (sa.expires_at is not None and time.monotonic() > sa.expires_at) or (
            seq + count - 1 > sa.max_seq
        ):
            peer.drops["expired"] += 1
            return
        sa.seq = seq + count
        self._fid = fid = (self._fid + 1) & 0xFFFFFFFF
        _drain(map(INNER.pack_into, repeat(tx.buf, count), tx.inner_at[:count],
                   repeat(VXLAN_FLAGS), repeat(vni << 8), repeat(fid), range(count),
                   repeat(count)))  # fmt: skip
        heads = [sa.spi] * (2 * count)
        heads[1::2] = range(seq, seq + count)
        _strided(SPI_SEQ, self.seg, count).pack_into(tx.out, 0, *heads)  # zeroes between: first
        # Record header (SPI | seq) = nonce = AAD. All records but the last are full.
        full = count - 1
        hdrs = tx.hdrs[:full]
        enc = sa.aead.encrypt_into
        _drain(map(enc, hdrs, tx.plain[:full], hdrs, tx.sealed[:full]))
        last = INNER_LEN + n - full * P
        start = full * self.seg + REC_HDR
        end = start + last + TAG_LEN
        hdr = tx.hdrs[full]
        enc(hdr, tx.plain[full][:last], hdr, tx.oview[start:end])
        peer.tx_packets += count
        peer.tx_bytes += end
        self._send(peer.addr, tx.oview, end, count, self.seg)

    def _send(
        self, addr: tuple[str, int], sview: memoryview, total: int, count: int, seg: int
    ) -> None:
        sock = self._sock
        assert sock is not None
        if self.gso and count > 1:
            per = min(GSO_MAX_SEGS, GSO_MAX_BYTES // seg)  # records_per_send
            step = per * seg
            cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", seg))]
            off = 0
            while off < total:
                chunk = sview[off : min(off + step, total)]
                if len(chunk) <= seg:
                    ok = self._send_one(sock, addr, chunk, None)
                else:
                    ok = self._send_one(sock, addr, chunk, cmsg)
                if ok is None:  # GSO refused: fall back for good and resend the rest
                    self.gso = False
                    self.counters["gso_fallbacks"] += 1
                    break
                off += step
            else:
                return
            start = off
        else:
            start = 0
        for off in range(start, total, seg):
            self._send_one(sock, addr, sview[off : min(off + seg, total)], None)

    def _send_one(
        self,
        sock: socket.socket,
        addr: tuple[str, int],
        data: memoryview,
        cmsg: list[tuple[int, int, bytes]] | None,
    ) -> bool | None:
        """True sent, False dropped (counted), None: the kernel refused UDP_SEGMENT."""
        for attempt in range(2):
            try:
                if cmsg is None:
                    sock.sendto(data, addr)
                else:
                    sock.sendmsg([data], cmsg, 0, addr)
                return True
            except BlockingIOError:
                if attempt == 0:
                    select.select([], [sock], [], SEND_RETRY_S)
            except OSError as e:
                if cmsg is not None and e.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT):
                    return None
                break
        self.counters["send_errors"] += 1
        return False

    def _send_keepalive(self, ip: str) -> None:
        peer = self._peers.get(ip)
        sa = peer.out if peer is not None else None
        if peer is None or sa is None or self._sock is None:
            return
        seq = sa.seq
        if seq > sa.max_seq or (sa.expires_at is not None and time.monotonic() > sa.expires_at):
            return
        sa.seq = seq + 1
        header = SPI_SEQ.pack(sa.spi, seq)
        record = header + sa.aead.encrypt(header, INNER.pack(VXLAN_FLAGS, 0, 0, 0, 0), header)
        peer.tx_packets += 1
        peer.tx_bytes += len(record)
        self.counters["keepalives_out"] += 1
        self._send_one(self._sock, peer.addr, memoryview(record), None)

    def _enqueue(self, peer: _Peer, vni: int, frame: bytes) -> None:
        if len(peer.queue) >= QUEUE_FRAMES:
            peer.drops["queue_full"] += 1
            return
        peer.queue.append((time.monotonic(), vni, frame))
        self._queued.add(peer)

    def _service_queues(self, tx: _TxBuf) -> None:
        now = time.monotonic()
        for peer in list(self._queued):
            q = peer.queue
            while q and now - q[0][0] > QUEUE_AGE_S:
                q.popleft()
                peer.drops["no_sa"] += 1
            sa = peer.out
            while q and sa is not None:
                _, vni, frame = q.popleft()
                tx.load(frame)
                self._seal_send(peer, sa, vni, len(frame), tx)
            if not q:
                self._queued.discard(peer)

    def _tx_multicast(self, net: _Net, buf: bytearray, eth: int, n: int) -> None:
        """Broadcast and multicast never flood: ARP requests are answered from the table."""
        if n >= ETH_HDR + _ARP.size and buf[eth + 12 : eth + 14] == b"\x08\x06":
            htype, ptype, hlen, plen, op, sha, spa, _, tpa = _ARP.unpack_from(buf, eth + 14)
            if (htype, ptype, hlen, plen, op) == (1, 0x0800, 6, 4, 1):
                mac = net.arp.get(tpa)
                if mac is not None:
                    reply = (
                        _VNET_NONE + sha + mac + b"\x08\x06"
                        + _ARP.pack(1, 0x0800, 6, 4, 2, mac, tpa, sha, spa)
                    )  # fmt: skip
                    with net.lock:
                        if not net.closed:
                            try:
                                os.write(net.tap.fd, reply)
                                net.counters["arp_replies"] += 1
                            except OSError:
                                net.counters["tap_errors"] += 1
                    return
        net.counters["multicast"] += 1

    # ------------------------------------------------------------ receive side

    def _rx_batch(self, sock: socket.socket, rx: _RxBuf, asm: dict[tuple[int, int], _Asm]) -> None:
        recv = sock.recvmsg_into
        anc = socket.CMSG_SPACE(4)
        bufs = [rx.buf]
        records = 0
        while records < RX_BUDGET:
            try:
                n, ancdata, _, addr = recv(bufs, anc)
            except OSError:  # BlockingIOError: drained
                return
            seg = n
            for level, kind, data in ancdata:
                if level == SOL_UDP and kind == UDP_GRO and len(data) >= 4:
                    seg = int.from_bytes(data[:4], sys.byteorder) or n
            records += self._rx_run(rx, n, seg, addr, asm)

    def _rx_run(
        self, rx: _RxBuf, n: int, seg: int, addr: tuple[str, int], asm: dict[tuple[int, int], _Asm]
    ) -> int:
        """Open the records of one receive (GRO: a run of SEG-byte records from ADDR, the last
        one maybe shorter); return how many there were."""
        if n <= 0 or seg <= 0:  # UDP allows an empty datagram
            self.counters["malformed"] += 1
            return 1
        count = -(-n // seg)
        if count > 1 and self._rx_burst(rx, n, seg, count, asm):
            return count
        return self._rx_each(rx.view, rx.buf, n, seg, addr, asm)

    def _rx_burst(
        self, rx: _RxBuf, n: int, seg: int, count: int, asm: dict[tuple[int, int], _Asm]
    ) -> bool:
        """The common case in one pass per step: COUNT records of one SA with consecutive
        sequence numbers, all above its window (one GSO burst). Anything else, or any tag that
        fails, returns False with nothing changed, and the caller opens the records one by one
        (so every drop is counted by the one reference path)."""
        last_len = n - (count - 1) * seg
        lay = rx.layout(seg)
        # A last record with no payload after the inner header is a keepalive to the reference
        # path, never an empty last piece of a frame: leave it to that path.
        if last_len <= REC_HDR + INNER_LEN + TAG_LEN or lay is None:
            return False
        heads = _strided(SPI_SEQ, seg, count).unpack_from(rx.buf)
        spi, first = heads[0], heads[1]
        if heads[0::2].count(spi) != count or heads[1::2] != tuple(range(first, first + count)):
            return False
        ent = self._by_spi.get(spi)
        if ent is None:
            return False
        peer, sa = ent
        window = sa.window
        if (sa.expires_at is not None and time.monotonic() > sa.expires_at) or not (
            first > window.top and window.check(first + count - 1)
        ):
            return False
        hdrs = lay.hdrs[:count]
        sealed = lay.sealed[:count]
        plain = lay.plain[:count]
        sealed[-1] = sealed[-1][: last_len - REC_HDR]
        last_plain = last_len - REC_HDR - TAG_LEN
        plain[-1] = plain[-1][:last_plain]
        try:
            _drain(map(sa.aead.decrypt_into, hdrs, sealed, hdrs, plain))
        except InvalidTag:
            return False
        window.update_run(first, count)
        peer.rx_packets += count
        peer.rx_bytes += n
        if not sa.seen:
            sa.seen = True
            self._call_soon(self.on_first_inbound, peer.ip, spi)
        self._rx_pieces(rx, lay, count, last_plain, spi, asm)
        return True

    def _rx_pieces(
        self,
        rx: _RxBuf,
        lay: _Layout,
        m: int,
        last_plain: int,
        spi: int,
        asm: dict[tuple[int, int], _Asm],
    ) -> None:
        """The M plaintexts of a burst, in LAY's slots (the last one LAST_PLAIN bytes long):
        consecutive pieces of one frame (the common case) go in at once; anything else, one by
        one."""
        inners = _strided(INNER, lay.slot, m).unpack_from(rx.pbuf)
        flags, vni8, fid, idx, count = inners[:5]
        net = self._nets.get(vni8 >> 8)
        if (
            net is not None
            and flags == VXLAN_FLAGS
            and idx + m <= count
            and inners[0::5].count(flags) == m
            and inners[1::5].count(vni8) == m
            and inners[2::5].count(fid) == m
            and inners[3::5] == tuple(range(idx, idx + m))
            and inners[4::5].count(count) == m
        ):
            pieces: list[memoryview] = lay.pieces[:m]
            pieces[-1] = pieces[-1][: last_plain - INNER_LEN]
            if m == count:
                self._tap_write(net, pieces)
                return
            # Part of a frame: keep copies, the buffers are the next receive's.
            pieces = [memoryview(bytes(p)) for p in pieces]
            key = (spi, fid)
            st = asm.get(key) or self._asm_start(asm, key, count)
            if len(st.pieces) == count and st.pieces[idx : idx + m].count(None) == m:
                st.pieces[idx : idx + m] = pieces
                st.missing -= m
                if not st.missing:
                    del asm[key]
                    self._tap_write(net, st.pieces)  # type: ignore[arg-type]  # all filled
                return
        for i, slot in enumerate(lay.plain[:m]):
            self._rx_plaintext(bytes(slot[: last_plain if i == m - 1 else lay.slot]), spi, asm)

    def _asm_start(
        self, asm: dict[tuple[int, int], _Asm], key: tuple[int, int], count: int
    ) -> _Asm:
        if len(asm) >= MAX_REASSEMBLY:
            del asm[next(iter(asm))]
            self.counters["reassembly_dropped"] += 1
        st = asm[key] = _Asm(count)
        return st

    def _rx_each(
        self,
        view: memoryview,
        buf: bytearray,
        n: int,
        seg: int,
        addr: tuple[str, int],
        asm: dict[tuple[int, int], _Asm],
    ) -> int:
        """Open the records of one receive one by one. The SA, its expiry and its window are
        looked up once per run of one SPI, not per record."""
        by_spi = self._by_spi
        unpack_hdr = SPI_SEQ.unpack_from
        now = time.monotonic()
        cur = -1  # the SPI whose lookups below are valid
        peer: _Peer | None = None
        sa: InboundSA | None = None
        count = 0
        off = 0
        while off < n:
            start = off
            off = end = min(start + seg, n)
            count += 1
            if end - start < REC_HDR + INNER_LEN + TAG_LEN:
                if end - start >= 4 and buf[start : start + 4] == _ZERO_SPI:
                    self._handshake(bytes(view[start:end]), addr)
                else:
                    self.counters["malformed"] += 1
                continue
            spi, seq = unpack_hdr(buf, start)
            if spi != cur:
                if spi == 0:
                    self._handshake(bytes(view[start:end]), addr)
                    continue
                ent = by_spi.get(spi)
                if ent is None:
                    p = self._peers.get(addr[0])
                    if p is not None:
                        p.drops["unknown_spi"] += 1
                    else:
                        self.counters["unknown_spi"] += 1
                    continue
                peer, sa = ent
                if sa.expires_at is not None and now > sa.expires_at:
                    peer.drops["expired"] += 1
                    continue
                cur = spi
            assert peer is not None and sa is not None
            window = sa.window
            if not window.check(seq):
                peer.drops["replay"] += 1
                continue
            hdr = view[start : start + REC_HDR]
            try:
                pt = sa.aead.decrypt(hdr, view[start + REC_HDR : end], hdr)
            except InvalidTag:
                peer.drops["auth"] += 1
                continue
            if not window.update(seq):
                peer.drops["replay"] += 1
                continue
            peer.rx_packets += 1
            peer.rx_bytes += end - start
            if not sa.seen:
                sa.seen = True
                self._call_soon(self.on_first_inbound, peer.ip, spi)
            self._rx_plaintext(pt, spi, asm)
        return count

    def _rx_plaintext(self, pt: bytes, spi: int, asm: dict[tuple[int, int], _Asm]) -> None:
        """An authentic record's plaintext: a keepalive, a whole frame, or one piece of one."""
        if len(pt) == INNER_LEN:  # a keepalive: it confirmed the SA, it carries nothing
            self.counters["keepalives_in"] += 1
            return
        flags, vni8, fid, idx, count = INNER.unpack_from(pt)
        net = self._nets.get(vni8 >> 8)
        if flags != VXLAN_FLAGS or net is None or idx >= count:
            self.counters["malformed"] += 1
            return
        piece = memoryview(pt)[INNER_LEN:]
        if count == 1:
            self._tap_write(net, [piece])
            return
        key = (spi, fid)
        st = asm.get(key) or self._asm_start(asm, key, count)
        pieces = st.pieces
        if len(pieces) != count or pieces[idx] is not None:
            del asm[key]
            self.counters["malformed"] += 1
            return
        pieces[idx] = piece
        st.missing -= 1
        if not st.missing:
            del asm[key]
            self._tap_write(net, pieces)  # type: ignore[arg-type]  # all filled

    def _tap_write(self, net: _Net, pieces: list[memoryview]) -> None:
        with net.lock:
            if net.closed:
                return
            try:
                os.writev(net.tap.fd, pieces)
            except OSError:
                net.counters["tap_errors"] += 1
                return
        net.counters["rx_frames"] += 1

    def _handshake(self, data: bytes, addr: tuple[str, int]) -> None:
        self.counters["handshakes_in"] += 1
        if self._pending_hs >= MAX_PENDING_HANDSHAKES or self._loop is None:
            self.counters["handshakes_dropped"] += 1
            return
        self._pending_hs += 1
        try:
            self._loop.call_soon_threadsafe(self._deliver_handshake, data, addr)
        except RuntimeError:  # the loop is closed
            self._pending_hs -= 1

    def _deliver_handshake(self, data: bytes, addr: tuple[str, int]) -> None:
        self._pending_hs -= 1
        if self.on_handshake is not None:
            self.on_handshake(data, (str(addr[0]), int(addr[1])))

    def _call_soon(self, cb: Callable[[str, int], None] | None, ip: str, spi: int) -> None:
        if cb is None or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(cb, ip, spi)


def _probe(sock: socket.socket, opt: int, value: int) -> bool:
    """Does the kernel know UDP socket option OPT (UDP_SEGMENT, UDP_GRO)?"""
    try:
        sock.setsockopt(SOL_UDP, opt, value)
    except OSError:
        return False
    if opt == UDP_SEGMENT:
        sock.setsockopt(SOL_UDP, opt, 0)  # per-call cmsg only; no socket-wide segmenting
    return True
