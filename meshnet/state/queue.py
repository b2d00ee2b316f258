"""The retransmit queue for gossiped deltas (after memberlist's TransmitLimitedQueue).

Each queued message is sent at most ``limit`` times; the least-sent go first and, among equals,
the newest. Queuing a newer write of a key replaces the older one (it would only be beaten on
arrival). The queue is bounded: past ``max_items`` the oldest of the most-sent goes, since it
has had the most chances already; anti-entropy delivers whatever gossip gave up on.

Messages are kept in tiers by transmit count, each an insertion-ordered dict, so a packet's
worth is taken in O(taken) rather than by sorting the whole queue for every packet.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DeltaQueue"]

Key = tuple[str, str]

# While filling one packet, give up after this many queued messages in a row that do not fit the
# room left: the packet is as good as full, and scanning on would make one call O(queue).
MAX_SKIPS_PER_TAKE = 32


@dataclass(slots=True)
class _Item:
    msg: bytes
    transmits: int


class DeltaQueue:
    def __init__(self, limit: int, max_items: int) -> None:
        self._limit = max(1, limit)
        self._max_items = max_items
        self._items: dict[Key, _Item] = {}
        self._tiers: list[dict[Key, _Item]] = [{} for _ in range(self._limit)]
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        limit = max(1, limit)
        if limit < self._limit:
            for tier in self._tiers[limit:]:
                for k in tier:
                    del self._items[k]
            del self._tiers[limit:]
        else:
            self._tiers.extend({} for _ in range(limit - self._limit))
        self._limit = limit

    def discard(self, key: Key) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            del self._tiers[item.transmits][key]

    def push(self, key: Key, msg: bytes) -> None:
        self.discard(key)
        item = _Item(msg, 0)
        self._items[key] = item
        self._tiers[0][key] = item
        if len(self._items) > self._max_items:
            for tier in reversed(self._tiers):
                if tier:
                    victim = next(iter(tier))
                    del tier[victim]
                    del self._items[victim]
                    self.evicted += 1
                    break

    def take(self, limit_bytes: int, overhead: int) -> list[bytes]:
        out: list[bytes] = []
        room = limit_bytes
        picked: list[tuple[int, list[Key]]] = []
        skips = 0
        for t, tier in enumerate(self._tiers):
            if room <= overhead or skips >= MAX_SKIPS_PER_TAKE:
                break
            keys: list[Key] = []
            for k in reversed(tier):
                need = len(tier[k].msg) + overhead
                if need > room:
                    skips += 1
                    if skips >= MAX_SKIPS_PER_TAKE:
                        break
                    continue
                keys.append(k)
                out.append(tier[k].msg)
                room -= need
            if keys:
                picked.append((t, keys))
        # move after the scan, so one call never takes the same message twice
        for t, keys in picked:
            tier, nxt = self._tiers[t], t + 1
            for k in reversed(keys):  # oldest first, so the newest stays newest in its tier
                item = tier.pop(k)
                item.transmits = nxt
                if nxt >= self._limit:
                    del self._items[k]
                else:
                    self._tiers[nxt][k] = item
        return out
