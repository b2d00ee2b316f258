"""TAP devices with virtio-net headers and offloads, and the few link ioctls they need.

A TAP opened here is

- IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, with a 10-byte virtio-net header in front of every frame
  (TUNSETVNETHDRSZ), and TUNSETOFFLOAD TUN_F_CSUM | TSO4 | TSO6 (| USO4 | USO6 where the kernel
  has them), so the kernel hands us up to 64 KB GSO super-frames with partial checksums and
  accepts the same back (wireguard-go's tun_linux.go does the same on a TUN);
- not persistent: it disappears when its file descriptor is closed, so a crashed process
  leaves no device behind;
- created in a named network namespace without forking: /dev/net/tun is opened and TUNSETIFF
  issued by a short-lived thread inside the namespace (the device lands in the namespace of
  the opener), see nsfd.call_in_netns.

MTU, up/down and bridge membership are set with plain ioctls (SIOCSIFMTU, SIOCSIFFLAGS,
SIOCBRADDIF) on a datagram socket that lives in the namespace; they are synchronous and take
microseconds, so the agent may call them from its event loop.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

from meshnet.platform import nsfd
from meshnet.platform.nsfd import PlatformError

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40
# struct virtio_net_hdr (no mergeable buffers): flags, gso_type, hdr_len, gso_size,
# csum_start, csum_offset.
VNET_HDR_LEN = 10
VNET_HDR_FMT = "<BBHHHH"
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
# linux/sockios.h
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFADDR = 0x8915
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
SIOCGIFINDEX = 0x8933
SIOCBRADDIF = 0x89A2
IFF_UP = 0x1
IFNAMSIZ = 16
IFREQ_SIZE = 40  # sizeof(struct ifreq) on 64-bit Linux
TUN_PATH = "/dev/net/tun"

BASE_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN


@dataclass
class Tap:
    """An open TAP device; `fd` is non-blocking. close() removes the device."""

    name: str
    fd: int
    offloads: int
    netns: str | None

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)


def _ifreq(name: str, fmt: str = "", *values: int) -> bytearray:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise PlatformError(f"bad interface name {name!r}")
    buf = bytearray(IFREQ_SIZE)
    buf[: len(raw)] = raw
    if fmt:
        struct.pack_into(fmt, buf, IFNAMSIZ, *values)
    return buf


def open_tap(name: str, netns: str | None = None, *, offload: bool = True) -> Tap:
    """Create TAP device NAME in NETNS (None: ours) with a vnet header and offloads."""

    def make() -> tuple[int, int]:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, "H", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            got = 0
            if offload:
                for flags in (BASE_OFFLOADS | TUN_F_USO4 | TUN_F_USO6, BASE_OFFLOADS):
                    try:
                        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
                    except OSError:
                        continue
                    got = flags
                    break
            return fd, got
        except BaseException:
            os.close(fd)
            raise

    try:
        fd, got = nsfd.call_in_netns(netns, make)
    except OSError as e:
        where = f" in netns {netns}" if netns else ""
        raise PlatformError(f"cannot create TAP {name}{where}: {e.strerror or e}") from e
    return Tap(name, fd, got, netns)


class LinkControl:
    """Link ioctls on devices of one namespace, through a datagram socket living there."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self._sock = nsfd.open_socket_in_netns(netns, socket.AF_INET, socket.SOCK_DGRAM)

    def close(self) -> None:
        self._sock.close()

    def _ioctl(self, req: int, buf: bytearray, what: str) -> bytearray:
        try:
            fcntl.ioctl(self._sock.fileno(), req, buf)
        except OSError as e:
            where = f" in netns {self.netns}" if self.netns else ""
            raise PlatformError(f"{what}{where}: {e.strerror or e}") from e
        return buf

    def index(self, name: str) -> int:
        buf = self._ioctl(SIOCGIFINDEX, _ifreq(name), f"no device {name}")
        return int(struct.unpack_from("i", buf, IFNAMSIZ)[0])

    def mtu(self, name: str) -> int:
        buf = self._ioctl(SIOCGIFMTU, _ifreq(name), f"get mtu of {name}")
        return int(struct.unpack_from("i", buf, IFNAMSIZ)[0])

    def set_mtu(self, name: str, mtu: int) -> None:
        self._ioctl(SIOCSIFMTU, _ifreq(name, "i", mtu), f"set mtu {mtu} on {name}")

    def set_up(self, name: str, up: bool = True) -> None:
        buf = self._ioctl(SIOCGIFFLAGS, _ifreq(name), f"get flags of {name}")
        flags = int(struct.unpack_from("H", buf, IFNAMSIZ)[0])
        flags = flags | IFF_UP if up else flags & ~IFF_UP
        self._ioctl(SIOCSIFFLAGS, _ifreq(name, "H", flags), f"set {name} up={up}")

    def add_to_bridge(self, bridge: str, name: str) -> None:
        index = self.index(name)
        self._ioctl(SIOCBRADDIF, _ifreq(bridge, "i", index), f"enslave {name} to {bridge}")

    def mtu_of_address(self, ip: str) -> int | None:
        """MTU of the device holding IPv4 address IP, or None if no device does."""
        want = socket.inet_aton(ip)
        for _, name in nsfd.call_in_netns(self.netns, socket.if_nameindex):
            buf = _ifreq(name, "H", socket.AF_INET)
            try:
                fcntl.ioctl(self._sock.fileno(), SIOCGIFADDR, buf)
            except OSError:
                continue
            if bytes(buf[IFNAMSIZ + 4 : IFNAMSIZ + 8]) == want:
                return self.mtu(name)
        return None
