"""The agent's event hub behind `meshctl events`: what changed, as this agent learned it.

The shell translates what the cores already report (membership events, the store's change
events, key operations applied here) into event documents (meshnet/events.py) and publishes them
here. Publishing never waits and never grows memory:

- the ring keeps the last RING_EVENTS events, so `--since 10m` can replay what happened before
  the subscriber came;
- each subscriber has a queue of at most QUEUE_EVENTS; one that reads too slowly loses its
  oldest events and is told how many in its next frame (`dropped`), it never holds up the
  agent or the other subscribers;
- at most MAX_SUBSCRIBERS at once; one more is refused with a reason.

Event documents are made once and shared by the ring and every queue.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from meshnet.agent.control import OpError, SendEvent
from meshnet.events import MAX_SINCE_S, Filters, iso_ms, matches, parse_filters
from meshnet.membership import (
    MemberAlive,
    MemberDead,
    MemberEvent,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MemberSuspect,
    MemberUpdated,
)
from meshnet.state.tables import NETWORKS, SERVICES
from meshnet.state.types import ChangeEvent, EventsLost
from meshnet.state.validate import TASKS

# ~10 minutes of a busy 100-node cluster's changes (a crash is ~1 member event per host and a
# few task events), at ~0.5 KB each ~2 MB: enough for `--since 10m` where it matters, bounded
# where it would not be (a 1,000-node join brings 1,000 member events at once).
RING_EVENTS = 4096
# As long as the ring, so a `--since` replay of the whole ring fits a queue; a queue holds
# references to the shared events (8 bytes each), so 64 full queues cost ~2 MB of pointers.
QUEUE_EVENTS = RING_EVENTS
# Each subscriber is a control connection (MAX_CONNECTIONS 256) that holds a queue; watchers
# are a few per host, so 64 is far above use and keeps the queues' worst case bounded.
MAX_SUBSCRIBERS = 64
# Events per frame: a catching-up subscriber gets a few frames of ~100 KB, not one huge one.
BATCH_EVENTS = 256

MEMBER_ACTIONS: dict[type[MemberEvent], str] = {
    MemberJoined: "join", MemberAlive: "alive", MemberSuspect: "suspect",
    MemberDead: "dead", MemberLeft: "left", MemberUpdated: "update", MemberReaped: "reap",
}


@dataclass(frozen=True, slots=True)
class Event:
    at: float  # Unix time, for --since
    doc: Mapping[str, Any]  # the JSON object subscribers get


class HubFull(Exception):
    pass


class Subscription:
    """One subscriber's filters and bounded queue; the sender waits on ``wake``."""

    __slots__ = ("dropped", "filters", "limit", "queue", "wake")

    def __init__(self, filters: Filters, limit: int) -> None:
        self.filters = filters
        self.limit = limit
        self.queue: deque[Event] = deque()
        self.dropped = 0  # events lost since the last take
        self.wake = asyncio.Event()

    def offer(self, event: Event) -> bool:
        """Queue EVENT if it passes the filters; True if that pushed the oldest one out."""
        if not matches(event.doc, self.filters):
            return False
        lost = len(self.queue) >= self.limit
        if lost:
            self.queue.popleft()
            self.dropped += 1
        self.queue.append(event)
        self.wake.set()
        return lost

    def take(self, most: int = BATCH_EVENTS) -> tuple[int, list[Event]]:
        """(events dropped since the last take, up to MOST queued events, oldest first)."""
        dropped, self.dropped = self.dropped, 0
        out = [self.queue.popleft() for _ in range(min(most, len(self.queue)))]
        if not self.queue:
            self.wake.clear()
        return dropped, out


