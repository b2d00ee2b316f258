"""Hybrid logical clock (Kulkarni et al., "Logical Physical Clocks", 2014).

An ``Hlc`` is an immutable timestamp *and* the clock state that produced it: ``tick`` and
``update`` return the next value, the store keeps the latest one. The physical part is taken
from the ``now`` the caller passes (seconds, float), never from the system clock.

Layout: one unsigned 63-bit integer, so a timestamp compares, hashes, msgpacks and fits a signed
SQLite INTEGER as a plain int::

    [ wall ms : 47 bits ][ logical : 16 bits ]

47 bits of milliseconds reach the year 6429; the top bit stays clear so the packed value is
always a non-negative signed 64-bit integer. 16 bits of logical counter allow 65,535 events in
one millisecond before the clock borrows the next millisecond (it never wraps or goes back).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LOGICAL_BITS", "MAX_HLC", "MAX_LOGICAL", "MAX_WALL_MS", "Hlc"]

LOGICAL_BITS = 16
MAX_LOGICAL = (1 << LOGICAL_BITS) - 1
WALL_BITS = 47
MAX_WALL_MS = (1 << WALL_BITS) - 1
MAX_HLC = (1 << (WALL_BITS + LOGICAL_BITS)) - 1


def now_ms(now: float) -> int:
    """Seconds (the caller's ``now``) to whole milliseconds, clamped into the wall range."""
    if now != now:  # NaN: treat as the epoch rather than poisoning the clock
        return 0
    ms = int(now * 1000.0) if now < MAX_WALL_MS / 1000.0 else MAX_WALL_MS
    return min(max(ms, 0), MAX_WALL_MS)


@dataclass(frozen=True, slots=True, order=True)
class Hlc:
    """A hybrid logical clock value; ordering is (wall_ms, logical)."""

    wall_ms: int = 0
    logical: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.wall_ms <= MAX_WALL_MS or not 0 <= self.logical <= MAX_LOGICAL:
            raise ValueError("hlc out of range")

    # ---- packing -------------------------------------------------------------------------------

    def pack(self) -> int:
        return (self.wall_ms << LOGICAL_BITS) | self.logical

    @staticmethod
    def unpack(value: int) -> Hlc:
        if not 0 <= value <= MAX_HLC:
            raise ValueError("packed hlc out of range")
        return Hlc(value >> LOGICAL_BITS, value & MAX_LOGICAL)

    # ---- clock ---------------------------------------------------------------------------------

    def tick(self, now: float) -> Hlc:
        """The timestamp of a local event at ``now``: strictly greater than ``self``.

        If ``now`` went backwards (NTP step, VM migration) the wall part holds and the logical
        counter advances, so the clock stays monotonic.
        """
        pt = now_ms(now)
        if pt > self.wall_ms:
            return Hlc(pt, 0)
        return self._bump(self.wall_ms, self.logical)

    def update(self, remote: Hlc, now: float) -> Hlc:
        """The timestamp of receiving ``remote`` at ``now``: greater than both ``self`` and it."""
        pt = now_ms(now)
        wall = max(self.wall_ms, remote.wall_ms, pt)
        if wall == self.wall_ms and wall == remote.wall_ms:
            return self._bump(wall, max(self.logical, remote.logical))
        if wall == self.wall_ms:
            return self._bump(wall, self.logical)
        if wall == remote.wall_ms:
            return self._bump(wall, remote.logical)
        return Hlc(wall, 0)

    @staticmethod
    def _bump(wall: int, logical: int) -> Hlc:
        if logical < MAX_LOGICAL:
            return Hlc(wall, logical + 1)
        # Counter exhausted within one millisecond: borrow the next millisecond. Saturates at the
        # end of the wall range (year 6429) rather than wrapping.
        if wall < MAX_WALL_MS:
            return Hlc(wall + 1, 0)
        return Hlc(MAX_WALL_MS, MAX_LOGICAL)

    def __str__(self) -> str:
        return f"{self.wall_ms}.{self.logical}"
