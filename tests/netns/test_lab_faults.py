"""The lab's fault primitives (the chaos runner's verbs): each does what it says, and `down`
after it leaves nothing behind (no namespace, no mount, no process)."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from conftest import Cluster, send_udp_from, task_trees, wait

from meshnet.lab import Lab, LabError
from meshnet.platform import netns, nsfd
from meshnet.platform.sandbox import processes_with_env

pytestmark = pytest.mark.netns

LabFactory = Callable[[], Lab]


def state_of(lab: Lab, viewer: str, host: str) -> str | None:
    r = lab.ctl(viewer, ["--json", "members"], capture_output=True, timeout=20)
    if r.returncode != 0:
        return None
    return {m["name"]: m["state"] for m in json.loads(r.stdout)}.get(host)


def assert_nothing_left(lab: Lab, pids: Sequence[int] = ()) -> None:
    lab.down()
    assert not [n for n in netns.list_netns() if n.startswith(f"{lab.prefix}-")]
    assert str(lab.run_dir) not in Path("/proc/self/mountinfo").read_text()
    assert not processes_with_env(f"MESHNET_LAB={lab.prefix}")
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in \
            Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0], pid
    assert not lab.run_dir.exists()


def link_state(lab: Lab, host: str) -> str:
    r = netns.ip("-j", "link", "show", host, ns=lab.underlay_ns)
    return str(json.loads(r.stdout)[0]["operstate"])


def test_link_down_makes_the_host_dead_to_the_others_and_up_brings_it_back(
        cluster: Callable[[int], Cluster]) -> None:
    lab = cluster(3).lab
    lab.link("h3", False)
    lab.link("h3", False)  # idempotent
    assert link_state(lab, "h3") == "DOWN"
    wait(lambda: state_of(lab, "h1", "h3") in ("suspect", "dead"), 30, "h1 to suspect h3")
    lab.link("h3", True)
    assert link_state(lab, "h3") != "DOWN"
    wait(lambda: state_of(lab, "h1", "h3") == "alive" and state_of(lab, "h3", "h1") == "alive",
         30, "h3 alive again")
    with pytest.raises(LabError, match="no host"):
        lab.link("h9", False)
    lab.link("h2", False)  # down undoes it (with the namespaces)
    assert_nothing_left(lab)


def test_block_drops_one_way_only(lab_factory: LabFactory) -> None:
    lab = lab_factory()
    lab.up(3, start_agents=False)
    ip1, ip2 = lab.underlay_ip("h1"), lab.underlay_ip("h2")
    rx1 = nsfd.open_socket_in_netns(lab.host_ns("h1"), bind_addr=(ip1, 9999))
    rx2 = nsfd.open_socket_in_netns(lab.host_ns("h2"), bind_addr=(ip2, 9999))
    for s in (rx1, rx2):
        s.settimeout(0.5)

    def gets(rx: socket.socket, src: str, dst: str) -> bool:
        send_udp_from(lab.host_ns(src), b"hello", (lab.underlay_ip(dst), 9999))
        try:
            return rx.recv(100) == b"hello"
        except TimeoutError:
            return False

    try:
        assert gets(rx2, "h1", "h2") and gets(rx1, "h2", "h1")
        lab.block("h1", "h2")
        lab.block("h1", "h2")  # idempotent
        lab.block("h3", "h2")  # blocks add up
        assert not gets(rx2, "h1", "h2") and not gets(rx2, "h3", "h2")
        assert gets(rx1, "h2", "h1")  # the other way still works
        lab.unblock("h3", "h2")
        assert gets(rx2, "h3", "h2") and not gets(rx2, "h1", "h2")
        with pytest.raises(LabError, match="two different hosts"):
            lab.block("h1", "h1")
        lab.heal()  # clears blocks as well as the partition
        assert gets(rx2, "h1", "h2")
        lab.block("h2", "h1")
    finally:
        rx1.close()
        rx2.close()
    assert_nothing_left(lab)


def test_pause_resume_and_down_on_a_paused_agent(cluster: Callable[[int], Cluster]) -> None:
    lab = cluster(3).lab
    pid = next(s.pid for s in lab.status() if s.name == "h3")
    assert pid is not None
    lab.pause("h3")
    lab.pause("h3")  # idempotent
    assert lab.paused("h3")
    assert Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "T"
    wait(lambda: state_of(lab, "h1", "h3") in ("suspect", "dead"), 30, "h1 to suspect h3")
    lab.resume("h3")
    assert not lab.paused("h3")
    wait(lambda: state_of(lab, "h1", "h3") == "alive", 30, "h3 alive again")
    lab.pause("h2")
    lab.kill("h2")  # kill works on a paused agent
    lab.start("h2")
    lab.pause("h1")
    lab.pause("h3")
    pids = [s.pid for s in lab.status() if s.pid]
    assert_nothing_left(lab, pids)  # down SIGCONTs before SIGTERM; nothing survives


def test_crash_kills_agent_and_tasks_and_takes_the_link_down(
        cluster: Callable[[int], Cluster]) -> None:
    c = cluster(3)
    lab = c.lab
    c.network("n")
    c.background("h2", "run", "--network", "n", "--name", "sleeper", "--", "sleep", "600")
    trees = wait(lambda: {n: p for n, p in task_trees(lab, "h2").items() if p}, 30,
                 "the task's processes on h2")
    task_pids = [p for ps in trees.values() for p in ps]
    agent = next(s.pid for s in lab.status() if s.name == "h2")
    lab.crash("h2")
    assert not any(s.running for s in lab.status() if s.name == "h2")
    for pid in [agent, *task_pids]:
        assert pid is not None
        wait(lambda pid=pid: not Path(f"/proc/{pid}").exists()  # type: ignore[misc]
             or Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z",
             5, f"pid {pid} gone")
    assert link_state(lab, "h2") == "DOWN"
    assert not task_trees(lab, "h2")
    lab.crash("h2")  # idempotent
    wait(lambda: state_of(lab, "h1", "h2") in ("suspect", "dead"), 30, "h1 to suspect h2")
    lab.recover("h2")
    assert link_state(lab, "h2") != "DOWN"
    wait(lambda: state_of(lab, "h1", "h2") == "alive" and state_of(lab, "h2", "h3") == "alive",
         30, "h2 alive again")
    lab.crash("h3")  # down after a crash leaves nothing either
    assert_nothing_left(lab)


def test_state_tmpfs_needs_a_stopped_agent_and_down_unmounts_it(
        lab_factory: LabFactory) -> None:
    lab = lab_factory()
    lab.up(3, tmpfs_state={"h2": 1 << 20})
    state2 = lab.state_dir("h2")
    assert str(state2) in Path("/proc/self/mountinfo").read_text()
    with pytest.raises(LabError, match="is running"):
        lab.state_tmpfs("h1", 1 << 20)
    before = (lab.state_dir("h1") / "node.json").read_bytes()
    lab.kill("h1")
    lab.state_tmpfs("h1", 1 << 20)  # what was there is copied in
    assert (lab.state_dir("h1") / "node.json").read_bytes() == before
    with pytest.raises(LabError, match="already"):
        lab.state_tmpfs("h1", 1 << 20)
    lab.start("h1")
    assert lab.fill_state("h1") > 0
    with pytest.raises(LabError, match="not a tmpfs"):
        lab.fill_state("h3")
    lab.free_state("h1")
    r = subprocess.run(["df", "--output=avail", str(lab.state_dir("h1"))],
                       capture_output=True, text=True, check=True)
    assert int(r.stdout.split()[-1]) > 0
    lab.fill_state("h2")
    assert_nothing_left(lab)
