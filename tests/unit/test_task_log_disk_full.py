"""A task's output log on a full disk (#15, found by the chaos soak, seed 1): closing the log
raised ENOSPC in the task's `finally`, so its sandbox was never torn down, and every restart of
the task was then refused ("namespace already held"): one frontend slot stayed down for good.
The log is now best effort: what the disk refuses is dropped and counted, never raised."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest

from meshnet.agent.services import _CappedLog


class FullDisk:
    def write(self, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_never_raises_out_of_the_task_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = _CappedLog(tmp_path / "web.1.log")
    log.write(b"before\n")
    log.f.close()
    log.f = FullDisk()  # type: ignore[assignment]
    log.write(b"lost output\n")
    with caplog.at_level(logging.WARNING):
        log.close()
    assert log.dropped == len(b"lost output\n")
    assert (tmp_path / "web.1.log").read_bytes() == b"before\n"
    [record] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "12 bytes of the task's output not logged" in record.getMessage()
    assert record.exc_info is None
