"""The simulator with identity (#13): its cores run the verification code that ships, share one
VerifyCache keyed by the signed bytes (each distinct signature checked once, for real), and each
node is charged VERIFY_COST_S of virtual time per verification it asks for."""

from __future__ import annotations

import pytest

import meshnet.sim
from meshnet.crypto.trust import ALIVE_DOMAIN
from meshnet.membership import MAX_CLAIM_INCARNATION, MembershipConfig, MemberState, NodeMeta
from meshnet.membership.messages import Alive, alive_payload
from meshnet.sim import Simulator

A = MemberState.ALIVE


def test_one_shared_cache_real_checks_and_forgeries_refused() -> None:
    sim = Simulator(MembershipConfig.lan(), seed=3)
    for _ in range(20):
        sim.add_node()
    sim.bootstrap()
    sim.run_for(30.0)
    assert sim.converged_alive()
    trusts = [n.trust for n in sim.nodes]
    assert all(t is not None and t.cache is sim.verify_cache and t.cert_memo is sim.cert_memo
               for t in trusts)
    asked = sum(t.stats.verifications for t in trusts if t is not None)
    cache = sim.verify_cache
    # every verification went through the one cache; most were answered by another node's
    # real check of the same signed bytes
    assert cache.misses > 0 and cache.hits > 0 and cache.misses < asked / 2
    assert all(n.verifications == n.trust.stats.verifications for n in sim.nodes  # all charged
               if n.trust is not None)
    # the shipped checks run: n1's alive at the top incarnation, signed by n2, counts nowhere
    victim, forger = sim.nodes[1], sim.nodes[2]
    assert forger.trust is not None
    meta = NodeMeta(victim.name, ("10.66.0.1", 7946))
    raw = meta.encode()
    top = MAX_CLAIM_INCARNATION
    forged = Alive(top, meta, raw, forger.trust.sign(ALIVE_DOMAIN, alive_payload(top, raw)))
    for n in sim.nodes[3:]:
        n.core.receive_datagram(forged.encode(), forger.addr, sim.now)
    sim.run_for(5.0)
    for n in sim.nodes[3:]:
        m = n.core.member(victim.name)
        assert m is not None and m.addr == victim.addr and m.state is A
        assert m.incarnation < 100 and n.core.stats["claims_unsigned"] >= 1


def _join_time(cost: float, monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(meshnet.sim, "VERIFY_COST_S", cost)
    sim = Simulator(MembershipConfig.lan(), seed=5, latency=(0.001, 0.001))
    sim.add_node()
    sim.add_node()
    sim.join(1, [0])
    assert sim.run_until_true(sim.converged_alive, timeout=10.0, check_every=0.001)
    return sim.now


def test_verification_costs_virtual_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A join is a push-pull: the seed checks the joiner's signed alive before its reply
    leaves, so the joiner hears the seed at least one verification's cost later."""
    free = _join_time(0.0, monkeypatch)
    charged = _join_time(0.5, monkeypatch)
    assert free < 0.1 and charged >= free + 0.5, (free, charged)
