"""platform/cgroups.py and platform/devfilter.py on the real kernel (root): the BPF device filter
on a cgroup v2 directory, a task cgroup with limits on this host's hierarchies, and the sweep
`meshnet-lab down` does. Every cgroup made here is named meshnet-utest-<our pid>-..., and is
removed (its processes killed) pass or fail; so is the one tmpfs mounted."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import require_root

from meshnet.platform import cgroups
from meshnet.platform.cgroups import CPU_PERIOD_US, Cgroups, TaskCgroup, find_parents, sweep
from meshnet.platform.devfilter import attach_device_filter
from meshnet.platform.nsfd import _c

pytestmark = pytest.mark.netns

PREFIX = f"meshnet-utest-{os.getpid()}-"
MiB = 1 << 20
MNT_DETACH = 2
MS_NOSUID = 2


@pytest.fixture(autouse=True)
def _root_and_cleanup() -> Iterator[None]:
    require_root()
    try:
        yield
    finally:
        # Whatever a failed test left: kill its processes, remove its cgroups.
        sweep(find_parents(PREFIX))
    assert find_parents(PREFIX) == []


def v2_mountpoint() -> Path:
    mounts = cgroups.parse_mountinfo(Path("/proc/self/mountinfo").read_text())
    m = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if m is None:
        pytest.skip("no cgroup2 hierarchy mounted here")
    return Path(m.mountpoint)


def rmdir_cgroup(d: Path) -> None:
    if d.exists():
        assert Cgroups([], "").destroy(TaskCgroup(d.name, (d,)), timeout=5), f"{d} stuck"


def mount_tmpfs(where: Path) -> None:
    # Not nodev: device nodes in it work, so only the cgroup's policy can refuse them.
    libc = _c()
    if libc.mount(b"meshnet-utest-devt", str(where).encode(), b"tmpfs", MS_NOSUID,
                  b"size=64k,mode=700") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs at {where}: {os.strerror(err)}")


def umount(where: Path) -> None:
    if _c().umount2(str(where).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {where}: {os.strerror(err)}")


def results(stdout: str) -> dict[str, tuple[int, str]]:
    """Lines "key=status message" -> {key: (status, message)}."""
    out = {}
    for line in stdout.splitlines():
        key, _, rest = line.partition("=")
        status, _, message = rest.partition(" ")
        out[key] = (int(status), message)
    return out


# Joins the cgroup (the shell moves itself: its pid, $$, into cgroup.procs), then tries devices
# in the tmpfs $2, printing "name=exit-status stderr" per step.
DEVICE_SCRIPT = """
echo $$ > "$1/cgroup.procs" || exit 90
out=$(mknod "$2/blk" b 7 0 2>&1); echo "mkblk=$? $out"
out=$(mknod "$2/null" c 1 3 2>&1); echo "mknull=$? $out"
out=$( (echo hello > "$2/null") 2>&1); echo "wnull=$? $out"
out=$(mknod "$2/mem" c 1 1 2>&1); echo "mkmem=$? $out"
out=$( (: < "$2/mem") 2>&1); echo "rmem=$? $out"
"""


def test_device_filter_on_a_real_cgroup(tmp_path: Path) -> None:
    cg = v2_mountpoint() / f"{PREFIX}devt"
    mnt = tmp_path / "devt"
    mnt.mkdir()
    cg.mkdir()
    mounted = False
    try:
        mount_tmpfs(mnt)
        mounted = True
        # Without the filter, this tmpfs takes a block device node: the refusal below is the
        # filter's doing.
        control = subprocess.run(["mknod", str(mnt / "control"), "b", "7", "0"],
                                 capture_output=True, text=True, timeout=10)
        assert control.returncode == 0, control.stderr
        (mnt / "control").unlink()

        attach_device_filter(cg)
        r = subprocess.run(["sh", "-c", DEVICE_SCRIPT, "sh", str(cg), str(mnt)],
                           capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stdout + r.stderr
        got = results(r.stdout)
        assert got["mkblk"][0] != 0 and "Operation not permitted" in got["mkblk"][1], got
        assert not (mnt / "blk").exists()
        assert got["mknull"] == (0, ""), got
        assert got["wnull"] == (0, ""), got
        assert got["mkmem"] == (0, ""), got  # creating a char node is allowed...
        assert got["rmem"][0] != 0 and "Operation not permitted" in got["rmem"][1], got
        # ...and the node is there; only opening it was refused.
        assert (mnt / "mem").is_char_device()
        # The shell has exited: the cgroup is empty again.
        assert (cg / "cgroup.procs").read_text() == ""
    finally:
        try:
            if mounted:
                umount(mnt)
        finally:
            rmdir_cgroup(cg)
            mnt.rmdir()
    assert not cg.exists()
    assert str(mnt) not in Path("/proc/self/mountinfo").read_text()


# Joins every cgroup of the task, tries two devices, then waits to be killed.
JOIN_SCRIPT = """
for f in "$@"; do echo $$ > "$f" || exit 90; done
(echo x > /dev/null) 2>/dev/null; echo "wnull=$?"
out=$(mknod "$TESTDIR/blk" b 7 0 2>&1); echo "mkblk=$? $out"
echo ready
exec sleep 100
"""


def start_task(procs_files: Sequence[str], testdir: Path) -> tuple[subprocess.Popen[str],
                                                                   dict[str, tuple[int, str]]]:
    proc = subprocess.Popen(["sh", "-c", JOIN_SCRIPT, "sh", *procs_files],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                 "TESTDIR": str(testdir)})
    assert proc.stdout is not None
    lines = []
    while (line := proc.stdout.readline()) and line != "ready\n":
        lines.append(line)
    assert line == "ready\n", f"the task did not join its cgroups: {lines}"
    return proc, results("".join(lines))


def stop(proc: subprocess.Popen[str] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
    if proc is not None:
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


def limit_file(cgs: Cgroups, cg: TaskCgroup, res: str, v1_name: str, v2_name: str) -> str:
    h = cgs.carriers[res]
    d = cgs.parents[h.mountpoint] / cg.name
    assert d in cg.dirs
    return (d / (v1_name if h.version == 1 else v2_name)).read_text().strip()


def test_task_cgroup_on_this_hosts_hierarchies(tmp_path: Path) -> None:
    cgs = Cgroups.for_agent(f"{PREFIX}b")
    proc = None
    try:
        cgs.prepare()
        assert {"memory", "pids", "cpu", "devices"} <= set(cgs.carriers), cgs.status()
        parents = list(cgs.parents.values())
        assert parents and all(p.is_dir() and p.name == f"{PREFIX}b" for p in parents)

        cg = cgs.create("t1", memory=64 * MiB, cpus=0.5, pids=20)
        assert cg.name.startswith("t1-")
        assert len(cg.dirs) == len(parents)
        assert all(d.is_dir() for d in cg.dirs)
        assert limit_file(cgs, cg, "memory", "memory.limit_in_bytes", "memory.max") == \
            "67108864"
        assert limit_file(cgs, cg, "pids", "pids.max", "pids.max") == "20"
        if cgs.carriers["cpu"].version == 1:
            assert limit_file(cgs, cg, "cpu", "cpu.cfs_quota_us", "") == "50000"
            assert limit_file(cgs, cg, "cpu", "cpu.cfs_period_us", "") == str(CPU_PERIOD_US)
        else:
            assert limit_file(cgs, cg, "cpu", "", "cpu.max") == "50000 100000"
        if cgs.carriers["memory"].version == 1:
            memsw = cgs.parents[cgs.carriers["memory"].mountpoint] / cg.name / \
                "memory.memsw.limit_in_bytes"
            if memsw.exists():
                assert memsw.read_text().strip() == "67108864"
        if cgs.carriers["devices"].version == 1:
            rules = limit_file(cgs, cg, "devices", "devices.list", "").splitlines()
            assert "a *:* rwm" not in rules
            assert {"c *:* m", "c 1:3 rwm", "c 136:* rwm"} <= set(rules)
            assert not any(r.startswith(("a", "b")) for r in rules)

        assert [(c.name, set(c.dirs)) for c in cgs.leftovers()] == [(cg.name, set(cg.dirs))]

        proc, got = start_task(cg.procs_files(), tmp_path)
        assert cg.pids() == {proc.pid}
        for f in cg.procs_files():
            assert str(proc.pid) in Path(f).read_text().split()
        # The device policy holds inside.
        assert got["wnull"] == (0, ""), got
        assert got["mkblk"][0] != 0 and "Operation not permitted" in got["mkblk"][1], got
        assert not (tmp_path / "blk").exists()

        assert cgs.destroy(cg) is True
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert not any(d.exists() for d in cg.dirs)
        assert cgs.leftovers() == []
        cgs.close()
        assert not any(p.exists() for p in parents)
    finally:
        stop(proc)
        sweep(list(cgs.parents.values()))
        (tmp_path / "blk").unlink(missing_ok=True)


def test_find_parents_and_sweep(tmp_path: Path) -> None:
    name = f"{PREFIX}c"
    cgs = Cgroups.for_agent(name)
    proc = None
    try:
        cgs.prepare()
        cg = cgs.create("t2", pids=10)
        proc, _ = start_task(cg.procs_files(), tmp_path)
        parents = set(cgs.parents.values())

        assert set(find_parents(name)) == parents
        assert parents <= set(find_parents("meshnet-utest-"))
        assert find_parents(f"{PREFIX}nothing") == []

        assert sweep(find_parents(name)) == []
        assert proc.wait(timeout=5) == -signal.SIGKILL
        assert not any(d.exists() for d in cg.dirs)
        assert not any(p.exists() for p in parents)
        assert find_parents(name) == []
    finally:
        stop(proc)
        sweep(list(cgs.parents.values()))
        (tmp_path / "blk").unlink(missing_ok=True)
