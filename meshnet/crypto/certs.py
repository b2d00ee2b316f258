"""Node certificates from an offline cluster CA (issue #13), and signed claims.

A cluster CA is an Ed25519 key pair kept offline (``meshctl ca init``). It signs, for each node,
a certificate binding the node's name, roles (``admin``/``worker``, like Docker Swarm's
manager/worker certs) and labels to the node's two public keys: an Ed25519 key that signs the
node's claims (membership, store) and the X25519 key of its encrypted datapath. It can also sign
revocations. Other layers sign their own messages with ``sign_claim`` and check them with
``verify_claim`` (or a shared ``VerifyCache``).

Wire format of every object (msgpack, DESIGN §3)::

    [body_bytes, signature]          signature = Ed25519(DOMAIN_kind + body_bytes)
    CA:         body = [1, "ca", name, public_key, not_before, not_after]
    node:       body = [1, "node", name, roles, labels, sign_key, dp_key, not_before, not_after,
                        serial, issuer]
    revocation: body = [1, "revocation", name, serial | nil, issued_at, issuer]

Each kind has its own signing prefix, so no signature can be replayed as another kind, nor as a
claim (claims use ``domain + NUL``, and the certificate domains are reserved).

Times are ints of Unix seconds, always passed in (this module never reads the clock). A
certificate is valid for ``not_before <= now < not_after``. ``not_before`` is the issue time,
not backdated: callers that want to tolerate clock skew pass a ``now`` adjusted by their
allowance. A node certificate never outlives its CA: ``sign_node`` clamps ``not_after`` to the
CA's. A revocation without a serial revokes every certificate of that name whose
``not_before`` is before the revocation's ``issued_at``, so a node re-issued after it is valid.

Every decoder and verifier raises ``CertError`` and nothing else. The pure part comes first;
the file helpers (the only I/O here) are in a separate section at the bottom.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import os
import re
import stat
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshnet.fsutil import atomic_write
from meshnet.wire import pack, unpack

__all__ = [
    "ARMOR_CA",
    "ARMOR_NODE",
    "ARMOR_REVOCATION",
    "ROLES",
    "CaCert",
    "CertError",
    "NodeCert",
    "NodeKeys",
    "Revocation",
    "VerifyCache",
    "armor",
    "check_node_cert",
    "dearmor",
    "decode_ca",
    "decode_node_cert",
    "decode_revocation",
    "generate_node_keys",
    "is_weak_sign_key",
    "iso_time",
    "load_ca",
    "load_ca_cert",
    "load_node_cert",
    "load_node_keys",
    "load_revocation",
    "make_ca",
    "peek_node_cert",
    "peek_revocation",
    "read_armored",
    "save_ca",
    "save_node",
    "sign_claim",
    "sign_node",
    "sign_revocation",
    "sniff_armor",
    "verify_claim",
]

ROLES = ("admin", "worker")
FORMAT_VERSION = 1  # the first element of every body; a new layout gets a new number

# Signing prefixes, one per kind (domain separation): a CA signature over one kind can never be
# taken for another, nor for a claim.
DOMAIN_CA = b"meshnet-ca-v1\0"
DOMAIN_NODE = b"meshnet-node-cert-v1\0"
DOMAIN_REVOCATION = b"meshnet-revocation-v1\0"
_RESERVED_DOMAINS = frozenset(d[:-1] for d in (DOMAIN_CA, DOMAIN_NODE, DOMAIN_REVOCATION))

# A node certificate is ~300 bytes with a few labels; 2048 leaves room for MAX_LABELS short
# labels and bounds what a peer can make us parse. Checked before any parsing, for every kind.
MAX_CERT_BYTES = 2048
# Labels as in membership metadata (meshnet/config.py): keys 1-63 of [A-Za-z0-9_.-], values at
# most 63 printable characters. 16 is plenty for placement constraints; the byte bound above
# still applies to the whole certificate.
MAX_LABELS = 16
MAX_LABEL_KEY = 63
MAX_LABEL_VALUE = 63
# Claim domains are short fixed ASCII tags chosen by the code ("meshnet-alive-v1"), never data.
MAX_DOMAIN_BYTES = 64
# Validity is given in days; 100 years covers any sane CA and keeps times below MAX_TIME.
MAX_DAYS = 36_500
# The last second of year 9999: every valid time prints as an ISO date.
MAX_TIME = 253_402_300_799
DAY = 86_400

KEY_BYTES = 32  # raw Ed25519 and X25519 public keys
SIG_BYTES = 64  # Ed25519 signature
SERIAL_BYTES = 16  # random, like an X.509 serial: unique without a registry
FINGERPRINT_BYTES = 16  # sha256(public key)[:16]: 128 bits is collision-safe for CA identity

# Ed25519 public keys of small order (libsodium's blocklist, compared with the sign bit of x
# cleared): y = 0, 1, the two order-8 y values, p-1, and the non-canonical p and p+1. OpenSSL
# accepts them, and for such a key a constant signature verifies for a share of ALL messages
# (the fuzz test found pk = sig = zeros), so no certificate may carry one and no claim is checked
# against one. A unit test checks that OpenSSL takes a forged signature for each entry.
_SMALL_ORDER_Y = frozenset(bytes.fromhex(h) for h in (
    "00" * 32,
    "01" + "00" * 31,
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "ec" + "ff" * 30 + "7f",
    "ed" + "ff" * 30 + "7f",
    "ee" + "ff" * 30 + "7f",
))


def is_weak_sign_key(public_key: bytes) -> bool:
    """True for an Ed25519 public key of small order (see _SMALL_ORDER_Y)."""
    if len(public_key) != KEY_BYTES:
        return False  # not a key at all: the callers' length checks refuse it
    return public_key[:31] + bytes((public_key[31] & 0x7F,)) in _SMALL_ORDER_Y


# Same rule as meshnet/config.py's _NAME_RE (fullmatch, so no trailing newline slips through).
_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_LABEL_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")


class CertError(ValueError):
    """Anything wrong with a certificate, revocation, claim input or file (one-line reason)."""


def iso_time(t: int) -> str:
    """Unix seconds as an ISO 8601 UTC time (for messages and displays)."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fingerprint(public_key: bytes) -> bytes:
    return hashlib.sha256(public_key).digest()[:FINGERPRINT_BYTES]


