"""Wire format of the replicated store: ``[type u8][msgpack array]`` (DESIGN §3).

Three messages:

* ``DELTA``   ``[entry]`` - one recent write, piggybacked on membership gossip.
* ``DIGEST``  ``[version, [[table, level, hashes(, alts)], ...]]`` - per table, ``2**level`` bucket
  hashes of 8 bytes each, concatenated into one bin (anti-entropy, step 1); ``alts``, when
  present, is ``[[bucket, hash], ...]``: the sender's bucket hashes *as if* it had accepted the
  writes it refused as invalid (store.py, "Refused writes"), for the buckets where they differ.
* ``ENTRIES`` ``[version, [entry, ...], [[table, level, [bucket, ...]], ...] | nil]`` - the
  entries of some buckets, and the buckets the receiver should answer with its own entries
  (step 2), or nil when no answer is wanted (step 3).

An entry is ``[table, key, value | nil, hlc, writer(, sig)]``: ``value`` is the writer's msgpack
encoding of a dict (bin), nil for a tombstone; ``hlc`` is the packed clock (see hlc.py); ``sig``,
only present when the entry is signed, is the writer's signature (bin of exactly SIG_BYTES)
over ``signed_bytes``: the msgpack of the first five fields, i.e. exactly the unsigned entry. An
unsigned entry is the 5-element array it always was, so its bytes (and its anti-entropy hash)
are unchanged, and a peer from before signatures reads a signed one (it ignores the 6th field).
A nil in the 6th place is read as unsigned (room for a newer peer to append fields after it).

Every decoder raises StateProtocolError and nothing else; arrays may be *longer* than we know
(a newer peer may append fields) but never shorter.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

from meshnet import decode_budget, wire
from meshnet.state.hlc import Hlc
from meshnet.state.types import (
    MAX_BUCKET_BITS,
    MAX_KEY_BYTES,
    MAX_TABLE_NAME_BYTES,
    MAX_TABLES,
    MAX_VALUE_BYTES,
    MAX_WRITER_BYTES,
    SIG_BYTES,
    Entry,
    StateProtocolError,
    check_hlc_int,
)

__all__ = [
    "BUCKET_HASH_BYTES",
    "MAX_STREAM_DECODE_BYTES",
    "PROTOCOL_VERSION",
    "Decoded",
    "DigestGroup",
    "EntriesMsg",
    "MsgType",
    "OverBudget",
    "decode_delta",
    "decode_digest",
    "decode_digest_groups",
    "decode_entries",
    "encode_delta",
    "encode_digest",
    "encode_entries",
    "encode_entry",
    "signed_bytes",
]


class MsgType(IntEnum):
    """One byte in front of every store message. Only ever append; never renumber or reuse."""

    DELTA = 1
    DIGEST = 2
    ENTRIES = 3


# Version of the DIGEST and ENTRIES bodies; a newer peer's extra fields are ignored.
PROTOCOL_VERSION = 1
# A bucket hash is the XOR of 64-bit entry hashes: two different bucket contents collide with
# probability 2**-64, and 8 bytes keep a 1024-bucket digest at 8 KiB.
BUCKET_HASH_BYTES = 8
# Bucket-request groups in one ENTRIES message: at most one per table we can hold.
MAX_REQUEST_GROUPS = MAX_TABLES
# A delta is one gossip user message; nothing larger arrives in a datagram.
MAX_DELTA_BYTES = wire.MAX_DATAGRAM_BYTES
# Estimated bytes of Python objects one anti-entropy message (a digest, or entries with their
# values; at most max_diff_bytes, 20 MiB) may decode to (meshnet.decode_budget). An honest
# full-size message of the smallest entries (an endpoint: ~160 bytes encoded, ~1.15 KB estimated
# with its decoded value) needs ~145 MiB, a full digest ~67 MiB (64 tables of 4,096 alternative
# pairs); without a budget 20 MiB of empty arrays decoded to 1.3 GB. Bodies under 1.25 MiB
# cannot reach it and are decoded without the hooks (values always are: the store counts them).
MAX_STREAM_DECODE_BYTES = 160 * 1024 * 1024
# A value alone is at most MAX_VALUE_BYTES, so its estimate never reaches this.
_VALUE_CEILING = MAX_VALUE_BYTES * decode_budget.MAX_BYTES_PER_INPUT_BYTE


class OverBudget(StateProtocolError):
    """A message whose decoding would build more than MAX_STREAM_DECODE_BYTES."""


def _err(msg: str) -> StateProtocolError:
    return StateProtocolError(msg)


def _str(value: object, what: str, max_bytes: int) -> str:
    if type(value) is not str or not value:
        raise _err(f"{what}: expected non-empty str")
    if len(value) > max_bytes or len(value.encode()) > max_bytes:
        raise _err(f"{what}: longer than {max_bytes} bytes")
    return value


def check_table(value: object) -> str:
    return _str(value, "table", MAX_TABLE_NAME_BYTES)


def check_key(value: object) -> str:
    return _str(value, "key", MAX_KEY_BYTES)


def check_writer(value: object) -> str:
    return _str(value, "writer", MAX_WRITER_BYTES)


def decode_value(value: bytes) -> dict[str, Any]:
    """Decode a stored/received value: a msgpack map with string keys, nothing else."""
    return decode_value_sized(value)[0]


def decode_value_sized(
    value: bytes, budget: decode_budget.Budget | None = None
) -> tuple[dict[str, Any], int]:
    """decode_value, and the bytes its decoded objects are estimated at (decode_budget's
    charge): what the store counts the value as holding. ``budget``: the message's it came in,
    also charged (OverBudget past it)."""
    if len(value) > MAX_VALUE_BYTES:
        raise _err("value too large")
    if budget is None:
        budget = decode_budget.Budget(_VALUE_CEILING)
    before = budget.left
    data = decode_budget.unpack(value, budget, max_bytes=MAX_VALUE_BYTES, exc=StateProtocolError,
                                over=OverBudget, always_charge=True)
    if type(data) is not dict or not all(type(k) is str for k in data):
        raise _err("value: expected a map with str keys")
    return data, before - budget.left


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded entry and its decoded value (decoded once, here)."""

    entry: Entry
    data: dict[str, Any] | None
    size: int = 0  # estimated bytes of ``data`` (decode_value_sized)


