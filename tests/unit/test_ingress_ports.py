"""Published ports (issue 17): --publish parsing, the schema, clashes, the plan and the ruleset."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from meshnet.agent.control import OpError
from meshnet.agent.ingress import Ingress, reserved_ports
from meshnet.config import Config
from meshnet.platform.ingress_nft import TABLE, HostAddress, NftPort, render, set_forwarding
from meshnet.state.ingress import plan
from meshnet.state.ports import (
    PortError,
    check_ports,
    clash,
    host_endpoint_name,
    parse_ports,
    parse_publish,
    port_text,
)
from meshnet.state.tables import Endpoint, Service
from meshnet.state.validate import check_value

TCP8080 = {"published": 8080, "target": 80, "protocol": "tcp"}


# --- --publish ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("8080:80", TCP8080),
    ("8080:80/tcp", TCP8080),
    ("53:5353/udp", {"published": 53, "target": 5353, "protocol": "udp"}),
    ("published=8080,target=80", TCP8080),
    ("published=8080,target=80,protocol=tcp,mode=ingress", TCP8080),
    ("target=53, published=53, protocol=udp", {"published": 53, "target": 53, "protocol": "udp"}),
])
def test_publish_forms(text: str, want: dict[str, Any]) -> None:
    assert parse_publish(text) == want
    assert parse_publish(port_text(want)) == want  # what inspect prints is what --publish takes


@pytest.mark.parametrize("text,why", [
    ("8080", "PUBLISHED:TARGET"),
    ("0:80", "published port 0"),
    ("8080:65536", "target port 65536"),
    ("8080:80/sctp", "protocol 'sctp'"),
    ("published=8080", "needs both"),
    ("published=8080,target=80,mode=host", "mode must be ingress"),
    ("published=8080,target=80,published=81", "expected published="),
    ("published=x,target=80", "published port 'x'"),
    ("\uff18\uff10:80", "PUBLISHED:TARGET"),  # fullwidth digits are not ASCII digits
])
def test_publish_refused_with_one_line(text: str, why: str) -> None:
    with pytest.raises(PortError, match=why) as e:
        parse_publish(text)
    assert "\n" not in str(e.value)


def test_ports_twice_in_one_request_are_refused_but_other_protocol_is_not() -> None:
    with pytest.raises(PortError, match="port 80/tcp is published twice"):
        parse_ports(["80:80", "published=80,target=81"])
    assert parse_ports(["80:80", "80:80/udp"]) == [
        {"published": 80, "target": 80, "protocol": "tcp"},
        {"published": 80, "target": 80, "protocol": "udp"}]
    assert parse_ports(None) == []


@pytest.mark.parametrize("value", [
    "8080:80", [{"published": 8080, "target": 80}],
    [{**TCP8080, "extra": 1}], [{**TCP8080, "published": True}],
    [{**TCP8080, "protocol": "TCP"}], [TCP8080] * 65,
])
def test_check_ports_refuses_bad_values(value: Any) -> None:
    with pytest.raises(PortError):
        check_ports(value)


def test_service_record_ports_are_checked_by_the_replicated_schema() -> None:
    svc = Service("web", "n1", spec={"networks": ["n1"], "command": ["x"]},
                  extra={"ports": [TCP8080]})
    assert check_value("services", "web", svc.to_value()) is None
    bad = {**svc.to_value(), "ports": [TCP8080, TCP8080]}
    assert check_value("services", "web", bad) == \
        "services/web: port 8080/tcp is published twice"


# --- clashes -----------------------------------------------------------------------------------


def test_clash_with_another_service_or_an_agent_port() -> None:
    reserved = reserved_ports(Config(name="h1", bind=("10.0.0.1", 7946),
                                     dns_listen=(("127.0.0.1", 5353),),
                                     metrics_listen=("10.0.0.1", 9946)))
    assert clash([TCP8080], {"api": [{**TCP8080, "target": 81}]}, reserved) == \
        "port 8080/tcp is already published by service api"
    # the same number on the other protocol is another port
    assert clash([TCP8080], {"dns": [{**TCP8080, "protocol": "udp"}]}, reserved) is None
    for proto, port, what in [("udp", 4789, "VXLAN"), ("udp", 4790, "encrypted overlay"),
                              ("tcp", 7946, "gossip"), ("udp", 7946, "gossip"),
                              ("udp", 5353, "dns_listen"), ("tcp", 5353, "dns_listen"),
                              ("tcp", 9946, "metrics_listen")]:
        problem = clash([{"published": port, "target": 1, "protocol": proto}], {}, reserved)
        assert problem is not None and what in problem and f"{port}/{proto}" in problem
    assert clash([{"published": 4789, "target": 1, "protocol": "tcp"}], {}, reserved) is None


def test_check_create_refuses_another_members_gossip_port() -> None:
    svc = Service("web", "n1", extra={"ports": [{"published": 7000, "target": 80,
                                                 "protocol": "udp"}]})
    fake = SimpleNamespace(store=SimpleNamespace(services=lambda: {}), node="h1",
                           reserved=lambda: {}, members=lambda: {"h1": 7946, "h2": 7000})
    with pytest.raises(OpError, match="7000/udp cannot be published: it is the gossip port of "
                       "member h2"):
        Ingress.check_create(fake, svc)  # type: ignore[arg-type]
    fake.members = lambda: {"h1": 7946}
    Ingress.check_create(fake, svc)  # type: ignore[arg-type]


# --- host endpoints in the schema --------------------------------------------------------------


def _ep(name: str, node: str = "h1", **extra: Any) -> tuple[str, dict[str, Any]]:
    value = {"name": name, "network": "n1", "ip": "10.1.0.9", "mac": "02:42:0a:01:00:09",
             "node": node, **extra}
    return f"n1/{name}@{node}", value


def test_host_endpoint_is_named_for_its_node_and_no_other_endpoint_may_be() -> None:
    assert check_value("endpoints", *_ep("host-h1", kind="host", pending=True)) is None
    # a dotted node name is not a DNS label, but is its own host endpoint's name
    assert check_value("endpoints", *_ep("host-h1.lan", "h1.lan", kind="host")) is None
    assert "must be named host-h1" in str(check_value("endpoints", *_ep("host-h2", kind="host")))
    assert "reserved for h1's own address" in str(check_value("endpoints", *_ep("host-h1")))
    assert check_value("endpoints", *_ep("host-h2")) is None  # only its own node's name
    assert "no service or slot" in str(
        check_value("endpoints", *_ep("host-h1", kind="host", service="web")))
    assert "kind gateway is not one of" in str(check_value("endpoints", *_ep("x", kind="gateway")))
    assert host_endpoint_name("h1") == "host-h1"


# --- the plan ----------------------------------------------------------------------------------


def _task(name: str, ip: str, node: str, network: str = "n1", **extra: Any) -> Endpoint:
    return Endpoint(name, network, ip, "02:42:0a:01:00:01", node, name.split(".")[0],
                    int(name.split(".")[1]), extra)


def _svc(name: str, *ports: dict[str, Any], networks: tuple[str, ...] = ("n1",)) -> Service:
    return Service(name, networks[0], spec={"networks": list(networks), "command": ["x"]},
                   extra={"ports": list(ports)} if ports else {})


def test_plan_sends_each_port_to_serving_tasks_of_alive_owners_only() -> None:
    services = {"web": _svc("web", TCP8080, networks=("n1", "n2")), "db": _svc("db")}
    endpoints = [
        _task("web.1", "10.1.0.20", "h1"),
        _task("web.2", "10.1.0.3", "h2"),
        _task("web.3", "10.1.0.4", "h3"),  # its owner is dead: left out
        _task("web.4", "10.1.0.5", "h1", pending=True),
        _task("web.5", "10.1.0.6", "h2", health="starting"),
        _task("web.6", "10.1.0.7", "h2", health="healthy"),
        _task("web.1", "10.2.0.9", "h1", network="n2"),  # its second network: not the mesh's
        Endpoint("host-h2", "n1", "10.1.0.8", "02:42:0a:01:00:08", "h2", extra={"kind": "host"}),
        _task("db.1", "10.1.0.30", "h1"),
    ]
    p = plan(services, endpoints, ["n1", "n2"], ["h1", "h2"])
    assert [(x.protocol, x.published, x.target, x.service, x.network, x.backends)
            for x in p.ports] == [("tcp", 8080, 80, "web", "n1",
                                   ("10.1.0.3", "10.1.0.7", "10.1.0.20"))]
    assert p.networks == {"n1"} and p.shadowed == ()


def test_plan_settles_a_clash_by_name_and_skips_services_of_missing_networks() -> None:
    services = {"b": _svc("b", TCP8080), "a": _svc("a", {**TCP8080, "target": 81}),
                "c": _svc("c", {**TCP8080, "published": 9000}, networks=("gone",))}
    p = plan(services, [], ["n1"], ["h1"])
    assert [(x.service, x.target, x.backends) for x in p.ports] == [("a", 81, ())]
    assert p.shadowed == ("8080/tcp of b",)
    assert p.networks == {"n1"}
    assert plan({"web": _svc("web")}, [], ["n1"], ["h1"]).networks == frozenset()


# --- the ruleset -------------------------------------------------------------------------------

HOSTS = {"n1": HostAddress("mnbr-0000ab", "10.1.0.8", 24, "02:42:0a:01:00:08")}


def test_render_dnats_spreads_snats_and_guards_the_bridges() -> None:
    script = render([NftPort("tcp", 8080, 80, "n1", ("10.1.0.3", "10.1.0.20"))], HOSTS)
    assert script is not None
    lines = [line.strip() for line in script.splitlines()]
    assert lines[:3] == [f"table ip {TABLE}", f"delete table ip {TABLE}", f"table ip {TABLE} {{"]
    assert "type nat hook prerouting priority -100; policy accept;" in lines
    assert "type nat hook output priority -100; policy accept;" in lines
    assert "type nat hook postrouting priority 100; policy accept;" in lines
    assert ("tcp dport 8080 dnat to numgen random mod 2 map { 0 : 10.1.0.3, 1 : 10.1.0.20 } "
            ": 80") in lines
    assert 'oifname "mnbr-0000ab" ct status dnat snat to 10.1.0.8' in lines
    assert "fib daddr type local jump published" in lines
    assert "ip daddr != 127.0.0.0/8 fib daddr type local jump published" in lines
    assert 'iifname { "mnbr-0000ab" } drop' in lines and 'oifname { "mnbr-0000ab" } drop' in lines
    assert lines.index("ct status dnat accept") < lines.index('iifname { "mnbr-0000ab" } drop')


def test_render_rejects_a_port_without_serving_tasks_or_host_address() -> None:
    script = render([NftPort("tcp", 8080, 80, "n1", ()), NftPort("udp", 53, 53, "n1", ()),
                     NftPort("tcp", 9000, 90, "n2", ("10.2.0.5",)),
                     NftPort("tcp", 9001, 90, "n1", ("not-an-ip", "10.1.0.3; flush ruleset"))],
                    HOSTS)
    assert script is not None
    assert "tcp dport 8080 reject with tcp reset" in script
    assert "udp dport 53 reject\n" in script
    assert "tcp dport 9000 reject with tcp reset" in script  # n2: no host address here yet
    assert "tcp dport 9001 reject with tcp reset" in script and "flush" not in script


def test_render_never_touches_the_agents_own_ports_and_is_none_when_idle() -> None:
    script = render([NftPort("udp", 4789, 80, "n1", ("10.1.0.3",)),
                     NftPort("tcp", 8080, 80, "n1", ("10.1.0.3",))], HOSTS,
                    skip={("udp", 4789)})
    assert script is not None and "4789" not in script and "dport 8080" in script
    assert render([], {}) is None
    assert render([NftPort("udp", 4789, 80, "n1", ("10.1.0.3",))], {}, {("udp", 4789)}) is None


def test_set_forwarding_writes_only_when_off(tmp_path: Any) -> None:
    (tmp_path / "eth0").mkdir()
    (tmp_path / "eth0" / "forwarding").write_text("0\n")
    assert set_forwarding("eth0", tmp_path) is True
    assert (tmp_path / "eth0" / "forwarding").read_text() == "1\n"
    assert set_forwarding("eth0", tmp_path) is False
    with pytest.raises(Exception, match="bad interface name"):
        set_forwarding("../all", tmp_path)


def test_reserved_ports_follow_the_config() -> None:
    r = reserved_ports(Config(name="h1", bind=("0.0.0.0", 8000)))
    assert set(r) == {("tcp", 8000), ("udp", 8000), ("udp", 4789), ("udp", 4790)}


def test_inspect_text_shows_ports_as_publish_takes_them() -> None:
    from meshnet.cli.meshctl import _render_spec

    text = _render_spec({"name": "web", "ports": [TCP8080, {**TCP8080, "protocol": "udp"}]})
    assert "ports: 8080:80/tcp,8080:80/udp" in text
    assert "ports: -" in _render_spec({"name": "web", "ports": []})
