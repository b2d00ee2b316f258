"""Lifeguard's pieces as small pure objects: local health (awareness) and suspicion timeouts.

After memberlist's awareness.go and suspicion.go (Dadgar et al., arXiv 1707.00788).
"""

from __future__ import annotations

import math


class Awareness:
    """Local health score in 0..max_multiplier-1; timeouts are scaled by (score + 1).

    +1 for each missing nack on a failed probe (or +1 per failed probe with no helpers),
    +1 when we had to refute a suspicion about ourselves, -1 for each successful probe.
    """

    __slots__ = ("max_multiplier", "score")

    def __init__(self, max_multiplier: int) -> None:
        self.max_multiplier = max_multiplier
        self.score = 0

    def apply_delta(self, delta: int) -> None:
        self.score = min(max(self.score + delta, 0), self.max_multiplier - 1)

    def scale(self, timeout: float) -> float:
        return timeout * (self.score + 1)


def suspicion_bounds(
    suspicion_mult: float, max_timeout_mult: float, n: int, probe_interval: float
) -> tuple[float, float]:
    """(min, max): min = mult x max(1, log10 n) x probe_interval; max = max_mult x min."""
    node_scale = max(1.0, math.log10(max(1, n)))
    lo = suspicion_mult * node_scale * probe_interval
    return lo, max_timeout_mult * lo


def suspicion_timeout(confirmations: int, k: int, lo: float, hi: float) -> float:
    """max - (max - min) x log(C + 1) / log(k + 1), floored at min; k < 1 means min at once."""
    if k < 1:
        return lo
    frac = math.log(confirmations + 1) / math.log(k + 1)
    return max(lo, hi - (hi - lo) * frac)


class Suspicion:
    """One suspicion timer: a deadline that moves earlier as independent confirmations arrive."""

    __slots__ = ("confirmers", "deadline", "hi", "k", "lo", "reminded", "start")

    def __init__(self, start: float, sender: str, k: int, lo: float, hi: float) -> None:
        self.start = start
        self.k = k
        self.lo = lo
        self.hi = hi
        # The original accuser is recorded so that it cannot also count as a confirmation.
        self.confirmers: set[str] = {sender}
        self.deadline = start + suspicion_timeout(0, k, lo, hi)
        self.reminded = False  # the holder has told the suspect itself (see remind_at)

    @property
    def remind_at(self) -> float:
        """Halfway to the deadline: a holder that has not seen a refutation by then tells the
        suspect directly, leaving it the other half to answer."""
        return self.start + (self.deadline - self.start) / 2

    @property
    def confirmations(self) -> int:
        return len(self.confirmers) - 1

    def confirm(self, sender: str) -> bool:
        """Count ``sender`` as a new independent confirmation. True if it was new and counted."""
        if sender in self.confirmers or len(self.confirmers) > self.k:
            return False  # a repeat, or already at k confirmations
        self.confirmers.add(sender)
        self.deadline = self.start + suspicion_timeout(self.confirmations, self.k, self.lo, self.hi)
        return True
