"""The task launcher: the one program between the agent and a task's command.

    python -I -S launch.py          (the plan, marshalled, on stdin; stdout/stderr are the task's)

The agent resolves every decision into the plan (platform/container.py builds it); this program
only carries it out, with nothing but the few built-in modules it needs (no ctypes.util, json,
hashlib or contextlib: importing those cost a third of its start), so it starts in ~30 ms and
imports nothing the task could influence. The plan is marshalled: the agent, its only writer,
runs the same interpreter. Run as root with the agent's capabilities:

  parent (stays outside, in the agent's PID namespace)
    join the sandbox's network namespace; unshare a PID namespace; fork; forward SIGTERM and
    friends to the child; exit with the child's true wait status (128+N for signal N), so a
    task killed by SIGKILL or the OOM killer reports 137.
  child (PID 1 of the new PID namespace)
    join the task's cgroups (before anything remounts /sys); unshare mount, UTS, IPC and cgroup
    namespaces; build the task's file system view:
      - every existing mount read-only and nosuid (mount_setattr, recursively);
      - a new /proc for the PID namespace, a read-only /sys for the network namespace, both
        with Docker's masked and read-only paths;
      - a private minimal /dev (null zero full random urandom tty, pts, shm, mqueue), read-only;
      - private writable /tmp and /run (so /run/netns and every runtime directory are gone);
      - the sandbox's resolv.conf, hosts and hostname over /etc's;
      - the plan's bind mounts; then the hidden paths (the agent's state, socket and config
        directories) covered with empty read-only file systems;
    set the hostname; exec setpriv (util-linux), which sets the capability bounding set,
    clears inheritable and ambient capabilities, sets no_new_privs and switches user; setpriv
    execs tini (Docker's --init), which runs the command as PID 2, reaps zombies and forwards
    signals, so a command without a SIGTERM handler still stops on SIGTERM.

Any failure before the command starts is one line on stderr and exit 125 (Docker's code for
"the container could not be started"); tini itself exits 126/127 when the command cannot run.

A plan with "mode": "exec" runs a command inside a running task instead (a health probe, as
`docker exec` does): the plan's "pidfd" (an fd the agent passed, a pidfd of the task's PID 1)
names the task. The parent joins its network namespace and, for its child, its PID namespace;
the child joins the task's cgroups, then its mount, UTS, IPC and cgroup namespaces (setns with
the pidfd: the task cannot be swapped for another process between the look-up and the join),
and execs setpriv with the task's capabilities, user and no_new_privs, then the command
(without tini: the task's own PID 1 reaps what the command leaves behind).
"""

from __future__ import annotations

import ctypes
import errno
import marshal
import os
import signal
import stat
import sys

# typing costs ~4 ms to import; the annotations are strings (PEP 563) and mypy reads this flag.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

# mount_setattr(2) (Linux 5.12): the same number on every architecture.
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_NOSUID = 0x2

PR_SET_PDEATHSIG = 1

START_FAILED = 125
EXEC_FAILED = "could not run in the task"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)

# Docker's masked and read-only paths (moby oci/defaults.go).
MASKED = ("/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
          "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
          "/sys/firmware", "/sys/devices/virtual/powercap")
READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# (name, major, minor): the character devices a task gets.
DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
           ("urandom", 1, 9), ("tty", 5, 0))
DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
             ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
             ("ptmx", "pts/ptmx"))


class LaunchError(Exception):
    pass


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


# The C library the interpreter already runs on: ctypes.util.find_library would import
# subprocess and shutil and spawn ldconfig, a third of the launcher's time.
_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise LaunchError(f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                       data.encode() if data else None), f"mount {target}")


def _umount(target: str) -> None:
    """Detach TARGET and everything under it; fine if it is no mount point of its own."""
    if _libc.umount2(target.encode(), MNT_DETACH) != 0 and ctypes.get_errno() != errno.EINVAL:
        _check(-1, f"umount {target}")


def _setattr(path: str, attr_set: int, attr_clr: int = 0, recursive: bool = True) -> None:
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    ret = _libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_int(AT_FDCWD),
                        path.encode(), ctypes.c_uint(AT_RECURSIVE if recursive else 0),
                        ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)))
    _check(ret, f"mount_setattr {path}")


def _bind(source: str, target: str, readonly: bool) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    # A bind copies its source mount's flags, read-only included (everything is read-only by
    # now): set exactly what was asked, on the whole bound tree.
    if readonly:
        _setattr(target, MOUNT_ATTR_RDONLY)
    else:
        _setattr(target, 0, MOUNT_ATTR_RDONLY)


def _tmpfs(target: str, flags: int, options: str) -> None:
    _mount("tmpfs", target, "tmpfs", flags, options)