def _entry(raw: object, budget: decode_budget.Budget | None = None) -> Decoded:
    if type(raw) is not list or len(raw) < 5:
        raise _err("entry: expected array of >= 5")
    table = check_table(raw[0])
    key = check_key(raw[1])
    value = raw[2]
    data: dict[str, Any] | None
    size = 0
    if value is None:
        data = None
    elif type(value) is bytes:
        data, size = decode_value_sized(value, budget)
    else:
        raise _err("entry value: expected bin or nil")
    hlc = Hlc.unpack(check_hlc_int(raw[3]))
    writer = check_writer(raw[4])
    sig = check_sig(raw[5]) if len(raw) > 5 else b""
    return Decoded(Entry(table, key, value, hlc, writer, sig), data, size)


def check_sig(value: object) -> bytes:
    """An entry's 6th field: a signature of exactly SIG_BYTES, or nil (unsigned: b"")."""
    if value is None:
        return b""
    if type(value) is not bytes or len(value) != SIG_BYTES:
        raise _err(f"entry sig: expected bin of {SIG_BYTES} bytes")
    return value


def signed_bytes(e: Entry) -> bytes:
    """What a signature covers: the canonical msgpack of ``[table, key, value, hlc, writer]``
    (every field of the entry but the signature; the same bytes as the unsigned entry)."""
    return wire.pack([e.table, e.key, e.value, e.hlc.pack(), e.writer])


def entry_body(e: Entry) -> list[Any]:
    if e.sig:
        return [e.table, e.key, e.value, e.hlc.pack(), e.writer, e.sig]
    return [e.table, e.key, e.value, e.hlc.pack(), e.writer]


def encode_entry(e: Entry) -> bytes:
    """The msgpack of one entry (used to size messages before building them)."""
    return wire.pack(entry_body(e))


def encode_delta(e: Entry) -> bytes:
    return wire.frame(MsgType.DELTA, [entry_body(e)])


def _body(
    data: bytes | memoryview, want: MsgType, max_bytes: int, n: int,
    budget: decode_budget.Budget | None = None,
) -> list[Any]:
    msg_type, rest = wire.unframe(data, max_bytes=max_bytes, exc=StateProtocolError)
    if msg_type != want:
        raise _err(f"expected message type {want.name}, got {msg_type}")
    if budget is None:
        body = wire.unpack(rest, max_bytes=max_bytes, exc=StateProtocolError)
    else:
        body = decode_budget.unpack(rest, budget, max_bytes=max_bytes, exc=StateProtocolError,
                                    over=OverBudget)
    if type(body) is not list or len(body) < n:
        raise _err(f"{want.name}: expected array of >= {n}")
    return body


def _version(value: object) -> int:
    if type(value) is not int or value < PROTOCOL_VERSION:
        raise _err("unsupported protocol version")
    return value


def decode_delta(data: bytes | memoryview) -> Decoded:
    body = _body(data, MsgType.DELTA, MAX_DELTA_BYTES, 1)
    return _entry(body[0])


# ---- digest ------------------------------------------------------------------------------------


MAX_HASH = (1 << 64) - 1


class DigestGroup(NamedTuple):
    level: int
    hashes: bytes  # 2**level x 8 bytes
    alts: dict[int, int]  # bucket -> the sender's hash as if it held what it refused


DigestRow = tuple[str, int, bytes] | tuple[str, int, bytes, list[list[int]]]


