"""The schema of the replicated tables: one set of rules for local input and for what peers send.

``check_value(table, key, data)`` is the store's validator (``StoreConfig.validator``): None if
the value may be stored, else a short reason such as ``services/web: replicas 1000000000000 >
10000``. The store calls it on every write, local or remote, before the value is stored, so no
loop of the agent ever sees a value that fails it. It is a pure function of its arguments (no
clock, no other entries, no host state), so every replica refuses exactly the same writes; rules
that need other entries (a service's network exists, two subnets do not overlap) are the control
API's, checked where a user writes.

The same rules serve local input: ``network create`` uses ``networks.check_name`` and
``networks.parse_subnet``, ``service create`` (agent/services.py ``parse_spec``) builds its value
with the helpers below and then checks it whole with ``check_value``, and the placement core
refuses ``replicas`` beyond ``MAX_REPLICAS`` in ``ServiceSpec`` itself.

Forward compatibility: fields this version does not know are allowed at the top level of every
table and in a service's spec (a newer agent may add some; ``tables.py`` keeps them), but never
inside a restart policy or a containment spec, whose readers take every key they are given.

Names are ASCII (``str.isalnum``/``isdigit`` accept any script's letters and digits) and every
pattern is matched with ``fullmatch`` (``$`` also matches before a trailing newline).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping
from typing import Any

from meshnet.containment import CAP_NUMBERS, MAX_CAP_ITEMS, MAX_MOUNTS, MAX_PATH, ContainmentError
from meshnet.containment import from_value as containment_from_value
from meshnet.health import HEALTH_STATES, HealthError, HealthSpec
from meshnet.lb.core import DNSRR, ENDPOINT_MODES, VIP_CLAIM_KIND, vip_claim_name, vip_usable
from meshnet.placement.core import GLOBAL_SLOTS
from meshnet.placement.spec import (
    MAX_REPLICAS,
    MODES,
    PlacementError,
    ServiceSpec,
    parse_constraint,
)
from meshnet.state.networks import (
    NAME_RE,
    RESERVED_NAMES,
    VNI_LIMIT,
    VNI_MIN,
    NetworkError,
    check_name,
    parse_subnet,
)
from meshnet.state.ports import HOST_KIND, PortError, check_ports, host_endpoint_name
from meshnet.state.rolling import (
    MAX_VERSION,
    RollingError,
    check_message,
    check_rollback,
    update_config,
)
from meshnet.state.tables import ENDPOINTS, NETWORKS, SERVICES

__all__ = [
    "CERTS",
    "KNOWN_TABLES",
    "MAX_CERT_BYTES",
    "MAX_COMMAND_ARGS",
    "MAX_CONSTRAINTS",
    "MAX_ENV",
    "MAX_SERVICE_NETWORKS",
    "RESTART_CONDITIONS",
    "RESTART_DEFAULTS",
    "REVOCATIONS",
    "TASKS",
    "ValidationError",
    "check_command",
    "check_constraints",
    "check_env",
    "check_ipv4",
    "check_mac",
    "check_value",
    "restart_policy",
]

TASKS = "tasks"  # written by agent/services.py: one row per task, owned by the node running it
# Node certificates and their revocations, replicated so every agent can check every writer. Only
# their shape is checked here; their content (the CA's signature, names, serials, dates) is the
# identity layer's, checked by the store's authorizer.
CERTS = "certs"  # key <node>/<serial>, value {"cert": the certificate's bytes}
REVOCATIONS = "revocations"  # key <node>/<serial | all>/<issued_at>, value {"revocation": bytes}
KNOWN_TABLES = frozenset({NETWORKS, SERVICES, ENDPOINTS, TASKS, CERTS, REVOCATIONS})

RESTART_CONDITIONS = ("none", "on-failure", "any")
# The policy a spec without one gets (Docker's: always restart, 1 s doubling to 30 s).
RESTART_DEFAULTS: Mapping[str, Any] = {"condition": "any", "delay": 1.0, "max_attempts": 0,
                                       "backoff": 2.0, "max_delay": 30.0}
# Bounds of a restart policy: a delay of a day or a backoff of 100x is already no restart at all.
MAX_RESTART_DELAY_S = 86_400.0
MAX_RESTART_BACKOFF = 100.0
MAX_RESTART_ATTEMPTS = 1_000_000
# A command's arguments: far more than any real command line; the whole value is at most 64 KiB.
MAX_COMMAND_ARGS = 1024
MAX_ARG_CHARS = 16 * 1024
# --env items (agent/sandboxes.py MAX_ENV has the same value for `run`).
MAX_ENV = 256
MAX_ENV_CHARS = 16 * 1024
MAX_CONSTRAINTS = 64
MAX_CONSTRAINT_CHARS = 512
# Networks one service attaches to (a task gets one interface per network).
MAX_SERVICE_NETWORKS = 16
# A task's state word ("starting", "running", "complete", "failed"; newer agents may add some).
_STATE_RE = re.compile(r"[a-z][a-z-]{0,31}")
# Node names: membership names, as config.py allows them (one DNS label, dots allowed inside).
_NODE_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
# Endpoint kinds (`kind`; absent: a task's or a sandbox's): a host's own address on a network
# (issue 17, published ports) or a service's virtual IP claim.
ENDPOINT_KINDS = (HOST_KIND, "vip")
# A task's name: its service and slot.
_TASK_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_-]{0,62})\.([0-9]{1,10})")
# What mac_for_ip makes and the kernel shows: six lower-case hex pairs.
_MAC_RE = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_IPV4_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
# A network namespace name the agent made (mns-<node>-<name>, cut to 64).
MAX_SANDBOX_CHARS = 255
MAX_USER_CHARS = 80
_LIMIT_KEYS = frozenset({"memory", "cpus", "pids"})
# An encoded certificate or revocation: an Ed25519 certificate (keys, a 64-byte signature, the
# name, roles and a few labels) is a few hundred bytes; 2 KiB leaves room for labels while keeping
# a table of a thousand nodes' certificates small.
MAX_CERT_BYTES = 2048
# A certificate's serial: 128 bits as 32 lower-case hex digits.
_SERIAL_RE = re.compile(r"[0-9a-f]{32}")
# A revocation's issue time: Unix seconds, decimal, canonical (no sign, no leading zero); 12
# digits reach the year 33658.
_ISSUED_AT_RE = re.compile(r"0|[1-9][0-9]{0,11}")
# A Unix time a record may carry (a task's `since`): up to the year 33658, as _ISSUED_AT_RE.
MAX_UNIX_TIME = 1e12


class ValidationError(ValueError):
    """A value breaks the schema; the message says what, in one line."""


def _fail(msg: str) -> ValidationError:
    return ValidationError(msg)


def _show(value: object, limit: int = 40) -> str:
    """A value for a reason: short, printable, never the whole of a 64 KiB string."""
    if isinstance(value, str):
        text = value[:limit]
        return text if text.isascii() and text.isprintable() and text == value else repr(text)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 10 ** 30:
        return str(value)
    return type(value).__name__


# ---- scalars ---------------------------------------------------------------------------------


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if type(value) is not int:
        raise _fail(f"{what} must be an integer, not {_show(value)}")
    if value < lo:
        raise _fail(f"{what} {_show(value)} < {lo}")
    if value > hi:
        raise _fail(f"{what} {_show(value)} > {hi}")
    return value


def _number(value: object, what: str, lo: float, hi: float) -> float:
    if type(value) not in (int, float):
        raise _fail(f"{what} must be a number, not {_show(value)}")
    assert isinstance(value, int | float)
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(f"{what} must be finite")
    if not lo <= value <= hi:
        raise _fail(f"{what} {_show(value) if type(value) is int else value!r} is outside "
                    f"{lo:g}..{hi:g}")
    return float(value)


def _bool(value: object, what: str) -> bool:
    if type(value) is not bool:
        raise _fail(f"{what} must be true or false, not {_show(value)}")
    return value


def _text(value: object, what: str, max_chars: int, allow_empty: bool = False) -> str:
    if type(value) is not str:
        raise _fail(f"{what} must be a string, not {_show(value)}")
    if not value and not allow_empty:
        raise _fail(f"{what} is empty")
    if len(value) > max_chars:
        raise _fail(f"{what} is longer than {max_chars}")
    if "\0" in value:
        raise _fail(f"{what} holds a NUL")
    return value


def _name(kind: str, value: object) -> str:
    """A network/service/sandbox name: networks.check_name, with its message."""
    try:
        return check_name(kind, value)
    except NetworkError as e:
        raise _fail(str(e)) from None


def _node(value: object, what: str = "node") -> str:
    if type(value) is not str or not _NODE_RE.fullmatch(value):
        raise _fail(f"{what} {_show(value)} is not a node name")
    return value


def check_ipv4(value: object, what: str = "ip") -> str:
    """IPv4 text in its canonical form (so every replica reads the same address), a unicast
    address a host can hold: not 0.0.0.0, 255.255.255.255, multicast or loopback."""
    if type(value) is not str or not _IPV4_RE.fullmatch(value):
        raise _fail(f"{what} {_show(value)} is not an IPv4 address")
    try:
        addr = ipaddress.IPv4Address(value)
    except ValueError:
        raise _fail(f"{what} {_show(value)} is not an IPv4 address") from None
    if str(addr) != value:
        raise _fail(f"{what} {_show(value)} is not in canonical form")
    if addr.is_unspecified or addr.is_multicast or addr.is_loopback or \
            addr == ipaddress.IPv4Address("255.255.255.255"):
        raise _fail(f"{what} {value} is not a unicast host address")
    return value


def check_mac(value: object, what: str = "mac") -> str:
    """The form mac_for_ip makes and platform/links.py's norm_mac gives back (aa:bb:..:ff, lower
    case), a unicast address that is not all zeros."""
    if type(value) is not str or not _MAC_RE.fullmatch(value):
        raise _fail(f"{what} {_show(value)} is not a MAC address like 02:42:0a:00:00:02")
    if int(value[:2], 16) & 1 or value == "00:00:00:00:00:00":
        raise _fail(f"{what} {value} is not a unicast address")
    return value


def check_subnet(value: object) -> str:
    """A network's subnet as stored: networks.parse_subnet's rule (the one `network create`
    applies), in canonical form."""
    if type(value) is not str:
        raise _fail(f"subnet must be a string, not {_show(value)}")
    try:
        net = parse_subnet(value)
    except NetworkError as e:
        raise _fail(str(e).replace("--subnet ", "subnet ", 1)) from None
    if str(net) != value:
        raise _fail(f"subnet {_show(value)} is not in canonical form ({net})")
    return value


# ---- service specs (shared with agent/services.py parse_spec) -----------------------------------


def check_command(value: object) -> list[str]:
    """A task's argv: 1..MAX_COMMAND_ARGS strings, none holding a NUL."""
    if type(value) is not list or not value:
        raise _fail("command must be a non-empty list of strings")
    if len(value) > MAX_COMMAND_ARGS:
        raise _fail(f"command has {len(value)} arguments > {MAX_COMMAND_ARGS}")
    for arg in value:
        _text(arg, "command argument", MAX_ARG_CHARS, allow_empty=True)
    return value


