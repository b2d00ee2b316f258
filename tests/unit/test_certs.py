"""Node certificates, revocations, claims and their files (meshnet/crypto/certs.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from meshnet.crypto import certs
from meshnet.crypto.certs import (
    ARMOR_CA,
    ARMOR_NODE,
    ARMOR_REVOCATION,
    DAY,
    MAX_CERT_BYTES,
    CertError,
    NodeKeys,
    VerifyCache,
    armor,
    check_node_cert,
    dearmor,
    decode_ca,
    decode_node_cert,
    decode_revocation,
    generate_node_keys,
    load_ca,
    load_ca_cert,
    load_node_cert,
    load_node_keys,
    load_revocation,
    make_ca,
    save_ca,
    save_node,
    sign_claim,
    sign_node,
    sign_revocation,
    verify_claim,
)
from meshnet.wire import pack, unpack

NOW = 1_700_000_000
CA_KEY, CA = make_ca("test-ca", NOW, 10)
OTHER_KEY, OTHER_CA = make_ca("other-ca", NOW, 10)
KEYS = generate_node_keys()


def node(name: str = "web-1", now: int = NOW, days: int = 5, **kw: Any) -> certs.NodeCert:
    return sign_node(CA_KEY, CA, name, kw.pop("roles", ["worker"]), kw.pop("labels", {}),
                     KEYS.sign_pub, KEYS.dp_pub, now, days, **kw)


def forge(kind_domain: bytes, body: list[Any], key: Ed25519PrivateKey = CA_KEY) -> bytes:
    """A correctly signed object with an arbitrary body, to reach the field checks."""
    body_bytes = pack(body)
    return pack([body_bytes, key.sign(kind_domain + body_bytes)])


def node_body(**over: Any) -> list[Any]:
    fields = {"v": 1, "kind": "node", "name": "web-1", "roles": ["worker"], "labels": {},
              "sign": KEYS.sign_pub, "dp": KEYS.dp_pub, "nb": NOW, "na": NOW + DAY,
              "serial": bytes(16), "issuer": CA.fingerprint}
    fields.update(over)
    return list(fields.values())


# --- round trips --------------------------------------------------------------------------------

def test_ca_round_trip_and_fingerprint() -> None:
    assert decode_ca(CA.raw) == CA
    assert (CA.name, CA.not_before, CA.not_after) == ("test-ca", NOW, NOW + 10 * DAY)
    assert CA.public_key == CA_KEY.public_key().public_bytes_raw()
    assert CA.fingerprint == hashlib.sha256(CA.public_key).digest()[:16]
    assert CA.fingerprint_hex == CA.fingerprint.hex()


def test_node_cert_round_trip() -> None:
    cert = node(roles=["worker", "admin", "worker"], labels={"zone": "a", "rack": "r-1"},
                serial=bytes(range(16)))
    assert cert.roles == ("admin", "worker") and cert.is_admin
    assert cert.labels == {"zone": "a", "rack": "r-1"}
    assert (cert.sign_key, cert.dp_key) == (KEYS.sign_pub, KEYS.dp_pub)
    assert (cert.not_before, cert.not_after) == (NOW, NOW + 5 * DAY)
    assert cert.serial == bytes(range(16)) and cert.issuer == CA.fingerprint
    assert len(cert.raw) <= MAX_CERT_BYTES
    assert decode_node_cert(cert.raw, CA) == cert
    assert hash(cert) == hash(decode_node_cert(cert.raw, CA))
    assert not node().is_admin


def test_random_serials_differ() -> None:
    assert len({node().serial for _ in range(20)}) == 20


def test_revocation_round_trip() -> None:
    by_serial = sign_revocation(CA_KEY, CA, "web-1", bytes(16), NOW)
    by_name = sign_revocation(CA_KEY, CA, "web-1", None, NOW)
    assert decode_revocation(by_serial.raw, CA) == by_serial
    assert decode_revocation(by_name.raw, CA) == by_name
    assert by_name.serial is None and by_serial.issuer == CA.fingerprint


def test_node_keys() -> None:
    k = generate_node_keys()
    assert len(k.sign_pub) == 32 and len(k.dp_pub) == 32
    assert k.sign_pub == k.sign.public_key().public_bytes_raw()
    assert k.dp_pub == k.dp.public_key().public_bytes_raw()
    assert generate_node_keys().sign_pub != k.sign_pub


# --- tampering and the wrong CA -----------------------------------------------------------------

@pytest.mark.parametrize("which", ["ca", "node", "revocation"])
def test_tampering_any_byte_breaks_verification(which: str) -> None:
    raw, decode = {
        "ca": (CA.raw, decode_ca),
        "node": (node(labels={"a": "b"}).raw, lambda r: decode_node_cert(r, CA)),
        "revocation": (sign_revocation(CA_KEY, CA, "x", None, NOW).raw,
                       lambda r: decode_revocation(r, CA)),
    }[which]
    decode(raw)
    for i in range(len(raw)):
        for flip in (0x01, 0x80, 0xFF):
            bad = bytearray(raw)
            bad[i] ^= flip
            with pytest.raises(CertError):
                decode(bytes(bad))
    for cut in range(len(raw)):
        with pytest.raises(CertError):
            decode(raw[:cut])
    with pytest.raises(CertError, match="malformed"):
        decode(raw + b"\x00")


def test_cert_from_another_ca_is_refused() -> None:
    other = sign_node(OTHER_KEY, OTHER_CA, "web-1", ["worker"], {}, KEYS.sign_pub, KEYS.dp_pub,
                      NOW, 1)
    with pytest.raises(CertError, match="signed by another CA"):
        decode_node_cert(other.raw, CA)
    with pytest.raises(CertError, match="signed by another CA"):
        check_node_cert(other, CA, NOW)
    rev = sign_revocation(OTHER_KEY, OTHER_CA, "web-1", None, NOW)
    with pytest.raises(CertError, match="signed by another CA"):
        decode_revocation(rev.raw, CA)


def test_issuer_claimed_but_signed_by_another_key() -> None:
    raw = forge(certs.DOMAIN_NODE, node_body(), key=OTHER_KEY)
    with pytest.raises(CertError, match="bad signature"):
        decode_node_cert(raw, CA)


def test_signature_of_one_kind_is_not_valid_for_another() -> None:
    # The same body signed under the revocation prefix does not pass as a node certificate.
    raw = forge(certs.DOMAIN_REVOCATION, node_body())
    with pytest.raises(CertError, match="bad signature"):
        decode_node_cert(raw, CA)
    assert decode_node_cert(forge(certs.DOMAIN_NODE, node_body()), CA).name == "web-1"


def test_self_signature_of_ca_is_checked() -> None:
    body = [1, "ca", "evil", CA.public_key, NOW, NOW + DAY]
    with pytest.raises(CertError, match="bad signature on the CA"):
        decode_ca(forge(certs.DOMAIN_CA, body, key=OTHER_KEY))


# --- check_node_cert: every reason --------------------------------------------------------------

def test_validity_boundaries() -> None:
    cert = node(now=NOW + 100, days=1)
    with pytest.raises(CertError, match="not yet valid"):
        check_node_cert(cert, CA, NOW + 99)
    check_node_cert(cert, CA, NOW + 100)
    check_node_cert(cert, CA, NOW + 100 + DAY - 1)
    with pytest.raises(CertError, match="expired"):
        check_node_cert(cert, CA, NOW + 100 + DAY)
    assert not cert.valid_at(NOW + 99) and cert.valid_at(NOW + 100)
    assert cert.valid_at(NOW + 100 + DAY - 1) and not cert.valid_at(NOW + 100 + DAY)


def test_ca_validity_is_checked_too() -> None:
    cert = node(days=100)  # clamped to the CA's 10 days
    assert cert.not_after == CA.not_after
    check_node_cert(cert, CA, CA.not_after - 1)
    with pytest.raises(CertError, match="CA certificate expired"):
        check_node_cert(cert, CA, CA.not_after)
    with pytest.raises(CertError, match="CA certificate not yet valid"):
        check_node_cert(cert, CA, NOW - 1)


def test_wrong_name() -> None:
    cert = node("web-1")
    check_node_cert(cert, CA, NOW, name="web-1")
    with pytest.raises(CertError, match="names node web-1, not web-2"):
        check_node_cert(cert, CA, NOW, name="web-2")


def test_revocation_by_serial() -> None:
    cert = node(serial=b"\x01" * 16)
    mine = sign_revocation(CA_KEY, CA, "web-1", b"\x01" * 16, NOW)
    other_serial = sign_revocation(CA_KEY, CA, "web-1", b"\x02" * 16, NOW)
    other_name = sign_revocation(CA_KEY, CA, "web-2", b"\x01" * 16, NOW)
    other_ca = sign_revocation(OTHER_KEY, OTHER_CA, "web-1", b"\x01" * 16, NOW)
    check_node_cert(cert, CA, NOW, revocations=[other_serial, other_name, other_ca])
    with pytest.raises(CertError, match="revoked: serial 0101"):
        check_node_cert(cert, CA, NOW, revocations=[other_serial, mine])


def test_revocation_by_name_before_time() -> None:
    old = node(now=NOW + 10)
    rev = sign_revocation(CA_KEY, CA, "web-1", None, NOW + 11)
    with pytest.raises(CertError, match="revoked: every certificate of web-1"):
        check_node_cert(old, CA, NOW + 20, revocations=[rev])
    same_second = node(now=NOW + 11)  # issued at issued_at: not before it, so still good
    check_node_cert(same_second, CA, NOW + 20, revocations=[rev])
    reissued = node(now=NOW + 12)
    check_node_cert(reissued, CA, NOW + 20, revocations=[rev])
    check_node_cert(node("web-2", now=NOW + 10), CA, NOW + 20, revocations=[rev])


# --- bad inputs to the signers ------------------------------------------------------------------

@pytest.mark.parametrize(("kw", "match"), [
    ({"name": "bad_"}, "bad name"),
    ({"name": ""}, "bad name"),
    ({"name": "a" * 64}, "bad name"),
    ({"name": "web-1\n"}, "bad name"),
    ({"roles": []}, "at least one role"),
    ({"roles": ["root"]}, "unknown role"),
    ({"roles": "worker"}, "list of role names"),
    ({"labels": {"bad key": "v"}}, "bad label key"),
    ({"labels": {"k": "v" * 64}}, "bad label"),
    ({"labels": {"k": "tab\there"}}, "bad label"),
    ({"labels": {f"k{i}": "v" for i in range(17)}}, "17 labels"),
    ({"labels": {f"{i:02d}" + "k" * 61: "v" * 63 for i in range(16)}}, "over 2048"),
    ({"sign_pub": b"x" * 31}, "signing public key"),
    ({"dp_pub": b"x" * 33}, "datapath public key"),
    ({"serial": b"x" * 15}, "serial"),
    ({"days": 0}, "days"),
    ({"days": certs.MAX_DAYS + 1}, "days"),
    ({"now": NOW - 1}, "CA certificate is not valid now"),
    ({"now": CA.not_after}, "CA certificate is not valid now"),
    ({"ca_key": OTHER_KEY}, "does not match"),
])
def test_sign_node_refuses_bad_input(kw: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {"ca_key": CA_KEY, "ca": CA, "name": "web-1", "roles": ["worker"],
                            "labels": {}, "sign_pub": KEYS.sign_pub, "dp_pub": KEYS.dp_pub,
                            "now": NOW, "days": 1}
    args.update(kw)
    with pytest.raises(CertError, match=match):
        sign_node(**args)


def test_make_ca_and_revocation_refuse_bad_input() -> None:
    with pytest.raises(CertError, match="bad CA name"):
        make_ca("-x", NOW, 1)
    with pytest.raises(CertError, match="days"):
        make_ca("x", NOW, 0)
    with pytest.raises(CertError, match="bad time"):
        make_ca("x", -1, 1)
    with pytest.raises(CertError, match="serial"):
        sign_revocation(CA_KEY, CA, "web-1", b"short", NOW)
    with pytest.raises(CertError, match="does not match"):
        sign_revocation(OTHER_KEY, CA, "web-1", None, NOW)


# --- malformed objects (correctly signed, so the field checks are what refuses them) ------------

@pytest.mark.parametrize(("over", "match"), [
    ({"v": 2}, "unsupported format version 2"),
    ({"v": True}, "unsupported format version"),
    ({"kind": "ca"}, "it is a 'ca', not a 'node'"),
    ({"name": "bad_"}, "bad name"),
    ({"roles": ["worker", "admin"]}, "not sorted and unique"),
    ({"roles": ["worker", "worker"]}, "not sorted and unique"),
    ({"roles": []}, "non-empty list"),
    ({"roles": ["boss"]}, "unknown role"),
    ({"labels": {"k": 1}}, "bad label"),
    ({"labels": [1]}, "labels must be a map"),
    ({"sign": b"x" * 31}, "signing key"),
    ({"dp": "x" * 32}, "datapath key"),
    ({"nb": True}, "not_before"),
    ({"na": 1.5}, "not_after"),
    ({"na": -1}, "not_after"),
    ({"serial": None}, "serial"),
    ({"issuer": b"x" * 32}, "issuer"),
])
def test_malformed_node_fields(over: dict[str, Any], match: str) -> None:
    with pytest.raises(CertError, match="malformed node certificate: .*" + match):
        decode_node_cert(forge(certs.DOMAIN_NODE, node_body(**over)), CA)


def test_malformed_shapes() -> None:
    with pytest.raises(CertError, match="over 2048"):
        decode_ca(b"\x00" * (MAX_CERT_BYTES + 1))
    with pytest.raises(CertError, match="malformed CA certificate"):
        decode_ca(b"")
    with pytest.raises(CertError, match="not bytes"):
        decode_ca("text")  # type: ignore[arg-type]
    with pytest.raises(CertError, match="not \\[body, signature\\]"):
        decode_ca(pack([b"x"]))
    with pytest.raises(CertError, match="signature of 3 bytes"):
        decode_ca(pack([b"x", b"abc"]))
    with pytest.raises(CertError, match="12 fields, expected 11"):
        decode_node_cert(forge(certs.DOMAIN_NODE, [*node_body(), 1]), CA)
    with pytest.raises(CertError, match="it is a 'node', not a 'ca'"):
        decode_ca(node().raw)
    with pytest.raises(CertError, match=r"malformed revocation: .*serial"):
        decode_revocation(forge(certs.DOMAIN_REVOCATION,
                                [1, "revocation", "x", b"s", NOW, CA.fingerprint]), CA)


# --- claims -------------------------------------------------------------------------------------

def test_claim_round_trip_and_domain_separation() -> None:
    sig = sign_claim(KEYS.sign, b"meshnet-alive-v1", b"payload")
    assert verify_claim(KEYS.sign_pub, sig, b"meshnet-alive-v1", b"payload")
    assert verify_claim(KEYS.sign_pub, sig, b"meshnet-alive-v1", memoryview(b"payload"))
    assert not verify_claim(KEYS.sign_pub, sig, b"meshnet-store-v1", b"payload")
    assert not verify_claim(KEYS.sign_pub, sig, b"meshnet-alive-v1", b"payload!")
    assert not verify_claim(generate_node_keys().sign_pub, sig, b"meshnet-alive-v1", b"payload")
    # domain + NUL + data is unambiguous: a domain cannot hold NUL
    assert not verify_claim(KEYS.sign_pub, sig, b"meshnet-alive-v1\0payload", b"")
    with pytest.raises(CertError):
        sign_claim(KEYS.sign, b"a\0b", b"")


def test_claim_domains_of_certificates_are_reserved() -> None:
    with pytest.raises(CertError, match="bad claim domain"):
        sign_claim(CA_KEY, b"meshnet-node-cert-v1", b"x")
    body_bytes, sig = unpack(CA.raw)  # the CA's self-signature is not a claim
    assert not verify_claim(CA.public_key, sig, b"meshnet-ca-v1", body_bytes)


WEAK_KEYS = [y[:31] + bytes((y[31] | sign,)) for y in sorted(certs._SMALL_ORDER_Y)
             for sign in (0, 0x80)]


def test_small_order_keys_are_forgeable_so_they_are_blocked() -> None:
    """Every blocked key that OpenSSL parses accepts a constant signature for some messages
    (the identity R, S = 0); a normal key never does. This checks the blocklist is right."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    forged = bytes([1]) + bytes(63)  # R = identity (y = 1), S = 0

    def forgeable(pk: bytes) -> bool:
        try:
            key = Ed25519PublicKey.from_public_bytes(pk)
        except ValueError:
            return True  # unparseable: refusing it costs nothing
        hits = 0
        for i in range(64):
            try:
                key.verify(forged, i.to_bytes(2, "big"))
                hits += 1
            except InvalidSignature:
                pass
        return hits > 0

    assert all(forgeable(pk) for pk in WEAK_KEYS)
    assert not forgeable(KEYS.sign_pub)
    assert all(certs.is_weak_sign_key(pk) for pk in WEAK_KEYS)
    assert not certs.is_weak_sign_key(KEYS.sign_pub) and not certs.is_weak_sign_key(b"")


