"""Fuzz the keyring's decoders: any input gives a result or KeyringError, nothing else."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.crypto.keyring import SEAL_OVERHEAD, Keyring, KeyringError, parse_key

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
RING = Keyring(K1, (K2,))


@given(st.binary(max_size=2048), st.integers(min_value=0, max_value=255))
def test_open_any_bytes_gives_bytes_or_keyring_error(data: bytes, kind: int) -> None:
    try:
        out = RING.open(data, kind)
    except KeyringError:
        return
    assert isinstance(out, bytes)  # pragma: no cover - a forgery would be news


@given(
    st.binary(max_size=256),
    st.integers(min_value=0, max_value=255),
    st.data(),
)
def test_mutated_sealed_messages_never_crash(plain: bytes, kind: int, data: st.DataObject) -> None:
    original = RING.seal(plain, kind)
    assert len(original) == len(plain) + SEAL_OVERHEAD
    assert RING.open(original, kind) == plain
    # mutate: flip bytes, truncate, append
    sealed = bytearray(original)
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(sealed) - 1), st.integers(1, 255)), max_size=4)
    )
    for i, x in flips:
        sealed[i] ^= x
    cut = data.draw(st.integers(0, len(sealed)))
    tail = data.draw(st.binary(max_size=8))
    mutated = bytes(sealed[:cut]) + tail
    try:
        out = RING.open(mutated, kind)
    except KeyringError:
        return
    # only an unchanged message may open (flips of the same byte can cancel out)
    assert mutated == original
    assert out == plain


@given(st.text(max_size=100))
def test_parse_key_any_text_gives_bytes_or_keyring_error(text: str) -> None:
    try:
        key = parse_key(text)
    except KeyringError:
        return
    assert isinstance(key, bytes) and len(key) == 32


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/= \n"))
def test_parse_key_base64ish_text(text: str) -> None:
    try:
        key = parse_key(text)
    except KeyringError:
        return
    assert len(key) == 32


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)


@settings(max_examples=200)
@given(json_values, st.binary(max_size=200))
def test_keyring_from_json_any_document(doc: object, raw: bytes) -> None:
    for data in (json.dumps(doc).encode(), raw):
        try:
            ring = Keyring.from_json(data)
        except KeyringError:
            continue
        assert len(ring) >= 1


def test_from_json_round_trip_is_exact() -> None:
    ring = Keyring(K1, (K2,))
    assert Keyring.from_json(ring.to_json()).keys() == ring.keys()
