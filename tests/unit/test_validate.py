"""The replicated tables' schema (meshnet/state/validate.py): every rule, its boundaries, and
that local input (`network create`, `service create`, what the agent publishes) obeys the same
rules as what peers send."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from meshnet.agent.control import OpError
from meshnet.agent.services import parse_spec
from meshnet.containment import Containment, Mount
from meshnet.placement import PlacementError, ServiceSpec
from meshnet.placement.spec import MAX_REPLICAS
from meshnet.state import Endpoint, Network
from meshnet.state.networks import NetworkError, check_name, mac_for_ip, parse_subnet, vni_hash
from meshnet.state.validate import (
    MAX_COMMAND_ARGS,
    MAX_ENV,
    RESTART_DEFAULTS,
    ValidationError,
    check_value,
    restart_policy,
)

NET = {"name": "appnet", "vni": 5000, "subnet": "10.1.0.0/24", "encrypted": False}
SPEC: dict[str, Any] = {
    "networks": ["appnet"], "command": ["sh", "-c", "echo hi"], "env": {"A": "b"},
    "constraints": ["node.name==h1"], "containment": {}, "max_per_node": None,
    "restart": {"condition": "any", "delay": 1.0, "max_attempts": 0, "backoff": 2.0},
}
SVC: dict[str, Any] = {"name": "web", "network": "appnet", "mode": "replicated", "replicas": 3,
                       "spec": SPEC}
EP: dict[str, Any] = {"name": "web.1", "network": "appnet", "ip": "10.1.0.5",
                      "mac": "02:42:0a:01:00:05", "node": "h1", "service": "web", "slot": 1,
                      "pending": False, "sandbox": "mns-h1-web.1", "prefixlen": 24,
                      "containment": {"user": "0", "capabilities": ["CHOWN"],
                                      "limits": {"memory": 67108864}, "mounts": ["/a:/b:ro"]}}
TASK: dict[str, Any] = {"task": "web.1", "service": "web", "slot": 1, "node": "h1",
                        "state": "running", "ip": "10.1.0.5", "exit_code": None, "restarts": 0,
                        "user": "0", "capabilities": ["CHOWN"], "limits": {}, "mounts": []}


def with_(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of BASE with the field at dotted PATH set (value DELETE removes it)."""
    out = copy.deepcopy(base)
    *parents, last = path.split(".")
    d = out
    for p in parents:
        d = d[p]
    if value is DELETE:
        d.pop(last, None)
    else:
        d[last] = value
    return out


DELETE = object()


def test_good_values_pass() -> None:
    assert check_value("networks", "appnet", NET) is None
    assert check_value("services", "web", SVC) is None
    assert check_value("endpoints", "appnet/web.1@h1", EP) is None
    assert check_value("endpoints", "appnet/web.1", EP) is None
    assert check_value("tasks", "web.1@h1", TASK) is None


def test_reason_names_table_key_and_rule() -> None:
    why = check_value("services", "web", with_(SVC, "replicas", 10**12))
    assert why == "services/web: replicas 1000000000000 > 10000"
    assert check_value("nope", "k", {}) == "nope/k: unknown table"
    # a long or unprintable key is shown short and quoted, never whole
    why = check_value("networks", "x\n" * 500, NET)
    assert why is not None and len(why) < 300 and "\n" not in why


# ---- names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "web", "Web-1", "a_b", "0net", "x" * 63])
def test_names_accepted(name: str) -> None:
    assert check_name("network", name) == name
    assert check_value("networks", name, {**NET, "name": name}) is None


@pytest.mark.parametrize("name", [
    "", "x" * 64, "-web", "_web", "web.1", "we b", "web\n", "web\r", "\nweb", "web\0",
    "web\u0661",  # ARABIC-INDIC DIGIT ONE: str.isalnum() says yes
    "\uff57eb",  # FULLWIDTH w
    "caf\u00e9", "web/1", "com", "LOCAL", "tasks",
])
def test_names_refused(name: str) -> None:
    with pytest.raises(NetworkError):
        check_name("network", name)
    assert check_value("networks", name, {**NET, "name": name}) is not None
    assert check_value("services", name or "x", {**SVC, "name": name}) is not None


