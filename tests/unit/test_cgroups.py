"""platform/cgroups.py without a kernel: the /proc parsers on fixed texts, and Cgroups on a fake
cgroupfs in tmp_path.

The fake is a Path subclass: `mkdir` makes the directory and then, as the kernel does on a real
cgroupfs, the hierarchy's interface files inside it (empty, so each single write(2) leaves
exactly the value written); `rmdir` removes them again. Every write Cgroups makes goes through
cgroups._write, which the `writes` fixture records (devices.allow takes several writes).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path, PosixPath

import pytest

from meshnet.platform import cgroups, devfilter
from meshnet.platform.cgroups import (
    AGENT_LEAF,
    CPU_PERIOD_US,
    DEVICE_RULES,
    CgroupError,
    Cgroups,
    Hierarchy,
    Mount,
    TaskCgroup,
    discover,
    mount_plan,
    parse_mountinfo,
    parse_proc_cgroup,
)
from meshnet.platform.nsfd import PlatformError

MiB = 1 << 20

# --- /proc texts -------------------------------------------------------------------------------

# This machine: every v1 controller mounted alone, cgroup2 at unified (hybrid), cgroupfs on a
# private tmpfs; our memory cgroup is a child of the root.
HYBRID_MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
45 27 254:0 /run/netns /run/netns rw,relatime shared:1 - ext4 /dev/vda rw,discard
"""
HYBRID_CGROUP = """\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/9283398b87364a63770a8b3559ae8305
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
"""

