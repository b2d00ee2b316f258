"""Fuzz every decoder of the replicated store: any bytes are applied or StateProtocolError."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet import wire
from meshnet.state import (
    SIG_BYTES,
    Entry,
    Hlc,
    Refusal,
    StateProtocolError,
    Store,
    StoreConfig,
    codec,
)

T0 = 1_700_000_000.0
INTS = st.integers(-(1 << 63), (1 << 64) - 1)  # what msgpack can encode


def _sign(msg: bytes) -> bytes:
    return hashlib.blake2b(msg, digest_size=SIG_BYTES).digest()


def _judge(e: Entry, data: Mapping[str, Any] | None, now: float) -> Refusal | None:
    """A fake authorizer: writer "a" is unknown (deferred), a wrong signature is final."""
    if e.writer == "a":
        return Refusal("no certificate yet", final=False)
    if e.sig != _sign(codec.signed_bytes(e)):
        return Refusal("bad signature", final=True)
    return None


def _seeded() -> tuple[Store, list[bytes]]:
    a = Store("a", StoreConfig(signer=_sign))
    b = Store("b")
    samples = []
    for i in range(40):
        e = a.put("endpoints" if i % 2 else "networks", f"k{i}", {"node": "a", "i": i}, T0)
        samples.append(codec.encode_delta(e))
    a.delete("networks", "k0", T0)
    b.put("networks", "other", {"x": [1, 2, {"y": None}]}, T0)
    samples.append(a.digest())
    samples.append(b.digest())
    diff = a.diff_for(b.digest())
    samples.append(diff)
    back = b.apply_entries(diff, T0)
    assert back is not None
    samples.append(back)
    return b, samples


TARGET, SAMPLES = _seeded()


def _exercise(data: bytes) -> None:
    for cfg in (StoreConfig(max_clock_skew=1e9),
                StoreConfig(max_clock_skew=1e9, signer=_sign, authorizer=_judge)):
        _exercise_one(data, cfg)


def _exercise_one(data: bytes, cfg: StoreConfig) -> None:
    store = Store("z", cfg)
    store.put("networks", "k1", {"x": 1}, T0)
    for fn in (
        lambda d: store.apply_delta(d, T0),
        lambda d: store.apply_entries(d, T0),
        store.diff_for,
    ):
        try:
            out = fn(data)
        except StateProtocolError:
            continue
        assert out is None or isinstance(out, bool | bytes)
    if store.version == 1 and len(store) == 1:
        return  # nothing was accepted
    # whatever was accepted leaves a store that still works end to end
    other = Store("y", cfg)
    back = store.apply_entries(other.diff_for(store.digest()), T0)
    assert back is not None
    other.apply_entries(back, T0)
    store.view("networks")
    store.endpoints()


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    _exercise(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 3), st.binary(max_size=256))
def test_random_bytes_behind_a_valid_type_byte(t: int, body: bytes) -> None:
    _exercise(bytes((t,)) + body)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(range(len(SAMPLES))),
    st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), max_size=4),
    st.integers(0, 1 << 16),
    st.binary(max_size=8),
)
def test_mutated_valid_messages(
    idx: int, flips: list[tuple[int, int]], cut: int, tail: bytes
) -> None:
    msg = bytearray(SAMPLES[idx])
    for i, x in flips:
        msg[i % len(msg)] ^= x
    _exercise(bytes(msg[: cut % (len(msg) + 1)]) + tail)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | INTS
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.floats(allow_nan=True),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=250, deadline=None)
@given(st.integers(0, 4), msgpack_values)
def test_well_formed_msgpack_of_any_shape(t: int, body: object) -> None:
    """Structurally valid msgpack with the wrong shapes and types inside."""
    try:
        data = wire.frame(t, body)
    except (OverflowError, ValueError, TypeError):
        return
    _exercise(data)


_NO_SIG = object()
SIGS = st.one_of(
    st.just(_NO_SIG),
    st.none(),
    st.binary(min_size=SIG_BYTES, max_size=SIG_BYTES),
    st.binary(max_size=SIG_BYTES + 2),
    INTS,
    st.text(max_size=SIG_BYTES),
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.text(max_size=70), INTS),
            st.one_of(st.text(max_size=10), st.none()),
            st.one_of(st.none(), st.binary(max_size=20), INTS),
            st.one_of(st.integers(-5, (1 << 64) - 1), st.text(max_size=2)),
            st.one_of(st.text(max_size=300), st.none()),
            SIGS,
        ),
        max_size=4,
    ),
    st.one_of(
        st.none(),
        st.lists(
            st.tuples(st.text(max_size=5), st.integers(-1, 14), st.lists(st.integers(-1, 5000)))
        ),
    ),
)
def test_entries_messages_with_bad_fields(
    entries: list[tuple[object, ...]], requests: list[tuple[object, ...]] | None
) -> None:
    """Each entry with a 6th field (a signature) or without one (the tuple's last element is
    then a sentinel dropped below)."""
    entries = [e[:5] if e[5] is _NO_SIG else e for e in entries]
    body = [
        1,
        [list(e) for e in entries],
        None if requests is None else [list(r) for r in requests],
    ]
    _exercise(wire.frame(codec.MsgType.ENTRIES, body))
    for e in entries:
        _exercise(wire.frame(codec.MsgType.DELTA, [list(e)]))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.text(max_size=70), INTS),
            st.integers(-1, 14),
            st.one_of(st.binary(max_size=80), INTS),
        ),
        max_size=4,
    ),
    st.integers(-1, 3),
)
def test_digests_with_bad_fields(groups: list[tuple[object, ...]], version: int) -> None:
    _exercise(wire.frame(codec.MsgType.DIGEST, [version, [list(g) for g in groups]]))


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=8),
    st.text(min_size=1, max_size=8),
    st.one_of(st.none(), st.dictionaries(st.text(max_size=4), INTS, max_size=3)),
    st.integers(0, (1 << 47) - 1),
    st.integers(0, (1 << 16) - 1),
    st.text(min_size=1, max_size=8),
    st.one_of(st.just(b""), st.binary(min_size=SIG_BYTES, max_size=SIG_BYTES)),
    st.lists(st.none() | INTS, max_size=2),
)
def test_entries_round_trip_signed_or_not(
    table: str, key: str, value: dict[str, int] | None, wall: int, logical: int, writer: str,
    sig: bytes, extra: list[object],
) -> None:
    e = Entry(table, key, None if value is None else wire.pack(value), Hlc(wall, logical), writer,
              sig)
    assert codec.decode_delta(codec.encode_delta(e)).entry == e
    assert [d.entry for d in codec.decode_entries(codec.encode_entries([e, e], None)).entries] \
        == [e, e]
    assert codec.signed_bytes(e) == codec.encode_entry(Entry(table, key, e.value, e.hlc, writer))
    # fields a newer peer appends after the signature are ignored (after an unsigned entry they
    # need a nil in the signature's place)
    body = codec.entry_body(e) if sig else [*codec.entry_body(e), None]
    assert codec.decode_delta(wire.frame(codec.MsgType.DELTA, [[*body, *extra]])).entry == e
