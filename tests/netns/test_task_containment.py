"""Tasks are contained like containers (issue 12), tried as a user would in the lab: what a task
sees and may do, its capability and user options, its resource limits, how it stops and what
exit status it reports, and the launcher under the systemd unit's capability bounding set."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import PY, Cluster, require_root, task_trees, wait

from meshnet.cli.meshctl import Client
from meshnet.containment import Containment, Mount, cap_mask, task_hostname
from meshnet.platform import container, netns
from meshnet.platform.cgroups import Cgroups
from meshnet.platform.launch import START_FAILED
from meshnet.platform.sandbox import node_sandboxes, sandbox_ns_name

pytestmark = pytest.mark.netns

DOCKER_CAPEFF = "00000000a80425fb"
UNIT = Path(__file__).resolve().parents[2] / "systemd" / "meshnet.service"


def run(c: Cluster, host: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`meshctl run --network box ARGS...` on HOST."""
    return c.ctl(host, "run", "--network", "box", *args, timeout=timeout)


def ps(c: Cluster, host: str, service: str) -> list[dict[str, Any]]:
    r = c.ctl(host, "--json", "service", "ps", service)
    return json.loads(r.stdout) if r.returncode == 0 else []


@pytest.fixture
def box(cluster: Callable[..., Cluster]) -> Cluster:
    c = cluster(1)
    c.network("box")
    return c


def test_inside_a_task(box: Cluster) -> None:
    c, lab = box, box.lab
    secrets = [lab.host_dir("h1") / "state" / "keyring.json",
               lab.host_dir("h1") / "id" / "node.key", lab.key_path, lab.ca_dir / "ca.key"]
    assert all(p.exists() for p in secrets)  # they are there, on the host
    script = "; ".join([
        "grep CapEff /proc/self/status",
        *(f"cat {p} >/dev/null 2>&1 && echo READ {p}" for p in secrets),
        *(f"ls {p.parent} >/dev/null 2>&1 && echo LISTED {p.parent}" for p in secrets),
        "touch /etc/meshnet-test 2>/dev/null && echo WROTE-ETC",
        "mknod /tmp/blk b 8 0 2>/dev/null && echo MKNOD-BLOCK",
        "mknod /dev/blk b 8 0 2>/dev/null && echo MKNOD-BLOCK-DEV",
        "echo NETNS: $(ip netns list | wc -l) $(ls /run/netns 2>/dev/null | wc -l)",
        "echo HOSTNAME: $(hostname)",
        "echo PID1: $(cat /proc/1/comm)",
        "echo PROCS: $(ls /proc | grep -c '^[0-9]')",
        "echo TMP: $(touch /tmp/x && echo writable)",
        "grep NoNewPrivs /proc/self/status",
        "echo DEV: $(ls -A /dev)",
        # /proc/sys is read-only (domainname is the task's own UTS namespace's: harmless)
        "echo x > /proc/sys/kernel/domainname 2>/dev/null && echo WROTE-PROC-SYS",
        # and so is /sys (its own value written back: harmless if it were not)
        "v=$(cat /sys/kernel/mm/ksm/run); echo $v 2>/dev/null >/sys/kernel/mm/ksm/run"
        " && echo WROTE-SYS",
        # the environment the command was started with (the shell's own, before it adds PWD)
        "echo ENV: $(tr '\\0' '\\n' < /proc/$$/environ | cut -d= -f1 | sort)",
    ])
    r = run(c, "h1", "--name", "probe", "--env", "GREETING=hi", "--", "sh", "-c", script)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert f"CapEff:\t{DOCKER_CAPEFF}" in out, out
    assert "READ" not in out and "LISTED" not in out, out  # no key of the node or the lab
    assert "WROTE-ETC" not in out and "MKNOD-BLOCK" not in out, out
    assert "NETNS: 0 0" in out, out  # nothing of the host's namespaces
    assert "HOSTNAME: probe" in out, out
    assert "PID1: tini" in out, out  # Docker's --init
    procs = int(re.search(r"PROCS: (\d+)", out).group(1))  # type: ignore[union-attr]
    assert procs <= 8, out  # its own /proc: init, sh, the few commands it runs
    assert "TMP: writable" in out, out
    assert "NoNewPrivs:\t1" in out, out
    dev = re.search(r"DEV: (.*)", out).group(1).split()  # type: ignore[union-attr]
    assert sorted(dev) == ["fd", "full", "mqueue", "null", "ptmx", "pts", "random", "shm",
                           "stderr", "stdin", "stdout", "tty", "urandom", "zero"], dev
    assert "WROTE-PROC-SYS" not in out and "WROTE-SYS" not in out, out
    env = re.search(r"ENV: (.*)", out).group(1).split()  # type: ignore[union-attr]
    assert env == sorted(["GREETING", "HOME", "HOSTNAME", "MESHNET_IP", "MESHNET_NETWORK",
                          "MESHNET_NODE", "MESHNET_TASK", "PATH"]), env


