"""Incarnation tokens (crypto/incchain.py): the chain verifies forwards, never backwards."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshnet.crypto.incchain import CHAIN_LENGTH, TOKEN_BYTES, IncChain, reaches, step

CHAIN = IncChain(b"\x07" * TOKEN_BYTES)


@given(st.integers(1, CHAIN_LENGTH), st.integers(0, CHAIN_LENGTH))
def test_a_token_reaches_the_anchor_and_every_earlier_token(d: int, back: int) -> None:
    token = CHAIN.token(d)
    assert reaches(token, d, CHAIN.anchor)
    earlier = d - back
    if earlier >= 1 and back >= 1:
        assert reaches(token, back, CHAIN.token(earlier))
        assert not reaches(CHAIN.token(earlier), back, token)  # not backwards


def test_the_chain_is_its_definition() -> None:
    value = b"\x07" * TOKEN_BYTES
    values = [value]
    for _ in range(CHAIN_LENGTH):
        value = step(value)
        values.append(value)
    assert CHAIN.anchor == values[-1]
    assert [CHAIN.token(d) for d in (1, 33, 511, CHAIN_LENGTH)] == \
        [values[CHAIN_LENGTH - d] for d in (1, 33, 511, CHAIN_LENGTH)]


def test_bounds() -> None:
    assert not reaches(CHAIN.token(1), 0, CHAIN.anchor)
    assert not reaches(CHAIN.token(1), CHAIN_LENGTH + 1, CHAIN.anchor)
    assert not reaches(b"short", 1, CHAIN.anchor)
    with pytest.raises(ValueError):
        CHAIN.token(0)
    with pytest.raises(ValueError):
        CHAIN.token(CHAIN_LENGTH + 1)
    assert IncChain().anchor != IncChain().anchor  # random seeds