def check_env(value: object) -> dict[str, str]:
    """A spec's environment: at most MAX_ENV names (non-empty, no = or NUL) -> strings."""
    if type(value) is not dict:
        raise _fail(f"env must be a map of strings, not {_show(value)}")
    if len(value) > MAX_ENV:
        raise _fail(f"env has {len(value)} items > {MAX_ENV}")
    for k, v in value.items():
        _text(k, "env name", MAX_ENV_CHARS)
        if "=" in k:
            raise _fail(f"env name {_show(k)} holds =")
        _text(v, f"env {_show(k)}", MAX_ENV_CHARS, allow_empty=True)
    return value


def check_constraints(value: object) -> list[str]:
    """Placement constraints: strings placement.parse_constraint reads."""
    if type(value) is not list:
        raise _fail(f"constraints must be a list of strings, not {_show(value)}")
    if len(value) > MAX_CONSTRAINTS:
        raise _fail(f"{len(value)} constraints > {MAX_CONSTRAINTS}")
    for c in value:
        _text(c, "constraint", MAX_CONSTRAINT_CHARS)
        try:
            parse_constraint(c)
        except PlacementError as e:
            raise _fail(str(e)) from None
    return value


def restart_policy(value: object) -> dict[str, Any]:
    """A restart policy (the spec's ``restart``; None or absent: the defaults), checked and
    completed with the defaults: condition none|on-failure|any, delay and max_delay 0..1 day,
    backoff 1..100, max_attempts 0..10^6 (0: unlimited). No other keys."""
    if value is None:
        return dict(RESTART_DEFAULTS)
    if type(value) is not dict:
        raise _fail(f"restart must be a map, not {_show(value)}")
    unknown = sorted(_show(k) for k in value if k not in RESTART_DEFAULTS)
    if unknown:
        raise _fail(f"restart: unknown key {unknown[0]}")
    out = dict(RESTART_DEFAULTS)
    cond = value.get("condition", out["condition"])
    if cond not in RESTART_CONDITIONS:
        raise _fail(f"restart condition {_show(cond)} is not one of "
                    f"{', '.join(RESTART_CONDITIONS)}")
    out["condition"] = cond
    for key in ("delay", "max_delay"):
        if key in value:
            out[key] = _number(value[key], f"restart {key}", 0.0, MAX_RESTART_DELAY_S)
    if "backoff" in value:
        out["backoff"] = _number(value["backoff"], "restart backoff", 1.0, MAX_RESTART_BACKOFF)
    if "max_attempts" in value:
        out["max_attempts"] = _int(value["max_attempts"], "restart max_attempts", 0,
                                   MAX_RESTART_ATTEMPTS)
    return out


