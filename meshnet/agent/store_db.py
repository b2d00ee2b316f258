"""SQLite persistence of the replicated store (the agent side: this module does I/O).

One database file in the state dir, ``store.db``, in WAL mode, holding one table of entries
(``entries``) and a one-row-per-setting ``meta`` table (the GC horizon). The agent calls
``load`` once at start to seed the core (and serves that copy at once), then ``save`` with the
batches ``Store.take_dirty`` hands it. The calls block: run them in an executor thread.

Crash safety
------------
Every ``save`` is one transaction (``BEGIN IMMEDIATE`` .. ``COMMIT``). In WAL mode a transaction
is appended to ``store.db-wal`` and becomes visible only when its commit frame is written, so a
``kill -9`` at any instant leaves the previous commit or the new one, never a torn mix, and the
next open replays or discards the tail of the log (tests/unit/test_store_db.py kills a writer
at random moments and reopens it, several rounds).

``synchronous=FULL``, not NORMAL
--------------------------------
Against a *process* crash (``kill -9``, OOM) both are safe: a commit is in the OS page cache
once ``COMMIT`` returns. They differ on power loss or a kernel crash: with NORMAL the last
transactions before the fsync at checkpoint time can vanish (the database stays consistent).
The issue asks that nothing be lost if all but one agent die, and a rack-wide power cut is the
case where every other copy dies too, so the survivor's copy must be on the platter when
``save`` returns. FULL costs one fsync of the WAL per commit, and the agent commits batches
(every change since the last save), not single writes, so that is a few fsyncs a second at the
very most.

Signatures
----------
Each row carries its entry's signature in ``sig`` (NULL: unsigned). A database from before
signatures lacks the column; ``open`` adds it (``ALTER TABLE entries ADD COLUMN sig BLOB``, a
metadata-only change in SQLite: no row is rewritten) when ``PRAGMA table_info`` does not list it,
and every old row reads as unsigned. The change is additive, so the schema version stays 1: an
older agent still reads and writes the file (its statements name their columns, and a row it
rewrites becomes unsigned, which is what it holds).

A full disk makes ``save`` raise ``StoreDbError`` with ``disk_full`` set; the transaction is
rolled back whole, so the file holds the previous commit and the caller keeps the batch and
saves it again later (agent/state_service.py).

Damage we cannot recover from (a disk error, a file that is not a database) is not fatal
either: the damaged files are moved aside as ``store.db.corrupt-N`` and the agent starts empty;
its peers refill it by anti-entropy.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from meshnet.state.hlc import MAX_HLC, Hlc
from meshnet.state.store import NO_HORIZON, Horizon
from meshnet.state.types import (
    MAX_KEY_BYTES,
    MAX_TABLE_NAME_BYTES,
    MAX_VALUE_BYTES,
    MAX_WRITER_BYTES,
    SIG_BYTES,
    Entry,
)

__all__ = ["SCHEMA_VERSION", "STORE_DB_FILE", "StoreDb", "StoreDbError"]

STORE_DB_FILE = "store.db"
SCHEMA_VERSION = 1
# How long a statement waits for a lock held by another connection before failing. Only one
# agent uses a state dir; this covers a checkpoint by a second reader such as a debugging shell.
BUSY_TIMEOUT_S = 5.0
# sqlite3 result codes that mean the file itself is damaged (not a lock or an I/O hiccup).
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    tbl       TEXT    NOT NULL,
    key       TEXT    NOT NULL,
    value     BLOB,
    hlc       INTEGER NOT NULL,
    writer    TEXT    NOT NULL,
    tombstone INTEGER NOT NULL,
    sig       BLOB,
    PRIMARY KEY (tbl, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value NOT NULL
) WITHOUT ROWID;
"""


# What load and load_gc_horizon read; a table without them cannot be used.
_COLUMNS = {
    "entries": frozenset({"tbl", "key", "value", "hlc", "writer", "tombstone", "sig"}),
    "meta": frozenset({"name", "value"}),
}


