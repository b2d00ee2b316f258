"""Security associations of the encrypted datapath, and the record format they seal.

One SA carries one direction between two nodes. Its SPI is chosen by the RECEIVER (as in IPsec),
so the receiver can look a record up in one table without knowing who sent it.

Record format (fixed; the datapath codes against it)::

    record = SPI (4 bytes BE) || seq (8 bytes BE) || AEAD(key, nonce, plaintext, aad) || tag (16)
    nonce  = aad = SPI || seq                        (the 12-byte header: the size GCM is
                                                      designed for)

- The nonce is the header itself, so a record costs no nonce to build (the datapath seals ~46
  records per 64 KB). The SPI is fixed for the SA's key, so the nonce is unique exactly when the
  sequence number is (WireGuard's 0^4 || counter is the same construction with a zero prefix).
- The sequence number starts at 1 and never repeats on an SA (RFC 4303): with a fixed key the
  nonce IS the sequence number, so a repeat would be catastrophic for GCM. `OutboundSA.next_seq`
  refuses (`SaExhausted`) long before 2**64; the session rekeys long before that
  (`REKEY_AFTER_MESSAGES` = 2**40 or 120 s, whichever first).
- The receiver checks the replay window before the tag (cheap drop of duplicates) and updates
  it only after the tag verified (RFC 4303 §3.4.3).

All of this is pure: `now` is passed in, nothing here reads a clock or a socket.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable, Mapping
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from meshnet.crypto.replay import ReplayWindow

__all__ = [
    "CIPHERS",
    "CIPHER_AES_256_GCM",
    "CIPHER_CHACHA20_POLY1305",
    "DEFAULT_CIPHER",
    "HEADER_SIZE",
    "KEY_SIZE",
    "MAX_SEQ",
    "MIN_SPI",
    "RECORD_OVERHEAD",
    "REJECT_AFTER_MESSAGES",
    "REJECT_AFTER_TIME",
    "TAG_SIZE",
    "InboundSA",
    "OutboundSA",
    "RecordError",
    "RecordErrorReason",
    "SaExhausted",
    "SpiAllocator",
    "open_record",
    "seal_record",
    "seal_records",
]

CIPHER_AES_256_GCM = "aes-256-gcm"
CIPHER_CHACHA20_POLY1305 = "chacha20-poly1305"
# AES-GCM by default: this machine has AES-NI, where GCM is the fastest AEAD `cryptography` has.
DEFAULT_CIPHER = CIPHER_AES_256_GCM
CIPHERS: dict[str, type[AESGCM] | type[ChaCha20Poly1305]] = {
    CIPHER_AES_256_GCM: AESGCM,
    CIPHER_CHACHA20_POLY1305: ChaCha20Poly1305,
}
# Both ciphers take 256-bit keys; the handshake's split yields exactly this much per direction.
KEY_SIZE = 32
# SPI (4) + sequence number (8).
HEADER_SIZE = 12
# Full-length tags: truncating saves 8 bytes a packet and halves forgery resistance.
TAG_SIZE = 16
RECORD_OVERHEAD = HEADER_SIZE + TAG_SIZE  # 28
# The wire field is 64 bits.
MAX_SEQ = (1 << 64) - 1
# Hard stop for one SA, far below 2**64 (nonce reuse) and far above the rekey point (2**40):
# if rekeying keeps failing, the SA stops sealing instead of ever approaching a wrap. At
# 10 million records/s this is still ~325 days of traffic.
REJECT_AFTER_MESSAGES = 1 << 48
# An SA older than this is refused on both sides (WireGuard's REJECT_AFTER_TIME).
REJECT_AFTER_TIME = 180.0
# RFC 4303 §2.1: SPI 0 is reserved (handshake messages use 4 zero bytes where a record has its
# SPI, so the two can share one UDP port) and 1..255 are reserved by IANA.
MIN_SPI = 256
MAX_SPI = (1 << 32) - 1

_HEADER = struct.Struct(">IQ")

RecordErrorReason = Literal["short", "unknown_spi", "auth", "replay", "expired"]


class SaExhausted(Exception):
    """The outbound SA has used up its sequence numbers: rekey (this is never a wrap)."""


class RecordError(Exception):
    """A record that must be dropped; `reason` is the counter to bump."""

    def __init__(self, reason: RecordErrorReason) -> None:
        super().__init__(reason)
        self.reason: RecordErrorReason = reason


def _aead(key: bytes, cipher: str) -> AESGCM | ChaCha20Poly1305:
    try:
        cls = CIPHERS[cipher]
    except KeyError:
        raise ValueError(f"unknown cipher {cipher!r}; expected one of {sorted(CIPHERS)}") from None
    if len(key) != KEY_SIZE:
        raise ValueError(f"SA key must be {KEY_SIZE} bytes, got {len(key)}")
    return cls(key)


def _check_spi(spi: int) -> None:
    if not MIN_SPI <= spi <= MAX_SPI:
        raise ValueError(f"SPI must be in {MIN_SPI}..{MAX_SPI}, got {spi}")


class OutboundSA:
    """The sending half of an SA: key, cached AEAD object, and the next sequence number."""

    __slots__ = (
        "_seq",
        "aead",
        "bytes",
        "cipher",
        "created_at",
        "key",
        "packets",
        "seq_limit",
        "spi",
    )

    def __init__(
        self,
        spi: int,
        key: bytes,
        cipher: str = DEFAULT_CIPHER,
        created_at: float = 0.0,
        *,
        seq_limit: int = REJECT_AFTER_MESSAGES,
    ) -> None:
        _check_spi(spi)
        if not 1 <= seq_limit <= MAX_SEQ:
            raise ValueError(f"seq_limit must be in 1..2**64-1, got {seq_limit}")
        self.spi = spi
        self.key = key
        self.cipher = cipher
        self.created_at = created_at
        self.aead = _aead(key, cipher)
        self.seq_limit = seq_limit
        self._seq = 0  # the last sequence number handed out; the first record gets 1
        self.packets = 0
        self.bytes = 0

    def __repr__(self) -> str:
        return f"OutboundSA(spi={self.spi:#010x}, cipher={self.cipher!r}, seq={self._seq})"

    @property
    def seq(self) -> int:
        """The last sequence number handed out (0 before the first record)."""
        return self._seq

    @property
    def exhausted(self) -> bool:
        return self._seq >= self.seq_limit

    def next_seq(self, n: int = 1) -> int:
        """Reserve `n` consecutive sequence numbers; returns the first. Never reuses one."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        last = self._seq + n
        if last > self.seq_limit:
            raise SaExhausted(f"SA {self.spi:#010x} has no {n} sequence numbers left")
        first = self._seq + 1
        self._seq = last
        return first


