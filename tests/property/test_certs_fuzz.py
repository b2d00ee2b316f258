"""Fuzz the certificate decoders: any input gives a result or CertError, nothing else."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from meshnet.crypto import certs
from meshnet.crypto.certs import (
    ARMOR_CA,
    ARMOR_NODE,
    ARMOR_REVOCATION,
    CertError,
    VerifyCache,
    armor,
    dearmor,
    decode_ca,
    decode_node_cert,
    decode_revocation,
    generate_node_keys,
    make_ca,
    sign_node,
    sign_revocation,
    verify_claim,
)
from meshnet.wire import pack

NOW = 1_700_000_000
CA_KEY, CA = make_ca("fuzz-ca", NOW, 30)
KEYS = generate_node_keys()
NODE = sign_node(CA_KEY, CA, "web-1", ["admin", "worker"], {"zone": "a"}, KEYS.sign_pub,
                 KEYS.dp_pub, NOW, 1)
REV = sign_revocation(CA_KEY, CA, "web-1", None, NOW)
DECODERS = {
    "ca": decode_ca,
    "node": lambda raw: decode_node_cert(raw, CA),
    "revocation": lambda raw: decode_revocation(raw, CA),
}
ORIGINALS = {"ca": CA.raw, "node": NODE.raw, "revocation": REV.raw}
DOMAINS = {"ca": certs.DOMAIN_CA, "node": certs.DOMAIN_NODE,
           "revocation": certs.DOMAIN_REVOCATION}
KINDS = st.sampled_from(sorted(DECODERS))

# msgpack-able values of every type the decoders might meet where a field should be
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(),
                    st.text(max_size=70), st.binary(max_size=70))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def _decodes_or_cert_error(kind: str, raw: bytes) -> Any:
    try:
        return DECODERS[kind](raw)
    except CertError:
        return None


@given(KINDS, st.binary(max_size=3000))
def test_any_bytes_give_cert_error(kind: str, raw: bytes) -> None:
    assert _decodes_or_cert_error(kind, raw) is None


@given(KINDS, st.integers(1, 2), st.lists(VALUES, max_size=12), st.booleans())
def test_structured_bodies_give_cert_error(kind: str, version: int, fields: list[Any],
                                           signed: bool) -> None:
    # right version and kind, wrong fields: reach the field checks, signed or not
    body_bytes = pack([version, kind, *fields])
    sig = CA_KEY.sign(DOMAINS[kind] + body_bytes) if signed else bytes(64)
    out = _decodes_or_cert_error(kind, pack([body_bytes, sig]))
    assert out is None or out.raw == pack([body_bytes, sig])  # a well-formed forgery is ours


# the valid fields after [version, kind] of each kind, to mix with junk position by position
TEMPLATES = {
    "ca": ["fuzz-ca", CA.public_key, NOW, NOW + 1],
    "node": ["web-1", ["worker"], {"zone": "a"}, KEYS.sign_pub, KEYS.dp_pub, NOW, NOW + 1,
             bytes(16), CA.fingerprint],
    "revocation": ["web-1", bytes(16), NOW, CA.fingerprint],
}


@given(KINDS, st.data())
def test_mostly_valid_fields_give_cert_error_or_decode(kind: str, data: st.DataObject) -> None:
    # each field valid or junk: reaches every field check, and the signature check when all
    # fields pass (signed with the right key, so those decode)
    fields = [data.draw(st.one_of(st.just(v), VALUES)) for v in TEMPLATES[kind]]
    body_bytes = pack([1, kind, *fields])
    raw = pack([body_bytes, CA_KEY.sign(DOMAINS[kind] + body_bytes)])
    out = _decodes_or_cert_error(kind, raw)
    assert out is None or out.raw == raw


@given(KINDS, st.data())
def test_mutated_objects_never_crash_and_never_verify(kind: str, data: st.DataObject) -> None:
    original = ORIGINALS[kind]
    raw = bytearray(original)
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)),
                               max_size=4))
    for i, x in flips:
        raw[i] ^= x
    cut = data.draw(st.integers(0, len(raw)))
    mutated = bytes(raw[:cut]) + data.draw(st.binary(max_size=8))
    out = _decodes_or_cert_error(kind, mutated)
    assert out is None or mutated == original


@given(st.sampled_from([ARMOR_CA, ARMOR_NODE, ARMOR_REVOCATION]), st.text(max_size=5000))
def test_dearmor_any_text_gives_cert_error(kind: str, text: str) -> None:
    try:
        raw = dearmor(kind, text)
    except CertError:
        return
    assert isinstance(raw, bytes)  # pragma: no cover - random text is rarely armor


@given(st.sampled_from([ARMOR_CA, ARMOR_NODE, ARMOR_REVOCATION]), st.binary(max_size=2048),
       st.text(max_size=40), st.text(max_size=40))
def test_armor_round_trips_inside_any_surroundings(kind: str, raw: bytes, before: str,
                                                   after: str) -> None:
    text = before + "\n" + armor(kind, raw) + after
    try:
        out = dearmor(kind, text)
    except CertError:  # empty raw, or surroundings that hold a BEGIN/END line of their own
        return
    assert out == raw


BYTES_OR_JUNK = st.one_of(st.binary(max_size=80), st.none(), st.integers(), st.text(max_size=8))


@given(BYTES_OR_JUNK, BYTES_OR_JUNK, BYTES_OR_JUNK, BYTES_OR_JUNK)
def test_verify_claim_never_raises(pk: Any, sig: Any, domain: Any, data: Any) -> None:
    assert verify_claim(pk, sig, domain, data) is False
    cache = VerifyCache(max_entries=2, max_bytes=4096)
    assert cache.verify(pk, sig, domain, data) is False


@given(st.binary(min_size=32, max_size=32), st.binary(min_size=64, max_size=64),
       st.binary(min_size=1, max_size=64).filter(lambda d: b"\0" not in d),
       st.binary(max_size=200))
def test_verify_claim_random_well_sized_inputs(pk: bytes, sig: bytes, domain: bytes,
                                               data: bytes) -> None:
    assert verify_claim(pk, sig, domain, data) is False


LABEL_KEYS = st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True)
LABEL_VALUES = st.text(st.characters(codec="utf-8", categories=("L", "N", "P")), max_size=20)


@given(st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?", fullmatch=True),
       st.lists(st.sampled_from(certs.ROLES), min_size=1, max_size=3),
       st.dictionaries(LABEL_KEYS, LABEL_VALUES, max_size=6),
       st.integers(NOW, CA.not_after - 1), st.integers(1, 400))
def test_sign_decode_round_trip(name: str, roles: list[str], labels: dict[str, str], now: int,
                                days: int) -> None:
    cert = sign_node(CA_KEY, CA, name, roles, labels, KEYS.sign_pub, KEYS.dp_pub, now, days)
    assert decode_node_cert(cert.raw, CA) == cert
    assert cert.roles == tuple(sorted(set(roles))) and cert.labels == labels
    assert cert.not_after == min(now + days * certs.DAY, CA.not_after)
    certs.check_node_cert(cert, CA, now, name=name)
