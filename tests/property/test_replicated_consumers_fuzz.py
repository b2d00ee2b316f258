"""Fuzz every consumer of replicated values (issue #14, "Fuzzing"): whatever msgpack values
arrive for the store's tables, each is either refused by the schema (state/validate.py, the
store's validator) or consumed without an exception by every loop and view that reads it:

- DNS record building (ClusterOps.refresh_dns) and the resolver's answers;
- the control views of networks and endpoints (ClusterOps), their VNIs;
- the plain overlay's reconcile pass (Overlay.reconcile, with a fake kernel);
- placement (Services.placement), the service views, and a task's start from its spec
  (Services._run_once up to the sandbox, and its restart policy);
- IPAM (Sandboxes._taken / _competitors, ipam.pick_address / beaten_by);
- certificates and revocations feeding the trust (Agent._learn_from_store).

The values are of three kinds: anything msgpack carries, near-valid values (one field changed),
and *valid but hostile* ones (the schema accepts them: names that fold alike, VNIs and subnets
that collide, addresses outside their subnet or shared, unknown fields of any shape, extreme
restart policies, constraints nothing satisfies, random certificate bytes). For valid values
the "second line" counters (records skipped, services unplaceable, bad endpoints, internal
errors) stay 0: the schema is what keeps bad values out, and it must keep all of them out.
A second test feeds the same consumers with no schema at all (values from before validation
existed): every reconcile pass must still survive, counting what it leaves out.
"""

from __future__ import annotations

import asyncio
import atexit
import ipaddress
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet import api
from meshnet.agent.agent import Agent
from meshnet.agent.cluster_ops import ClusterOps
from meshnet.agent.overlay import Overlay
from meshnet.agent.sandboxes import Sandboxes
from meshnet.agent.services import Restart, Services, Task
from meshnet.containment import CAP_NUMBERS
from meshnet.crypto.certs import generate_node_keys, make_ca, sign_node, sign_revocation
from meshnet.crypto.trust import Trust
from meshnet.dns import Resolver
from meshnet.placement import NodeInfo
from meshnet.placement.core import GLOBAL_SLOTS
from meshnet.platform.links import NetDevices, norm_ip, norm_mac
from meshnet.state import Entry, Hlc, Store, StoreConfig, codec
from meshnet.state.ipam import IpamExhausted, beaten_by, pick_address
from meshnet.state.networks import VNI_LIMIT, VNI_MIN
from meshnet.state.validate import (
    CERTS,
    KNOWN_TABLES,
    REVOCATIONS,
    TASKS,
    check_value,
    restart_policy,
)

T0 = 1_700_000_000
T0_MS = T0 * 1000
ME = "h1"
NODES = [NodeInfo("h1", {"zone": "a"}), NodeInfo("h2", {"zone": "b"}), NodeInfo("h3")]
VTEPS = {"h1": "192.0.2.1", "h2": "192.0.2.2", "h3": "192.0.2.3"}  # h4 is no member

# ---- values -------------------------------------------------------------------------------

TEXT = st.text(max_size=8) | st.sampled_from(
    ["n1", "web", "web.1", "10.1.0.5", "02:42:0a:01:00:05", "", "\u0661", "x\n", "-1", "com"])
SCALARS = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
           | st.floats(allow_nan=True) | TEXT | st.binary(max_size=8))
MSGPACK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)
EXTRA = st.dictionaries(st.sampled_from(["x", "future", "labels", "spec2"]), MSGPACK, max_size=2)

# Names that collide once folded (DNS is case-insensitive), the longest label, odd but legal.
NAMES = st.sampled_from(["n1", "N1", "web", "WEB", "db", "a" * 63, "x-_y", "0", "9z"])
NET_NAMES = st.sampled_from(["n1", "N1", "n2", "b" * 63])
NODE_NAMES = st.sampled_from(["h1", "h2", "h3", "h4", "h.1", "H2"])
SUBNETS = st.sampled_from(["10.1.0.0/24", "10.1.0.0/16", "10.0.0.0/8", "10.1.0.0/29",
                           "192.168.7.248/29", "172.16.0.0/12", "100.64.0.0/10"])
VNIS = st.sampled_from([VNI_MIN, VNI_LIMIT - 1, 5000]) | st.integers(VNI_MIN, VNI_LIMIT - 1)
# Canonical unicast addresses, in and out of the subnets above: the network and broadcast
# addresses, the gateway, one shared by many endpoints.
IPS = st.sampled_from(["10.1.0.5", "10.1.0.0", "10.1.0.255", "10.1.0.1", "10.1.255.254",
                       "1.2.3.4", "255.255.255.254", "0.0.0.1", "169.254.1.1"])
