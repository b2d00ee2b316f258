"""The datapath key exchange: Noise IKpsk2 (WireGuard's pattern), sans-IO.

    IKpsk2:
      <- s
      ...
      -> e, es, s, ss          (initiation)
      <- e, ee, se, psk        (response)

Built only from `cryptography` and `hashlib`/`hmac`: X25519 for DH, SHA-256 for the transcript
hash, HKDF-SHA256 for MixKey/Split (RFC 5869 HKDF with salt = chaining key and empty info is
exactly Noise's HKDF), ChaCha20-Poly1305 for the handshake AEAD. Protocol name
``Noise_IKpsk2_25519_ChaChaPoly_SHA256``; the prologue binds the meshnet context.

What it gives:
- mutual authentication: the initiator proves its static key with `ss`, the responder with `se`
  (and the initiator already knew the responder's static key from membership metadata);
- the pre-shared key (derived from the cluster key, `derive_psk`) is mixed into the response, so
  a node without the cluster key completes no handshake even if it has a static key;
- forward secrecy: every handshake mixes `ee` from fresh ephemerals, so recorded traffic stays
  secret after a static key (or the cluster key) leaks;
- replay protection of initiations: an encrypted TAI64N timestamp that the responder requires to
  grow per peer (and to be no older than the responder's session, see session.py);
- cheap rejection of garbage: every message carries `mac1`, an HMAC keyed from the psk and the
  RECEIVER's static public key. Checking it costs two HMACs and no DH, so anything from outside
  the cluster is dropped before the expensive part (WireGuard's mac1, with the psk added since
  our static keys are published in gossip);
- proof of address ownership (WireGuard's cookie, §5.4.7 of its paper): an initiation also
  carries `mac2`, an HMAC keyed by a COOKIE over the whole message up to it. A responder that
  wants proof (under load, or knowing nothing of the peer's timestamps yet: see session.py)
  answers an initiation without a valid mac2 with a cookie reply instead of doing any DH. The
  cookie is a MAC, keyed by a secret the responder rotates, of the initiation's source address
  (IP and port): only whoever receives datagrams at that address learns it. The reply carries
  the cookie encrypted (ChaCha20-Poly1305, random 96-bit nonce) under a key derived from the psk
  and the responder's static public key, with the initiation's mac1 (and the reply's header) as
  associated data, so only a cluster member can read it and only for the initiation it
  answers; the initiator stores it and sends its next initiation with a valid mac2 at once.

Message layouts (all integers big-endian; every message starts with the 4-byte zero marker so it
can share the datapath's UDP port: a record never has SPI 0, RFC 4303 §2.1 / RFC 3948)::

    initiation (152 bytes)
      0   marker        4   00 00 00 00
      4   type          1   1
      5   version       1   2
      6   cipher        1   proposed record cipher: 1 aes-256-gcm, 2 chacha20-poly1305
      7   reserved      1   0
      8   sender SPI    4   the initiator's new inbound SPI (the responder sends to it)
      12  ephemeral     32  initiator's ephemeral X25519 public key
      44  static        48  AEAD(initiator's static public key)
      92  timestamp     28  AEAD(TAI64N: 8 bytes 2**62 + seconds, 4 bytes nanoseconds)
      120 mac1          16  HMAC-SHA256(mac1 key(psk, responder static), bytes 0..120)[:16]
      136 mac2          16  HMAC-SHA256(cookie, bytes 0..136)[:16], or zeros without a cookie

    response (80 bytes)
      0   marker        4   00 00 00 00
      4   type          1   2
      5   version       1   2
      6   cipher        1   the cipher agreed (echo of the initiation's)
      7   reserved      1   0
      8   sender SPI    4   the responder's new inbound SPI (the initiator sends to it)
      12  receiver SPI  4   echo of the initiation's sender SPI (matches the pending handshake)
      16  ephemeral     32  responder's ephemeral X25519 public key
      48  empty         16  AEAD(empty payload): proves the responder derived the same keys
      64  mac1          16  HMAC-SHA256(mac1 key(psk, initiator static), bytes 0..64)[:16]

    cookie reply (56 bytes)
      0   marker        4   00 00 00 00
      4   type          1   3
      5   version       1   2
      6   reserved      2   0
      8   receiver SPI  4   echo of the initiation's sender SPI (matches the pending handshake)
      12  nonce         12  random
      24  cookie        32  ChaCha20-Poly1305(cookie key(psk, responder static), nonce,
                            16-byte cookie, associated data = bytes 0..12 and the
                            initiation's mac1)

A response needs no mac2: it is only looked at when its receiver SPI matches the initiation we
have pending (a random 32-bit value sent to one address), so a flood of them costs no DH.
The cleartext header (bytes 0..12 / 0..16) is mixed into the transcript hash before the
message's tokens, so the SPIs and the cipher are authenticated by the message's AEADs.
The result: two 32-byte directional keys from Split() of the final chaining key (initiator to
responder first) plus the two SPIs, each chosen by the side that will receive on it.

`HandshakeError` is the one exception for anything wrong; `reason` names a drop counter.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from meshnet.crypto.sa import CIPHER_AES_256_GCM, CIPHER_CHACHA20_POLY1305, MAX_SPI, MIN_SPI

__all__ = [
    "CIPHER_IDS",
    "COOKIE_NONCE_SIZE",
    "COOKIE_REPLY_SIZE",
    "COOKIE_SECRET_SIZE",
    "COOKIE_SIZE",
    "INITIATION_SIZE",
    "MAC_SIZE",
    "MARKER",
    "PROLOGUE",
    "PROTOCOL_NAME",
    "PSK_SIZE",
    "RESPONSE_SIZE",
    "TIMESTAMP_SIZE",
    "VERSION",
    "HandshakeError",
    "HandshakeResult",
    "InitiatorState",
    "MessageType",
    "ReceivedInitiation",
    "consume_cookie_reply",
    "consume_initiation",
    "consume_response",
    "cookie_reply_receiver_spi",
    "create_cookie_reply",
    "create_initiation",
    "create_response",
    "derive_psk",
    "initiation_ephemeral",
    "initiation_mac1",
    "initiation_sender_spi",
    "is_handshake",
    "make_cookie",
    "message_type",
    "response_receiver_spi",
    "source_bytes",
    "tai64n",
    "verify_initiation_mac",
    "verify_mac2",
]

PROTOCOL_NAME = b"Noise_IKpsk2_25519_ChaChaPoly_SHA256"
PROLOGUE = b"meshnet datapath handshake"
# Bumped when a layout or a derivation changes; a node refuses versions it does not speak.
# 2: mac2 in the initiation, and the cookie reply (#14).
VERSION = 2
# Where a record has its SPI; SPI 0 is reserved, so these 4 bytes tell handshakes from records.
MARKER = bytes(4)
DH_SIZE = 32
HASH_SIZE = 32
AEAD_TAG_SIZE = 16
# Truncated HMAC, as WireGuard's mac1: it only has to make a guess cost 2**128 attempts.
MAC_SIZE = 16
# Noise psks are 32 bytes; `derive_psk` makes one from the cluster key.
PSK_SIZE = 32
TIMESTAMP_SIZE = 12
# The timestamp's nanoseconds are rounded down to 2**24 ns (~16.8 ms), as WireGuard does, so an
# initiation does not leak a precise clock reading; retries are seconds apart anyway.
_WHITEN = 1 << 24
_TAI64_BASE = 1 << 62

# A cookie is a truncated MAC too (WireGuard's are 16 bytes): it keys mac2, which only has to
# make a guess as costly as mac1's.
COOKIE_SIZE = 16
# The responder's cookie secret: a full-strength HMAC-SHA256 key.
COOKIE_SECRET_SIZE = 32
# ChaCha20-Poly1305's nonce. Random per reply: the key is fixed per (psk, responder), and 2**32
# replies would still leave a collision chance of 2**-33 (birthday bound on 96 bits).
COOKIE_NONCE_SIZE = 12

_INIT_HEADER = struct.Struct(">4sBBBBI")  # marker, type, version, cipher, reserved, sender SPI
_RESP_HEADER = struct.Struct(">4sBBBBII")  # ... sender SPI, receiver SPI
_COOKIE_HEADER = struct.Struct(">4sBBHI")  # marker, type, version, reserved, receiver SPI
INIT_HEADER_SIZE = _INIT_HEADER.size  # 12
RESP_HEADER_SIZE = _RESP_HEADER.size  # 16
COOKIE_HEADER_SIZE = _COOKIE_HEADER.size  # 12
# Where an initiation's MACs are: mac1 covers the body before it, mac2 everything before it.
MAC1_AT = (
    INIT_HEADER_SIZE + DH_SIZE + (DH_SIZE + AEAD_TAG_SIZE) + (TIMESTAMP_SIZE + AEAD_TAG_SIZE)
)  # 120
MAC2_AT = MAC1_AT + MAC_SIZE  # 136
INITIATION_SIZE = MAC2_AT + MAC_SIZE  # 152
RESPONSE_SIZE = RESP_HEADER_SIZE + DH_SIZE + AEAD_TAG_SIZE + MAC_SIZE  # 80
COOKIE_REPLY_SIZE = COOKIE_HEADER_SIZE + COOKIE_NONCE_SIZE + COOKIE_SIZE + AEAD_TAG_SIZE  # 56
# Bytes read before anything else: marker, type, version.
_MIN_PEEK = 6

assert INITIATION_SIZE == 152 and RESPONSE_SIZE == 80 and COOKIE_REPLY_SIZE == 56

CIPHER_IDS: dict[str, int] = {CIPHER_AES_256_GCM: 1, CIPHER_CHACHA20_POLY1305: 2}
_CIPHER_BY_ID = {v: k for k, v in CIPHER_IDS.items()}

_ZERO_NONCE = bytes(12)
_NO_MAC2 = bytes(MAC_SIZE)
_MAC1_LABEL = b"meshnet mac1 v1|"
_COOKIE_LABEL = b"meshnet cookie v1|"
_PSK_INFO = b"meshnet datapath psk"


class MessageType(IntEnum):
    """Handshake message types; only grows."""

    INITIATION = 1
    RESPONSE = 2
    COOKIE_REPLY = 3


_SIZES = {
    MessageType.INITIATION: INITIATION_SIZE,
    MessageType.RESPONSE: RESPONSE_SIZE,
    MessageType.COOKIE_REPLY: COOKIE_REPLY_SIZE,
}


class HandshakeError(Exception):
    """Anything wrong with a handshake message; `reason` is a short counter name.

    Reasons: malformed, version, mac, auth, replay, stale, cookie, unknown_peer, unexpected,
    rate_limited, not_alive. None of them is worth a log line per message.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


