"""An IPAM confirmation that a member does not answer (#14). Idle or slow streams could hold a
member's stream slots, and the claimant then took the silence for "no rival": two hosts could
give out one address. Before the fix (seen failing on 3ac6cc7) `_confirm` returned no rivals
after two failed requests to a member that was still alive.

Now a silent member is asked again until it answers (its rivals count) or membership drops it;
past the deadline the allocation fails with one clear line, never with consent assumed. The
claimant's confirmation runs against a fake transport: only the network is faked."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import pytest

from meshnet.agent import sandboxes as sb
from meshnet.agent.control import OpError
from meshnet.membership import Member
from meshnet.membership.types import MemberState, NodeMeta
from meshnet.state import Entry, Hlc
from meshnet.state.codec import encode_delta
from meshnet.state.store import Store

PEER = Member("b", ("10.9.0.2", 7946), MemberState.ALIVE, 1, NodeMeta("b", ("10.9.0.2", 7946)),
              0.0)


def claim(ip: str, writer: str, ms: int) -> Entry:
    from meshnet import wire
    value = {"name": f"t-{writer}", "network": "n", "ip": ip, "mac": "02:42:0a:09:00:05",
             "node": writer, "service": None, "slot": None, "pending": True}
    return Entry("endpoints", f"n/t-{writer}@{writer}", wire.pack(value), Hlc(ms, 0), writer)


class Transport:
    """Fails the first FAILURES requests (as a member whose slots are held, or that is too
    slow); then answers with RIVALS."""

    def __init__(self, failures: int, rivals: list[Entry]) -> None:
        self.failures = failures
        self.rivals = rivals
        self.calls = 0

    async def request(self, addr: Any, service: int, body: bytes) -> bytes:
        self.calls += 1
        if self.calls <= self.failures:
            raise TimeoutError("no answer")
        import msgpack
        return bytes(msgpack.packb([encode_delta(e) for e in self.rivals]))


def claimant(transport: Transport, members: list[list[Member]]) -> Any:
    """Just what _confirm touches; MEMBERS[0] is what membership lists (a test may empty it)."""
    ns = SimpleNamespace(
        gossip=transport, peers=lambda: members[0], store=Store("a"),
        state=SimpleNamespace(changed=lambda: None),
        counters={"confirm_retries": 0, "confirm_member_gone": 0, "confirm_unreachable": 0})
    ns._take_competitors = lambda raw: sb.Sandboxes._take_competitors(ns, raw)  # type: ignore[arg-type]
    return ns


def confirm(fake_self: Any, mine: Entry) -> list[Entry]:
    return list(asyncio.run(sb.Sandboxes._confirm(fake_self, mine)))


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    # The same rules on a shorter clock (retries every 10-50 ms, 1 s deadline).
    monkeypatch.setattr(sb, "CONFIRM_RETRY_S", 0.01, raising=False)
    monkeypatch.setattr(sb, "CONFIRM_RETRY_MAX_S", 0.05, raising=False)
    monkeypatch.setattr(sb, "CONFIRM_DEADLINE_S", 1.0, raising=False)


def test_a_rival_held_by_a_slow_member_is_seen() -> None:
    """The member fails 5 times (more than the 2 tries that used to end in "no rival"), then
    answers with an older claim on the same address: the claimant must see it and lose."""
    mine = claim("10.9.0.5", "a", 2_000)
    rival = claim("10.9.0.5", "b", 1_000)
    t = Transport(failures=5, rivals=[rival])
    rivals = confirm(claimant(t, [[PEER]]), mine)
    assert [e.key for e in rivals] == [rival.key]
    assert sb.beaten_by(mine, rivals) is not None


def test_a_member_that_never_answers_fails_the_allocation() -> None:
    """Silence from a member still listed is never consent: OpError, counted."""
    t = Transport(failures=10**9, rivals=[])
    fake_self = claimant(t, [[PEER]])
    start = time.monotonic()
    with pytest.raises(OpError, match="could not confirm address"):
        confirm(fake_self, claim("10.9.0.5", "a", 2_000))
    assert time.monotonic() - start >= 1.0
    assert fake_self.counters["confirm_unreachable"] == 1
    assert t.calls > 2


def test_a_member_declared_dead_stops_being_asked() -> None:
    """Membership drops the silent member: its claims lose their owner with it, so the
    confirmation goes on without it (counted), well before the deadline."""
    members = [[PEER]]
    t = Transport(failures=10**9, rivals=[])
    fake_self = claimant(t, members)

    async def run() -> list[Entry]:
        async def drop_later() -> None:
            await asyncio.sleep(0.2)
            members[0] = []
        dropper = asyncio.ensure_future(drop_later())
        out = await sb.Sandboxes._confirm(fake_self, claim("10.9.0.5", "a", 2_000))
        await dropper
        return out

    start = time.monotonic()
    assert asyncio.run(run()) == []
    assert time.monotonic() - start < 0.9
    assert fake_self.counters["confirm_member_gone"] == 1
    assert fake_self.counters["confirm_unreachable"] == 0


def test_a_rival_the_store_refuses_does_not_count() -> None:
    """A forged older claim that fails the schema (found by fuzzing: it used to beat ours every
    round until "could not settle"): merged nowhere, so no rival."""
    from dataclasses import replace

    from meshnet.state.store import StoreConfig
    from meshnet.state.validate import check_value
    mine = claim("10.9.0.5", "a", 2_000)
    forged = claim("10.9.0.5", "b", 1_000)
    from meshnet import wire
    bad = dict(wire.unpack(forged.value, max_bytes=4096, exc=ValueError), mac="zz")  # type: ignore[arg-type]
    forged = replace(forged, value=wire.pack(bad))
    fake_self = claimant(Transport(failures=0, rivals=[forged]), [[PEER]])
    fake_self.store = Store("a", StoreConfig(validator=check_value))
    assert confirm(fake_self, mine) == []
    assert fake_self.store.entry(forged.table, forged.key) is None
