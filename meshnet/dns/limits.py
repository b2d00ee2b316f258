"""Slots shared by many owners, with a cap per owner, a cap in total, and max-min fair eviction.

The DNS server gives every listener (one per sandbox, plus the host-side ones) a share of two
scarce things: forwarded queries in flight (each holds an upstream socket and a timer) and TCP
connections (each holds a task and two buffers). :class:`FairSlots` is the bookkeeping for both,
as a pure core:

- an owner holding ``per_owner`` slots is refused (``Refuse("owner")``): one sandbox can never
  take more than its cap, however idle the others are;
- when all ``total`` slots are taken, a newcomer that holds fewer than the biggest owner minus one
  takes the *oldest* slot of that biggest owner (``Admit(evicted=...)``; the caller ends it);
  otherwise it is refused (``Refuse("total")``). So however many owners flood, each owner can
  always get up to ``total // owners`` slots: a quiet sandbox is never starved by busy ones, and
  no two owners ever trade one slot back and forth.

Items are kept per owner in insertion order (a dict), so the oldest is found in O(1); the biggest
owner is found by a scan over owners, which happens only when every slot is taken.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Admit", "FairSlots", "Refuse"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T", bound=Hashable)


@dataclass(frozen=True, slots=True)
class Admit(Generic[K, T]):
    """The item holds a slot now; ``evicted`` (owner, item) lost its slot to make room."""

    evicted: tuple[K, T] | None = None


@dataclass(frozen=True, slots=True)
class Refuse:
    """No slot: ``reason`` is ``"owner"`` (the owner's cap) or ``"total"`` (all taken, fairly)."""

    reason: str


_ADMIT: Admit[object, object] = Admit()
REFUSE_OWNER = Refuse("owner")
REFUSE_TOTAL = Refuse("total")


class FairSlots(Generic[K, T]):
    """At most ``total`` items, at most ``per_owner`` (clamped to ``total``) per owner."""

    __slots__ = ("_by_owner", "_used", "per_owner", "total")

    def __init__(self, total: int, per_owner: int) -> None:
        if total < 1 or per_owner < 1:
            raise ValueError("caps must be at least 1")
        self.total = total
        self.per_owner = min(per_owner, total)
        self._by_owner: dict[K, dict[T, None]] = {}
        self._used = 0

    def __len__(self) -> int:
        return self._used

    def count(self, owner: K) -> int:
        items = self._by_owner.get(owner)
        return 0 if items is None else len(items)

    def items(self, owner: K) -> list[T]:
        """The owner's items, oldest first."""
        return list(self._by_owner.get(owner, ()))

    def acquire(self, owner: K, item: T) -> Admit[K, T] | Refuse:
        """Give ``item`` a slot for ``owner`` (``item`` must not hold one already)."""
        mine = self._by_owner.get(owner)
        have = 0 if mine is None else len(mine)
        if have >= self.per_owner:
            # An owner holding every slot (its cap is the total) is refused for want of slots.
            return REFUSE_TOTAL if have >= self.total else REFUSE_OWNER
        evicted: tuple[K, T] | None = None
        if self._used >= self.total:
            victim, most = owner, have
            for o, its in self._by_owner.items():
                if len(its) > most:
                    victim, most = o, len(its)
            if most <= have + 1:
                return REFUSE_TOTAL
            its = self._by_owner[victim]
            oldest = next(iter(its))
            self._remove(victim, its, oldest)
            evicted = (victim, oldest)
            mine = self._by_owner.get(owner)
        if mine is None:
            mine = self._by_owner[owner] = {}
        mine[item] = None
        self._used += 1
        if evicted is None:
            return _ADMIT  # type: ignore[return-value]
        return Admit(evicted)

    def release(self, owner: K, item: T) -> bool:
        """Free ``item``'s slot; False if it held none (released or evicted before)."""
        its = self._by_owner.get(owner)
        if its is None or item not in its:
            return False
        self._remove(owner, its, item)
        return True

    def _remove(self, owner: K, its: dict[T, None], item: T) -> None:
        del its[item]
        self._used -= 1
        if not its:
            del self._by_owner[owner]