class EventHub:
    def __init__(self, clock: Callable[[], float], ring: int = RING_EVENTS,
                 queue: int = QUEUE_EVENTS, max_subscribers: int = MAX_SUBSCRIBERS) -> None:
        self.clock = clock  # wall time: events carry it, and --since is measured in it
        self.ring: deque[Event] = deque(maxlen=ring)
        self.queue_limit = queue
        self.max_subscribers = max_subscribers
        self.subscribers: list[Subscription] = []
        self.counters = {"published": 0, "dropped": 0, "subscribers_refused": 0,
                         "translate_errors": 0}

    def publish(self, kind: str, action: str, fields: Mapping[str, Any]) -> Event:
        now = self.clock()
        event = Event(now, {"time": iso_ms(now), "type": kind, "action": action, **fields})
        self.ring.append(event)
        self.counters["published"] += 1
        for sub in self.subscribers:
            if sub.offer(event):
                self.counters["dropped"] += 1
        return event

    def subscribe(self, filters: Filters, since: float | None = None) -> Subscription:
        """A new subscriber, first given the ring's events of the last SINCE seconds."""
        if len(self.subscribers) >= self.max_subscribers:
            self.counters["subscribers_refused"] += 1
            raise HubFull(f"too many event subscribers ({self.max_subscribers}) on this agent")
        sub = Subscription(filters, self.queue_limit)
        if since is not None:
            cutoff = self.clock() - since
            for event in self.ring:
                if event.at >= cutoff:
                    sub.offer(event)
        self.subscribers.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)

    def status(self) -> dict[str, int]:
        return {**self.counters, "subscribers": len(self.subscribers),
                "buffered": len(self.ring)}

    # --- what the shell publishes ---------------------------------------------------------

    def member(self, event: MemberEvent) -> None:
        action = MEMBER_ACTIONS.get(type(event))
        if action is None:
            return
        m = event.member
        self.publish("member", action, {
            "name": m.name, "addr": f"{m.addr[0]}:{m.addr[1]}", "state": str(m.state.value),
            "incarnation": m.incarnation})

    def store_change(self, change: ChangeEvent | EventsLost) -> None:
        """A visible change of the replicated store: networks, services and task states.
        Values came from any member (checked by the schema): read them defensively."""
        try:
            translated = store_event(change)
        except Exception:  # a value the schema let through that we read wrong: count, go on
            self.counters["translate_errors"] += 1
            return
        if translated is not None:
            self.publish(*translated)

    def key(self, op: str, key_id: str, by: str | None) -> None:
        """A key operation applied to this agent's keyring (ours or an admin's on another
        member); the key itself is secret, its 4-byte id is not."""
        self.publish("key", op, {"key_id": key_id, **({"by": by} if by else {})})


def store_event(change: ChangeEvent | EventsLost) -> tuple[str, str, dict[str, Any]] | None:
    """(type, action, fields) for a store change worth an event, else None."""
    if isinstance(change, EventsLost):
        return "events", "lost", {"source": "store"}
    old, new = change.old, change.new
    action = "created" if old is None else "removed" if new is None else "updated"
    cur = new if new is not None else old
    assert cur is not None  # the store reports no change from nothing to nothing
    if change.table == NETWORKS:
        return "network", action, {"name": change.key, "subnet": _s(cur.get("subnet")),
                                   "vni": _i(cur.get("vni")),
                                   "encrypted": cur.get("encrypted") is True}
    if change.table == SERVICES:
        fields: dict[str, Any] = {"name": change.key, "mode": _s(cur.get("mode")),
                                  "replicas": _i(cur.get("replicas"))}
        if old is not None and new is not None and old.get("replicas") != new.get("replicas"):
            fields["old_replicas"] = _i(old.get("replicas"))
        return "service", action, fields
    if change.table == TASKS:
        state = _s(new.get("state")) if new is not None else None
        old_state = _s(old.get("state")) if old is not None else None
        same_state = old is not None and new is not None and all(
            old.get(k) == new.get(k) for k in ("state", "exit_code", "restarts"))
        health = _s(new.get("health")) if new is not None else None
        old_health = _s(old.get("health")) if old is not None else None
        if same_state and health == old_health:
            return None  # its address or containment summary changed, not its state
        fields = {"task": _s(cur.get("task")) or change.key.rpartition("@")[0],
                  "service": _s(cur.get("service")), "slot": _i(cur.get("slot")),
                  "node": _s(cur.get("node")) or change.key.rpartition("@")[2],
                  "state": state, "old_state": old_state}
        exit_code = _i(new.get("exit_code")) if new is not None else None
        if exit_code is not None:
            fields["exit_code"] = exit_code
        if health is not None:
            fields["health"] = health
        if same_state:  # Docker's `health_status` event: only the check's verdict changed
            return "task", "health_status", {**fields, "old_health": old_health}
        return "task", state or "removed", fields
    return None


def _s(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _i(value: object) -> int | None:
    return value if type(value) is int else None


def _since(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or not 0 <= value <= MAX_SINCE_S:
        raise OpError(f"since must be 0..{MAX_SINCE_S:.0f} seconds")
    return float(value)


async def serve_events(hub: EventHub, args: dict[str, Any], send: SendEvent) -> Any:
    """The `events` control op: stream matching events until the client hangs up (the
    control server cancels us then; long-running op)."""
    try:
        filters = parse_filters(args.get("filters"))
    except ValueError as e:
        raise OpError(str(e)) from None
    since = _since(args.get("since"))
    try:
        sub = hub.subscribe(filters, since)
    except HubFull as e:
        raise OpError(str(e), "busy") from None
    try:
        while True:
            await sub.wake.wait()
            dropped, batch = sub.take()
            frame: dict[str, Any] = {}
            if dropped:
                frame["dropped"] = dropped
            if batch:
                frame["events"] = [dict(e.doc) for e in batch]
            if frame:
                await send(frame)
    finally:
        hub.unsubscribe(sub)
