"""Fuzz every decoder of the datapath crypto: any bytes give a result or the module's one error.

Random bytes rarely get past the length check or mac1, so each decoder is also fed inputs built
to pass the cheap gates (right length and header, a valid mac1 recomputed with the psk) so that
the DH and AEAD paths see garbage too.
"""

from __future__ import annotations

import contextlib
import os
import random
import tempfile

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet.crypto import handshake as hs
from meshnet.crypto.handshake import (
    INITIATION_SIZE,
    MAC_SIZE,
    RESPONSE_SIZE,
    HandshakeError,
    MessageType,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    derive_psk,
    message_type,
    tai64n,
)
from meshnet.crypto.identity import IdentityError, load_identity, public_bytes
from meshnet.crypto.sa import InboundSA, OutboundSA, RecordError, open_record, seal_record
from meshnet.crypto.session import PeerSession, SessionConfig

A = X25519PrivateKey.from_private_bytes(bytes([5]) * 32)
B = X25519PrivateKey.from_private_bytes(bytes([6]) * 32)
PA, PB = public_bytes(A), public_bytes(B)
PSK = derive_psk(b"fuzz".ljust(32, b"-"))
TS = tai64n(1_700_000_000.0)
VALID_INIT, _ = create_initiation(A, PB, PSK, 4242, TS)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def remac(body: bytes, receiver_static: bytes) -> bytes:
    return body + hs._mac1(PSK, receiver_static, body)


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
    assert kind in (MessageType.INITIATION, MessageType.RESPONSE)
    assert len(data) in (INITIATION_SIZE, RESPONSE_SIZE)


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.binary(min_size=136, max_size=136)))
def test_consume_initiation_any_bytes(data: bytes) -> None:
    with contextlib.suppress(HandshakeError):
        consume_initiation(B, (PSK,), data)


@FUZZ
@given(st.binary(min_size=INITIATION_SIZE - 8 - MAC_SIZE, max_size=INITIATION_SIZE - 8 - MAC_SIZE))
def test_consume_initiation_past_the_mac(rest: bytes) -> None:
    # A valid header and mac1 (an insider with the psk, or a bug): DH and AEAD see garbage.
    data = remac(VALID_INIT[:8] + rest, PB)
    with contextlib.suppress(HandshakeError):
        consume_initiation(B, (PSK,), data)


@FUZZ
@given(st.data())
def test_mutated_initiations_with_valid_mac(data: st.DataObject) -> None:
    body = mutate(VALID_INIT[:-MAC_SIZE], data)
    try:
        received = consume_initiation(B, (PSK,), remac(body, PB))
    except HandshakeError:
        return
    # Only an unmutated body authenticates.
    assert body == VALID_INIT[:-MAC_SIZE] and received.initiator_static == PA


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


_CFG = SessionConfig(rekey_after_time=2.0, reject_after_time=3.0, rekey_timeout=0.5)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=160), st.data()), max_size=8))
def test_session_receive_handshake_any_sequence(messages: list[object]) -> None:
    a = PeerSession(A, PB, PSK, rng=random.Random(1), config=_CFG)
    b = PeerSession(B, PA, PSK, rng=random.Random(2), config=_CFG)
    a.start(1000.0)
    [m1] = a.handshakes_to_send()
    now = 1000.0
    for item in messages:
        now += 0.1
        if isinstance(item, bytes):
            raw = item
        else:
            assert isinstance(item, st.DataObject)
            raw = remac(mutate(m1[:-MAC_SIZE], item), PB)
        for s in (a, b):
            with contextlib.suppress(HandshakeError):
                s.receive_handshake(raw, now)
            s.handle_timer(now)
            assert len(s.inbound_sas()) <= 4
    # A genuine exchange still works afterwards (a's next retry).
    now += 10
    a.handle_timer(now)
    latest = a.handshakes_to_send()[-1]
    b.receive_handshake(latest, now)
    a.receive_handshake(b.handshakes_to_send()[-1], now)
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