def _check_spec(spec: Mapping[str, Any], name: str, network: str, mode: str,
                replicas: int) -> None:
    nets = spec.get("networks")
    if type(nets) is not list or not nets:
        raise _fail("spec networks must be a non-empty list")
    if len(nets) > MAX_SERVICE_NETWORKS:
        raise _fail(f"{len(nets)} networks > {MAX_SERVICE_NETWORKS}")
    for n in nets:
        _name("network", n)
    if nets[0] != network:
        raise _fail(f"network {_show(network)} is not the spec's first network")
    check_command(spec.get("command"))
    if spec.get("env") is not None:
        check_env(spec.get("env"))
    raw_constraints = spec.get("constraints")
    constraints = [] if raw_constraints is None else check_constraints(raw_constraints)
    mpn = spec.get("max_per_node")
    if mpn is not None:
        _int(mpn, "max_per_node", 1, MAX_REPLICAS)
    restart_policy(spec.get("restart"))
    if spec.get("health") is not None:  # issue 17: meshnet/health.py has the rules
        try:
            HealthSpec.from_value(spec["health"])
        except HealthError as e:
            raise _fail(str(e)) from None
    try:
        containment_from_value(spec.get("containment"))
    except ContainmentError as e:
        raise _fail(str(e)) from None
    except (TypeError, ValueError, OverflowError):  # containment.py's own bug: still refused
        raise _fail("containment is unreadable") from None
    try:  # what the scheduler will build from it (agent/services.py to_placement)
        ServiceSpec(name=name, replicas=replicas, mode=mode,
                    constraints=tuple(parse_constraint(c) for c in constraints),
                    max_per_node=mpn)
    except PlacementError as e:
        raise _fail(str(e).replace(f"service {name}: ", "", 1)) from None


