"""Value types, limits and configuration of the replicated store core."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from meshnet import wire
from meshnet.state.hlc import MAX_HLC, Hlc

__all__ = [
    "DEFAULT_MAX_DELTA_BYTES",
    "MAX_BUCKET_BITS",
    "MAX_KEY_BYTES",
    "MAX_TABLES",
    "MAX_TABLE_NAME_BYTES",
    "MAX_VALUE_BYTES",
    "MAX_WRITER_BYTES",
    "SIG_BYTES",
    "Authorizer",
    "ChangeEvent",
    "Entry",
    "EventsLost",
    "Refusal",
    "Signer",
    "StateProtocolError",
    "StoreConfig",
    "StoreEvent",
    "StoreStats",
    "Validator",
    "copy_order",
    "entry_order",
    "merge",
    "tombstone_ttl_for",
]

# ---- limits ------------------------------------------------------------------------------------
# Every one is checked on input before anything is allocated for it.

# Table names are short identifiers chosen by code ("endpoints"), never by users.
MAX_TABLE_NAME_BYTES = 64
# Distinct tables one store holds: three today, "room for later tables", and a peer cannot make us
# keep per-table digest state (MAX_BUCKET_BITS buckets each) for an unbounded number of names.
MAX_TABLES = 64
# Keys are names or "<network>/<name>"; 2 x a 255-byte DNS name plus a separator.
MAX_KEY_BYTES = 512
# Node ids are membership names (membership.types.MAX_NAME_BYTES).
MAX_WRITER_BYTES = 255
# One encoded value. A service spec with its environment and command is the largest thing we
# store; 64 KiB is generous for that yet keeps a full 10,000-entry store's worst case bounded. A
# value larger than a gossip packet still replicates, by anti-entropy only.
MAX_VALUE_BYTES = 64 * 1024
# Finest digest resolution: 2**12 = 4096 buckets per table. At 8 bytes a bucket a full digest of a
# table is at most 32 KiB; a 10,000-entry table uses 2**10 (16 entries a bucket, 8 KiB).
MAX_BUCKET_BITS = 12
# A delta must fit a gossip packet next to membership's own messages: the UDP payload, minus the
# encryption envelope, minus ~100 bytes for the compound/user framing and at least one ping/ack.
DEFAULT_MAX_DELTA_BYTES = wire.DEFAULT_UDP_PAYLOAD - wire.ENCRYPTION_OVERHEAD - 100
# Queued deltas awaiting retransmission: like memberlist's broadcast queue, bounded so a burst of
# writes cannot grow memory; what falls off still reaches everyone by anti-entropy.
DEFAULT_MAX_QUEUED_DELTAS = 4096
# Undrained change events. Past this the queue is replaced by one EventsLost (re-read the views).
DEFAULT_MAX_PENDING_EVENTS = 65_536
# Entries (live, hidden and tombstones) one store will hold: far above any cluster we aim for;
# a (buggy or hostile) authenticated peer cannot grow our memory past it.
DEFAULT_MAX_ENTRIES = 1_000_000
# Refused (invalid) writes remembered, newest per key: so a write offered again by anti-entropy
# is recognized (counted once, not re-checked) and a digest bucket that differs only by writes we
# refuse is skipped (store.py). One is ~200 bytes; past this the least recently seen is
# forgotten, and the only cost of forgetting is that bucket being shipped again.
DEFAULT_MAX_REFUSED = 4096
# Reasons of recent refusals kept for the shell to log (drained by take_refusals).
MAX_REFUSAL_REASONS = 64
# An entry's signature: an Ed25519 signature (RFC 8032) is exactly 64 bytes. The store only
# carries it (the signer and the authorizer below make and check it), so this is its one rule.
SIG_BYTES = 64

# (table, key, decoded value) -> None if the value may be stored, else a one-line reason. Must be
# a pure function of its arguments, so that every replica refuses exactly the same writes.
Validator = Callable[[str, str, Mapping[str, Any]], str | None]


@dataclass(frozen=True, slots=True)
class Refusal:
    """The authorizer's no. ``final``: this write can never be accepted (a bad signature, a
    writer without the role): it is counted, logged and remembered like an invalid value, so
    anti-entropy stops re-shipping it. Not final: not *yet* (e.g. no certificate known for the
    writer): counted only, forgotten, and accepted when a peer offers it again once the
    authorizer says yes (see store.py, "Signatures and authorization")."""

    reason: str
    final: bool


# signed_bytes(entry) -> the writer's SIG_BYTES-byte signature over them. Called for every local
# write; must not fail (an Ed25519 signature cannot).
Signer = Callable[[bytes], bytes]
# (entry, its decoded value or None for a tombstone, now in seconds) -> None to accept, else a
# Refusal. Called for every remote write that would change the store, after the validator
# passed it. Unlike the validator it may depend on time and on what the agent knows (the
# writer's certificate, revocations), which is what ``Refusal.final`` is for.
Authorizer = Callable[["Entry", Mapping[str, Any] | None, float], "Refusal | None"]


class StateProtocolError(Exception):
    """The one exception the store's decoders raise. Anything else escaping one is a bug."""