@dataclass(frozen=True)
class CaCert:
    name: str
    public_key: bytes
    not_before: int
    not_after: int
    raw: bytes

    @cached_property  # checked on every certificate: hash once (the dataclass is frozen)
    def fingerprint(self) -> bytes:
        return _fingerprint(self.public_key)

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()

    def valid_at(self, now: int) -> bool:
        return self.not_before <= now < self.not_after


@dataclass(frozen=True)
class NodeCert:
    name: str
    roles: tuple[str, ...]
    labels: dict[str, str] = field(hash=False)  # a dict is not hashable; raw covers it
    sign_key: bytes
    dp_key: bytes
    not_before: int
    not_after: int
    serial: bytes
    issuer: bytes
    raw: bytes

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles

    def valid_at(self, now: int) -> bool:
        return self.not_before <= now < self.not_after


@dataclass(frozen=True)
class Revocation:
    name: str
    serial: bytes | None  # None: every certificate of `name` with not_before < issued_at
    issued_at: int
    issuer: bytes
    raw: bytes


@dataclass(frozen=True)
class NodeKeys:
    sign: Ed25519PrivateKey
    dp: X25519PrivateKey

    @property
    def sign_pub(self) -> bytes:
        return self.sign.public_key().public_bytes_raw()

    @property
    def dp_pub(self) -> bytes:
        return self.dp.public_key().public_bytes_raw()


def generate_node_keys() -> NodeKeys:
    return NodeKeys(Ed25519PrivateKey.generate(), X25519PrivateKey.generate())


# --- validation (shared by the signers and the decoders) ---------------------------------------

def _r(v: object) -> str:
    """A short repr for messages: decoded junk may be up to 2 KB."""
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _name(v: object, what: str = "name") -> str:
    if not isinstance(v, str) or not _NAME_RE.fullmatch(v):
        raise CertError(f"bad {what} {_r(v)}: 1-63 of [A-Za-z0-9_.-], alphanumeric at both ends")
    return v


def _time(v: object, what: str) -> int:
    if type(v) is not int or not 0 <= v <= MAX_TIME:  # type(): msgpack's True is an int too
        raise CertError(f"bad {what} {_r(v)}")
    return v


def _raw(v: object, size: int, what: str) -> bytes:
    if not isinstance(v, bytes) or len(v) != size:
        raise CertError(f"{what} must be {size} bytes")
    return v


def _sign_key(v: object, what: str) -> bytes:
    key = _raw(v, KEY_BYTES, what)
    if is_weak_sign_key(key):
        raise CertError(f"{what} is a weak (small-order) Ed25519 key")
    return key