# The names of the variables a task's command was started with, comma-separated.
ENV_NAMES = "echo env=$(tr '\\0' '\\n' < /proc/$$/environ | cut -d= -f1 | sort | paste -sd,)"


def test_service_task_identity_and_inspect(box: Cluster) -> None:
    c = box
    r = c.ctl("h1", "service", "create", "web", "--network", "box", "--user", "65534:65534",
              "--cap-drop", "NET_RAW", "--limit-memory", "64M", "--limit-pids", "50", "--",
              "sh", "-c", "hostname; id -u; echo svc=$MESHNET_SERVICE slot=$MESHNET_SLOT; "
              f"{ENV_NAMES}; exec sleep 600")
    assert r.returncode == 0, r.stderr
    wait(lambda: "web.1 | env=" in c.ctl("h1", "service", "logs", "web").stdout, 20,
         "the task's log")
    logs = c.ctl("h1", "service", "logs", "web").stdout
    assert "web.1 | web.1" in logs and "web.1 | 65534" in logs, logs  # hostname, uid
    assert "web.1 | svc=web slot=1" in logs, logs
    env = re.search(r"web\.1 \| env=(.*)", logs).group(1).split(",")  # type: ignore[union-attr]
    assert env == sorted(["HOME", "HOSTNAME", "MESHNET_IP", "MESHNET_NETWORK", "MESHNET_NODE",
                          "MESHNET_SERVICE", "MESHNET_SLOT", "MESHNET_TASK", "PATH"]), env
    doc = c.ctl_json("h1", "service", "inspect", "web")
    want_caps = sorted(Containment(cap_drop=("NET_RAW",)).caps)
    assert doc["containment"]["user"] == "65534:65534"
    assert doc["containment"]["capabilities"] == want_caps
    assert doc["containment"]["limits"] == {"memory": 64 << 20, "pids": 50}
    (task,) = doc["tasks"]
    assert task["task"] == "web.1" and task["user"] == "65534:65534"
    assert task["capabilities"] == want_caps and task["limits"]["pids"] == 50
    (ep,) = c.ctl_json("h1", "network", "inspect", "box")["endpoints"]
    assert ep["user"] == "65534:65534" and ep["limits"] == {"memory": 64 << 20, "pids": 50}
    assert ep["capabilities"] == want_caps, ep
    human = c.ctl("h1", "service", "inspect", "web").stdout
    assert "default-NET_RAW" in human and "memory=64M pids=50" in human, human


def test_a_long_task_name_is_cut_to_one_label(box: Cluster) -> None:
    c = box
    service = "l" * 63  # the longest service name; its task name is 65 long
    r = c.ctl("h1", "service", "create", service, "--network", "box", "--",
              "sh", "-c", "echo host=$(hostname) env=$HOSTNAME; exec sleep 600")
    assert r.returncode == 0, r.stderr
    want = task_hostname(f"{service}.1")
    assert len(want) == 63 and want != f"{service}.1"[:63]  # cut, with a hash suffix
    wait(lambda: "host=" in c.ctl("h1", "service", "logs", service).stdout, 20, "its log")
    logs = c.ctl("h1", "service", "logs", service).stdout
    assert f"host={want} env={want}" in logs, logs


def test_capability_and_user_options(box: Cluster) -> None:
    c = box
    r = run(c, "h1", "--cap-drop", "NET_RAW", "--", "ping", "-c1", "-W1", "127.0.0.1")
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stdout + r.stderr
    r = run(c, "h1", "--", "ping", "-c1", "-W1", "127.0.0.1")
    assert r.returncode == 0, r.stdout + r.stderr  # NET_RAW is in Docker's set
    add = "ip addr add 10.77.0.1/32 dev lo && ip -o addr show lo"
    r = run(c, "h1", "--", "sh", "-c", add)
    assert r.returncode != 0 and "Operation not permitted" in r.stderr, r.stdout + r.stderr
    r = run(c, "h1", "--cap-add", "NET_ADMIN", "--", "sh", "-c", add)
    assert r.returncode == 0 and "10.77.0.1/32" in r.stdout, r.stdout + r.stderr
    r = run(c, "h1", "--user", "65534", "--", "sh", "-c",
            "id -u; id -g; grep CapEff /proc/self/status; touch /tmp/nobody && echo TMP")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:2] == ["65534", "65534"], r.stdout
    assert "CapEff:\t0000000000000000" in r.stdout and "TMP" in r.stdout, r.stdout
    r = run(c, "h1", "--cap-add", "NO_SUCH_CAP", "--", "true")
    assert r.returncode == 1 and "unknown capability" in r.stderr, r.stderr
    r = run(c, "h1", "--user", "no-such-user", "--", "true")
    assert r.returncode == 1 and "no user" in r.stderr, r.stderr