def test_non_string_names_refused() -> None:
    for bad in (None, 3, b"web", ["web"], True):
        assert check_value("networks", "appnet", {**NET, "name": bad}) is not None


def test_key_must_match_name() -> None:
    assert "key is not" in str(check_value("networks", "other", NET))
    assert "key is not" in str(check_value("services", "other", SVC))
    assert "key is not" in str(check_value("endpoints", "appnet/web.2", EP))
    assert "key is not" in str(check_value("endpoints", "appnet/web.1@h2", EP))
    assert "key is not" in str(check_value("tasks", "web.1@h2", TASK))


# ---- networks ------------------------------------------------------------------------------


@pytest.mark.parametrize(("vni", "ok"), [
    (4095, False), (4096, True), ((1 << 24) - 1, True), (1 << 24, False), (-1, False),
    (True, False), (5000.0, False), ("5000", False), (None, False),
])
def test_network_vni_range(vni: Any, ok: bool) -> None:
    assert (check_value("networks", "appnet", {**NET, "vni": vni}) is None) == ok


@pytest.mark.parametrize(("subnet", "ok"), [
    ("10.1.0.0/24", True), ("10.0.0.0/8", True), ("10.1.0.0/29", True), ("192.168.7.0/24", True),
    ("10.0.0.0/33", False), ("10.1.0.0/30", False), ("8.0.0.0/7", False), ("0.0.0.0/0", False),
    ("10.1.0.1/24", False),  # host bits set
    ("10.1.0.0/255.255.255.0", False),  # parseable, not canonical
    ("010.1.0.0/24", False), (" 10.1.0.0/24", False), ("10.1.0.0/24\n", False),
    ("10.1.0.0/2\u0664", False), ("\uff11\uff10.1.0.0/24", False),
    ("127.0.0.0/8", False), ("224.0.0.0/24", False), ("240.0.0.0/8", False),
    ("0.0.0.0/8", False), ("fd00::/64", False), ("", False), (None, False), (167837696, False),
])
def test_network_subnet(subnet: Any, ok: bool) -> None:
    assert (check_value("networks", "appnet", {**NET, "subnet": subnet}) is None) == ok


def test_network_create_uses_the_same_subnet_rule() -> None:
    assert str(parse_subnet("10.1.0.0/24")) == "10.1.0.0/24"
    for bad in ("10.0.0.0/33", "10.1.0.0/30", "8.0.0.0/7", "127.0.0.0/8", "224.0.0.0/4"):
        with pytest.raises(NetworkError):
            parse_subnet(bad)
    # what network create stores always passes
    net = Network("n", vni_hash("n"), str(parse_subnet("10.9.0.0/16")))
    assert check_value("networks", "n", net.to_value()) is None


def test_network_encrypted_and_extras() -> None:
    assert check_value("networks", "appnet", with_(NET, "encrypted", DELETE)) is None
    assert check_value("networks", "appnet", {**NET, "encrypted": 1}) is not None
    assert check_value("networks", "appnet", {**NET, "encrypted": "yes"}) is not None
    # a newer agent's extra field is fine
    assert check_value("networks", "appnet", {**NET, "mtu": 1400, "labels": {"a": [1]}}) is None


# ---- services ------------------------------------------------------------------------------


@pytest.mark.parametrize(("replicas", "ok"), [
    (0, True), (1, True), (MAX_REPLICAS, True), (MAX_REPLICAS + 1, False), (10**12, False),
    (-1, False), (True, False), (3.0, False), ("3", False), (None, False), (2**64, False),
])
def test_service_replicas(replicas: Any, ok: bool) -> None:
    assert (check_value("services", "web", {**SVC, "replicas": replicas}) is None) == ok


def test_replicas_bound_lives_in_the_spec_type() -> None:
    assert ServiceSpec("web", MAX_REPLICAS).replicas == MAX_REPLICAS
    with pytest.raises(PlacementError, match="10000"):
        ServiceSpec("web", MAX_REPLICAS + 1)
    with pytest.raises(PlacementError):
        ServiceSpec("web", 10**12)


