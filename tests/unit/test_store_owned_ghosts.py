"""Ghosts of owned records (#15, found by the chaos soak, seed 1): a replica that kept a task
record its owner had deleted, after every other replica collected the tombstone, showed the
task running for 15 minutes. Only the owner may delete its records, so the repair must come
from the owner whichever side starts the exchange, and a peer's refused tombstone sends the
replica to the owner at once."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from test_store_sig import T0, Authority, node

from meshnet.agent.state_service import StateService
from meshnet.agent.store_db import StoreDb
from meshnet.membership import (
    Member,
    MemberAlive,
    MemberDead,
    MemberState,
    MemberSuspect,
    NodeMeta,
)
from meshnet.state import Entry, Refusal, Store, codec
from meshnet.state.authz import owner_of

TASK = {"task": "web.3", "service": "web", "slot": 3, "node": "o", "state": "running"}
KEY = "web.3@o"
OWNED = {"endpoints": "node", "tasks": "node"}  # as the agent has them


class Owners(Authority):
    """The fake authorizer, plus the real rule of owned tables: only the owner writes."""

    def __call__(self, e: Entry, data: Mapping[str, Any] | None, now: float) -> Refusal | None:
        r = super().__call__(e, data, now)
        if r is None and e.table == "tasks" and owner_of(e.key) != e.writer:
            r = Refusal(f"tasks/{e.key}: owned by {owner_of(e.key)}, written by {e.writer}", True)
        return r


def exchange(a: Store, b: Store, now: float) -> None:
    """One anti-entropy exchange started by A, as the agent runs it (steps 1-4)."""
    back = a.apply_entries(b.diff_for(a.digest()), now)
    if back is not None:
        last = b.apply_entries(back, now)
        if last is not None:
            a.apply_entries(last, now)


def ghost_cluster() -> tuple[Store, Store, Store]:
    """Owner O deleted its task record; P saw the delete; S did not. Both O and P have
    collected the tombstone, so S's live copy is an old write beyond their horizons."""
    o, p, s = (node(n, Owners("o", "p", "s"), tombstone_ttl=10.0) for n in ("o", "p", "s"))
    e = o.put("tasks", KEY, TASK, T0)
    for x in (p, s):
        x.apply_delta(codec.encode_delta(e), T0)
    o.delete("tasks", KEY, T0 + 1)
    exchange(p, o, T0 + 2)
    o.handle_timer(T0 + 20)
    p.handle_timer(T0 + 20)
    assert o.get("tasks", KEY) is None and p.get("tasks", KEY) is None
    assert s.get("tasks", KEY) is not None
    return o, p, s


def test_a_peer_cannot_delete_the_ghost_but_refuses_it() -> None:
    _, p, s = ghost_cluster()
    for a, b in ((p, s), (s, p)):
        exchange(a, b, T0 + 21)
    assert s.get("tasks", KEY) is not None  # P's tombstone is not the owner's
    assert p.get("tasks", KEY) is None  # and P never takes the ghost back


def test_the_ghost_goes_when_the_stale_replica_starts_the_exchange_with_the_owner() -> None:
    o, _, s = ghost_cluster()
    exchange(s, o, T0 + 21)  # before: only an exchange the owner started repaired S
    assert s.get("tasks", KEY) is None
    assert o.get("tasks", KEY) is None


def test_the_ghost_goes_when_the_owner_starts_the_exchange() -> None:
    o, _, s = ghost_cluster()
    exchange(o, s, T0 + 21)
    assert s.get("tasks", KEY) is None


def test_step_4_is_only_tombstones_beyond_the_horizon() -> None:
    o, _, s = ghost_cluster()
    back = s.apply_entries(o.diff_for(s.digest()), T0 + 21)
    assert back is not None
    last = o.apply_entries(back, T0 + 21)
    assert last is not None
    (gone,) = [d.entry for d in codec.decode_entries(last).entries]
    assert (gone.table, gone.key, gone.value, gone.writer) == ("tasks", KEY, None, "o")
    assert codec.decode_entries(last).requests is None
    assert s.apply_entries(last, T0 + 21) is None  # nothing further: the exchange ends
    # an exchange with nothing beyond the horizon has no step 4
    back = o.apply_entries(s.diff_for(o.digest()), T0 + 22)
    assert back is None or s.apply_entries(back, T0 + 22) is None


