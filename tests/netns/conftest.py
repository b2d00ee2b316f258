"""Fixtures for tests that build real hosts as network namespaces (root; CI runs as root).

Each lab gets a prefix of its own (so parallel runs never touch each other's namespaces) and is
always torn down, pass or fail.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshnet.lab import Lab
from meshnet.lab.lab import RUN_BASE
from meshnet.platform import cgroups, nsfd

_counter = itertools.count(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`run_first` tests go first and `run_last` tests last of the whole session: a long wait
    (test_vip_idle.py's 120 s) then overlaps everything else instead of adding to it."""
    first = [i for i in items if i.get_closest_marker("run_first")]
    last = [i for i in items if i.get_closest_marker("run_last")]
    middle = [i for i in items if i not in first and i not in last]
    items[:] = [*first, *middle, *last]

LabFactory = Callable[[], Lab]


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "tests/netns need root to create network namespaces (CI runs them as root); "
            "run them as root or deselect them with -m 'not netns'",
            pytrace=False,
        )


def new_prefix() -> str:
    """mnt + 4 digits of our pid + a 2-digit counter: unique per test, fixed width (so one
    prefix is never another's prefix plus digits), and short (namespace names stay small)."""
    while True:
        prefix = f"mnt{os.getpid() % 10000:04d}{next(_counter) % 100:02d}"
        if not Lab(prefix, RUN_BASE / prefix).is_up():
            return prefix


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    """lab_factory() -> a new, not yet up, Lab with a unique prefix; every one made is downed
    in teardown even when the test failed."""
    require_root()
    made: list[Lab] = []

    def make() -> Lab:
        prefix = new_prefix()
        lab = Lab(prefix, RUN_BASE / prefix)
        made.append(lab)
        return lab

    yield make
    errors = []
    for lab in made:  # shown by pytest only when the test failed
        for s in lab.status():
            log = lab.log_path(s.name)
            if log.exists():
                tail = log.read_text(errors="replace").splitlines()[-40:]
                print(f"--- {lab.prefix} {s.name} meshnetd.log (tail)", *tail, sep="\n")
    for lab in reversed(made):
        try:
            lab.down()
        except Exception as e:  # report every lab that failed, after trying them all
            errors.append(f"{lab.prefix}: {e}")
    if errors:
        pytest.fail("lab teardown failed: " + "; ".join(errors), pytrace=False)


MESHCTL = str(Path(sys.executable).parent / "meshctl")


# Tasks see the host's root file system read-only and nothing of the agent, the lab or the
# tests' temporary files: they run Debian's python3 (a venv may live where tasks can't see it),
# and a test that shares files with a task binds them in (ro_mount).
PY = "python3"
SERVE = [PY, "-m", "http.server", "8080", "--bind", "0.0.0.0", "--directory", "/"]


def ro_mount(path: str | os.PathLike[str]) -> list[str]:
    """meshctl flags that show the host's PATH to a task, read-only, at the same path."""
    return ["--mount", f"type=bind,source={path},target={path},readonly"]


