"""A full disk under the agent's state dir: saves fail cleanly, nothing is lost, and every change
is written once space returns (the netns test does it on a real tmpfs)."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

import pytest

from meshnet.agent import identity, state_service
from meshnet.agent.state_service import StateService
from meshnet.agent.store_db import StoreDb, StoreDbError
from meshnet.fsutil import DEFERRED, DeferredWrites, is_disk_full
from meshnet.state import Entry, Store

T0 = 1_700_000_000.0
NET = {"name": "n1", "vni": 4097, "subnet": "10.10.0.0/24", "encrypted": False}


class FlakyDb:
    """A StoreDb stand-in whose disk is full until `full` is cleared."""

    def __init__(self) -> None:
        self.full = True
        self.rows: dict[tuple[str, str], Entry] = {}
        self.attempts = 0

    def save(self, entries: list[Entry], removed: list[tuple[str, str]] = [],  # noqa: B006
             gc_horizon: Any = None) -> None:
        self.attempts += 1
        if self.full:
            raise StoreDbError("store.db: database or disk is full", disk_full=True)
        for e in entries:
            self.rows[(e.table, e.key)] = e
        for k in removed:
            self.rows.pop(k, None)

    def close(self) -> None:
        pass


def net(name: str) -> dict[str, Any]:
    return {**NET, "name": name}


async def test_a_full_disk_keeps_every_change_and_saves_it_when_space_returns(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_service, "SAVE_RETRY_S", 3600.0)  # the test drives the retries
    db = FlakyDb()
    svc = StateService(Store("h1"), db, "h1")  # type: ignore[arg-type]
    caplog.set_level(logging.INFO)
    await svc.put("networks", "n1", net("n1"))  # answered: the write stands (and is gossiped)
    await svc.put("networks", "n2", net("n2"))
    await svc.delete("networks", "n1")
    c = svc.counters
    assert c["save_errors"] == 3 and c["disk_full"] is True and c["unsaved"] == 2
    assert svc.store.get("networks", "n2") is not None  # nothing lost in memory
    assert svc.retry_timer is not None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "disk full" in errors[0].getMessage()
    assert errors[0].exc_info is None  # one line, no stack trace

    db.full = False
    await svc._retry()
    assert svc.counters["unsaved"] == 0 and svc.counters["disk_full"] is False
    assert db.rows[("networks", "n2")].value is not None
    assert db.rows[("networks", "n1")].value is None  # the delete, as a tombstone
    assert any("saved to disk again" in r.getMessage() for r in caplog.records)
    assert svc.retry_timer is None or not svc._unsaved
    if svc.retry_timer is not None:
        svc.retry_timer.cancel()


async def test_a_later_change_to_an_unsaved_key_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_service, "SAVE_RETRY_S", 3600.0)
    db = FlakyDb()
    svc = StateService(Store("h1"), db, "h1")  # type: ignore[arg-type]
    await svc.put("networks", "n1", net("n1"))
    await svc.put("networks", "n1", {**net("n1"), "vni": 5000})
    db.full = False
    await svc.flush()
    assert db.rows[("networks", "n1")] == svc.store.entry("networks", "n1")  # the vni 5000 one
    assert svc.counters["unsaved"] == 0
    if svc.retry_timer is not None:
        svc.retry_timer.cancel()


def test_deferred_writes_keep_the_latest_content_until_space_returns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from meshnet import fsutil

    real = fsutil.atomic_write
    full = [True]

    def maybe_full(path: Any, data: bytes, mode: int = 0o600) -> None:
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data, mode)

    monkeypatch.setattr(fsutil, "atomic_write", maybe_full)
    d = DeferredWrites()
    target = tmp_path / "node.json"
    assert d.write(target, b"one") is False
    assert d.write(target, b"two") is False
    assert d.retry() == 1 and d.failures == 3 and not target.exists()
    full[0] = False
    assert d.retry() == 0 and target.read_bytes() == b"two" and not d.pending
    # any other error is raised, as before
    full[0] = False
    monkeypatch.setattr(fsutil, "atomic_write",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EACCES, "denied")))
    with pytest.raises(OSError):
        d.write(target, b"three")
    assert is_disk_full(OSError(errno.EDQUOT, "quota")) and not is_disk_full(ValueError())


def test_node_record_on_a_full_disk_runs_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from meshnet import fsutil

    real = fsutil.atomic_write
    identity.load_or_create(str(tmp_path), "h1")
    monkeypatch.setattr(fsutil, "atomic_write",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    try:
        rec = identity.load_or_create(str(tmp_path), "h1")  # no exception
        assert rec.boots == 2
        assert identity.save(str(tmp_path), rec) is False
        warnings = [r for r in caplog.records if "disk is full" in r.getMessage()]
        assert len(warnings) == 1  # one line per outage
        monkeypatch.setattr(fsutil, "atomic_write", real)
        assert DEFERRED.retry() == 0
        assert identity.load_or_create(str(tmp_path), "h1").boots == 3
    finally:
        DEFERRED.pending.clear()


def test_store_db_error_says_disk_full() -> None:
    assert StoreDbError("x", disk_full=True).disk_full
    assert not StoreDbError("x").disk_full


def test_store_db_opens_on_a_new_file(tmp_path: Path) -> None:
    db = StoreDb(tmp_path / "s.db")
    assert db.exclusive is False
    db.close()
