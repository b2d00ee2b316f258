"""Network definitions without consensus: VNIs by hashing, subnets from a pool.

VNI: sha256(name) folded into [4096, 2^24) (VNIs below 4096 are left free, as Docker does).
Two networks whose hashes collide are resolved the same way on every agent: the one created
first (its entry's HLC, then writer) keeps the hashed VNI, later ones probe upward. Every agent
holds the same entries, so every agent computes the same VNIs.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable

VNI_MIN = 4096
VNI_LIMIT = 1 << 24
DEFAULT_POOL = "10.10.0.0/16"
DEFAULT_PREFIX = 24
# Overlay subnets: a /29 leaves 5 task addresses (the first host address is kept for a gateway);
# below /8 an overlay would be larger than any address plan needs, and IPAM's probe is linear in
# the free space it has to walk.
MIN_SUBNET_PREFIX = 8
MAX_SUBNET_PREFIX = 29
# One DNS label of ASCII letters, digits, - and _ (str.isalnum() would accept any script's
# letters and digits; fullmatch, never `$`, which also matches before a final newline).
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
# Names that would capture public DNS names inside the mesh (the resolver answers single
# labels and `<x>.<network>` itself), so no network or service may take them.
RESERVED_NAMES = frozenset({"com", "net", "org", "io", "arpa", "local", "localhost", "meshnet",
                            "internal", "tasks", "edu", "gov", "dev", "app"})


class NetworkError(ValueError):
    pass


def vni_hash(name: str) -> int:
    digest = hashlib.sha256(b"meshnet-vni\0" + name.encode()).digest()
    return VNI_MIN + int.from_bytes(digest[:8], "big") % (VNI_LIMIT - VNI_MIN)


def assign_vnis(networks: Iterable[tuple[str, tuple[int, str]]]) -> dict[str, int]:
    """networks: (name, creation order key). Returns name -> VNI, collisions resolved."""
    taken: set[int] = set()
    out: dict[str, int] = {}
    for name, _order in sorted(networks, key=lambda n: (n[1], n[0])):
        vni = vni_hash(name)
        while vni in taken:
            vni = VNI_MIN + (vni + 1 - VNI_MIN) % (VNI_LIMIT - VNI_MIN)
        taken.add(vni)
        out[name] = vni
    return out


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """An overlay subnet as `network create --subnet` takes it (and as a replicated network
    must carry it): an IPv4 network, host bits clear, /8../29, not loopback, multicast,
    reserved or 0.0.0.0/8."""
    if not isinstance(text, str) or len(text) > 64:
        raise NetworkError("--subnet must be an IPv4 network like 10.1.0.0/24")
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise NetworkError(f"--subnet {text!r}: {e}") from None
    if net.prefixlen > MAX_SUBNET_PREFIX:
        raise NetworkError(f"--subnet {text}: too small (at most /{MAX_SUBNET_PREFIX})")
    if net.prefixlen < MIN_SUBNET_PREFIX:
        raise NetworkError(f"--subnet {text}: too large (at least /{MIN_SUBNET_PREFIX})")
    addr = net.network_address
    if addr.is_loopback or addr.is_multicast or addr.is_reserved or \
            net.overlaps(_THIS_NETWORK):
        raise NetworkError(f"--subnet {text}: not a usable unicast range")
    return net


_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")


def check_overlap(subnet: ipaddress.IPv4Network,
                  existing: dict[str, ipaddress.IPv4Network]) -> None:
    for name, other in sorted(existing.items()):
        if subnet.overlaps(other):
            raise NetworkError(f"subnet {subnet} overlaps {other} of network {name}")


def pick_subnet(existing: Iterable[ipaddress.IPv4Network], pool: str = DEFAULT_POOL,
                prefix: int = DEFAULT_PREFIX) -> ipaddress.IPv4Network:
    """The first /prefix of the pool that overlaps nothing; a clear error when exhausted."""
    taken = list(existing)
    for candidate in ipaddress.IPv4Network(pool).subnets(new_prefix=prefix):
        if not any(candidate.overlaps(t) for t in taken):
            return candidate
    raise NetworkError(f"the default address pool {pool} has no free /{prefix} left; "
                       "give --subnet explicitly or remove unused networks")


def check_name(kind: str, name: object) -> str:
    """A network, service, sandbox or endpoint name: one DNS label of ASCII letters, digits,
    - and _, starting with a letter or digit, at most 63 long, not a reserved name."""
    if not isinstance(name, str) or not name:
        raise NetworkError(f"{kind} name is required")
    if not NAME_RE.fullmatch(name):
        raise NetworkError(f"{kind} name {name[:80]!r} must be a DNS label: ASCII letters, "
                           "digits, - and _ (at most 63)")
    if name.lower() in RESERVED_NAMES:
        raise NetworkError(f"{kind} name {name!r} is reserved (it would shadow public DNS)")
    return name


def mac_for_ip(ip: str) -> str:
    """Docker's scheme: 02:42 and the IPv4 address, so a MAC never needs allocating."""
    octets = ipaddress.IPv4Address(ip).packed
    return "02:42:" + ":".join(f"{b:02x}" for b in octets)
