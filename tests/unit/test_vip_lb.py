"""VIP load balancing's pure parts (issue 17): which VIP maps to which tasks, the nftables
ruleset a sandbox runs, what conntrack must forget, DNS for vip services, and the schema."""

from __future__ import annotations

from typing import Any

import pytest

from meshnet.agent.control import OpError
from meshnet.agent.vips import parse_endpoint_mode
from meshnet.dns import Resolver, TaskRecord, VipRecord
from meshnet.lb.core import (
    check_vip_map,
    dropped_backends,
    endpoint_mode,
    hold_draining,
    ruleset,
    service_vips,
    vip_claim_name,
    vip_maps,
    vip_usable,
    vips_taken,
)
from meshnet.state.tables import Endpoint, Service
from meshnet.state.validate import check_value

SUBNETS = {"n1": "10.1.0.0/24", "n2": "10.2.0.0/24"}


def svc(name: str, mode: str | None = "vip", vips: dict[str, str] | None = None,
        networks: tuple[str, ...] = ("n1",)) -> Service:
    extra: dict[str, Any] = {}
    if mode is not None:
        extra["endpoint_mode"] = mode
    if vips is not None:
        extra["vips"] = vips
    return Service(name=name, network=networks[0], spec={"networks": list(networks)},
                   extra=extra)


def ep(name: str, ip: str, service: str | None, network: str = "n1", **extra: Any) -> Endpoint:
    slot = int(name.rpartition(".")[2]) if service else None
    return Endpoint(name=name, network=network, ip=ip, mac="02:42:0a:01:00:05", node="h1",
                    service=service, slot=slot, extra=extra)


def test_endpoint_mode_absent_is_dnsrr() -> None:
    assert endpoint_mode(svc("a", None)) == "dnsrr"
    assert endpoint_mode(svc("a", "dnsrr")) == "dnsrr"
    assert endpoint_mode(svc("a", "vip", {"n1": "10.1.0.9"})) == "vip"
    assert endpoint_mode(svc("a", "weird")) == "dnsrr"


@pytest.mark.parametrize("ip, ok", [("10.1.0.2", True), ("10.1.0.254", True),
                                    ("10.1.0.0", False), ("10.1.0.1", False),
                                    ("10.1.0.255", False), ("10.2.0.5", False),
                                    ("nonsense", False), ("", False)])
def test_vip_usable(ip: str, ok: bool) -> None:
    assert vip_usable(ip, "10.1.0.0/24") is ok


def test_vip_maps_follow_serving_endpoints_only() -> None:
    services = {"web": svc("web", vips={"n1": "10.1.0.200"}),
                "old": svc("old", None),
                "bad": svc("bad", vips={"n1": "10.1.0.255"})}
    eps = [ep("web.1", "10.1.0.7", "web"), ep("web.2", "10.1.0.5", "web"),
           ep("web.3", "10.1.0.6", "web", pending=True),
           ep("web.4", "10.1.0.8", "web", health="unhealthy"),
           ep("web.5", "10.1.0.9", "web", health="starting"),
           ep("web.6", "10.1.0.10", "web", health="healthy"),
           ep("web.0", "10.1.0.200", "web", kind="vip", pending=True),
           ep("old.1", "10.1.0.20", "old")]
    maps = vip_maps(services, SUBNETS, eps)
    # sorted numerically; pending, starting, unhealthy and the claim itself left out
    assert maps == {"n1": {"10.1.0.200": ("10.1.0.5", "10.1.0.7", "10.1.0.10")}}


def test_a_vip_with_no_task_maps_to_nothing_and_other_networks_are_apart() -> None:
    services = {"web": svc("web", vips={"n1": "10.1.0.200", "n2": "10.2.0.200"},
                           networks=("n1", "n2"))}
    maps = vip_maps(services, SUBNETS, [ep("web.1", "10.1.0.5", "web")])
    assert maps == {"n1": {"10.1.0.200": ("10.1.0.5",)}, "n2": {"10.2.0.200": ()}}