# systemd's hybrid layout (Debian 10, Ubuntu 20.04): co-mounted cpu,cpuacct and net_cls,net_prio,
# the service in its unit's cgroup; and rdma, which is in /proc/self/cgroup but not mounted.
SYSTEMD_HYBRID_MOUNTINFO = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 25 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:8 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 \
rw,nsdelegate
28 26 0:26 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:10 - cgroup cgroup \
rw,xattr,name=systemd
31 26 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:13 - cgroup \
cgroup rw,cpu,cpuacct
32 26 0:30 / /sys/fs/cgroup/net_cls,net_prio rw,nosuid,nodev,noexec,relatime shared:14 - \
cgroup cgroup rw,net_cls,net_prio
33 26 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup \
rw,memory
34 26 0:32 / /sys/fs/cgroup/devices rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup \
rw,devices
35 26 0:33 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:17 - cgroup cgroup \
rw,pids
"""
SYSTEMD_HYBRID_CGROUP = """\
12:rdma:/
11:pids:/system.slice/meshnet.service
10:devices:/system.slice/meshnet.service
9:memory:/system.slice/meshnet.service
5:net_cls,net_prio:/
4:cpu,cpuacct:/system.slice/meshnet.service
1:name=systemd:/system.slice/meshnet.service
0::/system.slice/meshnet.service
"""

# Pure cgroup v2 (systemd >= 247 defaults): one hierarchy at /sys/fs/cgroup.
V2_MOUNTINFO = """\
24 29 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
29 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 \
rw,nsdelegate,memory_recursiveprot
36 24 0:31 / /sys/fs/pstore rw,nosuid,nodev,noexec,relatime shared:10 - pstore pstore rw
"""
V2_CGROUP = "0::/system.slice/meshnet.service\n"


def test_parse_mountinfo_fields() -> None:
    mounts = parse_mountinfo(HYBRID_MOUNTINFO)
    assert len(mounts) == 15
    by_point = {m.mountpoint: m for m in mounts}
    assert by_point["/sys/fs/cgroup/memory"] == Mount(
        "/sys/fs/cgroup/memory", "/", "cgroup", frozenset({"rw", "memory"}))
    assert by_point["/sys/fs/cgroup/unified"].fstype == "cgroup2"
    assert by_point["/run/netns"].root == "/run/netns"
    # Optional fields (shared:N) do not shift the ones after the separator.
    sys_mount = parse_mountinfo(SYSTEMD_HYBRID_MOUNTINFO)[0]
    assert (sys_mount.mountpoint, sys_mount.fstype) == ("/sys", "sysfs")
    cpu = next(m for m in parse_mountinfo(SYSTEMD_HYBRID_MOUNTINFO)
               if m.mountpoint == "/sys/fs/cgroup/cpu,cpuacct")
    assert cpu.options == frozenset({"rw", "cpu", "cpuacct"})


def test_parse_mountinfo_unescapes_octal() -> None:
    text = ("50 27 0:40 /a\\040b /mnt/my\\040cgroups rw,relatime - cgroup2 cgroup2 rw\n"
            "51 27 0:41 / /mnt/tab\\011and\\134back rw - tmpfs none rw\n")
    first, second = parse_mountinfo(text)
    assert first.mountpoint == "/mnt/my cgroups"
    assert first.root == "/a b"
    assert second.mountpoint == "/mnt/tab\tand\\back"


def test_parse_mountinfo_skips_malformed_lines() -> None:
    text = ("\n"
            "garbage\n"
            "1 2 3 / /x rw\n"                        # no separator
            "1 2 - / /x rw cgroup\n"                 # separator too early
            "1 2 3 / /x rw - cgroup\n"               # nothing after the fstype
            "41 31 0:38 / /ok rw,relatime - cgroup2 cgroup2 rw\n")
    assert [m.mountpoint for m in parse_mountinfo(text)] == ["/ok"]


def test_parse_proc_cgroup() -> None:
    assert parse_proc_cgroup(SYSTEMD_HYBRID_CGROUP) == [
        (12, frozenset({"rdma"}), "/"),
        (11, frozenset({"pids"}), "/system.slice/meshnet.service"),
        (10, frozenset({"devices"}), "/system.slice/meshnet.service"),
        (9, frozenset({"memory"}), "/system.slice/meshnet.service"),
        (5, frozenset({"net_cls", "net_prio"}), "/"),
        (4, frozenset({"cpu", "cpuacct"}), "/system.slice/meshnet.service"),
        (1, frozenset({"name=systemd"}), "/system.slice/meshnet.service"),
        (0, frozenset(), "/system.slice/meshnet.service"),
    ]
    # A path may itself hold colons; junk lines are skipped.
    assert parse_proc_cgroup("1:name=systemd:/a:b\nx:cpu:/\n3\n4:cpu\n\n") == [
        (1, frozenset({"name=systemd"}), "/a:b")]


def test_discover_hybrid() -> None:
    found = discover(HYBRID_MOUNTINFO, HYBRID_CGROUP)
    by_ctrl = {(h.version, tuple(sorted(h.controllers))): h for h in found}
    assert len(found) == 10
    memory = by_ctrl[(1, ("memory",))]
    assert memory == Hierarchy(Path("/sys/fs/cgroup/memory"), "/", 1, frozenset({"memory"}),
                               "/process_api/9283398b87364a63770a8b3559ae8305")
    assert memory.dir(memory.own) == \
        Path("/sys/fs/cgroup/memory/process_api/9283398b87364a63770a8b3559ae8305")
    assert by_ctrl[(1, ("pids",))].mountpoint == Path("/sys/fs/cgroup/pids")
    assert by_ctrl[(1, ("name=systemd",))].mountpoint == Path("/sys/fs/cgroup/systemd")
    v2 = by_ctrl[(2, ())]
    assert v2 == Hierarchy(Path("/sys/fs/cgroup/unified"), "/", 2, frozenset(), "/")
    assert v2.dir("/") == Path("/sys/fs/cgroup/unified")


def test_discover_systemd_hybrid() -> None:
    found = discover(SYSTEMD_HYBRID_MOUNTINFO, SYSTEMD_HYBRID_CGROUP)
    # rdma is in /proc/self/cgroup but not mounted: left out.
    assert sorted((h.version, ",".join(sorted(h.controllers)), str(h.mountpoint))
                  for h in found) == [
        (1, "cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct"),
        (1, "devices", "/sys/fs/cgroup/devices"),
        (1, "memory", "/sys/fs/cgroup/memory"),
        (1, "name=systemd", "/sys/fs/cgroup/systemd"),
        (1, "net_cls,net_prio", "/sys/fs/cgroup/net_cls,net_prio"),
        (1, "pids", "/sys/fs/cgroup/pids"),
        (2, "", "/sys/fs/cgroup/unified"),
    ]
    cpu = next(h for h in found if "cpu" in h.controllers)
    assert cpu.dir(cpu.own) == Path("/sys/fs/cgroup/cpu,cpuacct/system.slice/meshnet.service")


def test_discover_pure_v2() -> None:
    (v2,) = discover(V2_MOUNTINFO, V2_CGROUP)
    assert v2 == Hierarchy(Path("/sys/fs/cgroup"), "/", 2, frozenset(),
                           "/system.slice/meshnet.service")
    assert v2.dir(v2.own) == Path("/sys/fs/cgroup/system.slice/meshnet.service")


def test_discover_escaped_mountpoint() -> None:
    mountinfo = "50 27 0:40 / /run/my\\040cgroup rw,relatime - cgroup2 cgroup2 rw\n"
    (v2,) = discover(mountinfo, "0::/lab/h1\n")
    assert v2.mountpoint == Path("/run/my cgroup")
    assert v2.dir("/lab/h1") == Path("/run/my cgroup/lab/h1")


def test_discover_nothing_mounted() -> None:
    # `ip netns exec` gives a fresh sysfs without cgroupfs.
    mountinfo = "23 27 0:22 / /sys rw,relatime - sysfs sysfs rw\n"
    assert discover(mountinfo, HYBRID_CGROUP) == []
    assert discover(mountinfo, V2_CGROUP) == []


def test_hierarchy_dir_of_a_bind_mounted_subtree() -> None:
    # A container's view: the hierarchy's /docker/abc mounted at /sys/fs/cgroup/memory.
    mountinfo = ("60 50 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid - cgroup cgroup "
                 "rw,memory\n")
    (h,) = discover(mountinfo, "4:memory:/docker/abc/task\n")
    assert h.mount_root == "/docker/abc"
    assert h.dir("/docker/abc") == Path("/sys/fs/cgroup/memory")
    assert h.dir("/docker/abc/task") == Path("/sys/fs/cgroup/memory/task")
    assert h.dir("/docker/abcd") is None
    assert h.dir("/") is None
    assert h.dir("/other") is None


def test_mount_plan_hybrid() -> None:
    assert mount_plan(SYSTEMD_HYBRID_CGROUP) == [
        ("cgroup", "rdma", "/sys/fs/cgroup/rdma"),
        ("cgroup", "pids", "/sys/fs/cgroup/pids"),
        ("cgroup", "devices", "/sys/fs/cgroup/devices"),
        ("cgroup", "memory", "/sys/fs/cgroup/memory"),
        ("cgroup", "net_cls,net_prio", "/sys/fs/cgroup/net_cls,net_prio"),
        ("cgroup", "cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct"),
        ("cgroup2", "", "/sys/fs/cgroup/unified"),
    ]
    plan = mount_plan(HYBRID_CGROUP)
    assert ("cgroup", "memory", "/sys/fs/cgroup/memory") in plan
    assert not any("systemd" in opts for _, opts, _ in plan)
    assert plan[-1] == ("cgroup2", "", "/sys/fs/cgroup/unified")


def test_mount_plan_pure_v2() -> None:
    assert mount_plan(V2_CGROUP) == [("cgroup2", "", "/sys/fs/cgroup")]
    assert mount_plan("") == []


def test_propagates() -> None:
    # The mount holding the path decides: the longest mount point that contains it.
    assert cgroups._propagates("/sys/fs/cgroup", V2_MOUNTINFO)
    assert not cgroups._propagates("/sys/fs/cgroup", HYBRID_MOUNTINFO)
    assert cgroups._propagates("/run/netns/x", HYBRID_MOUNTINFO)
    assert not cgroups._propagates("/run/netnsx", HYBRID_MOUNTINFO)


# --- a fake cgroupfs -----------------------------------------------------------------------------

V1_FILES: dict[str, tuple[str, ...]] = {
    "memory": ("cgroup.procs", "memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
    "pids": ("cgroup.procs", "pids.max"),
    "cpu": ("cgroup.procs", "cpu.cfs_period_us", "cpu.cfs_quota_us"),
    "devices": ("cgroup.procs", "devices.allow", "devices.deny"),
}
V2_FILES = ("cgroup.procs", "cgroup.controllers", "cgroup.subtree_control", "cgroup.kill",
            "memory.max", "memory.swap.max", "pids.max", "cpu.max")


class FakeCgroupfs(PosixPath):
    """A directory on a fake cgroupfs; FILES are the interface files of each cgroup."""

    FILES: tuple[str, ...] = ()

    def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        existed = self.is_dir()
        super().mkdir(mode, parents, exist_ok)
        if not existed:
            for name in self.FILES:
                (self / name).touch()

    def rmdir(self) -> None:
        for name in self.FILES:
            (self / name).unlink(missing_ok=True)
        super().rmdir()


def fake_cgroupfs(root: Path, files: tuple[str, ...]) -> Path:
    """ROOT as the mount point of a fake hierarchy whose cgroups hold FILES."""
    cls: type[FakeCgroupfs] = type("FakeHierarchy", (FakeCgroupfs,), {"FILES": files})
    mountpoint = cls(root)
    mountpoint.mkdir(parents=True)
    return mountpoint


def v1_hierarchy(tmp_path: Path, ctrl: str, files: tuple[str, ...] | None = None,
                 own: str = "/") -> Hierarchy:
    mountpoint = fake_cgroupfs(tmp_path / "v1" / ctrl, V1_FILES[ctrl] if files is None else files)
    return Hierarchy(mountpoint, "/", 1, frozenset({ctrl}), own)


def v1_hierarchies(tmp_path: Path) -> list[Hierarchy]:
    return [v1_hierarchy(tmp_path, c) for c in V1_FILES]


def v2_hierarchy(tmp_path: Path, controllers: str = "memory pids cpu",
                 own: str = "/agent.service", procs: str | None = None,
                 files: tuple[str, ...] = V2_FILES) -> Hierarchy:
    mountpoint = fake_cgroupfs(tmp_path / "v2", files)
    (mountpoint / "cgroup.controllers").write_text(controllers + "\n")
    own_dir = mountpoint / own.lstrip("/")
    if own_dir != mountpoint:
        own_dir.mkdir()
        (own_dir / "cgroup.controllers").write_text(controllers + "\n")
    (own_dir / "cgroup.procs").write_text(f"{os.getpid()}\n" if procs is None else procs)
    return Hierarchy(mountpoint, "/", 2, frozenset(), own)


Writes = list[tuple[Path, str]]


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Writes:
    """Every cgroup file write, in order (the write still happens)."""
    log: Writes = []
    real = cgroups._write

    def record(path: Path, text: str) -> None:
        log.append((Path(path), text))
        real(path, text)

    monkeypatch.setattr(cgroups, "_write", record)
    return log


@pytest.fixture
def filters(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Where a device filter would have been attached (no bpf(2) here)."""
    attached: list[Path] = []
    monkeypatch.setattr(devfilter, "attach_device_filter", lambda d: attached.append(Path(d)))
    return attached


