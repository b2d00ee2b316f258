"""What one node trusts: the cluster CA, the node certificates it has verified, the revocations
it has seen, and the keys it signs its own claims with. Pure: every time is passed in.

Membership and the replicated store share one Trust. They ask it to sign what this node says
(its alive and leave messages, its records) and to check what others say: a claim about node X
counts only if one of X's certificates, chained to the CA, unexpired and not revoked, verifies
its signature. Certificates arrive on join and push-pull (they do not fit a gossip packet) and
through the store's `certs` table; revocations through the store's `revocations` table.

Times: every ``now`` is the caller's clock (membership runs on the event loop's monotonic clock,
the simulator on virtual time); ``wall_offset`` turns it into Unix time for certificate
validity, and the shell keeps it current. ``at`` (when a store record was written) is Unix time.

Verification costs ~90 µs (Ed25519); results are memoized in a VerifyCache keyed by the signed
bytes (the simulator shares one across its nodes), and certificates are verified once per
encoding: a certificate seen again is a dictionary lookup.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Literal

from meshnet.crypto.certs import (
    CaCert,
    CertError,
    NodeCert,
    NodeKeys,
    Revocation,
    VerifyCache,
    check_node_cert,
    decode_node_cert,
    decode_revocation,
    sign_claim,
)

# Signature domains of what nodes sign (certs.py keeps the certificates' own).
ALIVE_DOMAIN = b"meshnet-alive-v1"
LEFT_DOMAIN = b"meshnet-left-v1"
RECORD_DOMAIN = b"meshnet-record-v1"
REQUEST_DOMAIN = b"meshnet-request-v1"

# Certificates kept per node name: the current one and a few it renewed from, so claims signed
# before a renewal (store records) still verify. Older ones are dropped first.
MAX_CERTS_PER_NAME = 4
# Names with certificates: as many as membership tracks members (MAX_PUSH_PULL_MEMBERS).
MAX_NAMES = 100_000
# Revocations held; each is ~150 bytes.
MAX_REVOCATIONS = 100_000
# Encodings of certificates already refused (so a peer that keeps sending a bad one costs a
# lookup, not a signature check); FIFO.
MAX_REFUSED = 4096


@dataclass
class TrustStats:
    certs_learned: int = 0
    certs_refused: int = 0
    revocations: int = 0
    verifications: int = 0  # claim checks asked for (cache hits included)
    claims_refused: int = 0  # bad signature, or no usable certificate
    last_refusal: str = ""
    refusals: dict[str, int] = field(default_factory=dict)

    def refused(self, reason: str) -> None:
        self.last_refusal = reason
        key = reason.split(":")[0].split(" (")[0][:40]
        self.refusals[key] = self.refusals.get(key, 0) + 1


class Trust:
    """See the module docstring. ``keys``/``cert`` are this node's own."""

    def __init__(self, ca: CaCert, name: str, keys: NodeKeys, cert: NodeCert, now: float,
                 cache: VerifyCache | None = None, wall_offset: float = 0.0,
                 cert_memo: dict[bytes, NodeCert] | None = None) -> None:
        """``cache`` and ``cert_memo`` (certificates whose CA signature was checked, by
        encoding) may be shared by many Trusts of one CA: the simulator's nodes share them."""
        self.wall_offset = wall_offset
        self.cert_memo = cert_memo
        check_node_cert(cert, ca, self.wall(now), name=name)
        if cert.sign_key != keys.sign_pub:
            raise CertError("the node certificate is for another signing key than node.key's")
        self.ca = ca
        self.name = name
        self.keys = keys
        self.cert = cert
        self.cache = cache if cache is not None else VerifyCache()
        self.stats = TrustStats()
        self._certs: dict[str, list[NodeCert]] = {}  # newest not_before first
        self._known_raw: set[bytes] = set()  # encodings of the certificates held
        self._refused: OrderedDict[bytes, None] = OrderedDict()
        self._revocations: dict[str, list[Revocation]] = {}
        self._revocation_raws: set[bytes] = set()
        self._n_revocations = 0
        # Bumped whenever a certificate may have stopped counting (a revocation learned); with
        # soonest_expiry it tells a caller when a scan of its members is worth doing.
        self.generation = 0
        self._soonest: int | None = None  # earliest not_after among held certificates
        self._signed: dict[tuple[bytes, bytes], bytes] = {}  # our own last few signatures
        self.learn_cert(cert.raw, now)

    def wall(self, now: float) -> int:
        """The caller's NOW as Unix seconds."""
        return int(now + self.wall_offset)

    def renew(self, keys: NodeKeys, cert: NodeCert, now: float) -> None:
        """Our own certificate (and signing key) renewed: sign with the new ones from now on.
        Older certificates of ours stay known, so what we signed before still verifies."""
        check_node_cert(cert, self.ca, self.wall(now), name=self.name)
        if cert.sign_key != keys.sign_pub:
            raise CertError("the node certificate is for another signing key than node.key's")
        self.keys, self.cert = keys, cert
        self._signed.clear()
        self.learn_cert(cert.raw, now)

    # ---- certificates ------------------------------------------------------------------------

    def learn_cert(self, raw: bytes, now: float) -> NodeCert | None:
        """Verify and keep a node certificate; the cert if it is news, else None (known,
        refused, or past the bounds). A refusal is counted, never raised."""
        if raw in self._known_raw:  # the common case: a certificate we hold, seen again
            return None
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        if digest in self._refused:
            return None
        self.stats.verifications += 1  # what checking the CA's signature costs this node
        try:
            memo = self.cert_memo
            cert = memo.get(raw) if memo is not None else None
            if cert is None:
                cert = decode_node_cert(raw, self.ca)
                if memo is not None:
                    if len(memo) >= MAX_NAMES:
                        memo.clear()
                    memo[raw] = cert
            check_node_cert(cert, self.ca, self.wall(now),
                            revocations=self._revocations.get(cert.name, ()))
        except CertError as e:
            self.stats.certs_refused += 1
            self.stats.refused(f"certificate: {e}")
            self._refused[digest] = None
            if len(self._refused) > MAX_REFUSED:
                self._refused.popitem(last=False)
            return None
        held = self._certs.get(cert.name)
        if held is None:
            if len(self._certs) >= MAX_NAMES:
                self.stats.certs_refused += 1
                self.stats.refused("certificate: too many names")
                return None
            held = self._certs[cert.name] = []
        held.append(cert)
        held.sort(key=lambda c: c.not_before, reverse=True)
        for old in held[MAX_CERTS_PER_NAME:]:
            self._known_raw.discard(old.raw)
        del held[MAX_CERTS_PER_NAME:]
        self._known_raw.add(cert.raw)
        if self._soonest is not None and cert.not_after < self._soonest:
            self._soonest = cert.not_after
        self.stats.certs_learned += 1
        return cert

    def current(self, name: str, now: float) -> NodeCert | None:
        """NAME's newest certificate good at NOW (unexpired, not revoked), if any."""
        wall = self.wall(now)
        for cert in self._certs.get(name, ()):
            if cert.valid_at(wall) and not self._is_revoked(cert):
                return cert
        return None

    def knows(self, name: str) -> bool:
        """Whether any certificate of NAME is held (good or not any more)."""
        return name in self._certs

    def raw_cert(self, name: str, now: float) -> bytes | None:
        cert = self.current(name, now)
        return None if cert is None else cert.raw

    def names(self) -> list[str]:
        return list(self._certs)

    # ---- revocations -------------------------------------------------------------------------

    def learn_revocation(self, raw: bytes) -> Revocation | None:
        """Verify and keep a CA-signed revocation; it if it is news (CertError if it is not
        the CA's). The certificates it revokes stop counting at once."""
        if raw in self._revocation_raws:
            return None
        rev = decode_revocation(raw, self.ca)
        held = self._revocations.setdefault(rev.name, [])
        self._revocation_raws.add(rev.raw)
        if self._n_revocations >= MAX_REVOCATIONS:
            raise CertError("too many revocations held")
        held.append(rev)
        self._n_revocations += 1
        self.stats.revocations += 1
        self.generation += 1
        return rev

    def soonest_expiry(self, now: float) -> int:
        """The next Unix time, after NOW, at which a held certificate expires (a member may
        then have to go). Recomputed only once that time has passed."""
        wall = self.wall(now)
        if self._soonest is None or wall >= self._soonest:
            self._soonest = min((c.not_after for certs in self._certs.values() for c in certs
                                 if c.not_after > wall), default=1 << 62)
        return self._soonest

    def _is_revoked(self, cert: NodeCert) -> bool:
        for r in self._revocations.get(cert.name, ()):
            if r.serial == cert.serial or (r.serial is None and cert.not_before < r.issued_at):
                return True
        return False

    def revoked(self, name: str) -> bool:
        """Whether every certificate held for NAME is revoked (it can no longer be anyone)."""
        certs = self._certs.get(name, [])
        return bool(certs) and all(self._is_revoked(c) for c in certs)

    # ---- claims ------------------------------------------------------------------------------

    def sign(self, domain: bytes, data: bytes) -> bytes:
        """Our signature over DATA in DOMAIN. The last few are remembered: a refutation or a
        re-announcement signs the same bytes again."""
        k = (domain, data)
        sig = self._signed.get(k)
        if sig is None:
            sig = sign_claim(self.keys.sign, domain, data)
            if len(self._signed) >= 8:
                self._signed.clear()
            self._signed[k] = sig
        return sig

    def chain_seed(self, incarnation: int, meta_bytes: bytes) -> bytes:
        """The secret start of our incarnation-token chain for an alive at INCARNATION with
        META_BYTES (crypto/incchain.py). Derived from our signing key, so a restarted node that
        announces the same incarnation and metadata as its forgotten life has the same chain,
        and its refutations still verify where that life's alive is held."""
        secret = self.keys.sign.private_bytes_raw()
        return hashlib.blake2b(incarnation.to_bytes(8, "big") + meta_bytes, key=secret,
                               digest_size=16, person=b"meshnet-chainsee").digest()

    def verify(self, name: str, domain: bytes, data: bytes, sig: bytes, now: float,
               at: float | None = None) -> bool | None:
        """Did NAME sign DATA in DOMAIN? None when no certificate of NAME is held (the caller
        may wait for it); False when none of its good ones verifies. A certificate is good if
        it is not revoked and was valid at AT (Unix time the claim was made; default NOW)."""
        cert = self.signer(name, domain, data, sig, now, at)
        return cert if cert is None else cert is not False

    def signer(self, name: str, domain: bytes, data: bytes, sig: bytes, now: float,
               at: float | None = None) -> NodeCert | Literal[False] | None:
        """verify, but the certificate that verified (its roles count) instead of True."""
        certs = self._certs.get(name)
        self.stats.verifications += 1
        if not certs:
            return None
        when = self.wall(now) if at is None else int(at)
        for cert in certs:
            if cert.valid_at(when) and not self._is_revoked(cert) and \
                    self.cache.verify(cert.sign_key, sig, domain, data):
                return cert
        self.stats.claims_refused += 1
        self.stats.refused(f"claim of {name}: bad signature or no good certificate")
        return False

    def role(self, name: str, now: float) -> tuple[str, ...]:
        cert = self.current(name, now)
        return () if cert is None else cert.roles