DhHook = Callable[[], None]


def derive_psk(cluster_key: bytes) -> bytes:
    """The datapath psk from a cluster (gossip) key: HKDF-SHA256(info="meshnet datapath psk")."""
    return HKDF(algorithm=hashes.SHA256(), length=PSK_SIZE, salt=None, info=_PSK_INFO).derive(
        cluster_key
    )


def tai64n(wall: float) -> bytes:
    """A 12-byte TAI64N-like label of wall-clock time (`wall` in Unix seconds), whitened."""
    if not math.isfinite(wall):
        raise ValueError("wall time must be finite")
    secs = math.floor(wall)
    nanos = min(int((wall - secs) * 1e9), 999_999_999)
    nanos -= nanos % _WHITEN
    label = min(max(_TAI64_BASE + secs, 0), (1 << 64) - 1)
    return struct.pack(">QI", label, nanos)


def is_handshake(data: bytes) -> bool:
    """True if `data` is meant as a handshake message (not a record): starts with 4 zero bytes."""
    return len(data) >= 4 and data[:4] == MARKER


def message_type(data: bytes) -> MessageType:
    """Bounds, marker, type, version and exact length; raises HandshakeError."""
    if len(data) < _MIN_PEEK or data[:4] != MARKER:
        raise HandshakeError("malformed", "not a handshake message")
    try:
        kind = MessageType(data[4])
    except ValueError:
        raise HandshakeError("malformed", f"unknown message type {data[4]}") from None
    if data[5] != VERSION:
        raise HandshakeError("version", f"version {data[5]}, expected {VERSION}")
    if len(data) != _SIZES[kind]:
        raise HandshakeError("malformed", f"{kind.name.lower()} of {len(data)} bytes")
    return kind