def written(log: Writes, path: Path) -> list[str]:
    return [text for p, text in log if p == path]


def read(path: Path) -> str:
    return path.read_text()


def prepared(hierarchies: list[Hierarchy], name: str = "meshnet-mns-n1") -> Cgroups:
    cgs = Cgroups(hierarchies, name)
    cgs.prepare()
    return cgs


# --- v1 ------------------------------------------------------------------------------------------


def test_v1_prepare_makes_a_parent_per_hierarchy(tmp_path: Path) -> None:
    hs = v1_hierarchies(tmp_path)
    cgs = prepared(hs)
    assert {r: h.controllers for r, h in cgs.carriers.items()} == {
        r: frozenset({r}) for r in ("memory", "pids", "cpu", "devices")}
    assert sorted(cgs.parents.values()) == sorted(h.mountpoint / "meshnet-mns-n1" for h in hs)
    assert all(p.is_dir() for p in cgs.parents.values())
    assert cgs.problems == []
    assert cgs.status() == {
        "carriers": {"cpu": "v1", "devices": "v1", "memory": "v1", "pids": "v1"},
        "parents": sorted(str(h.mountpoint / "meshnet-mns-n1") for h in hs),
        "problems": []}
    # Idempotent: a restarted agent finds its parents.
    again = prepared(hs)
    assert again.parents == cgs.parents


