"""Consensus-free placement: a pure function from (alive members, service specs) to slot -> node.

Every agent computes the same placement from the same inputs and runs the tasks that fall to it;
there is no leader and no vote. The method is weighted rendezvous (HRW) hashing with bounded
loads (Mirrokni, Thorup and Zadimoghaddam), resolved by deferred acceptance so the answer is a
unique stable matching. :mod:`meshnet.placement.core` states the rules; :mod:`meshnet.placement.hrw`
how each slot's best nodes are found without hashing every (slot, node) pair.

Sans-IO: no asyncio, sockets, clocks or global random; hashes are BLAKE2b and 64-bit integer
mixing, never Python's salted ``hash()``.
"""

from meshnet.placement.core import (
    DEFAULT_BALANCE,
    GLOBAL_SLOTS,
    Placement,
    capacities,
    global_slot,
    place,
)
from meshnet.placement.hrw import BLOCK_MAX, block_of, seed64
from meshnet.placement.spec import (
    GLOBAL,
    REPLICATED,
    Constraint,
    NodeInfo,
    PlacementError,
    ServiceSpec,
    parse_constraint,
)

__all__ = [
    "BLOCK_MAX",
    "DEFAULT_BALANCE",
    "GLOBAL",
    "GLOBAL_SLOTS",
    "REPLICATED",
    "Constraint",
    "NodeInfo",
    "Placement",
    "PlacementError",
    "ServiceSpec",
    "block_of",
    "capacities",
    "global_slot",
    "parse_constraint",
    "place",
    "seed64",
]