class InboundSA:
    """The receiving half of an SA: key, cached AEAD object, replay window, expiry."""

    __slots__ = (
        "aead",
        "bytes",
        "cipher",
        "created_at",
        "expires_at",
        "first_seen",
        "key",
        "packets",
        "spi",
        "window",
    )

    def __init__(
        self,
        spi: int,
        key: bytes,
        cipher: str = DEFAULT_CIPHER,
        created_at: float = 0.0,
        *,
        lifetime: float = REJECT_AFTER_TIME,
    ) -> None:
        _check_spi(spi)
        self.spi = spi
        self.key = key
        self.cipher = cipher
        self.created_at = created_at
        self.expires_at = created_at + lifetime
        self.aead = _aead(key, cipher)
        self.window = ReplayWindow()
        self.packets = 0
        self.bytes = 0
        # `now` of the first record that opened: proof that the peer sends on this SA.
        self.first_seen: float | None = None

    def __repr__(self) -> str:
        return f"InboundSA(spi={self.spi:#010x}, cipher={self.cipher!r}, packets={self.packets})"


def seal_record(sa: OutboundSA, plaintext: bytes) -> bytes:
    """One record: header, ciphertext, tag. Raises SaExhausted when the SA is used up."""
    seq = sa.next_seq()
    header = _HEADER.pack(sa.spi, seq)
    sealed = sa.aead.encrypt(header, plaintext, header)
    sa.packets += 1
    sa.bytes += len(plaintext)
    return header + sealed


def seal_records(sa: OutboundSA, plaintexts: Iterable[bytes]) -> list[bytes]:
    """Seal a batch with one reservation of sequence numbers (all or nothing)."""
    items = list(plaintexts)
    if not items:
        return []
    seq = sa.next_seq(len(items))
    out: list[bytes] = []
    spi = sa.spi
    encrypt = sa.aead.encrypt
    for plaintext in items:
        header = _HEADER.pack(spi, seq)
        out.append(header + encrypt(header, plaintext, header))
        sa.bytes += len(plaintext)
        seq += 1
    sa.packets += len(items)
    return out


def open_record(
    inbound: Mapping[int, InboundSA], data: bytes, now: float
) -> tuple[InboundSA, bytes]:
    """Authenticate and decrypt one record; raises RecordError(reason) for anything to drop.

    The window is checked before the tag (duplicates are dropped without an AEAD operation) and
    updated only after the tag verified.
    """
    if len(data) < RECORD_OVERHEAD:
        raise RecordError("short")
    spi, seq = _HEADER.unpack_from(data)
    sa = inbound.get(spi)
    if sa is None:
        raise RecordError("unknown_spi")
    if now >= sa.expires_at:
        raise RecordError("expired")
    if not sa.window.check(seq):
        raise RecordError("replay")
    header = bytes(data[:HEADER_SIZE])
    try:
        plaintext = sa.aead.decrypt(header, data[HEADER_SIZE:], header)
    except InvalidTag:
        raise RecordError("auth") from None
    sa.window.update(seq)
    sa.packets += 1
    sa.bytes += len(plaintext)
    if sa.first_seen is None:
        sa.first_seen = now
    return sa, plaintext


class SpiAllocator:
    """Picks inbound SPIs that are unique among one node's live inbound SAs.

    Share one per node (the datapath looks every record up in one SPI table). SPIs are not
    secrets, so an injected `random.Random` is fine and keeps tests deterministic.
    """

    # Live inbound SPIs per node: up to 4 per peer session (previous, current, next, pending)
    # for a few thousand peers. A full table means a leak, not a big cluster.
    MAX_LIVE = 65536

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._live: set[int] = set()

    def __contains__(self, spi: object) -> bool:
        return spi in self._live

    def __len__(self) -> int:
        return len(self._live)

    def allocate(self) -> int:
        if len(self._live) >= self.MAX_LIVE:
            raise RuntimeError("SPI table full: inbound SAs are leaking")
        while True:  # the table is at most 2**16 of 2**32 values: a retry is rare
            spi = self._rng.randint(MIN_SPI, MAX_SPI)
            if spi not in self._live:
                self._live.add(spi)
                return spi

    def release(self, spi: int) -> None:
        self._live.discard(spi)
