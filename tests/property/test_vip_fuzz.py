"""Fuzz issue 17's VIP fields and their consumers: the schema of `endpoint_mode`, `vips` and VIP
claims never raises and only admits what the consumers rely on; the VIP maps, rulesets and DNS
built from anything the schema admits stay within their rules."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.dns import Resolver, TaskRecord, VipRecord
from meshnet.lb.core import check_vip_map, dropped_backends, ruleset, vip_maps, vip_usable
from meshnet.state.tables import Endpoint, Service
from meshnet.state.validate import check_value

NETS = ["n1", "n2", "n3"]
SUBNETS = {"n1": "10.1.0.0/24", "n2": "10.2.0.0/30", "n3": "10.3.0.0/16"}
IPS = st.sampled_from(["10.1.0.0", "10.1.0.1", "10.1.0.2", "10.1.0.255", "10.2.0.1",
                       "10.2.0.2", "10.3.7.9", "010.1.0.2", "10.1.0.2 ", "224.0.0.1",
                       "127.0.0.1", "0.0.0.0", "", "x"]) | st.ip_addresses(v=4).map(str)
ODD = st.none() | st.integers() | st.text(max_size=6) | st.lists(st.text(max_size=3), max_size=2)


@st.composite
def service_value(draw: st.DrawFn) -> dict[str, Any]:
    nets = draw(st.lists(st.sampled_from(NETS), min_size=1, max_size=3, unique=True))
    value: dict[str, Any] = {"name": "web", "network": nets[0], "replicas": 1,
                             "spec": {"networks": nets, "command": ["x"]}}
    if draw(st.booleans()):
        value["endpoint_mode"] = draw(st.sampled_from(["vip", "dnsrr", "VIP", ""]) | ODD)
    if draw(st.booleans()):
        keys = st.sampled_from([*NETS, "zz"]) | st.text(max_size=4)
        value["vips"] = draw(st.dictionaries(keys, IPS | ODD, max_size=4) | ODD)
    return value


@settings(max_examples=400, deadline=None)
@given(service_value())
def test_service_schema_admits_only_what_consumers_use(value: dict[str, Any]) -> None:
    problem = check_value("services", "web", value)
    if problem is not None:
        assert problem.startswith("services/web: ")
        return
    mode = value.get("endpoint_mode", "dnsrr")
    assert mode in ("vip", "dnsrr")
    if mode == "dnsrr":
        assert "vips" not in value
        return
    vips = value["vips"]
    assert set(vips) == set(value["spec"]["networks"])
    for ip in vips.values():
        assert str(ipaddress.IPv4Address(ip)) == ip


@settings(max_examples=400, deadline=None)
@given(ip=IPS, prefixlen=st.integers(-1, 33) | ODD, name=st.sampled_from(["web.0", "web.1", "x"]),
       service=st.sampled_from(["web", "api", None]), slot=st.none() | st.integers(0, 2))
def test_vip_claim_schema(ip: Any, prefixlen: Any, name: str, service: Any, slot: Any) -> None:
    mac = "02:42:0a:01:00:09"
    value = {"name": name, "network": "n1", "ip": ip, "mac": mac, "node": "h1",
             "service": service, "slot": slot, "pending": True, "kind": "vip",
             "prefixlen": prefixlen}
    problem = check_value("endpoints", f"n1/{name}@h1", value)
    if problem is None:
        assert name == f"{service}.0" and slot is None
        net = ipaddress.IPv4Network(f"{ip}/{prefixlen}", strict=False)
        assert vip_usable(ip, str(net))


GOOD_IPS = st.integers(0, 40).map(lambda i: f"10.1.0.{i}") | st.sampled_from(
    ["10.1.0.255", "10.2.0.1", "10.2.0.2", "10.3.0.9"])


@st.composite
def state(draw: st.DrawFn) -> tuple[dict[str, Service], list[Endpoint]]:
    services: dict[str, Service] = {}
    for name in draw(st.lists(st.sampled_from(["a", "b", "c"]), unique=True, max_size=3)):
        nets = draw(st.lists(st.sampled_from(NETS), min_size=1, max_size=2, unique=True))
        extra: dict[str, Any] = {}
        if draw(st.booleans()):
            extra = {"endpoint_mode": "vip", "vips": {n: draw(GOOD_IPS) for n in nets}}
        services[name] = Service(name=name, network=nets[0], spec={"networks": nets},
                                 extra=extra)
    endpoints = []
    for i in range(draw(st.integers(0, 8))):
        extra = draw(st.fixed_dictionaries({}, optional={
            "pending": st.booleans(), "health": st.sampled_from(["starting", "healthy",
                                                                  "unhealthy"]),
            "kind": st.sampled_from(["vip", "host"])}))
        endpoints.append(Endpoint(
            name=f"x{i}", network=draw(st.sampled_from(NETS)), ip=draw(GOOD_IPS),
            mac="02:42:0a:01:00:09", node="h1", service=draw(st.sampled_from(["a", "b", "c"])),
            extra=extra))
    return services, endpoints


@settings(max_examples=300, deadline=None)
@given(state(), state())
def test_maps_rulesets_and_drops(s1: Any, s2: Any) -> None:
    services, endpoints = s1
    maps = vip_maps(services, SUBNETS, endpoints)
    for network, vmap in maps.items():
        check_vip_map(vmap)  # canonical IPv4 only: safe to put in an nft script
        text = ruleset(vmap)
        for vip, backends in vmap.items():
            assert vip_usable(vip, SUBNETS[network])
            assert vip in text
            assert list(backends) == sorted(set(backends), key=ipaddress.IPv4Address)
            for b in backends:
                assert b not in vmap and vip_usable(b, SUBNETS[network])
                assert any(e.ip == b and e.serving and e.network == network for e in endpoints)
            if not backends:
                assert f"ip daddr {vip} reject" in text
    other = vip_maps(s2[0], SUBNETS, s2[1])
    for network in set(maps) | set(other):
        old, new = maps.get(network, {}), other.get(network, {})
        gone = dropped_backends(old, new)
        for vip, backends in old.items():
            assert gone.get(vip, frozenset()) == frozenset(backends) - frozenset(new.get(vip, ()))


@settings(max_examples=300, deadline=None)
@given(state())
def test_dns_answers_the_vip_for_name_and_tasks_for_tasks_name(s: Any) -> None:
    services, endpoints = s
    from meshnet.lb.core import service_vips
    vips = [VipRecord(svc, net, ip) for net, t in service_vips(services, SUBNETS).items()
            for ip, svc in t.items()]
    tasks = [TaskRecord(e.service or "", None, e.name, e.network, e.ip) for e in endpoints
             if e.serving]
    r = Resolver()
    r.set_records(tasks, 1, networks=NETS, vips=vips)
    for name in ("a", "b", "c"):
        for net in NETS:
            scope = frozenset({net})
            mine = [v.ip for v in vips if v.service == name and v.network == net]
            task_ips = sorted({t.ip for t in tasks if t.service == name and t.network == net})
            got = sorted(r.answer_name(name, "A", scope))
            if mine:
                assert got == mine
            else:
                assert got == task_ips
            assert sorted(r.answer_name(f"tasks.{name}", "A", scope)) == task_ips
    assert r.counters["internal_errors"] == 0
