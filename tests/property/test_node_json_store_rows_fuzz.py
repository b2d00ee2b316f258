"""Fuzz what the agent reads back from its state dir (issue #14, "Fuzzing"): ``node.json``
(agent/identity.py) and the store's database rows (agent/store_db.py, then Store.load).

Both may be damaged on disk (a bad sector, a hand edit, a crash of something else). Neither may
keep the agent from starting: an unusable node record is set aside and a fresh one made; a
malformed row is skipped and counted; a damaged database file is moved aside. Only the error
types these modules document may come out (StateDirError, StoreDbError), and whatever is
loaded is well-formed and passes the schema.
"""

from __future__ import annotations

import json
import re
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import msgpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshnet.agent import identity
from meshnet.agent.store_db import STORE_DB_FILE, StoreDb, StoreDbError
from meshnet.membership import MAX_CLAIM_INCARNATION
from meshnet.state import SIG_BYTES, Entry, Hlc, Store, StoreConfig, codec
from meshnet.state.hlc import MAX_HLC
from meshnet.state.types import MAX_KEY_BYTES, MAX_TABLE_NAME_BYTES, MAX_WRITER_BYTES
from meshnet.state.validate import TASKS, check_value

T0 = 1_700_000_000.0

# ---- node.json ----------------------------------------------------------------------------

_HEX32 = re.compile(r"[0-9a-f]{32}")
GOOD_ID = "0123456789abcdef" * 2
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats()
                | st.text(max_size=40))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
COUNTS = st.sampled_from([0, 1, -1, MAX_CLAIM_INCARNATION - 2, MAX_CLAIM_INCARNATION - 1,
                          1 << 63, 1 << 48, (1 << 48) - 1, True, 1.0, "1", None]) | JSON
NODE_IDS = st.sampled_from([GOOD_ID, GOOD_ID.upper(), GOOD_ID[:-1], GOOD_ID + "0",
                            GOOD_ID + "\n", "\u0660" * 32, ""]) | JSON
RECORDS = st.fixed_dictionaries({}, optional={
    "node_id": NODE_IDS, "name": JSON, "boots": COUNTS, "incarnation": COUNTS,
    "fresh_epoch": COUNTS, "extra": JSON})


def _usable(doc: object) -> bool:
    """node.json's rules, stated independently of identity._parse."""
    if not isinstance(doc, dict) or not {"node_id", "boots", "incarnation"} <= set(doc):
        return False
    node_id, boots, inc = doc["node_id"], doc["boots"], doc["incarnation"]
    epoch = doc.get("fresh_epoch", 0)
    return (type(node_id) is str and _HEX32.fullmatch(node_id) is not None
            and type(boots) is int and boots >= 0
            and type(inc) is int and 0 <= inc < MAX_CLAIM_INCARNATION - 1
            and type(epoch) is int and 0 <= epoch < 1 << 48)


def _encodings(doc: object) -> st.SearchStrategy[bytes]:
    text = json.dumps(doc)
    return st.sampled_from([text.encode(), text.encode("utf-16"), b"\xef\xbb\xbf" + text.encode(),
                            text.encode() + b"\n\0", text.encode()[:-1]])


CONTENTS = (st.binary(max_size=300)
            | RECORDS.flatmap(_encodings)
            | JSON.map(lambda d: json.dumps(d).encode())
            | st.integers(1, 5000).map(lambda n: b"[" * n)
            | st.integers(500, 819).map(lambda n: b'{"a":' * n)
            | st.sampled_from([b"x" * 5000, b'{"node_id": "' + GOOD_ID.encode() + b'"' + b" " * 5000
                               + b', "boots": 1, "incarnation": 1}', b"NaN", b"{}"]))