def test_v1_limits_land_in_their_files(tmp_path: Path, writes: Writes) -> None:
    cgs = prepared(v1_hierarchies(tmp_path))
    cg = cgs.create("web.1", memory=64 * MiB, cpus=0.5, pids=20)
    assert cg.name.startswith("web.1-") and len(cg.name) == len("web.1-") + 6
    dirs = {d.parent.parent.name: d for d in cg.dirs}
    assert sorted(dirs) == ["cpu", "devices", "memory", "pids"]
    assert all(d.name == cg.name and d.is_dir() for d in cg.dirs)
    assert read(dirs["memory"] / "memory.limit_in_bytes") == "67108864"
    assert read(dirs["memory"] / "memory.memsw.limit_in_bytes") == "67108864"  # no swap
    assert read(dirs["cpu"] / "cpu.cfs_period_us") == str(CPU_PERIOD_US) == "100000"
    assert read(dirs["cpu"] / "cpu.cfs_quota_us") == "50000"
    assert read(dirs["pids"] / "pids.max") == "20"
    # The period goes in before the quota (the kernel checks quota against the period).
    cpu_writes = [p.name for p, _ in writes if p.parent == dirs["cpu"]]
    assert cpu_writes == ["cpu.cfs_period_us", "cpu.cfs_quota_us"]
    assert cg.procs_files() == [str(d / "cgroup.procs") for d in cg.dirs]


