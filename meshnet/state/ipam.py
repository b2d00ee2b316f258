"""IPAM without consensus: hash-then-probe, then confirm with every member; the loser re-picks.

An allocation is a *claim*: an endpoint entry written with ``pending`` set, whose address is
free in the claimant's view (no entry of any owner, live or not, holds it: a dead owner's
addresses stay taken until it is reaped, so a host that comes back after a blip finds its
addresses still its own). The claimant then sends the claim to every alive member, each of
which applies it and answers with any competing claim it holds for the same address. Claims
are ordered by (HLC, writer): the smaller wins; a loser picks again. Only then is the endpoint
used (pending cleared), so two live endpoints never share an address among members that can
reach each other:

  A writes X then asks B; B writes Y then asks A. If A's question reaches B before B wrote Y,
  B already held X, so B never picked that address. Otherwise B answers with Y. The same holds
  the other way round, so whenever both claims exist each claimant sees the other's, and the
  shared order picks exactly one winner.

Pure: the agent moves the claims and answers.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable

from meshnet.state.types import Entry


class IpamExhausted(Exception):
    pass


def claim_order(entry: Entry) -> tuple[int, str]:
    return (entry.hlc.pack(), entry.writer)


def pick_address(subnet: str, taken: Iterable[str], seed: str) -> str:
    """The first free host address at or after hash(seed), wrapping; the first host address is
    kept for a gateway, as Docker does. Raises IpamExhausted with a clear message."""
    net = ipaddress.IPv4Network(subnet)
    first = int(net.network_address) + 2  # .0 is the network, .1 the gateway
    last = int(net.broadcast_address) - 1
    size = last - first + 1
    if size <= 0:
        raise IpamExhausted(f"subnet {subnet} has no assignable addresses")
    used = {int(ipaddress.IPv4Address(ip)) for ip in taken}
    start = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big") % size
    for i in range(size):
        candidate = first + (start + i) % size
        if candidate not in used:
            return str(ipaddress.IPv4Address(candidate))
    raise IpamExhausted(f"no free address left in {subnet} ({size} in use); "
                        "remove endpoints or use a larger subnet")


def beaten_by(mine: Entry, others: Iterable[Entry]) -> Entry | None:
    """The best competing claim that beats mine, if any."""
    best = None
    for other in others:
        if other.key == mine.key:
            continue
        if claim_order(other) < claim_order(mine) and (
                best is None or claim_order(other) < claim_order(best)):
            best = other
    return best
