"""Atomic file writes: the only way meshnet puts state on disk outside SQLite.

A crash (even `kill -9`) at any point leaves either the old file or the new one, never a torn
mix: write a temporary file in the same directory, fsync it, rename it over the target, then
fsync the directory so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


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
