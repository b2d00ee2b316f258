"""The replicated cluster store: a sans-IO last-writer-wins map per table.

Every agent holds a full copy, any agent writes, and copies converge with no leader:

* **CRDT.** ``(table, key) -> Entry``; two writes of one key merge to the larger under
  ``entry_order`` (HLC, then writer id). A delete is a tombstone entry, so it beats exactly the
  writes it happened after. Merging is commutative, associative and idempotent, so any order,
  duplication or partition of the same writes ends in the same store.
* **Tombstone GC.** A tombstone is dropped once its HLC wall time is ``tombstone_ttl`` old.
  Dropping it records a *horizon* (the largest HLC collected); from then on a write of a key we
  do not hold that is no newer than the horizon is refused, because it can only be an old write
  the collected tombstone had already beaten (a replica that missed it for longer than the ttl
  was dead long enough to be reaped: like Cassandra's gc_grace, its stale copy must not
  resurrect what the cluster deleted). The refusing side answers such a write in the diff
  reply with a tombstone stamped at its horizon, so the stale replica drops it too and the two
  agree again. Owned entries come back from such a replica by re-announcement with a fresh HLC.
  The cost: clocks must agree to well within ``tombstone_ttl``, and writes made on the far side
  of a partition longer than the ttl, to keys the other side never saw, can be refused
  (the partition outlived the reap time, so each side had already given the other up).
* **Ownership.** Entries of owned tables (``endpoints``: field ``node``) are hidden from every
  view while their owner is not live (``set_node_live``), with no write; they show again when it
  is, and ``owned_by`` lists them so the owner can re-announce.
  An owned value may also carry its writer's *life* (``LIFE_FIELD``: the agent's incarnation at
  start, which it also announces in its metadata). While the owner is live in another life, such
  an entry is hidden too: it describes a task or sandbox that died with the previous life, and
  its owner's delete of it arrives after the alive that brought the owner back. A value without
  a life, or an owner whose life is unknown, shows as before.
* **Dissemination.** ``take_deltas`` gives recent writes to piggyback on gossip (memberlist's
  TransmitLimitedQueue: least-sent first, newest first, each sent a bounded number of times, a
  newer write of a key replacing the queued older one); received writes that were news are
  queued again (epidemic). ``digest``/``diff_for``/``apply_entries`` are the anti-entropy that
  repairs whatever gossip missed (see ``digest``).
* **Validation.** With ``StoreConfig.validator`` set (the agent sets
  ``meshnet.state.validate.check_value``), every value is checked before it is stored: a local
  ``put`` that fails raises ValueError with the reason; a remote write that fails (a delta, an
  anti-entropy entry, a row of the disk copy given to ``load``) is *refused*: counted
  (``refused_invalid``, ``refused_by_table``), its reason queued for the shell to log
  (``take_refusals``), and otherwise treated as if it had never arrived: not stored, not
  re-gossiped, no event, no effect on the key's value (an older valid value stays). A tombstone
  carries no value and is never refused. The validator is a pure function of (table, key,
  value), so every replica refuses exactly the same writes and replicas that all validate still
  converge on the same entries.
* **Signatures.** With ``StoreConfig.signer``/``authorizer`` set (the agent's identity layer),
  every local write is signed and every remote one judged; see "Signatures and authorization".

Refused writes and anti-entropy
-------------------------------
A replica that holds a write we refuse (one that stored it before validation existed, an agent
with other rules, a write forced in locally) has a different entry in that digest bucket, for
good: two digests that differ only by it would make every exchange ship the bucket again, and we
would refuse it again, forever. So:

* We remember refused writes, the newest per key (``_refused``: order, entry hash, bucket;
  bounded by ``max_refused``, least recently seen forgotten first). One offered again is
  recognized by its order alone: counted in ``refused_invalid_repeats``, neither checked nor
  counted nor logged again.
* Our digest carries, for every bucket holding a remembered refusal, an *alternative* hash: the
  bucket as it would be had we accepted those writes (each refused entry's hash XORed in, and
  the hash of the older entry it would have replaced XORed out).
* ``diff_for`` skips a bucket whose hashes differ when either side's alternative equals the
  other side's plain hash: ``ours_plain == theirs_alt`` (they hold exactly what we hold, but for
  writes they refuse and that beat what they hold instead) or ``ours_alt == theirs_plain`` (the
  same, the other way round). Nothing in such a bucket could change either side: each entry one
  side lacks is one the other refuses, or older than one it holds. Counted in
  ``ae_buckets_skipped``. Never skipped: ``ours_alt == theirs_alt``, which would also hold for
  two validating replicas that hold *different valid* entries under the same refused write
  (they must still repair each other). Equal hashes of different contents are as unlikely as
  anywhere else in the digest (2**-64 a bucket).

So a replica holding a refused write and one refusing it reach a steady state with no traffic
beyond the digests, in both directions. What remains, bounded and documented: a bucket where the
holder holds only *some* of the writes we refuse, or whose refusal we have forgotten (more than
``max_refused`` distinct ones), is shipped again at each exchange with that holder (one bucket,
~16 entries); its refused entries are then recognized again (repeats), never stored.

Signatures and authorization
----------------------------
Every entry may carry its writer's signature (``Entry.sig``, over ``codec.signed_bytes``: the
entry without its signature). The store makes and checks none itself; it calls two hooks the
agent's identity layer sets (``StoreConfig.signer``/``authorizer``, or ``set_signer`` /
``set_authorizer``):

* The **signer** signs every local write (``put``, ``delete``, ``reannounce``: ``_local_write``)
  and the horizon tombstones we send in an anti-entropy reply (above): all written by us.
* The **authorizer** judges every *remote* write that would change the store (a delta or an
  anti-entropy entry that is news: not stale, not beyond the horizon or capacity), after the
  validator passed its value; tombstones too (with ``data`` None), including an expired one that
  would only move the horizon. Local writes are not judged (the agent checks roles before it
  writes, and says why), nor is ``load`` (our own disk; the validator still checks it).
  A refused write moves nothing: not the key, not the horizon, not our clock, no re-gossip.

  - A *final* refusal is handled exactly like an invalid value: counted once
    (``refused_unauthorized``, ``refused_unauthorized_by_table``), its reason queued for
    ``take_refusals``, remembered (repeats: ``refused_unauthorized_repeats``), and covered by the
    digest's alternative hashes, so a replica holding it and one refusing it go quiet. Unlike a
    validator refusal it is remembered *with its signature*: only that very copy is refused, so
    a forged copy of a genuine write arriving first cannot make us refuse the genuine one.
  - A *deferred* refusal (not final, e.g. no certificate known yet for the writer) is counted in
    ``refused_deferred`` and forgotten: not logged, not remembered, no alternative hash. Our
    digest still lacks the write, so every anti-entropy exchange with a peer holding it ships
    that bucket again and asks the authorizer again; once it says yes (the certificate has
    arrived) the write is taken. The retry costs one bucket (~16 entries) per exchange with such
    a peer, so it is bounded by the anti-entropy rate (one exchange per push-pull interval per
    peer), not a loop; it lasts as long as the authorizer defers.
  - An authorizer that raises or returns something else is a bug: ``authorizer_errors``, and the
    write is deferred (retried later, never lost), its reason queued for the log.

Anti-entropy hashes cover the signature (``_hash_entry`` hashes ``encode_entry``; an unsigned
entry encodes as it always did, so stores without signatures keep their digests). This is
deliberate: two replicas holding the same write with different signatures (one of them forged,
or unsigned) hold different things, and one of them would be refused by an authorizing third
replica; digests that called them equal would leave the bad copy in place for good and let it
spread from there. ``entry_order`` ignores the signature (a signature never makes a write newer),
so two copies of one write need their own rule, applied when one meets the other:

* without an authorizer, the larger signature wins (``copy_order``; unsigned loses to signed),
  so replicas that do not judge still converge on the same bytes and ``merge`` stays
  commutative;
* with one, the copy offered must pass it (as any remote write); it then replaces ours if it
  wins the tie-break, or if the authorizer refuses ours (``copies_replaced``). So judging
  replicas keep the copy their authorizer accepts, and a copy they refused stays remembered
  next to the other copy of the same write they hold, with an alternative hash, so a replica
  that does not judge and holds the refused copy goes quiet with them too.

Horizon tombstones go back whichever side started the exchange: in step 3 for what the responder
shipped in step 2, and in a step 4 (the answer to step 3, tombstones only) for what the initiator
shipped. What is left, bounded: a horizon tombstone we send is signed by us, and the peer's
authorizer may not let us delete in that table (e.g. a worker's tombstone of a network, or any
non-owner's tombstone of an owned record); the peer then keeps its old write and offers it at
each exchange, and we refuse it by the horizon each time (one entry), until it meets a replica
whose tombstone it accepts: for an owned record, its owner, at their next exchange either way.
A replica that refuses such a tombstone records the key as disputed (``take_disputed``) and the
agent starts an exchange with the owner at once (agent/state_service.py ``ask_owners``).

Byte budget
-----------
Every entry held is charged ``STORE_ENTRY_BYTES`` plus its key's and value's lengths plus the
estimate of its decoded value (``codec.decode_value_sized``); the total (``stats.bytes_held``) stays
under ``max_bytes`` (``MAX_STORE_BYTES``). A write that would take it over, and makes its entry
larger, is refused: a remote one as over capacity (``_REFUSED``, counted in ``refused_bytes``), a
local one with StoreFull, a row of the disk copy skipped (counted, left on disk). A write that
does not grow the store (a tombstone, a smaller value, a re-announcement) is always taken.

Pure: no I/O, no clock (``now`` in seconds is passed in), no global random.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeVar

from meshnet import wire
from meshnet.state import codec
from meshnet.state.codec import BUCKET_HASH_BYTES, Decoded
from meshnet.state.hlc import MAX_HLC, Hlc, now_ms
from meshnet.state.queue import DeltaQueue
from meshnet.state.tables import ENDPOINTS, NETWORKS, SERVICES, Endpoint, Network, Service
from meshnet.state.types import (
    MAX_BUCKET_BITS,
    MAX_REFUSAL_REASONS,
    MAX_TABLES,
    MAX_VALUE_BYTES,
    SIG_BYTES,
    Authorizer,
    ChangeEvent,
    Entry,
    EventsLost,
    Refusal,
    Signer,
    StateProtocolError,
    StoreConfig,
    StoreEvent,
    StoreStats,
    Validator,
    copy_order,
    entry_order,
)

__all__ = ["MAX_STORE_BYTES", "NO_HORIZON", "STORE_ENTRY_BYTES", "Changes", "Horizon", "Store",
           "StoreFull"]

_T = TypeVar("_T")

FINE_BUCKETS = 1 << MAX_BUCKET_BITS
_FINE_MASK = FINE_BUCKETS - 1
# Target entries per digest bucket: the digest shrinks as this grows, the diff for one change
# grows with it. 16 puts both near 8 KiB and ~2 KiB for a 10,000-entry table.
BUCKET_TARGET_ENTRIES = 16


# Outcomes of merging one remote write.
_APPLIED = 0
_STALE = 1  # we already had it or something newer
_REFUSED = 2  # beyond max_clock_skew, or over capacity
_REFUSED_HORIZON = 3  # older than a tombstone we collected (see the module docstring)
_REFUSED_INVALID = 4  # its value fails the validator (see "Refused writes" above)
_REFUSED_UNAUTHORIZED = 5  # the authorizer refused it for good (Refusal.final)
_DEFERRED = 6  # the authorizer refused it for now (see "Signatures and authorization")

# Estimated bytes all entries may hold (see "Byte budget"). A 1,000-node cluster running 10,000
# tasks (bench/placement.py's scale) holds ~22,000 rows: a task and an endpoint per task, a
# certificate per node, services and networks, ~2 KiB each with the decoded value and the
# indexes (an endpoint measures 1.3 KiB and is charged 1.8 KiB): ~45 MiB. 256 MiB is 5x that, or
# ~2,000 services at the 64 KiB value cap. Without it the bound was max_entries x MAX_VALUE_BYTES
# (1,000,000 x 64 KiB = 61 GiB) before the decoded values.
MAX_STORE_BYTES = 256 * 1024 * 1024
# An entry's own objects beyond its key, value and decoded value: the slot, the Entry, its HLC and
# signature, the key again in the index tuple and its digest bucket's set. Measured ~830 bytes
# for a tombstone.
STORE_ENTRY_BYTES = 1024
# memberlist's limit is 4 sends below 9 members: in a 5-member cluster with one dead, a member
# then misses a delta about once in 1,600 (an epidemic simulation, 200,000 runs) and waits for
# the next anti-entropy, 10-30 s; the failover bench saw a restarted task's row reach h1 10-13 s
# late about once in 60 kills. 8 sends: none missed in 200,000 runs. Small clusters only: from 9
# members memberlist's own limit is 8 or more.
MIN_DELTA_TRANSMITS = 8
# Distinct table names in StoreStats.refused_by_table; refusals in further tables count as OTHER.
MAX_REFUSED_TABLE_NAMES = 16
# Disputed keys waiting for the shell (take_disputed): it drains them after every merge, so
# only a burst of them within one message can reach this; the oldest go first.
MAX_DISPUTED = 256
#: The field of an owned value naming its writer's life (see "Ownership" above).
LIFE_FIELD = "life"
_NOT_LIVE = object()  # set_node_live: a node absent from _live (None is an unknown life)
OTHER_TABLES = "(other)"


# (packed HLC, writer) of the newest tombstone collected: an absent key's write that would lose to
# a tombstone stamped so is refused. Compared like ``entry_order`` so exact ties resolve the same
# way whether the tombstone is still held or already collected.
Horizon = tuple[int, str]
NO_HORIZON: Horizon = (0, "")


def _tomb_order(e: Entry) -> Horizon:
    return (e.hlc.pack(), e.writer)


class StoreFull(ValueError):
    """A local write would exceed ``max_entries``, ``MAX_TABLES`` or ``max_bytes``."""


@dataclass(frozen=True, slots=True)
class Changes:
    """What changed since the last ``take_dirty``: for the persistence adapter."""

    upserts: list[Entry]
    removed: list[tuple[str, str]]  # (table, key) no longer held (collected tombstones)
    gc_horizon: Horizon  # persist and pass back to ``load``


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A refused write, remembered (see "Refused writes and anti-entropy")."""

    order: tuple[int, str, int, bytes]
    ehash: int
    bucket: int
    # The authorizer refused it (final), so only this very copy is refused: another copy of the
    # same write (same order) with another signature is judged on its own. An invalid value is
    # invalid whatever signs it, so a validator refusal matches any copy (sig is then unused).
    by_sig: bool = False
    sig: bytes = b""

    def matches(self, e: Entry) -> bool:
        return self.order == entry_order(e) and (not self.by_sig or self.sig == e.sig)


