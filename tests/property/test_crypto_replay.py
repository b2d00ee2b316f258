"""Model check of the RFC 6479 replay window against a plain set."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.crypto.replay import BLOCK_BITS, BLOCKS, MAX_SEQ, WINDOW_SIZE, ReplayWindow


class Model:
    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.top = 0

    def check(self, seq: int) -> bool:
        if seq < 1 or seq > MAX_SEQ or seq in self.seen:
            return False
        return seq > self.top or self.top - seq < WINDOW_SIZE

    def update(self, seq: int) -> None:
        self.seen.add(seq)
        self.top = max(self.top, seq)


# Steps relative to the newest sequence number: mostly near it (in-window reordering and
# duplicates), sometimes far back (too old) or far ahead (jumps over the whole ring).
_STEP = st.one_of(
    st.integers(-70, 70),
    st.integers(-WINDOW_SIZE - 130, -WINDOW_SIZE + 130),
    st.integers(-3 * WINDOW_SIZE, 3 * WINDOW_SIZE),
    st.integers(BLOCK_BITS * BLOCKS - 130, BLOCK_BITS * BLOCKS + 130),
    st.integers(0, 1 << 40),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_STEP, st.booleans()), max_size=300))
def test_window_matches_the_model(steps: list[tuple[int, bool]]) -> None:
    w, m = ReplayWindow(), Model()
    for delta, tag_ok in steps:
        seq = m.top + delta
        expected = m.check(seq)
        assert w.check(seq) == expected, (seq, m.top)
        if expected and tag_ok:  # only a verified record updates the window
            assert w.update(seq)
            m.update(seq)
        assert w.top == m.top


def test_basic_rules() -> None:
    w = ReplayWindow()
    assert not w.check(0) and not w.check(-1) and not w.check(MAX_SEQ + 1)
    assert w.update(5) and not w.check(5) and not w.update(5)
    assert w.check(4) and w.check(1)
    assert w.update(5 + WINDOW_SIZE - 1)
    assert w.check(5 + 0) is False  # seen
    assert w.check(1) is False  # too old now: top - 1 >= WINDOW_SIZE
    assert w.check(6)  # oldest still inside
    assert w.update(MAX_SEQ) and not w.check(MAX_SEQ)
    assert WINDOW_SIZE >= 8128


def test_far_future_jump_clears_the_ring() -> None:
    w = ReplayWindow()
    for s in range(1, 200):
        w.update(s)
    w.update(10**12)
    assert w.check(10**12 - 1) and w.check(10**12 - WINDOW_SIZE + 1)
    assert not w.check(10**12 - WINDOW_SIZE)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(_STEP, st.booleans()), max_size=60),
    st.integers(-3, 3 * WINDOW_SIZE),
    st.one_of(st.integers(0, 130), st.integers(WINDOW_SIZE - 70, WINDOW_SIZE + 200)),
    st.lists(_STEP, max_size=60),
)
def test_update_run_equals_updating_each(
    before: list[tuple[int, bool]], gap: int, count: int, probes: list[int]
) -> None:
    """A run of new numbers marked at once leaves the window exactly as marking each would."""
    run, each, m = ReplayWindow(), ReplayWindow(), Model()
    for delta, ok in before:
        seq = m.top + delta
        if m.check(seq) and ok:
            run.update(seq), each.update(seq), m.update(seq)
    first = m.top + gap
    fits = count >= 1 and first > m.top and first + count - 1 <= MAX_SEQ
    assert run.update_run(first, count) == fits
    if fits:
        for seq in range(first, first + count):
            assert each.update(seq)
            m.update(seq)
    assert run.top == each.top == m.top
    for delta in probes + list(range(-count - 2, 3)):
        seq = m.top + delta
        assert run.check(seq) == each.check(seq) == m.check(seq), (seq, m.top)