def test_service_mode_network_spec() -> None:
    assert check_value("services", "web", {**SVC, "mode": "global", "replicas": 0}) is None
    assert check_value("services", "web", {**SVC, "mode": "spread"}) is not None
    assert check_value("services", "web", {**SVC, "network": "other"}) is not None  # != spec's
    assert check_value("services", "web", {**SVC, "network": "com"}) is not None
    assert check_value("services", "web", {**SVC, "spec": []}) is not None
    assert check_value("services", "web", with_(SVC, "spec", DELETE)) is not None  # no command
    for nets in ([], "appnet", ["appnet", 3], ["appnet"] * 17, None):
        assert check_value("services", "web", with_(SVC, "spec.networks", nets)) is not None
    assert check_value("services", "web", with_(SVC, "spec.networks", ["appnet", "b"])) is None
    # extras at the top and in the spec are a newer agent's, and fine
    assert check_value("services", "web", {**SVC, "labels": {"x": "y"}}) is None
    assert check_value("services", "web", with_(SVC, "spec.healthcheck", {"cmd": []})) is None


@pytest.mark.parametrize(("restart", "ok"), [
    (None, True), ({}, True), ({"condition": "none"}, True), ({"condition": "on-failure"}, True),
    ({"condition": "sometimes"}, False), ({"condition": None}, False),
    ({"jitter": 1}, False),  # an unknown key: Restart(**policy) would raise TypeError
    ({"delay": 0}, True), ({"delay": 86400}, True), ({"delay": 86401}, False),
    ({"delay": -1}, False), ({"delay": float("nan")}, False), ({"delay": float("inf")}, False),
    ({"delay": "1"}, False), ({"delay": True}, False),
    ({"backoff": 1}, True), ({"backoff": 0.5}, False), ({"backoff": 101}, False),
    ({"max_delay": 30.5}, True), ({"max_delay": 1e300}, False),
    ({"max_attempts": 0}, True), ({"max_attempts": 5}, True), ({"max_attempts": -1}, False),
    ({"max_attempts": 1.5}, False), ({"max_attempts": 10**7}, False),
    ("any", False), ([], False),
])
def test_service_restart_policy(restart: Any, ok: bool) -> None:
    assert (check_value("services", "web", with_(SVC, "spec.restart", restart)) is None) == ok


def test_restart_policy_completes_defaults() -> None:
    assert restart_policy(None) == dict(RESTART_DEFAULTS)
    got = restart_policy({"condition": "none", "delay": 2})
    assert got == {**RESTART_DEFAULTS, "condition": "none", "delay": 2.0}
    with pytest.raises(ValidationError, match="unknown key"):
        restart_policy({"jitter": 1})


@pytest.mark.parametrize(("command", "ok"), [
    (["true"], True), ([""], True), (["a"] * MAX_COMMAND_ARGS, True),
    (["a"] * (MAX_COMMAND_ARGS + 1), False), ([], False), (None, False), ("true", False),
    (["a", 1], False), (["a\0b"], False), ([b"true"], False), (["x" * 20000], False),
])
def test_service_command(command: Any, ok: bool) -> None:
    assert (check_value("services", "web", with_(SVC, "spec.command", command)) is None) == ok


@pytest.mark.parametrize(("env", "ok"), [
    ({}, True), (None, True), ({"A": ""}, True), ({f"K{i}": "v" for i in range(MAX_ENV)}, True),
    ({f"K{i}": "v" for i in range(MAX_ENV + 1)}, False), (["A=b"], False), ({"A": 1}, False),
    ({"": "x"}, False), ({"A=B": "x"}, False), ({"A": "x\0"}, False), ({"A\0": "x"}, False),
])
def test_service_env(env: Any, ok: bool) -> None:
    assert (check_value("services", "web", with_(SVC, "spec.env", env)) is None) == ok


@pytest.mark.parametrize(("constraints", "ok"), [
    ([], True), (None, True), (["node.labels.zone==a", "node.name!=h2"], True),
    (["node.colour~red"], False), (["node.name==a==b"], False), ([3], False), ("x", False),
    (["node.name==h1"] * 65, False),
])
def test_service_constraints(constraints: Any, ok: bool) -> None:
    value = with_(SVC, "spec.constraints", constraints)
    assert (check_value("services", "web", value) is None) == ok


