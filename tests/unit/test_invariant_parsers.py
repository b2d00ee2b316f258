"""The pure parts of the chaos run's invariants (meshnet/lab/invariants.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from meshnet.lab import invariants as inv
from meshnet.lab.lab import Lab
from meshnet.platform.sandbox import sandbox_ns_name

# `bridge -j fdb show dev mnvx-b150eb` on a lab host (iproute2 6.1): two remote endpoints.
FDB = json.dumps([
    {"mac": "02:42:0a:0a:00:bd", "flags": [], "master": "mnbr-b150eb", "state": "static"},
    {"mac": "02:42:0a:0a:00:dc", "flags": [], "master": "mnbr-b150eb", "state": "static"},
    {"mac": "06:c6:03:57:18:3a", "flags": [], "master": "mnbr-b150eb", "state": "permanent"},
    {"mac": "02:42:0a:0a:00:bd", "dst": "10.99.0.3", "flags": ["self"], "state": "permanent"},
    {"mac": "02:42:0a:0a:00:dc", "dst": "10.99.0.2", "flags": ["self"], "state": "permanent"},
])
NEIGH = json.dumps([
    {"dst": "10.10.0.189", "lladdr": "02:42:0a:0a:00:bd", "state": ["PERMANENT"]},
    {"dst": "10.10.0.220", "lladdr": "02:42:0a:0a:00:dc", "state": ["PERMANENT"]},
    {"dst": "10.10.0.9", "lladdr": "02:42:0a:0a:00:09", "state": ["REACHABLE"]},
])
WANT_FDB = {"02:42:0a:0a:00:bd": "10.99.0.3", "02:42:0a:0a:00:dc": "10.99.0.2"}
WANT_NEIGH = {"10.10.0.189": "02:42:0a:0a:00:bd", "10.10.0.220": "02:42:0a:0a:00:dc"}


def test_parse_fdb_keeps_self_entries_and_static_master_entries() -> None:
    selfs, masters = inv.parse_fdb_json(FDB)
    assert selfs == {m: [d] for m, d in WANT_FDB.items()}
    assert masters == set(WANT_FDB)  # not the bridge's own (permanent) address
    assert inv.parse_fdb_json("") == ({}, set())
    assert inv.parse_fdb_json("{}") == ({}, set())


def test_parse_neigh_keeps_permanent_entries() -> None:
    assert inv.parse_neigh_json(NEIGH) == WANT_NEIGH
    assert inv.parse_neigh_json("  ") == {}


def test_parse_links() -> None:
    text = json.dumps([{"ifindex": 1, "ifname": "lo"}, {"ifindex": 5, "ifname": "mnvx-b150eb"},
                       {"ifindex": 6}])
    assert inv.parse_links_json(text) == ["lo", "mnvx-b150eb"]
    with pytest.raises(ValueError):
        inv.parse_links_json("not json")


def test_fdb_problems_names_stale_missing_and_wrong_entries() -> None:
    selfs, masters = inv.parse_fdb_json(FDB)
    neigh = inv.parse_neigh_json(NEIGH)
    assert inv.fdb_problems(selfs, masters, neigh, WANT_FDB, WANT_NEIGH) == []
    # a stray entry appended by hand, one endpoint gone, one moved to another VTEP
    selfs["00:00:00:00:00:00"] = ["10.99.0.77"]
    want = {"02:42:0a:0a:00:bd": "10.99.0.4"}
    found = {(p["entry"], p["key"]): p for p in
             inv.fdb_problems(selfs, masters, neigh, want, {"10.10.0.189": "02:42:0a:0a:00:bd"})}
    assert found[("fdb", "00:00:00:00:00:00")]["want"] is None
    assert found[("fdb", "02:42:0a:0a:00:bd")]["have"] == ["10.99.0.3"]
    assert found[("fdb", "02:42:0a:0a:00:bd")]["want"] == "10.99.0.4"
    assert found[("fdb", "02:42:0a:0a:00:dc")]["want"] is None
    assert found[("fdb master", "02:42:0a:0a:00:dc")] == {
        "entry": "fdb master", "key": "02:42:0a:0a:00:dc", "have": True, "want": False}
    assert found[("neigh", "10.10.0.220")]["want"] is None
    assert len(found) == 5
    # two remotes for one MAC (bridge fdb append) is one stale entry too
    selfs2 = {"02:42:0a:0a:00:bd": ["10.99.0.3", "10.99.0.9"]}
    assert [p["key"] for p in inv.fdb_problems(selfs2, {"02:42:0a:0a:00:bd"}, {},
                                               {"02:42:0a:0a:00:bd": "10.99.0.3"}, {})] \
        == ["02:42:0a:0a:00:bd"]


def test_task_cgroup_and_sandbox_names() -> None:
    assert inv.task_of_cgroup("backend.2-207e18") == "backend.2"
    assert inv.task_of_cgroup("my-svc_x.10-abcdef") == "my-svc_x.10"
    assert inv.task_of_cgroup("probe-207e18") is None  # a `run`
    assert inv.task_of_cgroup("run-abc123-207e18") is None
    assert inv.task_of_cgroup("backend.2") is None
    ns = sandbox_ns_name("mnlab-s", "h1", "frontend.2")
    assert inv.sandbox_readable(ns, "mnlab-s", "h1") == "frontend.2"
    assert inv.sandbox_readable(ns, "mnlab-s", "h2") is None
    assert inv.TASK_NAME_RE.fullmatch(inv.sandbox_readable(
        sandbox_ns_name("mnlab-s", "h1", "x" * 60 + ".12"), "mnlab-s", "h1") or "")
    assert not inv.TASK_NAME_RE.fullmatch(inv.sandbox_readable(
        sandbox_ns_name("mnlab-s", "h1", "invprobe-a1b2c3"), "mnlab-s", "h1") or "")


def test_pid_alive() -> None:
    assert inv.pid_alive(os.getpid())
    assert not inv.pid_alive(2**22 + 12345)


def test_duplicate_addresses() -> None:
    eps = [{"name": "a", "node": "h1", "ip": "10.0.0.2"}, {"name": "b", "node": "h2",
                                                           "ip": "10.0.0.3"},
           {"name": "c", "node": "h3", "ip": "10.0.0.2"}]
    assert inv.duplicate_addresses(eps) == {"10.0.0.2": ["a@h1", "c@h3"]}
    assert inv.duplicate_addresses(eps[:2]) == {}


def test_compare_expected() -> None:
    have = {"web": {"name": "web", "networks": ["appnet"], "replicas": 3, "mode": "replicated"},
            "old": {"name": "old", "networks": ["appnet"], "replicas": 1}}
    want = {"web": {"network": "appnet", "replicas": 2}, "new": {"network": "x", "replicas": 1}}
    assert inv.compare_expected("service", have, want, set()) == [
        "service new missing",
        "service web has replicas=3, acknowledged 2",
        "service old exists but no acknowledged write made it (or an acknowledged rm "
        "removed it)"]
    # an unacknowledged write may or may not have taken effect, with any value
    assert inv.compare_expected("service", have, want, {"web", "new", "old"}) == []
    assert inv.compare_expected(
        "service", have, {"web": {"network": "other"}}, {"old"}) == \
        ["service web is on ['appnet'], acknowledged other"]
    nets = {"appnet": {"name": "appnet", "subnet": "10.10.3.0/24", "vni": 5}}
    assert inv.compare_expected("network", nets, {"appnet": {"subnet": "10.10.3.0/24"}},
                                ()) == []
    assert inv.compare_expected("network", nets, {"appnet": {"subnet": "10.10.4.0/24"}},
                                ()) == ["network appnet has subnet='10.10.3.0/24', "
                                        "acknowledged '10.10.4.0/24'"]


def test_definition_leaves_out_task_state() -> None:
    doc = {"name": "web", "replicas": 2, "running": 1, "tasks": [], "placement": {"1": "h1"},
           "command": ["x"]}
    assert inv.definition(doc) == {"name": "web", "replicas": 2, "command": ["x"]}


def _view(host: str, rows: list[dict[str, str]], ok: bool = True) -> inv.ServiceView:
    ls = inv.Answer(host, "service ls", result=[{"name": "web"}] if ok else None,
                    error=None if ok else "timed out")
    insp = {"web": inv.Answer(host, "service inspect web", result={"name": "web",
                                                                    "tasks": rows})} if ok else {}
    return inv.ServiceView(host, ls, insp)


def test_owner_running_takes_each_hosts_word_for_its_own_tasks() -> None:
    r1 = {"task": "web.1", "node": "h1", "state": "running", "ip": "10.0.0.2"}
    r2 = {"task": "web.2", "node": "h2", "state": "running", "ip": "10.0.0.3"}
    r2_done = {**r2, "state": "failed"}
    r3 = {"task": "web.3", "node": "h3", "state": "running", "ip": "10.0.0.4"}
    # h1 still thinks web.2 runs, h2 says it failed: h2 knows
    views = [_view("h1", [r1, r2, r3]), _view("h2", [r1, r2_done]), _view("h3", [], ok=False)]
    got = inv.owner_running(views)
    # web.3: h3 did not answer, so the others' word counts
    assert got == {"web": {"web.1": r1, "web.3": r3}}


def test_parse_probe() -> None:
    out = ("OK frontend.1 on h2 -> backend.2 on h1\n"
           "OK frontend.2 on h1 -> backend error: timed out\n"
           "FAIL URLError: <urlopen error [Errno 111] Connection refused>\n"
           "OK frontend.1 on h2 -> backend.1 on h3\n")
    served, failed, bad = inv.parse_probe(out, 5, "frontend")
    assert (served, failed) == (2, 3)  # the fifth never printed: it failed
    assert len(bad) == 2
    assert inv.parse_probe("", 0, "frontend") == (0, 0, [])


def test_tracebacks_and_log_offsets(tmp_path: Path) -> None:
    lab = Lab("unittest", tmp_path)
    (tmp_path / "h1").mkdir()
    log = lab.log_path("h1")
    log.write_text('{"msg": "ok"}\n{"msg": "x", "exc": "Traceback (most recent call last):'
                   '\\n  File ..."}\n')
    lines, size = inv.log_tracebacks(lab, "h1")
    assert len(lines) == 1 and size == log.stat().st_size
    assert inv.log_sizes(lab, ["h1", "h2"]) == {"h1": size, "h2": 0}
    assert inv.log_tracebacks(lab, "h1", size) == ([], size)
    with log.open("a") as f:
        f.write("Traceback (most recent call last):\n")
    assert inv.log_tracebacks(lab, "h1", size)[0] == ["Traceback (most recent call last):"]
    assert inv.log_tracebacks(lab, "h9") == ([], 0)


def test_query_without_an_agent_is_an_answer(tmp_path: Path) -> None:
    lab = Lab("unittest", tmp_path)
    a = inv.query(lab, "h1", "members")
    assert not a.ok and a.error
    v = inv.query_failed("membership", a)
    assert v.invariant == "membership" and "meshctl members failed" in v.detail
    json.dumps(v.to_dict())


def test_expected_defaults_and_violation_shape() -> None:
    e = inv.Expected({"appnet": {}}, {})
    assert e.maybe_networks == set() and e.maybe_services == set()
    e.maybe_services.add("x")
    assert inv.Expected({}, {}).maybe_services == set()
    v = inv.Violation("dns", "d", {"k": 1})
    assert v.to_dict() == {"invariant": "dns", "detail": "d", "evidence": {"k": 1}}
    assert set(inv.INVARIANTS) == {"membership", "definitions", "tasks", "addresses", "dns",
                                   "kernel", "service", "agents"}