def _assert_record_ok(rec: identity.NodeRecord) -> None:
    assert _HEX32.fullmatch(rec.node_id) and rec.name == "n1"
    assert rec.boots >= 1 and 1 <= rec.incarnation < MAX_CLAIM_INCARNATION
    assert 0 <= rec.fresh_epoch < 1 << 48


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CONTENTS)
@example(b"[" * 3000)  # json's own recursion limit: RecursionError, once not caught
@example(json.dumps({"node_id": GOOD_ID, "boots": 4, "incarnation": 9}).encode())
def test_node_json_any_content_starts_the_node(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / identity.NODE_FILE
        path.write_bytes(content)
        try:
            doc = json.loads(content) if len(content) <= identity.MAX_NODE_FILE_BYTES else None
        except (ValueError, RecursionError):
            doc = None
        # the parser itself: a record, or one of the errors load_or_create handles
        try:
            parsed = identity._parse(path, "n1")
        except (OSError, ValueError, KeyError, TypeError):
            parsed = None
        assert (parsed is not None) == _usable(doc)

        rec = identity.load_or_create(d, "n1")
        _assert_record_ok(rec)
        aside = sorted(p.name for p in Path(d).iterdir() if p.name.startswith("node.json.bad-"))
        if parsed is not None:
            assert aside == []
            assert (rec.node_id, rec.boots, rec.incarnation, rec.fresh_epoch) == (
                parsed.node_id, parsed.boots + 1, parsed.incarnation + 1, parsed.fresh_epoch)
        else:
            assert len(aside) == 1 and (Path(d) / aside[0]).read_bytes() == content
            assert (rec.boots, rec.incarnation) == (1, 1)
        # what it wrote is read back as it is, and the next start counts on from it (but at
        # the very top of the incarnation range, where it starts afresh)
        again = identity.load_or_create(d, "n1")
        _assert_record_ok(again)
        if rec.incarnation < MAX_CLAIM_INCARNATION - 2:
            assert (again.node_id, again.boots, again.incarnation) == (
                rec.node_id, rec.boots + 1, rec.incarnation + 1)


# ---- the store's database rows ---------------------------------------------------------------

NET = {"name": "n1", "vni": 5000, "subnet": "10.1.0.0/24", "encrypted": False}
GOOD_VALUE = msgpack.packb(NET)


class BadText:
    """A TEXT cell whose bytes are not UTF-8 (a damaged row)."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw

    def __repr__(self) -> str:
        return f"BadText({self.raw!r})"


INT64 = st.integers(-(1 << 63), (1 << 63) - 1)  # what SQLite stores as INTEGER


def _texts(limit: int, good: list[str]) -> st.SearchStrategy[object]:
    return (st.sampled_from([*good, "", "x" * (limit + 1), "\u00e9" * (limit // 2 + 1)])
            | st.text(max_size=10) | st.binary(max_size=8) | st.integers(-5, 5)
            | st.floats(allow_nan=False)  # (SQLite stores NaN as NULL)
            | st.binary(min_size=1, max_size=6).map(lambda b: BadText(b"\xff" + b)))


TABLES = _texts(MAX_TABLE_NAME_BYTES, ["networks", "endpoints", "tasks", "zz"])
KEYS = _texts(MAX_KEY_BYTES, ["n1", "n2", "n1/a@h2"])
WRITERS = _texts(MAX_WRITER_BYTES, ["h1", "h2"])
VALUES = (st.none() | st.just(GOOD_VALUE) | st.binary(max_size=40)
          | st.dictionaries(st.text(max_size=5), INT64, max_size=3).map(msgpack.packb)
          | st.sampled_from([msgpack.packb({**NET, "vni": 1}), msgpack.packb([1]), b"\xc1", "text"])
          | st.integers(70_000, 70_001).map(lambda n: b"\x80" * n) | INT64)
HLCS = (st.integers(0, MAX_HLC) | st.sampled_from([-1, MAX_HLC, -(1 << 63)]) | INT64
        | st.floats(allow_nan=False) | st.text(max_size=3) | st.binary(max_size=3))
TOMBS = st.sampled_from([0, 1, 2, -1, "1", 1.0, b"\x01"])
SIGS = (st.none() | st.binary(min_size=SIG_BYTES, max_size=SIG_BYTES)
        | st.binary(max_size=SIG_BYTES + 1) | st.text(max_size=3) | INT64)
ROWS = st.lists(st.tuples(TABLES, KEYS, VALUES, HLCS, WRITERS, TOMBS, SIGS), max_size=10)
META = st.dictionaries(st.sampled_from(["gc_horizon", "gc_horizon_writer", "other"]),
                       HLCS | WRITERS, max_size=3)


def _insert(db: sqlite3.Connection, table: str, columns: tuple[str, ...],
            row: tuple[object, ...]) -> None:
    marks = ", ".join("CAST(? AS TEXT)" if isinstance(v, BadText) else "?" for v in row)
    params = [v.raw if isinstance(v, BadText) else v for v in row]
    db.execute(f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) VALUES ({marks})",
               params)


def _good_entry(e: Entry) -> bool:
    return (all(type(t) is str and 0 < len(t.encode()) <= n for t, n in (
        (e.table, MAX_TABLE_NAME_BYTES), (e.key, MAX_KEY_BYTES), (e.writer, MAX_WRITER_BYTES)))
        and 0 <= e.hlc.pack() <= MAX_HLC and (e.sig == b"" or len(e.sig) == SIG_BYTES))


def _validating_store() -> Store:
    return Store("h1", StoreConfig(validator=check_value,
                                   owned_tables={"endpoints": "node", TASKS: "node"}))


def _load_all(path: Path) -> tuple[StoreDb, list[Entry], Store]:
    """What StateService.open does: open, load the rows and the horizon, seed the store."""
    db = StoreDb(path)
    entries = db.load()
    horizon = db.load_gc_horizon()
    assert type(horizon[0]) is int and 0 <= horizon[0] <= MAX_HLC and type(horizon[1]) is str
    for e in entries:
        assert isinstance(e, Entry) and _good_entry(e), e
        assert (e.value is None) or type(e.value) is bytes
    store = _validating_store()
    store.load(entries, T0, horizon)
    for e in store.entries():  # only what the schema takes is held
        data = e.data()
        assert data is None or check_value(e.table, e.key, data) is None
    # and the store serves it: a digest, and a full diff for an empty peer
    codec.decode_entries(store.diff_for(_validating_store().digest()))
    return db, entries, store


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ROWS, META)
@example([(BadText(b"\xff"), "k", None, 1, "w", 1, None)], {})  # once failed the whole load
@example([], {"gc_horizon_writer": BadText(b"\xfe"), "gc_horizon": 5})
def test_hostile_rows_are_skipped_counted_or_loaded(rows: list[Any], meta: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / STORE_DB_FILE
        with StoreDb(path) as db:
            db.save([Entry("networks", "n1", GOOD_VALUE, Hlc(1, 0), "h1")], gc_horizon=(1, "h1"))
        raw = sqlite3.connect(path)
        for row in rows:
            _insert(raw, "entries", ("tbl", "key", "value", "hlc", "writer", "tombstone", "sig"),
                    row)
        for name, value in meta.items():
            _insert(raw, "meta", ("name", "value"), (name, value))
        raw.commit()
        held = raw.execute("SELECT count(*) FROM entries").fetchone()[0]
        raw.close()
        db, entries, store = _load_all(path)
        assert db.quarantined is None  # rows are not damage to the file
        assert len(entries) + db.skipped_rows == held
        # what the schema refused is dropped from disk on the next save
        changes = store.take_dirty()
        db.save(changes.upserts, changes.removed, changes.gc_horizon)
        db.close()
        with StoreDb(path) as db2:
            assert {(e.table, e.key) for e in db2.load()} >= {
                (e.table, e.key) for e in store.entries()}


def _seed_file() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / STORE_DB_FILE
        with StoreDb(path) as db:
            db.save([Entry("networks", f"n{i}", msgpack.packb({**NET, "name": f"n{i}",
                                                                "pad": "x" * i}),
                           Hlc(1000 + i, 0), "h1") for i in range(40)], gc_horizon=(5, "h1"))
        c = sqlite3.connect(path)
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        c.close()
        return path.read_bytes()


SEED_DB = _seed_file()


@st.composite
def damage(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int]:
    """A few bytes of SEED_DB to change, anywhere (uniformly: most of the file is rows and
    schema, not the header hypothesis would favour), and perhaps where to cut it short."""
    rnd = draw(st.randoms(use_true_random=False))
    flips = [(rnd.randrange(len(SEED_DB)), rnd.randrange(256))
             for _ in range(draw(st.integers(1, 6)))]
    cut = rnd.randrange(len(SEED_DB)) if draw(st.integers(0, 9)) == 0 else len(SEED_DB)
    return flips, cut


# What SQLite or StoreDb refuse because the header reads as written by something newer: a schema
# version above this agent's (a downgrade must not clobber a newer agent's file), an SQLite file
# format number this SQLite does not know, or a write version above 2 (SQLite then opens the file
# read-only). Damage there looks the same; these are refused with StoreDbError, never guessed at.
NEWER = ("is newer than this agent", "unsupported file format", "readonly database")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(damage())
def test_a_damaged_database_file_never_keeps_the_agent_from_starting(
        how: tuple[list[tuple[int, int]], int]) -> None:
    """Bytes changed anywhere in the file (a row's text, the schema's SQL, a page header): it
    opens, loads and takes writes, or is moved aside and the agent starts empty; the only
    error is StoreDbError for a header that reads as newer (NEWER)."""
    flips, cut = how
    b = bytearray(SEED_DB)
    for pos, value in flips:
        b[pos] = value
    content = bytes(b[:cut])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / STORE_DB_FILE
        path.write_bytes(content)
        try:
            db, entries, _ = _load_all(path)
            try:
                db.save([Entry("networks", "n9", GOOD_VALUE, Hlc(1, 0), "h1")])
            finally:
                db.close()
        except StoreDbError as e:
            assert any(why in str(e) for why in NEWER), e
            return
        if db.quarantined is not None:
            assert db.quarantined.read_bytes() == content and entries == []


def _with_schema_edit(sql: str) -> bytes:
    """SEED_DB with its schema text edited in place (as a damaged sector would)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / STORE_DB_FILE
        path.write_bytes(SEED_DB)
        c = sqlite3.connect(path)
        c.execute("PRAGMA writable_schema=ON")
        c.execute(sql)
        c.commit()
        c.close()
        return path.read_bytes()


_EDIT = "UPDATE sqlite_master SET sql = {} WHERE name = '{}'"
SCHEMA_DAMAGE = {
    # a column name that is not UTF-8: sqlite3 could not even list the columns
    "column name not UTF-8": _EDIT.format(
        "CAST(replace(CAST(sql AS BLOB), CAST('writer' AS BLOB), x'77ff69746572') AS TEXT)",
        "entries"),
    # a renamed column: "no such column" on every load
    "entries column renamed": _EDIT.format("replace(sql, 'value     BLOB', 'valuf     BLOB')",
                                           "entries"),
    "meta column renamed": _EDIT.format("replace(sql, 'name  TEXT', 'namf  TEXT')", "meta"),
    # a table name that is not UTF-8: SQLite's error message quotes it, and sqlite3 raised
    # UnicodeDecodeError decoding that message
    "table name not UTF-8": "UPDATE sqlite_master SET name = CAST(x'65f77472696573' AS TEXT) "
                            "WHERE name = 'entries'",
}


def test_damaged_schema_text_is_quarantined() -> None:
    """The shapes of damage to the schema that kept the agent from starting (StoreDbError or
    UnicodeDecodeError out of StoreDb; each found by the byte-flip test above) now have the
    file moved aside, and the agent starts empty."""
    for what, sql in SCHEMA_DAMAGE.items():
        content = _with_schema_edit(sql)
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / STORE_DB_FILE
            path.write_bytes(content)
            db, entries, _ = _load_all(path)
            assert db.quarantined is not None and entries == [], what
            assert db.quarantined.read_bytes() == content
            db.close()