def test_v1_memory_without_swap_accounting(tmp_path: Path, writes: Writes) -> None:
    memory = v1_hierarchy(tmp_path, "memory", files=("cgroup.procs", "memory.limit_in_bytes"))
    cgs = prepared([memory])
    cg = cgs.create("t", memory=7 * MiB)
    (d,) = cg.dirs
    assert read(d / "memory.limit_in_bytes") == str(7 * MiB)
    assert not (d / "memory.memsw.limit_in_bytes").exists()
    assert [p.name for p, _ in writes] == ["memory.limit_in_bytes"]


def test_v1_devices_rules(tmp_path: Path, writes: Writes, filters: list[Path]) -> None:
    cgs = prepared(v1_hierarchies(tmp_path))
    cg = cgs.create("t")  # no limits: the device policy still applies
    d = next(d for d in cg.dirs if d.parent.parent.name == "devices")
    dev_writes = [(p.name, text) for p, text in writes if p.parent == d]
    assert dev_writes == [("devices.deny", "a"), *(("devices.allow", r) for r in DEVICE_RULES)]
    assert "c 1:3 rwm" in DEVICE_RULES and not any(r.startswith("b") for r in DEVICE_RULES)
    # No other cgroup of the task is written to without limits, and no BPF on v1.
    assert {p.parent for p, _ in writes} == {d}
    assert filters == []


@pytest.mark.parametrize(("cpus", "quota"), [(0.01, 1000), (0.001, 1000), (1.0, 100000),
                                             (2.5, 250000), (0.333, 33300)])
def test_cpu_quota(tmp_path: Path, cpus: float, quota: int) -> None:
    cgs = prepared([v1_hierarchy(tmp_path, "cpu")])
    (d,) = cgs.create("t", cpus=cpus).dirs
    assert read(d / "cpu.cfs_quota_us") == str(quota)


def test_create_refuses_a_limit_no_hierarchy_carries(tmp_path: Path) -> None:
    cgs = prepared([v1_hierarchy(tmp_path, "pids")])
    assert cgs.status()["problems"] == ["no cgroup hierarchy carries memory",
                                        "no cgroup hierarchy carries cpu",
                                        "no cgroup hierarchy carries devices"]
    for limits in ({"memory": 64 * MiB}, {"cpus": 1.0}, {"memory": 64 * MiB, "pids": 5}):
        with pytest.raises(CgroupError, match="cannot limit"):
            cgs.create("t", **limits)
    assert cgs.leftovers() == []
    cg = cgs.create("t", pids=5)
    (d,) = cg.dirs
    assert read(d / "pids.max") == "5"