def test_a_peers_refused_tombstone_disputes_the_record() -> None:
    _, p, s = ghost_cluster()
    assert s.take_disputed() == []
    exchange(p, s, T0 + 21)  # P's horizon tombstone: refused by S, the key disputed
    assert s.take_disputed() == [("tasks", KEY)]
    assert s.take_disputed() == []  # drained
    exchange(p, s, T0 + 22)  # offered again (a repeat of the refusal): disputed again
    assert s.take_disputed() == [("tasks", KEY)]


def test_a_disputed_record_sends_the_replica_to_its_owner(tmp_path: Path) -> None:
    async def asked() -> tuple[list[tuple[str, int]], int]:
        _, p, s = ghost_cluster()
        db = StoreDb(tmp_path / "s.db")
        try:
            svc = StateService(s, db, "s")
            calls: list[tuple[str, int]] = []
            svc._anti_entropy_with = calls.append  # type: ignore[method-assign]
            svc.gossip = object()  # type: ignore[assignment]
            addr = ("10.0.0.1", 7946)
            owner = Member("o", addr, MemberState.ALIVE, 1, NodeMeta("o", addr), T0)
            svc.on_member_event(MemberAlive(owner), 3)
            calls.clear()  # the exchange with a member that comes back (tested below)
            for t in (21, 22, 23):
                exchange(p, s, T0 + t)
                svc.ask_owners()  # the agent calls it after every merge
            svc.on_member_event(MemberDead(owner), 3)
            exchange(p, s, T0 + 24)
            svc.ask_owners()  # a dead owner is not asked
            return calls, svc.counters["owners_asked"]
        finally:
            db.close()

    calls, n = asyncio.run(asked())
    assert calls == [("10.0.0.1", 7946)] and n == 1  # once per OWNER_ASK_INTERVAL_S


def stale_replica() -> tuple[Store, Store]:
    """The converse of a ghost (#15, soak seed 1): O's task record is live but old, and S
    never got it (S restarted from a disk copy that a full disk had kept stale), while S holds
    a newer tombstone of another key from that copy. S collects that tombstone, so its horizon
    passes O's record: S refuses a live record, and O refuses S's horizon tombstone."""
    o, s, p = (node(n, Owners("o", "p", "s"), tombstone_ttl=10.0, owned_tables=OWNED)
               for n in ("o", "s", "p"))
    s.set_node_live("o", True)
    o.put("tasks", KEY, TASK, T0)  # never reaches S
    other = {**TASK, "task": "web.9", "slot": 9, "node": "p"}
    s.apply_delta(codec.encode_delta(p.put("tasks", "web.9@p", other, T0 + 4)), T0 + 4)
    gone = p.delete("tasks", "web.9@p", T0 + 5)
    assert gone is not None
    s.apply_delta(codec.encode_delta(gone), T0 + 5)
    s.handle_timer(T0 + 20)  # collected: S's horizon is now T0 + 5
    assert s.gc_horizon[0] > o.entry("tasks", KEY).hlc.pack()  # type: ignore[union-attr]
    return o, s


def test_a_live_record_refused_by_a_stale_horizon_is_disputed_on_both_sides() -> None:
    o, s = stale_replica()
    exchange(s, o, T0 + 21)
    assert s.entry("tasks", KEY) is None and s.stats.refused_horizon == 1
    assert o.get("tasks", KEY) == TASK  # S's horizon tombstone is not the owner's
    assert s.take_disputed() == [("tasks", KEY)]  # S: ask the owner
    assert o.take_disputed() == [("tasks", KEY)]  # O: someone disputes a record of mine
    # Before, nothing more happened: S never saw the task, for good (and ran it twice).
    fresh = o.reannounce_key("tasks", KEY, T0 + 22)
    assert fresh is not None and fresh.hlc.pack() > s.gc_horizon[0]
    assert s.apply_delta(codec.encode_delta(fresh), T0 + 22)
    assert s.get("tasks", KEY) == TASK


def test_only_the_owner_reannounces_and_only_what_it_holds_live() -> None:
    o, s = stale_replica()
    assert s.reannounce_key("tasks", "web.9@p", T0 + 22) is None  # not S's (a tombstone, too)
    assert o.reannounce_key("tasks", "web.7@o", T0 + 22) is None  # nothing held
    o.delete("tasks", KEY, T0 + 22)
    assert o.reannounce_key("tasks", KEY, T0 + 23) is None  # deleted: not brought back


