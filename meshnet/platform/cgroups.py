"""Task cgroups: one per task under a per-node parent, on cgroup v1, hybrid or v2.

Layout, in every hierarchy that carries a controller we use (memory, pids, cpu, devices):

    <the agent's own cgroup>/meshnet-<sandbox prefix>-<node>/<task>-<6 hex>

The parent is named per node and per sandbox prefix (lab hosts share one machine), so a
restarted agent finds what its predecessor left and `meshnet-lab down` finds every lab's. It
sits under the agent's own cgroup: under systemd that is the unit's cgroup (Delegate=yes hands
it to us); in the lab it is the lab's. On v2 a cgroup with processes cannot hand controllers to
its children, so when the agent's own cgroup holds processes the parent goes to the root.

Limits are written as `docker service create` means them: memory (v1 memory.limit_in_bytes and
memory.memsw.limit_in_bytes, so no swap; v2 memory.max and memory.swap.max=0), cpu (CFS quota
over a 100 ms period), pids (pids.max), and a device policy that allows only the character
devices a task's /dev holds and denies every block device (v1 devices.deny/allow; on v2 a BPF
program, platform/devfilter.py).

cgroupfs may be missing from our mount namespace: `ip netns exec` (how the lab starts agents)
replaces /sys with a fresh sysfs. Then, in a private mount namespace only, the hierarchies
listed in /proc/self/cgroup are mounted again under /sys/fs/cgroup.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from meshnet.platform.nsfd import PlatformError, _c, _check

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT_PREFIX = "meshnet-"
# The v2 leaf the agent moves itself into to delegate its own cgroup (see _delegated_base).
AGENT_LEAF = "meshnetd"
RESOURCES = ("memory", "pids", "cpu", "devices")
# CFS period: Docker's 100 ms.
CPU_PERIOD_US = 100_000
# Killing a cgroup's processes and seeing them gone takes milliseconds; this is a wedge.
DESTROY_TIMEOUT_S = 5.0
POLL_S = 0.01
# How deep `find_parents` looks for meshnet parents in a hierarchy (systemd puts services
# 2-3 levels down; the lab's parent lies under the lab's own cgroup).
FIND_DEPTH = 8
# The character devices a task may open (platform/launch.py makes exactly these nodes), and
# mknod of character devices (harmless: opening one still needs an allow rule). v1 syntax.
DEVICE_RULES = ("c *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm",
                "c 5:0 rwm", "c 5:2 rwm", "c 136:* rwm")
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8


class CgroupError(PlatformError):
    """Making, limiting or removing a task cgroup failed."""


@dataclass(frozen=True)
class Mount:
    mountpoint: str
    root: str
    fstype: str
    options: frozenset[str]


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy and where we are in it."""

    mountpoint: Path
    mount_root: str
    version: int
    controllers: frozenset[str]
    own: str  # our cgroup, as /proc/self/cgroup names it

    def dir(self, cgroup: str) -> Path | None:
        """The directory of CGROUP (a path in the hierarchy), None if this mount can't see it."""
        root = self.mount_root.rstrip("/")
        if (cgroup != root and not cgroup.startswith(root + "/")) or ".." in cgroup.split("/"):
            return None
        return self.mountpoint / cgroup[len(root):].lstrip("/")


