"""Freshness for sealed gossip: per-sender epochs and sequence numbers, a window per sender.

The cluster keyring authenticates a packet but says nothing about *when* it was sealed, so
anyone who captured one could replay it. Every datagram, and every stream request, now
carries a freshness value in clear, authenticated as the seal's associated data::

    [sender 8 bytes][epoch 6 bytes, ms][seq 4 bytes]        (FRESH_SIZE = 18)

- sender: BLAKE2b-64 of the node's name. It only keys the receiver's window; it is
  authenticated, so an attacker without the key cannot move a captured packet to another
  window.
- epoch: the sender's wall clock in milliseconds when it began this sequence, never below its
  previous epoch + 1 (also across restarts: the agent saves the last one). A restarted sender
  begins a new epoch, which is higher than any of its past ones, so it is never taken for a
  replay. A sender begins a new epoch every EPOCH_ROLL_S and when seq would wrap.
- seq: counts the sender's sealed messages within the epoch (one counter for all peers).

A receiver keeps, per sender, the newest epoch and the one before it, each with an RFC 4303
sliding window of WINDOW_BITS sequence numbers (the previous epoch's, so packets in flight at
a roll are not lost). A message from an older epoch, below a window, or seen before, is
dropped. Time matters only where there is no window: a sender heard for the first time
(or again after we restarted or forgot it) and a sender's new epoch must lie within
[now - EPOCH_ROLL_S - MAX_CLOCK_SKEW_S, now + MAX_CLOCK_SKEW_S] of our clock. So a replay
after a receiver's restart is possible only for messages sealed in the last few minutes, each
once. Hosts whose clocks differ by more than MAX_CLOCK_SKEW_S drop each other's messages and
count them (`fresh_skew`); meshnet, like Kerberos and certificate validity, needs hosts'
clocks roughly in step (NTP).

`check` is split from `accept` so that a receiver can drop a replay before spending a
decryption on it and record the value only once the message has authenticated.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from meshnet.wire import FRESHNESS_OVERHEAD

__all__ = [
    "EPOCH_ROLL_S",
    "FRESH_SIZE",
    "MAX_CLOCK_SKEW_S",
    "MAX_SENDERS",
    "WINDOW_BITS",
    "Fresh",
    "FreshSender",
    "FreshnessWindows",
    "sender_tag",
]

SENDER_SIZE = 8
FRESH_SIZE = SENDER_SIZE + 6 + 4
assert FRESH_SIZE == FRESHNESS_OVERHEAD
# How far apart two hosts' clocks may be. Kerberos allows 5 minutes; two minutes covers an
# NTP-less VM that drifted for a day, while keeping the replay horizon after a restart short.
MAX_CLOCK_SKEW_S = 120.0
# A sender starts a new epoch this often, so an epoch's start says how old its messages can be.
EPOCH_ROLL_S = 30.0
# Sequence numbers per window. One counter serves every peer, so a receiver sees only some of
# them: at ~100 messages/s sent in all, 4096 covers ~40 s of reordering, far beyond UDP's.
WINDOW_BITS = 4096
# Windows kept (least recently used dropped first). Only authenticated messages create one,
# so outsiders cannot fill it; MAX_MEMBERS senders plus room for churn.
MAX_SENDERS = 16384
_WINDOW_MASK = (1 << WINDOW_BITS) - 1
SEQ_LIMIT = 1 << 32
EPOCH_LIMIT = 1 << 48
_TAIL = struct.Struct(">HII")  # epoch high 16 bits, epoch low 32 bits, seq


def sender_tag(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=SENDER_SIZE, person=b"meshnet-fresh").digest()


@dataclass(frozen=True, slots=True)
class Fresh:
    sender: bytes
    epoch: int  # ms
    seq: int

    def pack(self) -> bytes:
        return self.sender + _TAIL.pack(self.epoch >> 32, self.epoch & 0xFFFFFFFF, self.seq)

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> Fresh:
        """The value at the start of ``data``; ValueError if there are fewer than 18 bytes."""
        if len(data) < FRESH_SIZE:
            raise ValueError("shorter than a freshness value")
        hi, lo, seq = _TAIL.unpack_from(data, SENDER_SIZE)
        return cls(bytes(data[:SENDER_SIZE]), (hi << 32) | lo, seq)


class FreshSender:
    """Hands out this node's freshness values: (epoch, seq), epochs always increasing."""

    def __init__(self, name: str, clock: Callable[[], float], last_epoch: int = 0) -> None:
        """``clock``: wall time in seconds (the skew hook shifts it); ``last_epoch``: the highest
        epoch a previous life of this node used (saved by the agent), so ours start above it."""
        self.sender = sender_tag(name)
        self._clock = clock
        self.epoch = 0
        self._started = 0.0
        self._seq = 0
        self._last = last_epoch
        self._roll()

    def _roll(self) -> None:
        now = self._clock()
        self.epoch = min(max(int(now * 1000), self._last + 1), EPOCH_LIMIT - 1)
        self._last = self.epoch
        self._started = now
        self._seq = 0

    def next(self) -> Fresh:
        if self._seq >= SEQ_LIMIT or self._clock() - self._started >= EPOCH_ROLL_S:
            self._roll()
        seq = self._seq
        self._seq = seq + 1
        return Fresh(self.sender, self.epoch, seq)