def _cipher_of(data: bytes) -> str:
    cipher = _CIPHER_BY_ID.get(data[6])
    if cipher is None or data[7] != 0:
        raise HandshakeError("malformed", "unknown cipher or nonzero reserved byte")
    return cipher


# ---- Noise symmetric state -----------------------------------------------------------------


def _hkdf(chaining_key: bytes, ikm: bytes, n: int) -> list[bytes]:
    out = HKDF(algorithm=hashes.SHA256(), length=HASH_SIZE * n, salt=chaining_key, info=b"").derive(
        ikm
    )
    return [out[i : i + HASH_SIZE] for i in range(0, len(out), HASH_SIZE)]


def _dh(private: X25519PrivateKey, public: bytes, on_dh: DhHook | None) -> bytes:
    if on_dh is not None:
        on_dh()
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:  # a low-order point gives the all-zero secret, which OpenSSL refuses
        raise HandshakeError("auth", "bad public key") from None


class _Symmetric:
    """Noise's SymmetricState. Each key `k` is used for exactly one AEAD operation (nonce 0):
    in IKpsk2 every encryption follows a fresh MixKey, so no nonce counter is needed."""

    __slots__ = ("ck", "h", "k")

    def __init__(self, responder_static: bytes) -> None:
        h = hashlib.sha256(PROTOCOL_NAME).digest()  # the name is longer than HASHLEN: hash it
        self.ck = h
        self.h = h
        self.k: bytes | None = None
        self.mix_hash(PROLOGUE)
        self.mix_hash(responder_static)  # pre-message "<- s"

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = _hkdf(self.ck, ikm, 2)

    def mix_key_and_hash(self, ikm: bytes) -> None:
        self.ck, temp_h, self.k = _hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)

    def _take_key(self) -> bytes:
        k = self.k
        if k is None:  # pragma: no cover - a programming error in this module
            raise AssertionError("AEAD key used twice")
        self.k = None
        return k

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = ChaCha20Poly1305(self._take_key()).encrypt(_ZERO_NONCE, plaintext, self.h)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        try:
            plaintext = ChaCha20Poly1305(self._take_key()).decrypt(_ZERO_NONCE, ciphertext, self.h)
        except InvalidTag:
            raise HandshakeError("auth", "decryption failed") from None
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[bytes, bytes]:
        k1, k2 = _hkdf(self.ck, b"", 2)
        return k1, k2


