"""The gossip keyring: symmetric keys that seal membership packets and push-pull streams.

After memberlist's keyring: one primary key seals; every installed key is tried to open, so a
cluster rotates without a flag day by install (everywhere) -> use (everywhere) -> remove. The
primary can never be removed.

Sealed format (all sizes fixed, so `SEAL_OVERHEAD` is exact)::

    [version 1 byte = 1][key id 4 bytes][nonce 12 bytes][ciphertext][GCM tag 16 bytes]

- key id: the first 4 bytes of SHA-256(key). It only picks which key to try first; it is not a
  secret and it is not trusted (a collision just means one more decryption attempt).
- additional data: version, key id and the caller's `kind` byte. `kind` separates the contexts
  that share one key (a UDP packet vs a TCP stream), so a sealed packet cannot be replayed as a
  stream or the other way round.
- nonce: 12 random bytes per seal. With random nonces NIST SP 800-38D allows 2**32 seals per key
  (collision chance below 2**-32); every node sealing with the cluster key counts towards that,
  which is one more reason to rotate the key now and then.

This module is pure apart from `Keyring.load`, `Keyring.save` and `Keyring.from_key_file`.
There is deliberately no plaintext mode here: running without encryption is an explicit,
loudly-named agent flag, not a keyring that happens to be empty.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import json
import os
from pathlib import Path
from typing import TypedDict

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from meshnet.fsutil import atomic_write

__all__ = [
    "KEY_ID_SIZE",
    "KEY_SIZE",
    "KIND_PACKET",
    "KIND_STREAM",
    "MAX_KEYRING_FILE_BYTES",
    "MAX_KEYS",
    "NONCE_SIZE",
    "SEAL_OVERHEAD",
    "SEAL_VERSION",
    "TAG_SIZE",
    "KeyListEntry",
    "Keyring",
    "KeyringError",
    "generate_key",
    "key_id",
    "parse_key",
]

# AES-256-GCM: 32-byte keys.
KEY_SIZE = 32
# Base64 of 32 bytes: 44 characters including one '=' of padding.
KEY_TEXT_SIZE = 44
# The only sealed-format version so far; bumped if the layout or the additional data changes.
SEAL_VERSION = 1
# Enough to pick the right key first among a handful; not an identifier users rely on.
KEY_ID_SIZE = 4
# The size GCM is designed for (any other size goes through GHASH and weakens the bounds).
NONCE_SIZE = 12
# Full-length GCM tag; truncated tags lower forgery resistance for no useful saving.
TAG_SIZE = 16
HEADER_SIZE = 1 + KEY_ID_SIZE
SEAL_OVERHEAD = HEADER_SIZE + NONCE_SIZE + TAG_SIZE  # 33
# Rotation needs two or three keys at once. Every unauthenticated packet may cost one GCM
# attempt per installed key, so the count is bounded to keep garbage cheap to drop.
MAX_KEYS = 16
# A keyring file holds at most MAX_KEYS keys of 44 characters plus JSON; anything near this size
# is not a keyring, so refuse it before reading it into memory.
MAX_KEYRING_FILE_BYTES = 64 * 1024
# The version of the JSON file written by `Keyring.save`.
FILE_VERSION = 1

# Values of `kind` used by the agent (any 0..255 is accepted; these two must never collide).
KIND_PACKET = 1  # a UDP gossip packet
KIND_STREAM = 2  # a TCP push-pull stream message (the format before freshness)
KIND_FRESH_PACKET = 3  # a UDP gossip packet after its freshness value
KIND_STREAM_HEAD = 4  # a stream request's head (service and length) after its freshness value
KIND_STREAM_REPLY_HEAD = 5  # a reply's head, bound to the request's freshness value
KIND_STREAM_CHUNK = 6  # a piece of a request's or reply's body

assert SEAL_OVERHEAD == 33


class KeyringError(Exception):
    """A bad key, a bad keyring file, or a sealed message that fails to decode or authenticate."""


class KeyListEntry(TypedDict):
    key: str  # standard base64, 44 characters
    id: str  # hex of the 4-byte key id (safe to log, unlike the key)
    primary: bool


def generate_key() -> str:
    """A new random key, as the base64 text users see and pass around."""
    return base64.b64encode(os.urandom(KEY_SIZE)).decode("ascii")


def parse_key(text: str) -> bytes:
    """Decode a user-supplied base64 key; raise KeyringError saying what is wrong."""
    stripped = text.strip()
    if not stripped:
        raise KeyringError("empty key: expected 44 characters of standard base64 (32 bytes)")
    if len(stripped) != KEY_TEXT_SIZE:
        raise KeyringError(
            f"bad key: expected 44 characters of standard base64 (32 bytes), "
            f"got {len(stripped)} characters"
        )
    try:
        raw = base64.b64decode(stripped.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise KeyringError(
            "bad key: not valid standard base64 (alphabet A-Z a-z 0-9 + / with '=' padding)"
        ) from None
    if len(raw) != KEY_SIZE:
        raise KeyringError(
            f"bad key: decodes to {len(raw)} bytes, expected {KEY_SIZE} "
            f"(44 characters of standard base64 ending in '=')"
        )
    return raw


def key_id(key: bytes) -> bytes:
    """The 4-byte key id carried in every sealed message: SHA-256(key)[:4]."""
    return hashlib.sha256(key).digest()[:KEY_ID_SIZE]


def _as_key(key: bytes | str) -> bytes:
    if isinstance(key, str):
        return parse_key(key)
    if len(key) != KEY_SIZE:
        raise KeyringError(f"bad key: {len(key)} bytes, expected {KEY_SIZE}")
    return bytes(key)


def _encode(key: bytes) -> str:
    return base64.b64encode(key).decode("ascii")


def _check_kind(kind: int) -> bytes:
    if not 0 <= kind <= 0xFF:
        # A caller bug, not bad input from the network: fail loudly with a different type.
        raise ValueError(f"kind must be 0..255, got {kind}")
    return bytes((kind,))


class _Entry:
    """One installed key with its id and a cached AESGCM object (built once, used per packet)."""

    __slots__ = ("aead", "header", "key", "kid")

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.kid = key_id(key)
        self.header = bytes((SEAL_VERSION,)) + self.kid
        self.aead = AESGCM(key)


class Keyring:
    """One primary key (seals) and any number of secondary keys (also open), order preserved."""

    def __init__(self, primary: bytes | str, secondaries: tuple[bytes | str, ...] = ()) -> None:
        first = _Entry(_as_key(primary))
        self._entries: dict[bytes, _Entry] = {first.key: first}
        self._primary: _Entry = first
        # The order `open` tries keys in: primary first, then the rest as installed.
        self._order: tuple[_Entry, ...] = (first,)
        for k in secondaries:
            self.install(k)

    # ---- queries ----------------------------------------------------------------------------

    @property
    def primary(self) -> bytes:
        return self._primary.key

    def keys(self) -> builtins.list[bytes]:
        """All installed keys, primary first, then in the order they were installed."""
        return [e.key for e in self._order]

    def list(self) -> builtins.list[KeyListEntry]:
        """All keys as base64, primary first, each marked primary or not (`meshctl keys list`)."""
        return [
            KeyListEntry(key=_encode(e.key), id=e.kid.hex(), primary=e is self._primary)
            for e in self._order
        ]

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            try:
                key = parse_key(key)
            except KeyringError:
                return False
        return isinstance(key, bytes) and key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        # Never print key material: ids only.
        ids = ", ".join(("*" if e is self._primary else "") + e.kid.hex() for e in self._order)
        return f"Keyring({ids})"

    # ---- rotation ---------------------------------------------------------------------------

    def install(self, key: bytes | str) -> None:
        """Add a key for opening. Installing a key that is already there changes nothing."""
        raw = _as_key(key)
        if raw in self._entries:
            return
        if len(self._entries) >= MAX_KEYS:
            raise KeyringError(
                f"keyring is full ({MAX_KEYS} keys); remove an old key before installing another"
            )
        self._entries[raw] = _Entry(raw)
        self._reorder()

    def use(self, key: bytes | str) -> None:
        """Make an installed key the primary (the one that seals)."""
        raw = _as_key(key)
        entry = self._entries.get(raw)
        if entry is None:
            raise KeyringError("cannot use a key that is not installed; install it first")
        self._primary = entry
        self._reorder()

    def remove(self, key: bytes | str) -> None:
        """Remove a secondary key. The primary cannot be removed: `use` another key first."""
        raw = _as_key(key)
        if raw not in self._entries:
            raise KeyringError("cannot remove a key that is not installed")
        if raw == self._primary.key:
            raise KeyringError("cannot remove the primary key; make another key primary first")
        del self._entries[raw]
        self._reorder()

    def _reorder(self) -> None:
        rest = [e for e in self._entries.values() if e is not self._primary]
        self._order = (self._primary, *rest)

    # ---- sealing ----------------------------------------------------------------------------

    def seal(self, plaintext: bytes, kind: int, context: bytes = b"") -> bytes:
        """Encrypt and authenticate with the primary key; the result is len(plaintext) + 33.

        ``context`` is authenticated too but not sent: the opener must supply the same bytes
        (a freshness value sent in clear before the seal, or the request a reply answers)."""
        kind_byte = _check_kind(kind)
        entry = self._primary
        nonce = os.urandom(NONCE_SIZE)
        aad = entry.header + kind_byte + context
        return entry.header + nonce + entry.aead.encrypt(nonce, plaintext, aad)

    def open(self, data: bytes | bytearray | memoryview, kind: int, context: bytes = b"") -> bytes:
        """Authenticate and decrypt; any failure at all is a KeyringError.

        Keys whose id matches the header are tried first, then every other key (ids are only
        4 bytes and are not authenticated on their own, so they are a hint, not a rule).
        """
        after_header = _check_kind(kind) + context
        if len(data) < SEAL_OVERHEAD:
            raise KeyringError(f"sealed message too short ({len(data)} bytes)")
        if data[0] != SEAL_VERSION:
            raise KeyringError(f"unknown sealed-message version {data[0]}")
        header = bytes(data[:HEADER_SIZE])
        kid = header[1:]
        nonce = bytes(data[HEADER_SIZE : HEADER_SIZE + NONCE_SIZE])
        body = bytes(data[HEADER_SIZE + NONCE_SIZE :])
        aad = header + after_header
        for matching in (True, False):
            for entry in self._order:
                if (entry.kid == kid) is not matching:
                    continue
                try:
                    return entry.aead.decrypt(nonce, body, aad)
                except InvalidTag:
                    continue
        raise KeyringError("sealed message failed authentication with every installed key")

    # ---- persistence ------------------------------------------------------------------------

    def to_json(self) -> bytes:
        doc = {
            "version": FILE_VERSION,
            "primary": _encode(self._primary.key),
            "keys": [_encode(e.key) for e in self._order],
        }
        return (json.dumps(doc, indent=2) + "\n").encode("ascii")

    @classmethod
    def from_json(cls, data: bytes, source: str = "keyring") -> Keyring:
        """Parse the document written by `to_json`; KeyringError says what is wrong with it."""
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise KeyringError(f"{source}: corrupted keyring file (not JSON: {exc})") from None
        if not isinstance(doc, dict):
            raise KeyringError(f"{source}: corrupted keyring file (expected a JSON object)")
        version = doc.get("version")
        if version != FILE_VERSION:
            raise KeyringError(
                f"{source}: unsupported keyring file version {version!r} (expected {FILE_VERSION})"
            )
        primary = doc.get("primary")
        keys = doc.get("keys", [])
        if not isinstance(primary, str):
            raise KeyringError(f'{source}: corrupted keyring file ("primary" is not a string)')
        if not isinstance(keys, builtins.list) or not all(isinstance(k, str) for k in keys):
            raise KeyringError(
                f'{source}: corrupted keyring file ("keys" is not a list of strings)'
            )
        try:
            primary_raw = parse_key(primary)
        except KeyringError as exc:
            raise KeyringError(f"{source}: primary key: {exc}") from None
        secondaries: builtins.list[bytes] = []
        for i, k in enumerate(keys):
            try:
                secondaries.append(parse_key(k))
            except KeyringError as exc:
                raise KeyringError(f"{source}: keys[{i}]: {exc}") from None
        try:
            return cls(primary_raw, tuple(secondaries))
        except KeyringError as exc:
            raise KeyringError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        """Read a keyring saved by `save`. A missing file raises FileNotFoundError (so the caller
        can fall back to a key file); a corrupted one raises KeyringError."""
        p = Path(path)
        with p.open("rb") as f:
            data = f.read(MAX_KEYRING_FILE_BYTES + 1)
        if len(data) > MAX_KEYRING_FILE_BYTES:
            raise KeyringError(f"{p}: corrupted keyring file (larger than any keyring can be)")
        return cls.from_json(data, source=str(p))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the keyring atomically, readable by the owner only (0600)."""
        atomic_write(path, self.to_json(), mode=0o600)

    @classmethod
    def from_key_file(cls, path: str | os.PathLike[str]) -> Keyring:
        """A keyring whose only (primary) key is the base64 text in `path` (--cluster-key-file)."""
        p = Path(path)
        with p.open("rb") as f:
            data = f.read(MAX_KEYRING_FILE_BYTES + 1)
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError:
            raise KeyringError(f"{p}: key file is not base64 text") from None
        try:
            return cls(parse_key(text))
        except KeyringError as exc:
            raise KeyringError(f"{p}: {exc}") from None