class _Window:
    """RFC 4303's sliding window: the highest seq seen and a bitmap of the ones just below."""

    __slots__ = ("bits", "top")

    def __init__(self) -> None:
        self.top = -1
        self.bits = 0  # bit i: seq (top - i) was seen

    def fresh(self, seq: int) -> str | None:
        if seq > self.top:
            return None
        back = self.top - seq
        if back >= WINDOW_BITS:
            return "fresh_too_old"
        return "fresh_duplicate" if (self.bits >> back) & 1 else None

    def mark(self, seq: int) -> None:
        if seq > self.top:
            shift = seq - self.top
            self.bits = ((self.bits << shift) | 1) & _WINDOW_MASK if shift < WINDOW_BITS else 1
            self.top = seq
        else:
            self.bits |= 1 << (self.top - seq)


class _SenderState:
    __slots__ = ("epoch", "prev_epoch", "prev_window", "window")

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch
        self.window = _Window()
        self.prev_epoch = -1
        self.prev_window: _Window | None = None


class FreshnessWindows:
    """The receiving side: one window per sender, bounded in number."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._senders: OrderedDict[bytes, _SenderState] = OrderedDict()
        self.drops: dict[str, int] = {
            "fresh_duplicate": 0, "fresh_too_old": 0, "fresh_old_epoch": 0, "fresh_skew": 0,
        }

    def __len__(self) -> int:
        return len(self._senders)

    def _in_clock_range(self, epoch: int) -> bool:
        now_ms = self._clock() * 1000
        return (now_ms - (EPOCH_ROLL_S + MAX_CLOCK_SKEW_S) * 1000
                <= epoch <= now_ms + MAX_CLOCK_SKEW_S * 1000)

    def check(self, f: Fresh) -> str | None:
        """None if ``f`` may be new, else the reason it is stale (not yet counted)."""
        st = self._senders.get(f.sender)
        if st is None or f.epoch > st.epoch:
            return None if self._in_clock_range(f.epoch) else "fresh_skew"
        if f.epoch == st.epoch:
            return st.window.fresh(f.seq)
        if f.epoch == st.prev_epoch and st.prev_window is not None:
            return st.prev_window.fresh(f.seq)
        return "fresh_old_epoch"

    def accept(self, f: Fresh) -> None:
        """Record an authenticated ``f`` that passed `check`."""
        senders = self._senders
        st = senders.get(f.sender)
        if st is None:
            if len(senders) >= MAX_SENDERS:
                senders.popitem(last=False)
            st = senders[f.sender] = _SenderState(f.epoch)
        else:
            senders.move_to_end(f.sender)
            if f.epoch > st.epoch:
                st.prev_epoch, st.prev_window = st.epoch, st.window
                st.epoch, st.window = f.epoch, _Window()
        if f.epoch == st.epoch:
            st.window.mark(f.seq)
        elif st.prev_window is not None:
            st.prev_window.mark(f.seq)

    def admit(self, f: Fresh) -> bool:
        """check + accept in one step, counting a drop (for messages already authenticated)."""
        reason = self.check(f)
        if reason is not None:
            self.drops[reason] += 1
            return False
        self.accept(f)
        return True

    def count(self, reason: str) -> None:
        self.drops[reason] += 1