# ---- tables ----------------------------------------------------------------------------------


def _networks(key: str, d: Mapping[str, Any]) -> None:
    name = _name("network", d.get("name"))
    if key != name:
        raise _fail(f"key is not the network's name {_show(name)}")
    _int(d.get("vni"), "vni", VNI_MIN, VNI_LIMIT - 1)
    check_subnet(d.get("subnet"))
    if "encrypted" in d:
        _bool(d["encrypted"], "encrypted")


def _services(key: str, d: Mapping[str, Any]) -> None:
    name = _name("service", d.get("name"))
    if key != name:
        raise _fail(f"key is not the service's name {_show(name)}")
    network = _name("network", d.get("network"))
    mode = d.get("mode", "replicated")
    if mode not in MODES:
        raise _fail(f"mode {_show(mode)} is not replicated or global")
    replicas = _int(d.get("replicas", 1), "replicas", 0, MAX_REPLICAS)
    spec = d.get("spec", {})
    if type(spec) is not dict:
        raise _fail(f"spec must be a map, not {_show(spec)}")
    _check_spec(spec, name, network, mode, replicas)
    if "ports" in d:  # published ports (issue 17; state/ports.py)
        try:
            check_ports(d["ports"])
        except PortError as e:
            raise _fail(str(e)) from None
    _rolling(d, name, network, mode, replicas)
    _endpoint_mode(d, spec["networks"])