def _days(days: object) -> int:
    if type(days) is not int or not 1 <= days <= MAX_DAYS:
        raise CertError(f"days must be 1-{MAX_DAYS}, not {_r(days)}")
    return days


def _roles(v: object) -> tuple[str, ...]:
    if isinstance(v, str | bytes) or not isinstance(v, Iterable):
        raise CertError("roles must be a list of role names")
    roles = list(v)
    if not roles:
        raise CertError("a certificate needs at least one role")
    for r in roles:
        if r not in ROLES:
            raise CertError(f"unknown role {_r(r)} (known: {', '.join(ROLES)})")
    return tuple(sorted(set(roles)))


def _labels(v: object) -> dict[str, str]:
    if not isinstance(v, Mapping):
        raise CertError("labels must be a map")
    if len(v) > MAX_LABELS:
        raise CertError(f"{len(v)} labels, at most {MAX_LABELS}")
    out: dict[str, str] = {}
    for k, x in v.items():
        if not isinstance(k, str) or not _LABEL_KEY_RE.fullmatch(k):
            raise CertError(f"bad label key {_r(k)}: 1-{MAX_LABEL_KEY} of [A-Za-z0-9_.-]")
        if not isinstance(x, str) or len(x) > MAX_LABEL_VALUE or not x.isprintable():
            raise CertError(f"bad label {k}: value must be at most {MAX_LABEL_VALUE} "
                            "printable characters")
        out[k] = x
    return out


def _check_ca_key(ca_key: Ed25519PrivateKey, ca: CaCert) -> None:
    if ca_key.public_key().public_bytes_raw() != ca.public_key:
        raise CertError("the CA key does not match the CA certificate")


# --- encoding -----------------------------------------------------------------------------------

def _seal(key: Ed25519PrivateKey, domain: bytes, body: list[Any], what: str) -> bytes:
    body_bytes = pack(body)
    raw = pack([body_bytes, key.sign(domain + body_bytes)])
    if len(raw) > MAX_CERT_BYTES:
        raise CertError(f"{what} would be {len(raw)} bytes, over {MAX_CERT_BYTES} "
                        "(fewer or shorter labels)")
    return raw


def _open(raw: object, kind: str, size: int, what: str) -> tuple[list[Any], bytes, bytes]:
    """Split and parse ``[body_bytes, signature]``; returns (fields, body_bytes, signature).

    Checks sizes, version, kind and field count; the caller checks the fields and signature.
    """
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise CertError(f"malformed {what}: not bytes")
    with _malformed(what):
        if len(raw) > MAX_CERT_BYTES:  # before any parsing
            raise CertError(f"{len(raw)} bytes, over {MAX_CERT_BYTES}")
        outer = unpack(bytes(raw), max_bytes=MAX_CERT_BYTES, exc=CertError)
        if not isinstance(outer, list) or len(outer) != 2:
            raise CertError("not [body, signature]")
        body_bytes, sig = outer
        if not isinstance(body_bytes, bytes) or not isinstance(sig, bytes):
            raise CertError("not [body, signature]")
        if len(sig) != SIG_BYTES:
            raise CertError(f"signature of {len(sig)} bytes")
        body = unpack(body_bytes, max_bytes=MAX_CERT_BYTES, exc=CertError)
        if not isinstance(body, list) or len(body) < 2:
            raise CertError("body is not [version, kind, ...]")
        if type(body[0]) is not int or body[0] != FORMAT_VERSION:
            raise CertError(f"unsupported format version {_r(body[0])}")
        if body[1] != kind:
            raise CertError(f"it is a {_r(body[1])}, not a {kind!r}")
        if len(body) != size:
            raise CertError(f"{len(body)} fields, expected {size}")
    return body, body_bytes, sig


def _verify(public_key: bytes, sig: bytes, message: bytes) -> bool:
    if is_weak_sign_key(public_key):
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(sig, message)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


@contextmanager
def _malformed(what: str) -> Iterator[None]:
    """Prefix the complaint of any check inside with 'malformed <what>: '."""
    try:
        yield
    except CertError as e:
        raise CertError(f"malformed {what}: {e}") from None


# --- the CA -------------------------------------------------------------------------------------