MACS = st.sampled_from(["02:42:0a:01:00:05", "00:00:00:00:00:01", "fe:ff:ff:ff:ff:ff",
                        "02:42:0a:01:00:06"])
CAPS = st.lists(st.sampled_from(sorted(CAP_NUMBERS)), max_size=3)
SUMMARY = st.fixed_dictionaries({}, optional={
    "user": st.sampled_from(["0", "nobody", "1000:1000", "\u00fc"]),
    "capabilities": CAPS,
    "limits": st.dictionaries(st.sampled_from(["memory", "cpus", "pids"]),
                              st.integers(0, 1 << 62) | st.floats(0, 1e6), max_size=3),
    "mounts": st.lists(st.sampled_from(["/a:/b", "/x:/y:ro"]), max_size=2),
})
CONSTRAINTS = st.lists(st.sampled_from(
    ["node.name==h1", "node.name!=h1", "node.labels.zone==a", "node.labels.zone!=b",
     "node.name==nobody", "node.hostname==h2", "node.labels.gpu==yes"]), max_size=3)
RESTART = st.none() | st.fixed_dictionaries({}, optional={
    "condition": st.sampled_from(["none", "on-failure", "any"]),
    "delay": st.sampled_from([0, 0.0, 86_400.0, 1e-300]),
    "max_delay": st.sampled_from([0.0, 86_400, 5e-324]),
    "backoff": st.sampled_from([1, 100.0, 1.0000001]),
    "max_attempts": st.sampled_from([0, 1, 1_000_000]),
})
CONTAINMENT = st.none() | st.fixed_dictionaries({}, optional={
    "cap_add": CAPS, "cap_drop": CAPS | st.just(["ALL"]),
    "user": st.sampled_from(["0", "65534", "0:0"]),
    "memory": st.sampled_from([4 << 20, 1 << 40, "64m"]),
    "cpus": st.sampled_from([0.01, 1, 64.0]), "pids": st.sampled_from([1, 4096]),
    "mounts": st.just([]),
})
COMMAND = st.lists(st.text(max_size=12) | st.sampled_from(["", "-", "$(x)", "\u202e"]),
                   min_size=1, max_size=4)
ENV = st.dictionaries(st.sampled_from(["A", "PATH", "\u00e9", "_", "a b"]),
                      st.text(max_size=12), max_size=3)


