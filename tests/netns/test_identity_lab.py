"""Authorization on real hosts (#13), tried as a user would: a worker cannot define services,
networks or keys, or forge them; no node deletes another's records; a revoked node is dropped."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, inject_record, task_trees, wait

from meshnet.crypto import certs
from meshnet.lab import Lab
from meshnet.platform import netns

pytestmark = pytest.mark.netns

LAB_CLI = str(Path(sys.executable).parent / "meshnet-lab")


def store(c: Cluster, host: str) -> dict[str, Any]:
    return dict(c.ctl_json(host, "status")["store"])


def unauthorized(c: Cluster, host: str, table: str) -> int:
    return int(store(c, host).get("refused_unauthorized_by_table", {}).get(table, 0))


def service_names(c: Cluster, host: str) -> set[str]:
    r = c.ctl(host, "--json", "service", "ls")
    return {s["name"] for s in json.loads(r.stdout)} if r.returncode == 0 else set()


def test_workers_cannot_define_or_forge_and_nobody_deletes_anothers(
        cluster: Callable[..., Cluster]) -> None:
    c = cluster(3, workers=("h3",))
    members = {m["name"]: m for m in c.ctl_json("h1", "members")}
    assert members["h3"]["roles"] == ["worker"] and members["h1"]["roles"] == ["admin"]
    # `meshctl members` shows each member's roles and certificate expiry, as its certificate
    # (the lab's, made by `up`) says
    _, ca = certs.load_ca(c.lab.ca_dir)
    for h in ("h1", "h2", "h3"):
        cert = certs.load_node_cert(c.lab.host_dir(h) / "id" / "node.crt", ca)
        assert members[h]["cert_expires"] == certs.iso_time(cert.not_after), members[h]
    text = c.ctl("h2", "members").stdout.splitlines()
    assert text[0].split()[-2:] == ["ROLES", "CERT_EXPIRES"], text
    rows = {line.split()[0]: line.split() for line in text[1:]}
    assert rows["h3"][-2] == "worker" and rows["h1"][-2] == "admin", text
    assert rows["h3"][-1] == members["h3"]["cert_expires"], text
    c.network("n")

    # a worker's own commands are refused locally, with one line
    for args in (("service", "create", "evil", "--network", "n", "--", "sleep", "600"),
                 ("network", "create", "evil"), ("keys", "generate"),
                 ("run", "--network", "n", "--cap-add", "NET_ADMIN", "--", "true")):
        r = c.ctl("h3", *args)
        if args[0] == "keys":  # generating a key is local; installing one is a change
            r = c.ctl("h3", "keys", "install", r.stdout.strip())
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
        assert "admin" in r.stderr, r.stderr
    assert c.ctl("h3", "run", "--network", "n", "--", "true").returncode == 0  # tasks are fine

    # a service record forged with the worker's own key runs nowhere
    spec = {"networks": ["n"], "command": ["sleep", "600"]}
    forged = {"name": "evil", "network": "n", "mode": "global", "replicas": 0, "spec": spec}
    before = {h: unauthorized(c, h, "services") for h in ("h1", "h2")}
    for h in ("h1", "h2"):
        inject_record(c.lab, h, "services", "evil", forged, writer="h3", sign_as="h3",
                      from_host="h3")
    wait(lambda: all(unauthorized(c, h, "services") > before[h] for h in ("h1", "h2")), 10,
         "the forged service refused")
    for h in ("h1", "h2", "h3"):
        assert "evil" not in service_names(c, h)
        assert not any(name.startswith("evil.") for name in task_trees(c.lab, h))

    # nobody deletes another node's record: h1's registration survives h3's tombstone (the
    # injected deletes carry HLCs 60 s ahead, newer than h1's write and than h1's re-announce of
    # the disputed record, and are still refused)
    subnet = c.ctl_json("h1", "network", "inspect", "n")["subnet"]
    ip = subnet.rsplit(".", 1)[0] + ".200"
    r = c.ctl("h1", "endpoint", "add", "web", ip, "--network", "n")
    assert r.returncode == 0, r.stderr
    wait(lambda: c.ctl_json("h2", "dns", "lookup", "web", "--network", "n")["answers"] == [ip],
         10, "web resolves on h2")
    key = "n/web@h1"
    before = {h: unauthorized(c, h, "endpoints") for h in ("h1", "h2")}
    for h in ("h1", "h2"):
        inject_record(c.lab, h, "endpoints", key, None, writer="h3", sign_as="h3",
                      from_host="h3", ahead_s=60)
        inject_record(c.lab, h, "endpoints", key, None, writer="h1", from_host="h3",
                      ahead_s=60)  # unsigned
    wait(lambda: all(unauthorized(c, h, "endpoints") >= before[h] + 2 for h in ("h1", "h2")),
         10, "the foreign deletes refused")
    # the owner answers a dispute of a record it still holds with a fresh write of it
    wait(lambda: c.ctl_json("h1", "status")["store"]["records_reannounced"] >= 1, 10,
         "h1 to re-announce its disputed record")
    for h in ("h1", "h2", "h3"):
        assert c.ctl_json(h, "dns", "lookup", "web", "--network", "n")["answers"] == [ip]


def test_a_revoked_node_is_dropped_everywhere(cluster: Callable[..., Cluster]) -> None:
    c = cluster(3)
    r = c.ctl("h1", "ca", "revoke", "h3", "--ca", str(c.lab.ca_dir))
    assert r.returncode == 0, r.stderr

    def gone() -> bool:
        return all("h3" not in {m["name"] for m in c.ctl_json(h, "members")}
                   for h in ("h1", "h2"))

    wait(gone, 20, lambda: f"h3 dropped: {[c.ctl_json(h, 'members') for h in ('h1', 'h2')]}")
    # and it stays out: its alives and refutations no longer count
    wait(lambda: c.ctl_json("h2", "status")["identity"]["revocations"] >= 1, 10,
         "the revocation gossiped to h2")
    time.sleep(3)
    assert gone()


def test_lab_up_makes_a_ca_and_a_certificate_for_every_host(
        lab_factory: Callable[[], Lab]) -> None:
    """`meshnet-lab up` makes the lab's CA and each host's certificate and keys, as `meshctl ca
    init` and `meshctl ca sign` would: every host an admin unless `--workers` names it."""
    lab = lab_factory()

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([LAB_CLI, "--prefix", lab.prefix, "--run-dir", str(lab.run_dir),
                               *args], capture_output=True, text=True, timeout=60)

    r = cli("up", "--hosts", "2", "--no-agents", "--workers", "h3")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "no host h3" in r.stderr
    assert not [n for n in netns.list_netns() if n.startswith(f"{lab.prefix}-")]

    r = cli("up", "--hosts", "4", "--no-agents", "--workers", "h3,h4")
    assert r.returncode == 0, r.stderr
    _, ca = certs.load_ca(lab.ca_dir)
    assert (lab.ca_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    serials = set()
    for h, role in (("h1", "admin"), ("h2", "admin"), ("h3", "worker"), ("h4", "worker")):
        d = lab.host_dir(h) / "id"
        cert = certs.load_node_cert(d / "node.crt", ca)  # chains to the lab's CA
        keys = certs.load_node_keys(d / "node.key")
        certs.check_node_cert(cert, ca, int(time.time()), name=h)
        assert cert.roles == (role,) and (cert.sign_key, cert.dp_key) == (keys.sign_pub,
                                                                           keys.dp_pub)
        assert (d / "node.key").stat().st_mode & 0o777 == 0o600
        serials.add(cert.serial)
        # and the agent is told to use them
        args = json.loads(lab.manifest_path.read_text())["hosts"][h]["agent_args"]
        for flag, path in (("--ca-cert", lab.ca_dir / "ca.crt"), ("--node-cert", d / "node.crt"),
                           ("--node-key", d / "node.key")):
            assert args[args.index(flag) + 1] == str(path)
    assert len(serials) == 4
    assert cli("down").returncode == 0
