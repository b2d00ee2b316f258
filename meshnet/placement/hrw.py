"""Weighted rendezvous (HRW) values, and finding each slot's best few nodes without scanning all.

The value of node ``i`` for a slot is ``V = E / w_i`` with ``E`` exponential(1) from a stable hash;
the slot prefers the node with the smallest ``V``. That is the weighted HRW of Schindelhauer and
Schomaker (score ``-w / ln h`` with ``h = exp(-E)`` uniform in (0, 1); the largest score is the
smallest ``V``), so ``P(node i first) = w_i / sum(w)``, and a node's values never depend on which
other nodes exist: removing a node only changes the slots that ranked it first, adding one only
takes the slots that now rank it first.

How ``E`` is drawn (the only thing that differs from hashing ``(service, slot, node)`` per pair):
slots are grouped into fixed *blocks* (:func:`block_of`: slot 1, slots 2-3, 4-7, then blocks of
8) and, per (node, block), the ``B`` values of the block's slots are drawn as one exponential
race (Renyi's representation of the order statistics of ``B`` independent exponential(1)
values): the first arrival comes at ``E_0 / B`` on a uniformly chosen slot, the next at
``+ E_1 / (B - 1)`` on a uniformly chosen remaining slot, and so on. Every ``E`` and every choice
comes from a hash of (node seed, block seed, step), so the values are still independent
exponential(1) per (slot, node) pair and a pure function of (service, slot, node name): the same
weighted HRW, drawn in an order that allows pruning. The first arrival of (node, block) is the
minimum over the block, so "has node i any slot in this block with V < tau?" is one comparison of
the first arrival's hash ``x_i`` against ``(1 - exp(-B * tau * w_i)) * 2**32``, and that
comparison is made for all nodes at once with Python big integers (:class:`Lanes`: one multiply,
two ands and an add over a ``64 * n``-bit integer, about 30 us per thousand nodes). Only the
nodes that pass are walked in Python. Cost: ``O(blocks * n)`` big-integer lane work plus
``O(slots * K)`` Python work (K ~ 4-6 candidates a slot), instead of ``O(slots * n)`` Python work.

A block's candidate list for ``tau`` holds every (V, node) with ``V < tau``, sorted by (V, node
name); raising ``tau`` only appends (the old list is a prefix of the new one), so the placement
deepens a block when one of its slots runs out (:class:`BlockLists`), and the answer never
depends on the ``tau`` chosen. Last level: ``tau = inf``, every eligible node.

Hashes: BLAKE2b for the seeds (of node names, and of (service, block)); then integer arithmetic:
the first arrival's 32-bit hash is ``lane_seed * block_seed mod 2**32`` with both odd (a bijection
of the odd residues, so uniform over them for either seed fixed), the later steps an odd 64-bit
multiply and an xorshift of ``node_seed ^ block_seed ^ step * golden``. Never Python's salted
``hash()``. Floating point: ``math.log1p`` and ``math.expm1`` from the platform's libm, results
compared only with each other; two platforms could only disagree on two values within an ulp of
each other (about 1e-12 per placement), and equal values are ordered by node name.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1
TWO32 = 1 << 32
INV32 = 1.0 / TWO32
MASK24 = (1 << 24) - 1
INV24 = 1.0 / (1 << 24)
_LANE = 8  # bytes per lane: a 32-bit seed times a 32-bit block seed fits in 64 bits
GOLDEN = 0x9E3779B97F4A7C15
MULT = 0xD6E8FEB86659FD93

#: Largest block: slot 1, 2-3, 4-7 are blocks of 1, 2, 4; from slot 8 on, blocks of 8. Larger
#: blocks mean fewer whole-cluster tests but more candidates per slot (every slot of a block needs
#: one, so the least lucky of B slots sets the depth); 8 measured best against 4 and 16.
#: Changing it (or any hash here) reshuffles every cluster on upgrade.
BLOCK_MAX = 8
_BLOCK_MAX_LOG = BLOCK_MAX.bit_length() - 1


def seed64(*parts: str | int) -> int:
    """A stable, odd 64-bit seed of the parts (length-prefixed, so ("ab","c") != ("a","bc"))."""
    h = hashlib.blake2b(digest_size=8, person=b"meshnet-place")
    for p in parts:
        b = p.encode("utf-8") if isinstance(p, str) else p.to_bytes(8, "little", signed=True)
        h.update(len(b).to_bytes(4, "little"))
        h.update(b)
    return int.from_bytes(h.digest(), "little") | 1


def block_of(slot: int) -> tuple[int, int, int]:
    """Slot (1-based) -> (block index, offset in block, block size). Fixed, whatever the replicas,
    so scaling a service never changes an existing slot's values."""
    if slot < BLOCK_MAX:
        k = slot.bit_length() - 1
        return k, slot - (1 << k), 1 << k
    q, r = divmod(slot - BLOCK_MAX, BLOCK_MAX)
    return _BLOCK_MAX_LOG + q, r, BLOCK_MAX