def make_ca(name: str, now: int, days: int) -> tuple[Ed25519PrivateKey, CaCert]:
    """A new self-signed CA valid from ``now`` for ``days`` days."""
    _name(name, "CA name")
    _time(now, "time")
    not_after = now + _days(days) * DAY
    _time(not_after, "expiry")
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes_raw()
    raw = _seal(key, DOMAIN_CA, [FORMAT_VERSION, "ca", name, pub, now, not_after], "CA certificate")
    return key, CaCert(name, pub, now, not_after, raw)


def decode_ca(raw: bytes) -> CaCert:
    """Parse a CA certificate and check its self-signature (not its validity period)."""
    what = "CA certificate"
    body, body_bytes, sig = _open(raw, "ca", 6, what)
    _, _, name, pub, not_before, not_after = body
    with _malformed(what):
        _name(name)
        _sign_key(pub, "public key")
        _time(not_before, "not_before")
        _time(not_after, "not_after")
    if not _verify(pub, sig, DOMAIN_CA + body_bytes):
        raise CertError("bad signature on the CA certificate")
    return CaCert(name, pub, not_before, not_after, bytes(raw))


# --- node certificates --------------------------------------------------------------------------

def sign_node(
    ca_key: Ed25519PrivateKey,
    ca: CaCert,
    name: str,
    roles: Iterable[str],
    labels: Mapping[str, str],
    sign_pub: bytes,
    dp_pub: bytes,
    now: int,
    days: int,
    serial: bytes | None = None,
) -> NodeCert:
    """Issue a node certificate valid from ``now`` for ``days`` days.

    ``not_after`` is clamped to the CA's (a node certificate never outlives its CA); the caller
    can compare ``cert.not_after`` with ``now + days * 86400`` to tell the operator. A CA that
    is not valid at ``now`` refuses to sign. ``serial`` defaults to 16 random bytes.
    """
    _check_ca_key(ca_key, ca)
    _time(now, "time")
    if not ca.valid_at(now):
        raise CertError(f"the CA certificate is not valid now (valid {iso_time(ca.not_before)} "
                        f"to {iso_time(ca.not_after)})")
    _name(name)
    role_t, label_d = _roles(roles), _labels(labels)
    _sign_key(sign_pub, "signing public key")
    _raw(dp_pub, KEY_BYTES, "datapath public key")
    serial = os.urandom(SERIAL_BYTES) if serial is None else _raw(serial, SERIAL_BYTES, "serial")
    not_after = min(now + _days(days) * DAY, ca.not_after)
    issuer = ca.fingerprint
    raw = _seal(ca_key, DOMAIN_NODE, [FORMAT_VERSION, "node", name, list(role_t), label_d,
                                      sign_pub, dp_pub, now, not_after, serial, issuer],
                "node certificate")
    return NodeCert(name, role_t, label_d, sign_pub, dp_pub, now, not_after, serial, issuer, raw)


def _parse_node(raw: bytes) -> tuple[NodeCert, bytes, bytes]:
    what = "node certificate"
    body, body_bytes, sig = _open(raw, "node", 11, what)
    _, _, name, roles, labels, sign_key, dp_key, not_before, not_after, serial, issuer = body
    with _malformed(what):
        _name(name)
        if not isinstance(roles, list) or not roles or not all(isinstance(r, str) for r in roles):
            raise CertError("roles must be a non-empty list of strings")
        role_t = _roles(roles)
        if list(role_t) != roles:  # the signer writes them sorted and unique; anything else is odd
            raise CertError("roles not sorted and unique")
        label_d = _labels(labels)
        _sign_key(sign_key, "signing key")
        _raw(dp_key, KEY_BYTES, "datapath key")
        _time(not_before, "not_before")
        _time(not_after, "not_after")
        _raw(serial, SERIAL_BYTES, "serial")
        _raw(issuer, FINGERPRINT_BYTES, "issuer")
    cert = NodeCert(name, role_t, label_d, sign_key, dp_key, not_before, not_after, serial,
                    issuer, bytes(raw))
    return cert, body_bytes, sig


def peek_node_cert(raw: bytes) -> NodeCert:
    """Parse a node certificate WITHOUT checking any signature: for display only."""
    return _parse_node(raw)[0]


def _check_issued(issuer: bytes, sig: bytes, signed: bytes, ca: CaCert, what: str) -> None:
    """CertError unless CA issued it: its fingerprint named, its signature over SIGNED."""
    if issuer != ca.fingerprint:
        raise CertError(f"signed by another CA ({issuer.hex()}, not {ca.fingerprint_hex})")
    if not _verify(ca.public_key, sig, signed):
        raise CertError(f"bad signature on the {what}")