def test_create_removes_the_task_cgroup_when_a_limit_fails(tmp_path: Path) -> None:
    # A memory hierarchy whose cgroups lack memory.limit_in_bytes: the write fails with ENOENT.
    hs = [v1_hierarchy(tmp_path, "memory", files=("cgroup.procs",)),
          v1_hierarchy(tmp_path, "pids")]
    cgs = prepared(hs)
    with pytest.raises(CgroupError, match=r"memory\.limit_in_bytes"):
        cgs.create("t", memory=64 * MiB, pids=5)
    assert cgs.leftovers() == []
    assert not any(c.is_dir() for p in cgs.parents.values() for c in p.iterdir())


def test_v1_own_cgroup_outside_the_mount(tmp_path: Path) -> None:
    h = v1_hierarchy(tmp_path, "memory")
    h = Hierarchy(h.mountpoint, "/docker/abc", 1, h.controllers, "/elsewhere")
    with pytest.raises(CgroupError, match="outside"):
        prepared([h])


def test_v1_parent_under_our_own_cgroup(tmp_path: Path) -> None:
    h = v1_hierarchy(tmp_path, "memory", own="/process_api/abc")
    (h.mountpoint / "process_api" / "abc").mkdir(parents=True)
    cgs = prepared([h])
    assert cgs.parents == {h.mountpoint: h.mountpoint / "process_api" / "abc" / "meshnet-mns-n1"}


def test_hybrid_uses_v1_and_leaves_v2_alone(tmp_path: Path, filters: list[Path]) -> None:
    v2 = v2_hierarchy(tmp_path, controllers="hugetlb", own="/")
    cgs = prepared([*v1_hierarchies(tmp_path), v2])
    assert set(cgs.carriers) == {"memory", "pids", "cpu", "devices"}
    assert all(h.version == 1 for h in cgs.carriers.values())
    assert v2.mountpoint not in cgs.parents
    cg = cgs.create("t", memory=64 * MiB, cpus=1, pids=3)
    assert len(cg.dirs) == 4
    assert not any(p.is_relative_to(v2.mountpoint) for p in cg.dirs)
    assert filters == []


def test_leftovers_and_destroy(tmp_path: Path) -> None:
    hs = v1_hierarchies(tmp_path)
    cgs = prepared(hs)
    a = cgs.create("a", memory=64 * MiB)
    b = cgs.create("b", pids=2)
    # A previous run's task, in two hierarchies only; files in a parent are not tasks.
    for h in hs[:2]:
        (h.mountpoint / "meshnet-mns-n1" / "old-abcdef").mkdir()
    left = {cg.name: cg for cg in cgs.leftovers()}
    assert set(left) == {a.name, b.name, "old-abcdef"}
    assert set(left[a.name].dirs) == set(a.dirs)
    assert set(left["old-abcdef"].dirs) == {h.mountpoint / "meshnet-mns-n1" / "old-abcdef"
                                            for h in hs[:2]}
    assert all(isinstance(cg, TaskCgroup) for cg in left.values())
    assert a.pids() == set()
    for cg in left.values():
        assert cgs.destroy(cg, timeout=0)
        assert not any(d.exists() for d in cg.dirs)
    assert cgs.leftovers() == []
    assert cgs.destroy(a, timeout=0)  # already gone: still True
    cgs.close()
    assert not any(p.exists() for p in cgs.parents.values())


def test_close_keeps_a_parent_that_still_has_tasks(tmp_path: Path) -> None:
    cgs = prepared([v1_hierarchy(tmp_path, "pids")])
    cg = cgs.create("t", pids=4)
    cgs.close()  # rmdir fails (not empty): suppressed
    (parent,) = cgs.parents.values()
    assert parent.is_dir() and cg.dirs[0].is_dir()


