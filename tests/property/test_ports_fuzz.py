"""Fuzz published ports (issue 17): every replicated `ports` value and host endpoint is checked
without a crash, what the schema accepts the plan and the ruleset take, and no value can put
anything but a rule of ours into the nft script."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.platform.ingress_nft import HostAddress, NftPort, render
from meshnet.state.ingress import plan
from meshnet.state.ports import PortError, check_ports, parse_publish, port_text
from meshnet.state.tables import Endpoint, Service
from meshnet.state.validate import check_value

SCALARS = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
           | st.floats(allow_nan=True) | st.text(max_size=8) | st.binary(max_size=4)
           | st.sampled_from(["tcp", "udp", "TCP", "sctp", ""]))
PORT_NUMBERS = st.integers(-2, 65537) | SCALARS
PORT = st.fixed_dictionaries({"published": PORT_NUMBERS, "target": PORT_NUMBERS,
                              "protocol": st.sampled_from(["tcp", "udp"]) | SCALARS})
PORT_MAPS = st.one_of(
    PORT,
    st.dictionaries(st.sampled_from(["published", "target", "protocol", "mode", "x"]), SCALARS,
                    max_size=5))
PORTS = st.lists(PORT_MAPS, max_size=6) | SCALARS
SERVICE = {"name": "web", "network": "n1", "mode": "replicated", "replicas": 2,
           "spec": {"networks": ["n1"], "command": ["x"]}}


@settings(max_examples=400, deadline=None)
@given(PORTS)
def test_schema_takes_or_refuses_any_ports_value_and_the_plan_takes_what_it_accepts(
        ports: Any) -> None:
    value = {**SERVICE, "ports": ports}
    problem = check_value("services", "web", value)
    try:
        check_ports(ports)
        ok = True
    except PortError:
        ok = False
    assert (problem is None) == ok, problem
    if ok:
        svc = Service.from_value(value)
        assert svc is not None
        p = plan({"web": svc}, [], ["n1"], ["h1"])
        assert len(p.ports) == len(ports)
        assert {(x.protocol, x.published, x.target) for x in p.ports} == \
            {(q["protocol"], q["published"], q["target"]) for q in ports}


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60) | st.from_regex(r"[0-9]{1,6}:[0-9]{1,6}(/[a-z]{1,4})?",
                                           fullmatch=True))
def test_parse_publish_gives_a_port_or_one_line(text: str) -> None:
    try:
        p = parse_publish(text)
    except PortError as e:
        assert "\n" not in str(e) and len(str(e)) < 200
        return
    assert check_ports([p]) == [p]
    assert parse_publish(port_text(p)) == p


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["kind", "name", "node", "service", "slot", "pending"]),
                       SCALARS | st.sampled_from(["host", "vip", "host-h1", "h1", "web"]),
                       max_size=6))
def test_endpoint_kind_never_crashes_the_schema(fields: dict[str, Any]) -> None:
    value = {"name": "host-h1", "network": "n1", "ip": "10.1.0.9", "mac": "02:42:0a:01:00:09",
             "node": "h1", "kind": "host", **fields}
    node = value["node"] if isinstance(value["node"], str) else "h1"
    name = value["name"] if isinstance(value["name"], str) else "x"
    problem = check_value("endpoints", f"n1/{name}@{node}", value)
    assert problem is None or problem.startswith("endpoints/")
    if problem is None and value.get("kind") == "host":
        assert value["name"] == f"host-{value['node']}"


RULE = re.compile(
    r"(tcp|udp) dport [0-9]{1,5} (reject( with tcp reset)?|dnat to numgen random mod [0-9]+ map "
    r"\{ [0-9]+ : [0-9.]+(, [0-9]+ : [0-9.]+)* \} : [0-9]{1,5})")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["tcp", "udp", "sctp", "tcp\n"]),
                          st.integers(-1, 70000), st.integers(-1, 70000),
                          st.sampled_from(["n1", "n2"]),
                          st.lists(st.text(max_size=16) | st.ip_addresses(v=4).map(str),
                                   max_size=4)), max_size=5),
       st.sets(st.tuples(st.sampled_from(["tcp", "udp"]), st.integers(1, 65535)), max_size=3))
def test_render_emits_only_our_rules(ports: list[Any], skip: set[tuple[str, int]]) -> None:
    script = render([NftPort(pr, pub, tgt, net, tuple(b)) for pr, pub, tgt, net, b in ports],
                    {"n1": HostAddress("mnbr-0000ab", "10.1.0.8", 24, "02:42:0a:01:00:08")},
                    skip)
    assert script is not None  # the bridge guard alone is a ruleset
    body = script.split("chain published {", 1)[1].split("}\n\tchain postrouting", 1)[0]
    rules = [line.strip() for line in body.splitlines() if line.strip() and line.strip() != "}"]
    for rule in rules:
        assert RULE.fullmatch(rule), rule
        proto, _, port = rule.split()[:3]
        assert (proto, int(port)) not in skip


def test_endpoints_with_kind_host_are_never_backends() -> None:
    host = Endpoint("host-h1", "n1", "10.1.0.8", "02:42:0a:01:00:08", "h1", "web", None,
                    {"kind": "host"})
    svc = Service("web", "n1", spec={"networks": ["n1"], "command": ["x"]},
                  extra={"ports": [{"published": 80, "target": 80, "protocol": "tcp"}]})
    assert plan({"web": svc}, [host], ["n1"], ["h1"]).ports[0].backends == ()