def decode_node_cert(raw: bytes, ca: CaCert) -> NodeCert:
    """Parse a node certificate and check that ``ca`` signed it (not its validity period)."""
    cert, body_bytes, sig = _parse_node(raw)
    _check_issued(cert.issuer, sig, DOMAIN_NODE + body_bytes, ca, "node certificate")
    return cert


def check_node_cert(
    cert: NodeCert,
    ca: CaCert,
    now: int,
    name: str | None = None,
    revocations: Iterable[Revocation] = (),
) -> None:
    """Raise CertError unless ``cert`` (from decode_node_cert or sign_node) is good at ``now``.

    The signature is not checked again. Revocations from another CA are ignored.
    """
    if cert.issuer != ca.fingerprint:
        raise CertError(f"signed by another CA ({cert.issuer.hex()}, not {ca.fingerprint_hex})")
    if now < ca.not_before:
        raise CertError(f"CA certificate not yet valid (from {iso_time(ca.not_before)})")
    if now >= ca.not_after:
        raise CertError(f"CA certificate expired at {iso_time(ca.not_after)}")
    if name is not None and cert.name != name:
        raise CertError(f"names node {cert.name}, not {name}")
    if now < cert.not_before:
        raise CertError(f"not yet valid (from {iso_time(cert.not_before)})")
    if now >= cert.not_after:
        raise CertError(f"expired at {iso_time(cert.not_after)}")
    for r in revocations:
        if r.issuer != cert.issuer or r.name != cert.name:
            continue
        if r.serial is None and cert.not_before < r.issued_at:
            raise CertError(f"revoked: every certificate of {r.name} issued before "
                            f"{iso_time(r.issued_at)}")
        if r.serial == cert.serial:
            raise CertError(f"revoked: serial {r.serial.hex()}")


# --- revocations --------------------------------------------------------------------------------

def sign_revocation(
    ca_key: Ed25519PrivateKey, ca: CaCert, name: str, serial: bytes | None, now: int
) -> Revocation:
    """Revoke one certificate (by serial) or every certificate of ``name`` issued before now."""
    _check_ca_key(ca_key, ca)
    _name(name)
    if serial is not None:
        _raw(serial, SERIAL_BYTES, "serial")
    _time(now, "time")
    issuer = ca.fingerprint
    raw = _seal(ca_key, DOMAIN_REVOCATION,
                [FORMAT_VERSION, "revocation", name, serial, now, issuer], "revocation")
    return Revocation(name, serial, now, issuer, raw)


def _parse_revocation(raw: bytes) -> tuple[Revocation, bytes, bytes]:
    what = "revocation"
    body, body_bytes, sig = _open(raw, "revocation", 6, what)
    _, _, name, serial, issued_at, issuer = body
    with _malformed(what):
        _name(name)
        if serial is not None:
            _raw(serial, SERIAL_BYTES, "serial")
        _time(issued_at, "issued_at")
        _raw(issuer, FINGERPRINT_BYTES, "issuer")
    return Revocation(name, serial, issued_at, issuer, bytes(raw)), body_bytes, sig


def peek_revocation(raw: bytes) -> Revocation:
    """Parse a revocation WITHOUT checking its signature: for display only."""
    return _parse_revocation(raw)[0]


def decode_revocation(raw: bytes, ca: CaCert) -> Revocation:
    rev, body_bytes, sig = _parse_revocation(raw)
    _check_issued(rev.issuer, sig, DOMAIN_REVOCATION + body_bytes, ca, "revocation")
    return rev


# --- claims: what the membership and store layers sign ------------------------------------------

def _domain_ok(domain: object) -> bool:
    return (isinstance(domain, bytes) and 0 < len(domain) <= MAX_DOMAIN_BYTES
            and b"\0" not in domain and domain not in _RESERVED_DOMAINS)


def sign_claim(key: Ed25519PrivateKey, domain: bytes, data: bytes) -> bytes:
    """Sign ``domain + NUL + data``. The domain is a short tag without NUL; the certificate
    domains are reserved (CertError otherwise)."""
    if not _domain_ok(domain):
        raise CertError(f"bad claim domain {_r(domain)}")
    return key.sign(domain + b"\0" + bytes(data))


def verify_claim(public_key: bytes, signature: bytes, domain: bytes, data: bytes) -> bool:
    """True iff ``signature`` is ``public_key``'s over ``domain + NUL + data``; never raises."""
    if not (_domain_ok(domain) and isinstance(public_key, bytes) and len(public_key) == KEY_BYTES
            and isinstance(signature, bytes) and len(signature) == SIG_BYTES
            and isinstance(data, bytes | bytearray | memoryview)):
        return False
    return _verify(public_key, signature, domain + b"\0" + bytes(data))