def block_slots(block: int) -> tuple[int, int]:
    """Block index -> (first slot, size)."""
    if block < _BLOCK_MAX_LOG:
        return 1 << block, 1 << block
    return BLOCK_MAX + (block - _BLOCK_MAX_LOG) * BLOCK_MAX, BLOCK_MAX


class Lanes:
    """32-bit lane seeds of ``n`` nodes packed in one integer, 64 bits a node, for whole-cluster
    tests: lane ``i`` of ``packed * b`` is ``seed_i * b`` exactly (both odd and below 2**32)."""

    def __init__(self, seeds: Sequence[int]) -> None:
        n = len(seeds)
        self.n = n
        self.packed = int.from_bytes(
            b"".join(lane_seed(s).to_bytes(_LANE, "little") for s in seeds), "little"
        )
        self.low = int.from_bytes((b"\xff" * 4 + bytes(4)) * n, "little")
        self.guard = int.from_bytes((bytes(4) + b"\x01" + bytes(3)) * n, "little")

    def threshold(self, thresholds: Sequence[int]) -> int:
        """Pack per-node thresholds ``t`` in [0, 2**32] as ``2**32 - t`` for :meth:`below`."""
        return int.from_bytes(
            b"".join((TWO32 - t).to_bytes(_LANE, "little") for t in thresholds), "little"
        )

    def below(self, block_seed: int, packed_threshold: int) -> list[int]:
        """Indices ``i`` with ``first(seed_i, block_seed) < t_i``, for all nodes at once."""
        y = (self.packed * (block_seed & M32)) & self.low
        g = ((y + packed_threshold) & self.guard).to_bytes(self.n * _LANE, "little")[4::_LANE]
        out: list[int] = []
        find = g.find
        i = find(0)
        while i >= 0:
            out.append(i)
            i = find(0, i + 1)
        return out


def lane_seed(node_seed: int) -> int:
    """The odd 32-bit seed a node's lane holds (the high half of its 64-bit seed, made odd)."""
    return (node_seed >> 32) | 1


def first(node_seed: int, block_seed: int) -> int:
    """The 32-bit hash of (node, block) behind the first arrival: odd, uniform over odd values, so
    ``x / 2**32`` is uniform on a grid of step 2**-31 (enough: ties are broken by node name)."""
    return (lane_seed(node_seed) * (block_seed & M32)) & M32


Cand = tuple[float, int]  # (V, node index); node indices follow node-name order


def step(node_seed: int, block_seed: int, m: int) -> int:
    """The 64-bit hash of arrival ``m`` of (node, block): bits 44-63 pick its slot among those left,
    bits 20-43 draw the spacing to the next arrival. (Seeds are already BLAKE2b-random, so one odd
    multiply, a bijection of 64-bit integers, and an xorshift are enough here.)"""
    z = ((node_seed ^ block_seed ^ (m + 1) * GOLDEN) * MULT) & M64
    return z ^ (z >> 29)


def race(
    node_seed: int, block_seed: int, size: int, weight: float, tau: float, used: int,
    lists: list[list[Cand]], node: int,
) -> None:
    """Append (V, node) to ``lists[offset]`` for each slot of the block with V < tau, offset < used.

    Walks the node's exponential race through the block (see the module docstring).
    """
    t = -math.log1p(-first(node_seed, block_seed) * INV32) / size
    lim = tau * weight
    left = list(range(size))
    m = 0
    while t < lim:
        h = step(node_seed, block_seed, m)
        off = left.pop(((h >> 44) * (size - m)) >> 20)
        if off < used:
            lists[off].append((t / weight, node))
        m += 1
        if m == size:
            return
        t -= math.log1p(-(((h >> 20) & MASK24) + 0.5) * INV24) / (size - m)


def value(node_seed: int, block_seed: int, size: int, weight: float, offset: int) -> float:
    """The plain V of one (slot, node) pair: the reference the fast path is tested against."""
    lists: list[list[Cand]] = [[] for _ in range(size)]
    race(node_seed, block_seed, size, weight, math.inf, size, lists, 0)
    return lists[offset][0][0]


class BlockLists:
    """Candidate lists of one block of one service, deepened on demand.

    ``tau`` starts at ``K(B) / W`` (``W`` the eligible weight; ``K`` chosen so that most blocks
    never need a second level) and doubles per level; after ``max_level`` it is infinite.
    """

    __slots__ = ("block_seed", "index", "level", "lists", "size", "used")

    def __init__(self, block_seed: int, size: int, used: int) -> None:
        self.block_seed = block_seed
        self.index = 0
        self.size = size
        self.used = used
        self.level = -1
        self.lists: list[list[Cand]] = []
