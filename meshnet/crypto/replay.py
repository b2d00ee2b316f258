"""Anti-replay sliding window for inbound security associations (RFC 4303 §3.4.3, RFC 6479).

The window is a ring of `BLOCKS` words of 64 bits. Bit `seq % 64` of block `(seq // 64) % BLOCKS`
says whether `seq` was seen. Moving the window forward clears whole blocks; nothing is ever
shifted (RFC 6479's point: the cost of a jump is bounded by the number of blocks, not by its
length, and the common in-order case touches one word).

Size: 128 blocks of 64 bits, of which the block holding the newest sequence number is only
partly "behind" it, so the guaranteed window is (128 - 1) * 64 = 8,128 packets: the same as
WireGuard's. Why that much: a 64 KB super-frame from a TSO TAP is cut into ~45 MTU-sized records
that go out as one GSO burst; with a few bursts in flight, UDP GRO and multi-queue receive
reordering, a window of RFC 4303's recommended 64 would drop good packets. 8,128 packets is
~11 MB of 1,400-byte records in flight, more than any socket buffer we configure, for 1 KB of
bitmap per SA.

Rules (RFC 4303): sequence numbers start at 1, so 0 is never accepted. A number above the newest
one seen is accepted; one that is `WINDOW_SIZE` or more below it is too old; anything in between
is accepted once. `check` has no side effects and may be called before the (expensive) integrity
check; `update` must be called only after the tag verified, or a forger could advance the window
and make the real packets look old.
"""

from __future__ import annotations

__all__ = ["BLOCKS", "BLOCK_BITS", "MAX_SEQ", "WINDOW_SIZE", "ReplayWindow"]

# Bits per ring block: the machine word RFC 6479 is written for.
BLOCK_BITS = 64
_BIT_MASK = BLOCK_BITS - 1
_BLOCK_SHIFT = 6
# Blocks in the ring; a power of two so the ring index is a mask. See the module docstring.
BLOCKS = 128
_INDEX_MASK = BLOCKS - 1
# Packets guaranteed to be inside the window behind the newest one accepted (RFC 6479 §2).
WINDOW_SIZE = (BLOCKS - 1) * BLOCK_BITS  # 8128
# Sequence numbers are 64-bit on the wire.
MAX_SEQ = (1 << 64) - 1

assert BLOCKS & _INDEX_MASK == 0 and 1 << _BLOCK_SHIFT == BLOCK_BITS


class ReplayWindow:
    """The receive side of one SA: which sequence numbers were already accepted."""

    __slots__ = ("_blocks", "_top")

    def __init__(self) -> None:
        self._blocks = [0] * BLOCKS
        self._top = 0  # the greatest sequence number accepted so far (0: none yet)

    @property
    def top(self) -> int:
        return self._top

    def check(self, seq: int) -> bool:
        """Would `seq` be accepted? No side effects."""
        top = self._top
        if seq > top:
            return seq <= MAX_SEQ
        if seq <= 0 or top - seq >= WINDOW_SIZE:
            return False
        return not (self._blocks[(seq >> _BLOCK_SHIFT) & _INDEX_MASK] >> (seq & _BIT_MASK)) & 1

    def update(self, seq: int) -> bool:
        """Mark `seq` as seen (after its tag verified). Returns False, changing nothing, if
        `check(seq)` is False (a duplicate that raced in, or a caller bug)."""
        if not self.check(seq):
            return False
        blocks = self._blocks
        index = seq >> _BLOCK_SHIFT
        if seq > self._top:
            current = self._top >> _BLOCK_SHIFT
            # Clear the blocks the window slides over; a jump of more than the ring clears all.
            for i in range(current + 1, current + 1 + min(index - current, BLOCKS)):
                blocks[i & _INDEX_MASK] = 0
            self._top = seq
        blocks[index & _INDEX_MASK] |= 1 << (seq & _BIT_MASK)
        return True

    def update_run(self, first: int, count: int) -> bool:
        """Mark the COUNT numbers from FIRST on as seen, all of them above the newest one
        accepted so far: one GSO burst of records whose tags all verified. The same as
        `update` for each of them in order, at the cost of one. False, changing nothing, if
        FIRST is not above the newest accepted or the run passes MAX_SEQ."""
        last = first + count - 1
        top = self._top
        if count < 1 or first <= top or last > MAX_SEQ:
            return False
        blocks = self._blocks
        index = last >> _BLOCK_SHIFT
        current = top >> _BLOCK_SHIFT
        for i in range(current + 1, current + 1 + min(index - current, BLOCKS)):
            blocks[i & _INDEX_MASK] = 0
        self._top = last
        # Only the newest WINDOW_SIZE numbers can still be asked about: mark those (the loop
        # stays bounded however long the run).
        seq = max(first, last - WINDOW_SIZE + 1)
        while seq <= last:
            end = min(last, seq | _BIT_MASK)
            bits = (1 << (end - seq + 1)) - 1
            blocks[(seq >> _BLOCK_SHIFT) & _INDEX_MASK] |= bits << (seq & _BIT_MASK)
            seq = end + 1
        return True
