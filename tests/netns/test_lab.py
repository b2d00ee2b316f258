"""meshnet-lab: namespaces, underlay, faults and cleanup, on real network namespaces (root)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from meshnet.lab import Lab, LabError
from meshnet.platform import netns

pytestmark = pytest.mark.netns

LabFactory = Callable[[], Lab]  # the lab_factory fixture (tests/netns/conftest.py)

LAB_CLI = str(Path(sys.executable).parent / "meshnet-lab")


def snapshot() -> tuple[list[str], list[str]]:
    """Named namespaces and the root namespace's links, as `ip` prints them."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True)
    return sorted(ns.stdout.splitlines()), sorted(links.stdout.splitlines())


def ours(lab: Lab) -> list[str]:
    return [n for n in netns.list_netns() if n.startswith(f"{lab.prefix}-")]


def ping(lab: Lab, src: str, dst: str) -> bool:
    r = lab.exec(src, ["ping", "-c1", "-W1", "-n", lab.underlay_ip(dst)], capture_output=True)
    return r.returncode == 0


def test_down_after_up_restores_namespaces_and_links(lab_factory: LabFactory) -> None:
    before = snapshot()
    lab = lab_factory()
    lab.up(3, start_agents=False)
    assert sorted(ours(lab)) == sorted(
        [f"{lab.prefix}-underlay", f"{lab.prefix}-h1", f"{lab.prefix}-h2", f"{lab.prefix}-h3"]
    )
    assert snapshot()[1] == before[1], "the lab must create nothing in the root namespace"
    with pytest.raises(LabError, match="already up"):
        lab.up(2, start_agents=False)
    lab.down()
    assert snapshot() == before
    assert not lab.run_dir.exists()
    lab.down()  # idempotent


def test_down_from_a_new_instance_after_a_crash(lab_factory: LabFactory) -> None:
    before = snapshot()
    lab = lab_factory()
    lab.up(2, start_agents=False)
    lab_ns = lab.host_ns("h2")
    # A process living in a host namespace that the lab never recorded (like a task an agent
    # started) must go too, or the namespace would outlive `ip netns del`.
    stray = subprocess.Popen(
        netns.exec_argv(lab.host_ns("h2"), ["sleep", "300"]), start_new_session=True
    )
    try:
        deadline = time.monotonic() + 5
        while stray.pid not in netns.pids(lab.host_ns("h2")):
            assert time.monotonic() < deadline, "stray process never entered the namespace"
            time.sleep(0.02)
        prefix, run_dir = lab.prefix, lab.run_dir
        del lab  # the lab "crashed": only its records under run_dir remain
        Lab(prefix, run_dir).down()
        stray.wait(timeout=5)  # sleep 300 ends this soon only if down killed it
        assert stray.pid not in netns.pids(lab_ns)
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
    assert snapshot() == before


def test_down_sweeps_by_prefix_without_a_manifest(lab_factory: LabFactory) -> None:
    before = snapshot()
    lab = lab_factory()
    lab.up(2, start_agents=False)
    # A sandbox whose namespace died with its agent's mount namespace leaves only this.
    orphan = Path("/etc/netns") / f"{lab.prefix}-s-0123abcd-gone.1-0123456789ab"
    stranger = Path("/etc/netns") / f"{lab.prefix}x-s-keep"  # another lab's prefix
    orphan.mkdir(parents=True)
    (orphan / "resolv.conf").write_text("nameserver 127.0.0.11\n")
    stranger.mkdir()
    lab.manifest_path.write_text("{")  # torn or lost records
    with pytest.raises(LabError, match="corrupt"):
        lab.status()
    lab.manifest_path.unlink()
    assert lab.is_up()
    with pytest.raises(LabError, match="already up"):
        lab.up(2, start_agents=False)
    lab.manifest_path.write_text("{")
    try:
        Lab(lab.prefix, lab.run_dir).down()
        assert ours(lab) == []
        assert snapshot() == before
        assert not orphan.exists()
        assert stranger.is_dir()
    finally:
        stranger.rmdir()


def test_exec_runs_in_the_host_namespace_and_hosts_reach_each_other(
    lab_factory: LabFactory,
) -> None:
    lab = lab_factory()
    lab.up(3, start_agents=False)
    for h in ("h1", "h2", "h3"):
        r = lab.exec(h, ["ip", "-o", "-4", "addr", "show", "dev", "eth0"], capture_output=True)
        assert r.returncode == 0, r.stderr
        assert f"inet {lab.underlay_ip(h)}/24" in r.stdout
        mtu = lab.exec(h, ["cat", "/sys/class/net/eth0/mtu"], capture_output=True)
        assert mtu.stdout.strip() == "1500"
    assert lab.exec("h1", ["sh", "-c", "exit 7"]).returncode == 7
    for src in ("h1", "h2", "h3"):
        for dst in ("h1", "h2", "h3"):
            if src != dst:
                assert ping(lab, src, dst), f"{src} cannot ping {dst}"
    st = lab.status()
    assert [s.name for s in st] == ["h1", "h2", "h3"]
    assert [s.underlay_ip for s in st] == ["10.99.0.1", "10.99.0.2", "10.99.0.3"]
    assert not any(s.running for s in st)


