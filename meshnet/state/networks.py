"""Network definitions without consensus: VNIs by hashing, subnets from a pool.

VNI: sha256(name) folded into [4096, 2^24) (VNIs below 4096 are left free, as Docker does).
Two networks whose hashes collide are resolved the same way on every agent: the one created
first (its entry's HLC, then writer) keeps the hashed VNI, later ones probe upward. Every agent
holds the same entries, so every agent computes the same VNIs.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable

VNI_MIN = 4096
VNI_LIMIT = 1 << 24
DEFAULT_POOL = "10.10.0.0/16"
DEFAULT_PREFIX = 24
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
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise NetworkError(f"--subnet {text!r}: {e}") from None
    if net.prefixlen > 29:
        raise NetworkError(f"--subnet {text}: too small (at most /29)")
    return net


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
    if not isinstance(name, str) or not name:
        raise NetworkError(f"{kind} name is required")
    if len(name) > 63 or not all(c.isalnum() or c in "-_" for c in name) or \
            not name[0].isalnum():
        raise NetworkError(f"{kind} name {name!r} must be a DNS label: letters, digits, - and _")
    if name.lower() in RESERVED_NAMES:
        raise NetworkError(f"{kind} name {name!r} is reserved (it would shadow public DNS)")
    return name


def mac_for_ip(ip: str) -> str:
    """Docker's scheme: 02:42 and the IPv4 address, so a MAC never needs allocating."""
    octets = ipaddress.IPv4Address(ip).packed
    return "02:42:" + ":".join(f"{b:02x}" for b in octets)