# The simulator shares one cache across ~1000 cores, and every core sees the same bytes for a
# member's signed claim (alive message, store entry), so one entry serves all of them: N=1000
# needs a few live entries per member, and 64 Ki entries hold that hot set with room to spare.
# An entry references its key's bytes (no copies), ~0.6 KB for a metadata-sized claim; 16 MiB
# bounds the payload held (~27k such entries), and with the ~240 bytes of structure measured
# per entry (OrderedDict node, tuple) the whole cache stays under ~35 MB.
VERIFY_CACHE_ENTRIES = 65_536
VERIFY_CACHE_BYTES = 16 << 20
# An entry bigger than this share of the byte budget is verified but not kept, so one large
# message cannot flush the whole cache.
VERIFY_CACHE_MAX_ENTRY_FRACTION = 64


class VerifyCache:
    """A bounded memo of ``verify_claim`` results keyed by (public_key, domain, data, signature).

    A hit is one dict lookup: bytes objects cache their hash, so re-hashing the key tuple of
    bytes already seen is cheap, and nothing is re-encoded. Eviction is FIFO (oldest insert
    first, no reordering on a hit, so hits stay cheap); a hot entry evicted costs one
    re-verification. Both True and False results are kept; bytearray/memoryview parts are
    kept as bytes copies, inputs of other types are answered (False) but not kept.
    """

    __slots__ = ("_bytes", "_memo", "hits", "max_bytes", "max_entries", "misses")

    def __init__(self, max_entries: int = VERIFY_CACHE_ENTRIES,
                 max_bytes: int = VERIFY_CACHE_BYTES) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("cache bounds must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # value: the verification result; an entry's size is recomputed from its key on eviction
        self._memo: OrderedDict[tuple[bytes, bytes, bytes, bytes], bool] = OrderedDict()
        self._bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._memo)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def verify(self, public_key: bytes, signature: bytes, domain: bytes, data: bytes) -> bool:
        key = (public_key, domain, data, signature)
        try:
            hit = self._memo.get(key)
        except (TypeError, ValueError):  # a bytearray or writable memoryview is unhashable
            owned = _own(key)
            hit = None if owned is None else self._memo.get(owned)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        ok = verify_claim(public_key, signature, domain, data)
        owned = _own(key)
        if owned is None or owned in self._memo:
            return ok
        size = sum(map(len, owned))
        if size * VERIFY_CACHE_MAX_ENTRY_FRACTION > self.max_bytes:
            return ok
        self._memo[owned] = ok
        self._bytes += size
        while len(self._memo) > self.max_entries or self._bytes > self.max_bytes:
            old, _ = self._memo.popitem(last=False)
            self._bytes -= sum(map(len, old))
        return ok


def _own(key: tuple[object, ...]) -> tuple[bytes, bytes, bytes, bytes] | None:
    """The key with bytes copies of any views (a view may pin a far larger buffer, and its
    length would not be what it holds); None if a part is not bytes-like (never kept)."""
    parts = [x if type(x) is bytes else bytes(x) for x in key
             if isinstance(x, bytes | bytearray | memoryview)]
    if len(parts) != 4:
        return None
    return parts[0], parts[1], parts[2], parts[3]


# --- files (I/O below this line only) -----------------------------------------------------------
#
# Certificates are text armor (base64 of the raw bytes between BEGIN/END lines, 64 columns);
# private keys are unencrypted PKCS#8 PEM. ca.key holds the CA's Ed25519 key; node.key holds
# TWO blocks, in this order: the node's Ed25519 signing key, then its X25519 datapath key.
# Private keys are 0600 and refused when group/other can access them (like ssh); certificates
# are 0644. Every write is atomic (meshnet/fsutil.atomic_write).