def _mac1_key(psk: bytes, receiver_static: bytes) -> bytes:
    return hmac.digest(psk, _MAC1_LABEL + receiver_static, "sha256")


def _mac1(psk: bytes, receiver_static: bytes, body: bytes) -> bytes:
    return hmac.digest(_mac1_key(psk, receiver_static), body, "sha256")[:MAC_SIZE]


def _find_psk(body: bytes, mac: bytes, receiver_static: bytes, psks: Sequence[bytes]) -> bytes:
    for psk in psks:
        if hmac.compare_digest(_mac1(psk, receiver_static, body), mac):
            return psk
    raise HandshakeError("mac", "no cluster key matches")


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def _check_psk(psk: bytes) -> None:
    if len(psk) != PSK_SIZE:
        raise ValueError(f"psk must be {PSK_SIZE} bytes, got {len(psk)}")


def _check_spi(spi: int) -> None:
    if not MIN_SPI <= spi <= MAX_SPI:
        raise ValueError(f"SPI must be in {MIN_SPI}..{MAX_SPI}, got {spi}")


# ---- results and intermediate states -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HandshakeResult:
    """Keys and SPIs of a completed handshake, from one side's point of view."""

    send_key: bytes = field(repr=False)
    recv_key: bytes = field(repr=False)
    inbound_spi: int  # chosen by us: the peer seals to it
    outbound_spi: int  # chosen by the peer: we seal to it
    remote_static: bytes
    cipher: str
    initiator: bool


@dataclass(slots=True)
class InitiatorState:
    """What the initiator keeps between sending the initiation and reading the response."""

    local_key: X25519PrivateKey = field(repr=False)
    local_static: bytes
    remote_static: bytes
    psk: bytes = field(repr=False)
    ephemeral: X25519PrivateKey = field(repr=False)
    sender_spi: int
    cipher: str
    symmetric: _Symmetric = field(repr=False)
    spent: bool = False


@dataclass(slots=True)
class ReceivedInitiation:
    """A fully authenticated initiation (static key and timestamp decrypted) awaiting a
    decision: check `initiator_static` and `timestamp`, then `create_response`."""

    local_key: X25519PrivateKey = field(repr=False)
    initiator_static: bytes
    initiator_ephemeral: bytes
    timestamp: bytes
    sender_spi: int
    cipher: str
    psk: bytes = field(repr=False)
    symmetric: _Symmetric = field(repr=False)
    spent: bool = False


# ---- the four steps ------------------------------------------------------------------------


