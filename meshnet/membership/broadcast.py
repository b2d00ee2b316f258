"""memberlist's TransmitLimitedQueue: least-transmitted first, newer supersedes older per node."""

from __future__ import annotations

# Stop scanning for a message that fits once this many did not: the rest are likely no smaller,
# and a queue of thousands must not be walked for every packet.
MAX_SKIPS = 16
# Below this much room nothing we broadcast fits (the smallest message is ~8 bytes + framing).
MIN_ROOM = 10


class BroadcastQueue:
    """Messages keyed by the member they are about; each is sent up to a retransmit limit.

    Buckets by transmit count keep ``get`` O(messages returned): bucket 0 (never sent) first,
    newest first within a bucket, as memberlist orders by (transmits, -id).
    """

    __slots__ = ("_buckets", "_where")

    def __init__(self) -> None:
        self._buckets: list[dict[str, bytes]] = [{}]
        self._where: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def queue(self, key: str, msg: bytes) -> None:
        """Queue ``msg`` about ``key``, replacing any older message about the same member."""
        old = self._where.get(key)
        if old is not None:
            del self._buckets[old][key]
        self._buckets[0][key] = msg
        self._where[key] = 0

    def remove(self, key: str) -> None:
        old = self._where.pop(key, None)
        if old is not None:
            del self._buckets[old][key]

    def transmits(self, key: str) -> int | None:
        return self._where.get(key)

    def get(self, overhead: int, room: int, limit: int, max_count: int = 255) -> list[bytes]:
        """Messages totalling at most ``room`` bytes (each costing len + overhead)."""
        out: list[bytes] = []
        buckets = self._buckets
        where = self._where
        if len(buckets) > limit:
            for b in buckets[limit:]:
                for key in b:
                    del where[key]
            del buckets[limit:]
        if not where:
            return out
        used = 0
        skips = 0
        chosen: list[tuple[int, list[str]]] = []
        full = False
        for t in range(len(buckets)):
            b = buckets[t]
            if not b:
                continue
            taken: list[str] = []
            for key in reversed(b):
                msg = b[key]
                cost = len(msg) + overhead
                if used + cost > room:
                    skips += 1
                    if skips > MAX_SKIPS or room - used < MIN_ROOM:
                        full = True
                        break
                    continue
                used += cost
                out.append(msg)
                taken.append(key)
                if len(out) >= max_count:
                    full = True
                    break
            if taken:
                chosen.append((t, taken))
            if full:
                break
        # Move what was sent one bucket up (after the scan, so nothing is sent twice).
        for t, taken in reversed(chosen):
            b = buckets[t]
            nt = t + 1
            if nt >= limit:
                for key in taken:
                    del b[key]
                    del where[key]
                continue
            if nt == len(buckets):
                buckets.append({})
            nb = buckets[nt]
            for key in reversed(taken):  # keep newest-last order in the next bucket
                nb[key] = b.pop(key)
                where[key] = nt
        return out