def _endpoint_mode(d: Mapping[str, Any], networks: list[str]) -> None:
    """`endpoint_mode` (issue 17; absent: dnsrr, as records of older agents) and `vips`: a vip
    service holds one VIP per network of its spec, canonical unicast IPv4; a dnsrr one none.
    Whether a VIP lies in its network's subnet needs the network's entry: lb/core.py
    vip_usable checks it where the VIP is used (DNS, the kernel's maps)."""
    mode = d.get("endpoint_mode", DNSRR)
    if mode not in ENDPOINT_MODES:
        raise _fail(f"endpoint_mode {_show(mode)} is not one of {', '.join(ENDPOINT_MODES)}")
    vips = d.get("vips")
    if mode == DNSRR:
        if "vips" in d:
            raise _fail("a dnsrr service has no vips")
        return
    if type(vips) is not dict:
        raise _fail(f"vips must be a map of network to IPv4, not {_show(vips)}")
    if set(vips) != set(networks):
        raise _fail("vips must hold one VIP for each network of the spec")
    for network, ip in vips.items():
        check_ipv4(ip, f"vip on {_show(network)}")


def _rolling(d: Mapping[str, Any], name: str, network: str, mode: str, replicas: int) -> None:
    """A service's rolling-update fields (issue 17; state/rolling.py has the rule): `version`,
    `previous` (the spec rolled from, checked as a spec), `update_config`, `rollback`."""
    version = _int(d.get("version", 1), "version", 1, MAX_VERSION)
    try:
        update_config(d.get("update_config"))
        if "rollback" in d:
            check_rollback(d["rollback"], version)
    except RollingError as e:
        raise _fail(str(e)) from None
    prev = d.get("previous")
    if prev is None:
        return
    if type(prev) is not dict or not {"spec", "version"} <= set(prev) or \
            not set(prev) <= {"spec", "version", "replicas"}:
        raise _fail("previous must be a map of spec, version and replicas")
    _int(prev["version"], "previous version", 1, version - 1)
    prev_replicas = _int(prev.get("replicas", replicas), "previous replicas", 0, MAX_REPLICAS)
    spec = prev["spec"]
    if type(spec) is not dict:
        raise _fail(f"previous spec must be a map, not {_show(spec)}")
    nets = spec.get("networks")
    first = nets[0] if type(nets) is list and nets else network
    try:
        _check_spec(spec, name, first if type(first) is str else network, mode, prev_replicas)
    except ValidationError as e:
        raise _fail(f"previous {e}") from None


def _summary(d: Mapping[str, Any]) -> None:
    """A task's containment summary (containment.Containment.summary) as published by the node
    running it: user, capabilities, limits, mounts; each optional."""
    if "user" in d:
        _text(d["user"], "user", MAX_USER_CHARS)
    caps = d.get("capabilities")
    if caps is not None and (type(caps) is not list or len(caps) > MAX_CAP_ITEMS or
                             not all(type(c) is str and c in CAP_NUMBERS for c in caps)):
        raise _fail("capabilities must be a list of capability names")
    limits = d.get("limits")
    if limits is not None:
        if type(limits) is not dict or not set(limits) <= _LIMIT_KEYS:
            raise _fail("limits must be a map of memory, cpus, pids")
        for k, v in limits.items():
            _number(v, f"limit {k}", 0, float(1 << 62))
    mounts = d.get("mounts")
    if mounts is not None:
        if type(mounts) is not list or len(mounts) > MAX_MOUNTS:
            raise _fail(f"mounts must be a list of at most {MAX_MOUNTS}")
        for m in mounts:
            _text(m, "mount", 2 * MAX_PATH + 8)