@dataclass(slots=True)
class _Slot:
    entry: Entry
    data: dict[str, Any] | None  # decoded value; None for a tombstone
    ehash: int
    bucket: int
    size: int  # estimated bytes of ``data`` (codec.decode_value_sized)


def _cost(key: str, value: bytes | None, size: int) -> int:
    """What an entry is charged against ``max_bytes`` (see "Byte budget")."""
    return STORE_ENTRY_BYTES + len(key) + (0 if value is None else len(value)) + size


class _Table:
    """Per-table anti-entropy index: XOR of entry hashes per fine bucket, keys per bucket."""

    __slots__ = ("count", "fine", "folded", "keys")

    def __init__(self) -> None:
        self.count = 0
        self.fine = [0] * FINE_BUCKETS
        self.keys: list[set[str] | None] = [None] * FINE_BUCKETS
        self.folded: dict[int, tuple[int, ...]] = {}

    def add(self, key: str, bucket: int, ehash: int) -> None:
        self.fine[bucket] ^= ehash
        ks = self.keys[bucket]
        if ks is None:
            ks = self.keys[bucket] = set()
        if key not in ks:
            ks.add(key)
            self.count += 1
        self.folded.clear()

    def remove(self, key: str, bucket: int, ehash: int) -> None:
        self.fine[bucket] ^= ehash
        ks = self.keys[bucket]
        if ks is not None and key in ks:
            ks.discard(key)
            self.count -= 1
            if not ks:
                self.keys[bucket] = None
        self.folded.clear()

    def level(self) -> int:
        """Bucket bits for this table's size: ~BUCKET_TARGET_ENTRIES a bucket, at most 2**12."""
        need = max(1, math.ceil(self.count / BUCKET_TARGET_ENTRIES))
        return min(MAX_BUCKET_BITS, (need - 1).bit_length())

    def fold(self, level: int) -> tuple[int, ...]:
        got = self.folded.get(level)
        if got is None:
            mask = (1 << level) - 1
            out = [0] * (1 << level)
            for f, h in enumerate(self.fine):
                if h:
                    out[f & mask] ^= h
            got = self.folded[level] = tuple(out)
        return got

    def keys_in(self, level: int, bucket: int) -> Iterator[str]:
        for f in range(bucket, FINE_BUCKETS, 1 << level):
            ks = self.keys[f]
            if ks:
                yield from sorted(ks)


