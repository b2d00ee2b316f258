"""Who may write what (state/authz.py, #13): signatures, owners, admins, CA-signed tables."""

from __future__ import annotations

import pytest

from meshnet import wire
from meshnet.crypto.certs import generate_node_keys, make_ca, sign_node, sign_revocation
from meshnet.crypto.trust import Trust
from meshnet.state import Entry, Hlc, Store, StoreConfig, codec
from meshnet.state.authz import RecordPolicy, cert_key, owner_of
from meshnet.state.types import Refusal

T0 = 1_800_000_000
CA_KEY, CA = make_ca("authz", T0 - 86_400, 365)


def trust(name: str, role: str = "admin") -> Trust:
    keys = generate_node_keys()
    cert = sign_node(CA_KEY, CA, name, [role], {}, keys.sign_pub, keys.dp_pub, T0 - 3600, 30)
    return Trust(CA, name, keys, cert, 0.0, wall_offset=T0)


ADMIN, WORKER, OTHER = trust("a1"), trust("w1", "worker"), trust("a2")
# the checking node knows all three certificates
CHECKER = trust("c1")
for t in (ADMIN, WORKER, OTHER):
    CHECKER.learn_cert(t.cert.raw, 0.0)
POLICY = RecordPolicy(CHECKER)
NOW = float(T0 + 10)  # the store's clock is Unix time


def entry(table: str, key: str, value: dict[str, object] | None, by: Trust | None,
          writer: str | None = None) -> tuple[Entry, dict[str, object] | None]:
    blob = None if value is None else wire.pack(value)
    e = Entry(table, key, blob, Hlc((T0 + 5) * 1000, 0), writer or (by.name if by else "x"))
    if by is not None:
        e = Entry(e.table, e.key, e.value, e.hlc, e.writer,
                  RecordPolicy(by).sign(codec.signed_bytes(e)))
    return e, value


def check(table: str, key: str, value: dict[str, object] | None, by: Trust | None,
          writer: str | None = None) -> Refusal | None:
    e, data = entry(table, key, value, by, writer)
    return POLICY.authorize(e, data, NOW)


SERVICE = {"name": "web", "network": "n", "mode": "replicated", "replicas": 1, "spec": {}}


def test_admins_define_services_and_networks_workers_do_not() -> None:
    assert check("services", "web", SERVICE, ADMIN) is None
    assert check("networks", "n", {"name": "n"}, ADMIN) is None
    assert check("services", "web", None, ADMIN) is None  # an admin's delete
    for table in ("services", "networks"):
        r = check(table, "web", SERVICE, WORKER)
        assert r is not None and r.final and "not an admin" in r.reason
    r = check("services", "web", None, WORKER)  # nor delete
    assert r is not None and r.final
    assert POLICY.may_write("services") is None
    assert "admin" in (RecordPolicy(WORKER).may_write("services") or "")
    assert RecordPolicy(WORKER).may_write("endpoints") is None


def test_signatures_are_the_writers_own() -> None:
    r = check("services", "web", SERVICE, None, writer="a1")  # unsigned
    assert r is not None and r.final and "unsigned" in r.reason
    r = check("services", "web", SERVICE, WORKER, writer="a1")  # a worker signing as an admin
    assert r is not None and r.final and "not signed by a1" in r.reason
    e, data = entry("services", "web", SERVICE, ADMIN)
    tampered = Entry(e.table, e.key, wire.pack({**SERVICE, "replicas": 9}), e.hlc, e.writer,
                     e.sig)
    r = POLICY.authorize(tampered, data, NOW)
    assert r is not None and r.final


def test_an_unknown_writer_is_deferred_not_refused() -> None:
    stranger = trust("s1")
    r = check("services", "web", SERVICE, stranger)
    assert r is not None and not r.final and "no certificate" in r.reason
    CHECKER.learn_cert(stranger.cert.raw, 0.0)
    assert check("services", "web", SERVICE, stranger) is None


def test_owned_records_only_from_their_owner() -> None:
    ep = {"name": "web", "network": "n", "ip": "10.0.0.2", "mac": "02:42:0a:00:00:02",
          "node": "w1"}
    assert check("endpoints", "n/web@w1", ep, WORKER) is None
    assert check("endpoints", "n/web@w1", None, WORKER) is None  # its own delete
    for by in (ADMIN, OTHER):
        r = check("endpoints", "n/web@w1", None, by)
        assert r is not None and r.final and "owned by w1" in r.reason
    r = check("tasks", "web.1@a1", {"task": "web.1"}, WORKER)
    assert r is not None and r.final
    r = check("endpoints", "n/web", ep, WORKER)  # no owner in the key
    assert r is not None and r.final
    assert owner_of("n/web.1@h2") == "h2" and owner_of("n/web") is None
    assert owner_of("@h2") is None and owner_of("x@") is None


def test_certificates_and_revocations_are_checked_against_the_ca() -> None:
    t = trust("n9")
    assert check("certs", cert_key(t.cert), {"cert": t.cert.raw}, None, writer="anyone") \
        is None
    r = check("certs", f"n8/{t.cert.serial.hex()}", {"cert": t.cert.raw}, None)
    assert r is not None and r.final and "key does not match" in r.reason
    other_key, other_ca = make_ca("other", T0 - 86_400, 365)
    k = generate_node_keys()
    foreign = sign_node(other_key, other_ca, "n9", ["admin"], {}, k.sign_pub, k.dp_pub,
                        T0 - 3600, 30)
    r = check("certs", cert_key(foreign), {"cert": foreign.raw}, None)
    assert r is not None and r.final
    rev = sign_revocation(CA_KEY, CA, "n9", None, T0)
    assert check("revocations", f"n9/all/{T0}", {"revocation": rev.raw}, None) is None
    r = check("revocations", f"n9/all/{T0}", None, ADMIN)
    assert r is not None and r.final and "never deleted" in r.reason
    r = check("certs", cert_key(t.cert), {"cert": b"junk"}, None)
    assert r is not None and r.final


def test_a_revoked_writer_no_longer_counts() -> None:
    t = trust("r1")
    checker = trust("c2")
    checker.learn_cert(t.cert.raw, 0.0)
    policy = RecordPolicy(checker)
    e, data = entry("services", "web", SERVICE, t)
    assert policy.authorize(e, data, NOW) is None
    checker.learn_revocation(sign_revocation(CA_KEY, CA, "r1", t.cert.serial, T0).raw)
    r = policy.authorize(e, data, NOW)
    assert r is not None and r.final


@pytest.mark.parametrize("role, accepted", [("admin", True), ("worker", False)])
def test_in_a_store(role: str, accepted: bool) -> None:
    """The policy plugged into two stores: a worker's service never reaches the other."""
    writer = ADMIN if role == "admin" else WORKER
    src = Store(writer.name, StoreConfig(signer=RecordPolicy(writer).sign))
    dst = Store("c1", StoreConfig(authorizer=POLICY.authorize))
    e = src.put("services", "web", SERVICE, NOW)
    dst.apply_delta(codec.encode_delta(e), NOW)
    assert ("web" in dst.services()) is accepted