class StoreDbError(Exception):
    """The store database could not be opened or written; ``disk_full``: for want of space
    (SQLITE_FULL, or ENOSPC/EDQUOT), which the agent expects and retries."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


def _no_space(directory: Path) -> bool:
    """Less room left in DIRECTORY's file system than a WAL index needs (32 KiB)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


def _is_full(e: BaseException) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF == _SQLITE_FULL:
        return True
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


class _Damaged(Exception):
    """The file opened but failed its integrity check."""


def _damaged(e: BaseException) -> bool:
    # UnicodeDecodeError: sqlite3 could not decode SQLite's error message, which quotes names
    # read from the file's own (damaged) schema, e.g. "malformed database schema (e\xf7tries)".
    if isinstance(e, _Damaged | UnicodeDecodeError):
        return True
    return getattr(e, "sqlite_errorcode", None) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


class StoreDb:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.quarantined: Path | None = None  # where a damaged database was moved, if it was
        self.skipped_rows = 0  # malformed rows ``load`` ignored
        # Opened in exclusive locking mode (a full disk had no room for the -shm file).
        self.exclusive = False
        try:
            self._db = self._open()
        except (sqlite3.Error, _Damaged, UnicodeDecodeError, OSError) as e:
            if not _damaged(e) and (_is_full(e) or _no_space(self.path.parent)):
                # WAL keeps its index in the -shm file, which needs room on disk; in exclusive
                # locking mode SQLite keeps that index in memory, so a full disk can still be
                # read (writes fail with SQLITE_FULL until space returns). Only this agent
                # uses the file, so the lock costs nothing but a debugging shell's reads.
                try:
                    self._db = self._open(exclusive=True)
                    self.exclusive = True
                    return
                except (sqlite3.Error, _Damaged, UnicodeDecodeError, OSError) as e2:
                    raise StoreDbError(f"{self.path}: {e2}", disk_full=True) from None
            if not _damaged(e):
                raise StoreDbError(f"{self.path}: {e}", disk_full=_is_full(e)) from None
            self.quarantined = self._quarantine()
            try:
                self._db = self._open()
            except (sqlite3.Error, _Damaged, UnicodeDecodeError) as e2:
                raise StoreDbError(f"{self.path}: {e2}") from None

    @classmethod
    def in_state_dir(cls, state_dir: str | os.PathLike[str]) -> StoreDb:
        return cls(Path(state_dir) / STORE_DB_FILE)

    def _open(self, *, exclusive: bool = False) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            # create it 0600 ourselves: SQLite would use the umask, and the -wal/-shm files it
            # makes later copy the main file's permissions
            fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
        db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        db.text_factory = _text_or_bytes
        try:
            if exclusive:
                db.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreDbError(f"{self.path}: cannot enable WAL mode (got {mode})")
            db.execute("PRAGMA synchronous=FULL")
            check = db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise _Damaged(f"quick_check: {check}")
            db.executescript(_SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(entries)").fetchall()}
            if "sig" not in columns:  # a database from before signatures (see above)
                db.execute("ALTER TABLE entries ADD COLUMN sig BLOB")
            for table, want in _COLUMNS.items():  # a damaged schema text renames columns
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})").fetchall()}
                if not want <= have:
                    raise _Damaged(f"table {table} lacks columns {sorted(want - have)}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise StoreDbError(f"{self.path}: schema {version} is newer than this agent")
        except BaseException:
            db.close()
            raise
        return db

    def _quarantine(self) -> Path:
        n = 0
        while True:
            dest = self.path.with_name(f"{self.path.name}.corrupt-{n}")
            if not dest.exists():
                break
            n += 1
        os.replace(self.path, dest)
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            with contextlib.suppress(FileNotFoundError):
                os.replace(side, dest.with_name(dest.name + suffix))
        return dest

    # ---- reading -------------------------------------------------------------------------------

    def load(self) -> list[Entry]:
        """Every persisted entry; a malformed row is skipped (and counted in skipped_rows)."""
        out: list[Entry] = []
        try:
            rows = self._db.execute(
                "SELECT tbl, key, value, hlc, writer, tombstone, sig FROM entries"
            ).fetchall()
        except sqlite3.Error as e:
            raise StoreDbError(f"{self.path}: {e}") from None
        for tbl, key, value, hlc, writer, tombstone, sig in rows:
            entry = _row_entry(tbl, key, value, hlc, writer, tombstone, sig)
            if entry is None:
                self.skipped_rows += 1
            else:
                out.append(entry)
        return out

    def load_gc_horizon(self) -> Horizon:
        """The store's GC horizon as last saved (``NO_HORIZON`` if none or unreadable)."""
        try:
            rows = dict(
                self._db.execute(
                    "SELECT name, value FROM meta WHERE name IN ('gc_horizon', 'gc_horizon_writer')"
                ).fetchall()
            )
        except sqlite3.Error as e:
            raise StoreDbError(f"{self.path}: {e}") from None
        hlc, writer = rows.get("gc_horizon"), rows.get("gc_horizon_writer")
        if type(hlc) is not int or not 0 <= hlc <= MAX_HLC or type(writer) is not str:
            return NO_HORIZON
        return (hlc, writer)

    # ---- writing -------------------------------------------------------------------------------

    def save(
        self,
        entries: Iterable[Entry],
        removed: Iterable[tuple[str, str]] = (),
        gc_horizon: Horizon | None = None,
    ) -> None:
        """Upsert ``entries``, delete ``removed`` and record ``gc_horizon``, in one transaction."""
        rows = [
            (e.table, e.key, e.value, e.hlc.pack(), e.writer, 1 if e.value is None else 0,
             e.sig or None)
            for e in entries
        ]
        gone = list(removed)
        db = self._db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany(
                    "INSERT OR REPLACE INTO entries (tbl, key, value, hlc, writer, tombstone, sig)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                if gone:
                    db.executemany("DELETE FROM entries WHERE tbl = ? AND key = ?", gone)
                if gc_horizon is not None:
                    db.executemany(
                        "INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)",
                        [("gc_horizon", gc_horizon[0]), ("gc_horizon_writer", gc_horizon[1])],
                    )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StoreDbError(f"{self.path}: {e}", disk_full=_is_full(e)) from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StoreDb:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _text_or_bytes(raw: bytes) -> str | bytes:
    """SQLite TEXT as str; text that is not UTF-8 (a damaged row) stays bytes, which no check
    here takes for text, so its row is skipped instead of failing the whole ``load``."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


def _text(value: object, max_bytes: int) -> bool:
    return type(value) is str and 0 < len(value.encode()) <= max_bytes


def _row_entry(
    tbl: object, key: object, value: object, hlc: object, writer: object, tombstone: object,
    sig: object = None,
) -> Entry | None:
    if not (
        _text(tbl, MAX_TABLE_NAME_BYTES)
        and _text(key, MAX_KEY_BYTES)
        and _text(writer, MAX_WRITER_BYTES)
    ):
        return None
    if type(hlc) is not int or not 0 <= hlc <= MAX_HLC:
        return None
    if tombstone == 1:
        if value is not None:
            return None
        blob = None
    elif tombstone == 0 and type(value) is bytes and len(value) <= MAX_VALUE_BYTES:
        blob = value
    else:
        return None
    if sig is None:
        signature = b""
    elif type(sig) is bytes and len(sig) == SIG_BYTES:
        signature = sig
    else:
        return None
    assert type(tbl) is str and type(key) is str and type(writer) is str
    return Entry(tbl, key, blob, Hlc.unpack(hlc), writer, signature)
