"""The gossip keyring: sealing, rotation, binding of key id and kind, persistence."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from meshnet.crypto.keyring import (
    KIND_PACKET,
    KIND_STREAM,
    MAX_KEYS,
    SEAL_OVERHEAD,
    Keyring,
    KeyringError,
    generate_key,
    key_id,
    parse_key,
)

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
K3 = bytes(range(64, 96))


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


# ---- keys ---------------------------------------------------------------------------------


def test_generate_key_is_44_chars_of_base64_for_32_random_bytes() -> None:
    a, b = generate_key(), generate_key()
    assert len(a) == 44 and a.endswith("=")
    assert len(parse_key(a)) == 32
    assert a != b


def test_parse_key_round_trips_and_strips_whitespace() -> None:
    assert parse_key(b64(K1)) == K1
    assert parse_key(f"  {b64(K1)}\n") == K1


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("abc", "44 characters"),
        (b64(bytes(16)), "44 characters"),  # an AES-128 key
        (b64(bytes(33)), "decodes to 33 bytes"),
        ("!" * 43 + "=", "base64"),
        (base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(), "standard base64"),  # -_
        ("é" * 43 + "=", "base64"),
        ("A" * 44, "expected 32"),  # no padding: 33 bytes' worth
    ],
)
def test_parse_key_rejects_bad_text_clearly(text: str, fragment: str) -> None:
    with pytest.raises(KeyringError, match=fragment):
        parse_key(text)


def test_key_id_is_first_four_bytes_of_sha256() -> None:
    assert key_id(K1) == hashlib.sha256(K1).digest()[:4]


# ---- the keyring --------------------------------------------------------------------------


def test_primary_first_order_preserved_no_duplicates() -> None:
    ring = Keyring(K1)
    ring.install(K2)
    ring.install(b64(K3))  # base64 text works as well as bytes
    ring.install(K2)  # already there: no-op
    assert ring.primary == K1
    assert ring.keys() == [K1, K2, K3]
    ring.use(K3)
    assert ring.primary == K3
    assert ring.keys() == [K3, K1, K2]
    assert len(ring) == 3
    assert K2 in ring and b64(K2) in ring and bytes(32) not in ring and "junk" not in ring


def test_list_shows_base64_with_primary_marked() -> None:
    ring = Keyring(K1, (K2,))
    ring.use(K2)
    entries = ring.list()
    assert [e["key"] for e in entries] == [b64(K2), b64(K1)]
    assert [e["primary"] for e in entries] == [True, False]
    assert entries[0]["id"] == key_id(K2).hex()
    json.dumps(entries)  # ready for `meshctl keys list --json`


def test_repr_does_not_leak_key_material() -> None:
    ring = Keyring(K1, (K2,))
    text = repr(ring)
    assert b64(K1) not in text and K1.hex() not in text
    assert key_id(K1).hex() in text


def test_use_requires_installed_key() -> None:
    ring = Keyring(K1)
    with pytest.raises(KeyringError, match="not installed"):
        ring.use(K2)
    assert ring.primary == K1


def test_remove_primary_refused() -> None:
    ring = Keyring(K1, (K2,))
    with pytest.raises(KeyringError, match="primary"):
        ring.remove(K1)
    assert ring.keys() == [K1, K2]


def test_remove_unknown_refused() -> None:
    ring = Keyring(K1)
    with pytest.raises(KeyringError, match="not installed"):
        ring.remove(K2)


def test_bad_keys_refused_by_every_method() -> None:
    with pytest.raises(KeyringError):
        Keyring(b"short")
    ring = Keyring(K1)
    for method in (ring.install, ring.use, ring.remove):
        with pytest.raises(KeyringError):
            method(b"x" * 31)
        with pytest.raises(KeyringError):
            method("not base64!")


def test_keyring_size_is_bounded() -> None:
    ring = Keyring(K1)
    for i in range(1, MAX_KEYS):
        ring.install(bytes([i]) * 32)
    with pytest.raises(KeyringError, match="full"):
        ring.install(bytes([255]) * 32)


# ---- sealing ------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100, 1400, 65536])
def test_round_trip_and_exact_overhead(size: int) -> None:
    ring = Keyring(K1)
    msg = os.urandom(size)
    sealed = ring.seal(msg, KIND_PACKET)
    assert SEAL_OVERHEAD == 33
    assert len(sealed) == size + SEAL_OVERHEAD
    assert sealed[0] == 1
    assert sealed[1:5] == key_id(K1)
    assert ring.open(sealed, KIND_PACKET) == msg
    # another keyring with the same key (another node) opens it too
    assert Keyring(b64(K1)).open(sealed, KIND_PACKET) == msg


def test_open_accepts_bytearray_and_memoryview() -> None:
    ring = Keyring(K1)
    sealed = ring.seal(b"hi", KIND_PACKET)
    assert ring.open(bytearray(sealed), KIND_PACKET) == b"hi"
    assert ring.open(memoryview(sealed), KIND_PACKET) == b"hi"


def test_fresh_nonce_each_seal() -> None:
    ring = Keyring(K1)
    a, b = ring.seal(b"same", KIND_PACKET), ring.seal(b"same", KIND_PACKET)
    assert a != b
    assert a[5:17] != b[5:17]


def test_rotation_install_use_remove() -> None:
    old, new = Keyring(K1), Keyring(K1)
    sealed_old = old.seal(b"before rotation", KIND_PACKET)

    new.install(K2)
    new.use(K2)
    # still opens what a node that has not rotated yet seals with the old primary
    assert new.open(sealed_old, KIND_PACKET) == b"before rotation"
    sealed_new = new.seal(b"after rotation", KIND_PACKET)
    assert sealed_new[1:5] == key_id(K2)
    # a node that has only installed the new key (not used it) opens it
    old.install(K2)
    assert old.open(sealed_new, KIND_PACKET) == b"after rotation"

    new.remove(K1)
    with pytest.raises(KeyringError):
        new.open(sealed_old, KIND_PACKET)
    assert new.open(sealed_new, KIND_PACKET) == b"after rotation"


def test_unknown_key_fails() -> None:
    sealed = Keyring(K1).seal(b"x", KIND_PACKET)
    with pytest.raises(KeyringError, match="authentication"):
        Keyring(K2, (K3,)).open(sealed, KIND_PACKET)


def test_open_tries_every_key_when_id_does_not_match() -> None:
    """The key id is a hint: a message whose key id names no installed key (or the wrong one)
    is still tried against every key, and it opens only if the additional data matches."""
    ring = Keyring(K2, (K3, K1))
    # A sealer whose header carries a key id that is not SHA-256(key)[:4] (for example a
    # collision, or a future id scheme): build it with AESGCM directly.
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header = b"\x01" + b"\xde\xad\xbe\xef"
    nonce = os.urandom(12)
    ct = AESGCM(K1).encrypt(nonce, b"payload", header + bytes([KIND_PACKET]))
    assert ring.open(header + nonce + ct, KIND_PACKET) == b"payload"


def test_key_id_is_bound() -> None:
    """Rewriting the key id (e.g. to point at another installed key) breaks authentication."""
    ring = Keyring(K1, (K2,))
    sealed = bytearray(ring.seal(b"bound", KIND_PACKET))
    sealed[1:5] = key_id(K2)
    with pytest.raises(KeyringError):
        ring.open(bytes(sealed), KIND_PACKET)


def test_kind_is_bound() -> None:
    ring = Keyring(K1)
    packet = ring.seal(b"gossip", KIND_PACKET)
    with pytest.raises(KeyringError):
        ring.open(packet, KIND_STREAM)
    stream = ring.seal(b"push-pull", KIND_STREAM)
    with pytest.raises(KeyringError):
        ring.open(stream, KIND_PACKET)
    assert ring.open(stream, KIND_STREAM) == b"push-pull"


def test_kind_out_of_range_is_a_caller_bug() -> None:
    ring = Keyring(K1)
    with pytest.raises(ValueError):
        ring.seal(b"", 256)
    with pytest.raises(ValueError):
        ring.open(ring.seal(b"", 1), -1)


def test_tampering_with_any_byte_fails() -> None:
    ring = Keyring(K1, (K2,))
    sealed = ring.seal(b"do not touch", KIND_PACKET)
    for i in range(len(sealed)):
        for flip in (0x01, 0x80):
            bad = bytearray(sealed)
            bad[i] ^= flip
            with pytest.raises(KeyringError):
                ring.open(bytes(bad), KIND_PACKET)


def test_truncation_and_extension_fail() -> None:
    ring = Keyring(K1)
    sealed = ring.seal(b"abc", KIND_PACKET)
    for n in range(len(sealed)):
        with pytest.raises(KeyringError):
            ring.open(sealed[:n], KIND_PACKET)
    with pytest.raises(KeyringError):
        ring.open(sealed + b"\x00", KIND_PACKET)


def test_short_and_unknown_version_messages() -> None:
    ring = Keyring(K1)
    with pytest.raises(KeyringError, match="too short"):
        ring.open(b"", KIND_PACKET)
    with pytest.raises(KeyringError, match="too short"):
        ring.open(b"\x01" * 32, KIND_PACKET)
    sealed = bytearray(ring.seal(b"v", KIND_PACKET))
    sealed[0] = 2
    with pytest.raises(KeyringError, match="version"):
        ring.open(bytes(sealed), KIND_PACKET)


# ---- persistence --------------------------------------------------------------------------


def test_save_load_round_trip_mode_0600(tmp_path: Path) -> None:
    ring = Keyring(K1, (K2, K3))
    ring.use(K2)
    path = tmp_path / "sub" / "keyring.json"
    ring.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert doc == {"version": 1, "primary": b64(K2), "keys": [b64(K2), b64(K1), b64(K3)]}
    loaded = Keyring.load(path)
    assert loaded.primary == K2
    assert loaded.keys() == [K2, K1, K3]
    sealed = ring.seal(b"persist", KIND_STREAM)
    assert loaded.open(sealed, KIND_STREAM) == b"persist"
    assert not list(tmp_path.glob("sub/.*.tmp"))


def test_save_overwrites_and_tightens_mode(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_text("old")
    path.chmod(0o644)
    Keyring(K1).save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Keyring.load(path).keys() == [K1]


def test_load_accepts_primary_missing_from_keys(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"version": 1, "primary": b64(K1), "keys": [b64(K2), b64(K2)]}))
    assert Keyring.load(path).keys() == [K1, K2]


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "not JSON"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"primary": "x"}', "version"),
        (b'{"version": 2, "primary": "x", "keys": []}', "version 2"),
        (b'{"version": 1, "keys": []}', "primary"),
        (b'{"version": 1, "primary": 5, "keys": []}', "primary"),
        (b'{"version": 1, "primary": "short", "keys": []}', "primary key"),
        (f'{{"version": 1, "primary": "{b64(K1)}", "keys": "x"}}'.encode(), "keys"),
        (f'{{"version": 1, "primary": "{b64(K1)}", "keys": [1]}}'.encode(), "keys"),
        (f'{{"version": 1, "primary": "{b64(K1)}", "keys": ["bad"]}}'.encode(), r"keys\[0\]"),
        (b"[" * 50000, "not JSON"),
    ],
)
def test_load_corrupted_file_gives_clear_keyring_error(
    tmp_path: Path, content: bytes, fragment: str
) -> None:
    path = tmp_path / "keyring.json"
    path.write_bytes(content)
    with pytest.raises(KeyringError, match=fragment) as info:
        Keyring.load(path)
    assert str(path) in str(info.value)


def test_load_too_many_keys(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    keys = [b64(bytes([i]) * 32) for i in range(MAX_KEYS + 1)]
    path.write_text(json.dumps({"version": 1, "primary": keys[0], "keys": keys}))
    with pytest.raises(KeyringError, match="full"):
        Keyring.load(path)


def test_load_huge_file_refused(tmp_path: Path) -> None:
    path = tmp_path / "keyring.json"
    path.write_bytes(b" " * (1 << 20))
    with pytest.raises(KeyringError, match="larger"):
        Keyring.load(path)


def test_load_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        Keyring.load(tmp_path / "nope.json")


def test_from_key_file(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    path.write_text(f"\n  {b64(K1)}  \n")
    ring = Keyring.from_key_file(path)
    assert ring.keys() == [K1]


@pytest.mark.parametrize("content", [b"", b"\n", b"garbage\n", b"\xff" * 44, b64(K1).encode() * 2])
def test_from_key_file_bad_content(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "cluster.key"
    path.write_bytes(content)
    with pytest.raises(KeyringError) as info:
        Keyring.from_key_file(path)
    assert str(path) in str(info.value)
