"""The node's static X25519 identity on disk."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshnet.crypto.identity import (
    IdentityError,
    load_identity,
    load_or_create_identity,
    public_bytes,
)


def test_created_once_0600_and_loaded_again(tmp_path: Path) -> None:
    path = tmp_path / "state" / "identity.key"
    k1 = load_or_create_identity(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    k2 = load_or_create_identity(path)
    assert public_bytes(k1) == public_bytes(k2) and len(public_bytes(k1)) == 32
    assert base64.b64decode(path.read_bytes().strip()) == k1.private_bytes_raw()


def test_raw_32_bytes_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / "id"
    key = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    path.write_bytes(key.private_bytes_raw())
    os.chmod(path, 0o600)
    assert public_bytes(load_identity(path)) == public_bytes(key)


def test_loose_permissions_are_tightened(tmp_path: Path) -> None:
    path = tmp_path / "id"
    load_or_create_identity(path)
    os.chmod(path, 0o644)
    load_or_create_identity(path)
    assert (path.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("content", [b"", b"not base64!!", b"QUJD\n", b"x" * 1000])
def test_garbage_is_an_error_never_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "id"
    path.write_bytes(content)
    with pytest.raises(IdentityError):
        load_or_create_identity(path)
    assert path.read_bytes() == content


def test_missing_file_for_load_identity(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_identity(tmp_path / "nope")
