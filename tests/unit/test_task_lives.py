"""Task records carry the life (start incarnation) of the agent that wrote them, and placement's
`current` counts a record only if its node still announces that life. A restarted node's tasks
died with it, but its old records stay in everyone's store until its deletes arrive, which is
after its alive: they must never make a peer stop a running task of the same slot (the netns
test_failover_and_return saw a ghost `backend.2@h2` win the tie-break over h3's running task)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from meshnet.agent.services import LIFE_META_KEY, Services, current_life
from meshnet.placement import NodeInfo
from meshnet.placement.hrw import seed64
from meshnet.state import Store, StoreConfig
from meshnet.state.validate import check_value

T0 = 1_700_000_000.0
OLD_LIFE, NEW_LIFE = 1_700_000_000_000, 1_700_000_009_000


def member(name: str, life: int | None) -> SimpleNamespace:
    extra = {} if life is None else {LIFE_META_KEY: life}
    return SimpleNamespace(name=name, meta=SimpleNamespace(extra=extra))


def services_for(store: Store, tmp_path: Path, peers: list[SimpleNamespace]) -> Services:
    state = SimpleNamespace(store=store)
    gossip = SimpleNamespace(stream_handlers={})
    nodes = [NodeInfo("h1"), NodeInfo("h2"), NodeInfo("h3")]
    return Services(state, None, gossip, "h1", lambda: nodes,  # type: ignore[arg-type]
                    lambda: peers, tmp_path, life=5)


def record(slot: int, node: str, life: int | None) -> dict[str, Any]:
    rec: dict[str, Any] = {"task": f"web.{slot}", "service": "web", "slot": slot, "node": node,
                           "state": "running"}
    if life is not None:
        rec[LIFE_META_KEY] = life
    return rec


def store_with(*records: dict[str, Any]) -> Store:
    s = Store("h1", StoreConfig(owned_tables={"tasks": "node"}))
    for n in ("h2", "h3"):
        s.set_node_live(n, True)
    for rec in records:
        s.put("tasks", f"{rec['task']}@{rec['node']}", rec, T0)
    return s


def test_a_previous_lifes_record_never_counts(tmp_path: Path) -> None:
    # the ghost: whichever of h2/h3 wins slot 2's tie-break (the smaller hash), so without
    # lives its old record would be kept and the other's running task stopped
    ghost, holder = sorted(("h2", "h3"), key=lambda n: seed64("holder", "web", 2, n))
    s = store_with(record(2, holder, 7), record(2, ghost, OLD_LIFE))
    back = services_for(s, tmp_path, [member(ghost, NEW_LIFE), member(holder, 7)])
    assert back.running_now(back.lives()) == {"web": {2: holder}}
    # the same records while the ghost's node still announces its old life: its task counts
    before = services_for(s, tmp_path, [member(ghost, OLD_LIFE), member(holder, 7)])
    assert before.running_now(before.lives()) == {"web": {2: ghost}}


def test_lives_come_from_metadata_and_our_own(tmp_path: Path) -> None:
    peers = [member("h2", NEW_LIFE), member("h3", None), member("gone", 3)]
    peers.append(SimpleNamespace(name="h4", meta=SimpleNamespace(extra={LIFE_META_KEY: "x"})))
    services = services_for(store_with(), tmp_path, peers)
    # placement members only; a life that is not an int is no life
    assert services.lives() == {"h1": 5, "h2": NEW_LIFE, "h3": None}


def test_records_and_members_without_lives_count() -> None:
    assert current_life(record(1, "h2", None), NEW_LIFE)  # an older agent's record
    assert current_life(record(1, "h2", OLD_LIFE), None)  # an older agent's metadata
    assert current_life(record(1, "h2", NEW_LIFE), NEW_LIFE)
    assert not current_life(record(1, "h2", OLD_LIFE), NEW_LIFE)
    assert current_life({**record(1, "h2", None), LIFE_META_KEY: True}, NEW_LIFE)  # no int


def test_the_life_field_is_validated() -> None:
    good = record(1, "h2", NEW_LIFE)
    assert check_value("tasks", "web.1@h2", good) is None
    for bad in ("1", -1, 1 << 63, 1.5, None):
        assert check_value("tasks", "web.1@h2", {**good, LIFE_META_KEY: bad}) is not None, bad