def create_initiation(
    local_key: X25519PrivateKey,
    remote_static: bytes,
    psk: bytes,
    sender_spi: int,
    timestamp: bytes,
    cipher: str = CIPHER_AES_256_GCM,
    on_dh: DhHook | None = None,
    cookie: bytes | None = None,
) -> tuple[bytes, InitiatorState]:
    """-> e, es, s, ss (+ encrypted timestamp). `timestamp` is `tai64n(wall clock)`; `cookie`
    the responder's last cookie for us, if we hold a fresh one (else mac2 is zeros)."""
    if cookie is not None and len(cookie) != COOKIE_SIZE:
        raise ValueError(f"a cookie is {COOKIE_SIZE} bytes")
    _check_psk(psk)
    _check_spi(sender_spi)
    if len(remote_static) != DH_SIZE or len(timestamp) != TIMESTAMP_SIZE:
        raise ValueError("remote static key must be 32 bytes and the timestamp 12")
    cipher_id = CIPHER_IDS[cipher]
    local_static = _public(local_key)
    sym = _Symmetric(remote_static)
    header = _INIT_HEADER.pack(MARKER, MessageType.INITIATION, VERSION, cipher_id, 0, sender_spi)
    sym.mix_hash(header)
    ephemeral = X25519PrivateKey.generate()
    e_pub = _public(ephemeral)
    sym.mix_hash(e_pub)
    sym.mix_key(e_pub)  # psk modes also mix e into the key
    sym.mix_key(_dh(ephemeral, remote_static, on_dh))  # es
    enc_static = sym.encrypt_and_hash(local_static)
    sym.mix_key(_dh(local_key, remote_static, on_dh))  # ss
    enc_time = sym.encrypt_and_hash(timestamp)
    body = header + e_pub + enc_static + enc_time
    message = body + _mac1(psk, remote_static, body)
    message += _mac2(cookie, message) if cookie is not None else _NO_MAC2
    state = InitiatorState(
        local_key, local_static, remote_static, psk, ephemeral, sender_spi, cipher, sym
    )
    return message, state


def verify_initiation_mac(data: bytes, local_static: bytes, psks: Sequence[bytes]) -> bytes:
    """The cheap gate: shape, version and mac1 (no DH). Returns the psk whose mac1 matches,
    which is the one the initiator mixes in (a cluster mid key rotation has several)."""
    if message_type(data) is not MessageType.INITIATION:
        raise HandshakeError("unexpected", "not an initiation")
    _cipher_of(data)
    return _find_psk(data[:MAC1_AT], data[MAC1_AT:MAC2_AT], local_static, psks)


def consume_initiation(
    local_key: X25519PrivateKey,
    psks: Sequence[bytes],
    data: bytes,
    on_dh: DhHook | None = None,
) -> ReceivedInitiation:
    """Authenticate an initiation (mac1 first, then es, s, ss); raises HandshakeError.

    The caller must still check the initiator's static key (is it a peer?) and the timestamp
    (greater than the last one from that peer?) before responding.
    """
    local_static = _public(local_key)
    psk = verify_initiation_mac(data, local_static, psks)
    cipher = _cipher_of(data)
    _, _, _, _, _, sender_spi = _INIT_HEADER.unpack_from(data)
    if not MIN_SPI <= sender_spi <= MAX_SPI:
        raise HandshakeError("malformed", "reserved SPI")
    pos = INIT_HEADER_SIZE
    e_pub = bytes(data[pos : pos + DH_SIZE])
    pos += DH_SIZE
    enc_static = bytes(data[pos : pos + DH_SIZE + AEAD_TAG_SIZE])
    pos += DH_SIZE + AEAD_TAG_SIZE
    enc_time = bytes(data[pos : pos + TIMESTAMP_SIZE + AEAD_TAG_SIZE])

    sym = _Symmetric(local_static)
    sym.mix_hash(bytes(data[:INIT_HEADER_SIZE]))
    sym.mix_hash(e_pub)
    sym.mix_key(e_pub)
    sym.mix_key(_dh(local_key, e_pub, on_dh))  # es
    initiator_static = sym.decrypt_and_hash(enc_static)
    sym.mix_key(_dh(local_key, initiator_static, on_dh))  # ss
    timestamp = sym.decrypt_and_hash(enc_time)
    return ReceivedInitiation(
        local_key, initiator_static, e_pub, timestamp, sender_spi, cipher, psk, sym
    )