def test_weak_keys_are_refused_everywhere() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    weak = bytes(32)
    Ed25519PublicKey.from_public_bytes(weak).verify(bytes(64), b"d\0\x0b")  # OpenSSL: valid!
    assert not verify_claim(weak, bytes(64), b"d", b"\x0b")
    assert not VerifyCache().verify(weak, bytes(64), b"d", b"\x0b")
    with pytest.raises(CertError, match="weak"):
        sign_node(CA_KEY, CA, "web-1", ["worker"], {}, weak, KEYS.dp_pub, NOW, 1)
    with pytest.raises(CertError, match="malformed node certificate: signing key is a weak"):
        decode_node_cert(forge(certs.DOMAIN_NODE, node_body(sign=weak)), CA)
    with pytest.raises(CertError, match="malformed CA certificate: public key is a weak"):
        decode_ca(pack([pack([1, "ca", "x", weak, NOW, NOW + 1]), bytes(64)]))


@pytest.mark.parametrize("args", [
    (b"x" * 31, b"s" * 64, b"d", b""),
    (b"x" * 32, b"s" * 63, b"d", b""),
    (b"x" * 32, b"s" * 64, b"", b""),
    (b"x" * 32, b"s" * 64, b"d" * 65, b""),
    (b"x" * 32, b"s" * 64, "d", b""),
    (None, None, None, None),
    (b"x" * 32, b"s" * 64, b"d", "text"),
])
def test_verify_claim_bad_input_is_false(args: tuple[Any, ...]) -> None:
    assert verify_claim(*args) is False


