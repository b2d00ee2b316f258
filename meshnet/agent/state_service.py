"""The replicated store's shell: gossip deltas, anti-entropy streams, SQLite, ownership.

- Deltas ride membership gossip through the Delegate hooks (spare room in each packet).
- Anti-entropy rides every push-pull: right after one succeeds with a peer, we run
  digest -> diff -> diff with that peer on the STATE stream (two request/reply round trips).
- Every change is written to SQLite (WAL) off the event loop, in batches; local writes are
  durable before the control API answers, except on a full disk: a batch that cannot be saved
  is kept in memory (merged with later changes), the failure is logged as one line per outage
  and counted (`status`: store.save_errors, store.disk_full, store.unsaved), and the save is
  retried every SAVE_RETRY_S until it succeeds. The write itself stands (it is in the store and
  gossiped), so the control API answers as usual: the cluster holds it, this disk will.
- Membership events drive ownership: a dead or left member's endpoints vanish from every view
  at once, with no write; they come back if it comes back.
- Every value is checked by the schema (meshnet/state/validate.py) before the store takes it:
  a remote write that fails is refused and counted (`status` shows the store's counters) and
  its reason logged, at most REFUSAL_LOG_BURST lines a minute. The identity layer signs our
  writes and judges remote ones through the store's hooks (``Store.set_signer`` /
  ``set_authorizer``, set by the agent); a final refusal is logged the same way, a deferred one
  only counted.
- Nothing a peer sends can stop this service: a handler that fails is counted and logged once
  per kind of failure, and the next message is handled as usual.

The store's HLC needs wall-clock seconds (comparable across hosts), so this shell passes
time.time() to the store, never the loop's monotonic clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from meshnet.agent.control import OpError
from meshnet.agent.gossip import STREAM_STATE, GossipTransport, StreamError
from meshnet.agent.logs import LogOnce, error_line
from meshnet.agent.store_db import StoreDb, StoreDbError
from meshnet.crypto.keyring import KeyringError
from meshnet.fsutil import DEFERRED
from meshnet.membership import (
    Addr,
    MemberAlive,
    MemberDead,
    MemberEvent,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MemberSuspect,
    MemberUpdated,
)
from meshnet.state import Entry, StateProtocolError, Store, StoreFull
from meshnet.state.authz import OWNED_TABLES, owner_of
from meshnet.state.store import LIFE_FIELD, Horizon
from meshnet.state.types import StoreEvent
from meshnet.state.validate import check_value

log = logging.getLogger("meshnet.state")

# Anti-entropy messages on the STATE stream: step 1 carries our digest, step 3 our entries.
AE_DIGEST = 1
AE_ENTRIES = 2
# Coalesce bursts of changes (a push-pull can bring thousands) into one SQLite transaction.
FLUSH_DELAY_S = 0.05
# Refused writes logged per REFUSAL_LOG_WINDOW_S; the rest are only counted (a peer sending
# thousands of bad writes must not flood the log).
REFUSAL_LOG_BURST = 10
REFUSAL_LOG_WINDOW_S = 60.0
# A save that failed (a full disk) is tried again this often, with every change kept meanwhile.
SAVE_RETRY_S = 2.0


# How often at most we start an exchange with one owner to settle records a peer disputes
# (ask_owners): a ghost goes at the first; a dispute that persists costs one exchange a period.
OWNER_ASK_INTERVAL_S = 10.0
# Disputed records of ours re-announced lately (key -> when), remembered for the rate limit.
MAX_REANNOUNCED = 1024
# A member that comes back (a healed partition, a restart, a flap) wrote while we could not hear
# it, and gossip only carries new writes: exchange with it at once rather than at the next
# push-pull (30 s and more). At most this many such exchanges start per RETURN_WINDOW_S, so a
# heal of a big cluster (every member of the other side returns at once) costs a few exchanges:
# one exchange with any member of the other side brings all of that side's state.
RETURN_EXCHANGES = 2
RETURN_WINDOW_S = 1.0
# A member held suspect at least this long that turns alive counts as coming back too: a short
# partition heals before the suspicion times out (the soak: 23 s, then 16.7 s waiting for a
# task record written on the other side).
RETURN_AFTER_SUSPECT_S = 2.0


class StateService:
    def __init__(self, store: Store, db: StoreDb | None, node: str,
                 state_dir: str | None = None) -> None:
        self.store = store
        self.db = db  # None until it can be opened (a full disk at start)
        self.state_dir = state_dir
        self.node = node
        self.loop = asyncio.get_running_loop()
        self.gossip: GossipTransport | None = None
        self.listeners: list[Callable[[], None]] = []
        # Told of each change the store reports (the agent's event hub: `meshctl events`).
        self.change_listeners: list[Callable[[StoreEvent], None]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.flush_task: asyncio.Task[None] | None = None
        self.flush_lock = asyncio.Lock()
        self.notify_scheduled = False
        self._counts = {"bad_deltas": 0, "bad_entries": 0, "anti_entropy": 0,
                        "anti_entropy_failed": 0, "handler_errors": 0, "listener_errors": 0,
                        "refusals_not_logged": 0, "save_errors": 0, "owners_asked": 0,
                        "large_writes_pushed": 0, "return_exchanges": 0,
                        "records_reannounced": 0}
        self._returns: deque[float] = deque()  # starts of recent exchanges with returners
        self._suspect_since: dict[str, float] = {}  # members held suspect: since when
        # Live members' addresses (from membership events), and when we last asked each owner
        # to settle a disputed record (ask_owners): both at most one entry per member.
        self._live_addrs: dict[str, Addr] = {}
        self._asked_owner: dict[str, float] = {}
        self._reannounced: OrderedDict[tuple[str, str], float] = OrderedDict()
        # Changes not yet on disk (a save failed): (table, key) -> entry, or None if removed.
        self._unsaved: dict[tuple[str, str], Entry | None] = {}
        self._unsaved_horizon: Horizon | None = None
        self._save_failing: str | None = None  # the error of the outage going on, if any
        self._disk_full = False
        self.retry_timer: asyncio.TimerHandle | None = None
        self._log_once = LogOnce(log)
        self._refusal_window = (0.0, 0)  # (window start, lines logged in it)

    @property
    def synced(self) -> bool:
        """Whether an exchange of state with a peer has finished since start."""
        return self._counts["anti_entropy"] > 0

    @property
    def counters(self) -> dict[str, Any]:
        """This service's counters and the store's (every StoreStats field: applied, stale,
        refused_*, refused_by_table, ae_buckets_skipped, refused_unauthorized(_repeats,
        _by_table), refused_deferred, authorizer_errors, copies_replaced, ...), as `status`
        shows them under "store"."""
        out: dict[str, Any] = dict(self._counts)
        out["unsaved"] = len(self._unsaved)
        out["disk_full"] = self._disk_full or bool(DEFERRED.pending)
        out["file_save_errors"] = DEFERRED.failures
        out["files_unsaved"] = len(DEFERRED.pending)
        for f in dataclasses.fields(self.store.stats):
            value = getattr(self.store.stats, f.name)
            out[f.name] = dict(value) if isinstance(value, dict) else value
        return out

    def _error_once(self, what: str, exc: BaseException) -> None:
        """A failure that must not stop anything: counted always, logged once per kind."""
        self._counts["handler_errors"] += 1
        self._log_once(what, exc, "handler_errors")

    def log_refusals(self) -> None:
        """Log the store's new refusals, at most REFUSAL_LOG_BURST a window."""
        reasons = self.store.take_refusals()
        if not reasons:
            return
        now = time.monotonic()
        start, logged = self._refusal_window
        if now - start >= REFUSAL_LOG_WINDOW_S:
            start, logged = now, 0
        for reason in reasons:
            if logged < REFUSAL_LOG_BURST:
                logged += 1
                log.warning("refused a replicated write: %s", reason)
            else:
                self._counts["refusals_not_logged"] += 1
        self._refusal_window = (start, logged)

    @staticmethod
    def now() -> float:
        return time.time()

    @classmethod
    async def open(cls, state_dir: str, node: str, store: Store) -> StateService:
        """Load the last-known copy from disk so it is served at once, before any peer answers."""
        if store.validator is None:
            store.set_validator(check_value)  # the schema, before anything is loaded
        db: StoreDb | None = None
        try:
            db = await asyncio.to_thread(StoreDb.in_state_dir, state_dir)
        except StoreDbError as e:
            if not e.disk_full:
                raise
            # No room even to open it (a new file on a full disk): run from memory (peers
            # fill the store) and open it on a later save, once there is room.
            log.error("cannot open the store database (disk full): %s; running from memory, "
                      "saved when space returns (counted in store.save_errors)",
                      " ".join(str(e).split())[:300])
        if db is not None:
            entries = await asyncio.to_thread(db.load)
            horizon = await asyncio.to_thread(db.load_gc_horizon)
            loaded = store.load(entries, time.time(), horizon)
            if db.quarantined is not None:
                log.warning("store file was unreadable; moved aside to %s", db.quarantined)
            if db.exclusive:
                log.warning("store opened in exclusive locking mode: the disk has no room for "
                            "its shared index")
            log.info("store loaded", extra={"fields": {"entries": loaded}})
        service = cls(store, db, node, state_dir)
        if db is None:
            service._counts["save_errors"] += 1
            service._disk_full = True
            service._save_failing = "cannot open the store database"
            service._arm_retry()
        service.log_refusals()
        # What we still own gets a fresh HLC so it beats any delete made while we were away.
        store.reannounce(node, time.time())
        service.changed()
        if DEFERRED.pending:  # node.json could not be written at start: a full disk
            service._arm_retry()
        return service

    def attach(self, gossip: GossipTransport) -> None:
        self.gossip = gossip
        gossip.stream_handlers[STREAM_STATE] = self._serve_stream
        gossip.after_push_pull.append(self._anti_entropy_with)

    async def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.retry_timer is not None:
            self.retry_timer.cancel()
        await self.flush()
        if self._unsaved:
            log.warning("stopping with %d change(s) not saved to disk (peers hold them)",
                        len(self._unsaved))
        if self.db is not None:
            await asyncio.to_thread(self.db.close)

    # --- change plumbing ----------------------------------------------------------------------

    def changed(self) -> None:
        """Call after anything that may have changed the store."""
        if self.flush_task is None or self.flush_task.done():
            self.flush_task = self.loop.create_task(self._flush_soon())
        if not self.notify_scheduled:
            self.notify_scheduled = True
            self.loop.call_soon(self._notify)
        self._arm_timer()

    def _notify(self) -> None:
        self.notify_scheduled = False
        while (event := self.store.next_event()) is not None:
            # listeners re-read the views; the events only tell them something changed
            for on_change in self.change_listeners:
                try:
                    on_change(event)
                except Exception as e:
                    self._counts["listener_errors"] += 1
                    self._error_once("store change listener", e)
        self.log_refusals()
        for listener in self.listeners:
            try:  # one listener's failure must not keep the others from hearing of the change
                listener()
            except Exception as e:
                self._counts["listener_errors"] += 1
                self._error_once(f"store listener {getattr(listener, '__qualname__', '?')}", e)

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_DELAY_S)
        await self.flush()

    async def flush(self) -> None:
        """Write every pending change to SQLite; returns once it is durable, or, if the save
        fails (a full disk), once the changes are kept for the retry. Never raises."""
        async with self.flush_lock:
            changes = self.store.take_dirty()
            if not (changes.upserts or changes.removed or self._unsaved):
                return
            # Merge into what earlier failed saves left: the latest change per key wins.
            for entry in changes.upserts:
                self._unsaved[(entry.table, entry.key)] = entry
            for k in changes.removed:
                self._unsaved[k] = None
            self._unsaved_horizon = changes.gc_horizon
            batch = self._unsaved
            upserts = [v for v in batch.values() if v is not None]
            removed = [k for k, v in batch.items() if v is None]
            try:
                if self.db is None:
                    if self.state_dir is None:
                        raise StoreDbError("no store database")
                    self.db = await asyncio.to_thread(StoreDb.in_state_dir, self.state_dir)
                await asyncio.to_thread(self.db.save, upserts, removed, self._unsaved_horizon)
            except Exception as e:
                self._save_failed(e)
                return
            n = len(batch)
            self._unsaved = {}  # all on disk now (only flush, under the lock, changes it)
            if self._save_failing is not None:
                log.warning("store saved to disk again (%d change(s) caught up)", n)
                self._save_failing = None
                self._disk_full = False

    def _save_failed(self, e: BaseException) -> None:
        """A save failed: counted always, one line per outage, retried every SAVE_RETRY_S."""
        self._counts["save_errors"] += 1
        full = isinstance(e, StoreDbError) and e.disk_full
        self._disk_full = full
        if self._save_failing is None:
            what = str(e) if isinstance(e, StoreDbError) else error_line(e)
            self._save_failing = what
            log.error("cannot save the store to disk%s: %s; keeping %d change(s) in memory and "
                      "retrying every %gs (counted in store.save_errors)",
                      " (disk full)" if full else "", " ".join(what.split())[:300],
                      len(self._unsaved), SAVE_RETRY_S)
        self._arm_retry()

    def _arm_retry(self) -> None:
        if self.retry_timer is None:
            self.retry_timer = self.loop.call_later(SAVE_RETRY_S, self._on_retry)

    def _on_retry(self) -> None:
        self.retry_timer = None
        self.loop.create_task(self._retry())

    async def _retry(self) -> None:
        try:
            if DEFERRED.pending:
                left = await asyncio.to_thread(DEFERRED.retry)
                if not left:
                    log.warning("files that could not be written (disk full) are written now")
            await self.flush()
        except Exception as e:  # a bug: counted, logged once; the next retry runs as usual
            self._error_once("retrying a save", e)
        if self._unsaved or DEFERRED.pending:
            self._arm_retry()

    def _arm_timer(self) -> None:
        deadline = self.store.get_timer()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if deadline is not None:
            delay = max(0.0, deadline - time.time())
            self.timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.store.handle_timer(time.time()):
            self.changed()
        else:
            self._arm_timer()

    # --- local writes (control API) ---------------------------------------------------------

    async def put(self, table: str, key: str, value: dict[str, Any]) -> None:
        too_large = self.store.stats.deltas_too_large
        try:
            self.store.put(table, key, value, time.time())
        except StoreFull as e:  # a bound, not a bug: the user reads why (counted in the store)
            raise OpError(str(e), "store_full") from None
        self.changed()
        await self.flush()
        if self.store.stats.deltas_too_large > too_large and self.gossip is not None:
            # Too large for a gossip packet (a service with a long command and its previous
            # spec): left to anti-entropy it would reach the others in 10-30 s, so exchange with
            # every live member now. Such writes are rare (definitions, not task states).
            self._counts["large_writes_pushed"] += 1
            for addr in list(self._live_addrs.values()):
                self._anti_entropy_with(addr)

    async def delete(self, table: str, key: str) -> bool:
        entry = self.store.delete(table, key, time.time())
        self.changed()
        await self.flush()
        return entry is not None

    # --- membership -------------------------------------------------------------------------

    def on_member_event(self, event: MemberEvent, cluster_size: int) -> None:
        member = event.member
        if member.name == self.node:
            return
        if isinstance(event, MemberSuspect):
            self._suspect_since.setdefault(member.name, time.monotonic())
        elif isinstance(event, MemberJoined | MemberAlive | MemberUpdated):
            since = self._suspect_since.pop(member.name, None)
            returned = member.name not in self._live_addrs or (
                since is not None and time.monotonic() - since >= RETURN_AFTER_SUSPECT_S)
            # its life: entries of its previous life (dead tasks, sandboxes) hide at once
            life = member.meta.extra.get(LIFE_FIELD)
            self.store.set_node_live(member.name, True, life if type(life) is int else None)
            self._live_addrs[member.name] = member.addr
            if returned and self.gossip is not None and self._may_exchange_on_return():
                self._counts["return_exchanges"] += 1
                self._anti_entropy_with(member.addr)
        if isinstance(event, MemberDead | MemberLeft | MemberReaped):
            self._suspect_since.pop(member.name, None)
            self.store.set_node_live(member.name, False)
            self._live_addrs.pop(member.name, None)
            self._asked_owner.pop(member.name, None)
        self.store.set_cluster_size(cluster_size)
        self.changed()

    def _may_exchange_on_return(self) -> bool:
        now = time.monotonic()
        while self._returns and now - self._returns[0] > RETURN_WINDOW_S:
            self._returns.popleft()
        if len(self._returns) >= RETURN_EXCHANGES:
            return False
        self._returns.append(now)
        return True

    def ask_owners(self) -> None:
        """For each of our owned-table writes a peer disputed (store.take_disputed), start an
        exchange with its owner, at most once per OWNER_ASK_INTERVAL_S each: the owner's
        horizon tombstone is the only one that may remove a ghost (step 3 or 4)."""
        now = time.monotonic()
        for table, key in self.store.take_disputed():
            owner = owner_of(key) if table in OWNED_TABLES else None
            if owner == self.node:
                self._reannounce(table, key, now)
                continue
            addr = self._live_addrs.get(owner) if owner else None
            if addr is None or now - self._asked_owner.get(owner or "", -1e9) < \
                    OWNER_ASK_INTERVAL_S:
                continue
            assert owner is not None
            self._asked_owner[owner] = now
            self._counts["owners_asked"] += 1
            if self.gossip is not None:
                self._anti_entropy_with(addr)

    def _reannounce(self, table: str, key: str, now: float) -> None:
        """A peer disputes a record we own: it sent a tombstone we refuse, or refused our write
        by its GC horizon (its copy was stale longer than the ttl, and the record is older).
        If we still hold it live, write it again with a fresh HLC, which every horizon lets in;
        at most once per OWNER_ASK_INTERVAL_S per key, so a dispute costs no write storm."""
        k = (table, key)
        if now - self._reannounced.get(k, -1e9) < OWNER_ASK_INTERVAL_S:
            return
        while len(self._reannounced) >= MAX_REANNOUNCED:
            self._reannounced.popitem(last=False)
        self._reannounced[k] = now
        if self.store.reannounce_key(table, key, time.time()) is not None:
            self._counts["records_reannounced"] += 1
            self.changed()

    # Delegate hooks: the membership core calls these synchronously.
    def get_broadcasts(self, overhead: int, limit_bytes: int) -> list[bytes]:
        return self.store.take_deltas(limit_bytes, overhead)

    def notify_message(self, data: bytes) -> None:
        try:
            if self.store.apply_delta(data, time.time()):
                self.changed()
            self.ask_owners()
        except StateProtocolError:
            self._counts["bad_deltas"] += 1
        except Exception as e:  # a bug; the membership core calling us must go on regardless
            self._counts["bad_deltas"] += 1
            self._error_once("applying a gossiped delta", e)
        self.log_refusals()

    def local_state(self, join: bool) -> bytes:
        return b""  # the full state moves by digest on the STATE stream instead

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        pass

    # --- anti-entropy -----------------------------------------------------------------------

    def _anti_entropy_with(self, addr: Addr) -> None:
        self.loop.create_task(self._anti_entropy(addr))

    async def _anti_entropy(self, addr: Addr) -> None:
        assert self.gossip is not None
        try:
            diff = await self.gossip.request(addr, STREAM_STATE,
                                             bytes([AE_DIGEST]) + self.store.digest())
            reply = self.store.apply_entries(diff, time.time())
            self.changed()
            self.ask_owners()
            if reply:
                last = await self.gossip.request(addr, STREAM_STATE, bytes([AE_ENTRIES]) + reply)
                if last:  # step 4: tombstones for writes of ours beyond the peer's horizon
                    self.store.apply_entries(last, time.time())
                    self.changed()
            self._counts["anti_entropy"] += 1
        except StateProtocolError:
            self._counts["bad_entries"] += 1
        except (OSError, TimeoutError, asyncio.IncompleteReadError, StreamError, KeyringError):
            self._counts["anti_entropy_failed"] += 1
        except Exception as e:  # a bug: this exchange is lost, the next one runs as usual
            self._counts["anti_entropy_failed"] += 1
            self._error_once("anti-entropy", e)

    async def _serve_stream(self, body: bytes, addr: Addr) -> bytes | None:
        if not body:
            return None
        try:
            if body[0] == AE_DIGEST:
                return self.store.diff_for(body[1:])
            if body[0] == AE_ENTRIES:
                step4: bytes | None = None
                try:
                    step4 = self.store.apply_entries(body[1:], time.time())
                except StateProtocolError:
                    self._counts["bad_entries"] += 1
                self.changed()
                self.ask_owners()
                return step4 or b""
        except StateProtocolError:
            self._counts["bad_entries"] += 1
        except Exception as e:  # a bug: answer nothing; the peer counts a failed exchange
            self._error_once("serving anti-entropy", e)
        return None

