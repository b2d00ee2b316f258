"""Atomic file writes: the only way meshnet puts state on disk outside SQLite.

A crash (even `kill -9`) at any point leaves either the old file or the new one, never a torn
mix: write a temporary file in the same directory, fsync it, rename it over the target, then
fsync the directory so the rename itself survives a power cut.

A full disk (ENOSPC, EDQUOT) is an expected failure, not a bug: ``DEFERRED.write`` keeps what
could not be written (the latest content of each file) and ``DEFERRED.retry`` writes it when
space returns (the agent's store retry loop calls it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_disk_full(e: BaseException) -> bool:
    """E says the file system has no room (or the quota is used up)."""
    return isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> int:
    """Delete temporaries left by a write that was killed mid-way; returns how many."""
    removed = 0
    for p in Path(directory).glob(".*.tmp"):
        try:
            p.unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


class DeferredWrites:
    """Atomic writes that failed for want of space, kept to be written again: per file, only
    its latest content. Any other error is raised as before."""

    def __init__(self) -> None:
        self.pending: dict[Path, tuple[bytes, int]] = {}
        self.failures = 0  # every write (first or retried) that failed for want of space

    def write(self, path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> bool:
        """atomic_write; False if the disk is full (the content is then kept for retry)."""
        target = Path(path)
        try:
            atomic_write(target, data, mode)
        except OSError as e:
            if not is_disk_full(e):
                raise
            self.failures += 1
            self.pending[target] = (data, mode)
            return False
        self.pending.pop(target, None)
        return True

    def retry(self) -> int:
        """Write every kept file again; returns how many are still pending."""
        for target, (data, mode) in list(self.pending.items()):
            try:
                atomic_write(target, data, mode)
            except OSError:
                self.failures += 1
                continue
            if self.pending.get(target) == (data, mode):  # not replaced meanwhile
                del self.pending[target]
        return len(self.pending)


# The process's deferred writes (node.json and the like); the agent retries them.
DEFERRED = DeferredWrites()
