"""meshctl against real agents on 127.0.0.x, as a script uses it: --json after the verb,
MESHNET_SOCKET, `version` and the gossiped agent version, a closed stdout, and a socket this
user may not use."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import MESHCTL, AgentProc, wait_for

import meshnet


def meshctl(*args: str, env: dict[str, str] | None = None,
            prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, MESHCTL, *args], capture_output=True, text=True, timeout=30,
                          env=env)


def env_without_socket(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MESHNET_SOCKET"}
    env.update(extra)
    return env


def test_json_goes_after_the_verb_and_meshnet_socket_names_the_socket(
        agents: Any, key_file: Path) -> None:
    a: AgentProc = agents(key=key_file).start()
    for args in (["--socket", a.socket, "status", "--json"],
                 ["status", "--json", "--socket", a.socket],
                 ["--json", "--socket", a.socket, "status"]):
        r = meshctl(*args, env=env_without_socket())
        assert r.returncode == 0, (args, r.stderr)
        assert json.loads(r.stdout)["name"] == a.name, args
    # the environment names the socket; --socket wins over it
    r = meshctl("status", "--json", env=env_without_socket(MESHNET_SOCKET=a.socket))
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == a.name, r.stderr
    r = meshctl("status", "--socket", a.socket + ".nope",
                env=env_without_socket(MESHNET_SOCKET=a.socket))
    assert r.returncode == 3 and f"{a.socket}.nope" in r.stderr
    r = meshctl("service", "ls", "--json", env=env_without_socket(MESHNET_SOCKET=a.socket))
    assert r.returncode == 1 and r.stdout == ""  # --datapath none: no services, still parsed
    assert "not available" in r.stderr


def test_version_and_the_gossiped_agent_version(agents: Any, key_file: Path) -> None:
    a: AgentProc = agents(key=key_file).start()
    b: AgentProc = agents(key=key_file).start(join=[a.addr])
    assert a.ctl_json("version") == {"client": meshnet.__version__, "agent": meshnet.__version__}
    r = a.ctl("version")
    assert r.returncode == 0
    assert r.stdout.splitlines() == [f"client: {meshnet.__version__}",
                                     f"agent: {meshnet.__version__}"]
    # b's version reached a by gossip, and shows in the table's VERSION column
    wait_for(lambda: a.members().get(b.name, {}).get("version") == meshnet.__version__, 15,
             f"{b.name}'s version in {a.name}'s member list")
    table = a.ctl("members").stdout.splitlines()
    header = table[0].split()
    assert "VERSION" in header, table
    row = next(line.split() for line in table[1:] if line.startswith(b.name))
    assert row[header.index("VERSION")] == meshnet.__version__, table
    # no agent: the client's version alone, exit 3
    r = meshctl("--socket", a.socket + ".nope", "--json", "version")
    assert r.returncode == 3
    assert json.loads(r.stdout) == {"client": meshnet.__version__, "agent": None}


def closed_stdout(*args: str) -> subprocess.CompletedProcess[bytes]:
    """meshctl ARGS writing into a pipe whose reader is already gone."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([MESHCTL, *args], stdout=write, stderr=subprocess.PIPE,
                              timeout=30)
    finally:
        os.close(write)


def test_a_closed_stdout_ends_quietly(agents: Any, key_file: Path) -> None:
    a: AgentProc = agents(key=key_file).start()
    # an event for the stream below to replay: a key installed (not used)
    key = meshctl("keys", "generate").stdout.strip()
    assert meshctl("--socket", a.socket, "keys", "install", key).returncode == 0
    for args in (["--json", "keys", "generate"], ["keys", "generate"],
                 ["--socket", a.socket, "members"], ["--socket", a.socket, "status", "--json"],
                 ["--help"],
                 # a stream: its frames come from the agent's socket, the EPIPE from our stdout
                 ["--socket", a.socket, "events", "--since", "10m"]):
        r = closed_stdout(*args)
        assert r.returncode == 0, (args, r.returncode, r.stderr)
        assert r.stderr == b"", (args, r.stderr)  # no traceback, no "Exception ignored"


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is root's alone), removed after."""
    path = Path(tempfile.mkdtemp(prefix="meshctl-perm-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


NOBODY = ("setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups")


def test_a_socket_this_user_may_not_use_says_so(agents: Any, key_file: Path,
                                                open_dir: Path) -> None:
    a: AgentProc = agents(key=key_file)
    a.socket = str(open_dir / "ctl.sock")
    a.start()
    assert os.stat(a.socket).st_mode & 0o777 == 0o600  # the agent's own mode
    r = meshctl("--socket", a.socket, "status", prefix=NOBODY)
    assert r.returncode == 1 and r.stdout == "", r.stderr
    assert r.stderr.strip() == (f"meshctl: permission denied on {a.socket} "
                                "(run as root, e.g. with sudo)")
    # a group that may write it is named, and its members get in
    os.chown(a.socket, 0, 65534)
    os.chmod(a.socket, 0o660)
    r = meshctl("--socket", a.socket, "status", prefix=("setpriv", "--reuid", "65534",
                                                          "--regid", "0", "--clear-groups"))
    assert r.returncode == 1
    assert f"permission denied on {a.socket} (run as root or a member of group " in r.stderr
    r = meshctl("--socket", a.socket, "--json", "status", prefix=NOBODY)
    assert r.returncode == 0 and json.loads(r.stdout)["name"] == a.name, r.stderr
    # nothing there at all is still "cannot reach", exit 3
    r = meshctl("--socket", str(open_dir / "absent.sock"), "status", prefix=NOBODY)
    assert r.returncode == 3 and "is meshnetd running?" in r.stderr
