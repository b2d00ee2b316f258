"""memberlist's TransmitLimitedQueue: least-transmitted first, newer supersedes older per node."""

from __future__ import annotations

# Stop scanning for a message that fits once this many did not: the rest are likely no smaller,
# and a queue of thousands must not be walked for every packet.
MAX_SKIPS = 16
# Below this much room nothing we broadcast fits (the smallest message is ~8 bytes + framing).
MIN_ROOM = 10


class _Bucket:
    """The messages sent ``count`` times, oldest arrival first (dict order)."""

    __slots__ = ("count", "msgs")

    def __init__(self, count: int) -> None:
        self.count = count
        self.msgs: dict[str, bytes] = {}


class BroadcastQueue:
    """Messages keyed by the member they are about; each is sent up to a retransmit limit.

    Buckets by transmit count keep ``get`` O(messages returned): the fewest sends first, and
    within a count the message that reached it last first (memberlist orders by
    (transmits, -id)). Only counts that hold messages have a bucket, and each key maps to its
    bucket object, so the common case, a queue that fits one packet whole, sends everything and
    ages it by bumping each bucket's count, touching no key.
    """

    __slots__ = ("_buckets", "_bytes", "_where")

    def __init__(self) -> None:
        self._buckets: list[_Bucket] = []  # ascending count; may hold emptied buckets
        self._where: dict[str, _Bucket] = {}
        self._bytes = 0  # total length of the queued messages

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def queue(self, key: str, msg: bytes) -> None:
        """Queue ``msg`` about ``key``, replacing any older message about the same member."""
        where = self._where
        old = where.get(key)
        if old is not None:
            self._bytes -= len(old.msgs.pop(key))
        buckets = self._buckets
        if buckets and buckets[0].count == 0:
            b0 = buckets[0]
        else:
            b0 = _Bucket(0)
            buckets.insert(0, b0)
        b0.msgs[key] = msg
        where[key] = b0
        self._bytes += len(msg)

    def remove(self, key: str) -> None:
        old = self._where.pop(key, None)
        if old is not None:
            self._bytes -= len(old.msgs.pop(key))

    def transmits(self, key: str) -> int | None:
        b = self._where.get(key)
        return None if b is None else b.count

    def _drop(self, b: _Bucket) -> None:
        where = self._where
        for key, msg in b.msgs.items():
            del where[key]
            self._bytes -= len(msg)

    def get(self, overhead: int, room: int, limit: int, max_count: int = 255) -> list[bytes]:
        """Messages totalling at most ``room`` bytes (each costing len + overhead)."""
        buckets = self._buckets
        # Forget what was sent ``limit`` times (the limit shrinks when members leave).
        while buckets and (buckets[-1].count >= limit or not buckets[-1].msgs):
            self._drop(buckets.pop())
        where = self._where
        if not where:
            return []
        out: list[bytes] = []
        if self._bytes + overhead * len(where) <= room and len(where) <= max_count:
            # Everything fits: the scan below would take every message in order and move each
            # count up by one whole, keeping its order, which is what bumping the count does.
            for b in buckets:
                out.extend(reversed(b.msgs.values()))
                b.count += 1
            if buckets[-1].count >= limit:
                self._drop(buckets.pop())
            return out
        used = 0
        skips = 0
        chosen: list[tuple[int, list[str]]] = []
        full = False
        for i, b in enumerate(buckets):
            msgs = b.msgs
            taken: list[str] = []
            for key in reversed(msgs):
                msg = msgs[key]
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
                chosen.append((i, taken))
            if full:
                break
        # Move what was sent one count up (after the scan, so nothing is sent twice). Highest
        # first, so a bucket inserted at i + 1 shifts only buckets already done.
        for i, taken in reversed(chosen):
            b = buckets[i]
            nc = b.count + 1
            if nc >= limit:
                for key in taken:
                    self._bytes -= len(b.msgs.pop(key))
                    del where[key]
                continue
            if i + 1 < len(buckets) and buckets[i + 1].count == nc:
                nb = buckets[i + 1]
            else:
                nb = _Bucket(nc)
                buckets.insert(i + 1, nb)
            for key in reversed(taken):  # keep newest-last order in the next count
                nb.msgs[key] = b.msgs.pop(key)
                where[key] = nb
        self._buckets = [b for b in buckets if b.msgs]
        return out
