"""Hypothesis: the budgeted decoders (meshnet.decode_budget and its users: push-pull,
anti-entropy messages, store values, the decode cache's byte bound, the store's MAX_STORE_BYTES)
decode what wire.unpack decodes, raise only their protocol's exception, and keep their bounds."""

from __future__ import annotations

import contextlib
from unittest import mock

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet import decode_budget, wire
from meshnet.decode_budget import Budget
from meshnet.membership import MembershipProtocolError
from meshnet.membership.messages import (
    DecodeCache,
    MsgType,
    PushPullOverBudget,
    decode_packet,
    decode_push_pull,
)
from meshnet.state import Entry, Hlc, StateProtocolError, Store, StoreFull, codec
from meshnet.state.store import STORE_ENTRY_BYTES

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T0 = 1_700_000_000.0

leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=40),
)
values = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=8), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=40,
)


class Over(Exception):
    pass


class Bad(Exception):
    pass


def _unpack(data: bytes, limit: int, always: bool) -> tuple[str, object, int]:
    budget = Budget(limit)
    try:
        got = decode_budget.unpack(data, budget, max_bytes=wire.MAX_STREAM_BYTES, exc=Bad,
                                   over=Over, always_charge=always)
    except Over:
        return "over", None, budget.used
    except Bad:
        return "bad", None, budget.used
    return "ok", got, budget.used


@SETTINGS
@given(values, st.integers(min_value=0, max_value=20_000), st.booleans())
def test_budgeted_unpack_is_wire_unpack_within_its_budget(
    body: object, limit: int, always: bool
) -> None:
    data = msgpack.packb(body, use_bin_type=True)
    kind, got, used = _unpack(data, limit, always)
    full_kind, _, estimate = _unpack(data, 10**9, True)
    assert full_kind == "ok"
    # An input's estimate never passes MAX_BYTES_PER_INPUT_BYTE a byte: the unhooked path is safe.
    assert estimate <= len(data) * decode_budget.MAX_BYTES_PER_INPUT_BYTE
    if estimate <= limit:
        assert kind == "ok" and got == wire.unpack(data, max_bytes=wire.MAX_STREAM_BYTES)
        assert used in (0, estimate)
    else:
        assert kind == "over" and used > limit


@SETTINGS
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=5_000), st.booleans())
def test_budgeted_unpack_of_any_bytes(data: bytes, limit: int, always: bool) -> None:
    kind, got, _ = _unpack(data, limit, always)
    try:
        plain = wire.unpack(data, max_bytes=wire.MAX_STREAM_BYTES, exc=Bad)
    except Bad:
        assert kind in ("bad", "over")  # the budget may run out before the damage is read
        return
    assert kind == "over" or (kind == "ok" and got == plain)


@SETTINGS
@given(values, st.integers(min_value=0, max_value=20_000))
def test_push_pull_under_any_budget_raises_only_its_protocol_error(
    body: object, budget: int
) -> None:
    data = bytes((MsgType.PUSH_PULL,)) + msgpack.packb(body, use_bin_type=True)
    framed = bytes((MsgType.PUSH_PULL,)) + msgpack.packb([1, False, [body], b""],
                                                         use_bin_type=True)
    for d in (data, framed):
        try:
            decode_push_pull(d, budget=budget, cache=DecodeCache(max_bytes=budget + 1))
        except PushPullOverBudget:
            pass
        except MembershipProtocolError:
            pass


@SETTINGS
@given(values, st.integers(min_value=0, max_value=50_000))
def test_entries_and_digests_under_any_budget_raise_only_state_protocol_error(
    body: object, budget: int
) -> None:
    value = msgpack.packb(body, use_bin_type=True)
    entries = [["networks", "k", value, 1 << 16, "w"], ["t", "k2", None, 1 << 16, "w"], body]
    msgs = [
        wire.frame(codec.MsgType.ENTRIES, [1, entries, None]),
        wire.frame(codec.MsgType.ENTRIES, [1, [body], [["t", 0, [0]]]]),
        wire.frame(codec.MsgType.DIGEST, [1, [["t", 0, bytes(8), body]], body]),
    ]
    with mock.patch.object(codec, "MAX_STREAM_DECODE_BYTES", budget):
        for m in msgs:
            with contextlib.suppress(StateProtocolError):
                codec.decode_entries(m)
            with contextlib.suppress(StateProtocolError):
                codec.decode_digest_groups(m)
    try:
        data, size = codec.decode_value_sized(value)
    except StateProtocolError:
        return
    assert data == wire.unpack(value) and size >= 64  # at least the map itself


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 3000)), max_size=60),
       st.integers(min_value=1, max_value=40_000))
def test_decode_cache_stays_under_its_bytes_and_answers_as_decoding_does(
    parts: list[tuple[int, int]], max_bytes: int
) -> None:
    cache = DecodeCache(max_bytes=max_bytes)
    for name, pad in parts:
        part = bytes((MsgType.SUSPECT,)) + msgpack.packb([1, f"x{name}", "n", b"\0" * pad])
        assert list(cache.decode(part)) == decode_packet(part)
        biggest = 2 * (len(part) + 1024)  # one entry alone may pass a tiny bound
        assert cache.used <= max(max_bytes, biggest)


Op = tuple[str, int, int]  # (put | delete | remote | remote-delete, key, value size)
ops = st.lists(st.tuples(st.sampled_from(["put", "delete", "remote", "remote-delete"]),
                         st.integers(0, 8), st.integers(0, 3000)), max_size=40)


@SETTINGS
@given(ops, st.integers(min_value=0, max_value=30_000))
def test_store_bytes_held_is_the_sum_of_its_entries_and_stays_under_the_bound(
    script: list[Op], max_bytes: int
) -> None:
    s = Store("a", max_bytes=max_bytes)
    for step, (op, k, n) in enumerate(script):
        key, value = f"k{k}", {"v": b"x" * n, "l": [[]] * (n % 7)}
        before = s.stats.bytes_held
        try:
            if op == "put":
                s.put("t", key, value, T0)
            elif op == "delete":
                s.delete("t", key, T0)
            else:
                blob = None if op == "remote-delete" else wire.pack(value)
                e = Entry("t", key, blob, Hlc(int(T0 * 1000) + step + 1, 0), "b")
                s.apply_delta(codec.encode_delta(e), T0)
        except StoreFull:
            assert s.stats.bytes_held == before
        # Only a write that does not grow the store may take it past the bound.
        assert s.stats.bytes_held <= max(max_bytes, before)
        total = 0
        for e in s.entries():
            size = 0 if e.value is None else codec.decode_value_sized(e.value)[1]
            total += STORE_ENTRY_BYTES + len(e.key) + (0 if e.value is None else len(e.value))
            total += size
        assert s.stats.bytes_held == total
