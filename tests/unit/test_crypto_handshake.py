"""The IKpsk2-style datapath handshake: matching keys, and every way it must fail."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshnet.crypto import handshake as hs
from meshnet.crypto.handshake import (
    INITIATION_SIZE,
    RESPONSE_SIZE,
    HandshakeError,
    consume_initiation,
    consume_response,
    create_initiation,
    create_response,
    derive_psk,
    tai64n,
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
    assert len(m1) == INITIATION_SIZE == 136
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
    body = m1[:-16]
    remac = body + hs._mac1(PSK, PB, body)  # re-MAC'd for B by someone with the psk
    with pytest.raises(HandshakeError) as e:
        consume_initiation(B, (PSK,), remac)
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
        (lambda m: m[:5] + b"\x02" + m[6:], "version"),
        (lambda m: m[:6] + b"\x07" + m[7:], "malformed"),
        (lambda m: m[:-16] + bytes(16), "mac"),
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
    m1, _ = create_initiation(A, PB, PSK, 1000, TS)
    for i in range(len(m1)):
        bad = bytearray(m1)
        bad[i] ^= 0x80
        with pytest.raises(HandshakeError):
            consume_initiation(B, (PSK,), bytes(bad))


def test_every_byte_flip_past_mac1_is_caught_by_the_aead() -> None:
    # With mac1 recomputed (an insider with the psk), the transcript hash still catches it.
    m1, _ = create_initiation(A, PB, PSK, 1000, TS)
    for i in range(8, len(m1) - 16):
        bad = bytearray(m1)
        bad[i] ^= 0x01
        body = bytes(bad[:-16])
        with pytest.raises(HandshakeError):
            consume_initiation(B, (PSK,), body + hs._mac1(PSK, PB, body))


def test_low_order_ephemeral_is_a_handshake_error() -> None:
    m1, _ = create_initiation(A, PB, PSK, 1000, TS)
    body = m1[:12] + bytes(32) + m1[44:-16]  # all-zero public key
    with pytest.raises(HandshakeError) as e:
        consume_initiation(B, (PSK,), body + hs._mac1(PSK, PB, body))
    assert e.value.reason == "auth"


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