ARMOR_CA = "CA CERTIFICATE"
ARMOR_NODE = "NODE CERTIFICATE"
ARMOR_REVOCATION = "REVOCATION"
_ARMOR_KINDS = (ARMOR_CA, ARMOR_NODE, ARMOR_REVOCATION)
ARMOR_COLUMNS = 64
# Base64 of MAX_CERT_BYTES is 2732 characters, plus BEGIN/END lines and newlines: 4 KiB is
# more than any armored object of ours; refuse bigger text (and files) unread.
MAX_ARMOR_CHARS = 4096
# Two PKCS#8 PEM blocks of 32-byte keys are ~240 bytes; 4 KiB refuses anything that is not one.
MAX_KEY_FILE_BYTES = 4096
KEY_MODE, CERT_MODE, DIR_MODE = 0o600, 0o644, 0o700
CA_KEY_FILE, CA_CERT_FILE = "ca.key", "ca.crt"
NODE_KEY_FILE, NODE_CERT_FILE = "node.key", "node.crt"

_PEM_BLOCK_RE = re.compile(rb"-----BEGIN PRIVATE KEY-----\r?\n.*?-----END PRIVATE KEY-----",
                           re.DOTALL)


def armor(kind: str, raw: bytes) -> str:
    """Text armor: ``-----BEGIN MESHNET <kind>-----``, base64 in 64 columns, END line."""
    if kind not in _ARMOR_KINDS:
        raise CertError(f"unknown armor kind {_r(kind)}")
    b64 = base64.b64encode(raw).decode("ascii")
    lines = [b64[i:i + ARMOR_COLUMNS] for i in range(0, len(b64), ARMOR_COLUMNS)]
    return "\n".join([f"-----BEGIN MESHNET {kind}-----", *lines,
                      f"-----END MESHNET {kind}-----"]) + "\n"


def sniff_armor(text: str) -> str | None:
    """The armor kind of the first BEGIN line in ``text``, or None."""
    if not isinstance(text, str):
        return None
    for line in text[:MAX_ARMOR_CHARS].splitlines():
        line = line.strip()
        for kind in _ARMOR_KINDS:
            if line == f"-----BEGIN MESHNET {kind}-----":
                return kind
    return None


def dearmor(kind: str, text: str) -> bytes:
    """The raw bytes of the one ``kind`` block in ``text`` (text outside it is ignored)."""
    if kind not in _ARMOR_KINDS:
        raise CertError(f"unknown armor kind {_r(kind)}")
    what = f"armored {kind.lower()}"
    if not isinstance(text, str):
        raise CertError(f"malformed {what}: not text")
    if len(text) > MAX_ARMOR_CHARS:
        raise CertError(f"malformed {what}: {len(text)} characters, over {MAX_ARMOR_CHARS}")
    lines = [line.strip() for line in text.splitlines()]
    begin, end = f"-----BEGIN MESHNET {kind}-----", f"-----END MESHNET {kind}-----"
    if lines.count(begin) != 1 or lines.count(end) != 1:
        raise CertError(f"malformed {what}: expected one {begin} ... {end} block")
    i, j = lines.index(begin), lines.index(end)
    if j <= i + 1:
        raise CertError(f"malformed {what}: empty block")
    try:
        raw = base64.b64decode("".join(lines[i + 1:j]), validate=True)
    except (binascii.Error, ValueError):
        raise CertError(f"malformed {what}: bad base64") from None
    if not raw or len(raw) > MAX_CERT_BYTES:
        raise CertError(f"malformed {what}: {len(raw)} bytes")
    return raw


def _read(path: Path, limit: int, private: bool) -> bytes:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CertError(f"{path}: no such file") from None
    except OSError as e:
        raise CertError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise CertError(f"{path}: not a regular file")
    if private and st.st_mode & 0o077:
        raise CertError(f"{path}: private key is accessible by group/other (mode "
                        f"{st.st_mode & 0o777:04o}); chmod 600 it")
    if st.st_size > limit:
        raise CertError(f"{path}: {st.st_size} bytes, too big (at most {limit})")
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise CertError(f"{path}: {e.strerror}") from None
    if len(data) > limit:  # it grew since the stat
        raise CertError(f"{path}: too big (at most {limit} bytes)")
    return data


def read_armored(path: str | os.PathLike[str]) -> tuple[str, bytes]:
    """(kind, raw bytes) of the armored object in a file, whatever its kind (not verified)."""
    p = Path(path)
    try:
        text = _read(p, MAX_ARMOR_CHARS, private=False).decode("ascii")
    except UnicodeDecodeError:
        raise CertError(f"{p}: not an armored meshnet certificate (not ASCII)") from None
    kind = sniff_armor(text)
    if kind is None:
        raise CertError(f"{p}: not an armored meshnet certificate or revocation")
    try:
        return kind, dearmor(kind, text)
    except CertError as e:
        raise CertError(f"{p}: {e}") from None


