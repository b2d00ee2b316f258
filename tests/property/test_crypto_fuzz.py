"""Fuzz every decoder of the datapath crypto: any bytes give a result or the module's one error.

Random bytes rarely get past the length check or mac1, so each decoder is also fed inputs built
to pass the cheap gates (right length and header, a valid mac1 recomputed with the psk) so that
the DH and AEAD paths see garbage too. The cookie machinery (#14) gets the same treatment: the
cookie reply decoder, the guard's admission of initiations (its limits hold whatever arrives),
and sessions fed cookie replies, initiations and copies from any source.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from collections import Counter

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet.crypto import handshake as hs
from meshnet.crypto.handshake import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    MAC1_AT,
    MAC_SIZE,
    RESPONSE_SIZE,
    HandshakeError,
    MessageType,
    consume_cookie_reply,
    consume_initiation,
    consume_response,
    create_cookie_reply,
    create_initiation,
    create_response,
    derive_psk,
    initiation_mac1,
    make_cookie,
    message_type,
    source_bytes,
    tai64n,
    verify_mac2,
)
from meshnet.crypto.identity import IdentityError, load_identity, public_bytes
from meshnet.crypto.sa import InboundSA, OutboundSA, RecordError, open_record, seal_record
from meshnet.crypto.session import (
    EPHEMERAL_BURST,
    GLOBAL_BURST,
    SEEN_INITIATIONS,
    SOURCE_BURST,
    HandshakeGuard,
    PeerSession,
    SessionConfig,
)

A = X25519PrivateKey.from_private_bytes(bytes([5]) * 32)
B = X25519PrivateKey.from_private_bytes(bytes([6]) * 32)
PA, PB = public_bytes(A), public_bytes(B)
PSK = derive_psk(b"fuzz".ljust(32, b"-"))
TS = tai64n(1_700_000_000.0)
VALID_INIT, _ = create_initiation(A, PB, PSK, 4242, TS)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def remac(body: bytes, receiver_static: bytes) -> bytes:
    """BODY with a valid mac1 (an insider with the psk); an initiation body also gets a zero
    mac2."""
    out = body + hs._mac1(PSK, receiver_static, body)
    return out + bytes(MAC_SIZE) if len(body) == MAC1_AT else out


def mutate(original: bytes, data: st.DataObject) -> bytes:
    out = bytearray(original)
    flips = data.draw(
        st.lists(st.tuples(st.integers(0, len(out) - 1), st.integers(1, 255)), max_size=6)
    )
    for i, x in flips:
        out[i] ^= x
    return bytes(out)


@FUZZ
@given(st.binary(max_size=300))
def test_message_type_any_bytes(data: bytes) -> None:
    try:
        kind = message_type(data)
    except HandshakeError:
        return
    assert kind in (MessageType.INITIATION, MessageType.RESPONSE, MessageType.COOKIE_REPLY)
    assert len(data) in (INITIATION_SIZE, RESPONSE_SIZE, COOKIE_REPLY_SIZE)


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.binary(min_size=152, max_size=152)))
def test_consume_initiation_any_bytes(data: bytes) -> None:
    with contextlib.suppress(HandshakeError):
        consume_initiation(B, (PSK,), data)


@FUZZ
@given(st.binary(min_size=MAC1_AT - 8, max_size=MAC1_AT - 8))
def test_consume_initiation_past_the_mac(rest: bytes) -> None:
    # A valid header and mac1 (an insider with the psk, or a bug): DH and AEAD see garbage.
    data = remac(VALID_INIT[:8] + rest, PB)
    with contextlib.suppress(HandshakeError):
        consume_initiation(B, (PSK,), data)


@FUZZ
@given(st.data())
def test_mutated_initiations_with_valid_mac(data: st.DataObject) -> None:
    body = mutate(VALID_INIT[:MAC1_AT], data)
    try:
        received = consume_initiation(B, (PSK,), remac(body, PB))
    except HandshakeError:
        return
    # Only an unmutated body authenticates.
    assert body == VALID_INIT[:MAC1_AT] and received.initiator_static == PA


@FUZZ
@given(st.data())
def test_consume_response_any_bytes(data: st.DataObject) -> None:
    m1, state = create_initiation(A, PB, PSK, 4242, TS)
    genuine, _ = create_response(consume_initiation(B, (PSK,), m1), 777)
    raw = data.draw(
        st.one_of(
            st.binary(max_size=200),
            # right header (receiver SPI matches), valid mac1, garbage ephemeral and tag
            st.binary(min_size=64 - 16, max_size=64 - 16).map(
                lambda rest: remac(genuine[:16] + rest, PA)
            ),
            # the genuine response with flipped bytes, mac1 recomputed
            st.just(genuine[:-MAC_SIZE]).map(lambda b: remac(mutate(b, data), PA)),
        )
    )
    try:
        result = consume_response(state, raw)
    except HandshakeError:
        return
    assert raw == genuine and result.outbound_spi == 777


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.binary(min_size=28, max_size=80)), st.data())
def test_open_record_any_bytes(data: bytes, more: st.DataObject) -> None:
    key = bytes(32)
    table = {0x01020304: InboundSA(0x01020304, key), 0x0A0B0C0D: InboundSA(0x0A0B0C0D, key)}
    if more.draw(st.booleans()) and len(data) >= 4:
        data = b"\x01\x02\x03\x04" + data[4:]  # a known SPI, so the AEAD path runs
    try:
        _sa, _plain = open_record(table, data, 1.0)
    except RecordError as e:
        assert e.reason in {"short", "unknown_spi", "auth", "replay", "expired"}
        return
    raise AssertionError("a forged record opened")  # pragma: no cover


@FUZZ
@given(st.data())
def test_mutated_records_never_open_and_never_crash(data: st.DataObject) -> None:
    key = bytes(range(32))
    out = OutboundSA(0x01020304, key)
    table = {0x01020304: InboundSA(0x01020304, key)}
    payload = data.draw(st.binary(max_size=64))
    rec = seal_record(out, payload)
    bad = mutate(rec, data)
    try:
        _, plain = open_record(table, bad, 1.0)
    except RecordError:
        return
    assert bad == rec and plain == payload


# ---- cookies ---------------------------------------------------------------------------------

COOKIE = make_cookie(bytes(32), source_bytes(("10.0.0.1", 4790)))
VALID_REPLY = create_cookie_reply(VALID_INIT, COOKIE, PB, PSK, bytes(12))


@FUZZ
@given(st.data())
def test_consume_cookie_reply_any_bytes(data: st.DataObject) -> None:
    raw = data.draw(
        st.one_of(
            st.binary(max_size=120),
            st.binary(min_size=COOKIE_REPLY_SIZE - 8, max_size=COOKIE_REPLY_SIZE - 8).map(
                lambda rest: VALID_REPLY[:8] + rest  # the right header, anything after
            ),
            st.just(VALID_REPLY).map(lambda r: mutate(r, data)),
        )
    )
    try:
        cookie = consume_cookie_reply(raw, PB, PSK, initiation_mac1(VALID_INIT))
    except HandshakeError:
        return
    assert raw == VALID_REPLY and cookie == COOKIE


@FUZZ
@given(st.data())
def test_mac2_only_for_the_exact_message_and_cookie(data: st.DataObject) -> None:
    m, _ = create_initiation(A, PB, PSK, 4242, TS, cookie=COOKIE)
    bad = mutate(m, data)
    other = data.draw(st.binary(min_size=16, max_size=16))
    assert verify_mac2(bad, [COOKIE]) == (bad == m)
    assert verify_mac2(m, [other]) == (other == COOKIE)


_SOURCES = [(f"10.7.0.{i}", 4790) for i in range(1, 5)] + [("10.7.0.1", 9999), None]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.integers(0, 7),  # which initiation (a few ephemerals, reused)
            st.sampled_from(_SOURCES),
            st.booleans(),  # with a valid mac2 for that source
            st.booleans(),  # the session wants a cookie anyway
            st.sampled_from([0.0, 0.0, 0.001, 0.05, 0.5, 3.0, 130.0]),  # time step
        ),
        max_size=150,
    )
)
def test_guard_limits_hold_whatever_arrives(steps: list[tuple[object, ...]]) -> None:
    """Any sequence of initiations, sources, cookies and times: admit() answers True, False or
    rate_limited; never a DH without a valid mac2 while a cookie is due; per (source IP,
    ephemeral), per source IP and overall, no more admitted than the buckets allow; bounded."""
    guard = HandshakeGuard(max_entries=8)
    messages = [create_initiation(A, PB, PSK, 4242 + i, TS)[0] for i in range(8)]
    now = 1000.0
    per_eph: Counter[tuple[object, bytes]] = Counter()
    per_src: Counter[object] = Counter()
    total = 0
    for index, source, with_mac2, want, step in steps:
        assert isinstance(index, int) and isinstance(step, float)
        now += step
        m = messages[index]
        if with_mac2:
            reply = guard.cookie_reply(m, source, now, PB, PSK)  # type: ignore[arg-type]
            cookie = consume_cookie_reply(reply, PB, PSK, initiation_mac1(m))
            m = m[:-MAC_SIZE] + hs._mac2(cookie, m)
        due = bool(want) or guard.under_load(now, source)  # type: ignore[arg-type]
        try:
            ok = guard.admit(m, source, now, want_cookie=bool(want))  # type: ignore[arg-type]
        except HandshakeError as e:
            assert e.reason == "rate_limited"
            continue
        if not ok:
            continue
        assert with_mac2 or not due, "a DH without a cookie while one was due"
        ip = source[0] if source is not None else None  # type: ignore[index]
        per_eph[(ip, m[12:44])] += 1
        per_src[ip] += 1
        total += 1
    elapsed = now - 1000.0
    # (eviction at max_entries=8 can hand a forgotten key a new full bucket: allow for it)
    assert all(n <= EPHEMERAL_BURST + elapsed / 60 + 2 * len(steps) / 8 + 2
               for n in per_eph.values())
    assert all(n <= SOURCE_BURST + 5 * elapsed + len(steps) for n in per_src.values())
    assert total <= GLOBAL_BURST + 50 * elapsed
    assert len(guard._ephemeral.table) <= 8 and len(guard._source.table) <= 8


_CFG = SessionConfig(rekey_after_time=2.0, reject_after_time=3.0, rekey_timeout=0.5)


def _exchange(a: PeerSession, b: PeerSession, now: float) -> None:
    for _ in range(6):
        out = [(b, m) for m in a.handshakes_to_send()] + [(a, m) for m in b.handshakes_to_send()]
        if not out:
            return
        for dst, m in out:
            with contextlib.suppress(HandshakeError):
                dst.receive_handshake(m, now, ("10.0.0.9", 4790))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.one_of(
                st.binary(max_size=160),
                st.data(),
                st.sampled_from(["init", "reply", "copy"]),
            ),
            st.sampled_from(_SOURCES),
        ),
        max_size=10,
    )
)
def test_session_receive_handshake_any_sequence(messages: list[tuple[object, object]]) -> None:
    a = PeerSession(A, PB, PSK, rng=random.Random(1), config=_CFG)
    b = PeerSession(B, PA, PSK, rng=random.Random(2), config=_CFG)
    a.start(1000.0)
    [m1] = a.handshakes_to_send()
    now = 1000.0
    sent: list[bytes] = [m1]
    for item, source in messages:
        now += 0.1
        if isinstance(item, bytes):
            raw = item
        elif item == "init":  # a genuine new initiation from a
            a.handle_timer(now + 1.0)
            sent += a.handshakes_to_send()
            raw = sent[-1]
        elif item == "reply":  # a cookie reply from b's guard, to any of a's initiations
            raw = b._guard.cookie_reply(sent[-1], source, now, PB, PSK)  # type: ignore[arg-type]
        elif item == "copy":
            raw = sent[0]
        else:
            assert isinstance(item, st.DataObject)
            raw = remac(mutate(m1[:MAC1_AT], item), PB)
        for s in (a, b):
            with contextlib.suppress(HandshakeError):
                s.receive_handshake(raw, now, source)  # type: ignore[arg-type]
            s.handle_timer(now)
            assert len(s.inbound_sas()) <= 4
            assert len(s._seen) <= SEEN_INITIATIONS
    # A genuine exchange still works afterwards (a's next retry, with a cookie round trip if b
    # asks for one).
    for s in (a, b):
        s.handshakes_to_send()
    now += 10
    a.handle_timer(now)
    _exchange(a, b, now)
    assert a.outbound() is not None


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_identity_file_any_bytes(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "id")
        with open(path, "wb") as f:
            f.write(content)
        try:
            key = load_identity(path)
        except IdentityError:
            return
        assert len(public_bytes(key)) == 32