def create_response(
    received: ReceivedInitiation, sender_spi: int, on_dh: DhHook | None = None
) -> tuple[bytes, HandshakeResult]:
    """<- e, ee, se, psk (+ empty payload). Returns the message and the responder's keys."""
    _check_spi(sender_spi)
    if received.spent:
        raise ValueError("this initiation was already answered")
    received.spent = True
    sym = received.symmetric
    header = _RESP_HEADER.pack(
        MARKER,
        MessageType.RESPONSE,
        VERSION,
        CIPHER_IDS[received.cipher],
        0,
        sender_spi,
        received.sender_spi,
    )
    sym.mix_hash(header)
    ephemeral = X25519PrivateKey.generate()
    e_pub = _public(ephemeral)
    sym.mix_hash(e_pub)
    sym.mix_key(e_pub)
    sym.mix_key(_dh(ephemeral, received.initiator_ephemeral, on_dh))  # ee
    sym.mix_key(_dh(ephemeral, received.initiator_static, on_dh))  # se
    sym.mix_key_and_hash(received.psk)  # psk
    enc_empty = sym.encrypt_and_hash(b"")
    body = header + e_pub + enc_empty
    message = body + _mac1(received.psk, received.initiator_static, body)
    k_i2r, k_r2i = sym.split()
    result = HandshakeResult(
        send_key=k_r2i,
        recv_key=k_i2r,
        inbound_spi=sender_spi,
        outbound_spi=received.sender_spi,
        remote_static=received.initiator_static,
        cipher=received.cipher,
        initiator=False,
    )
    return message, result


def response_receiver_spi(data: bytes) -> int:
    """The initiation SPI a response answers (to find the pending handshake); no crypto."""
    if message_type(data) is not MessageType.RESPONSE:
        raise HandshakeError("unexpected", "not a response")
    return int(_RESP_HEADER.unpack_from(data)[6])


def consume_response(
    state: InitiatorState, data: bytes, on_dh: DhHook | None = None
) -> HandshakeResult:
    """Authenticate a response to `state`'s initiation; raises HandshakeError.

    On success `state` is spent (a second call fails), so a replayed response does nothing.
    """
    if message_type(data) is not MessageType.RESPONSE:
        raise HandshakeError("unexpected", "not a response")
    _, _, _, _, _, sender_spi, receiver_spi = _RESP_HEADER.unpack_from(data)
    if receiver_spi != state.sender_spi:
        raise HandshakeError("unexpected", "response to another initiation")
    if _cipher_of(data) != state.cipher:
        raise HandshakeError("malformed", "cipher differs from the proposal")
    if not MIN_SPI <= sender_spi <= MAX_SPI:
        raise HandshakeError("malformed", "reserved SPI")
    if state.spent:
        raise HandshakeError("unexpected", "handshake already completed")
    _find_psk(data[:-MAC_SIZE], data[-MAC_SIZE:], state.local_static, (state.psk,))
    sym = _copy(state.symmetric)  # a forged response must not spoil the pending state
    sym.mix_hash(bytes(data[:RESP_HEADER_SIZE]))
    pos = RESP_HEADER_SIZE
    e_pub = bytes(data[pos : pos + DH_SIZE])
    pos += DH_SIZE
    enc_empty = bytes(data[pos : pos + AEAD_TAG_SIZE])
    sym.mix_hash(e_pub)
    sym.mix_key(e_pub)
    sym.mix_key(_dh(state.ephemeral, e_pub, on_dh))  # ee
    sym.mix_key(_dh(state.local_key, e_pub, on_dh))  # se
    sym.mix_key_and_hash(state.psk)  # psk
    if sym.decrypt_and_hash(enc_empty) != b"":  # pragma: no cover - a 16-byte AEAD has no body
        raise HandshakeError("malformed", "non-empty response payload")
    k_i2r, k_r2i = sym.split()
    state.spent = True
    return HandshakeResult(
        send_key=k_i2r,
        recv_key=k_r2i,
        inbound_spi=state.sender_spi,
        outbound_spi=sender_spi,
        remote_static=state.remote_static,
        cipher=state.cipher,
        initiator=True,
    )


def _copy(sym: _Symmetric) -> _Symmetric:
    clone = _Symmetric.__new__(_Symmetric)
    clone.ck, clone.h, clone.k = sym.ck, sym.h, sym.k
    return clone


# ---- cookies (WireGuard's mac2 mechanism) ----------------------------------------------------
#
# Unlike the four steps above, these never need a DH: they are what a responder under load can
# afford for every initiation whose mac1 is valid.