def _bucket_of(key: str) -> int:
    h = hashlib.blake2b(key.encode(), digest_size=4, person=b"meshnet-bucket").digest()
    return int.from_bytes(h, "little") & _FINE_MASK


def _hash_entry(e: Entry) -> int:
    # The wire form, signature included (see "Signatures and authorization" for why).
    h = hashlib.blake2b(codec.encode_entry(e), digest_size=8, person=b"meshnet-entry").digest()
    return int.from_bytes(h, "little")


def _ro(data: dict[str, Any] | None) -> Mapping[str, Any] | None:
    return None if data is None else MappingProxyType(data)


@dataclass
class Store:
    """One replica. ``node_id`` is this agent's membership name (the writer id of its writes)."""

    node_id: str
    config: StoreConfig = field(default_factory=StoreConfig)
    max_bytes: int = MAX_STORE_BYTES  # see "Byte budget"

    def __post_init__(self) -> None:
        try:
            codec.check_writer(self.node_id)
        except StateProtocolError as e:
            raise ValueError(f"node_id: {e}") from None
        self.version = 0
        self.stats = StoreStats()
        self._clock = Hlc()
        self._entries: dict[tuple[str, str], _Slot] = {}
        self._tables: dict[str, _Table] = {}
        self._owners: dict[str, set[tuple[str, str]]] = {}
        # live nodes -> the life each announces (None: unknown, every entry of it shows)
        self._live: dict[str, int | None] = {self.node_id: None}
        self._gc_heap: list[tuple[int, str, str, int]] = []
        self._horizon: Horizon = NO_HORIZON
        self._events: deque[StoreEvent] = deque()
        self._queue = DeltaQueue(self.config.retransmit_mult, self.config.max_queued_deltas)
        self._dirty: dict[tuple[str, str], Entry | None] = {}
        self._ae_cursor = 0  # where the next truncated diff starts inside an oversized bucket
        self._ttl_ms = max(1, int(self.config.tombstone_ttl * 1000))
        self._skew_ms = int(self.config.max_clock_skew * 1000)
        self._validator: Validator | None = self.config.validator
        self._signer: Signer | None = self.config.signer
        self._authorizer: Authorizer | None = self.config.authorizer
        self._refused: OrderedDict[tuple[str, str], _Refusal] = OrderedDict()
        # Keys a peer says were deleted, by a tombstone we may not take (see take_disputed).
        self._disputed: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._reasons: deque[str] = deque(maxlen=MAX_REFUSAL_REASONS)

    # ---- validation ------------------------------------------------------------------------

    @property
    def validator(self) -> Validator | None:
        return self._validator

    def set_validator(self, validator: Validator | None) -> None:
        """Set the schema (as ``StoreConfig.validator`` does) on a store that holds nothing yet,
        i.e. before ``load``: what is held has been checked by the rules it came in under."""
        if self._entries:
            raise ValueError("set the validator before the store holds anything")
        if validator is not None and not callable(validator):
            raise ValueError("validator must be callable")
        self._validator = validator

    @property
    def signer(self) -> Signer | None:
        return self._signer

    def set_signer(self, signer: Signer | None) -> None:
        """Set (or replace, e.g. after a certificate renewal with a new key) the signer of local
        writes, as ``StoreConfig.signer`` does; any time: it only affects writes made after."""
        if signer is not None and not callable(signer):
            raise ValueError("signer must be callable")
        self._signer = signer

    @property
    def authorizer(self) -> Authorizer | None:
        return self._authorizer

    def set_authorizer(self, authorizer: Authorizer | None) -> None:
        """Set (or replace) the judge of remote writes, as ``StoreConfig.authorizer`` does; any
        time: what is already held stays (it was taken under the rules of its day, or is our own
        disk's). A different authorizer may judge differently, so the final refusals of the old
        one are forgotten (each is judged once more if offered again)."""
        if authorizer is not None and not callable(authorizer):
            raise ValueError("authorizer must be callable")
        if authorizer != self._authorizer:  # (==, not is: a bound method is made anew each time)
            for k in [k for k, r in self._refused.items() if r.by_sig]:
                del self._refused[k]
        self._authorizer = authorizer

    def take_refusals(self) -> list[str]:
        """Reasons of the writes refused since the last call (each distinct write once; at
        most the last MAX_REFUSAL_REASONS): for the shell to log."""
        out = list(self._reasons)
        self._reasons.clear()
        return out

    def _check(self, table: str, key: str, data: Mapping[str, Any]) -> str | None:
        if self._validator is None:
            return None
        try:
            return self._validator(table, key, MappingProxyType(data))
        except Exception as e:  # a bug in the validator still refuses, the same everywhere
            return f"{table[:64]}/{key[:64]}: validator failed ({type(e).__name__})"

    def _refuse(self, e: Entry, reason: str, unauthorized: bool = False) -> None:
        st = self.stats
        if unauthorized:
            st.refused_unauthorized += 1
            by = st.refused_unauthorized_by_table
        else:
            st.refused_invalid += 1
            by = st.refused_by_table
        name = e.table if e.table in by or len(by) < MAX_REFUSED_TABLE_NAMES else OTHER_TABLES
        by[name] = by.get(name, 0) + 1
        self._reasons.append(reason)
        k = (e.table, e.key)
        order = entry_order(e)
        old = self._refused.get(k)
        if old is None or old.order <= order:  # the newest per key; of one write, the latest copy
            self._refused[k] = _Refusal(order, _hash_entry(e), _bucket_of(e.key), unauthorized,
                                        e.sig if unauthorized else b"")
        self._refused.move_to_end(k)
        while len(self._refused) > self.config.max_refused:
            self._refused.popitem(last=False)

    def _refused_again(self, e: Entry) -> int | None:
        """A write we refused before, offered again: the outcome to report (the same order, and
        for an authorizer refusal the same signature: the same bytes), else None."""
        k = (e.table, e.key)
        r = self._refused.get(k)
        if r is None or not r.matches(e):
            return None
        self._refused.move_to_end(k)
        if r.by_sig:
            self.stats.refused_unauthorized_repeats += 1
            return _REFUSED_UNAUTHORIZED
        self.stats.refused_invalid_repeats += 1
        return _REFUSED_INVALID

    def _authorize(self, e: Entry, data: Mapping[str, Any] | None, now: float) -> Refusal | None:
        """The authorizer's verdict; a failing authorizer defers (counted, its reason logged)."""
        assert self._authorizer is not None
        try:
            verdict = self._authorizer(e, None if data is None else MappingProxyType(data), now)
        except Exception as exc:
            problem = f"failed ({type(exc).__name__})"
        else:
            if verdict is None or (isinstance(verdict, Refusal) and type(verdict.reason) is str
                                   and type(verdict.final) is bool):
                return verdict
            problem = f"returned {type(verdict).__name__}"
        self.stats.authorizer_errors += 1
        self._reasons.append(f"{e.table[:64]}/{e.key[:64]}: authorizer {problem}")
        return Refusal("authorizer error", final=False)

    def _screen(self, e: Entry, data: dict[str, Any] | None, now: float) -> int | None:
        """The validator, then the authorizer, on a remote write that would change the store:
        None to take it, else the outcome of its refusal (counted, and remembered if final)."""
        if self._validator is None and self._authorizer is None:
            return None
        again = self._refused_again(e)
        if again is not None:
            if again == _REFUSED_UNAUTHORIZED and data is None:
                self._dispute(e)
            return again
        if data is not None and self._validator is not None:
            reason = self._check(e.table, e.key, data)
            if reason is not None:
                self._refuse(e, reason)
                return _REFUSED_INVALID
        if self._authorizer is not None:
            verdict = self._authorize(e, data, now)
            if verdict is not None:
                if verdict.final:
                    self._refuse(e, verdict.reason, unauthorized=True)
                    if data is None:
                        self._dispute(e)
                    return _REFUSED_UNAUTHORIZED
                self.stats.refused_deferred += 1  # not remembered: see the module docstring
                return _DEFERRED
        return None

    def _dispute(self, e: Entry) -> None:
        """A peer holds a tombstone newer than our write of E's key, by a writer who may not
        delete it, or we refused a live owned write by our horizon. Typically a peer's horizon
        tombstone of an owned record (a task, an endpoint) whose owner deleted it while we were
        away and whose tombstone everyone else has collected: our copy is a ghost only the
        owner can remove. Or the record is live and the horizon is wrong about it: only the
        owner can say so, with a fresh write (``reannounce_key``)."""
        k = (e.table, e.key)
        self._disputed[k] = None
        self._disputed.move_to_end(k)
        while len(self._disputed) > MAX_DISPUTED:
            self._disputed.popitem(last=False)

    def take_disputed(self) -> list[tuple[str, str]]:
        """(table, key) of our writes that a peer's refused tombstone disputed since the last
        call. The shell asks each one's owner at once (an exchange with the owner removes a
        ghost: see "Horizon tombstones" above), instead of waiting for their paths to cross."""
        out = list(self._disputed)
        self._disputed.clear()
        return out

    def _alt_xor(self) -> dict[str, list[tuple[int, int]]]:
        """table -> [(fine bucket, hash to XOR into that bucket for the as-if digest)]: each
        remembered refusal's entry hash, XOR the hash of the older entry it would replace."""
        out: dict[str, list[tuple[int, int]]] = {}
        for (table, key), r in self._refused.items():
            x = r.ehash
            slot = self._entries.get((table, key))
            if slot is not None:
                held = entry_order(slot.entry)
                if held > r.order or (held == r.order and r.matches(slot.entry)):
                    continue  # superseded (normally already forgotten by _install)
                x ^= slot.ehash  # an older write, or another copy of the refused one
            out.setdefault(table, []).append((r.bucket, x))
        return out

    # ---- reading ---------------------------------------------------------------------------

    @property
    def clock(self) -> Hlc:
        """The latest HLC this replica issued or observed."""
        return self._clock

    @property
    def gc_horizon(self) -> Horizon:
        """(packed HLC, writer) of the newest tombstone collected here ((0, ""): none)."""
        return self._horizon

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, table: str, key: str) -> Entry | None:
        """The raw entry (tombstones and hidden entries included)."""
        slot = self._entries.get((table, key))
        return None if slot is None else slot.entry

    def entries(self) -> Iterator[Entry]:
        """Every entry held, tombstones and hidden ones included, in no particular order."""
        for slot in self._entries.values():
            yield slot.entry

    def get(self, table: str, key: str) -> Mapping[str, Any] | None:
        """The visible value of (table, key), or None."""
        return _ro(self._visible(self._entries.get((table, key))))

    def view(self, table: str) -> dict[str, Mapping[str, Any]]:
        """key -> value of every visible entry of ``table`` (read-only mappings)."""
        t = self._tables.get(table)
        out: dict[str, Mapping[str, Any]] = {}
        if t is None:
            return out
        for ks in t.keys:
            if not ks:
                continue
            for key in ks:
                data = self._visible(self._entries[(table, key)])
                if data is not None:
                    out[key] = MappingProxyType(data)
        return out

    def networks(self) -> dict[str, Network]:
        return _typed(self.view(NETWORKS), Network.from_value)

    def services(self) -> dict[str, Service]:
        return _typed(self.view(SERVICES), Service.from_value)

    def endpoints(self, network: str | None = None) -> list[Endpoint]:
        """Visible endpoints (owners live), optionally of one network, sorted by key."""
        out = []
        for _key, value in sorted(self.view(ENDPOINTS).items()):
            ep = Endpoint.from_value(value)
            if ep is not None and (network is None or ep.network == network):
                out.append(ep)
        return out

    def owned_by(self, node: str) -> list[Entry]:
        """Live (non-tombstone) entries of owned tables whose owner is ``node``, visible or not:
        what an agent coming back re-announces (``reannounce``) or withdraws (``delete``)."""
        out = [self._entries[k].entry for k in self._owners.get(node, ())]
        out.sort(key=lambda e: (e.table, e.key))
        return out

    def is_live(self, node: str) -> bool:
        return node in self._live

    # ---- events ----------------------------------------------------------------------------

    def next_event(self) -> StoreEvent | None:
        return self._events.popleft() if self._events else None

    # ---- ownership -------------------------------------------------------------------------

    def set_node_live(self, node: str, live: bool, life: int | None = None) -> None:
        """Membership says ``node`` is alive (True, announcing LIFE) or dead/left (False). Its
        owned entries hide or show at once, each visible change giving an event; no write is
        made. An entry written in another life than LIFE stays hidden (``LIFE_FIELD``)."""
        if type(life) is not int:
            life = None
        unchanged = self._live.get(node, _NOT_LIVE) == life if live else node not in self._live
        if unchanged:
            return
        keys = sorted(self._owners.get(node, ()))
        before = [self._visible(self._entries[k]) for k in keys]
        if live:
            self._live[node] = life
        else:
            del self._live[node]
        for k, old in zip(keys, before, strict=True):
            self._changed(k, old, self._visible(self._entries[k]))

    # ---- local writes ----------------------------------------------------------------------

    def put(self, table: str, key: str, value: Mapping[str, Any], now: float) -> Entry:
        """Write ``value`` (a msgpack-able dict) with a fresh HLC; returns the entry."""
        _local_check(table, key)
        try:
            blob = wire.pack(dict(value))
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"value is not msgpack-able: {e}") from None
        if len(blob) > MAX_VALUE_BYTES:
            raise ValueError(f"value of {len(blob)} bytes exceeds {MAX_VALUE_BYTES}")
        try:
            data, size = codec.decode_value_sized(blob)  # what every other replica will see
        except StateProtocolError as e:
            raise ValueError(f"bad value: {e}") from None
        reason = self._check(table, key, data)  # what every other replica will check
        if reason is not None:
            raise ValueError(reason)
        return self._local_write(table, key, blob, data, now, size)

    def delete(self, table: str, key: str, now: float) -> Entry | None:
        """Tombstone (table, key); None if there is nothing live to delete."""
        _local_check(table, key)
        slot = self._entries.get((table, key))
        if slot is None or slot.data is None:
            return None
        return self._local_write(table, key, None, None, now)

    def reannounce(self, node: str, now: float) -> list[Entry]:
        """Re-write every entry ``node`` owns with a fresh HLC (what an agent does on rejoin for
        what it still runs), so it beats any delete made while it was away."""
        out = []
        for e in self.owned_by(node):
            slot = self._entries[(e.table, e.key)]
            out.append(self._local_write(e.table, e.key, e.value, slot.data, now, slot.size))
        return out

    def reannounce_key(self, table: str, key: str, now: float) -> Entry | None:
        """Re-write one entry we own and hold live with a fresh HLC (``reannounce`` for one
        key): a peer disputed it, and a fresh write passes any peer's horizon. None if it is
        not ours or not live."""
        slot = self._entries.get((table, key))
        if slot is None or slot.data is None or table not in self.config.owned_tables or \
                self._owner(slot) != self.node_id:
            return None
        return self._local_write(table, key, slot.entry.value, slot.data, now, slot.size)

    def put_network(self, net: Network, now: float) -> Entry:
        return self.put(NETWORKS, net.key, net.to_value(), now)

    def put_service(self, svc: Service, now: float) -> Entry:
        return self.put(SERVICES, svc.key, svc.to_value(), now)

    def put_endpoint(self, ep: Endpoint, now: float) -> Entry:
        return self.put(ENDPOINTS, ep.key, ep.to_value(), now)

    def _local_write(
        self, table: str, key: str, blob: bytes | None, data: dict[str, Any] | None, now: float,
        size: int = 0,
    ) -> Entry:
        k = (table, key)
        old = self._entries.get(k)
        if old is None:
            if len(self._entries) >= self.config.max_entries:
                raise StoreFull("store holds max_entries")
            if table not in self._tables and len(self._tables) >= MAX_TABLES:
                raise StoreFull("store holds MAX_TABLES tables")
        if self._over_bytes(old, key, blob, size):
            self.stats.refused_bytes += 1
            raise StoreFull(f"store full: writing {table[:64]}/{key[:64]} would take what the "
                            f"store holds over {self.max_bytes:,} bytes (MAX_STORE_BYTES)")
        self._clock = self._clock.tick(now)
        e = self._signed(Entry(table, key, blob, self._clock, self.node_id))
        self._install(k, e, data, size=size)
        self._enqueue(e)
        return e

    def _over_bytes(self, slot: _Slot | None, key: str, value: bytes | None, size: int) -> bool:
        """Whether holding ``value`` (decoded ``size``) at ``key`` in place of ``slot`` would
        take the store over ``max_bytes`` and grow it (a write that does not grow it is always
        taken)."""
        new = _cost(key, value, size)
        old = 0 if slot is None else _cost(key, slot.entry.value, slot.size)
        return new > old and self.stats.bytes_held - old + new > self.max_bytes

    def _signed(self, e: Entry) -> Entry:
        """``e`` with our signature, if we have a signer (only ever for our own writes)."""
        if self._signer is None:
            return e
        sig = self._signer(codec.signed_bytes(e))
        if not isinstance(sig, bytes | bytearray):
            raise ValueError(f"signer returned {type(sig).__name__}, not {SIG_BYTES} bytes")
        if len(sig) != SIG_BYTES:
            raise ValueError(f"signer returned {len(sig)} bytes, not {SIG_BYTES}")
        return Entry(e.table, e.key, e.value, e.hlc, e.writer, bytes(sig))

    # ---- persistence seeding ---------------------------------------------------------------

    def load(self, entries: Iterable[Entry], now: float, gc_horizon: Horizon = NO_HORIZON) -> int:
        """Seed from the persisted copy (before serving). No events, no deltas, not dirty; the
        clock moves past every loaded HLC so the next local write beats them. Returns the count
        of entries taken (a malformed value is skipped; one the validator refuses is refused as
        a remote write is, and marked removed so the next ``take_dirty`` drops it from disk; one
        past ``max_entries`` or ``max_bytes``, or stamped beyond ``max_clock_skew`` ahead of NOW,
        is skipped, counted, and left on disk)."""
        self._horizon = max(self._horizon, gc_horizon)
        n = 0
        refused: set[tuple[str, str]] = set()
        future_ms = int(now * 1000) + self._skew_ms
        for e in entries:
            if e.hlc.wall_ms > future_ms:
                # Beyond the skew a peer would accept: taking it would move our clock so far
                # ahead that every later write of ours is refused. Skipped and left on disk
                # (when the clock gets there, a later start takes it).
                self.stats.refused_skew += 1
                continue
            try:
                data, size = (None, 0) if e.value is None else codec.decode_value_sized(e.value)
                if e.sig:
                    codec.check_sig(e.sig)
            except StateProtocolError:
                self.stats.bad_messages += 1
                continue
            k = (e.table, e.key)
            slot = self._entries.get(k)
            if slot is not None and entry_order(e) <= entry_order(slot.entry):
                continue
            if slot is None and len(self._entries) >= self.config.max_entries:
                self.stats.refused_capacity += 1
                continue
            if self._over_bytes(slot, e.key, e.value, size):
                self.stats.refused_bytes += 1  # skipped, left on disk (a later bound may take it)
                continue
            if data is not None:
                reason = self._check(e.table, e.key, data)
                if reason is not None:
                    self._refuse(e, reason)
                    refused.add(k)
                    continue
            self._clock = max(self._clock, e.hlc)
            self._install(k, e, data, quiet=True, size=size)
            n += 1
        for k in refused:
            if k not in self._entries:
                self._dirty[k] = None
        self._clock = self._clock.tick(now)
        self.version += 1
        return n

    def take_dirty(self) -> Changes:
        """Entries changed (and keys removed) since the last call, for StoreDb.save."""
        ups = [e for e in self._dirty.values() if e is not None]
        gone = [k for k, e in self._dirty.items() if e is None]
        self._dirty = {}
        return Changes(ups, gone, self._horizon)

    # ---- gossip (deltas) -------------------------------------------------------------------

    def set_cluster_size(self, n: int) -> None:
        """Members in the cluster: each delta is sent retransmit_mult x ceil(log10(n + 1))
        times (memberlist's retransmit limit), and at least MIN_DELTA_TRANSMITS times."""
        n = max(1, n)
        self._queue.set_limit(max(MIN_DELTA_TRANSMITS,
                                  self.config.retransmit_mult * math.ceil(math.log10(n + 1))))

    def pending_deltas(self) -> int:
        return len(self._queue)

    def take_deltas(self, limit_bytes: int, overhead: int = 0) -> list[bytes]:
        """Encoded writes to piggyback on one gossip packet: their lengths plus ``overhead``
        each (the caller's per-message framing) total at most ``limit_bytes``, so each is at
        most ``limit_bytes``. Least-sent first, then newest; each counts as one transmission."""
        return self._queue.take(limit_bytes, overhead)

    def apply_delta(self, data: bytes | memoryview, now: float) -> bool:
        """A gossiped write. True if it changed the store (it is then queued for re-gossip).
        Raises StateProtocolError on malformed input."""
        try:
            dec = codec.decode_delta(data)
        except StateProtocolError:
            self.stats.bad_messages += 1
            raise
        changed = self._apply(dec, now_ms(now), now) == _APPLIED
        if changed:
            self._enqueue(dec.entry)
        return changed

    def _enqueue(self, e: Entry) -> None:
        k = (e.table, e.key)
        msg = codec.encode_delta(e)
        if len(msg) > self.config.max_delta_bytes:
            self.stats.deltas_too_large += 1
            self._queue.discard(k)  # an older queued write of the key is superseded anyway
            return
        self._queue.push(k, msg)
        self.stats.deltas_evicted = self._queue.evicted

    # ---- anti-entropy ----------------------------------------------------------------------

    def digest(self) -> bytes:
        """Step 1 of anti-entropy: per table (tombstones included), ``2**level`` bucket hashes,
        each the XOR of the 64-bit hashes of the entries whose key falls in the bucket.

        Buckets are the low bits of a hash of the key, kept at 4096 per table and folded down by
        XOR to ~16 entries a bucket, so the level can differ between two peers and either side
        can fold to the other's. A 10,000-entry table is 1024 buckets: 8 KiB, not the ~1 MB of
        its entries. Maintained incrementally (XOR out, XOR in) on every write.
        """
        groups: list[codec.DigestRow] = []
        alt = self._alt_xor()
        names = sorted({n for n, t in self._tables.items() if t.count} | set(alt))
        for name in names:
            if len(groups) >= MAX_TABLES:
                break  # only refusal-only tables can push past it; they are dropped
            t = self._tables.get(name)
            level = t.level() if t is not None else 0
            ours = t.fold(level) if t is not None else (0,) * (1 << level)
            alts = [[b, ours[b] ^ x] for b, x in sorted(_fold_alt(alt.get(name, ()), level).items())
                    if x]
            hashes = _pack_hashes(ours)
            groups.append((name, level, hashes, alts) if alts else (name, level, hashes))
        return codec.encode_digest(groups)

    def diff_for(self, remote_digest: bytes | memoryview) -> bytes:
        """Step 2: our entries in every bucket whose hash differs from the remote digest's, plus
        a request for the remote's entries in those same buckets. The peer applies it with
        ``apply_entries``, which returns step 3 (its entries we lack or hold older); once we
        apply that, both replicas hold the same entries in every bucket. One digest -> diff ->
        diff exchange converges two replicas (unless ``max_diff_bytes`` truncates it; the rest
        then converges in the next exchange)."""
        try:
            remote = codec.decode_digest_groups(remote_digest)
        except codec.OverBudget:
            self.stats.over_budget += 1
            raise
        except StateProtocolError:
            self.stats.bad_messages += 1
            raise
        alt = self._alt_xor()
        blobs: list[bytes] = []
        requests: dict[str, tuple[int, list[int]]] = {}
        budget = self.config.max_diff_bytes - 64 * (MAX_TABLES + 1)
        size = 0
        full = False
        names = sorted(set(remote) | {n for n, t in self._tables.items() if t.count})
        for name in names:
            t = self._tables.get(name)
            their_alts: dict[int, int] = {}
            if name in remote:
                level, rblock, their_alts = remote[name]
            else:
                level = t.level() if t is not None else 0
                rblock = bytes(BUCKET_HASH_BYTES << level)
            theirs = _unpack_hashes(rblock)
            ours = t.fold(level) if t is not None else (0,) * (1 << level)
            our_alts = _fold_alt(alt.get(name, ()), level)
            wanted: list[int] = []
            for b in range(1 << level):
                if ours[b] == theirs[b]:
                    continue
                if their_alts.get(b) == ours[b] or ours[b] ^ our_alts.get(b, 0) == theirs[b]:
                    self.stats.ae_buckets_skipped += 1  # differs only by writes one side refuses
                    continue
                chunk = self._bucket_blobs(name, t, level, b, None)
                csize = sum(len(x) for x in chunk) + 8
                if size + csize > budget:
                    # Out of room. Ship a window of this bucket (without requesting it back),
                    # starting where the last truncated diff stopped, so that even a bucket larger
                    # than max_diff_bytes (a big table against a peer whose few entries made its
                    # digest coarse) gets across over a few exchanges.
                    size += self._window(chunk, budget - size, blobs)
                    full = True
                    break
                size += csize
                blobs.extend(chunk)
                wanted.append(b)
            if wanted:
                requests[name] = (level, wanted)
            if full:
                break
        return codec.encode_entries_parts(blobs, requests)

    def apply_entries(self, data: bytes | memoryview, now: float) -> bytes | None:
        """Apply an anti-entropy message (step 2, 3 or 4). For step 2 returns step 3, the reply
        to send back: our entries in the requested buckets that the sender did not ship or
        shipped older, and tombstones for what it shipped beyond our horizon. For step 3 returns
        step 4, those tombstones alone, or None when there are none; for step 4, whatever it
        returns is not sent. Raises StateProtocolError on malformed input."""
        try:
            msg = codec.decode_entries(data, self.config.max_diff_bytes)
        except codec.OverBudget:
            self.stats.over_budget += 1
            raise
        except StateProtocolError:
            self.stats.bad_messages += 1
            raise
        pms, ns = now_ms(now), now
        shipped: dict[tuple[str, str], tuple[tuple[int, str, int, bytes], bytes]] = {}
        beyond_horizon: list[bytes] = []
        for dec in msg.entries:
            outcome = self._apply(dec, pms, ns)
            e = dec.entry
            if msg.requests is not None:
                shipped[(e.table, e.key)] = copy_order(e)
            if outcome == _REFUSED_HORIZON and e.value is not None:
                # The sender holds a write we refuse: an old write of a key whose tombstone we
                # have collected. Tell it so with a tombstone stamped at our horizon (newer
                # than the write, past the ttl): it deletes the write there and
                # collects itself at once, and the two replicas agree again.
                # Signed by us like any write of ours (whether the peer's authorizer lets us
                # delete in that table is its call; if not, see the module docstring).
                stamp = min(MAX_HLC, max(self._horizon[0], e.hlc.pack() + 1))
                gone = Entry(e.table, e.key, None, Hlc.unpack(stamp), self.node_id)
                beyond_horizon.append(codec.encode_entry(self._signed(gone)))
        if msg.requests is None:
            # Step 3: the answer to it (step 4) carries only those tombstones. Without it, only
            # the exchanges *we* start could repair the peer, and an owned record's ghost waits
            # for its owner (the only writer its tombstone may come from) to pick that peer.
            return codec.encode_entries_parts(beyond_horizon, None) if beyond_horizon else None
        blobs: list[bytes] = beyond_horizon
        size = sum(len(x) for x in blobs)
        budget = self.config.max_diff_bytes - 64
        for name, (level, buckets) in sorted(msg.requests.items()):
            t = self._tables.get(name)
            for b in sorted(buckets):
                chunk = self._bucket_blobs(name, t, level, b, shipped)
                csize = sum(len(x) for x in chunk)
                if size + csize > budget:
                    break
                size += csize
                blobs.extend(chunk)
        return codec.encode_entries_parts(blobs, None)

    def _window(self, chunk: list[bytes], room: int, out: list[bytes]) -> int:
        if not chunk:
            return 0
        start = self._ae_cursor % len(chunk)
        used = taken = 0
        for i in range(len(chunk)):
            blob = chunk[(start + i) % len(chunk)]
            if used + len(blob) > room:
                break
            out.append(blob)
            used += len(blob)
            taken += 1
        self._ae_cursor += taken
        return used

    def _bucket_blobs(
        self,
        name: str,
        t: _Table | None,
        level: int,
        bucket: int,
        skip: dict[tuple[str, str], tuple[tuple[int, str, int, bytes], bytes]] | None,
    ) -> list[bytes]:
        if t is None:
            return []
        out = []
        for key in t.keys_in(level, bucket):
            e = self._entries[(name, key)].entry
            if skip is not None and skip.get((name, key)) == copy_order(e):
                continue  # the sender shipped this very copy
            out.append(codec.encode_entry(e))
        return out

    # ---- timers (tombstone GC) -------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When the next tombstone may be collected (seconds), or None."""
        while self._gc_heap:
            due, table, key, hlc = self._gc_heap[0]
            slot = self._entries.get((table, key))
            if slot is not None and slot.data is None and slot.entry.hlc.pack() == hlc:
                return due / 1000.0
            heapq.heappop(self._gc_heap)  # superseded or already gone
        return None

    def handle_timer(self, now: float) -> int:
        """Collect tombstones older than tombstone_ttl; returns how many."""
        pms = now_ms(now)
        n = 0
        while self._gc_heap and self._gc_heap[0][0] <= pms:
            _, table, key, hlc = heapq.heappop(self._gc_heap)
            slot = self._entries.get((table, key))
            if slot is None or slot.data is not None or slot.entry.hlc.pack() != hlc:
                continue
            self._collect((table, key), slot)
            n += 1
        return n

    def _collect(self, k: tuple[str, str], slot: _Slot) -> None:
        self._horizon = max(self._horizon, _tomb_order(slot.entry))
        self._uninstall(k, slot)
        del self._entries[k]
        self._dirty[k] = None
        self.stats.tombstones_collected += 1

    def _expired(self, e: Entry, pms: int) -> bool:
        return e.value is None and e.hlc.wall_ms + self._ttl_ms <= pms

    # ---- merge -----------------------------------------------------------------------------

    def _apply(self, dec: Decoded, pms: int, now: float) -> int:
        e = dec.entry
        if e.hlc.wall_ms > pms + self._skew_ms:
            self.stats.refused_skew += 1
            return _REFUSED
        outcome = self._merge(dec, pms, now)
        if outcome not in (_REFUSED_UNAUTHORIZED, _DEFERRED):
            # (a write the authorizer refuses moves nothing, our clock included)
            self._clock = self._clock.update(e.hlc, now)
        return outcome

    def _merge(self, dec: Decoded, pms: int, now: float) -> int:
        e = dec.entry
        k = (e.table, e.key)
        slot = self._entries.get(k)
        other_copy = False
        if slot is None:
            if entry_order(e) <= (*self._horizon, 0, b""):
                self.stats.refused_horizon += 1
                if e.value is not None and e.table in self.config.owned_tables:
                    # Maybe a ghost, maybe a live record we missed while our copy was stale (a
                    # restart from a disk copy older than the ttl): only its owner can tell,
                    # by re-announcing it with a fresh HLC (see "Horizon tombstones").
                    self._dispute(e)
                return _REFUSED_HORIZON
            if self._expired(e, pms):
                # a tombstone already past its ttl, of a key we do not hold: nothing to delete,
                # nothing to keep, but older writes of the key must stay out from now on (if
                # it is authorized: a forged one must not move the horizon)
                refused = self._screen(e, None, now)
                if refused is not None:
                    return refused
                self._horizon = max(self._horizon, _tomb_order(e))
                self.stats.stale += 1
                return _STALE
            if len(self._entries) >= self.config.max_entries or (
                e.table not in self._tables and len(self._tables) >= MAX_TABLES
            ):
                self.stats.refused_capacity += 1
                return _REFUSED
        else:
            held = slot.entry
            order, held_order = entry_order(e), entry_order(held)
            if order < held_order or (order == held_order and (
                    e.sig == held.sig or (self._authorizer is None and e.sig < held.sig))):
                self.stats.stale += 1
                return _STALE
            other_copy = order == held_order  # the same write, signed otherwise
        if self._over_bytes(slot, e.key, e.value, dec.size):
            self.stats.refused_bytes += 1
            return _REFUSED
        refused = self._screen(e, dec.data, now)
        if refused is not None:
            return refused
        if other_copy:
            assert slot is not None
            # Both copies are of one write, the one offered passes the authorizer. Keep ours if
            # it passes too and wins the tie-break (copy_order), else take the one offered.
            if e.sig < slot.entry.sig and self._holds_up(slot, now):
                self.stats.stale += 1
                return _STALE
            self.stats.copies_replaced += 1
        self.stats.applied += 1
        self._install(k, e, dec.data, size=dec.size)
        if self._expired(e, pms):
            self._collect(k, self._entries[k])
        return _APPLIED

    def _holds_up(self, slot: _Slot, now: float) -> bool:
        """Whether the authorizer accepts what we hold (asked only when another copy of the same
        write arrives; not counted: it is not a remote write)."""
        if self._authorizer is None:
            return True
        try:
            verdict = self._authorizer(slot.entry, _ro(slot.data), now)
        except Exception:
            return True  # cannot tell: keep what we have
        return verdict is None

    def _visible(self, slot: _Slot | None) -> dict[str, Any] | None:
        if slot is None or slot.data is None:
            return None
        owner_field = self.config.owned_tables.get(slot.entry.table)
        if owner_field is not None:
            owner = slot.data.get(owner_field)
            # a non-string owner (unhashable, even) is no live node: hidden, never an error
            if type(owner) is not str or owner not in self._live:
                return None
            life = self._live[owner]
            if life is not None:
                written = slot.data.get(LIFE_FIELD)
                if type(written) is int and written != life:
                    return None  # a previous (or a later) life's: its task died with it
        return slot.data

    def _owner(self, slot: _Slot) -> str | None:
        field_ = self.config.owned_tables.get(slot.entry.table)
        if field_ is None or slot.data is None:
            return None
        owner = slot.data.get(field_)
        return owner if type(owner) is str else None

    def _uninstall(self, k: tuple[str, str], slot: _Slot) -> None:
        self.stats.bytes_held -= _cost(k[1], slot.entry.value, slot.size)
        t = self._tables[k[0]]
        t.remove(k[1], slot.bucket, slot.ehash)
        if t.count == 0:
            del self._tables[k[0]]
        owner = self._owner(slot)
        if owner is not None:
            keys = self._owners[owner]
            keys.discard(k)
            if not keys:
                del self._owners[owner]

    def _install(
        self, k: tuple[str, str], e: Entry, data: dict[str, Any] | None, quiet: bool = False,
        size: int = 0,
    ) -> None:
        old = self._entries.get(k)
        old_visible = self._visible(old)
        if old is not None:
            self._uninstall(k, old)
            bucket = old.bucket
        else:
            bucket = _bucket_of(k[1])
        slot = _Slot(e, data, _hash_entry(e), bucket, size)
        self._entries[k] = slot
        self.stats.bytes_held += _cost(k[1], e.value, size)
        r = self._refused.get(k)
        if r is not None and (r.order < entry_order(e) or r.matches(e)):
            # The key now holds something newer than the refused write (or that very write).
            # Another copy of a write the authorizer refused stays remembered: that copy is
            # still refused, and our digest's alternative must still account for it.
            del self._refused[k]
        t = self._tables.get(k[0])
        if t is None:
            t = self._tables[k[0]] = _Table()
        t.add(k[1], bucket, slot.ehash)
        owner = self._owner(slot)
        if owner is not None:
            self._owners.setdefault(owner, set()).add(k)
        if data is None:
            heapq.heappush(self._gc_heap, (e.hlc.wall_ms + self._ttl_ms, k[0], k[1], e.hlc.pack()))
        if quiet:
            return
        self._dirty[k] = e
        self._changed(k, old_visible, self._visible(slot))

    def _changed(
        self, k: tuple[str, str], old: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> None:
        if old == new:
            return
        self.version += 1
        if len(self._events) >= self.config.max_pending_events:
            self._events.clear()
            self._events.append(EventsLost(self.version))
        self._events.append(ChangeEvent(k[0], k[1], _ro(old), _ro(new), self.version))


def _fold_alt(items: Iterable[tuple[int, int]], level: int) -> dict[int, int]:
    """(fine bucket, hash) pairs XORed together per bucket at ``level``."""
    mask = (1 << level) - 1
    out: dict[int, int] = {}
    for fine, x in items:
        b = fine & mask
        out[b] = out.get(b, 0) ^ x
    return out


def _pack_hashes(hashes: tuple[int, ...]) -> bytes:
    return struct.pack(f"<{len(hashes)}Q", *hashes)


def _unpack_hashes(block: bytes) -> tuple[int, ...]:
    return struct.unpack(f"<{len(block) // BUCKET_HASH_BYTES}Q", block)


def _local_check(table: str, key: str) -> None:
    try:
        codec.check_table(table)
        codec.check_key(key)
    except StateProtocolError as e:
        raise ValueError(str(e)) from None


def _typed(
    view: dict[str, Mapping[str, Any]], make: Callable[[Mapping[str, Any]], _T | None]
) -> dict[str, _T]:
    out: dict[str, _T] = {}
    for key, value in view.items():
        obj = make(value)
        if obj is not None:
            out[key] = obj
    return out
