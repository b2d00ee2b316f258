"""Named network namespaces and sockets inside them, without forking.

setns(2) with CLONE_NEWNET changes the namespace of the calling *thread* only, and a socket keeps
the namespace it was created in for its whole life. So to get a socket inside namespace NS we
start a fresh, short-lived thread, let it join NS, create (and bind) the socket there, and hand
the socket back; the thread then exits and takes its namespace switch with it. The caller's
threads never change namespace, and nothing forks (pyroute2's own `netns=` support forks a child
per socket, which is slow and unsafe in a threaded asyncio process).

This is how the agent opens the DNS listener at 127.0.0.11:53 inside each sandbox, and how
platform/ gets a netlink socket for a sandbox or a test host.

Named namespaces follow iproute2's convention (`ip netns add`): an empty file under /run/netns
onto which /proc/thread-self/ns/net is bind-mounted, /run/netns itself being a shared mount so
that the bind mount propagates to other mount namespaces. The thread that creates one unshares
into the new namespace and exits; the bind mount keeps the namespace alive.

Python 3.11 has no os.setns/os.unshare (3.12 does), so libc is called through ctypes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

NETNS_RUN_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
# mount(2) / umount2(2) flags (linux/mount.h)
MS_REC = 0x4000
MS_BIND = 0x1000
MS_SHARED = 1 << 20
MNT_DETACH = 2
# A namespace name is a file name under /run/netns; keep it shell- and path-safe: ASCII only,
# matched whole (fullmatch: `$` would also match before a final newline).
NETNS_NAME_MAX = 64
NETNS_NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{NETNS_NAME_MAX - 1}}}")
# Joining a namespace and creating a socket takes microseconds; a thread that has not finished
# after this long is wedged (it cannot be killed, but we stop waiting and say so).
THREAD_TIMEOUT_S = 10.0

T = TypeVar("T")


class PlatformError(Exception):
    """A kernel operation of platform/ failed; the message says which and why, on one line."""


_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    return _libc


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NETNS_NAME_RE.fullmatch(name):
        raise PlatformError(f"bad namespace name {str(name)[:80]!r}: use 1-{NETNS_NAME_MAX} "
                            "of A-Z a-z 0-9 _ . -")
    return name


def netns_path(name: str) -> Path:
    return NETNS_RUN_DIR / check_name(name)


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def list_netns(prefix: str = "") -> list[str]:
    """Names of the named network namespaces starting with PREFIX, sorted."""
    try:
        return sorted(p.name for p in NETNS_RUN_DIR.iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def _in_fresh_thread(fn: Callable[[], T], what: str) -> T:
    """Run FN in a new thread (never a pooled one: it may change namespace) and return its
    result or raise its exception here."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # re-raised in the caller
            error.append(e)

    t = threading.Thread(target=body, name=f"netns:{what}", daemon=True)
    t.start()
    t.join(THREAD_TIMEOUT_S)
    if t.is_alive():
        raise PlatformError(f"{what}: still running after {THREAD_TIMEOUT_S:g}s")
    if error:
        raise error[0]
    return result[0]


def _setns_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_c().setns(fd, CLONE_NEWNET), f"setns {path}")
    finally:
        os.close(fd)


def call_in_netns(name: str | None, fn: Callable[[], T]) -> T:
    """FN() evaluated by a short-lived thread inside named namespace NAME (None: the caller's
    namespace, run directly). Whatever FN creates (sockets) stays in NAME."""
    if name is None:
        return fn()
    path = netns_path(name)
    if not path.exists():
        raise PlatformError(f"network namespace {name!r} does not exist")

    def body() -> T:
        _setns_path(path)
        return fn()

    return _in_fresh_thread(body, name)


def call_in_netns_at(path: Path, fn: Callable[[], T]) -> T:
    """FN() evaluated by a short-lived thread inside the network namespace at PATH (e.g. a
    process's /proc/PID/ns/net, for a namespace whose /run/netns bind lives in another mount
    namespace)."""

    def body() -> T:
        _setns_path(path)
        return fn()

    return _in_fresh_thread(body, str(path))


def open_socket_in_netns(
    ns_name: str | None,
    family: int = socket.AF_INET,
    type: int = socket.SOCK_DGRAM,
    bind_addr: Any = None,
    *,
    proto: int = 0,
    reuse_addr: bool = False,
    nonblocking: bool = False,
) -> socket.socket:
    """A socket created (and bound to BIND_ADDR unless None) inside namespace NS_NAME.

    The socket stays in that namespace after the helper thread exits; e.g. the DNS listener:
    open_socket_in_netns("sb1", socket.AF_INET, socket.SOCK_DGRAM, ("127.0.0.11", 53)).
    """

    def make() -> socket.socket:
        s = socket.socket(family, type, proto)
        try:
            if reuse_addr:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if bind_addr is not None:
                s.bind(bind_addr)
            s.setblocking(not nonblocking)
        except BaseException:
            s.close()
            raise
        return s

    try:
        return call_in_netns(ns_name, make)
    except OSError as e:
        where = f" in netns {ns_name}" if ns_name else ""
        raise PlatformError(f"cannot open socket {bind_addr!r}{where}: {e.strerror or e}") from e


def _share_run_dir() -> None:
    """Make /run/netns a shared mount point, as iproute2 does, so that namespace bind mounts
    made here are seen by every mount namespace (and ours see theirs)."""
    NETNS_RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    c = _c()
    d = str(NETNS_RUN_DIR).encode()
    if c.mount(b"none", d, b"none", MS_SHARED | MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
        _check(-1, f"mount --make-rshared {NETNS_RUN_DIR}")
    _check(c.mount(d, d, b"none", MS_BIND | MS_REC, None), f"mount --bind {NETNS_RUN_DIR}")
    _check(c.mount(b"none", d, b"none", MS_SHARED | MS_REC, None), f"make-shared {d.decode()}")


def create_netns(name: str) -> bool:
    """`ip netns add NAME` unless it exists; True if it was created. Never forks."""
    path = netns_path(name)
    if path.exists():
        return False
    _share_run_dir()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0)
    except FileExistsError:
        return False  # someone else made it at the same moment
    os.close(fd)

    def body() -> None:
        c = _c()
        _check(c.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        src = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
        _check(c.mount(src, str(path).encode(), b"none", MS_BIND, None), f"bind {path}")

    try:
        _in_fresh_thread(body, f"create {name}")
    except (OSError, PlatformError) as e:
        with contextlib.suppress(OSError):
            path.unlink()
        raise PlatformError(f"cannot create network namespace {name}: {e}") from e
    return True


def delete_netns(name: str) -> bool:
    """`ip netns del NAME` if it exists; True if it was removed.

    The namespace itself lives on while any process, thread or socket still holds it (a socket
    from open_socket_in_netns does): close those, or delete its links by hand first.
    """
    path = netns_path(name)
    if not path.exists():
        return False
    # Detach the bind mount (EINVAL: not mounted, e.g. a half-made one) and remove the file.
    if _c().umount2(str(path).encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise PlatformError(f"cannot unmount {path}: {os.strerror(err)}")
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:
        raise PlatformError(f"cannot remove {path}: {e.strerror}") from e
    return True
