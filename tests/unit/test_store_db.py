"""SQLite persistence of the replicated store (meshnet/agent/store_db.py)."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import time
from pathlib import Path

from meshnet import wire
from meshnet.agent.store_db import STORE_DB_FILE, StoreDb
from meshnet.state import NO_HORIZON, Entry, Hlc, Store, StoreConfig

T0 = 1_700_000_000.0


def canon(entries: list[Entry]) -> list[Entry]:
    return sorted(entries, key=lambda e: (e.table, e.key))


def test_roundtrip_wal_and_permissions(tmp_path: Path) -> None:
    db = StoreDb.in_state_dir(tmp_path)
    assert db.load() == [] and db.load_gc_horizon() == NO_HORIZON
    s = Store("a", StoreConfig(tombstone_ttl=5.0))
    s.put("networks", "n1", {"vni": 1}, T0)
    s.put("endpoints", "n1/t", {"node": "a", "ip": "10.0.0.2"}, T0)
    s.put("networks", "gone", {"vni": 2}, T0)
    s.delete("networks", "gone", T0)
    s.put("networks", "dead", {}, T0)
    s.delete("networks", "dead", T0)
    ch = s.take_dirty()
    db.save(ch.upserts, ch.removed, ch.gc_horizon)
    s.handle_timer(T0 + 10)  # collects both tombstones
    ch = s.take_dirty()
    assert len(ch.removed) == 2
    db.save(ch.upserts, ch.removed, ch.gc_horizon)
    db.close()
    path = tmp_path / STORE_DB_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    with StoreDb(path) as db2:
        loaded = db2.load()
        horizon = db2.load_gc_horizon()
        mode = db2._db.execute("PRAGMA journal_mode").fetchone()[0]
        sync = db2._db.execute("PRAGMA synchronous").fetchone()[0]
    assert mode == "wal" and sync == 2  # FULL
    assert canon(loaded) == canon(list(s.entries()))
    assert horizon == s.gc_horizon and horizon[0] > 0
    # seeding a fresh core from it serves the same data at once
    s2 = Store("a")
    s2.load(loaded, T0, horizon)
    assert s2.view("networks") == s.view("networks")
    assert s2.get("endpoints", "n1/t") == {"node": "a", "ip": "10.0.0.2"}


def test_upsert_replaces(tmp_path: Path) -> None:
    with StoreDb(tmp_path / "s.db") as db:
        e1 = Entry("t", "k", wire.pack({"v": 1}), Hlc(1, 0), "a")
        e2 = Entry("t", "k", None, Hlc(2, 0), "b")
        db.save([e1])
        db.save([e2])
        assert db.load() == [e2]


def test_malformed_rows_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with StoreDb(path) as db:
        db.save([Entry("t", "ok", wire.pack({}), Hlc(1, 0), "a")])
    raw = sqlite3.connect(path)
    raw.executemany(
        "INSERT INTO entries (tbl, key, value, hlc, writer, tombstone) VALUES (?, ?, ?, ?, ?, ?)",
        [
            ("t", "neg-hlc", b"\x80", -1, "a", 0),
            ("t", "tomb-with-value", b"\x80", 1, "a", 1),
            ("", "no-table", b"\x80", 1, "a", 0),
            ("t", "text-value", "x", 1, "a", 0),
            (b"blob", "blob-table", b"\x80", 1, "a", 0),
        ],
    )
    raw.commit()
    raw.close()
    with StoreDb(path) as db:
        assert [e.key for e in db.load()] == ["ok"]
        assert db.skipped_rows == 5


def test_garbage_file_is_quarantined_not_fatal(tmp_path: Path) -> None:
    path = tmp_path / STORE_DB_FILE
    path.write_bytes(os.urandom(8192))
    with StoreDb(path) as db:
        assert db.quarantined is not None and db.quarantined.exists()
        assert db.load() == []
        db.save([Entry("t", "k", None, Hlc(1, 0), "a")])
    with StoreDb(path) as db:
        assert len(db.load()) == 1 and db.quarantined is None


# ---- kill -9 during writes ---------------------------------------------------------------------

BATCH = 40


def _writer(path: Path, report_fd: int, seed: int) -> None:  # runs in the forked child
    rnd = random.Random(seed)
    db = StoreDb(path)
    n = max((_batch_of(e) for e in db.load()), default=0)
    while True:
        n += 1
        pad = "x" * rnd.randint(0, 3000)  # vary sizes so kills land in different pages
        entries = [
            Entry("t", f"k{i}", wire.pack({"batch": n, "pad": pad}), Hlc(n, i), "w")
            for i in range(BATCH)
        ]
        removed = [("gone", f"g{n - 1}")]
        entries.append(Entry("gone", f"g{n}", None, Hlc(n, 0), "w"))
        db.save(entries, removed, (n, "w"))
        os.write(report_fd, n.to_bytes(4, "big"))


def _batch_of(e: Entry) -> int:
    if e.table == "t":
        data = e.data()
        assert data is not None
        return int(data["batch"])
    return 0


def test_kill_9_during_writes_never_leaves_a_store_that_fails_to_open(tmp_path: Path) -> None:
    path = tmp_path / STORE_DB_FILE
    rnd = random.Random(4242)
    last = 0
    for round_ in range(20):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: write until killed
            try:
                os.close(r)
                _writer(path, w, round_)
            finally:
                os._exit(1)
        os.close(w)
        # wait (polling with a deadline) until the child has committed a few batches, then
        # kill it at a random moment
        want = rnd.randint(1, 6)
        got = b""
        deadline = time.monotonic() + 30
        while len(got) < 4 * want and time.monotonic() < deadline:
            chunk = os.read(r, 4 * want - len(got))
            if not chunk:
                break
            got += chunk
        time.sleep(rnd.random() * 0.02)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        rest = os.read(r, 1 << 16)
        os.close(r)
        reports = got + rest
        assert len(reports) >= 4, "child never committed"
        committed = int.from_bytes(reports[-4 - (len(reports) % 4) :][:4], "big")

        with StoreDb(path) as db:
            assert db.quarantined is None
            entries = db.load()
            horizon = db.load_gc_horizon()
        assert db.skipped_rows == 0
        batches = {_batch_of(e) for e in entries if e.table == "t"}
        assert len(batches) == 1, f"torn transaction: batches {batches}"
        (n,) = batches
        assert len([e for e in entries if e.table == "t"]) == BATCH
        # every commit the child reported is durable; at most one more may have landed
        assert committed <= n <= committed + 1
        assert n >= last
        assert [e.key for e in entries if e.table == "gone"] == [f"g{n}"]
        assert horizon == (n, "w")
        last = n


def test_store_seeded_from_db_after_restart_serves_at_once(tmp_path: Path) -> None:
    s = Store("a")
    for i in range(100):
        s.put("networks", f"n{i}", {"i": i}, T0)
    with StoreDb(tmp_path / "s.db") as db:
        ch = s.take_dirty()
        db.save(ch.upserts, ch.removed, ch.gc_horizon)
    with StoreDb(tmp_path / "s.db") as db:
        restarted = Store("a")
        assert restarted.load(db.load(), T0 - 50, db.load_gc_horizon()) == 100
    assert restarted.view("networks") == s.view("networks")
    assert restarted.digest() == s.digest()
    # a write after the restart wins over every persisted one, even with the clock behind
    e = restarted.put("networks", "n0", {"i": -1}, T0 - 50)
    assert e.hlc > s.entry("networks", "n0").hlc  # type: ignore[union-attr]


# ---- signatures ------------------------------------------------------------------------------

SIG = bytes(range(64))


def test_signatures_round_trip(tmp_path: Path) -> None:
    s = Store("a", StoreConfig(signer=lambda msg: (msg * 64)[:64]))
    s.put("networks", "n1", {"vni": 1}, T0)
    s.put("networks", "gone", {"vni": 2}, T0)
    s.delete("networks", "gone", T0)
    unsigned = Entry("networks", "old", wire.pack({"vni": 3}), Hlc(5, 0), "b")
    with StoreDb(tmp_path / "s.db") as db:
        db.save([*s.take_dirty().upserts, unsigned])
        raw = dict(db._db.execute("SELECT key, sig FROM entries").fetchall())
    assert raw["old"] is None and len(raw["n1"]) == 64 and len(raw["gone"]) == 64
    with StoreDb(tmp_path / "s.db") as db:
        loaded = db.load()
    assert canon(loaded) == canon([*s.entries(), unsigned])
    assert all(len(e.sig) == 64 for e in loaded if e.key != "old")
    s2 = Store("a")
    assert s2.load(loaded, T0) == 3 and canon(list(s2.entries())) == canon(loaded)
    assert s2.digest() != Store("x").digest()


def test_rows_with_a_malformed_sig_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with StoreDb(path) as db:
        db.save([Entry("t", "ok", wire.pack({}), Hlc(1, 0), "a", SIG)])
    raw = sqlite3.connect(path)
    raw.executemany(
        "INSERT INTO entries (tbl, key, value, hlc, writer, tombstone, sig)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            ("t", "short", b"\x80", 1, "a", 0, SIG[:63]),
            ("t", "long", b"\x80", 1, "a", 0, SIG + b"x"),
            ("t", "empty", b"\x80", 1, "a", 0, b""),
            ("t", "text", None, 1, "a", 1, "x" * 64),
            ("t", "int", None, 1, "a", 1, 7),
            ("t", "null", None, 1, "a", 1, None),
        ],
    )
    raw.commit()
    raw.close()
    with StoreDb(path) as db:
        assert sorted((e.key, e.sig) for e in db.load()) == [("null", b""), ("ok", SIG)]
        assert db.skipped_rows == 5


_OLD_SCHEMA = """
CREATE TABLE entries (
    tbl       TEXT    NOT NULL,
    key       TEXT    NOT NULL,
    value     BLOB,
    hlc       INTEGER NOT NULL,
    writer    TEXT    NOT NULL,
    tombstone INTEGER NOT NULL,
    PRIMARY KEY (tbl, key)
) WITHOUT ROWID;
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value NOT NULL
) WITHOUT ROWID;
PRAGMA user_version=1;
"""


def test_a_database_from_before_signatures_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / STORE_DB_FILE
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.executescript(_OLD_SCHEMA)
    raw.executemany(
        "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)",
        [("networks", "n1", wire.pack({"vni": 1}), 7, "a", 0), ("networks", "n2", None, 8, "b", 1)],
    )
    raw.executemany("INSERT INTO meta VALUES (?, ?)",
                    [("gc_horizon", 3), ("gc_horizon_writer", "a")])
    raw.commit()
    raw.close()
    with StoreDb(path) as db:
        cols = [row[1] for row in db._db.execute("PRAGMA table_info(entries)").fetchall()]
        assert cols[-1] == "sig"
        assert db._db.execute("PRAGMA user_version").fetchone()[0] == 1
        old = db.load()
        assert canon(old) == [
            Entry("networks", "n1", wire.pack({"vni": 1}), Hlc.unpack(7), "a"),
            Entry("networks", "n2", None, Hlc.unpack(8), "b"),
        ]
        assert db.skipped_rows == 0 and db.load_gc_horizon() == (3, "a")
        db.save([Entry("networks", "n3", None, Hlc.unpack(9), "a", SIG)])
    with StoreDb(path) as db:  # opened again: nothing more to migrate, everything there
        assert [row[1] for row in db._db.execute("PRAGMA table_info(entries)")].count("sig") == 1
        assert {e.key: e.sig for e in db.load()} == {"n1": b"", "n2": b"", "n3": SIG}
