"""Hypothesis: every membership decoder maps any bytes to a message or MembershipProtocolError;
the core never raises on input; a set of updates converges whatever the order."""

from __future__ import annotations

import contextlib
import random

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet.membership import (
    Membership,
    MembershipConfig,
    MembershipProtocolError,
    MemberState,
    NodeMeta,
)
from meshnet.membership.messages import (
    Ack,
    Alive,
    Dead,
    DecodeCache,
    IndirectPing,
    MsgType,
    Nack,
    Ping,
    PushPull,
    PushPullState,
    Suspect,
    User,
    decode_packet,
    decode_push_pull,
    make_compound,
)

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# msgpack-shaped values, to get past the first byte into the body checks.
leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.binary(max_size=40),
)
values = st.recursive(
    leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=20,
)


def framed(t: int, body: object) -> bytes:
    return bytes((t,)) + msgpack.packb(body, use_bin_type=True)


typed_bodies = st.builds(framed, st.integers(min_value=0, max_value=255), values)


# One cache shared by every example, as the simulator shares one between its cores.
SHARED_CACHE = DecodeCache()


def _decode_or_error(data: bytes, cache: DecodeCache | None) -> object:
    try:
        return decode_packet(data, cache)
    except MembershipProtocolError:
        return MembershipProtocolError


def _decodes_or_protocol_error(data: bytes) -> None:
    plain = _decode_or_error(data, None)
    # The cached decoder is the same function: same messages, or the same refusal, every time.
    assert _decode_or_error(data, SHARED_CACHE) == plain
    assert _decode_or_error(data, SHARED_CACHE) == plain
    assert _decode_or_error(data, DecodeCache()) == plain
    with contextlib.suppress(MembershipProtocolError):
        decode_push_pull(data)
    with contextlib.suppress(MembershipProtocolError):
        NodeMeta.decode(data)


@SETTINGS
@given(st.binary(max_size=600))
def test_any_bytes(data: bytes) -> None:
    _decodes_or_protocol_error(data)


@SETTINGS
@given(typed_bodies)
def test_typed_msgpack_bodies(data: bytes) -> None:
    _decodes_or_protocol_error(data)


@SETTINGS
@given(st.lists(st.one_of(typed_bodies, st.binary(max_size=30)), min_size=1, max_size=6))
def test_compounds_of_junk(parts: list[bytes]) -> None:
    _decodes_or_protocol_error(make_compound(parts) if len(parts) > 1 else parts[0])
    # Truncations and bit flips of a valid compound.
    pkt = make_compound([Ping(1, "a", "b").encode(), *parts])
    for cut in range(0, len(pkt), max(1, len(pkt) // 7)):
        _decodes_or_protocol_error(pkt[:cut])


@SETTINGS
@given(st.lists(values, max_size=4), st.integers(min_value=0, max_value=3))
def test_push_pull_rows(rows: list[object], state: int) -> None:
    meta = NodeMeta("n", ("h", 1))
    body = [1, False, [*rows, ["n", 1, state, meta.encode()]], b""]
    _decodes_or_protocol_error(framed(MsgType.PUSH_PULL, body))
    _decodes_or_protocol_error(framed(MsgType.ALIVE, [1, msgpack.packb(rows)]))


names = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,10}[A-Za-z0-9])?", fullmatch=True)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
metas = st.builds(
    lambda n, h, p, lab, ex: NodeMeta(n, (h, p), lab, ex),
    names,
    st.text(min_size=1, max_size=15),
    st.integers(min_value=0, max_value=65535),
    st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(st.binary(max_size=32), st.text(max_size=8), st.integers(-(2**40), 2**40)),
        max_size=3,
    ),
)
messages = st.one_of(
    st.builds(Ping, u32, names, names),
    st.builds(IndirectPing, u32, names, st.tuples(st.text(min_size=1, max_size=15),
                                                 st.integers(0, 65535)), st.booleans()),
    st.builds(Ack, u32),
    st.builds(Nack, u32),
    st.builds(Suspect, u32, names, names),
    st.builds(Dead, u32, names, names),
    metas.map(lambda m: Alive(3, m, m.encode())),
    st.binary(max_size=50).map(User),
)


@SETTINGS
@given(st.lists(messages, min_size=1, max_size=5))
def test_roundtrip(msgs: list[object]) -> None:
    parts = [m.encode() for m in msgs]  # type: ignore[attr-defined]
    assert decode_packet(make_compound(parts)) == msgs
    assert decode_packet(make_compound(parts), SHARED_CACHE) == msgs
    assert decode_packet(make_compound(parts), SHARED_CACHE) == msgs


@SETTINGS
@given(st.lists(metas, max_size=5, unique_by=lambda m: m.name), st.binary(max_size=30))
def test_push_pull_roundtrip(ms: list[NodeMeta], user: bytes) -> None:
    pp = PushPull(
        True,
        [
            PushPullState(m.name, i, list(MemberState)[i % 4], m, m.encode())
            for i, m in enumerate(ms)
        ],
        user,
    )
    assert decode_push_pull(pp.encode()) == pp


@SETTINGS
@given(st.lists(st.one_of(st.binary(max_size=200), typed_bodies), max_size=8))
def test_core_never_raises_on_input(datas: list[bytes]) -> None:
    m = Membership(MembershipConfig.lan(), NodeMeta("me", ("10.0.0.1", 1)), random.Random(0), 0.0)
    for i, d in enumerate(datas):
        m.receive_datagram(d, ("10.0.0.2", 1), float(i))
        assert m.handle_stream_request(d, ("10.0.0.2", 1), float(i)) is None or True
        m.receive_stream_reply(d, ("10.0.0.2", 1), float(i))
        m.handle_timer(float(i))
    assert m.stats["bad_packets"] <= len(datas)


# ---------------------------------------------------------------- convergence

NODES = ["a", "b", "c"]


def _update(kind: str, node: str, inc: int) -> bytes:
    if kind == "alive":
        # Only the node itself issues alive at an incarnation, so the metadata is a function of it.
        meta = NodeMeta(node, ("10.1.0.1", 1), {"inc": str(inc)})
        return Alive(inc, meta, meta.encode()).encode()
    if kind == "suspect":
        return Suspect(inc, node, "w").encode()
    if kind == "dead":
        return Dead(inc, node, "w").encode()
    return Dead(inc, node, node).encode()  # left


updates = st.lists(
    st.tuples(
        st.sampled_from(["alive", "suspect", "dead", "left"]),
        st.sampled_from(NODES),
        st.integers(min_value=0, max_value=4),
    ),
    min_size=1,
    max_size=14,
)


def _view(order: list[bytes]) -> list[tuple[str, MemberState, int, object]]:
    m = Membership(MembershipConfig.lan(), NodeMeta("me", ("10.0.0.1", 1)), random.Random(0), 0.0)
    # A shared base view: everyone first learned every node alive at 0.
    for n in NODES:
        m.receive_datagram(_update("alive", n, 0), ("10.0.0.2", 1), 0.0)
    for d in order:
        m.receive_datagram(d, ("10.0.0.2", 1), 1.0)
    return [
        (x.name, x.state, x.incarnation, dict(x.meta.labels)) for x in m.members() if x.name != "me"
    ]


@settings(max_examples=200, deadline=None)
@given(updates, st.randoms(use_true_random=False))
def test_updates_converge_in_any_order(ups: list[tuple[str, str, int]], rnd: random.Random) -> None:
    datas = [_update(*u) for u in ups]
    base = _view(datas)
    for _ in range(3):
        shuffled = datas[:]
        rnd.shuffle(shuffled)
        assert _view(shuffled) == base