def test_partition_and_heal(lab_factory: LabFactory) -> None:
    lab = lab_factory()
    lab.up(3, start_agents=False)
    lab.partition([["h1", "h2"], ["h3"]])
    assert ping(lab, "h1", "h2")
    assert not ping(lab, "h1", "h3")
    assert not ping(lab, "h3", "h2")
    with pytest.raises(LabError, match="more than one group"):
        lab.partition([["h1", "h2"], ["h2", "h3"]])
    lab.heal()
    assert ping(lab, "h1", "h3")
    assert ping(lab, "h3", "h2")


def test_loss(lab_factory: LabFactory) -> None:
    lab = lab_factory()
    lab.up(2, start_agents=False)
    lab.loss("h2", 100)
    assert not ping(lab, "h1", "h2")
    lab.loss("h2", 30)  # random drop is in place (its effect is for benchmarks to measure)
    r = lab.exec("h2", ["nft", "list", "table", "inet", "meshnet_lab"], capture_output=True)
    assert "numgen random mod 100 < 30" in r.stdout
    lab.loss("h2", 0)
    assert ping(lab, "h1", "h2")
    r = lab.exec("h2", ["nft", "list", "tables"], capture_output=True)
    assert "meshnet_lab" not in r.stdout


def test_cli(lab_factory: LabFactory) -> None:
    lab = lab_factory()
    base = [LAB_CLI, "--prefix", lab.prefix, "--run-dir", str(lab.run_dir)]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=60)

    r = cli("up", "--hosts", "2", "--no-agents")
    assert r.returncode == 0, r.stderr
    r = cli("up")
    assert r.returncode == 1
    assert r.stderr.startswith("meshnet-lab: ") and "already up" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = cli("status", "--json")
    assert r.returncode == 0, r.stderr
    hosts = json.loads(r.stdout)["hosts"]
    assert [(h["name"], h["underlay_ip"], h["running"]) for h in hosts] == [
        ("h1", "10.99.0.1", False),
        ("h2", "10.99.0.2", False),
    ]
    assert {"name", "underlay_ip", "running", "socket", "pid", "namespace"} <= set(hosts[0])
    r = cli("exec", "h2", "--", "ip", "-o", "-4", "addr", "show", "dev", "eth0")
    assert r.returncode == 0 and "10.99.0.2/24" in r.stdout
    assert cli("exec", "h1", "--", "sh", "-c", "exit 3").returncode == 3
    assert cli("exec", "h9", "--", "true").returncode == 1
    assert cli("loss", "h1", "101").returncode == 2
    assert cli("partition", "h1", "h2").returncode == 0
    assert cli("heal").returncode == 0
    r = cli("down")
    assert r.returncode == 0, r.stderr
    assert ours(lab) == []
    assert cli("down").returncode == 0


def test_agents_run_and_kill_start(lab_factory: LabFactory) -> None:
    """Needs the real meshnetd: every host's agent runs, owns its socket, and survives
    kill/start."""
    lab = lab_factory()
    failed = None
    try:
        lab.up(3, start_agents=True)
    except LabError as e:
        failed = str(e)
    if failed is not None:
        pytest.fail(f"agents did not start: {failed}", pytrace=False)

    def by_name() -> dict[str, bool]:
        return {s.name: s.running and Path(s.socket).exists() for s in lab.status()}

    assert by_name() == {"h1": True, "h2": True, "h3": True}
    for s in lab.status():
        assert s.pid is not None
        # The agent lives in its host's namespace.
        assert s.pid in netns.pids(s.namespace)
        assert os.readlink(f"/proc/{s.pid}/ns/net") != os.readlink("/proc/self/ns/net")

    lab.kill("h2")
    st = {s.name: s for s in lab.status()}
    assert not st["h2"].running and st["h2"].pid is None
    assert st["h1"].running and st["h3"].running
    with pytest.raises(LabError, match="not running"):
        lab.kill("h2")

    lab.start("h2")
    assert by_name() == {"h1": True, "h2": True, "h3": True}
    with pytest.raises(LabError, match="already running"):
        lab.start("h2")