def initiation_mac1(data: bytes) -> bytes:
    """An initiation's mac1 (checked or not: call after `verify_initiation_mac`)."""
    return bytes(data[MAC1_AT:MAC2_AT])


def initiation_ephemeral(data: bytes) -> bytes:
    """An initiation's ephemeral public key, in clear on the wire (covered by mac1)."""
    return bytes(data[INIT_HEADER_SIZE : INIT_HEADER_SIZE + DH_SIZE])


def initiation_sender_spi(data: bytes) -> int:
    return int(_INIT_HEADER.unpack_from(data)[5])


def source_bytes(source: tuple[str, int] | None) -> bytes:
    """The bytes a cookie is a MAC of: the source IP address and UDP port ("ip|port"; empty
    for a caller without addresses, e.g. a test pairing two cores in memory)."""
    if source is None:
        return b""
    return f"{source[0]}|{int(source[1])}".encode()


def make_cookie(secret: bytes, source: bytes) -> bytes:
    """The cookie of a source address under one of the responder's secrets."""
    return hmac.digest(secret, source, "sha256")[:COOKIE_SIZE]


def _mac2(cookie: bytes, data: bytes) -> bytes:
    return hmac.digest(cookie, data[:MAC2_AT], "sha256")[:MAC_SIZE]


def verify_mac2(data: bytes, cookies: Sequence[bytes]) -> bool:
    """Does the initiation's mac2 match one of COOKIES (the source's cookie under the current
    and the previous secret)? An all-zero mac2 (no cookie) never does."""
    mac2 = data[MAC2_AT:INITIATION_SIZE]
    if mac2 == _NO_MAC2:
        return False
    return any(hmac.compare_digest(_mac2(c, data), mac2) for c in cookies)


def _cookie_key(psk: bytes, responder_static: bytes) -> bytes:
    """WireGuard keys the cookie reply with HASH(label || responder static); the psk is added
    for the reason it is added to mac1: static keys are published in gossip."""
    return hmac.digest(psk, _COOKIE_LABEL + responder_static, "sha256")


def create_cookie_reply(
    initiation: bytes, cookie: bytes, responder_static: bytes, psk: bytes, nonce: bytes
) -> bytes:
    """The responder's answer to an initiation that must prove its source address first:
    COOKIE encrypted to whoever holds the psk, bound to this initiation (its mac1)."""
    if len(cookie) != COOKIE_SIZE or len(nonce) != COOKIE_NONCE_SIZE:
        raise ValueError(f"need a {COOKIE_SIZE}-byte cookie and a {COOKIE_NONCE_SIZE}-byte nonce")
    header = _COOKIE_HEADER.pack(
        MARKER, MessageType.COOKIE_REPLY, VERSION, 0, initiation_sender_spi(initiation)
    )
    sealed = ChaCha20Poly1305(_cookie_key(psk, responder_static)).encrypt(
        nonce, cookie, header + initiation_mac1(initiation)
    )
    return header + nonce + sealed


def cookie_reply_receiver_spi(data: bytes) -> int:
    """The initiation SPI a cookie reply answers (to find the pending handshake); no crypto."""
    if message_type(data) is not MessageType.COOKIE_REPLY:
        raise HandshakeError("unexpected", "not a cookie reply")
    _, _, _, reserved, spi = _COOKIE_HEADER.unpack_from(data)
    if reserved != 0:
        raise HandshakeError("malformed", "nonzero reserved bytes")
    return int(spi)


def consume_cookie_reply(
    data: bytes, responder_static: bytes, psk: bytes, initiation_mac1: bytes
) -> bytes:
    """The cookie in a reply to our initiation whose mac1 was INITIATION_MAC1; raises
    HandshakeError ("auth" if it was not made for that initiation by a psk holder)."""
    cookie_reply_receiver_spi(data)
    header = bytes(data[:COOKIE_HEADER_SIZE])
    nonce = bytes(data[COOKIE_HEADER_SIZE : COOKIE_HEADER_SIZE + COOKIE_NONCE_SIZE])
    sealed = bytes(data[COOKIE_HEADER_SIZE + COOKIE_NONCE_SIZE :])
    try:
        return ChaCha20Poly1305(_cookie_key(psk, responder_static)).decrypt(
            nonce, sealed, header + initiation_mac1
        )
    except InvalidTag:
        raise HandshakeError("auth", "cookie reply does not open") from None