def test_service_vips_skip_unknown_networks_and_break_ties_by_name() -> None:
    services = {"b": svc("b", vips={"n1": "10.1.0.9"}), "a": svc("a", vips={"n1": "10.1.0.9"}),
                "c": svc("c", vips={"gone": "10.9.0.9"})}
    assert service_vips(services, SUBNETS) == {"n1": {"10.1.0.9": "a"}}
    assert vips_taken(services.values(), "n1") == {"10.1.0.9"}
    assert vips_taken(services.values(), "gone") == {"10.9.0.9"}


def test_ruleset_text() -> None:
    text = ruleset({"10.1.0.200": ("10.1.0.5", "10.1.0.6"), "10.1.0.9": (),
                    "10.1.0.30": ("10.1.0.3",)})
    assert text.startswith("table ip meshnet_vip\ndelete table ip meshnet_vip\n")
    assert "type nat hook output priority -100; policy accept;" in text
    assert "type filter hook output priority -150; policy accept;" in text
    assert ("ip daddr 10.1.0.200 dnat to numgen random mod 2 map "
            "{ 0 : 10.1.0.5, 1 : 10.1.0.6 }") in text
    assert "ip daddr 10.1.0.30 dnat to 10.1.0.3" in text
    # no serving task: refused at once, tcp with a reset
    assert "ip daddr 10.1.0.9 meta l4proto tcp reject with tcp reset" in text
    assert "ip daddr 10.1.0.9 reject" in text
    # a non-SYN that starts a conntrack entry (its old entry was deleted): reset
    assert "ct state new tcp flags & (fin | syn | rst | ack) != syn reject with tcp reset" \
        in text
    assert "elements = { 10.1.0.9, 10.1.0.30, 10.1.0.200 }" in text
    assert ruleset({}) == "table ip meshnet_vip\ndelete table ip meshnet_vip\n"
    # deterministic: the same map (in any order) is the same text, so nothing is re-applied
    assert ruleset({"10.1.0.30": ("10.1.0.3",), "10.1.0.9": (),
                    "10.1.0.200": ("10.1.0.5", "10.1.0.6")}) == text


def test_check_vip_map_refuses_what_nft_must_never_see() -> None:
    check_vip_map({"10.1.0.2": ("10.1.0.3",)})
    for bad in ({"10.1.0.2; flush ruleset": ()}, {"10.1.0.2": ("010.1.0.3",)}):
        with pytest.raises(ValueError):
            check_vip_map(bad)


def test_draining_backends_keep_their_connections_until_gone() -> None:
    dropped = {"v1": frozenset({"a", "b"}), "v2": frozenset({"c"})}
    now, held = hold_draining(dropped, frozenset({"b", "c"}))
    assert now == {"v1": frozenset({"a"})}
    assert held == {"v1": frozenset({"b"}), "v2": frozenset({"c"})}
    assert hold_draining(dropped, frozenset()) == (dropped, {})


def test_dropped_backends() -> None:
    old = {"v1": ("a", "b"), "v2": ("c",), "v3": ()}
    new = {"v1": ("a",), "v3": ("d",)}
    assert dropped_backends(old, new) == {"v1": frozenset({"b"}), "v2": frozenset({"c"})}
    assert dropped_backends(new, new) == {}


def test_parse_endpoint_mode() -> None:
    assert parse_endpoint_mode(None) == "vip"
    assert parse_endpoint_mode("dnsrr") == "dnsrr"
    with pytest.raises(OpError, match="endpoint-mode"):
        parse_endpoint_mode("ipvs")


# --- DNS -------------------------------------------------------------------------------------


def resolver() -> Resolver:
    r = Resolver()
    tasks = [TaskRecord("web", 1, "web.1", "n1", "10.1.0.5"),
             TaskRecord("web", 2, "web.2", "n1", "10.1.0.6"),
             TaskRecord("rr", 1, "rr.1", "n1", "10.1.0.7")]
    r.set_records(tasks, 1, networks=["n1", "n2"],
                  vips=[VipRecord("web", "n1", "10.1.0.200"),
                        VipRecord("idle", "n1", "10.1.0.201")])
    return r


