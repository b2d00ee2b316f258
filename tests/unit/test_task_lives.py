"""Owned records carry the life (start incarnation) of the agent that wrote them, and the store
shows a node's records only while it announces that life. A restarted node's tasks and sandboxes
died with it, but its records of them stay in everyone's store until its deletes arrive, which is
after its alive: they must never show as running for a moment (the netns
test_failover_and_return saw a ghost `backend.2@h2` win the tie-break over h3's running task,
and h3 stopped it)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from meshnet.agent.services import Services
from meshnet.placement import NodeInfo
from meshnet.placement.hrw import seed64
from meshnet.state import Store, StoreConfig
from meshnet.state.store import LIFE_FIELD
from meshnet.state.validate import check_value

T0 = 1_700_000_000.0
OLD, NEW = 1_700_000_000_000, 1_700_000_009_000


def record(slot: int, node: str, life: int | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"task": f"web.{slot}", "service": "web", "slot": slot, "node": node,
                           "state": "running"}
    if life is not None:
        rec[LIFE_FIELD] = life
    return rec


def store_with(*records: dict[str, Any]) -> Store:
    s = Store("h1", StoreConfig(owned_tables={"tasks": "node", "endpoints": "node"}))
    for rec in records:
        s.put("tasks", f"{rec['task']}@{rec['node']}", rec, T0)
    return s


def services_for(store: Store, tmp_path: Path) -> Services:
    state = SimpleNamespace(store=store)
    gossip = SimpleNamespace(stream_handlers={})
    nodes = [NodeInfo("h1"), NodeInfo("h2"), NodeInfo("h3")]
    return Services(state, None, gossip, "h1", lambda: nodes, lambda: [],  # type: ignore[arg-type]
                    tmp_path, life=5)


def test_a_previous_lifes_task_never_counts_as_running(tmp_path: Path) -> None:
    # the ghost: whichever of h2/h3 wins slot 2's tie-break (the smaller hash), so if its old
    # record showed, placement would keep it and the other's running task would stop
    ghost, holder = sorted(("h2", "h3"), key=lambda n: seed64("holder", "web", 2, n))
    s = store_with(record(2, holder, 7), record(2, ghost, OLD))
    services = services_for(s, tmp_path)
    s.set_node_live(holder, True, 7)
    s.set_node_live(ghost, True, OLD)  # before its restart: its task runs, and wins
    assert services.running_now({"h1", "h2", "h3"}) == {"web": {2: ghost}}
    s.set_node_live(ghost, False)  # dead: its records hide
    assert services.running_now({"h1", "h2", "h3"}) == {"web": {2: holder}}
    s.set_node_live(ghost, True, NEW)  # back, a new life: its old record stays hidden
    assert services.running_now({"h1", "h2", "h3"}) == {"web": {2: holder}}
    assert s.view("tasks") == {f"web.2@{holder}": record(2, holder, 7)}


def test_a_new_life_hides_at_once_without_a_death(tmp_path: Path) -> None:
    """A restart faster than failure detection: the alive of the new life is the first news."""
    s = store_with(record(1, "h2", OLD))
    s.set_node_live("h2", True, OLD)
    while s.next_event() is not None:
        pass
    s.set_node_live("h2", True, NEW)
    assert s.view("tasks") == {}
    event = s.next_event()
    assert event is not None and event.key == "web.1@h2"  # consumers (DNS, FDB) hear of it
    # the node's own write in the new life shows
    s.put("tasks", "web.1@h2", record(1, "h2", NEW), T0 + 1)
    assert list(s.view("tasks")) == ["web.1@h2"]


def test_values_and_members_without_lives_show() -> None:
    s = store_with(record(1, "h2", None), record(2, "h3", OLD))
    s.set_node_live("h2", True, NEW)  # an older agent's record: no life in it
    s.set_node_live("h3", True, None)  # an older agent's metadata: no life announced
    assert sorted(s.view("tasks")) == ["web.1@h2", "web.2@h3"]
    s.set_node_live("h3", True, "1")  # type: ignore[arg-type]  # not an int: no life
    assert sorted(s.view("tasks")) == ["web.1@h2", "web.2@h3"]


def test_sandbox_endpoints_hide_the_same_way() -> None:
    s = store_with()
    ep = {"name": "web.1", "network": "n1", "ip": "10.10.0.5", "mac": "02:42:0a:0a:00:05",
          "node": "h2", "sandbox": "x", LIFE_FIELD: OLD}
    host = {"name": "host-h2", "network": "n1", "ip": "10.10.0.6", "mac": "02:42:0a:0a:00:06",
            "node": "h2"}  # a host endpoint carries no life: a restarted agent keeps it
    s.put("endpoints", "n1/web.1@h2", ep, T0)
    s.put("endpoints", "n1/host-h2@h2", host, T0)
    s.set_node_live("h2", True, NEW)
    assert list(s.view("endpoints")) == ["n1/host-h2@h2"]


def test_the_life_field_is_validated() -> None:
    good = record(1, "h2", NEW)
    assert check_value("tasks", "web.1@h2", good) is None
    for bad in ("1", -1, 1 << 63, 1.5, None, True):
        assert check_value("tasks", "web.1@h2", {**good, LIFE_FIELD: bad}) is not None, bad