@pytest.mark.parametrize(("mpn", "ok"), [
    (None, True), (1, True), (MAX_REPLICAS, True), (0, False), (-1, False), (True, False),
    (1.0, False), (MAX_REPLICAS + 1, False),
])
def test_service_max_per_node(mpn: Any, ok: bool) -> None:
    assert (check_value("services", "web", with_(SVC, "spec.max_per_node", mpn)) is None) == ok


@pytest.mark.parametrize(("containment", "ok"), [
    (None, True), ({}, True), ({"memory": 67108864, "cap_add": ["NET_ADMIN"]}, True),
    ({"bogus": 1}, False), ({"memory": 1}, False), ({"cap_add": ["FLY"]}, False), ("x", False),
    ({"pids": 2**70}, False), ({"cpus": float("nan")}, False),
    ({"mounts": [{"source": "/a", "target": "/proc"}]}, False),
])
def test_service_containment(containment: Any, ok: bool) -> None:
    value = with_(SVC, "spec.containment", containment)
    assert (check_value("services", "web", value) is None) == ok


def test_parse_spec_and_replicated_check_agree() -> None:
    args: dict[str, Any] = {
        "name": "web", "networks": ["appnet"], "replicas": 3, "command": ["sh", "-c", "x"],
        "env": ["A=b"], "constraints": ["node.name==h1"], "max_per_node": 2,
        "restart_condition": "on-failure", "limit_memory": "64M", "cap_add": ["NET_ADMIN"],
        "mounts": ["type=bind,source=/tmp,target=/mnt,readonly"],
    }
    svc = parse_spec(args, {"appnet"})
    assert check_value("services", "web", svc.to_value()) is None
    glob = parse_spec({**args, "mode": "global", "replicas": None}, {"appnet"})
    assert check_value("services", "web", glob.to_value()) is None
    for bad, says in [
        ({"replicas": 10**12}, "replicas"), ({"replicas": MAX_REPLICAS + 1}, "replicas"),
        ({"replicas": True}, "replicas"), ({"command": []}, "command"),
        ({"command": ["a\0"]}, "command"), ({"command": ["a"] * 2000}, "command"),
        ({"max_per_node": 0}, "max-per-node"), ({"restart_condition": "x"}, "restart"),
        ({"constraints": ["node.colour~red"]}, "constraint"), ({"name": "web\u0661"}, "name"),
        ({"max_attempts": "3"}, "max_attempts"), ({"max_attempts": -1}, "max_attempts"),
    ]:
        with pytest.raises(OpError, match=says):
            parse_spec({**args, **bad}, {"appnet"})


# ---- endpoints -----------------------------------------------------------------------------


@pytest.mark.parametrize(("mac", "ok"), [
    ("02:42:0a:01:00:05", True), ("aa:bb:cc:dd:ee:f0", True),
    ("zz", False), ("02:42:0A:01:00:05", False), ("02-42-0a-01-00-05", False),
    ("2:42:a:1:0:5", False), ("02:42:0a:01:00:05\n", False), ("02:42:0a:01:00", False),
    ("01:00:5e:00:00:01", False),  # multicast
    ("ff:ff:ff:ff:ff:ff", False), ("00:00:00:00:00:00", False), (None, False),
    (0x02420a010005, False), ("02:42:0a:01:00:\u0665\u0665", False),
])
def test_endpoint_mac(mac: Any, ok: bool) -> None:
    assert (check_value("endpoints", "appnet/web.1", {**EP, "mac": mac}) is None) == ok


@pytest.mark.parametrize(("ip", "ok"), [
    ("10.1.0.5", True), ("192.0.2.1", True), ("10.1.0.256", False), ("010.1.0.5", False),
    (" 10.1.0.5", False), ("10.1.0.5\n", False), ("10.1.0", False), ("::1", False),
    ("0.0.0.0", False), ("255.255.255.255", False), ("224.0.0.1", False), ("127.0.0.1", False),
    ("\u0661.1.1.1", False), (None, False), (167837701, False),
])
def test_endpoint_ip(ip: Any, ok: bool) -> None:
    assert (check_value("endpoints", "appnet/web.1", {**EP, "ip": ip}) is None) == ok


