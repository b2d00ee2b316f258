"""Starting a contained task: the launcher's plan, the tools it needs, and the spawn.

platform/launch.py carries the plan out; this module decides nothing about policy either (that
is meshnet/containment.py): it resolves users on this host, finds setpriv and tini, checks
bind-mount sources against the paths a task must never see, and starts the launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import marshal
import os
import pwd
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshnet.containment import CAP_NUMBERS, Containment, Mount, overlaps
from meshnet.platform import launch
from meshnet.platform.nsfd import PlatformError

LAUNCHER = Path(__file__).with_name("launch.py")
# Docker's default PATH for a container.
TASK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Host paths no task ever sees, besides the agent's own (state, socket, config, key): other
# sandboxes' names, the host's password hashes and SSH host keys.
ALWAYS_HIDDEN = ("/etc/netns", "/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-",
                 "/etc/ssh")
# Bind-mount sources that would undo the containment (host processes, devices, kernel knobs,
# namespace handles, cgroups).
FORBIDDEN_SOURCES = ("/proc", "/sys", "/dev", "/run/netns", "/var/run/netns")
# Directories too shared to cover whole: a hidden file directly inside one of these is covered
# on its own instead (a config at /etc/meshnet.toml must not take /etc from the task).
SHARED_DIRS = frozenset({"/", "/etc", "/usr", "/usr/local", "/usr/local/etc", "/var",
                         "/var/lib", "/var/run", "/var/tmp", "/run", "/tmp", "/home", "/root",
                         "/opt", "/srv", "/mnt", "/media", "/bin", "/sbin", "/lib", "/lib64",
                         "/boot", "/dev", "/proc", "/sys"})


class ContainerError(PlatformError):
    """A task cannot be started as its spec asks, on this host."""


@dataclass(frozen=True)
class Tools:
    python: str
    setpriv: str
    init: str
    # The launcher as it was when the agent started; it refuses to run a plan of another one.
    launcher_id: str = ""


def find_tools() -> Tools:
    """The launcher's interpreter, util-linux's setpriv and tini (Docker's --init)."""
    missing = []
    found = {}
    for name, package in (("setpriv", "util-linux"), ("tini", "tini")):
        path = shutil.which(name, path=TASK_PATH)
        if path is None:
            missing.append(f"{name} (Debian package {package})")
        found[name] = path or ""
    if missing:
        raise ContainerError(f"cannot contain tasks: {', '.join(missing)} not installed")
    return Tools(python=sys.executable, setpriv=found["setpriv"], init=found["tini"],
                 launcher_id=launch.launcher_id(str(LAUNCHER)))


def hidden_paths(dirs: Sequence[str], files: Sequence[str]) -> list[str]:
    """What to cover: each directory whole unless it is a shared one, in which case only the
    listed files in it; each listed file anyway."""
    out: list[str] = []
    for d in dirs:
        d = os.path.normpath(os.path.abspath(d))
        if d not in SHARED_DIRS and d not in out:
            out.append(d)
    for f in files:
        f = os.path.normpath(os.path.abspath(f))
        if not any(f == h or f.startswith(h + "/") for h in out):
            out.append(f)
    for p in ALWAYS_HIDDEN:
        if p not in out:
            out.append(p)
    return out


def resolve_user(user: str) -> dict[str, Any] | None:
    """--user UID[:GID] or NAME[:GROUP] on this host: uid, gid, supplementary groups, home.
    None for root-by-default. A name this host does not know is an error; a number is not
    (Docker runs unknown numeric ids as they are)."""
    if not user:
        return None
    name, _, group = user.partition(":")
    entry: pwd.struct_passwd | None = None
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        if not name.isdigit():
            raise ContainerError(f"--user {user}: no user {name!r} on this host") from None
    uid = int(name) if name.isdigit() else entry.pw_uid if entry else 0
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise ContainerError(f"--user {user}: no group {group!r} on this host") from None
    else:
        gid = entry.pw_gid if entry is not None else uid
    groups: list[int] = []
    if entry is not None and not group:
        groups = sorted({g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem} - {gid})
    return {"uid": uid, "gid": gid, "groups": groups,
            "home": entry.pw_dir if entry is not None else "/"}


def check_mounts(mounts: Sequence[Mount], hidden: Sequence[str]) -> None:
    """A bind source must exist here and must not reveal what tasks never see."""
    for m in mounts:
        real = os.path.realpath(m.source)
        clash = overlaps(real, [*hidden, *FORBIDDEN_SOURCES])
        if clash is not None:
            raise ContainerError(f"--mount source {m.source}: overlaps {clash}, which tasks "
                                 "never see")
        if not os.path.exists(real):
            raise ContainerError(f"--mount source {m.source} does not exist on this host")


def task_env(base: Mapping[str, str], spec_env: Mapping[str, str], hostname: str,
             home: str) -> dict[str, str]:
    """Scrubbed: PATH, HOSTNAME, HOME, the spec's --env, then meshnet's own variables (which
    the spec cannot override). Nothing of the agent's environment."""
    env = {"PATH": TASK_PATH, "HOSTNAME": hostname, "HOME": home}
    env.update(spec_env)
    env.update(base)
    return env


def build_plan(*, netns_path: str, hostname: str, etc_files: Mapping[str, str],
               containment: Containment, hidden: Sequence[str], env: Mapping[str, str],
               argv: Sequence[str], cgroup_procs: Sequence[str], tools: Tools,
               user: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "netns": netns_path,
        "hostname": hostname,
        "etc": dict(etc_files),
        "mounts": [m.to_value() for m in containment.mounts],
        "hidden": list(hidden),
        "caps": sorted(containment.caps),
        "cap_bits": {c: CAP_NUMBERS[c] for c in sorted(containment.caps)},
        "user": user,
        "env": dict(env),
        "argv": list(argv),
        "cgroup_procs": list(cgroup_procs),
        "setpriv": tools.setpriv,
        "init": tools.init,
        "launcher_id": tools.launcher_id,
        "cwd": "/",
    }


def encode_plan(plan: Mapping[str, Any]) -> bytes:
    """The plan as the launcher reads it (marshal: built in, so the launcher imports nothing to
    read it; it runs our own interpreter, tools.python)."""
    return marshal.dumps(dict(plan))


async def spawn(plan: Mapping[str, Any], tools: Tools, *, stdout: int,
                stderr: int, pass_fds: Sequence[int] = ()) -> asyncio.subprocess.Process:
    """Start the launcher with PLAN on its stdin; its pid leads a new session (the agent stops
    the task by signalling that process group)."""
    proc = await asyncio.create_subprocess_exec(
        tools.python, "-I", "-S", str(LAUNCHER), stdin=asyncio.subprocess.PIPE,
        stdout=stdout, stderr=stderr, start_new_session=True, env={"PATH": TASK_PATH},
        pass_fds=tuple(pass_fds))
    assert proc.stdin is not None
    proc.stdin.write(encode_plan(plan))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await proc.stdin.drain()  # if it died at once, its exit status says why
    proc.stdin.close()
    return proc


# --- running a command inside a running task (health probes) ---------------------------------


def exec_plan(task_plan: Mapping[str, Any], pidfd: int, argv: Sequence[str]) -> dict[str, Any]:
    """A plan that runs ARGV inside the task TASK_PLAN started (launch.py's exec mode): the same
    capabilities, user, environment and cgroups; the task's namespaces through PIDFD (a pidfd
    of the task's PID 1, passed to the launcher at the same number)."""
    keep = ("caps", "cap_bits", "user", "env", "cgroup_procs", "setpriv", "launcher_id")
    return {**{k: task_plan[k] for k in keep}, "mode": "exec", "pidfd": pidfd,
            "argv": list(argv), "cwd": "/"}


def task_init(launcher_pid: int) -> int:
    """The task's PID 1 (tini, the launcher's only child), as a pidfd; ContainerError when it
    is not there (not yet forked, or gone). The launcher is the agent's own child and alive
    while the agent has not reaped it, so its child's pid cannot be reused before the check
    after pidfd_open: the pidfd names that child and nothing else."""
    path = f"/proc/{launcher_pid}/task/{launcher_pid}/children"
    try:
        with open(path) as f:
            children = f.read().split()
        if len(children) != 1:
            raise ContainerError(f"the task's launcher has {len(children)} children, not 1")
        pid = int(children[0])
        fd = os.pidfd_open(pid)
    except (OSError, ValueError) as e:
        raise ContainerError(f"the task's init is not running ({e})") from None
    try:
        if _parent_of(pid) != launcher_pid:
            raise ContainerError("the task's init is gone")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None