FORK_500 = """
import os, time
started = 0
for _ in range(500):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    started += 1
print("STARTED", started, flush=True)
time.sleep(30)
"""


def test_pid_limit_contains_a_fork_bomb(box: Cluster) -> None:
    c, lab = box, box.lab
    c.serve("h1", "box", "steady")
    p = c.background("h1", "run", "--network", "box", "--name", "bomb", "--limit-pids", "64",
                     "--", PY, "-c", FORK_500)
    assert p.stdout is not None
    line = p.stdout.readline()
    started = int(line.split()[1])
    assert 0 < started <= 64, line  # it forked, and forks failed past the limit
    # Meanwhile the agent answers at once and the host's other task keeps serving.
    t0 = time.monotonic()
    status = next(f for f in Client(str(lab.socket_path("h1"))).call("status", {}, 1.0)
                  if "ok" in f)
    assert status["ok"] and time.monotonic() - t0 < 1.0
    r = c.probe("h1", "box", f"{PY} -c \"import urllib.request as u; "
                "print(u.urlopen('http://steady:8080/', timeout=5).status)\"")
    assert r.stdout.strip() == "200", r.stdout + r.stderr
    p.terminate()
    p.communicate(timeout=20)


def test_memory_limit_kills_and_restarts_the_task_alone(box: Cluster) -> None:
    c = box
    assert c.ctl("h1", "service", "create", "calm", "--network", "box", "--", "sleep",
                 "600").returncode == 0
    hog = f"{PY} -c 'b = bytearray(512 << 20); print(len(b))'"
    # --detach: an OOM-killed task is never running for long, so there is nothing to wait for
    assert c.ctl("h1", "service", "create", "hog", "--network", "box", "--limit-memory",
                 "64M", "--detach", "--", "sh", "-c", hog).returncode == 0
    wait(lambda: any((t.get("restarts") or 0) >= 1 and t.get("exit_code") == 137
                     for t in ps(c, "h1", "hog")), 30,
         lambda: f"hog OOM-killed: {ps(c, 'h1', 'hog')}")
    (calm,) = ps(c, "h1", "calm")
    assert calm["state"] == "running" and (calm.get("restarts") or 0) == 0, calm
    human = c.ctl("h1", "service", "ps", "hog").stdout
    assert "137" in human, human


def test_stop_is_prompt_and_exit_status_is_real(box: Cluster) -> None:
    c, lab = box, box.lab
    # `sleep` has no SIGTERM handler: as PID 1 it would ignore SIGTERM; under tini it stops.
    assert c.ctl("h1", "service", "create", "nap", "--network", "box", "--", "sleep",
                 "600").returncode == 0
    trees = wait(lambda: (t := task_trees(lab, "h1")) and all(len(p) == 2 for p in t.values())
                 and t, 20, "nap running")
    pids = set().union(*trees.values())
    t0 = time.monotonic()
    # --detach: what is timed is the stop itself, not meshctl's wait for the task record to go
    assert c.ctl("h1", "service", "rm", "nap", "--detach").returncode == 0
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() - t0 < 5:
        time.sleep(0.02)
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0, f"sleep took {elapsed:.2f}s to stop on service rm"
    wait(lambda: not task_trees(lab, "h1"), 10, "its cgroup removed")

    # SIGKILL from outside the task: exit 137, and the restart policy applies.
    assert c.ctl("h1", "service", "create", "victim", "--network", "box",
                 "--restart-condition", "none", "--", "sleep", "600").returncode == 0
    trees = wait(lambda: (t := task_trees(lab, "h1")) and all(len(p) == 2 for p in t.values())
                 and t, 20, "victim running")
    (tree,) = trees.values()
    command = next(p for p in tree if Path(f"/proc/{p}/comm").read_text().strip() == "sleep")
    os.kill(command, signal.SIGKILL)
    wait(lambda: [(t["state"], t["exit_code"]) for t in ps(c, "h1", "victim")] ==
         [("failed", 137)], 20, lambda: f"exit 137: {ps(c, 'h1', 'victim')}")
    # A command that cannot be run: tini's 127, the one-line reason on stderr.
    r = run(c, "h1", "--", "no-such-command")
    assert r.returncode == 127 and "no-such-command" in r.stderr, r.stderr