def test_endpoint_fields() -> None:
    ok = check_value
    for name in ("web.1", "run-1a2b3c", "db", "web.4294967295"):
        assert ok("endpoints", f"appnet/{name}", {**EP, "name": name}) is None, name
    for name in ("web.x", "web.1.2", ".1", "web.", "com.1", "web.12345678901", "we b", 3):
        assert ok("endpoints", f"appnet/{name}", {**EP, "name": name}) is not None, name
    assert ok("endpoints", "appnet/web.1", {**EP, "service": None, "slot": None}) is None
    bad_fields: list[tuple[str, Any]] = [
        ("service", 3), ("service", "we b"), ("slot", -1), ("slot", True), ("slot", 2**31),
        ("slot", "1"), ("pending", 1), ("prefixlen", 33), ("prefixlen", "24"), ("sandbox", 3),
        ("sandbox", "x\0"), ("containment", []), ("containment", {"capabilities": ["FLY"]}),
        ("containment", {"limits": {"memory": "1g"}}), ("containment", {"limits": {"x": 1}}),
        ("containment", {"mounts": "a"}), ("containment", {"user": 0}), ("node", "h 1"),
        ("node", ""), ("node", None), ("network", "com"),
    ]
    for field, value in bad_fields:
        assert ok("endpoints", "appnet/web.1", {**EP, field: value}) is not None, (field, value)
    assert ok("endpoints", "appnet/web.1", with_(EP, "pending", DELETE)) is None
    assert ok("endpoints", "appnet/web.1", {**EP, "weight": 3}) is None  # a newer field


def test_what_the_agent_publishes_passes() -> None:
    ip = "10.1.0.9"
    ep = Endpoint("web.7", "appnet", ip, mac_for_ip(ip), "node-a.example", "web", 7,
                  {"pending": True, "sandbox": "mns-node-a.example-web.7", "prefixlen": 24})
    key = f"{ep.key}@node-a.example"
    assert check_value("endpoints", key, ep.to_value()) is None
    c = Containment(cap_add=("NET_ADMIN",), user="1000:1000", memory=64 << 20, cpus=0.5,
                    pids=100, mounts=(Mount("/a", "/b", True),))
    value = {**ep.to_value(), "containment": c.summary()}
    value.pop("pending")
    assert check_value("endpoints", key, value) is None
    run = Endpoint("run-0a1b2c", "appnet", ip, mac_for_ip(ip), "h1",
                   extra={"sandbox": "", "prefixlen": 24, "pending": True})
    assert check_value("endpoints", f"{run.key}@h1", run.to_value()) is None
    row = {"task": "web.7", "service": "web", "slot": 7, "node": "h1", "state": "failed",
           "ip": None, "exit_code": 137, "restarts": 3, **c.summary()}
    assert check_value("tasks", "web.7@h1", row) is None
    assert check_value("tasks", "web.7@h1", {**row, **Containment().summary()}) is None


# ---- tasks ---------------------------------------------------------------------------------


def test_task_rows() -> None:
    ok = check_value
    assert ok("tasks", "web.1@h1", with_(TASK, "user", DELETE)) is None
    for field, value in [
        ("task", "web.2"), ("task", "web"), ("task", 3), ("service", "db"), ("slot", 2),
        ("slot", "1"), ("node", "h 1"), ("state", "Running"), ("state", ""), ("state", 3),
        ("ip", "x"), ("exit_code", "1"), ("exit_code", 2**40), ("restarts", -1),
        ("restarts", 1.0), ("capabilities", "ALL"), ("limits", []), ("mounts", [1]),
    ]:
        assert ok("tasks", "web.1@h1", {**TASK, field: value}) is not None, (field, value)
    assert ok("tasks", "web.1@h1", {**TASK, "state": "new-state"}) is None  # a newer agent's


def test_unknown_tables_refused() -> None:
    for table in ("volumes", "t", "", "networks ", "Networks"):
        assert check_value(table, "k", {}) is not None


def test_validation_error_is_a_value_error() -> None:
    assert issubclass(ValidationError, ValueError)
