"""The replicated store through five real agents: propagation, ownership, restarts."""

from __future__ import annotations

import json

from conftest import AgentProc, wait_for
from test_membership import all_see, cluster


def lookup(a: AgentProc, name: str, network: str | None = None) -> list[str]:
    args = ["--json", "dns", "lookup", name] + (["--network", network] if network else [])
    r = a.ctl(*args)
    return sorted(json.loads(r.stdout)["answers"]) if r.returncode == 0 else []


def test_writes_resolve_everywhere_and_follow_their_owner(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    nodes: list[AgentProc] = cluster(agents, key_file, 5)
    owner, others = nodes[3], [a for a in nodes if a is not nodes[3]]
    r = nodes[0].ctl("network", "create", "appnet", "--subnet", "10.20.0.0/24")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: all(a.ctl("network", "inspect", "appnet").returncode == 0 for a in nodes),
             10, "network everywhere")
    for i in (5, 6):
        r = owner.ctl("endpoint", "add", f"web{i}", f"10.20.0.{i}", "--network", "appnet",
                      "--service", "web")
        assert r.returncode == 0, r.stderr
    want = ["10.20.0.5", "10.20.0.6"]
    wait_for(lambda: all(lookup(a, "web") == want for a in nodes), 10, "web everywhere")
    assert lookup(nodes[1], "web6.appnet") == ["10.20.0.6"]
    assert lookup(nodes[1], "web", network="other") == []

    owner.kill9()
    wait_for(lambda: all_see(others, {owner.name: "dead"}), 30, "owner dead everywhere")
    # withdrawn from every answer as soon as the owner is dead, with no write
    for a in others:
        assert lookup(a, "web") == []
        assert a.ctl_json("network", "inspect", "appnet")["endpoints"] == []

    owner.start()
    wait_for(lambda: all(lookup(a, "web") == want for a in nodes), 30, "web back after restart")


def test_store_survives_rolling_restarts_and_all_but_one_dying(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    nodes: list[AgentProc] = cluster(agents, key_file, 5)
    for i, a in enumerate(nodes):
        assert a.ctl("network", "create", f"net{i}").returncode == 0
    names = {f"net{i}" for i in range(5)}

    def nets(a: AgentProc) -> set[str]:
        r = a.ctl("--json", "network", "ls")
        return {n["name"] for n in json.loads(r.stdout)} if r.returncode == 0 else set()

    wait_for(lambda: all(nets(a) == names for a in nodes), 15, "all networks everywhere")
    for a in nodes:  # rolling restart, one at a time
        a.kill9()
        a.start()
        assert nets(a) == names  # served from disk at once
    wait_for(lambda: all_see(nodes, {a.name: "alive" for a in nodes}), 30, "cluster re-formed")
    # all but one die; the survivor still has everything, and a new node learns it all from it
    for a in nodes[1:]:
        a.kill9()
    assert nets(nodes[0]) == names
    newcomer = agents(key=key_file).start(join=[nodes[0].addr])
    wait_for(lambda: nets(newcomer) == names, 15, "newcomer to learn the store")


def test_network_rules(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    a: AgentProc = agents(key=key_file).start()
    assert a.ctl("network", "create", "n1", "--subnet", "10.30.0.0/16").returncode == 0
    r = a.ctl("network", "create", "n2", "--subnet", "10.30.5.0/24")
    assert r.returncode == 1 and "overlaps" in r.stderr
    r = a.ctl("network", "create", "com")
    assert r.returncode == 1 and "reserved" in r.stderr
    first = a.ctl_json("network", "create", "auto1")
    second = a.ctl_json("network", "create", "auto2")
    assert first["subnet"] == "10.10.0.0/24" and second["subnet"] == "10.10.1.0/24"
    assert 4096 <= first["vni"] < 1 << 24 and first["vni"] != second["vni"]
    assert a.ctl("endpoint", "add", "x", "10.10.0.9", "--network", "auto1").returncode == 0
    r = a.ctl("network", "rm", "auto1")
    assert r.returncode == 1 and "endpoint x" in r.stderr
    assert a.ctl("endpoint", "rm", "x", "--network", "auto1").returncode == 0
    assert a.ctl("network", "rm", "auto1").returncode == 0