def _endpoint_name(value: object) -> str:
    """A sandbox's name (one label, e.g. run-1a2b3c) or a task's (<service>.<slot>)."""
    if type(value) is not str:
        raise _fail(f"endpoint name must be a string, not {_show(value)}")
    m = _TASK_RE.fullmatch(value)
    label = m.group(1) if m else value
    if not NAME_RE.fullmatch(label):
        raise _fail(f"endpoint name {_show(value)} must be a DNS label or <service>.<slot>")
    if label.lower() in RESERVED_NAMES:
        raise _fail(f"endpoint name {_show(value)} is reserved")
    return value


def _endpoints(key: str, d: Mapping[str, Any]) -> None:
    node = _node(d.get("node"))
    _life(d)
    kind = d.get("kind")
    if kind is not None and kind not in ENDPOINT_KINDS:
        raise _fail(f"endpoint kind {_show(kind)} is not one of {', '.join(ENDPOINT_KINDS)}")
    if kind == HOST_KIND:
        # A host's own address on a network (issue 17): named for its node, which it is the
        # only endpoint to be, so its key can never be a sandbox's or a task's.
        name = d.get("name")
        if name != host_endpoint_name(node):
            raise _fail(f"a host endpoint of {node} must be named {host_endpoint_name(node)}")
        if d.get("service") is not None or d.get("slot") is not None:
            raise _fail("a host endpoint has no service or slot")
    else:
        name = _endpoint_name(d.get("name"))
        if name == host_endpoint_name(node):
            raise _fail(f"endpoint name {name} is reserved for {node}'s own address")
    network = _name("network", d.get("network"))
    base = f"{network}/{name}"
    if key not in (base, f"{base}@{node}"):
        raise _fail(f"key is not {_show(base)}[@{_show(node)}]")
    check_ipv4(d.get("ip"))
    check_mac(d.get("mac"))
    service = d.get("service")
    if service is not None:
        _name("service", service)
    slot = d.get("slot")
    if slot is not None:
        _int(slot, "slot", 0, GLOBAL_SLOTS)
    if "pending" in d:
        _bool(d["pending"], "pending")
    if "prefixlen" in d:
        _int(d["prefixlen"], "prefixlen", 0, 32)
    if "sandbox" in d:
        _text(d["sandbox"], "sandbox", MAX_SANDBOX_CHARS, allow_empty=True)
    if "health" in d:
        _health(d["health"])
    if kind == VIP_CLAIM_KIND:
        _vip_claim(d, name, service, slot)
    if "containment" in d:
        c = d["containment"]
        if type(c) is not dict:
            raise _fail(f"containment must be a map, not {_show(c)}")
        _summary(c)


def _vip_claim(d: Mapping[str, Any], name: str, service: object, slot: object) -> None:
    """A service's VIP claim (agent/vips.py): named `<service>.0` for its service, no slot,
    and (when the claim says its prefix) a host address that is not the subnet's network,
    gateway (.1) or broadcast address."""
    if type(service) is not str or name != vip_claim_name(service) or slot is not None:
        raise _fail("a VIP claim is named <service>.0 for its service, with no slot")
    if "prefixlen" in d:
        net = ipaddress.IPv4Network(f"{d['ip']}/{d['prefixlen']}", strict=False)
        if not vip_usable(d["ip"], str(net)):
            raise _fail(f"VIP {d['ip']} is not a usable address of {net}")


def _health(value: object) -> None:
    """A task's (or its endpoint's) health: its check's status (meshnet/health.py)."""
    if value not in HEALTH_STATES:
        raise _fail(f"health {_show(value)} is not one of {', '.join(HEALTH_STATES)}")


