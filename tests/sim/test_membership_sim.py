"""Many membership cores on virtual time (meshnet.sim): crash, partition/heal, restart, leave,
determinism. No sleeps; every wait is a virtual-time deadline."""

from __future__ import annotations

from meshnet.membership import MembershipConfig, MemberState
from meshnet.membership.lifeguard import suspicion_bounds
from meshnet.sim import Simulator

A, S, D, L = MemberState.ALIVE, MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT


def cluster(n: int, cfg: MembershipConfig, seed: int = 7, **kw: float) -> Simulator:
    sim = Simulator(cfg, seed=seed, **kw)  # type: ignore[arg-type]
    for _ in range(n):
        sim.add_node()
    for i in range(1, n):
        sim.join(i, [int(sim.rng.random() * i)])  # join through any earlier member
        sim.run_for(0.05)
    # Members whose first gossip raced the cluster's own growth are caught up by push-pull
    # anti-entropy (one exchange per node every push_pull_scaled(n) s on average).
    timeout = 4 * cfg.push_pull_scaled(n)
    assert sim.run_until_true(sim.converged_alive, timeout=timeout), "cluster never converged"
    return sim


def test_100_nodes_one_crash_everyone_holds_it_dead_within_bound() -> None:
    cfg = MembershipConfig.lan()
    sim = cluster(100, cfg)
    sim.run_for(5.0)
    victim = 42
    t0 = sim.now
    sim.crash(victim)
    lo, _ = suspicion_bounds(cfg.suspicion_mult, cfg.suspicion_max_timeout_mult, 99, 1.0)
    lo *= cfg.probe_interval
    # First probe of the victim (~Exp(1 probe interval); 8 intervals is its 0.03% tail), the
    # probe itself, the confirmed suspicion, and dissemination (retransmit-limited gossip).
    bound = 8 * cfg.probe_interval + cfg.probe_interval + lo + 4.0
    ok = sim.run_until_true(lambda: sim.all_see(victim, (D,)), timeout=bound, check_every=0.1)
    assert ok, f"not everyone holds {victim} dead after {sim.now - t0:.1f}s (bound {bound:.1f}s)"
    # Nobody else was declared dead on the way.
    for node in sim.live():
        for m in node.core.members():
            assert m.state is A or m.name == sim.nodes[victim].name


def test_partition_then_heal_merges_back_to_one_alive_view() -> None:
    cfg = MembershipConfig.lan_fast()
    sim = cluster(40, cfg, seed=11)
    left_side, right_side = list(range(20)), list(range(20, 40))
    sim.partition([left_side, right_side])
    sim.run_for(15.0)
    # Each side holds (most of) the other dead.
    assert sim.state_seen(0, 30) in (S, D) and sim.state_seen(30, 0) in (S, D)
    assert sim.state_seen(0, 1) is A and sim.state_seen(30, 31) is A
    sim.heal()
    assert sim.run_until_true(sim.converged_alive, timeout=60.0), "partition never healed"
    incs = {n.core.incarnation for n in sim.nodes}
    assert max(incs) > 0  # nodes refuted their death by raising their incarnation


def test_restart_comes_back_alive_with_higher_incarnation() -> None:
    cfg = MembershipConfig.lan_fast()
    sim = cluster(30, cfg, seed=5)
    victim = 9
    sim.crash(victim)
    assert sim.run_until_true(lambda: sim.all_see(victim, (D,)), timeout=60.0, check_every=0.1)
    held = sim.nodes[0].core.member(sim.nodes[victim].name)
    assert held is not None
    sim.restart(victim, seeds=[3], incarnation=0)  # state lost: starts again at 0
    assert sim.run_until_true(sim.converged_alive, timeout=60.0)
    back = sim.nodes[0].core.member(sim.nodes[victim].name)
    assert back is not None and back.state is A and back.incarnation > held.incarnation
    assert sim.nodes[victim].core.incarnation == back.incarnation


def test_graceful_leave_is_left_everywhere_and_never_a_failure() -> None:
    cfg = MembershipConfig.lan_fast()
    sim = cluster(30, cfg, seed=3)
    sim.leave(4)
    assert sim.run_until_true(lambda: sim.all_see(4, (L,)), timeout=20.0, check_every=0.1)
    sim.crash(4)  # the process exits after leaving
    sim.run_for(10.0)
    assert sim.all_see(4, (L,))
    assert sum(n.core.stats["deaths_declared"] for n in sim.nodes) == 0
    # ... and it is reaped after reap_after.
    sim.run_for(cfg.reap_after + 2.0)
    assert sim.all_see(4, (None,))  # type: ignore[arg-type]


def _fingerprint(seed: int) -> tuple[object, ...]:
    cfg = MembershipConfig.lan_fast()
    sim = cluster(25, cfg, seed=seed, loss=0.02)
    sim.crash(7)
    sim.run_for(20.0)
    views = tuple(
        tuple((m.name, m.state, m.incarnation, round(m.state_changed_at, 9))
              for m in n.core.members())
        for n in sim.live()
    )
    stats = tuple(tuple(sorted(n.core.stats.items())) for n in sim.nodes)
    return views, stats, sim.total_bytes_sent(), sim.steps


def test_same_seed_same_run() -> None:
    a = _fingerprint(123)
    assert a == _fingerprint(123)
    assert a != _fingerprint(124)


def test_loss5_no_false_positives() -> None:
    cfg = MembershipConfig.lan()
    sim = cluster(60, cfg, seed=17)
    sim.loss = 0.05
    sim.run_for(200.0)
    assert sum(n.core.stats["deaths_declared"] for n in sim.nodes) == 0
    assert all(sim.all_see(i, (A, S)) for i in range(60))
    assert sim.total_bytes_sent() / 60 / sim.now < 21_000


def test_slow_nodes_are_suspected_refute_and_never_die() -> None:
    """Slow inboxes (1-2 probe timeouts late) plus 1% loss: the bench's slow10 in miniature.

    At this size the minimum suspicion is only ~3.6 s, so inboxes up to 3 probe timeouts late
    (the bench's upper end, measured at N=1000 by bench/membership.py) are left to the bench.
    """
    cfg = MembershipConfig.lan()
    sim = cluster(60, cfg, seed=19)
    sim.loss = 0.01
    slow = {3: 1.0, 8: 2.0, 13: 1.5, 21: 2.0}
    for i, f in slow.items():
        sim.set_slow(i, f * cfg.probe_timeout)
    sim.run_for(200.0)
    assert sum(n.core.stats["deaths_declared"] for n in sim.nodes) == 0
    assert sum(sim.nodes[i].core.stats["refuted_suspicions"] for i in slow) > 10
    assert all(sim.all_see(i, (A, S)) for i in range(60))
    assert sim.total_bytes_sent() / 60 / sim.now < 21_000