def _mask(path: str) -> None:
    """Make PATH show nothing: an empty read-only tmpfs over a directory, /dev/null over
    anything else. A path that does not exist is already hidden."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        _tmpfs(path, MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=000")
    elif not stat.S_ISLNK(st.st_mode):
        _mount("/dev/null", path, None, MS_BIND)
        _setattr(path, MOUNT_ATTR_RDONLY, recursive=False)


def _make_mountpoint(target: str, like_dir: bool) -> None:
    """Create TARGET in a private tmpfs (/tmp or /run); elsewhere it must exist already (the
    host's file system is read-only and is never written)."""
    if os.path.lexists(target):
        return
    if not (target.startswith("/tmp/") or target.startswith("/run/")):
        raise LaunchError(f"mount target {target} does not exist on this host (targets that "
                          "do not exist must lie under /tmp or /run)")
    if like_dir:
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        with open(target, "w"):
            pass


def _build_dev() -> None:
    _umount("/dev")  # the host's /dev and everything mounted under it
    _tmpfs("/dev", MS_NOSUID | MS_NOEXEC, "size=64k,mode=755")
    for name, major, minor in DEVICES:
        path = f"/dev/{name}"
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        os.chmod(path, 0o666)  # past the umask
    for name, target in DEV_LINKS:
        os.symlink(target, f"/dev/{name}")
    for d in ("pts", "shm", "mqueue"):
        os.mkdir(f"/dev/{d}", 0o755)
    _mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
           "newinstance,ptmxmode=0666,mode=0620")
    _tmpfs("/dev/shm", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=64m,mode=1777")
    _mount("mqueue", "/dev/mqueue", "mqueue", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def _etc_file(target: str, source: str) -> None:
    """Put SOURCE's content at TARGET (/etc/resolv.conf...). TARGET may be a symlink into /run
    (systemd-resolved), which is our private tmpfs now: write the file there instead."""
    real = os.path.realpath(target)
    if real.startswith("/run/") or real.startswith("/tmp/"):
        os.makedirs(os.path.dirname(real), mode=0o755, exist_ok=True)
        with open(source, "rb") as src, open(real, "wb") as dst:
            dst.write(src.read())
        return
    if not os.path.exists(real):
        return  # the host has no such file; the task goes without it, like the host
    _mount(source, real, None, MS_BIND)
    _setattr(real, MOUNT_ATTR_RDONLY, recursive=False)


def _open_sources(plan: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """Hold each bind source open (O_PATH) before /tmp and /run are replaced: a source may lie
    there on the host, and is bound later through /proc/self/fd."""
    opened = []
    for m in plan.get("mounts", []):
        try:
            fd = os.open(m["source"], os.O_PATH | os.O_CLOEXEC)
        except FileNotFoundError:
            raise LaunchError(f"mount source {m['source']} does not exist on this host") from None
        opened.append((fd, m))
    return opened


def build_filesystem(plan: dict[str, Any]) -> None:
    sources = _open_sources(plan)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we do leaks back to the host
    # nosuid: no set-user-ID bit or file capability grants anything (no_new_privs says the
    # same), and a binary with file capabilities still runs when the task lacks them.
    _setattr("/", MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)
    _umount("/proc")
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _umount("/sys")
    _mount("sysfs", "/sys", "sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _build_dev()
    _tmpfs("/tmp", MS_NOSUID | MS_NODEV, "mode=1777")
    _tmpfs("/run", MS_NOSUID | MS_NODEV, "size=64m,mode=755")
    for target, source in plan.get("etc", {}).items():
        _etc_file(target, source)
    for fd, m in sources:
        _make_mountpoint(m["target"], stat.S_ISDIR(os.fstat(fd).st_mode))
        _bind(f"/proc/self/fd/{fd}", m["target"], bool(m.get("readonly")))
        os.close(fd)
    for path in (*MASKED, *plan.get("hidden", [])):
        _mask(path)
    for path in READONLY:
        if os.path.exists(path):
            _mount(path, path, None, MS_BIND | MS_REC)
            _setattr(path, MOUNT_ATTR_RDONLY)
    _setattr("/dev", MOUNT_ATTR_RDONLY, recursive=False)


def privileges_argv(plan: dict[str, Any]) -> list[str]:
    """setpriv's arguments for the plan's capabilities and user, then tini and the command."""
    caps = ",".join(["-all", *(f"+{c.lower()}" for c in plan["caps"])])
    argv = [plan["setpriv"], f"--bounding-set={caps}", "--inh-caps=-all",
            "--ambient-caps=-all", "--no-new-privs"]
    user = plan.get("user")
    if user is not None:
        argv += [f"--regid={user['gid']}", f"--reuid={user['uid']}"]
        groups = user.get("groups") or []
        argv += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    if plan.get("mode") == "exec":  # inside a running task: its PID 1 is its init
        return [*argv, "--", *plan["argv"]]
    return [*argv, "--", plan["init"], "-g", "--", *plan["argv"]]


def child(plan: dict[str, Any]) -> None:
    """PID 1 of the new PID namespace: contain ourselves, then become the task."""
    for procs in plan.get("cgroup_procs", []):
        with open(procs, "w") as f:
            f.write("0")
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP),
           "unshare")
    build_filesystem(plan)
    name = plan["hostname"].encode()
    _check(_libc.sethostname(name, len(name)), "sethostname")
    os.chdir(plan.get("cwd") or "/")
    argv = privileges_argv(plan)
    os.execve(argv[0], argv, plan["env"])


def check_ceiling(plan: dict[str, Any]) -> None:
    """Every capability the task is to have must be in our bounding set (under systemd, the
    unit's CapabilityBoundingSet): setpriv can only drop, so say which one is out of reach
    instead of starting the task without it."""
    with open("/proc/self/status") as f:
        bounding = next(int(line.split()[1], 16) for line in f if line.startswith("CapBnd:"))
    missing = [name for name, bit in sorted(plan["cap_bits"].items())
               if not bounding >> bit & 1]
    if missing:
        raise LaunchError(f"capabilities {', '.join(missing)} are outside the agent's "
                          "bounding set (its systemd unit's CapabilityBoundingSet)")


def launcher_id(path: str) -> str:
    """Which launcher file this is: a new install or an edit changes it."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def check_version(plan: dict[str, Any]) -> None:
    """This file is read from disk for every task while the agent that wrote the plan runs
    from memory: after an upgrade without a restart the two may no longer agree."""
    if plan.get("launcher_id") != launcher_id(__file__):
        raise LaunchError("the launcher on disk differs from the one the agent started with "
                          "(meshnet upgraded while meshnetd runs?): restart meshnetd")


def parent(plan: dict[str, Any]) -> int:
    check_version(plan)
    check_ceiling(plan)
    fd = os.open(plan["netns"], os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.setns(fd, CLONE_NEWNET), f"join network namespace {plan['netns']}")
    finally:
        os.close(fd)
    _check(_libc.unshare(CLONE_NEWPID), "unshare PID namespace")
    pending: list[int] = []
    pid = 0

    def forward(signum: int, _frame: Any) -> None:
        if pid:
            try:  # noqa: SIM105 (contextlib would cost milliseconds of start-up)
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        else:
            pending.append(signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    pid = os.fork()
    if pid == 0:
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        try:
            child(plan)
        except BaseException as e:  # one line, then Docker's 125
            _fail(e)
        os._exit(START_FAILED)
    for signum in pending:
        os.kill(pid, signum)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def enter(plan: dict[str, Any]) -> int:
    """Exec mode: run the plan's command inside the running task its pidfd names."""
    task = plan["pidfd"]
    try:
        check_version(plan)
        check_ceiling(plan)
        os.set_inheritable(task, False)  # the command must not hold the task's pidfd
        # With a pidfd, setns joins several namespaces at once; PID affects our children only.
        _check(_libc.setns(task, CLONE_NEWNET | CLONE_NEWPID), "join the task's namespaces")
    except BaseException as e:
        _fail(e, EXEC_FAILED)
    pid = os.fork()
    if pid == 0:
        try:
            for procs in plan.get("cgroup_procs", []):  # before the task's mounts hide them
                with open(procs, "w") as f:
                    f.write("0")
            _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")
            _check(_libc.setns(task, CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC |
                               CLONE_NEWCGROUP), "join the task's mount namespace")
            os.close(task)
            os.chdir(plan.get("cwd") or "/")
            argv = privileges_argv(plan)
            os.execve(argv[0], argv, plan["env"])
        except BaseException as e:
            _fail(e, EXEC_FAILED)
        os._exit(START_FAILED)
    os.close(task)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _fail(e: BaseException, what: str = "task could not be started") -> None:
    msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    where = f" ({e.filename})" if isinstance(e, OSError) and e.filename else ""
    try:
        os.write(2, f"meshnet: {what}: {msg}{where}\n".encode())
    finally:
        os._exit(START_FAILED)


def main() -> int:
    try:
        with os.fdopen(0, "rb", closefd=False) as f:
            plan = marshal.loads(f.read())
        if not isinstance(plan, dict):
            raise LaunchError("the plan on stdin is not a mapping")
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        return enter(plan) if plan.get("mode") == "exec" else parent(plan)
    except BaseException as e:
        _fail(e)
    return START_FAILED


if __name__ == "__main__":
    sys.exit(main())
