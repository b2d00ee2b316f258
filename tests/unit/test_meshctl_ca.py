"""`meshctl ca init|sign|show|revoke`: run main() with argv lists into tmp_path."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from meshnet import api
from meshnet.cli.meshctl import main
from meshnet.crypto import certs


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


@pytest.fixture
def ca_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    d = tmp_path / "ca"
    assert run(capsys, "ca", "init", "--out", str(d), "--name", "prod-ca")[0] == 0
    return d


def test_init(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "ca"
    code, out, err = run(capsys, "--json", "ca", "init", "--out", str(d), "--days", "30")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert (_mode(d), _mode(d / "ca.key"), _mode(d / "ca.crt")) == (0o700, 0o600, 0o644)
    _, ca = certs.load_ca(d)
    assert doc["name"] == ca.name == "meshnet-ca" and doc["fingerprint"] == ca.fingerprint_hex
    assert ca.not_after - ca.not_before == 30 * certs.DAY


def test_init_refuses_to_overwrite(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (ca_dir / "ca.key").read_bytes()
    code, out, err = run(capsys, "ca", "init", "--out", str(ca_dir))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "ca.key exists; refusing to overwrite" in err
    assert (ca_dir / "ca.key").read_bytes() == before


def test_sign(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "web-1"
    code, out, err = run(capsys, "ca", "sign", "web-1", "--role", "worker", "--role", "admin",
                         "--label", "zone=eu-1", "--label", "rack=r7", "--days", "30",
                         "--ca", str(ca_dir), "--out", str(out_dir))
    assert (code, err) == (0, "")
    assert (_mode(out_dir), _mode(out_dir / "node.key"), _mode(out_dir / "node.crt")) == \
        (0o700, 0o600, 0o644)
    _, ca = certs.load_ca(ca_dir)
    cert = certs.load_node_cert(out_dir / "node.crt", ca)
    keys = certs.load_node_keys(out_dir / "node.key")
    assert (cert.sign_key, cert.dp_key) == (keys.sign_pub, keys.dp_pub)
    assert cert.roles == ("admin", "worker") and cert.labels == {"zone": "eu-1", "rack": "r7"}
    assert cert.not_after - cert.not_before == 30 * certs.DAY
    for text in ("name: web-1", "roles: admin,worker", f"serial: {cert.serial.hex()}",
                 f"ca: {ca.fingerprint_hex}", f"not_after: {certs.iso_time(cert.not_after)}"):
        assert text in out
    assert "zone=eu-1" in out


def test_sign_json_and_clamping(ca_dir: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--json", "ca", "sign", "n1", "--role", "worker", "--days",
                       "36000", "--ca", str(ca_dir), "--out", str(tmp_path / "n1"))
    doc = json.loads(out)
    _, ca = certs.load_ca(ca_dir)
    assert code == 0 and doc["clamped_to_ca_expiry"] is True
    assert doc["not_after"] == certs.iso_time(ca.not_after) and len(doc["serial"]) == 32


def test_sign_refuses_to_overwrite_unless_forced(ca_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    args = ["ca", "sign", "n1", "--role", "worker", "--ca", str(ca_dir), "--out",
            str(tmp_path / "n1")]
    assert run(capsys, *args)[0] == 0
    key = (tmp_path / "n1" / "node.key").read_bytes()
    code, out, err = run(capsys, *args)
    assert code == 1 and out == "" and "node.key exists; refusing to overwrite" in err
    assert (tmp_path / "n1" / "node.key").read_bytes() == key
    assert run(capsys, *args, "--force")[0] == 0
    assert (tmp_path / "n1" / "node.key").read_bytes() != key


@pytest.mark.parametrize(("extra", "code", "msg"), [
    (["--label", "novalue"], 2, "is not K=V"),
    (["--label", "bad key=v"], 1, "bad label key"),
    (["--days", "0"], 1, "days must be"),
])
def test_sign_bad_input(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                        extra: list[str], code: int, msg: str) -> None:
    got, out, err = run(capsys, "ca", "sign", "n1", "--role", "worker", *extra, "--ca",
                        str(ca_dir), "--out", str(tmp_path / "n1"))
    assert (got, out) == (code, "") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "n1").exists()


def test_sign_bad_name_and_missing_ca(tmp_path: Path, ca_dir: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "ca", "sign", "bad_", "--role", "worker", "--ca", str(ca_dir),
                       "--out", str(tmp_path / "n"))
    assert code == 1 and "bad name" in err
    code, _, err = run(capsys, "ca", "sign", "n", "--role", "worker", "--ca",
                       str(tmp_path / "nope"), "--out", str(tmp_path / "n"))
    assert code == 1 and f"{tmp_path / 'nope' / 'ca.crt'}: no such file" in err


def test_sign_refuses_a_loose_ca_key(ca_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    os.chmod(ca_dir / "ca.key", 0o644)
    code, _, err = run(capsys, "ca", "sign", "n", "--role", "worker", "--ca", str(ca_dir),
                       "--out", str(tmp_path / "n"))
    assert code == 1 and "accessible by group/other" in err and err.count("\n") == 1


def test_usage_errors_exit_2(ca_dir: Path, tmp_path: Path) -> None:
    for argv in (["ca", "sign", "n", "--ca", str(ca_dir), "--out", str(tmp_path)],  # no --role
                 ["ca", "sign", "n", "--role", "boss", "--ca", str(ca_dir), "--out", "x"],
                 ["ca", "init"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_show(ca_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "ca", "sign", "n1", "--role", "admin", "--ca", str(ca_dir), "--out",
        str(tmp_path / "n1"))
    crt = str(tmp_path / "n1" / "node.crt")
    code, out, _ = run(capsys, "ca", "show", crt)
    assert code == 0 and "name: n1" in out and "roles: admin" in out and "verified" not in out
    code, out, _ = run(capsys, "--json", "ca", "show", crt, "--ca", str(ca_dir))
    assert code == 0 and json.loads(out)["verified"] == "yes"
    code, out, _ = run(capsys, "ca", "show", crt, "--ca", str(ca_dir / "ca.crt"))
    assert code == 0 and "verified: yes" in out
    code, out, _ = run(capsys, "ca", "show", str(ca_dir / "ca.crt"))
    assert code == 0 and "kind: ca certificate" in out and "name: prod-ca" in out

    run(capsys, "ca", "init", "--out", str(tmp_path / "other"))
    code, out, err = run(capsys, "ca", "show", crt, "--ca", str(tmp_path / "other"))
    assert code == 1 and "verified: no: signed by another CA" in out
    assert "does not verify" in err and err.count("\n") == 1


def test_show_refuses_non_certificates(tmp_path: Path, ca_dir: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "ca", "show", str(ca_dir / "ca.key"))
    assert code == 1 and "not an armored meshnet certificate" in err
    code, _, err = run(capsys, "ca", "show", str(tmp_path / "missing"))
    assert code == 1 and "no such file" in err


def test_revoke_to_file_without_agent(ca_dir: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "web-1.rev"
    sock = str(tmp_path / "no-agent.sock")
    code, out, err = run(capsys, "--socket", sock, "ca", "revoke", "web-1", "--ca",
                         str(ca_dir), "--out", str(out_file))
    assert code == 0
    assert "not submitted" in err and "cannot reach the agent" in err and err.count("\n") == 1
    assert "-----BEGIN MESHNET REVOCATION-----" in out
    _, ca = certs.load_ca(ca_dir)
    rev = certs.load_revocation(out_file, ca)
    assert rev.name == "web-1" and rev.serial is None and _mode(out_file) == 0o644
    assert certs.dearmor(certs.ARMOR_REVOCATION, out) == rev.raw


def test_revoke_without_out_or_agent_exits_3(ca_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    serial = "ab" * 16
    code, out, err = run(capsys, "--socket", str(tmp_path / "none.sock"), "ca", "revoke", "n1",
                         "--serial", serial, "--ca", str(ca_dir))
    assert code == 3 and "not submitted" in err
    _, ca = certs.load_ca(ca_dir)
    rev = certs.decode_revocation(certs.dearmor(certs.ARMOR_REVOCATION, out), ca)
    assert rev.serial == bytes.fromhex(serial)


def test_revoke_bad_serial_is_usage(ca_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for serial in ("zz", "ab" * 15):
        code, _, err = run(capsys, "ca", "revoke", "n1", "--serial", serial, "--ca", str(ca_dir))
        assert code == 2 and "32 hex digits" in err


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[str, list[dict[str, Any]], list[dict[str, Any]]]]:
    """A one-shot fake agent: answers each request with the next reply queued in `replies`."""
    path = str(tmp_path / "a.sock")
    assert len(path) < 100, "tmp_path too long for a unix socket"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    srv.settimeout(10)
    requests: list[dict[str, Any]] = []
    replies: list[dict[str, Any]] = []

    def serve() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            header = conn.recv(4, socket.MSG_WAITALL)
            body = conn.recv(api.frame_length(header, api.MAX_REQUEST_BYTES), socket.MSG_WAITALL)
            requests.append(api.decode_body(body)[0])
            conn.sendall(api.encode(replies.pop(0)))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, requests, replies
    srv.close()
    t.join(5)


def test_revoke_submits_to_the_agent(agent: Any, ca_dir: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    path, requests, replies = agent
    replies.append(api.ok({"revoked": "n1"}))
    code, out, err = run(capsys, "--socket", path, "--json", "ca", "revoke", "n1", "--ca",
                         str(ca_dir))
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["submitted"] is True and doc["name"] == "n1"
    (req,) = requests
    assert req["op"] == "ca.revoke"
    _, ca = certs.load_ca(ca_dir)
    raw = certs.dearmor(certs.ARMOR_REVOCATION, req["args"]["revocation"])
    assert certs.decode_revocation(raw, ca).name == "n1"


def test_revoke_unknown_op_is_one_line_exit_1(agent: Any, ca_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path, _, replies = agent
    replies.append(api.error("unknown op ca.revoke", code="unknown_op"))
    code, out, err = run(capsys, "--socket", path, "ca", "revoke", "n1", "--ca", str(ca_dir),
                         "--out", str(tmp_path / "r"))
    assert code == 1 and err.count("\n") == 1
    assert "does not accept revocations yet" in err and "written to" in err
    assert "BEGIN MESHNET REVOCATION" in out and (tmp_path / "r").exists()


def test_sign_renew_keeps_the_keys(ca_dir: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "n1"
    assert run(capsys, "ca", "sign", "n1", "--role", "admin", "--ca", str(ca_dir), "--out",
               str(out))[0] == 0
    _, ca = certs.load_ca(ca_dir)
    keys = certs.load_node_keys(out / "node.key")
    first = certs.load_node_cert(out / "node.crt", ca)
    code, _, err = run(capsys, "ca", "sign", "n1", "--role", "worker", "--renew", "--ca",
                       str(ca_dir), "--out", str(out))
    assert (code, err) == (0, "")
    again = certs.load_node_keys(out / "node.key")
    renewed = certs.load_node_cert(out / "node.crt", ca)
    assert (again.sign_pub, again.dp_pub) == (keys.sign_pub, keys.dp_pub)
    assert renewed.serial != first.serial and renewed.roles == ("worker",)
    assert renewed.sign_key == keys.sign_pub