def test_host_paths_outside_the_labs_run_directory_are_hidden(
        cluster: Callable[..., Cluster]) -> None:
    """The lab keeps every agent's files under /run, which no task sees anyway; a host keeps
    them in /var/lib/meshnet and /etc/meshnet. Paths there are covered one by one: here
    --task-hidden-path (the same list as the agent's own state, socket and config directories),
    and the host's password hashes, SSH keys and namespace names."""
    base = Path(f"/var/tmp/meshnet-hidden-{os.getpid()}")
    secret_dir, secret_file, neighbour = base / "state", base / "token", base / "neighbour"
    try:
        secret_dir.mkdir(parents=True)
        (secret_dir / "keyring.json").write_text("SECRET-DIR\n")
        secret_file.write_text("SECRET-FILE\n")
        neighbour.write_text("visible\n")
        c = cluster(1, agent_args=("--task-hidden-path", str(secret_dir),
                                   "--task-hidden-path", str(secret_file)))
        c.network("box")
        host_only = [f for f in ("/etc/shadow", "/etc/gshadow") if os.path.isfile(f)]
        host_dirs = [secret_dir, *(d for d in (Path("/etc/ssh"), Path("/etc/netns"))
                                   if d.is_dir())]
        # they are there, on the host
        assert "/etc/shadow" in host_only and Path("/etc/shadow").read_text()
        assert any(secret_dir.iterdir())
        script = "; ".join([
            f"echo READ: $(cat {secret_dir}/keyring.json {secret_file} {' '.join(host_only)}"
            " 2>/dev/null | wc -c)",
            f"echo LISTED: $(find {' '.join(map(str, host_dirs))} -mindepth 1 | wc -l)",
            f"echo NEIGHBOUR: $(cat {neighbour})",
            "echo PASSWD: $(grep -c ^root: /etc/passwd)",
        ])
        r = run(c, "h1", "--", "sh", "-c", script)
        out = r.stdout
        assert r.returncode == 0, out + r.stderr
        assert "READ: 0" in out and "LISTED: 0" in out, out
        # only the listed paths: their neighbour and the rest of the host's root stay visible
        assert "NEIGHBOUR: visible" in out and "PASSWD: 1" in out, out
        # and never shown through --mount either
        r = run(c, "h1", "--mount", f"type=bind,source={secret_file},target=/run/t", "--",
                "true")
        assert r.returncode == 1 and "never see" in r.stderr, r.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_a_restarted_agent_stops_tasks_of_another_user(box: Cluster) -> None:
    """A task running as nobody, in its own PID namespace, is still found (through its
    cgroup) and stopped by a restarted agent: one process tree per slot, nothing left."""
    c, lab = box, box.lab
    assert c.ctl("h1", "service", "create", "nobody", "--network", "box", "--user", "65534",
                 "--", "sleep", "1000").returncode == 0
    before = wait(lambda: (t := task_trees(lab, "h1")) and all(len(p) == 2 for p in t.values())
                  and t, 20, "nobody.1 running")
    old = set().union(*before.values())
    assert any(Path(f"/proc/{p}/status").read_text().count("\t65534") >= 4 for p in old)
    lab.kill("h1")
    lab.start("h1")
    wait(lambda: not old & set().union(*task_trees(lab, "h1").values()), 20,
         "the restarted agent stops its old task")
    after = wait(lambda: (t := task_trees(lab, "h1")) and all(len(p) == 2 for p in t.values())
                 and t, 30, lambda: f"one tree per slot: {task_trees(lab, 'h1')}")
    assert [n.rsplit("-", 1)[0] for n in after] == ["nobody.1"], after
    assert not any(os.path.exists(f"/proc/{p}") for p in old)
    assert node_sandboxes(lab.sandbox_prefix, "h1") == [
        sandbox_ns_name(lab.sandbox_prefix, "h1", "nobody.1")]
    (tree,) = after.values()
    uids = {Path(f"/proc/{p}/status").read_text().split("Uid:")[1].split()[0] for p in tree}
    assert "65534" in uids, uids  # restarted as the same user