def test_pids_reads_every_procs_file(tmp_path: Path) -> None:
    cgs = prepared(v1_hierarchies(tmp_path))
    cg = cgs.create("t")
    cg.dirs[0].joinpath("cgroup.procs").write_text("12\n13\n")
    cg.dirs[1].joinpath("cgroup.procs").write_text("13\n14\n")
    cg.dirs[2].joinpath("cgroup.procs").write_text("junk\n")  # ignored
    assert cg.pids() == {12, 13, 14}


# --- v2 ------------------------------------------------------------------------------------------


def test_v2_limits(tmp_path: Path, writes: Writes, filters: list[Path]) -> None:
    v2 = v2_hierarchy(tmp_path)
    cgs = prepared([v2])
    own = v2.mountpoint / "agent.service"
    parent = own / "meshnet-mns-n1"
    assert cgs.parents == {v2.mountpoint: parent}
    assert cgs.status() == {
        "carriers": {"cpu": "v2", "devices": "v2", "memory": "v2", "pids": "v2"},
        "parents": [str(parent)], "problems": []}
    # Our own cgroup hands the controllers down, then the parent to the tasks.
    assert written(writes, own / "cgroup.subtree_control") == ["+cpu +memory +pids"]
    assert written(writes, parent / "cgroup.subtree_control") == ["+cpu +memory +pids"]
    writes.clear()
    cg = cgs.create("t1", memory=64 * MiB, cpus=0.5, pids=20)
    (d,) = cg.dirs
    assert d == parent / cg.name
    assert read(d / "memory.max") == "67108864"
    assert read(d / "memory.swap.max") == "0"
    assert read(d / "cpu.max") == "50000 100000"
    assert read(d / "pids.max") == "20"
    assert filters == [d]
    assert {p.name for p, _ in writes} == {"memory.max", "memory.swap.max", "cpu.max",
                                           "pids.max"}


def test_v2_without_swap_file(tmp_path: Path, filters: list[Path]) -> None:
    files = tuple(f for f in V2_FILES if f != "memory.swap.max")
    cgs = prepared([v2_hierarchy(tmp_path, files=files)])
    (d,) = cgs.create("t", memory=8 * MiB).dirs
    assert read(d / "memory.max") == str(8 * MiB)
    assert not (d / "memory.swap.max").exists()


def test_v2_devices_filter_without_limits(tmp_path: Path, writes: Writes,
                                         filters: list[Path]) -> None:
    cgs = prepared([v2_hierarchy(tmp_path)])
    writes.clear()
    cg = cgs.create("t")
    assert filters == list(cg.dirs)
    assert writes == []


def test_v2_enables_only_what_it_carries(tmp_path: Path, writes: Writes,
                                         filters: list[Path]) -> None:
    v2 = v2_hierarchy(tmp_path, controllers="memory io")
    cgs = prepared([v2])
    assert {r: f"v{h.version}" for r, h in cgs.carriers.items()} == {"memory": "v2",
                                                                     "devices": "v2"}
    assert cgs.problems == ["no cgroup hierarchy carries pids", "no cgroup hierarchy carries cpu"]
    own = v2.mountpoint / "agent.service"
    assert written(writes, own / "cgroup.subtree_control") == ["+memory"]
    with pytest.raises(CgroupError, match="cannot limit pids"):
        cgs.create("t", pids=5)
    with pytest.raises(CgroupError, match="cannot limit cpu"):
        cgs.create("t", cpus=1)
    assert cgs.leftovers() == []


def test_v2_already_enabled_is_not_written_again(tmp_path: Path, writes: Writes) -> None:
    v2 = v2_hierarchy(tmp_path)
    (v2.mountpoint / "agent.service" / "cgroup.subtree_control").write_text("cpu memory pids\n")
    prepared([v2])
    assert written(writes, v2.mountpoint / "agent.service" / "cgroup.subtree_control") == []


def test_v2_destroy_writes_cgroup_kill(tmp_path: Path, writes: Writes,
                                       filters: list[Path]) -> None:
    cgs = prepared([v2_hierarchy(tmp_path)])
    cg = cgs.create("t", pids=3)
    writes.clear()
    assert cgs.destroy(cg, timeout=0)
    assert writes == [(cg.dirs[0] / "cgroup.kill", "1")]
    assert not cg.dirs[0].exists()
    cgs.close()
    assert not any(p.exists() for p in cgs.parents.values())