def encode_digest(tables: list[DigestRow]) -> bytes:
    """Groups ``(table, level, hashes)``, or ``(table, level, hashes, [[bucket, hash], ...])``."""
    return wire.frame(MsgType.DIGEST, [PROTOCOL_VERSION, [list(t) for t in tables]])


def _level(value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_BUCKET_BITS:
        raise _err("bucket level out of range")
    return value


def decode_digest(data: bytes | memoryview) -> dict[str, tuple[int, bytes]]:
    """table -> (level, 2**level x 8-byte bucket hashes)."""
    return {t: (g.level, g.hashes) for t, g in decode_digest_groups(data).items()}


def _alts(raw: object, level: int) -> dict[int, int]:
    if type(raw) is not list or len(raw) > 1 << level:
        raise _err("digest alternatives: expected at most 2**level pairs")
    out: dict[int, int] = {}
    for pair in raw:
        if type(pair) is not list or len(pair) < 2:
            raise _err("digest alternative: expected [bucket, hash]")
        b, h = pair[0], pair[1]
        if type(b) is not int or not 0 <= b < 1 << level:
            raise _err("digest alternative: bucket out of range")
        if type(h) is not int or not 0 <= h <= MAX_HASH:
            raise _err("digest alternative: hash out of range")
        out[b] = h
    return out


def decode_digest_groups(data: bytes | memoryview) -> dict[str, DigestGroup]:
    """table -> DigestGroup(level, hashes, alts)."""
    body = _body(data, MsgType.DIGEST, wire.MAX_STREAM_BYTES, 2,
                 decode_budget.Budget(MAX_STREAM_DECODE_BYTES))
    _version(body[0])
    groups = body[1]
    if type(groups) is not list or len(groups) > MAX_TABLES:
        raise _err("digest: expected at most MAX_TABLES tables")
    out: dict[str, DigestGroup] = {}
    for g in groups:
        if type(g) is not list or len(g) < 3:
            raise _err("digest table: expected array of >= 3")
        table = check_table(g[0])
        level = _level(g[1])
        hashes = g[2]
        if type(hashes) is not bytes or len(hashes) != BUCKET_HASH_BYTES << level:
            raise _err("digest table: hash block of the wrong size")
        if table in out:
            raise _err("digest: duplicate table")
        alts = _alts(g[3], level) if len(g) > 3 and g[3] is not None else {}
        out[table] = DigestGroup(level, hashes, alts)
    return out


# ---- entries -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EntriesMsg:
    entries: list[Decoded]
    # table -> (level, buckets) the receiver should answer with its own entries; None: the last
    # message of an exchange, no answer wanted
    requests: dict[str, tuple[int, frozenset[int]]] | None


def encode_entries_parts(
    entry_blobs: list[bytes], requests: dict[str, tuple[int, list[int]]] | None
) -> bytes:
    """Assemble an ENTRIES message from pre-encoded entries (see ``encode_entry``)."""
    head = bytes((MsgType.ENTRIES,)) + bytes((0x93,))  # fixarray of 3
    parts = [head, wire.pack(PROTOCOL_VERSION), _array_header(len(entry_blobs))]
    parts.extend(entry_blobs)
    if requests is None:
        parts.append(wire.pack(None))
    else:
        parts.append(wire.pack([[t, lvl, sorted(b)] for t, (lvl, b) in requests.items()]))
    return b"".join(parts)


def encode_entries(
    entries: list[Entry], requests: dict[str, tuple[int, list[int]]] | None
) -> bytes:
    return encode_entries_parts([encode_entry(e) for e in entries], requests)


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def decode_entries(data: bytes | memoryview, max_bytes: int = wire.MAX_STREAM_BYTES) -> EntriesMsg:
    budget = decode_budget.Budget(MAX_STREAM_DECODE_BYTES)  # the body and its values
    body = _body(data, MsgType.ENTRIES, max_bytes, 3, budget)
    _version(body[0])
    raw_entries, raw_requests = body[1], body[2]
    if type(raw_entries) is not list:
        raise _err("entries: expected array")
    entries = [_entry(r, budget) for r in raw_entries]
    if raw_requests is None:
        return EntriesMsg(entries, None)
    if type(raw_requests) is not list or len(raw_requests) > MAX_REQUEST_GROUPS:
        raise _err("requests: expected nil or an array of at most MAX_TABLES groups")
    requests: dict[str, tuple[int, frozenset[int]]] = {}
    for g in raw_requests:
        if type(g) is not list or len(g) < 3:
            raise _err("request group: expected array of >= 3")
        table = check_table(g[0])
        level = _level(g[1])
        buckets = g[2]
        if type(buckets) is not list or len(buckets) > 1 << level:
            raise _err("request group: expected at most 2**level buckets")
        for b in buckets:
            if type(b) is not int or not 0 <= b < 1 << level:
                raise _err("request group: bucket out of range")
        if table in requests:
            raise _err("requests: duplicate table")
        requests[table] = (level, frozenset(buckets))
    return EntriesMsg(entries, requests)
