"""A member cut off from the cluster syncs its whole state with the first member that answers
it again (#15, found by the chaos runs: after a 37 s partition h1 still held a restarted h3 as
suspect 17 s later, until a periodic push-pull came round). On the default LAN profile, in
the simulated network of test_membership_reconnect (deterministic: seeded, virtual time)."""

from __future__ import annotations

import pytest
from test_membership_reconnect import Net

from meshnet.membership import MembershipConfig, MemberState
from meshnet.membership import core as core_mod

LAN = MembershipConfig()


def heal_time(offset: float, cut: set[str], seconds: float) -> tuple[float, int]:
    """Partition CUT from the rest for SECONDS (long enough to be declared dead, shorter
    than reap_after), heal, and return how long until every member sees every member alive,
    and how many resyncs ran."""
    net = Net(None, 7, LAN)
    net.run(offset)
    assert net.all_alive()
    net.groups = [cut, {m.name for m in net.nodes} - cut]
    net.run(seconds)
    assert net.view(net.nodes[6])["n1"] is MemberState.DEAD
    net.groups = None
    took = net.run(60.0, until=net.all_alive)
    assert net.all_alive(), {m.name: net.view(m) for m in net.nodes}
    return took, sum(m.stats["resyncs"] for m in net.nodes)


def test_a_healed_partition_merges_within_seconds() -> None:
    took, resyncs = heal_time(0.0, {"n1", "n2"}, 35.0)
    assert resyncs >= 1
    # the first probe after the heal reaches a member; the rest is one push-pull and the
    # refutations' gossip
    assert took <= 4.0


CASES = [(k * 0.173, {"n1", "n2"} if k % 2 else {"n1"}, s)
         for k in range(4) for s in (15.0, 25.0, 40.0)]


def test_the_resync_beats_waiting_for_a_periodic_exchange(
        monkeypatch: pytest.MonkeyPatch) -> None:
    with_resync = [heal_time(*c)[0] for c in CASES]
    monkeypatch.setattr(core_mod, "RESYNC_AWARENESS", 10**6)
    without = [heal_time(*c) for c in CASES]
    assert all(r == 0 for _, r in without)
    # the same partitions, the same seeds: only the resync differs
    assert sum(with_resync) < 0.7 * sum(t for t, _ in without)


HEALS = [(k * 0.173, {"n1", "n2", "n3"} if k % 2 else {"n1", "n2"}, s)
         for k in range(4) for s in (20.0, 40.0)]


def test_fresh_deaths_are_reconnected_to_sooner(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a member died less than reap_after ago (a partition that may heal any moment),
    the serf reconnect runs RECENT_DEAD_SPEEDUP times as often. Without the resync, so the
    reconnect alone has to merge the sides."""
    monkeypatch.setattr(core_mod, "RESYNC_AWARENESS", 10**6)
    fast = [heal_time(*c)[0] for c in HEALS]
    monkeypatch.setattr(core_mod, "RECENT_DEAD_SPEEDUP", 1)
    slow = [heal_time(*c)[0] for c in HEALS]
    # measured: 12.7 s against 27.0 s in all, max 3.4 s against 6.3 s
    assert sum(fast) < 0.7 * sum(slow)
