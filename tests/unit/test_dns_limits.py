"""Per-owner and total caps with max-min fair eviction (meshnet.dns.limits)."""

from __future__ import annotations

import pytest

from meshnet.dns import Admit, FairSlots, Refuse


def test_owner_cap_then_total_cap() -> None:
    s: FairSlots[str, int] = FairSlots(total=4, per_owner=2)
    assert s.acquire("a", 1) == Admit() and s.acquire("a", 2) == Admit()
    assert s.acquire("a", 3) == Refuse("owner")
    assert s.acquire("b", 4) == Admit() and s.acquire("b", 5) == Admit()
    assert len(s) == 4
    # Full: a newcomer takes the oldest slot of the first of the busiest owners...
    assert s.acquire("c", 6) == Admit(("a", 1))
    # ... but only while some owner is busier than it by more than one (a 1, b 2, c 1).
    assert s.acquire("c", 7) == Refuse("total")
    assert s.acquire("d", 8) == Admit(("b", 4))  # d 0 < b 2 - 1
    assert [s.count(o) for o in "abcd"] == [1, 1, 1, 1]
    assert s.acquire("e", 9) == Refuse("total")
    assert s.items("b") == [5] and len(s) == 4


def test_release_is_idempotent_and_frees_the_slot() -> None:
    s: FairSlots[str, int] = FairSlots(total=2, per_owner=2)
    s.acquire("a", 1)
    s.acquire("a", 2)
    assert s.acquire("a", 3) == Refuse("total")  # one owner holding all: refused for slots
    assert s.release("a", 1) and not s.release("a", 1) and not s.release("x", 1)
    assert s.items("a") == [2] and len(s) == 1
    assert s.acquire("a", 3) == Admit()
    assert s.items("a") == [2, 3]


def test_an_evicted_item_releases_nothing_more() -> None:
    s: FairSlots[str, int] = FairSlots(total=3, per_owner=3)
    for i in range(3):
        s.acquire("a", i)
    assert s.acquire("b", 10) == Admit(("a", 0))
    assert not s.release("a", 0)  # the evicted one's own cleanup comes later: a no-op
    assert len(s) == 3 and s.items("a") == [1, 2]


def test_per_owner_is_clamped_and_caps_are_positive() -> None:
    assert FairSlots[str, int](total=2, per_owner=10).per_owner == 2
    with pytest.raises(ValueError):
        FairSlots[str, int](total=0, per_owner=1)
    with pytest.raises(ValueError):
        FairSlots[str, int](total=1, per_owner=0)