def test_create_removes_the_task_cgroup_when_the_device_filter_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # bpf(2) refused (an old kernel, a seccomp filter, no CONFIG_CGROUP_BPF): the task must not
    # start, and its cgroup must not stay behind; the caller (sandboxes.launch) expects one of
    # LaunchFailure, whose cgroup member is CgroupError.
    def refuse(d: Path) -> None:
        raise devfilter.DeviceFilterError(f"device filter on {d}: Operation not permitted")

    monkeypatch.setattr(devfilter, "attach_device_filter", refuse)
    cgs = prepared([v2_hierarchy(tmp_path)])
    with pytest.raises(PlatformError) as failure:
        cgs.create("t", pids=3)
    assert cgs.leftovers() == []
    assert isinstance(failure.value, CgroupError)


# --- where the v2 parent goes (_delegated_base) -----------------------------------------------


def ebusy_once(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The first _enable fails as on a cgroup with processes of its own; later ones work."""
    calls: list[Path] = []
    real = cgroups._enable

    def enable(cgroup: Path, controllers: list[str]) -> None:
        calls.append(Path(cgroup))
        if len(calls) == 1:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
        real(cgroup, controllers)

    monkeypatch.setattr(cgroups, "_enable", enable)
    return calls


def test_v2_alone_in_own_cgroup_moves_into_the_agent_leaf(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writes: Writes) -> None:
    v2 = v2_hierarchy(tmp_path, procs=f"{os.getpid()}\n")
    calls = ebusy_once(monkeypatch)
    cgs = prepared([v2])
    own = v2.mountpoint / "agent.service"
    leaf = own / AGENT_LEAF
    assert leaf.is_dir()
    assert written(writes, leaf / "cgroup.procs") == ["0"]  # "0": the writer moves itself
    assert calls[:3] == [own, own, own / "meshnet-mns-n1"]
    assert written(writes, own / "cgroup.subtree_control") == ["+cpu +memory +pids"]
    assert cgs.parents == {v2.mountpoint: own / "meshnet-mns-n1"}
    assert not (v2.mountpoint / "meshnet-mns-n1").exists()


def test_v2_sharing_own_cgroup_puts_the_parent_at_the_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writes: Writes) -> None:
    other = 1 if os.getpid() != 1 else 2
    v2 = v2_hierarchy(tmp_path, procs=f"{os.getpid()}\n{other}\n")
    calls = ebusy_once(monkeypatch)
    cgs = prepared([v2])
    own = v2.mountpoint / "agent.service"
    assert not (own / AGENT_LEAF).exists()
    assert calls[:2] == [own, v2.mountpoint]
    assert written(writes, v2.mountpoint / "cgroup.subtree_control") == ["+cpu +memory +pids"]
    assert cgs.parents == {v2.mountpoint: v2.mountpoint / "meshnet-mns-n1"}


def test_v2_ebusy_at_the_root_is_an_error(tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    v2 = v2_hierarchy(tmp_path, own="/")
    ebusy_once(monkeypatch)
    cgs = Cgroups([v2], "meshnet-mns-n1")
    with pytest.raises(CgroupError, match="Device or resource busy"):
        cgs.prepare()


def test_v2_other_errors_are_cgroup_errors(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    v2 = v2_hierarchy(tmp_path)

    def denied(cgroup: Path, controllers: list[str]) -> None:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(cgroups, "_enable", denied)
    with pytest.raises(CgroupError, match="Permission denied"):
        prepared([v2])


# --- sweep -------------------------------------------------------------------------------------


def test_sweep_removes_tasks_and_parents(tmp_path: Path, filters: list[Path]) -> None:
    hs = v1_hierarchies(tmp_path)
    cgs = prepared(hs)
    cgs.create("a", pids=2)
    cgs.create("b", memory=7 * MiB)
    parents = list(cgs.parents.values())
    assert cgroups.sweep(parents) == []
    assert not any(p.exists() for p in parents)