# --- VerifyCache --------------------------------------------------------------------------------

def _claims(n: int, size: int = 10) -> list[tuple[bytes, bytes, bytes, bytes]]:
    out = []
    for i in range(n):
        data = i.to_bytes(4, "big") * (size // 4)
        out.append((KEYS.sign_pub, sign_claim(KEYS.sign, b"d", data), b"d", data))
    return out


def test_cache_counts_hits_and_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = certs.verify_claim
    monkeypatch.setattr(certs, "verify_claim", lambda *a: calls.append(1) or real(*a))
    cache = VerifyCache()
    pk, sig, dom, data = _claims(1)[0]
    assert cache.verify(pk, sig, dom, data) is True
    assert cache.verify(pk, sig, dom, data) is True
    assert cache.verify(pk, sig, dom, bytes(data)) is True  # equal bytes, another object: a hit
    assert (cache.hits, cache.misses, len(calls)) == (2, 1, 1)
    bad = bytes(64)
    assert cache.verify(pk, bad, dom, data) is False
    assert cache.verify(pk, bad, dom, data) is False  # False is memoized too
    assert (cache.hits, cache.misses, len(calls)) == (3, 2, 2)
    assert len(cache) == 2 and cache.total_bytes == 2 * (32 + 64 + 1 + len(data))


def test_cache_is_bounded_by_count_fifo() -> None:
    cache = VerifyCache(max_entries=4)
    claims = _claims(6)
    for c in claims:
        assert cache.verify(*c)
    assert len(cache) == 4 and cache.misses == 6
    assert cache.verify(*claims[5]) and cache.hits == 1  # newest kept
    assert cache.verify(*claims[0]) and cache.misses == 7  # oldest evicted
    assert cache.total_bytes == 4 * (32 + 64 + 1 + 8)


def test_cache_is_bounded_by_bytes() -> None:
    entry = 32 + 64 + 1 + 100
    cache = VerifyCache(max_entries=1000, max_bytes=entry * 64 * 3)  # room for 192 entries
    for c in _claims(300, size=100):
        cache.verify(*c)
    assert cache.total_bytes <= cache.max_bytes and len(cache) == 192
    big = _claims(1, size=entry * 4)[0]  # over 1/64 of the budget: answered, not kept
    assert cache.verify(*big) and len(cache) == 192
    assert cache.verify(*big) and cache.hits == 0


def test_cache_copies_views_and_skips_garbage() -> None:
    cache = VerifyCache()
    pk, sig, dom, data = _claims(1)[0]
    big = bytearray(b"x" * 10_000 + data)
    view = memoryview(big)[10_000:]  # writable: unhashable; pins 10 KB
    assert cache.verify(pk, sig, dom, view) is True
    assert len(cache) == 1 and cache.total_bytes == 32 + 64 + 1 + len(data)  # a copy is kept
    assert cache.verify(pk, sig, dom, data) and cache.verify(pk, sig, dom, bytearray(data))
    assert cache.verify(pk, sig, dom, memoryview(data))  # a read-only view hits as it is
    assert (cache.hits, cache.misses) == (3, 1)
    assert cache.verify(pk, sig, dom, 7) is False  # type: ignore[arg-type]
    assert cache.verify(pk, sig, None, data) is False  # type: ignore[arg-type]
    assert len(cache) == 1 and cache.misses == 3
    with pytest.raises(ValueError):
        VerifyCache(max_entries=0)


# --- armor --------------------------------------------------------------------------------------

def test_armor_round_trip() -> None:
    cert = node(labels={"zone": "eu-west-1a", "rack": "r17"})
    text = armor(ARMOR_NODE, cert.raw)
    lines = text.splitlines()
    assert lines[0] == "-----BEGIN MESHNET NODE CERTIFICATE-----"
    assert lines[-1] == "-----END MESHNET NODE CERTIFICATE-----"
    assert all(len(line) <= 64 for line in lines[1:-1]) and len(lines[1]) == 64
    assert dearmor(ARMOR_NODE, text) == cert.raw
    assert dearmor(ARMOR_NODE, "comment\n\n  " + text.replace("\n", "\r\n") + "trailer") \
        == cert.raw
    assert certs.sniff_armor("x\n" + text) == ARMOR_NODE


@pytest.mark.parametrize(("kind", "text", "match"), [
    (ARMOR_CA, armor(ARMOR_NODE, b"x"), "expected one"),
    (ARMOR_CA, armor(ARMOR_CA, b"x") * 2, "expected one"),
    (ARMOR_CA, "-----BEGIN MESHNET CA CERTIFICATE-----\n-----END MESHNET CA CERTIFICATE-----",
     "empty"),
    (ARMOR_CA, armor(ARMOR_CA, b"xyz").replace("eHl6", "eH!6"), "bad base64"),
    (ARMOR_CA, armor(ARMOR_CA, b"xyz").replace("eHl6", "é"), "bad base64"),
    (ARMOR_CA, armor(ARMOR_CA, b"x" * 2049), "characters|bytes"),
    (ARMOR_CA, "x" * 5000, "characters"),
    ("SECRET", "", "unknown armor kind"),
])
def test_dearmor_refuses(kind: str, text: str, match: str) -> None:
    with pytest.raises(CertError, match=match):
        dearmor(kind, text)


# --- files --------------------------------------------------------------------------------------

def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_save_and_load_ca(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    save_ca(d, CA_KEY, CA)
    assert (_mode(d), _mode(d / "ca.key"), _mode(d / "ca.crt")) == (0o700, 0o600, 0o644)
    assert sorted(p.name for p in d.iterdir()) == ["ca.crt", "ca.key"]  # no temporaries left
    key, ca = load_ca(d)
    assert ca == CA and key.public_key().public_bytes_raw() == CA.public_key
    assert load_ca_cert(d / "ca.crt") == CA
    assert (d / "ca.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (d / "ca.crt").read_text() == armor(ARMOR_CA, CA.raw)
    with pytest.raises(CertError, match="exists; refusing to overwrite"):
        save_ca(d, OTHER_KEY, OTHER_CA)
    save_ca(d, OTHER_KEY, OTHER_CA, overwrite=True)
    assert load_ca(d)[1] == OTHER_CA
    with pytest.raises(CertError, match="does not match"):
        save_ca(tmp_path / "x", CA_KEY, OTHER_CA)


def test_writes_are_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[tuple[str, int]] = []
    real = certs.atomic_write

    def spy(path: Any, data: bytes, mode: int = 0o600) -> None:
        written.append((Path(path).name, mode))
        real(path, data, mode)

    monkeypatch.setattr(certs, "atomic_write", spy)
    save_ca(tmp_path / "ca", CA_KEY, CA)
    save_node(tmp_path / "n", KEYS, node())
    assert written == [("ca.key", 0o600), ("ca.crt", 0o644), ("node.key", 0o600),
                       ("node.crt", 0o644)]

    # a write that fails half-way leaves the old file whole and no temporary behind
    def boom(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    before = (tmp_path / "n" / "node.crt").read_bytes()
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_node(tmp_path / "n", KEYS, node(), overwrite=True)
    assert (tmp_path / "n" / "node.crt").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "n").iterdir()) == ["node.crt", "node.key"]


def test_save_and_load_node(tmp_path: Path) -> None:
    d = tmp_path / "deep" / "node"
    cert = node(labels={"zone": "a"})
    save_node(d, KEYS, cert)
    assert (_mode(d), _mode(d / "node.key"), _mode(d / "node.crt")) == (0o700, 0o600, 0o644)
    keys = load_node_keys(d / "node.key")
    assert (keys.sign_pub, keys.dp_pub) == (KEYS.sign_pub, KEYS.dp_pub)
    assert load_node_cert(d / "node.crt", CA) == cert
    text = (d / "node.key").read_text()
    assert text.count("-----BEGIN PRIVATE KEY-----") == 2
    with pytest.raises(CertError, match="exists"):
        save_node(d, KEYS, cert)
    with pytest.raises(CertError, match="do not match"):
        save_node(tmp_path / "y", generate_node_keys(), cert)
    with pytest.raises(CertError, match=f"{d / 'node.crt'}: signed by another CA"):
        load_node_cert(d / "node.crt", OTHER_CA)


def test_key_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    save_ca(tmp_path, CA_KEY, CA)
    save_node(tmp_path, KEYS, node())
    for name, load in (("ca.key", lambda: load_ca(tmp_path)),
                       ("node.key", lambda: load_node_keys(tmp_path / "node.key"))):
        for mode in (0o640, 0o604, 0o660):
            os.chmod(tmp_path / name, mode)
            with pytest.raises(CertError, match=f"{name}: private key is accessible by "
                                                "group/other.*chmod 600"):
                load()
        os.chmod(tmp_path / name, 0o400)
        load()


def test_node_key_order_and_types_are_checked(tmp_path: Path) -> None:
    save_node(tmp_path, KEYS, node())
    p = tmp_path / "node.key"
    first, second = (b"-----BEGIN" + b for b in p.read_bytes().split(b"-----BEGIN")[1:])
    for data, match in ((second + first, "first key must be the Ed25519"),
                        (first + first, "second key must be the X25519"),
                        (first, "expected 2 PKCS#8 PEM"),
                        (b"", "expected 2"),
                        (first.replace(b"MC4C", b"MC5C") + second, "malformed private key")):
        p.write_bytes(data)
        with pytest.raises(CertError, match=match):
            load_node_keys(p)
    p.write_bytes(first + second)
    assert isinstance(load_node_keys(p), NodeKeys)


def test_missing_and_malformed_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CertError, match=f"{tmp_path / 'ca.crt'}: no such file"):
        load_ca(tmp_path)
    save_ca(tmp_path, CA_KEY, CA)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(CertError, match=f"{tmp_path / 'ca.key'}: no such file"):
        load_ca(tmp_path)
    save_ca(tmp_path / "other", OTHER_KEY, OTHER_CA)
    os.replace(tmp_path / "other" / "ca.key", tmp_path / "ca.key")
    with pytest.raises(CertError, match=r"ca\.key does not match ca\.crt"):
        load_ca(tmp_path)
    bad = tmp_path / "bad.crt"
    for data, match in ((b"garbage", "not an armored"), (b"\xff\xfe", "not ASCII"),
                        (b"x" * 5000, "too big"),
                        (armor(ARMOR_CA, b"junk").encode(), "malformed CA certificate"),
                        (armor(ARMOR_NODE, node().raw).encode(), "holds a node certificate")):
        bad.write_bytes(data)
        with pytest.raises(CertError, match=f"{bad}: .*{match}"):
            load_ca_cert(bad)
    with pytest.raises(CertError, match="not a regular file"):
        load_ca_cert(tmp_path)


def test_revocation_file(tmp_path: Path) -> None:
    rev = sign_revocation(CA_KEY, CA, "web-1", None, NOW)
    p = tmp_path / "rev"
    p.write_text(armor(ARMOR_REVOCATION, rev.raw))
    assert load_revocation(p, CA) == rev
    assert certs.read_armored(p) == (ARMOR_REVOCATION, rev.raw)
    with pytest.raises(CertError, match="another CA"):
        load_revocation(p, OTHER_CA)