def _life(d: Mapping[str, Any]) -> None:
    """The writer's life, if given (state/store.py LIFE_FIELD): its incarnation at start."""
    if "life" in d:
        _int(d["life"], "life", 0, (1 << 63) - 1)


def _tasks(key: str, d: Mapping[str, Any]) -> None:
    task = d.get("task")
    m = _TASK_RE.fullmatch(task) if type(task) is str else None
    if m is None:
        raise _fail(f"task {_show(task)} is not <service>.<slot>")
    service = _name("service", d.get("service"))
    slot = _int(d.get("slot"), "slot", 0, GLOBAL_SLOTS)
    if task != f"{service}.{slot}":
        raise _fail(f"task {_show(task)} is not {service}.{slot}")
    node = _node(d.get("node"))
    if key != f"{task}@{node}":
        raise _fail(f"key is not {task}@{node}")
    state = d.get("state")
    if type(state) is not str or not _STATE_RE.fullmatch(state):
        raise _fail(f"state {_show(state)} is not a task state")
    if d.get("ip") is not None:
        check_ipv4(d.get("ip"))
    if d.get("exit_code") is not None:
        _int(d.get("exit_code"), "exit_code", -(1 << 31), (1 << 31) - 1)
    if "restarts" in d:
        _int(d["restarts"], "restarts", 0, (1 << 63) - 1)
    if "health" in d:
        _health(d["health"])
    if "since" in d:
        _number(d["since"], "since", 0.0, MAX_UNIX_TIME)
    _life(d)
    if "version" in d:  # the service version it runs (issue 17, rolling updates)
        _int(d["version"], "version", 1, MAX_VERSION)
    if "update_failure" in d:
        try:
            check_message(d["update_failure"], "update_failure")
        except RollingError as e:
            raise _fail(str(e)) from None
    _summary(d)


def _blob(value: object, what: str) -> bytes:
    if type(value) is not bytes:
        raise _fail(f"{what} must be bytes, not {_show(value)}")
    if not 1 <= len(value) <= MAX_CERT_BYTES:
        raise _fail(f"{what} of {len(value)} bytes is outside 1..{MAX_CERT_BYTES}")
    return value


def _key_parts(key: str, n: int, shape: str) -> list[str]:
    parts = key.split("/")
    if len(parts) != n:
        raise _fail(f"key is not {shape}")
    return parts


def _certs(key: str, d: Mapping[str, Any]) -> None:
    node, serial = _key_parts(key, 2, "<node>/<serial>")
    _node(node, "key node")
    if not _SERIAL_RE.fullmatch(serial):
        raise _fail(f"key serial {_show(serial)} is not 32 lower-case hex digits")
    _blob(d.get("cert"), "cert")


def _revocations(key: str, d: Mapping[str, Any]) -> None:
    node, serial, issued_at = _key_parts(key, 3, "<node>/<serial|all>/<issued_at>")
    _node(node, "key node")
    if serial != "all" and not _SERIAL_RE.fullmatch(serial):
        raise _fail(f"key serial {_show(serial)} is not 32 lower-case hex digits or all")
    if not _ISSUED_AT_RE.fullmatch(issued_at):
        raise _fail(f"key issued_at {_show(issued_at)} is not decimal Unix seconds")
    _blob(d.get("revocation"), "revocation")


_TABLES = {NETWORKS: _networks, SERVICES: _services, ENDPOINTS: _endpoints, TASKS: _tasks,
           CERTS: _certs, REVOCATIONS: _revocations}


def check_value(table: str, key: str, data: Mapping[str, Any]) -> str | None:
    """None if ``data`` may be stored at (``table``, ``key``), else a one-line reason that
    starts with ``table/key:``. Pure, and it never raises for any decoded value (a map with
    string keys of anything msgpack carries)."""
    checker = _TABLES.get(table)
    where = f"{_show(table, 64)}/{_show(key, 64)}"
    if checker is None:
        return f"{where}: unknown table"
    try:
        checker(key, data)
    except ValidationError as e:
        return f"{where}: {e}"
    return None
