"""Freshness values and windows (crypto/freshness.py): what a replay looks like to a receiver."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.crypto.freshness import (
    EPOCH_ROLL_S,
    FRESH_SIZE,
    MAX_CLOCK_SKEW_S,
    MAX_SENDERS,
    WINDOW_BITS,
    Fresh,
    FreshnessWindows,
    FreshSender,
    sender_tag,
)


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_values_pack_to_18_bytes_and_back() -> None:
    f = Fresh(sender_tag("a"), (1 << 48) - 1, (1 << 32) - 1)
    assert len(f.pack()) == FRESH_SIZE
    assert Fresh.unpack(f.pack() + b"rest") == f
    with pytest.raises(ValueError):
        Fresh.unpack(f.pack()[:-1])


def test_a_sender_counts_and_rolls_its_epoch() -> None:
    clock = Clock()
    s = FreshSender("a", clock)
    first, second = s.next(), s.next()
    assert (first.epoch, first.seq, second.seq) == (int(clock.t * 1000), 0, 1)
    clock.t += EPOCH_ROLL_S
    rolled = s.next()
    assert rolled.epoch > first.epoch and rolled.seq == 0


def test_a_restarted_sender_starts_above_its_saved_epoch_even_with_a_clock_set_back() -> None:
    clock = Clock()
    old = FreshSender("a", clock).next()
    clock.t -= 50  # the clock was stepped back across the restart
    new = FreshSender("a", clock, last_epoch=old.epoch).next()
    assert new.epoch > old.epoch
    w = FreshnessWindows(clock)
    assert w.admit(old) and w.admit(new)


def test_each_value_is_accepted_once() -> None:
    clock = Clock()
    s, w = FreshSender("a", clock), FreshnessWindows(clock)
    values = [s.next() for _ in range(10)]
    for f in reversed(values):  # any order inside the window
        assert w.admit(f)
    for f in values:
        assert not w.admit(f)
    assert w.drops["fresh_duplicate"] == 10


def test_below_the_window_and_older_epochs_are_replays() -> None:
    clock = Clock()
    s, w = FreshSender("a", clock), FreshnessWindows(clock)
    first = s.next()
    assert w.admit(first)
    for _ in range(WINDOW_BITS):
        last = s.next()
    assert w.admit(last)
    assert w.check(first) == "fresh_too_old"
    clock.t += EPOCH_ROLL_S
    newer = s.next()
    assert w.admit(newer)
    clock.t += EPOCH_ROLL_S
    newest = s.next()
    assert w.admit(newest)
    assert w.check(first) == "fresh_old_epoch"  # two epochs back: no window left for it


def test_the_previous_epoch_keeps_its_window_for_stragglers() -> None:
    clock = Clock()
    s, w = FreshSender("a", clock), FreshnessWindows(clock)
    assert w.admit(s.next())
    late = s.next()  # sent just before the roll, delivered just after
    clock.t += EPOCH_ROLL_S
    assert w.admit(s.next())
    assert w.admit(late)
    assert not w.admit(late)


@pytest.mark.parametrize(("offset", "ok"), [
    (0, True),
    (MAX_CLOCK_SKEW_S - 1, True),
    (MAX_CLOCK_SKEW_S + 1, False),
    (-(EPOCH_ROLL_S + MAX_CLOCK_SKEW_S) + 1, True),
    (-(EPOCH_ROLL_S + MAX_CLOCK_SKEW_S) - 1, False),
])
def test_a_first_contact_must_lie_within_the_clock_skew(offset: float, ok: bool) -> None:
    """Where there is no window (first contact, or after the receiver restarted) only the
    clock bounds a replay; a sender skewed beyond MAX_CLOCK_SKEW_S is dropped and counted."""
    receiver = Clock()
    sender = Clock(receiver.t + offset)
    w = FreshnessWindows(receiver)
    assert w.admit(FreshSender("a", sender).next()) is ok
    assert w.drops["fresh_skew"] == int(not ok)


def test_windows_are_bounded_in_number() -> None:
    clock = Clock()
    w = FreshnessWindows(clock)
    for i in range(MAX_SENDERS + 10):
        w.accept(Fresh(i.to_bytes(8, "big"), int(clock.t * 1000), 0))
    assert len(w) == MAX_SENDERS


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3 * WINDOW_BITS), max_size=300))
def test_no_sequence_number_is_ever_accepted_twice(order: list[int]) -> None:
    """Whatever order and repetition the network (or an attacker) delivers, every value is
    accepted at most once, and a value never seen and inside the window always is."""
    clock = Clock()
    w = FreshnessWindows(clock)
    tag, epoch = sender_tag("a"), int(clock.t * 1000)
    accepted: set[int] = set()
    top = -1
    for seq in order:
        f = Fresh(tag, epoch, seq)
        fits = seq not in accepted and seq > top - WINDOW_BITS
        assert w.admit(f) is fits
        if fits:
            accepted.add(seq)
            top = max(top, seq)