def tombstone_ttl_for(reap_after: float, push_pull_interval: float) -> float:
    """The issue's rule: a tombstone may go once older than the dead-member reap time plus two
    push-pull intervals. By then every member still alive has merged it by anti-entropy (one
    full exchange with anyone who had it takes at most two intervals), and a member that missed
    it for longer has been dead long enough to be reaped."""
    return reap_after + 2.0 * push_pull_interval


@dataclass(frozen=True, slots=True)
class StoreConfig:
    # Seconds a tombstone is kept (see tombstone_ttl_for); the default is membership's LAN
    # reap_after (60 s) plus two push-pull intervals (2 x 30 s).
    tombstone_ttl: float = tombstone_ttl_for(60.0, 30.0)
    # A remote write stamped further than this ahead of our ``now`` is refused (and counted): a
    # node with a clock in the year 3000 would otherwise win every conflict forever and drag every
    # clock it touches along with it. Refused writes are retried by anti-entropy, so a merely
    # skewed node converges once our clock has caught up.
    max_clock_skew: float = 300.0
    # memberlist's RetransmitMult: each delta is sent mult x ceil(log10(n + 1)) times.
    retransmit_mult: int = 4
    max_delta_bytes: int = DEFAULT_MAX_DELTA_BYTES
    max_queued_deltas: int = DEFAULT_MAX_QUEUED_DELTAS
    # The largest diff (anti-entropy entries message) we build or accept.
    max_diff_bytes: int = wire.MAX_STREAM_BYTES
    max_pending_events: int = DEFAULT_MAX_PENDING_EVENTS
    max_entries: int = DEFAULT_MAX_ENTRIES
    # Tables whose entries belong to a node: table -> name of the value field holding the owner.
    owned_tables: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({"endpoints": "node"})
    )
    # The schema: every value, local or remote, must pass it (meshnet.state.validate.check_value
    # in the agent). None: a schema-less map of any tables (the core's own tests).
    validator: Validator | None = None
    max_refused: int = DEFAULT_MAX_REFUSED
    # Signs every local write (put, delete, reannounce): called with codec.signed_bytes(entry),
    # returns the SIG_BYTES signature stored in the entry. None: local writes are unsigned.
    signer: Signer | None = None
    # Judges every remote write (deltas and anti-entropy, not ``load`` and not local writes).
    # None: every remote write the validator passes is accepted.
    authorizer: Authorizer | None = None

    def __post_init__(self) -> None:
        if not self.tombstone_ttl > 0 or not math.isfinite(self.tombstone_ttl):
            raise ValueError("tombstone_ttl must be positive")
        if not self.max_clock_skew > 0:
            raise ValueError("max_clock_skew must be positive")
        if self.retransmit_mult < 1:
            raise ValueError("retransmit_mult must be >= 1")
        if not 64 <= self.max_delta_bytes <= wire.MAX_DATAGRAM_BYTES:
            raise ValueError("max_delta_bytes out of range")
        if not 1024 <= self.max_diff_bytes <= wire.MAX_STREAM_BYTES:
            raise ValueError("max_diff_bytes out of range")
        if self.max_queued_deltas < 1 or self.max_pending_events < 1 or self.max_entries < 1 \
                or self.max_refused < 1:
            raise ValueError("bounds must be positive")
        if self.validator is not None and not callable(self.validator):
            raise ValueError("validator must be callable")
        if self.signer is not None and not callable(self.signer):
            raise ValueError("signer must be callable")
        if self.authorizer is not None and not callable(self.authorizer):
            raise ValueError("authorizer must be callable")


@dataclass(frozen=True, slots=True)
class Entry:
    """One replicated write: (table, key) -> value | tombstone, stamped (hlc, writer).

    ``value`` is the writer's msgpack encoding of a dict (kept verbatim, so it is hashed, stored
    and re-sent without re-encoding), or None for a tombstone. ``sig`` is the writer's signature
    over ``codec.signed_bytes`` (every field but itself), SIG_BYTES long, or b"" (unsigned).
    """

    table: str
    key: str
    value: bytes | None
    hlc: Hlc
    writer: str
    sig: bytes = b""

    @property
    def tombstone(self) -> bool:
        return self.value is None

    def data(self) -> dict[str, Any] | None:
        """The decoded value (a fresh dict), or None for a tombstone."""
        if self.value is None:
            return None
        out: dict[str, Any] = wire.unpack(self.value, max_bytes=MAX_VALUE_BYTES)
        return out