def _read_armored(path: str | os.PathLike[str], kind: str) -> bytes:
    got, raw = read_armored(path)
    if got != kind:
        raise CertError(f"{path}: holds a {got.lower()}, not a {kind.lower()}")
    return raw


def _pem(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_pem_keys(path: Path, count: int) -> list[Any]:
    blocks = _PEM_BLOCK_RE.findall(_read(path, MAX_KEY_FILE_BYTES, private=True))
    if len(blocks) != count:
        raise CertError(f"{path}: expected {count} PKCS#8 PEM private key block(s), "
                        f"found {len(blocks)}")
    try:
        return [serialization.load_pem_private_key(b, password=None) for b in blocks]
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise CertError(f"{path}: malformed private key") from None


def _make_dir(d: Path) -> None:
    if not d.is_dir():
        d.mkdir(mode=DIR_MODE, parents=True)
        os.chmod(d, DIR_MODE)  # mkdir's mode is filtered by the umask


def _refuse_existing(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise CertError(f"{path} exists; refusing to overwrite it")


def save_ca(dir: str | os.PathLike[str], key: Ed25519PrivateKey, ca: CaCert, *,
            overwrite: bool = False) -> None:
    """Write ``dir/ca.key`` (0600) and ``dir/ca.crt`` (0644); ``dir`` is made 0700 if new."""
    _check_ca_key(key, ca)
    d = Path(dir)
    _refuse_existing(d / CA_KEY_FILE, overwrite)
    _make_dir(d)
    atomic_write(d / CA_KEY_FILE, _pem(key), mode=KEY_MODE)
    atomic_write(d / CA_CERT_FILE, armor(ARMOR_CA, ca.raw).encode(), mode=CERT_MODE)


def load_ca_cert(path: str | os.PathLike[str]) -> CaCert:
    raw = _read_armored(path, ARMOR_CA)
    try:
        return decode_ca(raw)
    except CertError as e:
        raise CertError(f"{path}: {e}") from None


def load_ca(dir: str | os.PathLike[str]) -> tuple[Ed25519PrivateKey, CaCert]:
    """The CA key and certificate in ``dir``, checked to belong together."""
    d = Path(dir)
    ca = load_ca_cert(d / CA_CERT_FILE)
    (key,) = _load_pem_keys(d / CA_KEY_FILE, 1)
    if not isinstance(key, Ed25519PrivateKey):
        raise CertError(f"{d / CA_KEY_FILE}: not an Ed25519 private key")
    if key.public_key().public_bytes_raw() != ca.public_key:
        raise CertError(f"{d}: {CA_KEY_FILE} does not match {CA_CERT_FILE}")
    return key, ca


def save_node(dir: str | os.PathLike[str], keys: NodeKeys, cert: NodeCert, *,
              overwrite: bool = False) -> None:
    """Write ``dir/node.key`` (0600, signing key then datapath key) and ``dir/node.crt``."""
    if keys.sign_pub != cert.sign_key or keys.dp_pub != cert.dp_key:
        raise CertError("the node keys do not match the certificate")
    d = Path(dir)
    _refuse_existing(d / NODE_KEY_FILE, overwrite)
    _make_dir(d)
    atomic_write(d / NODE_KEY_FILE, _pem(keys.sign) + _pem(keys.dp), mode=KEY_MODE)
    atomic_write(d / NODE_CERT_FILE, armor(ARMOR_NODE, cert.raw).encode(), mode=CERT_MODE)


def load_node_keys(path: str | os.PathLike[str]) -> NodeKeys:
    p = Path(path)
    sign, dp = _load_pem_keys(p, 2)
    if not isinstance(sign, Ed25519PrivateKey):
        raise CertError(f"{p}: the first key must be the Ed25519 signing key")
    if not isinstance(dp, X25519PrivateKey):
        raise CertError(f"{p}: the second key must be the X25519 datapath key")
    return NodeKeys(sign, dp)


def load_node_cert(path: str | os.PathLike[str], ca: CaCert) -> NodeCert:
    raw = _read_armored(path, ARMOR_NODE)
    try:
        return decode_node_cert(raw, ca)
    except CertError as e:
        raise CertError(f"{path}: {e}") from None


def load_revocation(path: str | os.PathLike[str], ca: CaCert) -> Revocation:
    raw = _read_armored(path, ARMOR_REVOCATION)
    try:
        return decode_revocation(raw, ca)
    except CertError as e:
        raise CertError(f"{path}: {e}") from None