def _unescape(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 4 <= len(text) and all(c in "01234567"
                                                            for c in text[i + 1:i + 4]):
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        if sep < 6 or len(fields) < sep + 4:
            continue
        mounts.append(Mount(mountpoint=_unescape(fields[4]), root=_unescape(fields[3]),
                            fstype=fields[sep + 1],
                            options=frozenset(fields[sep + 3].split(","))))
    return mounts


def parse_proc_cgroup(text: str) -> list[tuple[int, frozenset[str], str]]:
    """/proc/PID/cgroup: (hierarchy id, its controllers, our path in it)."""
    out = []
    for line in text.splitlines():
        hid, sep, rest = line.partition(":")
        ctrls, sep2, path = rest.partition(":")
        if not sep or not sep2 or not hid.isdigit():
            continue
        out.append((int(hid), frozenset(c for c in ctrls.split(",") if c), path))
    return out


def discover(mountinfo: str, proc_cgroup: str) -> list[Hierarchy]:
    """The hierarchies we are in that are mounted where we can see them."""
    mounts = parse_mountinfo(mountinfo)
    found = []
    for hid, ctrls, path in parse_proc_cgroup(proc_cgroup):
        if hid == 0:
            m = next((m for m in mounts if m.fstype == "cgroup2"), None)
            if m is not None:
                found.append(Hierarchy(Path(m.mountpoint), m.root, 2, frozenset(), path))
            continue
        if not ctrls:
            continue
        m = next((m for m in mounts if m.fstype == "cgroup" and ctrls <= m.options), None)
        if m is not None:
            found.append(Hierarchy(Path(m.mountpoint), m.root, 1, ctrls, path))
    return found


def mount_plan(proc_cgroup: str) -> list[tuple[str, str, str]]:
    """(fstype, options, mountpoint under /sys/fs/cgroup) to remount our hierarchies."""
    entries = parse_proc_cgroup(proc_cgroup)
    v1 = [(ctrls, path) for hid, ctrls, path in entries if hid != 0 and ctrls]
    plan = []
    for ctrls, _ in v1:
        named = [c for c in ctrls if c.startswith("name=")]
        if named:
            continue  # named hierarchies (name=systemd) carry no controller we use
        opts = ",".join(sorted(ctrls))
        plan.append(("cgroup", opts, str(CGROUP_ROOT / opts)))
    if any(hid == 0 for hid, _, _ in entries):
        plan.append(("cgroup2", "", str(CGROUP_ROOT / "unified") if v1 else str(CGROUP_ROOT)))
    return plan


@dataclass(frozen=True)
class TaskCgroup:
    name: str
    dirs: tuple[Path, ...]

    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def pids(self) -> set[int]:
        out: set[int] = set()
        for d in self.dirs:
            with contextlib.suppress(OSError, ValueError):
                out.update(int(x) for x in (d / "cgroup.procs").read_text().split())
        return out


@dataclass
class Cgroups:
    """The task cgroups of one agent (one node, one sandbox prefix)."""

    hierarchies: list[Hierarchy]
    parent_name: str
    # resource -> the hierarchy that carries it
    carriers: dict[str, Hierarchy] = field(default_factory=dict)
    parents: dict[Path, Path] = field(default_factory=dict)  # hierarchy mountpoint -> parent dir
    problems: list[str] = field(default_factory=list)

    @classmethod
    def for_agent(cls, parent_name: str) -> Cgroups:
        """Find (or, in a private mount namespace, mount) our hierarchies."""
        proc_cgroup = Path("/proc/self/cgroup").read_text()
        hierarchies = discover(Path("/proc/self/mountinfo").read_text(), proc_cgroup)
        if not any(h.controllers & set(RESOURCES) or h.version == 2 for h in hierarchies) \
                and not _propagates(str(CGROUP_ROOT), Path("/proc/self/mountinfo").read_text()):
            _mount_hierarchies(proc_cgroup)
            hierarchies = discover(Path("/proc/self/mountinfo").read_text(), proc_cgroup)
        return cls(hierarchies, parent_name)

    # --- set-up ------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Pick the hierarchy of each resource and make the parent cgroups."""
        v2 = next((h for h in self.hierarchies if h.version == 2), None)
        v2_own = v2.dir(v2.own) if v2 is not None else None
        v2_ctrls = _read_words(v2_own / "cgroup.controllers") if v2_own is not None else set()
        for res in RESOURCES:
            v1 = next((h for h in self.hierarchies if h.version == 1 and res in h.controllers),
                      None)
            if v1 is not None:
                self.carriers[res] = v1
            elif v2 is not None and (res in v2_ctrls or res == "devices"):
                self.carriers[res] = v2  # v2 devices: a BPF program, no controller to enable
            else:
                self.problems.append(f"no cgroup hierarchy carries {res}")
        for h in {id(h): h for h in self.carriers.values()}.values():
            self.parents[h.mountpoint] = self._make_parent(h)

    def _make_parent(self, h: Hierarchy) -> Path:
        own = h.dir(h.own)
        if own is None:
            raise CgroupError(f"our cgroup {h.own} is outside the {h.mountpoint} mount")
        if h.version == 1:
            parent = own / self.parent_name
            parent.mkdir(exist_ok=True)
            return parent
        want = sorted(r for r, c in self.carriers.items() if c is h and r != "devices")
        try:
            base = _delegated_base(own, h.mountpoint, want)
            parent = base / self.parent_name
            parent.mkdir(exist_ok=True)
            _enable(parent, want)
            return parent
        except OSError as e:
            raise CgroupError(f"cgroup v2 under {own}: {e.strerror}") from e

    # --- one task ------------------------------------------------------------------------------

    def create(self, task: str, memory: int | None = None, cpus: float | None = None,
               pids: int | None = None) -> TaskCgroup:
        """A fresh cgroup for TASK with these limits; removed again if a limit can't be set."""
        for res, value in (("memory", memory), ("cpu", cpus), ("pids", pids)):
            if value is not None and res not in self.carriers:
                raise CgroupError(f"cannot limit {res} on this host: no cgroup hierarchy "
                                  f"carries the {res} controller")
        name = f"{task}-{secrets.token_hex(3)}"
        dirs = []
        try:
            for parent in self.parents.values():
                d = parent / name
                d.mkdir()
                dirs.append(d)
            cg = TaskCgroup(name, tuple(dirs))
            self._limit(cg, memory, cpus, pids)
            return cg
        except (OSError, PlatformError) as e:
            self.destroy(TaskCgroup(name, tuple(dirs)))
            if isinstance(e, OSError):
                raise CgroupError(f"task cgroup {name}: {e.strerror or e}"
                                  + (f" ({e.filename})" if e.filename else "")) from e
            raise CgroupError(f"task cgroup {name}: {e}") from e

    def _dir(self, cg: TaskCgroup, res: str) -> Path | None:
        h = self.carriers.get(res)
        if h is None:
            return None
        parent = self.parents[h.mountpoint]
        return next((d for d in cg.dirs if d.parent == parent), None)

    def _limit(self, cg: TaskCgroup, memory: int | None, cpus: float | None,
               pids: int | None) -> None:
        def v1(res: str) -> bool:
            return self.carriers[res].version == 1

        if memory is not None:
            d = self._dir(cg, "memory")
            assert d is not None
            if v1("memory"):
                _write(d / "memory.limit_in_bytes", str(memory))
                if (d / "memory.memsw.limit_in_bytes").exists():  # swap accounting is on
                    _write(d / "memory.memsw.limit_in_bytes", str(memory))
            else:
                _write(d / "memory.max", str(memory))
                if (d / "memory.swap.max").exists():
                    _write(d / "memory.swap.max", "0")
        if cpus is not None:
            d = self._dir(cg, "cpu")
            assert d is not None
            quota = max(1000, int(cpus * CPU_PERIOD_US))
            if v1("cpu"):
                _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                _write(d / "cpu.cfs_quota_us", str(quota))
            else:
                _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        if pids is not None:
            d = self._dir(cg, "pids")
            assert d is not None
            _write(d / "pids.max", str(pids))
        d = self._dir(cg, "devices")
        if d is not None:
            if v1("devices"):
                _write(d / "devices.deny", "a")
                for rule in DEVICE_RULES:
                    _write(d / "devices.allow", rule)
            else:
                from meshnet.platform.devfilter import attach_device_filter
                attach_device_filter(d)

    def destroy(self, cg: TaskCgroup, timeout: float = DESTROY_TIMEOUT_S) -> bool:
        """Kill everything in CG and remove its directories; True if all of it is gone."""
        deadline = time.monotonic() + timeout
        for d in cg.dirs:
            if (d / "cgroup.kill").exists():
                with contextlib.suppress(OSError):
                    _write(d / "cgroup.kill", "1")
        left = list(cg.dirs)
        while True:
            for pid in cg.pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            for d in list(left):
                try:
                    d.rmdir()
                    left.remove(d)
                except FileNotFoundError:
                    left.remove(d)
                except OSError as e:
                    if e.errno != errno.EBUSY:
                        raise CgroupError(f"rmdir {d}: {e.strerror}") from e
            if not left or time.monotonic() >= deadline:
                return not left
            time.sleep(POLL_S)

    def leftovers(self) -> list[TaskCgroup]:
        """Task cgroups under our parents (a previous run's, after a crash)."""
        return list(task_cgroups(self.parents.values()).values())

    def close(self) -> None:
        """Remove our (empty) parents."""
        for parent in self.parents.values():
            with contextlib.suppress(OSError):
                parent.rmdir()

    def status(self) -> dict[str, object]:
        return {"carriers": {r: f"v{h.version}" for r, h in sorted(self.carriers.items())},
                "parents": sorted(str(p) for p in self.parents.values()),
                "problems": list(self.problems)}


def task_cgroups(parents: Iterable[Path]) -> dict[str, TaskCgroup]:
    """The task cgroups under PARENTS, by name (one TaskCgroup spans every hierarchy)."""
    by_name: dict[str, list[Path]] = {}
    for parent in parents:
        with contextlib.suppress(OSError):
            for d in parent.iterdir():
                if d.is_dir():
                    by_name.setdefault(d.name, []).append(d)
    return {n: TaskCgroup(n, tuple(ds)) for n, ds in sorted(by_name.items())}


def find_parents(name_prefix: str, max_depth: int = FIND_DEPTH) -> list[Path]:
    """Every meshnet parent cgroup whose name starts with NAME_PREFIX, in every hierarchy
    mounted here (for `meshnet-lab down`, which may run from another cgroup)."""
    found = []
    roots = {Path(m.mountpoint) for m in parse_mountinfo(Path("/proc/self/mountinfo").read_text())
             if m.fstype in ("cgroup", "cgroup2")}
    for root in sorted(roots):
        stack = [(root, 0)]
        while stack:
            d, depth = stack.pop()
            try:
                subdirs = [e for e in os.scandir(d) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for e in subdirs:
                if e.name.startswith(name_prefix):
                    found.append(Path(e.path))
                elif depth < max_depth:
                    stack.append((Path(e.path), depth + 1))
    return found


def sweep(parents: list[Path]) -> list[str]:
    """Kill and remove every task cgroup under PARENTS, then PARENTS; the ones left over."""
    helper = Cgroups([], "")
    stuck = [cg.name for cg in task_cgroups(parents).values() if not helper.destroy(cg)]
    for p in parents:
        with contextlib.suppress(OSError):
            p.rmdir()
    return stuck


# --- internals -----------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    # One write(2) per value: cgroup files parse each write on its own.
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    except OSError as e:
        e.filename = str(path)
        raise
    finally:
        os.close(fd)


def _read_words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def _enable(cgroup: Path, controllers: list[str]) -> None:
    have = _read_words(cgroup / "cgroup.subtree_control")
    missing = [c for c in controllers if c not in have]
    if missing:
        _write(cgroup / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


def _delegated_base(own: Path, root: Path, controllers: list[str]) -> Path:
    """Where our v2 parent goes. A cgroup with processes cannot enable controllers for its
    children ("no internal processes"): when we are alone in our cgroup (a systemd service
    with Delegate=yes) we step down into a leaf of our own, AGENT_LEAF, and keep our cgroup;
    when others share it (the lab's agents and their harness) the hierarchy's root is used."""
    try:
        _enable(own, controllers)
        return own
    except OSError as e:
        if e.errno != errno.EBUSY or own == root:
            raise
    if _read_words(own / "cgroup.procs") == {str(os.getpid())}:
        leaf = own / AGENT_LEAF
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", "0")
        _enable(own, controllers)
        return own
    _enable(root, controllers)
    return root


def _propagates(path: str, mountinfo: str) -> bool:
    """True if a mount made at PATH would propagate to other mount namespaces: the mount
    holding PATH is shared (a private or slave one keeps our mounts to ourselves)."""
    best: tuple[int, bool] = (-1, True)
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields or len(fields) < 7:
            continue
        point = _unescape(fields[4])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) > best[0]:
            optional = fields[6:fields.index("-")]
            best = (len(point), any(o.startswith("shared:") for o in optional))
    return best[1]


def _mount_hierarchies(proc_cgroup: str) -> None:
    libc = _c()
    root = str(CGROUP_ROOT).encode()
    if not CGROUP_ROOT.is_dir():
        return
    _check(libc.mount(b"cgroup_root", root, b"tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                      b"mode=755"), "mount tmpfs at /sys/fs/cgroup")
    for fstype, options, target in mount_plan(proc_cgroup):
        os.makedirs(target, exist_ok=True)
        ret = libc.mount(fstype.encode(), target.encode(), fstype.encode(),
                         MS_NOSUID | MS_NODEV | MS_NOEXEC, options.encode() or None)
        with contextlib.suppress(OSError):  # one hierarchy we cannot see is not fatal
            _check(ret, f"mount {fstype} {options} at {target}")
