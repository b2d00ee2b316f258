"""`meshnetd --check-config`: every problem at once, the host checked as the agent's start checks
it, and nothing the agent would refuse at start passed as OK."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from meshnet import config as c
from meshnet.agent import preflight
from meshnet.agent.agent import Agent, StartError
from meshnet.cli import meshnetd
from meshnet.config_docs import toml_value
from meshnet.crypto.certs import generate_node_keys, make_ca, save_ca, save_node, sign_node
from meshnet.crypto.keyring import generate_key


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in data.items()))
    return path


def check(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str], list[str],
                                                                   str]:
    """(exit code, error lines, warning lines, stdout) of meshnetd --check-config ARGS."""
    code = meshnetd.main(["--check-config", *args])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    warnings = [x for x in lines if x.startswith("meshnetd: warning: ")]
    return code, [x for x in lines if x not in warnings], warnings, out


@pytest.fixture
def base(tmp_path: Path) -> dict[str, Any]:
    """A config the agent starts with, on loopback and control plane only."""
    key = tmp_path / "cluster.key"
    key.write_text(generate_key() + "\n")
    key.chmod(0o600)
    return {"name": "n1", "bind": "127.0.0.1:7999", "state_dir": str(tmp_path / "state"),
            "socket": str(tmp_path / "ctl.sock"), "datapath": "none",
            "cluster_key_file": str(key), "insecure_no_identity": True}


def test_three_mistakes_are_three_errors(tmp_path: Path, base: dict[str, Any],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "m.toml", {**base, "bind": "x:1", "log_level": "loud"})
    with cfg.open("a") as f:
        f.write("[membership]\nreap_afer = 3.0\n")
    code, errors, _, out = check(capsys, "--config", str(cfg))
    assert code == 1 and out == ""
    assert errors == [
        "meshnetd: bind: 'x' is not an IP address",
        "meshnetd: log_level: 'loud' is not one of debug, info, warning, error",
        "meshnetd: membership: unknown key 'reap_afer' (did you mean 'reap_after'?)",
    ]


def test_a_good_config_is_ok_and_its_dangers_are_warnings(
        tmp_path: Path, base: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "m.toml", base)
    code, errors, warnings, out = check(capsys, "--config", str(cfg))
    assert (code, errors, out) == (0, [], "meshnetd: configuration OK\n")
    assert [w.split(":")[2].strip() for w in warnings] == ["NO IDENTITY"]
    Path(base["cluster_key_file"]).chmod(0o644)
    code, errors, warnings, _ = check(capsys, "--config", str(cfg))
    assert code == 0 and errors == []
    assert f"cluster_key_file: {base['cluster_key_file']} is readable by group or others " \
           "(mode 0644)" in warnings[-1]


def test_config_and_host_problems_are_listed_together(
        tmp_path: Path, base: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    data = {**base, "state_dir": str(blocker / "state"), "dns_ttl": -1}
    del data["cluster_key_file"]
    cfg = write_config(tmp_path / "m.toml", data)
    code, errors, _, _ = check(capsys, "--config", str(cfg))
    assert code == 1
    assert errors == ["meshnetd: dns_ttl: must be 0..3600 seconds",
                      f"meshnetd: state_dir: {blocker}/state: {blocker} is not a directory"]
    # with the state dir fixed, the missing key is the next thing the agent would refuse
    cfg = write_config(tmp_path / "m.toml", {**data, "state_dir": str(tmp_path / "s")})
    code, errors, _, _ = check(capsys, "--config", str(cfg))
    assert errors == ["meshnetd: dns_ttl: must be 0..3600 seconds",
                      f"meshnetd: {preflight.NO_CLUSTER_KEY}"]


def test_flags_are_checked_with_the_file(tmp_path: Path, base: dict[str, Any],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "m.toml", base)
    code, errors, _, _ = check(capsys, "--config", str(cfg), "--dns-ttl", "99999",
                               "--label", "bad key=v")
    assert code == 1 and errors == ["meshnetd: --label: label key 'bad key' must be 1-63 of "
                                     "[A-Za-z0-9_.-]"]


def test_the_vxlan_datapath_needs_ip_and_nft(tmp_path: Path, base: dict[str, Any],
                                             capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(preflight, "TOOL_DIRS", (str(tmp_path / "empty"),))
    cfg = write_config(tmp_path / "m.toml", base)
    assert check(capsys, "--config", str(cfg))[0] == 0  # datapath none: no kernel devices
    code, errors, _, _ = check(capsys, "--config", str(cfg), "--datapath", "vxlan")
    assert code == 1
    assert [e.split("`")[1] for e in errors] == ["ip", "nft"]
    sbin = tmp_path / "sbin"
    sbin.mkdir()
    for tool in ("ip", "nft"):
        (sbin / tool).write_text("#!/bin/sh\n")
        (sbin / tool).chmod(0o755)
    monkeypatch.setattr(preflight, "TOOL_DIRS", (str(sbin),))
    assert check(capsys, "--config", str(cfg), "--datapath", "vxlan")[0] == 0


def _ca_files(tmp_path: Path, cert_name: str) -> dict[str, str]:
    key, ca = make_ca("test-ca", int(time.time()) - 86_400, 30)
    save_ca(tmp_path / "ca", key, ca)
    keys = generate_node_keys()
    cert = sign_node(key, ca, cert_name, ["admin"], {}, keys.sign_pub, keys.dp_pub,
                     int(time.time()) - 60, 7)
    save_node(tmp_path / "node", keys, cert)
    return {"ca_cert": str(tmp_path / "ca" / "ca.crt"),
            "node_cert": str(tmp_path / "node" / "node.crt"),
            "node_key": str(tmp_path / "node" / "node.key"), "insecure_no_identity": False}


def _cases(tmp_path: Path, base: dict[str, Any]) -> dict[str, tuple[dict[str, Any], str]]:
    """Configurations the agent refuses at start, each with a fragment both refusals name."""
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    bad_ring = tmp_path / "ring-state"
    bad_ring.mkdir()
    (bad_ring / "keyring.json").write_text("{")
    bad_dp = tmp_path / "dp-state"
    bad_dp.mkdir()
    (bad_dp / "datapath.key").write_text("!!\n")
    no_key = {k: v for k, v in base.items() if k != "cluster_key_file"}
    return {
        "no cluster key": (no_key, "no cluster key"),
        "missing key file": ({**base, "cluster_key_file": str(tmp_path / "nope")},
                             str(tmp_path / "nope")),
        "bad key file": ({**base, "cluster_key_file": str(garbage)}, str(garbage)),
        "bad keyring in state_dir": ({**base, "state_dir": str(bad_ring)}, "keyring.json"),
        "no identity": ({**base, "insecure_no_identity": False}, "no identity"),
        "certificate for another node": ({**base, **_ca_files(tmp_path / "o", "other")},
                                         "names node other"),
        "missing CA": ({**base, **_ca_files(tmp_path / "m", "n1"),
                        "ca_cert": str(tmp_path / "no-ca.crt")}, "identity: "),
        "bad datapath key": ({**base, "state_dir": str(bad_dp)}, "datapath key"),
        "state_dir cannot be made": ({**base, "state_dir": str(blocker / "s")}, str(blocker)),
        "membership timings that do not fit": ({**base, "membership": {"probe_timeout": 2.0}},
                                               "probe_timeout must not exceed probe_interval"),
    }


def test_whatever_the_agent_refuses_at_start_check_config_refuses(
        tmp_path: Path, base: dict[str, Any], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Starts from the agent's own start-up checks: each case is shown to be refused by the
    agent with preflight turned off (so by its own code, further in), then by --check-config."""
    for name, (data, fragment) in _cases(tmp_path, base).items():
        # A Config made key by key, without the checks across keys (as a caller might).
        cfg = replace(c.Config(), **{k: c.KEYS[k].parse(k, v) for k, v in data.items()})
        with monkeypatch.context() as m:
            m.setattr(preflight, "check", lambda cfg, skip=(): preflight.Findings())
            with pytest.raises(StartError) as refused:
                asyncio.run(asyncio.wait_for(Agent(cfg).run(), 30))
        assert fragment in str(refused.value), (name, str(refused.value))
        code, errors, _, out = check(capsys, "--config",
                                     str(write_config(tmp_path / f"{len(name)}.toml", data)))
        assert code == 1 and out == "", name
        assert any(fragment in e for e in errors), (name, errors)
        # and the agent, preflight on, refuses it with the first of those lines
        if "membership" not in data:
            with pytest.raises(StartError) as first:
                asyncio.run(asyncio.wait_for(Agent(cfg).run(), 30))
            assert f"meshnetd: {first.value}" == errors[0], name


def test_check_config_creates_nothing(tmp_path: Path, base: dict[str, Any],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "m.toml", base)
    before = sorted(os.listdir(tmp_path))
    assert check(capsys, "--config", str(cfg))[0] == 0
    assert sorted(os.listdir(tmp_path)) == before
