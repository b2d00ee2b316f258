"""The agent's event hub (`meshctl events`): bounds, filters, --since, drop accounting, and the
translation of what the cores report into events."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from meshnet.agent.agent import Agent
from meshnet.agent.control import OpError
from meshnet.agent.eventhub import (
    MAX_SUBSCRIBERS,
    QUEUE_EVENTS,
    RING_EVENTS,
    EventHub,
    HubFull,
    serve_events,
    store_event,
)
from meshnet.crypto.keyring import Keyring, generate_key, key_id, parse_key
from meshnet.events import parse_filters
from meshnet.membership import Member, MemberDead, MemberJoined, MemberState, NodeMeta
from meshnet.state.types import ChangeEvent, EventsLost


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def hub(ring: int = 8, queue: int = 4, subscribers: int = 2) -> tuple[EventHub, Clock]:
    clock = Clock()
    return EventHub(clock, ring=ring, queue=queue, max_subscribers=subscribers), clock


def actions(events: list[Any]) -> list[str]:
    return [e.doc["action"] for e in events]


def test_the_bounds_are_named_and_consistent() -> None:
    assert RING_EVENTS > 0 and MAX_SUBSCRIBERS > 0
    assert QUEUE_EVENTS >= RING_EVENTS  # a --since replay of the whole ring fits a queue


def test_the_ring_keeps_only_the_newest_events() -> None:
    h, _ = hub(ring=8)
    for i in range(20):
        h.publish("network", f"a{i}", {})
    assert len(h.ring) == 8
    assert actions(list(h.ring)) == [f"a{i}" for i in range(12, 20)]
    assert h.counters["published"] == 20


def test_a_slow_subscriber_loses_its_oldest_events_and_is_told_how_many() -> None:
    h, _ = hub(queue=4)
    slow = h.subscribe({})
    fast = h.subscribe({})
    for i in range(10):
        h.publish("task", f"a{i}", {})
        if i % 2:
            fast.take()
    dropped, got = slow.take()
    assert dropped == 6 and actions(got) == ["a6", "a7", "a8", "a9"]
    assert len(slow.queue) == 0 and not slow.wake.is_set()
    assert h.counters["dropped"] == 6  # the fast one lost nothing
    dropped, got = slow.take()
    assert (dropped, got) == (0, [])  # told once


def test_take_hands_out_at_most_a_batch() -> None:
    h, _ = hub(queue=10)
    sub = h.subscribe({})
    for i in range(7):
        h.publish("task", f"a{i}", {})
    assert actions(sub.take(5)[1]) == ["a0", "a1", "a2", "a3", "a4"]
    assert sub.wake.is_set()  # more to come
    assert actions(sub.take(5)[1]) == ["a5", "a6"]
    assert not sub.wake.is_set()


def test_filters_or_within_a_key_and_across_keys() -> None:
    h, _ = hub(queue=10)
    both = h.subscribe(parse_filters(["type=member", "type=task"]))
    h2_tasks = h.subscribe(parse_filters(["type=task", "node=h2"]))
    h.publish("member", "dead", {"name": "h3"})
    h.publish("task", "running", {"task": "web.1", "node": "h1"})
    h.publish("task", "failed", {"task": "web.2", "node": "h2"})
    h.publish("network", "created", {"name": "n"})
    assert actions(both.take()[1]) == ["dead", "running", "failed"]
    assert actions(h2_tasks.take()[1]) == ["failed"]


def test_since_replays_the_buffered_events_of_that_window_only() -> None:
    h, clock = hub(ring=8, queue=8)
    for t, name in ((0, "old"), (100, "mid"), (200, "new")):
        clock.now = 1_700_000_000.0 + t
        h.publish("service", "created", {"name": name})
    clock.now = 1_700_000_000.0 + 250
    recent = h.subscribe({}, since=60)
    everything = h.subscribe({}, since=1000)
    assert [e.doc["name"] for e in recent.take()[1]] == ["new"]
    assert [e.doc["name"] for e in everything.take()[1]] == ["old", "mid", "new"]
    h2, _ = hub()
    h2.publish("service", "created", {"name": "x"})
    assert h2.subscribe({}).take() == (0, [])  # without --since: only what comes next


def test_subscribers_are_bounded_and_freed() -> None:
    h, _ = hub(subscribers=2)
    a = h.subscribe({})
    h.subscribe({})
    with pytest.raises(HubFull, match="too many"):
        h.subscribe({})
    assert h.counters["subscribers_refused"] == 1
    h.unsubscribe(a)
    h.subscribe({})
    assert h.status()["subscribers"] == 2


def test_events_carry_time_type_action_and_fields() -> None:
    h, clock = hub()
    clock.now = 1_796_463_001.123
    ev = h.publish("member", "dead", {"name": "h3"})
    assert ev.doc == {"time": "2026-12-05T09:30:01.123Z", "type": "member", "action": "dead",
                      "name": "h3"}
    json.dumps(ev.doc)


def _member(state: MemberState, inc: int = 4) -> Member:
    meta = NodeMeta("h3", ("10.0.0.3", 7946), {}, {})
    return Member("h3", ("10.0.0.3", 7946), state, inc, meta, 0.0)


def test_member_events_name_the_member_and_its_state() -> None:
    h, _ = hub()
    h.member(MemberDead(_member(MemberState.DEAD)))
    h.member(MemberJoined(_member(MemberState.ALIVE, 5)))
    dead, joined = (e.doc for e in h.ring)
    assert {k: dead[k] for k in ("type", "action", "name", "state", "addr", "incarnation")} == \
        {"type": "member", "action": "dead", "name": "h3", "state": "dead",
         "addr": "10.0.0.3:7946", "incarnation": 4}
    assert (joined["action"], joined["state"], joined["incarnation"]) == ("join", "alive", 5)


def change(table: str, key: str, old: dict[str, Any] | None,
           new: dict[str, Any] | None) -> ChangeEvent:
    return ChangeEvent(table, key, None if old is None else MappingProxyType(old),
                       None if new is None else MappingProxyType(new), 1)


NET = {"name": "appnet", "vni": 4242, "subnet": "10.10.0.0/24", "encrypted": False}
SVC = {"name": "web", "network": "appnet", "mode": "replicated", "replicas": 2, "spec": {}}
TASK = {"task": "web.2", "service": "web", "slot": 2, "node": "h2", "state": "running",
        "ip": "10.10.0.5", "exit_code": None, "restarts": 0}


def test_networks_and_services_created_updated_removed() -> None:
    assert store_event(change("networks", "appnet", None, NET)) == (
        "network", "created", {"name": "appnet", "subnet": "10.10.0.0/24", "vni": 4242,
                               "encrypted": False})
    assert store_event(change("networks", "appnet", NET, None))[:2] == ("network", "removed")
    kind, action, fields = store_event(change("services", "web", SVC, {**SVC, "replicas": 5}))
    assert (kind, action, fields["replicas"], fields["old_replicas"]) == \
        ("service", "updated", 5, 2)
    assert store_event(change("services", "web", None, SVC))[1] == "created"
    assert store_event(change("endpoints", "appnet/web.1", None, {"name": "web.1"})) is None


def test_task_state_changes_with_old_state_and_exit_code() -> None:
    kind, action, fields = store_event(change("tasks", "web.2@h2", None, TASK))
    assert (kind, action) == ("task", "running")
    assert fields == {"task": "web.2", "service": "web", "slot": 2, "node": "h2",
                      "state": "running", "old_state": None}
    failed = {**TASK, "state": "failed", "exit_code": 3, "ip": None}
    _, action, fields = store_event(change("tasks", "web.2@h2", TASK, failed))
    assert (action, fields["old_state"], fields["exit_code"]) == ("failed", "running", 3)
    _, action, fields = store_event(change("tasks", "web.2@h2", failed, None))
    assert (action, fields["state"], fields["old_state"]) == ("removed", None, "failed")
    # the same state, only its address: not a state change
    assert store_event(change("tasks", "web.2@h2", TASK, {**TASK, "ip": "10.10.0.9"})) is None


def test_store_values_of_the_wrong_shape_never_raise() -> None:
    h, _ = hub()
    odd = {"task": 5, "service": ["x"], "slot": "2", "node": None, "state": {"a": 1}}
    h.store_change(change("tasks", "web.2@h2", None, odd))
    h.store_change(change("networks", "n", None, {"vni": "x"}))
    h.store_change(EventsLost(3))
    docs = [e.doc for e in h.ring]
    assert docs[0]["task"] == "web.2" and docs[0]["node"] == "h2" and docs[0]["slot"] is None
    assert docs[-1]["type"] == "events" and docs[-1]["action"] == "lost"
    json.dumps(docs)


def test_a_key_event_names_the_key_by_its_id_never_the_key(tmp_path: Path) -> None:
    key = generate_key()
    agent = object.__new__(Agent)
    agent.keyring = Keyring(generate_key())
    agent.keyring_path = tmp_path / "keyring.json"
    agent.encrypted = None
    agent.events, _ = hub()
    agent._apply_key_op("install", key, "h1")
    agent._apply_key_op("list", "", "h1")
    [event] = list(agent.events.ring)
    assert event.doc["type"] == "key" and event.doc["action"] == "install"
    assert event.doc["key_id"] == key_id(parse_key(key)).hex() and event.doc["by"] == "h1"
    assert key not in json.dumps(event.doc)


async def test_the_op_streams_batches_and_reports_drops_while_publishing_never_waits() -> None:
    h, _ = hub(queue=4)
    frames: list[dict[str, Any]] = []
    gate = asyncio.Event()

    async def send(frame: dict[str, Any]) -> None:
        frames.append(frame)
        await gate.wait()  # a client that does not read

    op = asyncio.ensure_future(serve_events(h, {"filters": ["type=task"]}, send))
    await asyncio.sleep(0)
    assert len(h.subscribers) == 1
    h.publish("task", "a0", {})
    h.publish("member", "dead", {})  # filtered out
    for _ in range(3):
        await asyncio.sleep(0)
    assert [[e["action"] for e in f["events"]] for f in frames] == [["a0"]]
    for i in range(1, 11):  # the sender is stuck; publishing goes on, bounded
        h.publish("task", f"a{i}", {})
    assert len(h.subscribers[0].queue) == 4
    gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert frames[1]["dropped"] == 6  # told before the events that are left
    assert [e["action"] for e in frames[1]["events"]] == ["a7", "a8", "a9", "a10"]
    op.cancel()
    with pytest.raises(asyncio.CancelledError):
        await op
    assert h.subscribers == []  # a client that hangs up frees its place


async def test_the_op_replays_since_and_refuses_bad_arguments() -> None:
    h, clock = hub()
    h.publish("member", "join", {"name": "h1"})
    clock.now += 30
    frames: list[dict[str, Any]] = []

    async def send(frame: dict[str, Any]) -> None:
        frames.append(frame)

    op = asyncio.ensure_future(serve_events(h, {"since": 60}, send))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert [e["name"] for e in frames[0]["events"]] == ["h1"]
    op.cancel()
    with pytest.raises(asyncio.CancelledError):
        await op
    for args in ({"since": -1}, {"since": float("nan")}, {"since": True}, {"since": "10m"},
                 {"filters": ["type=nope"]}, {"filters": "type=member"},
                 {"filters": ["colour=red"]}, {"filters": ["x" * 500]}):
        with pytest.raises(OpError):
            await serve_events(h, args, send)
    assert h.subscribers == []
    h.subscribe({})
    h.subscribe({})
    with pytest.raises(OpError, match="too many") as e:
        await serve_events(h, {}, send)
    assert e.value.code == "busy"