def entry_order(e: Entry) -> tuple[int, str, int, bytes]:
    """The total order last-writer-wins uses on *writes*: HLC, then writer id, then (only for two
    writes stamped identically, which a correct writer never produces) live over tombstone and
    the larger encoding. A total order is what makes ``merge`` commutative and associative.

    The signature is not part of it: a signature says who made a write, not which write is
    newer, and re-signing a write must never make it win. Two *copies* of one write that differ
    only in their signatures (one forged, or unsigned) are told apart by ``copy_order``."""
    return (e.hlc.pack(), e.writer, 0 if e.value is None else 1, e.value or b"")


def copy_order(e: Entry) -> tuple[tuple[int, str, int, bytes], bytes]:
    """``entry_order``, then the signature bytes (unsigned lowest): the tie-break between two
    copies of the same write, so that replicas without an authorizer still converge on the same
    bytes. A store with an authorizer keeps the copy its authorizer accepts instead (store.py)."""
    return (entry_order(e), e.sig)


def merge(a: Entry | None, b: Entry | None) -> Entry | None:
    """LWW merge of two writes of the same key: the larger under ``copy_order`` (i.e. under
    ``entry_order``, copies of one write by their signatures)."""
    if a is None:
        return b
    if b is None:
        return a
    return b if copy_order(b) > copy_order(a) else a


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """A visible change of (table, key): ``old``/``new`` are the values as ``view`` shows them
    (None = absent, deleted or hidden because its owner is not live)."""

    table: str
    key: str
    old: Mapping[str, Any] | None
    new: Mapping[str, Any] | None
    version: int


@dataclass(frozen=True, slots=True)
class EventsLost:
    """Events were dropped because nobody drained them: re-read every view."""

    version: int


StoreEvent = ChangeEvent | EventsLost


@dataclass(slots=True)
class StoreStats:
    """Counters (never logged per packet; the agent exports them)."""

    applied: int = 0  # remote writes that changed the store
    stale: int = 0  # remote writes we already had or had superseded
    refused_skew: int = 0  # remote writes stamped beyond max_clock_skew ahead
    refused_horizon: int = 0  # old writes of keys whose tombstones were collected
    refused_capacity: int = 0  # writes refused by max_entries / MAX_TABLES
    refused_bytes: int = 0  # writes (local ones too) refused by store.MAX_STORE_BYTES
    bytes_held: int = 0  # what the entries held are estimated at (store.py, "Byte budget")
    # anti-entropy messages refused unread: decoding would pass codec.MAX_STREAM_DECODE_BYTES
    over_budget: int = 0
    deltas_too_large: int = 0  # local writes too large to gossip (anti-entropy only)
    deltas_evicted: int = 0  # queued deltas dropped by max_queued_deltas
    tombstones_collected: int = 0
    bad_messages: int = 0  # decoder rejections (StateProtocolError raised)
    # Remote writes whose value fails the validator (deltas, anti-entropy, the disk copy): each
    # distinct write once, however often it is offered again; never stored, never re-gossiped.
    refused_invalid: int = 0
    refused_invalid_repeats: int = 0  # the same refused write offered again (anti-entropy)
    # refused_invalid by table; tables the validator does not know are counted as "(unknown)"
    refused_by_table: dict[str, int] = field(default_factory=dict)
    # anti-entropy buckets not shipped because they differ only by writes one side refuses
    ae_buckets_skipped: int = 0
    # Remote writes the authorizer refused for good (Refusal.final): each distinct copy once,
    # remembered, never stored, never re-gossiped; repeats and the by-table breakdown (bounded
    # like refused_by_table) as for refused_invalid.
    refused_unauthorized: int = 0
    refused_unauthorized_repeats: int = 0
    refused_unauthorized_by_table: dict[str, int] = field(default_factory=dict)
    # Remote writes the authorizer refused for now (not final): not remembered, so each offer
    # counts; anti-entropy offers them again until the authorizer accepts.
    refused_deferred: int = 0
    # Authorizer calls that raised or returned something other than None or a Refusal: counted
    # here and handled as a deferral (the write is retried later, never lost to a bug).
    authorizer_errors: int = 0
    # Held writes replaced by another copy of the same write with another signature (the
    # authorizer accepts it and refuses ours, or the tie-break of copy_order).
    copies_replaced: int = 0


def check_hlc_int(value: object) -> int:
    if type(value) is not int or not 0 <= value <= MAX_HLC:
        raise StateProtocolError("hlc: expected packed hlc")
    return value