def test_vip_service_names() -> None:
    r = resolver()
    n1 = frozenset({"n1"})
    assert r.answer_name("web", "A", n1) == ["10.1.0.200"]
    assert r.answer_name("web.n1", "A", n1) == ["10.1.0.200"]
    assert r.answer_name("web.meshnet", "A", n1) == ["10.1.0.200"]
    assert sorted(r.answer_name("tasks.web", "A", n1)) == ["10.1.0.5", "10.1.0.6"]
    assert sorted(r.answer_name("tasks.web.n1", "A", n1)) == ["10.1.0.5", "10.1.0.6"]
    assert r.answer_name("web.2", "A", n1) == ["10.1.0.6"]
    assert r.answer_name("10.1.0.200", "PTR", n1) == ["web"]
    assert r.answer_name("10.1.0.5", "PTR", n1) == ["web.1"]
    # no task yet: the VIP still answers (connections to it are refused by the kernel)
    assert r.answer_name("idle", "A", n1) == ["10.1.0.201"]
    assert r.answer_name("tasks.idle", "A", n1) == []
    # dnsrr as before
    assert r.answer_name("rr", "A", n1) == ["10.1.0.7"]
    assert r.answer_name("tasks.rr", "A", n1) == ["10.1.0.7"]
    # scoping: a sandbox on n2 sees no VIP of n1
    assert r.answer_name("web", "A", frozenset({"n2"})) == []


def test_vip_records_change_drops_the_cache() -> None:
    r = resolver()
    r.set_records([], 2, networks=["n1"], vips=[VipRecord("web", "n1", "10.1.0.202")])
    assert r.answer_name("web", "A", frozenset({"n1"})) == ["10.1.0.202"]
    r.set_records([], 3, networks=["n1"], vips=[VipRecord("web", "n1", "nope")])
    assert r.counters["bad_records"] == 1
    assert r.answer_name("web", "A", frozenset({"n1"})) == []


# --- schema ----------------------------------------------------------------------------------

SERVICE = {"name": "web", "network": "n1", "mode": "replicated", "replicas": 2,
           "spec": {"networks": ["n1", "n2"], "command": ["x"]}}


@pytest.mark.parametrize("fields, ok", [
    ({}, True),
    ({"endpoint_mode": "dnsrr"}, True),
    ({"endpoint_mode": "vip", "vips": {"n1": "10.1.0.9", "n2": "10.2.0.9"}}, True),
    ({"endpoint_mode": "vip"}, False),
    ({"endpoint_mode": "vip", "vips": {"n1": "10.1.0.9"}}, False),
    ({"endpoint_mode": "vip", "vips": {"n1": "10.1.0.9", "n2": "10.2.0.9", "n3": "1.2.3.4"}},
     False),
    ({"endpoint_mode": "vip", "vips": {"n1": "10.1.0.9", "n2": "224.0.0.1"}}, False),
    ({"endpoint_mode": "vip", "vips": {"n1": "10.1.0.9", "n2": "10.2.0.09"}}, False),
    ({"endpoint_mode": "vip", "vips": ["10.1.0.9"]}, False),
    ({"endpoint_mode": "dnsrr", "vips": {}}, False),
    ({"vips": {"n1": "10.1.0.9", "n2": "10.2.0.9"}}, False),
    ({"endpoint_mode": "ipvs"}, False),
])
def test_service_endpoint_mode_schema(fields: dict[str, Any], ok: bool) -> None:
    problem = check_value("services", "web", {**SERVICE, **fields})
    assert (problem is None) is ok, problem


CLAIM = {"name": "web.0", "network": "n1", "ip": "10.1.0.9", "mac": "02:42:0a:01:00:09",
         "node": "h1", "service": "web", "slot": None, "pending": True, "prefixlen": 24,
         "sandbox": "", "kind": "vip"}


@pytest.mark.parametrize("fields, ok", [
    ({}, True),
    ({"pending": False}, True),
    ({"ip": "10.1.0.1", "mac": "02:42:0a:01:00:01"}, False),  # the gateway
    ({"ip": "10.1.0.255", "mac": "02:42:0a:01:00:ff"}, False),  # broadcast
    ({"name": "web.1"}, False),
    ({"service": "api"}, False),
    ({"service": None}, False),
    ({"slot": 0}, False),
    ({"kind": "ipvs"}, False),
])
def test_vip_claim_schema(fields: dict[str, Any], ok: bool) -> None:
    value = {**CLAIM, **fields}
    problem = check_value("endpoints", f"n1/{value['name']}@h1", value)
    assert (problem is None) is ok, problem
    assert vip_claim_name("web") == "web.0"
