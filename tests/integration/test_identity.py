"""Identity on real agents (#13): certificates decide who is a member, and a key holder with a
valid worker certificate still cannot speak for another node."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from pathlib import Path

from conftest import AgentProc, SessionCa, wait_for

from meshnet.agent.gossip import STREAM_KEY_OP, STREAM_PUSH_PULL, Sealer, stream_request
from meshnet.crypto.certs import (
    NodeKeys,
    generate_node_keys,
    load_node_cert,
    load_node_keys,
    make_ca,
    sign_node,
)
from meshnet.crypto.keyring import Keyring
from meshnet.crypto.trust import ALIVE_DOMAIN, Trust
from meshnet.membership import MAX_CLAIM_INCARNATION, Membership, MembershipConfig, NodeMeta
from meshnet.membership.messages import Alive, Dead, Suspect, alive_payload


class Rogue:
    """A membership core speaking the wire protocol from inside the test, with whatever
    identity the test gives it (and the real cluster key)."""

    def __init__(self, name: str, trust: Trust, key_file: Path, ip: str) -> None:
        self.keyring = Keyring.from_key_file(str(key_file))
        self.sealer = Sealer(self.keyring, name)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind((ip, 0))
        self.addr = self.udp.getsockname()
        self.core = Membership(MembershipConfig.profile("lan-fast"), NodeMeta(name, self.addr),
                               random.Random(1), time.monotonic(), trust=trust)

    def join(self, peer: AgentProc) -> None:
        target = (peer.ip, peer.port)
        self.core.join([target], time.monotonic())
        for payload, dst in self.core.streams_to_open():
            assert dst == target
            self.core.receive_stream_reply(self.stream(dst, payload), dst, time.monotonic())

    def stream(self, dst: tuple[str, int], payload: bytes,
               service: int = STREAM_PUSH_PULL) -> bytes:
        return asyncio.run(stream_request(self.sealer, dst, service, payload))

    def send(self, msg: bytes, peer: AgentProc) -> None:
        self.udp.sendto(self.sealer.seal_datagram(msg), (peer.ip, peer.port))

    def close(self) -> None:
        self.udp.close()


def trust_for(ca: SessionCa | tuple[object, object], name: str, cert_name: str | None = None,
              days: int = 7, issued: float | None = None) -> Trust:
    """A Trust for NAME with a fresh certificate (for CERT_NAME, by default NAME) from CA; the
    Trust believes its own certificate even when the cluster would not (another name, expiry)."""
    ca_key, ca_cert = (ca.key, ca.ca) if isinstance(ca, SessionCa) else ca
    keys: NodeKeys = generate_node_keys()
    issued_at = int(issued if issued is not None else time.time() - 60)
    cert = sign_node(ca_key, ca_cert, cert_name or name, ["admin"], {}, keys.sign_pub,  # type: ignore[arg-type]
                     keys.dp_pub, issued_at, days)
    # The rogue's clock: wherever its own certificate is valid.
    offset = issued_at + 10 - time.monotonic()
    t = Trust(ca_cert, cert.name, keys, cert, time.monotonic(), wall_offset=offset)  # type: ignore[arg-type]
    t.name = name  # what it will call itself
    return t


def names(a: AgentProc) -> set[str]:
    return set(a.members())


def test_only_members_with_good_certificates_are_listed(agents, key_file, test_ca) -> None:  # type: ignore[no-untyped-def]
    a: AgentProc = agents("n1", key=key_file).start()
    b: AgentProc = agents("n2", key=key_file).start(join=[a.addr])
    wait_for(lambda: names(a) == names(b) == {"n1", "n2"}, 15, "two members")
    # r4's certificates are revoked (submitted to n1, gossiped to n2) before r4 ever shows up
    r = a.ctl("ca", "revoke", "r4", "--ca", str(test_ca.ca_cert.parent))
    assert r.returncode == 0, r.stderr
    wait_for(lambda: b.ctl_json("status")["identity"]["revocations"] >= 1, 10,
             "the revocation on n2")
    other_ca = make_ca("other", int(time.time()) - 3600, 30)
    rogues = [
        Rogue("r1", trust_for(other_ca, "r1"), key_file, "127.0.0.50"),  # another CA
        Rogue("r2", trust_for(test_ca, "r2", cert_name="n9"), key_file, "127.0.0.51"),
        Rogue("r3", trust_for(test_ca, "r3", days=1, issued=time.time() - 2 * 86_400),
              key_file, "127.0.0.52"),  # expired
        Rogue("r4", trust_for(test_ca, "r4"), key_file, "127.0.0.54"),  # revoked
        Rogue("ok", trust_for(test_ca, "ok"), key_file, "127.0.0.53"),  # the control
    ]
    try:
        for r in rogues:
            r.join(a)
            alive = r.core._alive_msg()
            r.send(alive, a)
            r.send(alive, b)
        # the control shows the path works: a good certificate is listed at once
        wait_for(lambda: "ok" in names(a) and "ok" in names(b), 10, "the control listed")
        time.sleep(1.0)
        for agent in (a, b):
            assert names(agent) & {"r1", "r2", "r3", "r4", "n9"} == set(), agent.members()
        status = a.ctl_json("status")
        # another CA's, the expired and the revoked certificate refused; r2's alive (no
        # certificate names it) held, never applied
        assert status["identity"]["certs_refused"] >= 3, status["identity"]
        assert status["gossip"]["alives_held"] >= 1, status["gossip"]
    finally:
        for r in rogues:
            r.close()


def test_a_worker_cannot_speak_for_another_node(agents, key_file, test_ca) -> None:  # type: ignore[no-untyped-def]
    a: AgentProc = agents("n1", key=key_file).start()
    b: AgentProc = agents("n2", key=key_file).start(join=[a.addr])
    w = agents("n3", key=key_file)
    w.identity = test_ca.node_files("n3", w.dir / "id", roles=("worker",))
    w.start(join=[a.addr])
    everyone = (a, b, w)
    wait_for(lambda: all(names(x) == {"n1", "n2", "n3"} for x in everyone), 15, "three members")
    before = {x.name: x.members()["n2"] for x in everyone}
    # The worker's own keys and certificate, and the cluster key: all it legitimately holds.
    ca = test_ca.ca
    worker = Trust(ca, "n3", load_node_keys(w.dir / "id" / "node.key"),
                   load_node_cert(w.dir / "id" / "node.crt", ca), time.monotonic(),
                   wall_offset=time.time() - time.monotonic())
    rogue = Rogue("n3", worker, key_file, "127.0.0.60")
    try:
        forged = NodeMeta("n2", ("127.0.0.66", 7946))
        raw = forged.encode()
        top = MAX_CLAIM_INCARNATION
        attacks = [
            Alive(top, forged, raw, worker.sign(ALIVE_DOMAIN, alive_payload(top, raw))).encode(),
            Alive(top, forged, raw).encode(),
            Dead(1 << 63, "n2", "n3").encode(),
            Dead(top, "n2", "n3").encode(),
            Suspect(top, "n2", "n3").encode(),
        ]
        for _ in range(3):
            for msg in attacks:
                for x in everyone:
                    rogue.send(msg, x)
            time.sleep(0.5)
        time.sleep(2.0)
        for x in everyone:
            m = x.members()["n2"]
            assert m["state"] == "alive" and m["addr"] == before[x.name]["addr"], (x.name, m)
            assert m["incarnation"] < before[x.name]["incarnation"] + 100, (x.name, m)
        # n2 was never pushed to refute
        assert b.ctl_json("status")["incarnation"] < before["n1"]["incarnation"] + 100
        refused = sum(x.ctl_json("status")["gossip"]["claims_above_signed"] for x in everyone)
        assert refused >= 3
    finally:
        rogue.close()


def test_a_bad_node_record_is_set_aside_and_the_node_comes_back(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    a: AgentProc = agents("n1", key=key_file).start()
    b: AgentProc = agents("n2", key=key_file).start(join=[a.addr])
    wait_for(lambda: names(a) == {"n1", "n2"}, 15, "two members")
    b.stop()
    record = b.state_dir / "node.json"
    data = json.loads(record.read_text())
    data["incarnation"] = 1 << 64
    record.write_text(json.dumps(data))
    b.start(join=[a.addr])
    wait_for(lambda: a.members().get("n2", {}).get("state") == "alive" and
             b.members().get("n1", {}).get("state") == "alive", 15, "n2 back alive")
    assert len(list(b.state_dir.glob("node.json.bad-*"))) == 1
    assert "set aside" in b.log.read_text()


def test_a_renewed_certificate_is_taken_on_sighup(agents, key_file, test_ca) -> None:  # type: ignore[no-untyped-def]
    import signal
    import subprocess

    from conftest import MESHCTL
    a: AgentProc = agents("n1", key=key_file).start()
    b: AgentProc = agents("n2", key=key_file).start(join=[a.addr])
    wait_for(lambda: names(a) == {"n1", "n2"}, 15, "two members")
    old = b.ctl_json("status")["identity"]["serial"]
    inc = a.members()["n2"]["incarnation"]
    ca_dir = test_ca.ca_cert.parent
    r = subprocess.run([MESHCTL, "ca", "sign", "n2", "--role", "admin", "--renew", "--ca",
                        str(ca_dir), "--out", str(b.dir / "id")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert b.proc is not None
    b.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: b.ctl_json("status")["identity"]["serial"] != old, 10, "the new serial")
    # re-announced, signed with the renewed certificate, and believed
    wait_for(lambda: a.members()["n2"]["incarnation"] > inc and
             a.members()["n2"]["state"] == "alive", 10, "n2 re-announced")


def test_key_operations_count_only_from_an_admin(agents, key_file, test_ca) -> None:  # type: ignore[no-untyped-def]
    import msgpack

    from meshnet.crypto.keyring import generate_key
    from meshnet.crypto.trust import REQUEST_DOMAIN
    a: AgentProc = agents("n1", key=key_file).start()
    w = agents("n3", key=key_file)
    w.identity = test_ca.node_files("n3", w.dir / "id", roles=("worker",))
    w.start(join=[a.addr])
    wait_for(lambda: names(a) == {"n1", "n3"}, 15, "two members")
    ca = test_ca.ca
    worker = Trust(ca, "n3", load_node_keys(w.dir / "id" / "node.key"),
                   load_node_cert(w.dir / "id" / "node.crt", ca), time.monotonic(),
                   wall_offset=time.time() - time.monotonic())
    rogue = Rogue("n3", worker, key_file, "127.0.0.61")
    keys_before = [k["key"] for k in a.ctl_json("keys", "list")["keys"]]
    new = generate_key()
    at = int(time.time())
    signed = msgpack.packb(["install", new, "n3", at])
    requests = [
        {"op": "install", "key": new},  # unsigned
        {"op": "install", "key": new, "by": "n3", "at": at,  # the worker's own signature
         "sig": worker.sign(REQUEST_DOMAIN, signed)},
        {"op": "install", "key": new, "by": "n1", "at": at,  # claims the admin, worker-signed
         "sig": worker.sign(REQUEST_DOMAIN, msgpack.packb(["install", new, "n1", at]))},
    ]
    try:
        for req in requests:
            reply = msgpack.unpackb(rogue.stream((a.ip, a.port), msgpack.packb(req),
                                                 STREAM_KEY_OP))
            assert reply["ok"] is False, (req, reply)
        assert [k["key"] for k in a.ctl_json("keys", "list")["keys"]] == keys_before
        r = w.ctl("keys", "install", new)
        assert r.returncode == 1 and "admin" in r.stderr, r.stderr
        # an admin's own rotation still reaches the worker
        assert a.ctl("keys", "install", new).returncode == 0
        assert new in [k["key"] for k in w.ctl_json("keys", "list")["keys"]]
    finally:
        rogue.close()
