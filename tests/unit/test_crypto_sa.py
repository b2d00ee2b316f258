"""Security associations and the fixed record format."""

from __future__ import annotations

import random
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from meshnet.crypto.replay import WINDOW_SIZE
from meshnet.crypto.sa import (
    CIPHER_CHACHA20_POLY1305,
    HEADER_SIZE,
    MIN_SPI,
    RECORD_OVERHEAD,
    InboundSA,
    OutboundSA,
    RecordError,
    SaExhausted,
    SpiAllocator,
    open_record,
    seal_record,
    seal_records,
)

KEY = bytes(range(32))
SPI = 0x12345678


def pair(cipher: str = "aes-256-gcm") -> tuple[OutboundSA, dict[int, InboundSA]]:
    out = OutboundSA(SPI, KEY, cipher, 0.0)
    inb = InboundSA(SPI, KEY, cipher, 0.0)
    return out, {SPI: inb}


@pytest.mark.parametrize("cipher", ["aes-256-gcm", CIPHER_CHACHA20_POLY1305])
def test_round_trip(cipher: str) -> None:
    out, table = pair(cipher)
    for payload in (b"", b"x", bytes(range(256)) * 6):
        rec = seal_record(out, payload)
        assert len(rec) == len(payload) + RECORD_OVERHEAD
        sa, plain = open_record(table, rec, 1.0)
        assert plain == payload and sa is table[SPI]
    assert table[SPI].packets == 3 and out.packets == 3
    assert table[SPI].first_seen == 1.0


def test_record_layout_is_exactly_the_documented_one() -> None:
    out, _ = pair()
    rec = seal_record(out, b"hello")
    spi, seq = struct.unpack(">IQ", rec[:HEADER_SIZE])
    assert (spi, seq) == (SPI, 1)
    nonce = struct.pack(">IQ", SPI, seq)  # the header: SPI || seq
    assert AESGCM(KEY).decrypt(nonce, rec[HEADER_SIZE:], rec[:HEADER_SIZE]) == b"hello"
    out2 = OutboundSA(SPI, KEY, CIPHER_CHACHA20_POLY1305)
    rec2 = seal_record(out2, b"hi")
    assert ChaCha20Poly1305(KEY).decrypt(nonce, rec2[12:], rec2[:12]) == b"hi"


def test_sequence_starts_at_one_and_is_never_reused() -> None:
    out, _ = pair()
    seqs = [struct.unpack(">Q", seal_record(out, b"")[4:12])[0] for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert out.next_seq(10) == 6 and out.next_seq() == 16
    batch = seal_records(out, [b"a", b"b", b"c"])
    assert [struct.unpack(">Q", r[4:12])[0] for r in batch] == [17, 18, 19]
    assert out.seq == 19


def test_exhaustion_raises_instead_of_wrapping() -> None:
    out = OutboundSA(SPI, KEY, seq_limit=3)
    seal_record(out, b"")
    with pytest.raises(SaExhausted):
        out.next_seq(3)  # all or nothing
    assert out.seq == 1
    seal_record(out, b"")
    seal_record(out, b"")
    assert out.exhausted
    with pytest.raises(SaExhausted):
        seal_record(out, b"")
    with pytest.raises(SaExhausted):
        seal_records(out, [b""])
    assert out.seq == 3


def test_tampering_with_any_byte_is_auth() -> None:
    out, table = pair()
    rec = seal_record(out, b"some payload bytes")
    for i in range(4, len(rec)):  # flipping the SPI bytes gives unknown_spi instead
        bad = bytearray(rec)
        bad[i] ^= 0x10  # (seq 1 -> 0 would be "replay": seq 0 is never valid)
        with pytest.raises(RecordError) as e:
            open_record(table, bytes(bad), 1.0)
        assert e.value.reason == "auth", i
    # A failed tag never moved the window: the genuine record still opens.
    assert open_record(table, rec, 1.0)[1] == b"some payload bytes"


def test_tampered_spi_is_unknown_spi() -> None:
    out, table = pair()
    rec = bytearray(seal_record(out, b"x"))
    rec[0] ^= 0xFF
    with pytest.raises(RecordError) as e:
        open_record(table, bytes(rec), 1.0)
    assert e.value.reason == "unknown_spi"


def test_replay_is_dropped_and_out_of_order_accepted() -> None:
    out, table = pair()
    recs = [seal_record(out, bytes([i])) for i in range(10)]
    for i in (3, 1, 2, 0, 9, 5, 4, 8, 7, 6):
        assert open_record(table, recs[i], 1.0)[1] == bytes([i])
    for rec in recs:
        with pytest.raises(RecordError) as e:
            open_record(table, rec, 1.0)
        assert e.value.reason == "replay"


def test_too_old_is_replay() -> None:
    out, table = pair()
    old = seal_record(out, b"old")
    out.next_seq(WINDOW_SIZE)
    open_record(table, seal_record(out, b"new"), 1.0)
    with pytest.raises(RecordError) as e:
        open_record(table, old, 1.0)
    assert e.value.reason == "replay"


def test_short_unknown_and_expired() -> None:
    out, table = pair()
    with pytest.raises(RecordError) as e:
        open_record(table, bytes(RECORD_OVERHEAD - 1), 1.0)
    assert e.value.reason == "short"
    with pytest.raises(RecordError) as e:
        open_record({}, seal_record(out, b"x"), 1.0)
    assert e.value.reason == "unknown_spi"
    rec = seal_record(out, b"x")
    with pytest.raises(RecordError) as e:
        open_record(table, rec, 180.0)  # REJECT_AFTER_TIME after created_at = 0
    assert e.value.reason == "expired"
    assert open_record(table, rec, 179.9)[1] == b"x"


def test_wrong_key_is_auth() -> None:
    out, _ = pair()
    other = {SPI: InboundSA(SPI, bytes(32))}
    with pytest.raises(RecordError) as e:
        open_record(other, seal_record(out, b"x"), 1.0)
    assert e.value.reason == "auth"


def test_aead_object_is_cached_per_sa() -> None:
    out, _table = pair()
    aead = out.aead
    seal_record(out, b"a")
    seal_record(out, b"b")
    assert out.aead is aead


def test_constructor_checks() -> None:
    with pytest.raises(ValueError):
        OutboundSA(0, KEY)
    with pytest.raises(ValueError):
        InboundSA(SPI, b"short")
    with pytest.raises(ValueError):
        OutboundSA(SPI, KEY, "rot13")
    with pytest.raises(ValueError):
        OutboundSA(SPI, KEY).next_seq(0)


def test_spi_allocator_gives_unique_non_reserved_spis() -> None:
    alloc = SpiAllocator(random.Random(1))
    spis = {alloc.allocate() for _ in range(1000)}
    assert len(spis) == 1000 == len(alloc) and min(spis) >= MIN_SPI
    s = next(iter(spis))
    alloc.release(s)
    assert s not in alloc and len(alloc) == 999
    # Deterministic with a seeded rng.
    assert SpiAllocator(random.Random(7)).allocate() == SpiAllocator(random.Random(7)).allocate()