def test_bind_mounts(box: Cluster, tmp_path: Path) -> None:
    c, lab = box, box.lab
    (tmp_path / "note").write_text("shared")
    ro = f"type=bind,source={tmp_path},target=/run/data,readonly"
    r = run(c, "h1", "--mount", ro, "--", "sh", "-c",
            "cat /run/data/note; touch /run/data/x 2>/dev/null && echo WROTE; true")
    assert r.returncode == 0 and r.stdout.strip() == "shared", r.stdout + r.stderr
    rw = f"type=bind,source={tmp_path},target={tmp_path}"
    r = run(c, "h1", "--mount", rw, "--", "sh", "-c", f"echo hi > {tmp_path}/out")
    assert r.returncode == 0 and (tmp_path / "out").read_text() == "hi\n", r.stderr
    # The agent's own paths are never shown, even when asked for.
    state = lab.host_dir("h1") / "state"
    r = run(c, "h1", "--mount", f"type=bind,source={state},target=/run/s", "--", "true")
    assert r.returncode == 1 and "never see" in r.stderr, r.stderr
    r = run(c, "h1", "--mount", "type=bind,source=/,target=/run/host", "--", "true")
    assert r.returncode == 1 and "never see" in r.stderr, r.stderr


# --- the launcher under the systemd unit's bounding set -------------------------------------


def unit_caps() -> list[str]:
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return [c.removeprefix("CAP_").lower() for c in line.split("=", 1)[1].split()]
    raise AssertionError("no CapabilityBoundingSet in the unit")


@pytest.fixture
def bare_netns() -> Iterator[str]:
    require_root()
    name = f"mntl{os.getpid() % 100000}"
    netns.add(name)
    try:
        yield name
    finally:
        netns.delete(name)


def launch_as_unit(ns: str, argv: list[str], containment: Containment,
                   cgroups: Cgroups) -> subprocess.CompletedProcess[str]:
    """Run the launcher exactly as the agent would, but inside the unit's capability bounding
    set and with no_new_privs (NoNewPrivileges=yes)."""
    tools = container.find_tools()
    cg = cgroups.create("unit-test", containment.memory, containment.cpus, containment.pids)
    try:
        user = container.resolve_user(containment.user)
        plan = container.build_plan(
            netns_path=f"/run/netns/{ns}", hostname="unit.1", etc_files={},
            containment=containment, hidden=[], env=container.task_env({}, {}, "unit.1", "/"),
            argv=argv, cgroup_procs=cg.procs_files(), tools=tools, user=user)
        bounding = ",".join(["-all", *(f"+{c}" for c in unit_caps())])
        r = subprocess.run(
            [tools.setpriv, f"--bounding-set={bounding}", "--no-new-privs", "--",
             sys.executable, "-I", "-S", str(container.LAUNCHER)],
            input=container.encode_plan(plan), capture_output=True, timeout=30, check=False)
        return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(),
                                           r.stderr.decode())
    finally:
        cgroups.destroy(cg)


def test_launcher_under_the_units_bounding_set(bare_netns: str) -> None:
    cgroups = Cgroups.for_agent(f"meshnet-unittest-{os.getpid()}")
    cgroups.prepare()
    try:
        caps = "grep -E 'CapEff|CapBnd' /proc/self/status"
        r = launch_as_unit(bare_netns, ["sh", "-c", caps], Containment(), cgroups)
        assert r.returncode == 0, r.stderr
        assert f"CapEff:\t{DOCKER_CAPEFF}" in r.stdout, r.stdout
        r = launch_as_unit(bare_netns, ["sh", "-c", "id -u; ip addr add 10.9.9.9/32 dev lo"],
                           Containment(user="65534", cap_add=("NET_ADMIN",),
                                       pids=32, memory=64 << 20, cpus=0.5), cgroups)
        # --user works under the unit (SETUID/SETGID are in its set); as nobody, NET_ADMIN is
        # in the bounding set but not effective, as in Docker.
        assert r.stdout.split()[0] == "65534", r.stdout + r.stderr
        r = launch_as_unit(bare_netns, ["sh", "-c", "ip addr add 10.9.9.9/32 dev lo && echo OK"],
                           Containment(cap_add=("NET_ADMIN",)), cgroups)
        assert r.returncode == 0 and "OK" in r.stdout, r.stderr
        # A capability past the unit's ceiling is refused with a reason, not dropped silently.
        r = launch_as_unit(bare_netns, ["true"], Containment(cap_add=("SYS_PTRACE",)), cgroups)
        assert r.returncode == START_FAILED and "SYS_PTRACE" in r.stderr, r.stderr
        r = launch_as_unit(bare_netns, ["true"], Containment(
            mounts=(Mount("/usr", "/run/usr", True),)), cgroups)
        assert r.returncode == 0, r.stderr
    finally:
        for cg in cgroups.leftovers():
            cgroups.destroy(cg)
        cgroups.close()
    assert cap_mask(Containment().caps) == int(DOCKER_CAPEFF, 16)
