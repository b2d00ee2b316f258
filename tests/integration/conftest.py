"""Real meshnetd processes on 127.0.0.x, each with its own state dir, socket and log."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent
MESHNETD = str(BIN / "meshnetd")
MESHCTL = str(BIN / "meshctl")


def free_port(ip: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on ip."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((ip, 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((ip, port))
                except OSError:
                    continue
            return port


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


class SessionCa:
    """A cluster CA for one test session; node certificates for any agent name (#13)."""

    def __init__(self, root: Path) -> None:
        from meshnet.crypto.certs import make_ca, save_ca
        self.root = root
        self.key, self.ca = make_ca("test-ca", int(time.time()) - 3 * 86_400, 30)
        save_ca(root / "ca", self.key, self.ca)
        self.ca_cert = root / "ca" / "ca.crt"

    def node_files(self, name: str, out: Path, roles: tuple[str, ...] = ("admin",),
                   days: int = 7) -> list[str]:
        """meshnetd flags naming a fresh certificate and keys for NAME, written to OUT."""
        from meshnet.crypto.certs import generate_node_keys, save_node, sign_node
        keys = generate_node_keys()
        cert = sign_node(self.key, self.ca, name, list(roles), {}, keys.sign_pub, keys.dp_pub,
                         int(time.time()) - 60, days)
        save_node(out, keys, cert, overwrite=True)
        return ["--ca-cert", str(self.ca_cert), "--node-cert", str(out / "node.crt"),
                "--node-key", str(out / "node.key")]


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> SessionCa:
    return SessionCa(tmp_path_factory.mktemp("pki"))


class AgentProc:
    def __init__(self, root: Path, name: str, ip: str, key_file: Path | None,
                 extra: list[str] | None = None, ca: SessionCa | None = None) -> None:
        self.name = name
        self.ip = ip
        self.port = free_port(ip)
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.dir / "state"
        self.socket = str(self.dir / "ctl.sock")
        self.log = self.dir / "meshnetd.log"
        self.key_file = key_file
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        # Its certificate and keys (made once; a restart keeps them, as a real node's would).
        self.identity = ca.node_files(name, self.dir / "id") if ca is not None else [
            "--insecure-no-identity"]

    @property
    def addr(self) -> str:
        return f"{self.ip}:{self.port}"

    def args(self, join: list[str] | None = None) -> list[str]:
        a = [MESHNETD, "--name", self.name, "--bind", self.addr, "--state-dir",
             str(self.state_dir), "--socket", self.socket, "--profile", "lan-fast",
             "--datapath", "none", "--dns-upstream", "none",
             "--log-format", "json", "--log-level", "debug"]
        a += ["--cluster-key-file", str(self.key_file)] if self.key_file else [
            "--insecure-no-encryption"]
        for j in join or []:
            a += ["--join", j]
        return a + self.identity + self.extra

    def start(self, join: list[str] | None = None, wait: bool = True,
              env: dict[str, str] | None = None) -> AgentProc:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args(join), stdout=log, stderr=log,
                                         start_new_session=True, env=env)
        if wait:
            wait_for(lambda: self.ctl("status").returncode == 0 or self.exited(), 15,
                     f"{self.name} to serve")
            assert not self.exited(), self.log.read_text()[-3000:]
        return self

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def ctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([MESHCTL, "--socket", self.socket, *args],
                              capture_output=True, text=True, timeout=timeout)

    def ctl_json(self, *args: str) -> Any:
        r = self.ctl("--json", *args)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def members(self) -> dict[str, dict[str, Any]]:
        r = self.ctl("--json", "members")
        if r.returncode != 0:
            return {}
        return {m["name"]: m for m in json.loads(r.stdout)}

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    from meshnet.crypto.keyring import generate_key
    path = tmp_path / "cluster.key"
    path.write_text(generate_key() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def agents(tmp_path: Path, test_ca: SessionCa) -> Iterator[Callable[..., AgentProc]]:
    """Factory for agents, each with a certificate from the session's CA (identity=False: none,
    with --insecure-no-identity); every process is killed at teardown, pass or fail."""
    made: list[AgentProc] = []
    counter = iter(range(2, 250))

    def make(name: str | None = None, key: Path | None = None, extra: list[str] | None = None,
             ip: str | None = None, identity: bool = True) -> AgentProc:
        n = next(counter)
        agent = AgentProc(tmp_path, name or f"n{n}", ip or f"127.0.0.{n}", key, extra,
                          test_ca if identity else None)
        made.append(agent)
        return agent

    yield make
    for a in made:
        a.kill9()
