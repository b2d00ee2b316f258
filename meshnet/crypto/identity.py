"""The node's static X25519 identity for the datapath handshake.

Created once, persisted 0600 in the state dir (base64 text, one line), and loaded on every
start. Its public half is published in the node's membership metadata (which the cluster key
authenticates), which is how peers learn whom they are talking to.

This module does file I/O (the agent calls it once at start); the handshake itself is pure.
A file that exists but does not hold a key is an error, never silently replaced: a new
identity would make every peer's pinned view of this node wrong until gossip catches up, and a
corrupt state dir deserves an operator's attention.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshnet.fsutil import atomic_write

__all__ = [
    "IDENTITY_FILE_MODE",
    "IdentityError",
    "load_identity",
    "load_or_create_identity",
    "public_bytes",
]

KEY_SIZE = 32
IDENTITY_FILE_MODE = 0o600
# Base64 of 32 bytes is 44 characters; allow a newline and stray whitespace, nothing near a
# real file: anything bigger is not an identity, so refuse it before reading it.
MAX_IDENTITY_FILE_BYTES = 256


class IdentityError(Exception):
    """The identity file exists but cannot be used (says which file and why)."""


def public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key (what membership metadata carries)."""
    return key.public_key().public_bytes_raw()


def _parse(data: bytes, path: Path) -> X25519PrivateKey:
    if len(data) == KEY_SIZE:  # raw bytes (accepted; we write base64)
        return X25519PrivateKey.from_private_bytes(data)
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise IdentityError(f"{path}: not a base64 X25519 private key") from None
    if len(raw) != KEY_SIZE:
        raise IdentityError(f"{path}: key is {len(raw)} bytes, expected {KEY_SIZE}")
    return X25519PrivateKey.from_private_bytes(raw)


def load_identity(path: str | os.PathLike[str]) -> X25519PrivateKey:
    """Load an existing identity; raises FileNotFoundError or IdentityError."""
    p = Path(path)
    st = p.stat()
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"{p}: not a regular file")
    if st.st_size > MAX_IDENTITY_FILE_BYTES:
        raise IdentityError(f"{p}: {st.st_size} bytes is too big for a key")
    if st.st_mode & 0o077:
        # A private key readable by others: tighten it rather than refuse to start.
        os.chmod(p, IDENTITY_FILE_MODE)
    with p.open("rb") as f:
        data = f.read(MAX_IDENTITY_FILE_BYTES + 1)
    return _parse(data, p)


def load_or_create_identity(path: str | os.PathLike[str]) -> X25519PrivateKey:
    """The identity at `path`, created (0600, atomically) if the file does not exist."""
    try:
        return load_identity(path)
    except FileNotFoundError:
        pass
    key = X25519PrivateKey.generate()
    raw = key.private_bytes_raw()
    atomic_write(path, base64.b64encode(raw) + b"\n", mode=IDENTITY_FILE_MODE)
    return key
