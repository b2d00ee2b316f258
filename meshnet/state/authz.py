"""Who may write what in the replicated store (#13). Pure: the store calls it for every remote
write (after the schema check, validate.py), with the node's Trust behind it.

- Every record carries its writer and the writer's signature over codec.signed_bytes, made
  with a certificate valid when the record was written (its HLC) and not revoked since.
- Owned records (endpoints, tasks; their keys end in "@<node>") are accepted only from their
  owner, deletes included: no node can tombstone another's endpoint.
- Cluster definitions (networks, services) only from a node whose certificate has the admin
  role: a worker's forged service runs nowhere.
- Certificates and revocations are self-authenticating (the CA signed them), so any member may
  spread them; they are never deleted.

A record whose writer's certificate is not known yet is refused for now (non-final): the store
does not remember it, and anti-entropy offers it again once the certificate has arrived.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshnet.crypto.certs import CertError, NodeCert, decode_node_cert, decode_revocation
from meshnet.crypto.trust import RECORD_DOMAIN, Trust
from meshnet.state.codec import signed_bytes
from meshnet.state.tables import ENDPOINTS, NETWORKS, SERVICES
from meshnet.state.types import Entry, Refusal
from meshnet.state.validate import CERTS, REVOCATIONS

__all__ = ["ADMIN_TABLES", "CERTS", "OPEN_TABLES", "OWNED_TABLES", "REVOCATIONS", "RecordPolicy",
           "cert_key", "owner_of"]

TASKS = "tasks"
# Tables only an admin may write.
ADMIN_TABLES = frozenset({NETWORKS, SERVICES})
# Tables whose keys end in "@<owner>": only the owner writes (or deletes) them.
OWNED_TABLES = frozenset({ENDPOINTS, TASKS})
# Tables whose values the CA signed: anyone may pass them on.
OPEN_TABLES = frozenset({CERTS, REVOCATIONS})


def owner_of(key: str) -> str | None:
    """The node an owned record's key names ("net/web.1@h2" -> "h2")."""
    head, sep, owner = key.rpartition("@")
    return owner if sep and head and owner else None


def cert_key(cert: NodeCert) -> str:
    return f"{cert.name}/{cert.serial.hex()}"


class RecordPolicy:
    """Signs this node's records and authorizes others'. ``now`` is Unix time (the store's)."""

    def __init__(self, trust: Trust) -> None:
        self.trust = trust

    def sign(self, data: bytes) -> bytes:
        return self.trust.sign(RECORD_DOMAIN, data)

    def may_write(self, table: str) -> str | None:
        """Why this node may not write TABLE (None: it may): the local check before a put."""
        if table in ADMIN_TABLES and not self.trust.cert.is_admin:
            return (f"this node's certificate has the role {','.join(self.trust.cert.roles)}: "
                    f"only an admin may change {table}")
        return None

    def authorize(self, e: Entry, data: Mapping[str, Any] | None, now: float) -> Refusal | None:
        where = f"{e.table}/{e.key}"
        if e.table in OPEN_TABLES:
            return self._self_signed(e, data)
        if not e.sig:
            return Refusal(f"{where}: unsigned (by {e.writer})", True)
        trust = self.trust
        at = e.hlc.wall_ms / 1000.0
        cert = trust.signer(e.writer, RECORD_DOMAIN, signed_bytes(e), e.sig,
                            now - trust.wall_offset, at=at)
        if cert is None:
            return Refusal(f"{where}: no certificate of {e.writer} yet", False)
        if cert is False:
            return Refusal(f"{where}: not signed by {e.writer}", True)
        if e.table in OWNED_TABLES:
            owner = owner_of(e.key)
            if owner != e.writer:
                return Refusal(f"{where}: owned by {owner or 'nobody'}, written by {e.writer}",
                               True)
        elif e.table in ADMIN_TABLES and not cert.is_admin:
            return Refusal(f"{where}: {e.writer} is not an admin", True)
        return None

    def _self_signed(self, e: Entry, data: Mapping[str, Any] | None) -> Refusal | None:
        where = f"{e.table}/{e.key}"
        if data is None:
            return Refusal(f"{where}: certificates and revocations are never deleted", True)
        ca = self.trust.ca
        try:
            if e.table == CERTS:
                cert = decode_node_cert(bytes(data["cert"]), ca)
                key = cert_key(cert)
            else:
                rev = decode_revocation(bytes(data["revocation"]), ca)
                key = f"{rev.name}/{rev.serial.hex() if rev.serial else 'all'}/{rev.issued_at}"
        except (CertError, KeyError, TypeError, ValueError) as err:
            return Refusal(f"{where}: {err}", True)
        if key != e.key:
            return Refusal(f"{where}: the key does not match what the CA signed ({key})", True)
        return None