@st.composite
def networks(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    name = draw(NET_NAMES)
    value = {**draw(EXTRA), "name": name, "vni": draw(VNIS), "subnet": draw(SUBNETS)}
    if draw(st.booleans()):
        value["encrypted"] = draw(st.booleans())
    return "networks", name, value


@st.composite
def services(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    name = draw(NAMES)
    nets = draw(st.lists(NET_NAMES, min_size=1, max_size=3))
    mode = draw(st.sampled_from(["replicated", "global"]))
    spec: dict[str, Any] = {**draw(EXTRA), "networks": nets, "command": draw(COMMAND)}
    for field, strategy in (("env", ENV), ("constraints", CONSTRAINTS),
                            ("max_per_node", st.sampled_from([None, 1, 2, 10_000])),
                            ("restart", RESTART), ("containment", CONTAINMENT)):
        if draw(st.booleans()):
            spec[field] = draw(strategy)
    value = {**draw(EXTRA), "name": name, "network": nets[0], "mode": mode,
             "replicas": draw(st.sampled_from([0, 1, 3, 40])), "spec": spec}
    return "services", name, value


@st.composite
def endpoints(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    service = draw(st.none() | NAMES)
    slot = draw(st.none() | st.sampled_from([0, 1, 2, GLOBAL_SLOTS]))
    name = f"{service}.{slot}" if service and slot is not None and draw(st.booleans()) \
        else draw(NAMES)
    network, node = draw(NET_NAMES), draw(NODE_NAMES)
    value: dict[str, Any] = {**draw(EXTRA), "name": name, "network": network, "node": node,
                             "ip": draw(IPS), "mac": draw(MACS), "service": service,
                             "slot": slot}
    for field, strategy in (("pending", st.booleans()), ("prefixlen", st.integers(0, 32)),
                            ("sandbox", st.text(max_size=10)), ("containment", SUMMARY)):
        if draw(st.booleans()):
            value[field] = draw(strategy)
    key = f"{network}/{name}" + ("" if draw(st.integers(0, 5)) == 0 else f"@{node}")
    return "endpoints", key, value


@st.composite
def tasks(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    service, slot, node = draw(NAMES), draw(st.sampled_from([0, 1, 7, GLOBAL_SLOTS])), \
        draw(NODE_NAMES)
    task = f"{service}.{slot}"
    value: dict[str, Any] = {**draw(EXTRA), **draw(SUMMARY), "task": task, "service": service,
                             "slot": slot, "node": node,
                             "state": draw(st.sampled_from(["running", "failed", "x-y"]))}
    for field, strategy in (("ip", st.none() | IPS),
                            ("exit_code", st.none() | st.sampled_from([0, -(1 << 31), 255])),
                            ("restarts", st.sampled_from([0, (1 << 63) - 1]))):
        if draw(st.booleans()):
            value[field] = draw(strategy)
    return TASKS, f"{task}@{node}", value


# A real certificate and revocation (so the trust's happy path runs too), and random bytes.
_CA_KEY, _CA = make_ca("fuzz-ca", T0 - 86_400, 365)
_KEYS = generate_node_keys()
_CERT = sign_node(_CA_KEY, _CA, "h2", ["worker"], {}, _KEYS.sign_pub, _KEYS.dp_pub, T0, 30)
_REV = sign_revocation(_CA_KEY, _CA, "h3", None, T0)
SERIAL = "0123456789abcdef" * 2
BLOBS = st.binary(min_size=1, max_size=300) | st.sampled_from([_CERT.raw, _REV.raw])


@st.composite
def certs(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    node = draw(NODE_NAMES)
    if draw(st.booleans()):
        serial = draw(st.sampled_from([SERIAL, "all"]))
        key = f"{node}/{serial}/{draw(st.sampled_from(['0', '1700000000']))}"
        return REVOCATIONS, key, {**draw(EXTRA), "revocation": draw(BLOBS)}
    return CERTS, f"{node}/{SERIAL}", {**draw(EXTRA), "cert": draw(BLOBS)}


HOSTILE = networks() | services() | endpoints() | tasks() | certs()


@st.composite
def near_valid(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    """A hostile value with one field (perhaps nested) replaced by anything, or removed."""
    table, key, value = draw(HOSTILE)
    target = value
    if table == "services" and draw(st.booleans()):
        target = value["spec"]
    field = draw(st.sampled_from(sorted(target)))
    if draw(st.integers(0, 3)) == 0:
        target.pop(field)
    else:
        target[field] = draw(MSGPACK)
    return table, key, value


ANYTHING = st.tuples(st.sampled_from(sorted(KNOWN_TABLES)), TEXT,
                     st.dictionaries(TEXT, MSGPACK, max_size=4))
WRITES = st.lists(
    st.tuples(HOSTILE | near_valid() | ANYTHING, st.integers(0, 5000), NODE_NAMES,
              st.integers(0, 9)),
    min_size=1, max_size=14,
)


def _store(writes: list[Any], validate: bool) -> Store:
    """Our store (h1's), with every write arriving from a peer as a delta; 1 in 10 deletes."""
    store = Store(ME, StoreConfig(validator=check_value if validate else None,
                                  owned_tables={"endpoints": "node", TASKS: "node"}))
    for node in ("h1", "h2", "H2", "h.1"):
        store.set_node_live(node, True)
    for (table, key, value), wall, writer, tomb in writes:
        try:
            blob = None if tomb == 0 else msgpack.packb(value, use_bin_type=True)
            e = Entry(table, key, blob, Hlc(T0_MS + wall, 0), writer)
            codec.check_table(table)
            codec.check_key(key)
        except Exception:  # what no peer can send (the codec's own limits)
            continue
        store.apply_delta(codec.encode_delta(e), T0 + 10)  # applied or refused, never raises
    return store


def _drive(coro: Any) -> Any:
    """Run a coroutine that does not suspend."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("suspended")


def _control_reply_encodes(result: Any) -> None:
    """What the control API sends back, as msgpack and as `meshctl --json` asks it."""
    api.encode(api.ok(result))
    api.encode(api.ok(result), as_json=True)


# ---- the consumers ----------------------------------------------------------------------------


class FakeKernel:
    def __init__(self) -> None:
        self.fdb: dict[int, dict[str, str]] = {}
        self.neigh: dict[int, dict[str, str]] = {}

    async def list_networks(self) -> dict[int, NetDevices]:
        return {4097: NetDevices(4097, "br-old", "vx-old", 1, 2, 1450)}  # one to remove

    async def remove_network(self, vni: int) -> bool:
        return True

    async def ensure_network(self, vni: int, local_ip: str, mtu: int) -> NetDevices:
        return NetDevices(vni, f"br{vni}", f"vx{vni}", 1, 2, mtu)

    async def sync_fdb(self, vni: int, desired: dict[str, str]) -> None:
        self.fdb[vni] = dict(desired)

    async def sync_neighbors(self, vni: int, desired: dict[str, str]) -> None:
        self.neigh[vni] = dict(desired)


class DirectRun:
    async def run(self, coro: Any) -> Any:
        return await coro

    def stop(self) -> None:
        pass


def _overlay(ops: ClusterOps) -> tuple[Overlay, FakeKernel]:
    ov = Overlay(ops, VTEPS[ME], lambda: dict(VTEPS))
    ov.nl.stop()
    ov.nl = DirectRun()  # type: ignore[assignment]
    kernel = FakeKernel()
    ov.kernel = kernel  # type: ignore[assignment]
    return ov, kernel


_LOG_DIR = Path(tempfile.mkdtemp(prefix="mn-consumers-fuzz-"))
atexit.register(shutil.rmtree, _LOG_DIR, True)


class _Reached(Exception):
    """The task got as far as asking for its sandbox: its spec was taken."""


def _services(store: Store) -> Services:
    state = SimpleNamespace(store=store)
    gossip = SimpleNamespace(stream_handlers={})

    async def create(network: str, *a: Any, **k: Any) -> None:
        raise _Reached(network)

    sandboxes = SimpleNamespace(create=create)
    return Services(state, sandboxes, gossip, ME, lambda: list(NODES),  # type: ignore[arg-type]
                    lambda: [], _LOG_DIR)


def _dns(store: Store, validated: bool) -> None:
    ops = ClusterOps(SimpleNamespace(store=store), Resolver(), ME,  # type: ignore[arg-type]
                     "10.10.0.0/16")
    ops.refresh_dns()
    assert ops.counters["dns_refresh_errors"] == 0
    resolver = ops.resolver
    if not validated:
        return
    assert ops.counters["dns_records_skipped"] == 0
    assert resolver.counters["bad_records"] == 0
    # A one-off sandbox named like a service is shadowed by the service's name (it wins).
    services = {ep.service.lower() for ep in store.endpoints() if ep.service}
    for ep in store.endpoints():
        for name in (ep.name, f"{ep.name}.{ep.network}", ep.service or "x",
                     f"tasks.{ep.service or 'x'}"):
            answers = resolver.answer_name(name, "A", frozenset({ep.network}))
            assert all(ipaddress.IPv4Address(a) for a in answers)
        if not ep.extra.get("pending") and ep.name.lower() not in services:
            assert ep.ip in resolver.answer_name(f"{ep.name}.{ep.network}", "A",
                                                 frozenset({ep.network})), ep
        resolver.answer_name(ep.ip, "PTR")
    assert resolver.counters["internal_errors"] == 0


def _cluster_views(store: Store) -> None:
    ops = ClusterOps(SimpleNamespace(store=store), Resolver(), ME,  # type: ignore[arg-type]
                     "10.10.0.0/16")
    vnis = ops.vnis()
    assert set(vnis) == set(store.networks())
    assert len(set(vnis.values())) == len(vnis)
    assert all(VNI_MIN <= v < VNI_LIMIT for v in vnis.values())
    _control_reply_encodes(_drive(ops.network_ls({}, None)))  # type: ignore[arg-type]
    _control_reply_encodes(_drive(ops.endpoint_ls({}, None)))  # type: ignore[arg-type]
    for name in store.networks():
        _control_reply_encodes(_drive(ops.network_inspect({"name": name}, None)))  # type: ignore[arg-type]


def _overlay_pass(store: Store, validated: bool) -> None:
    ops = ClusterOps(SimpleNamespace(store=store), Resolver(), ME,  # type: ignore[arg-type]
                     "10.10.0.0/16")
    ov, kernel = _overlay(ops)
    asyncio.run(ov.reconcile())
    desired = ov.desired_vnis()
    assert set(kernel.fdb) == set(desired.values())
    if not validated:
        return
    assert ov.counters["bad_endpoints"] == 0
    for name, vni in desired.items():
        remote = [ep for ep in store.endpoints(name)
                  if ep.node != ME and not ep.extra.get("pending") and ep.node in VTEPS]
        assert set(kernel.fdb[vni]) == {norm_mac(ep.mac) for ep in remote}
        assert set(kernel.neigh[vni]) == {norm_ip(ep.ip) for ep in remote}
        assert set(kernel.fdb[vni].values()) <= set(VTEPS.values())


def _scheduling(store: Store, validated: bool) -> None:
    svcs = _services(store)
    placed = svcs.placement()
    stored = store.services()
    assert set(placed) <= set(stored)
    names = {n.name for n in NODES}
    for slots in placed.values():
        assert set(slots.values()) <= names
    if not validated:
        return
    assert svcs.counters["scheduler_errors"] == 0
    assert svcs.counters["services_unplaceable"] == 0
    _control_reply_encodes(_drive(svcs.op_ls({}, None)))  # type: ignore[arg-type]
    for name, svc in stored.items():
        _control_reply_encodes(_drive(svcs.op_ps({"name": name}, None)))  # type: ignore[arg-type]
        _control_reply_encodes(_drive(svcs.op_inspect({"name": name}, None)))  # type: ignore[arg-type]
        # a task of it starts: its restart policy and its spec are taken as they are
        spec = dict(svc.spec)
        Restart(**restart_policy(spec.get("restart")))
        task = Task(service=name, slot=1, spec=spec)
        try:
            code = _drive(svcs._run_once(task))
        except _Reached as e:
            assert e.args[0] == spec["networks"][0]
        else:
            raise AssertionError(f"a valid spec did not start (exit {code}): {spec}")


def _ipam(store: Store) -> None:
    sb = object.__new__(Sandboxes)
    sb.store = store
    for name, net in store.networks().items():
        key = f"{name}/new@{ME}"
        taken = sb._taken(name, key)
        try:
            ip = pick_address(net.subnet, taken, f"{ME}/new/0")
        except IpamExhausted:
            continue
        subnet = ipaddress.IPv4Network(net.subnet)
        addr = ipaddress.IPv4Address(ip)
        assert addr in subnet and ip not in taken
        assert addr not in (subnet.network_address, subnet.network_address + 1,
                            subnet.broadcast_address)
        mine = Entry("endpoints", key, b"\x80", Hlc(T0_MS + 99, 0), ME)
        rivals = sb._competitors(name, ip, key)
        best = beaten_by(mine, rivals)
        assert best is None or best in rivals


def _trust(store: Store) -> None:
    keys = generate_node_keys()
    cert = sign_node(_CA_KEY, _CA, ME, ["admin"], {}, keys.sign_pub, keys.dp_pub, T0, 30)
    agent = object.__new__(Agent)
    agent.trust = Trust(_CA, ME, keys, cert, 0.0, wall_offset=T0)
    agent.state = SimpleNamespace(store=store)
    agent.config = SimpleNamespace(name=ME)
    agent.membership = None
    agent.gossip = None

    async def learn() -> None:
        agent._learn_from_store()

    asyncio.run(learn())
    # Only the CA's certificates count (random bytes teach nothing), and nobody's own
    # certificate is revoked by anything but the CA's revocation of it (_REV revokes h3,
    # whose certificate is never held).
    certs_held = {v.get("cert") for v in store.view(CERTS).values()}
    assert set(agent.trust.names()) == {ME} | ({"h2"} if _CERT.raw in certs_held else set())
    assert not any(agent.trust.revoked(n) for n in ("h2", "h3", ME))


def _all_consumers(store: Store, validated: bool) -> None:
    _dns(store, validated)
    _overlay_pass(store, validated)
    _scheduling(store, validated)
    if validated:
        _cluster_views(store)
        _ipam(store)
        _trust(store)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(WRITES)
def test_validated_values_are_consumed_without_error(writes: list[Any]) -> None:
    store = _store(writes, validate=True)
    for e in store.entries():  # (what the store holds passed the schema)
        data = e.data()
        assert data is None or check_value(e.table, e.key, data) is None
    _all_consumers(store, validated=True)


@settings(max_examples=50, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(WRITES)
def test_reconcile_passes_survive_values_no_schema_checked(writes: list[Any]) -> None:
    _all_consumers(_store(writes, validate=False), validated=False)
