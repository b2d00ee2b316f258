"""The IKpsk2-style datapath handshake and its cookie replies: matching keys, and every way
they must fail."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshnet.crypto import handshake as hs
from meshnet.crypto.handshake import (
    COOKIE_REPLY_SIZE,
    INITIATION_SIZE,
    RESPONSE_SIZE,
    HandshakeError,
    MessageType,
    consume_cookie_reply,
    consume_initiation,
    consume_response,
    cookie_reply_receiver_spi,
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
from meshnet.crypto.identity import public_bytes
from meshnet.crypto.sa import CIPHER_CHACHA20_POLY1305

A = X25519PrivateKey.from_private_bytes(bytes([1]) * 32)
B = X25519PrivateKey.from_private_bytes(bytes([2]) * 32)
C = X25519PrivateKey.from_private_bytes(bytes([3]) * 32)
PA, PB, PC = public_bytes(A), public_bytes(B), public_bytes(C)
PSK = derive_psk(bytes(range(32)))
OTHER_PSK = derive_psk(bytes(range(1, 33)))
TS = tai64n(1_700_000_000.25)
NONCE = bytes(range(12))


def remac(initiation: bytes, receiver_static: bytes = PB, psk: bytes = PSK) -> bytes:
    """An initiation with mac1 recomputed over its (changed) body, as an insider with the psk
    could, and no mac2."""
    body = initiation[: hs.MAC1_AT]
    return body + hs._mac1(psk, receiver_static, body) + bytes(16)


def full_handshake(
    psk_i: bytes = PSK, psks_r: tuple[bytes, ...] = (PSK,)
) -> tuple[hs.HandshakeResult, hs.HandshakeResult]:
    m1, state = create_initiation(A, PB, psk_i, 1000, TS)
    received = consume_initiation(B, psks_r, m1)
    m2, r_resp = create_response(received, 2000)
    r_init = consume_response(state, m2)
    return r_init, r_resp


def test_both_sides_derive_matching_keys_and_spis() -> None:
    i, r = full_handshake()
    assert i.send_key == r.recv_key and i.recv_key == r.send_key
    assert i.send_key != i.recv_key and len(i.send_key) == 32
    # Each side receives on the SPI it chose.
    assert (i.inbound_spi, i.outbound_spi) == (1000, 2000)
    assert (r.inbound_spi, r.outbound_spi) == (2000, 1000)
    assert i.remote_static == PB and r.remote_static == PA
    assert i.initiator and not r.initiator
    assert i.cipher == r.cipher == "aes-256-gcm"


def test_message_sizes_and_framing() -> None:
    m1, _state = create_initiation(A, PB, PSK, 1000, TS)
    assert len(m1) == INITIATION_SIZE == 152 and m1[-16:] == bytes(16)  # no cookie, no mac2
    assert m1[:4] == bytes(4) and m1[4] == 1 and m1[5] == hs.VERSION
    assert hs.is_handshake(m1)
    m2, _ = create_response(consume_initiation(B, (PSK,), m1), 2000)
    assert len(m2) == RESPONSE_SIZE == 80
    assert m2[4] == 2 and hs.response_receiver_spi(m2) == 1000
    # The initiator's static key is not visible on the wire.
    assert PA not in m1 and PA not in m2


def test_fresh_ephemerals_give_fresh_keys_every_time() -> None:
    (i1, _), (i2, _) = full_handshake(), full_handshake()
    assert i1.send_key != i2.send_key


def test_cipher_is_proposed_and_echoed() -> None:
    m1, state = create_initiation(A, PB, PSK, 1000, TS, cipher=CIPHER_CHACHA20_POLY1305)
    received = consume_initiation(B, (PSK,), m1)
    assert received.cipher == CIPHER_CHACHA20_POLY1305
    m2, r = create_response(received, 2000)
    assert consume_response(state, m2).cipher == r.cipher == CIPHER_CHACHA20_POLY1305


def test_timestamp_is_delivered_and_ordered() -> None:
    m1, _ = create_initiation(A, PB, PSK, 1000, TS)
    assert consume_initiation(B, (PSK,), m1).timestamp == TS
    assert tai64n(10.0) < tai64n(10.5) < tai64n(11.0) < tai64n(1e9)
    assert len(TS) == 12


def test_wrong_cluster_key_is_rejected_before_any_dh() -> None:
    m1, _ = create_initiation(A, PB, OTHER_PSK, 1000, TS)
    calls: list[int] = []
    with pytest.raises(HandshakeError) as e:
        consume_initiation(B, (PSK,), m1, on_dh=lambda: calls.append(1))
    assert e.value.reason == "mac" and calls == []


def test_any_installed_cluster_key_is_accepted_during_rotation() -> None:
    i, r = full_handshake(psk_i=OTHER_PSK, psks_r=(PSK, OTHER_PSK))
    assert i.send_key == r.recv_key


def test_psk_is_mixed_in_even_with_a_forged_mac1() -> None:
    # Someone who knows the public keys but not the psk forges mac1 by using their own psk on
    # both ends of the mac: the response must still not authenticate for the real initiator.
    m1, state = create_initiation(A, PB, PSK, 1000, TS)
    received = consume_initiation(B, (PSK,), m1)
    received.psk = OTHER_PSK  # responder mixes a different psk
    m2, _ = create_response(received, 2000)
    body = m2[:-16]
    forged = body + hs._mac1(PSK, PA, body)  # a valid mac1 for the initiator
    with pytest.raises(HandshakeError) as e:
        consume_response(state, forged)
    assert e.value.reason == "auth"


def test_initiation_for_another_responder_fails() -> None:
    m1, _ = create_initiation(A, PC, PSK, 1000, TS)  # meant for C
    with pytest.raises(HandshakeError) as e:
        consume_initiation(B, (PSK,), m1)
    assert e.value.reason == "mac"  # mac1 is keyed by the receiver's static key


def test_wrong_static_key_fails_even_with_a_valid_mac1() -> None:
    m1, _ = create_initiation(A, PC, PSK, 1000, TS)  # encrypted to C's static key
    with pytest.raises(HandshakeError) as e:  # re-MAC'd for B by someone with the psk
        consume_initiation(B, (PSK,), remac(m1))
    assert e.value.reason == "auth"


def test_responder_with_wrong_static_key_cannot_answer() -> None:
    # C pretends to be B: it can't decrypt A's initiation at all.
    m1, state = create_initiation(A, PB, PSK, 1000, TS)
    with pytest.raises(HandshakeError):
        consume_initiation(C, (PSK,), m1)
    # And a response made by C to C's own initiation from A does not open for A's state to B.
    m1c, _ = create_initiation(A, PC, PSK, 1000, TS)
    m2c, _ = create_response(consume_initiation(C, (PSK,), m1c), 2000)
    with pytest.raises(HandshakeError) as e:
        consume_response(state, m2c)
    assert e.value.reason in {"mac", "auth"}


def test_response_is_spent_after_use_and_forged_ones_do_not_spoil_state() -> None:
    m1, state = create_initiation(A, PB, PSK, 1000, TS)
    m2, _ = create_response(consume_initiation(B, (PSK,), m1), 2000)
    tampered = bytearray(m2)
    tampered[20] ^= 1  # the ephemeral
    body = bytes(tampered[:-16])
    with pytest.raises(HandshakeError):
        consume_response(state, body + hs._mac1(PSK, PA, body))
    consume_response(state, m2)  # the genuine one still works
    with pytest.raises(HandshakeError) as e:
        consume_response(state, m2)
    assert e.value.reason == "unexpected"


def test_response_to_another_initiation_is_unexpected() -> None:
    m1, _ = create_initiation(A, PB, PSK, 1000, TS)
    _, other_state = create_initiation(A, PB, PSK, 1001, TS)
    m2, _ = create_response(consume_initiation(B, (PSK,), m1), 2000)
    with pytest.raises(HandshakeError) as e:
        consume_response(other_state, m2)
    assert e.value.reason == "unexpected"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda m: m[:-1], "malformed"),
        (lambda m: m + b"\0", "malformed"),
        (lambda m: b"\1" + m[1:], "malformed"),
        (lambda m: m[:4] + b"\x09" + m[5:], "malformed"),
        (lambda m: m[:5] + b"\x01" + m[6:], "version"),  # the version before cookies
        (lambda m: m[:6] + b"\x07" + m[7:], "malformed"),
        (lambda m: m[:120] + bytes(16) + m[136:], "mac"),
        (lambda m: m[:136], "malformed"),  # a version-1-sized initiation
        (lambda m: b"", "malformed"),
    ],
)
def test_bad_initiations_raise_the_one_error(mutate: object, reason: str) -> None:
    m1, _ = create_initiation(A, PB, PSK, 1000, TS)
    assert callable(mutate)
    with pytest.raises(HandshakeError) as e:
        consume_initiation(B, (PSK,), mutate(m1))
    assert e.value.reason == reason


def test_every_single_byte_flip_of_an_initiation_is_rejected() -> None:
    cookie = make_cookie(bytes(32), b"10.0.0.1|4790")
    m1, _ = create_initiation(A, PB, PSK, 1000, TS, cookie=cookie)
    assert verify_mac2(m1, [cookie])
    for i in range(hs.MAC2_AT):  # mac1 catches any change up to mac2 ...
        bad = bytearray(m1)
        bad[i] ^= 0x80
        with pytest.raises(HandshakeError):
            consume_initiation(B, (PSK,), bytes(bad))
        assert not verify_mac2(bytes(bad), [cookie])  # ... and so does mac2
    for i in range(hs.MAC2_AT, len(m1)):  # mac2 is the guard's to check, not the handshake's
        bad = bytearray(m1)
        bad[i] ^= 0x80
        consume_initiation(B, (PSK,), bytes(bad))
        assert not verify_mac2(bytes(bad), [cookie])


def test_every_byte_flip_past_mac1_is_caught_by_the_aead() -> None:
    # With mac1 recomputed (an insider with the psk), the transcript hash still catches it.
    m1, _ = create_initiation(A, PB, PSK, 1000, TS)
    for i in range(8, hs.MAC1_AT):
        bad = bytearray(m1)
        bad[i] ^= 0x01
        with pytest.raises(HandshakeError):
            consume_initiation(B, (PSK,), remac(bytes(bad)))


def test_low_order_ephemeral_is_a_handshake_error() -> None:
    m1, _ = create_initiation(A, PB, PSK, 1000, TS)
    bad = m1[:12] + bytes(32) + m1[44:]  # all-zero public key
    with pytest.raises(HandshakeError) as e:
        consume_initiation(B, (PSK,), remac(bad))
    assert e.value.reason == "auth"


# ---- cookies ---------------------------------------------------------------------------------


def test_cookie_reply_round_trip_and_mac2() -> None:
    m1, _ = create_initiation(A, PB, PSK, 1000, TS)
    cookie = make_cookie(bytes(range(32)), source_bytes(("10.0.0.1", 4790)))
    reply = create_cookie_reply(m1, cookie, PB, PSK, NONCE)
    assert len(reply) == COOKIE_REPLY_SIZE == 56 and message_type(reply) is MessageType.COOKIE_REPLY
    assert cookie_reply_receiver_spi(reply) == 1000
    assert cookie not in reply  # encrypted
    assert consume_cookie_reply(reply, PB, PSK, initiation_mac1(m1)) == cookie
    m2, _ = create_initiation(A, PB, PSK, 1001, TS, cookie=cookie)
    assert verify_mac2(m2, [bytes(16), cookie]) and not verify_mac2(m2, [bytes(16)])
    assert not verify_mac2(m1, [cookie, bytes(16)])  # no mac2 matches nothing, zeros included
    consume_initiation(B, (PSK,), m2)  # mac2 changes nothing for the handshake


def test_cookie_is_a_mac_of_the_source_address() -> None:
    secret = bytes(32)
    a, b = source_bytes(("10.0.0.1", 4790)), source_bytes(("10.0.0.1", 4791))
    assert make_cookie(secret, a) == make_cookie(secret, a) != make_cookie(secret, b)
    assert make_cookie(secret, a) != make_cookie(bytes([1]) * 32, a)
    assert len(make_cookie(secret, a)) == 16 and source_bytes(None) == b""


def test_cookie_reply_opens_only_for_its_initiation_and_cluster() -> None:
    m1, _ = create_initiation(A, PB, PSK, 1000, TS)
    other, _ = create_initiation(A, PB, PSK, 1000, TS)
    reply = create_cookie_reply(m1, bytes(16), PB, PSK, NONCE)
    for responder, psk, mac1 in (
        (PB, PSK, initiation_mac1(other)),  # another initiation (same SPI)
        (PB, OTHER_PSK, initiation_mac1(m1)),  # another cluster key
        (PC, PSK, initiation_mac1(m1)),  # from another responder
    ):
        with pytest.raises(HandshakeError) as e:
            consume_cookie_reply(reply, responder, psk, mac1)
        assert e.value.reason == "auth"
    for i in range(len(reply)):  # any change at all
        bad = bytearray(reply)
        bad[i] ^= 0x04
        with pytest.raises(HandshakeError):
            consume_cookie_reply(bytes(bad), PB, PSK, initiation_mac1(m1))


def test_bad_cookie_replies_raise_the_one_error() -> None:
    m1, _ = create_initiation(A, PB, PSK, 1000, TS)
    reply = create_cookie_reply(m1, bytes(16), PB, PSK, NONCE)
    for bad in (reply[:-1], reply + b"\0", reply[:6] + b"\x01" + reply[7:], b"\0" * 56):
        with pytest.raises(HandshakeError):
            consume_cookie_reply(bad, PB, PSK, initiation_mac1(m1))
    with pytest.raises(ValueError):
        create_cookie_reply(m1, bytes(15), PB, PSK, NONCE)
    with pytest.raises(ValueError):
        create_initiation(A, PB, PSK, 1000, TS, cookie=bytes(8))


def test_derive_psk_is_deterministic_and_key_specific() -> None:
    assert derive_psk(b"k" * 32) == derive_psk(b"k" * 32) != derive_psk(b"j" * 32)
    assert len(derive_psk(b"k" * 32)) == 32


def test_caller_bugs_are_value_errors_not_handshake_errors() -> None:
    with pytest.raises(ValueError):
        create_initiation(A, PB, b"short", 1000, TS)
    with pytest.raises(ValueError):
        create_initiation(A, PB, PSK, 0, TS)  # SPI 0 is reserved
    with pytest.raises(ValueError):
        tai64n(float("nan"))
