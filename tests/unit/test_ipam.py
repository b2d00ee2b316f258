from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshnet.state import Entry, Hlc
from meshnet.state.ipam import IpamExhausted, beaten_by, pick_address


def test_pick_skips_network_gateway_and_broadcast_and_taken() -> None:
    taken: set[str] = set()
    for i in range(5):
        ip = pick_address("10.0.0.0/29", taken, f"t{i}")
        assert ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("10.0.0.0/29")
        assert ip not in {"10.0.0.0", "10.0.0.1", "10.0.0.7"} | taken
        taken.add(ip)
    with pytest.raises(IpamExhausted, match="no free address left"):
        pick_address("10.0.0.0/29", taken, "one-more")


@given(st.sets(st.integers(min_value=2, max_value=254), max_size=200), st.text(max_size=8))
def test_pick_never_returns_a_taken_address(used: set[int], seed: str) -> None:
    taken = {f"10.1.0.{i}" for i in used}
    ip = pick_address("10.1.0.0/24", taken, seed)
    assert ip not in taken


def _e(key: str, wall: int, writer: str) -> Entry:
    return Entry("endpoints", key, b"\x80", Hlc(wall, 0), writer)


def test_the_earlier_claim_wins_and_writer_breaks_ties() -> None:
    a, b, c = _e("n/a", 10, "h1"), _e("n/b", 11, "h2"), _e("n/c", 10, "h3")
    assert beaten_by(b, [a, c]) == a
    assert beaten_by(a, [b, c]) is None
    assert beaten_by(c, [a, b]) == a