def test_the_owner_reannounces_a_disputed_record_once_per_interval(tmp_path: Path) -> None:
    async def reannounced() -> tuple[int, int, int, bool]:
        o, s = stale_replica()
        db = StoreDb(tmp_path / "o.db")
        try:
            svc = StateService(o, db, "o")
            svc.gossip = object()  # type: ignore[assignment]
            before = o.entry("tasks", KEY)
            assert before is not None
            exchange(s, o, T0 + 21)
            svc.ask_owners()
            after = o.entry("tasks", KEY)
            assert after is not None
            o._disputed[("tasks", KEY)] = None  # disputed again at once (another replica)
            svc.ask_owners()  # within OWNER_ASK_INTERVAL_S: not written again
            again = o.entry("tasks", KEY)
            return (svc.counters["records_reannounced"], before.hlc.pack(), after.hlc.pack(),
                    again == after)
        finally:
            db.close()

    n, before, after, settled = asyncio.run(reannounced())
    assert n == 1 and after > before and settled


def test_a_write_too_large_to_gossip_is_pushed_to_every_live_member(tmp_path: Path) -> None:
    """A record over the gossip delta bound (a service with a long command and its previous
    spec) would otherwise reach the others only by the periodic anti-entropy, 10-30 s later."""

    async def pushed() -> tuple[list[tuple[str, int]], int, int]:
        s = node("s", Owners("o", "p", "s"))
        db = StoreDb(tmp_path / "s.db")
        try:
            svc = StateService(s, db, "s")
            calls: list[tuple[str, int]] = []
            svc._anti_entropy_with = calls.append  # type: ignore[method-assign]
            svc.gossip = object()  # type: ignore[assignment]
            for name, ip in (("o", "10.0.0.1"), ("p", "10.0.0.2")):
                addr = (ip, 7946)
                svc.on_member_event(MemberAlive(Member(name, addr, MemberState.ALIVE, 1,
                                                       NodeMeta(name, addr), T0)), 3)
            calls.clear()  # the exchanges with members that come back (tested below)
            small = {**TASK, "node": "s", "task": "web.1", "slot": 1}
            await svc.put("tasks", "web.1@s", small)
            assert calls == []  # it fits a gossip packet
            big = {**small, "task": "web.2", "slot": 2, "note": "x" * 4000}
            await svc.put("tasks", "web.2@s", big)
            return calls, svc.counters["large_writes_pushed"], s.stats.deltas_too_large
        finally:
            db.close()

    calls, n, too_large = asyncio.run(pushed())
    assert sorted(calls) == [("10.0.0.1", 7946), ("10.0.0.2", 7946)] and n == 1 == too_large


def test_a_member_that_comes_back_is_exchanged_with_at_once(tmp_path: Path) -> None:
    """It wrote while we could not hear it (a healed partition), and gossip carries only new
    writes: an exchange now, not at the next push-pull; a few a second at most (a big heal)."""

    async def exchanges() -> tuple[list[tuple[str, int]], int]:
        s = node("s", Owners("o", "p", "s"))
        db = StoreDb(tmp_path / "s.db")
        try:
            svc = StateService(s, db, "s")
            calls: list[tuple[str, int]] = []
            svc._anti_entropy_with = calls.append  # type: ignore[method-assign]
            svc.gossip = object()  # type: ignore[assignment]
            members = [Member(f"m{i}", (f"10.0.1.{i}", 7946), MemberState.ALIVE, 1,
                              NodeMeta(f"m{i}", (f"10.0.1.{i}", 7946)), T0) for i in range(5)]
            for m in members:  # five return at once: two exchanges this second
                svc.on_member_event(MemberAlive(m), 6)
            svc.on_member_event(MemberAlive(members[0]), 6)  # alive again: not a return
            svc.on_member_event(MemberDead(members[1]), 6)
            svc._returns.clear()  # a second later
            svc.on_member_event(MemberAlive(members[1]), 6)  # back from the dead: a return
            svc._returns.clear()
            svc.on_member_event(MemberSuspect(members[2]), 6)
            svc.on_member_event(MemberAlive(members[2]), 6)  # a moment's suspicion: not one
            svc.on_member_event(MemberSuspect(members[3]), 6)
            svc._suspect_since["m3"] -= 3.0  # suspect for 3 s (a short partition): a return
            svc.on_member_event(MemberAlive(members[3]), 6)
            return calls, svc.counters["return_exchanges"]
        finally:
            db.close()

    calls, n = asyncio.run(exchanges())
    assert calls == [("10.0.1.0", 7946), ("10.0.1.1", 7946), ("10.0.1.1", 7946),
                     ("10.0.1.3", 7946)] and n == 4