def wait(cond: Callable[[], Any], timeout: float, what: str | Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = cond()
        if last:
            return last
        time.sleep(0.2)
    if callable(what):
        what = what()
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


class Cluster:
    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.procs: list[subprocess.Popen[str]] = []

    # 90 s: above meshctl's own 60 s wait in `service create|scale|rm`, so a wait that times
    # out is meshctl's one-line reason, not a TimeoutExpired here
    def ctl(self, host: str, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return self.lab.ctl(host, list(args), capture_output=True, timeout=timeout)

    def ctl_json(self, host: str, *args: str) -> Any:
        r = self.ctl(host, "--json", *args)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def network(self, name: str, *args: str) -> Any:
        """`network create` on h1, then wait until every host knows it (gossip takes a moment,
        and a `run` on another host before then is rightly refused)."""
        doc = self.ctl_json("h1", "network", "create", name, *args)
        hosts = [s.name for s in self.lab.status()]
        wait(lambda: all(self.ctl(h, "network", "inspect", name).returncode == 0
                         for h in hosts), 20, f"network {name} on every host")
        return doc

    def background(self, host: str, *args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen([MESHCTL, "--socket", str(self.lab.socket_path(host)), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def serve(self, host: str, network: str, name: str, *flags: str) -> str:
        """A long-running HTTP server sandbox (FLAGS go to `run`); returns its IP once it is
        published."""
        self.background(host, "run", "--network", network, "--name", name, *flags, "--",
                        *SERVE)
        return str(wait(lambda: self.endpoint_ip(host, network, name), 20, f"{name} up"))

    def endpoint_ip(self, host: str, network: str, name: str) -> str | None:
        r = self.ctl(host, "--json", "network", "inspect", network)
        if r.returncode != 0:
            return None
        for ep in json.loads(r.stdout)["endpoints"]:
            if ep["name"] == name:
                return str(ep["ip"])
        return None

    def probe(self, host: str, network: str, script: str, *flags: str,
              timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.ctl(host, "run", "--network", network, *flags, "--", "sh", "-c", script,
                        timeout=timeout)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


@pytest.fixture
def cluster(lab_factory: LabFactory) -> Iterator[Callable[[int], Cluster]]:
    made: list[Cluster] = []

    def make(hosts: int, agent_args: tuple[str, ...] = (),
             workers: tuple[str, ...] = ()) -> Cluster:
        lab = lab_factory()
        lab.up(hosts, profile="lan-fast", agent_args=agent_args, workers=workers)
        c = Cluster(lab)
        made.append(c)
        names = [f"h{i}" for i in range(1, hosts + 1)]

        def converged() -> bool:
            for h in names:
                r = c.ctl(h, "--json", "members")
                if r.returncode != 0:
                    return False
                if sorted(m["name"] for m in json.loads(r.stdout) if m["state"] == "alive") \
                        != sorted(names):
                    return False
            return True

        wait(converged, 30, "membership to converge")
        return c

    yield make
    for c in made:
        c.close()


_INJECTORS: dict[tuple[str, str], Any] = {}


def inject_record(lab: Lab, to: str, table: str, key: str, value: dict[str, Any] | None, *,
                  writer: str = "intruder", sign_as: str | None = None,
                  from_host: str = "h1", ahead_s: float = 0.0) -> None:
    """Gossip one store write to TO's agent as a peer holding the cluster key would: a
    membership User message carrying a store delta, sealed with the cluster key, sent from
    inside FROM_HOST's namespace. SIGN_AS: the lab host whose node.key signs it (unsigned if
    None). VALUE None: a delete. AHEAD_S: its HLC that far ahead of now (within the store's
    skew bound), so it is newer than anything written meanwhile."""
    from meshnet import wire
    from meshnet.agent.gossip import Sealer
    from meshnet.crypto.certs import load_node_keys
    from meshnet.crypto.keyring import Keyring
    from meshnet.crypto.trust import RECORD_DOMAIN
    from meshnet.lab.lab import GOSSIP_PORT
    from meshnet.membership.messages import User
    from meshnet.state import Entry, Hlc, codec

    blob = None if value is None else wire.pack(value)
    entry = Entry(table, key, blob, Hlc(int((time.time() + ahead_s) * 1000), 0), writer)
    if sign_as is not None:
        keys = load_node_keys(lab.host_dir(sign_as) / "id" / "node.key")
        sig = keys.sign.sign(RECORD_DOMAIN + b"\0" + codec.signed_bytes(entry))
        entry = Entry(table, key, blob, entry.hlc, writer, sig)
    # One freshness sequence per injector for the whole run: a fresh one per call could repeat
    # an epoch (two calls in the same millisecond) and be dropped as a replay. The keyring is
    # read each time, as a test may rotate it.
    sealer = Sealer(Keyring.from_key_file(lab.key_path), f"{writer}-injector")
    sealer.fresh = _INJECTORS.setdefault((str(lab.key_path), writer), sealer.fresh)
    packet = sealer.seal_datagram(User(codec.encode_delta(entry)).encode())
    send_udp_from(lab.host_ns(from_host), packet, (lab.underlay_ip(to), GOSSIP_PORT))


def task_trees(lab: Lab, host: str) -> dict[str, set[int]]:
    """HOST's agent's task cgroups (named <task>-<hex>) and the processes in each, found the
    way the agent and `lab down` find them."""
    parents = cgroups.find_parents(f"{lab.cgroup_prefix}{host}")
    return {name: cg.pids() for name, cg in cgroups.task_cgroups(parents).items()}


def send_udp_from(ns: str, data: bytes, dst: tuple[str, int]) -> None:
    """Send one raw UDP datagram from inside namespace `ns` (replays, forgeries)."""
    s = nsfd.open_socket_in_netns(ns, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.sendto(data, dst)
    finally:
        s.close()


class UnderlayCapture:
    """tcpdump -w on the lab's underlay switch; packets() parses the pcap (Ethernet frames)."""

    def __init__(self, lab: Lab, path: Path) -> None:
        from meshnet.platform import netns

        self.path = path
        self.proc = subprocess.Popen(
            netns.exec_argv(lab.underlay_ns, ["tcpdump", "-n", "-U", "-s0", "-B", "8192",
                                              "-i", "br0", "-w", str(path)]),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_ready(self) -> None:
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        assert b"listening" in line, line

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def packets(self) -> list[bytes]:
        data = self.path.read_bytes()
        assert struct.unpack_from("<I", data, 0)[0] == 0xA1B2C3D4
        out, off = [], 24
        while off + 16 <= len(data):
            incl = struct.unpack_from("<IIII", data, off)[2]
            out.append(data[off + 16 : off + 16 + incl])
            off += 16 + incl
        return out
