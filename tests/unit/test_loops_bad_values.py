"""Defense in depth (issue #13): even with no schema in the store (a value that got in before
validation existed, or a bug in it), no reconcile pass stops for good on a bad value. The
overlay leaves out an endpoint the kernel would not take, the scheduler leaves out a service it
cannot place, DNS leaves out a record it cannot serve, and each loop survives any exception."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from meshnet.agent.cluster_ops import ClusterOps
from meshnet.agent.overlay import Overlay
from meshnet.agent.services import Services
from meshnet.agent.state_service import REFUSAL_LOG_BURST, StateService
from meshnet.dns import Resolver
from meshnet.placement import NodeInfo
from meshnet.platform.links import NetDevices, _valid_pairs, norm_ip, norm_mac
from meshnet.state import Store, StoreConfig, codec
from meshnet.state.validate import check_value

T0 = 1_700_000_000.0
NET1 = {"name": "n1", "vni": 5000, "subnet": "10.1.0.0/24", "encrypted": False}
NET2 = {"name": "n2", "vni": 5001, "subnet": "10.2.0.0/24", "encrypted": False}


def ep(name: str, network: str, ip: Any, mac: Any, node: str = "h2") -> dict[str, Any]:
    return {"name": name, "network": network, "ip": ip, "mac": mac, "node": node,
            "service": None, "slot": None}


def lax_store() -> Store:
    """No schema: bad values get in, as they could before validation existed."""
    s = Store("h1", StoreConfig(owned_tables={"endpoints": "node", "tasks": "node"}))
    s.set_node_live("h2", True)
    return s


def ops_for(store: Store) -> ClusterOps:
    return ClusterOps(SimpleNamespace(store=store), Resolver(), "h1",  # type: ignore[arg-type]
                      "10.10.0.0/16")


# ---- platform/links.py ---------------------------------------------------------------------


def test_norm_helpers_raise_value_error_for_any_bad_value() -> None:
    assert norm_mac("02-42-0A-01-00-05") == "02:42:0a:01:00:05"
    for bad in ("zz", "", None, 3, b"02:42:0a:01:00:05", ["x"], "0" * 100):
        with pytest.raises(ValueError):
            norm_mac(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            norm_ip(bad)  # type: ignore[arg-type]


def test_sync_input_keeps_the_good_pairs() -> None:
    want, bad = _valid_pairs({"02:42:0a:01:00:05": "10.0.0.2", "zz": "10.0.0.3",
                              "02:42:0a:01:00:06": "nope", None: None}, norm_mac, norm_ip)
    assert want == {"02:42:0a:01:00:05": "10.0.0.2"} and bad == 3


# ---- the overlay's reconcile loop ----------------------------------------------------------


class FakeKernel:
    def __init__(self) -> None:
        self.fdb: dict[int, dict[str, str]] = {}
        self.neigh: dict[int, dict[str, str]] = {}
        self.fail_vni: int | None = None
        self.fail_list = 0  # list_networks raises this many times first

    async def list_networks(self) -> dict[int, NetDevices]:
        if self.fail_list:
            self.fail_list -= 1
            raise RuntimeError("a bug somewhere below")
        return {}

    async def remove_network(self, vni: int) -> bool:
        return True

    async def ensure_network(self, vni: int, local_ip: str, mtu: int) -> NetDevices:
        if vni == self.fail_vni:
            raise ValueError("kernel said no")
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


def overlay_for(store: Store) -> tuple[Overlay, FakeKernel]:
    ov = Overlay(ops_for(store), "10.0.0.1", lambda: {"h1": "10.0.0.1", "h2": "10.0.0.2"},
                 period=0.01)
    ov.nl.stop()  # no netlink here: run the fake kernel's coroutines in place
    ov.nl = DirectRun()  # type: ignore[assignment]
    kernel = FakeKernel()
    ov.kernel = kernel  # type: ignore[assignment]
    return ov, kernel


async def test_overlay_leaves_out_bad_endpoints_and_keeps_the_rest() -> None:
    s = lax_store()
    s.put("networks", "n1", NET1, T0)
    s.put("endpoints", "n1/good", ep("good", "n1", "10.1.0.5", "02:42:0a:01:00:05"), T0)
    s.put("endpoints", "n1/zz", ep("zz", "n1", "10.1.0.6", "zz"), T0)
    s.put("endpoints", "n1/ip", ep("ip", "n1", "10.1.0.999", "02:42:0a:01:00:07"), T0)
    s.put("endpoints", "n1/num", ep("num", "n1", 7, 8), T0)
    ov, kernel = overlay_for(s)
    vni = ov.desired_vnis()["n1"]
    for _ in range(3):
        await ov.reconcile()
    assert kernel.fdb[vni] == {"02:42:0a:01:00:05": "10.0.0.2"}
    assert kernel.neigh[vni] == {"10.1.0.5": "02:42:0a:01:00:05"}
    # each counted once, not once a pass ("num" never reaches the overlay: the typed view
    # Store.endpoints() skips values whose fields have the wrong types)
    assert ov.counters["bad_endpoints"] == 2


async def test_overlay_one_failing_network_does_not_stop_the_others() -> None:
    s = lax_store()
    s.put("networks", "n1", NET1, T0)
    s.put("networks", "n2", NET2, T0)
    s.put("endpoints", "n2/a", ep("a", "n2", "10.2.0.5", "02:42:0a:02:00:05"), T0)
    ov, kernel = overlay_for(s)
    vnis = ov.desired_vnis()
    kernel.fail_vni = vnis["n1"]
    with pytest.raises(ValueError):
        await ov.reconcile()
    assert kernel.fdb[vnis["n2"]] == {"02:42:0a:02:00:05": "10.0.0.2"}


async def test_overlay_loop_survives_any_exception() -> None:
    s = lax_store()
    s.put("networks", "n1", NET1, T0)
    ov, kernel = overlay_for(s)
    kernel.fail_list = 2
    task = asyncio.create_task(ov._loop())
    try:
        deadline = time.monotonic() + 10
        while ov.counters["passes"] < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert ov.counters["passes"] >= 5 and ov.counters["errors"] == 2
    assert ov.desired_vnis()["n1"] in kernel.fdb  # passes after the failures did their work


# ---- the scheduler -------------------------------------------------------------------------


def services_for(store: Store, tmp_path: Path) -> Services:
    state = SimpleNamespace(store=store)
    gossip = SimpleNamespace(stream_handlers={})
    nodes = [NodeInfo("h1"), NodeInfo("h2")]
    return Services(state, None, gossip, "h1", lambda: nodes, lambda: [],  # type: ignore[arg-type]
                    tmp_path)


def svc(name: str, replicas: Any, **spec: Any) -> dict[str, Any]:
    return {"name": name, "network": "n1", "mode": "replicated", "replicas": replicas,
            "spec": {"networks": ["n1"], "command": ["true"], **spec}}


def test_placement_leaves_out_what_it_cannot_place(tmp_path: Path) -> None:
    s = lax_store()
    s.put("services", "web", svc("web", 3), T0)
    s.put("services", "huge", svc("huge", 10**12), T0)  # would build 10^12 slots
    s.put("services", "neg", svc("neg", -1), T0)
    s.put("services", "cons", svc("cons", 1, constraints=["node.colour~red"]), T0)
    s.put("services", "mpn", svc("mpn", 1, max_per_node="x"), T0)
    s.put("services", "alias", svc("web", 1), T0)  # stored under another key: a duplicate
    services = services_for(s, tmp_path)
    placed = services.placement()
    assert set(placed) == {"web"} and sorted(placed["web"]) == [1, 2, 3]
    assert services.counters["services_unplaceable"] == 5
    assert services.placement() == placed  # the same every pass


def test_scheduler_loop_survives_any_exception(tmp_path: Path) -> None:
    s = lax_store()
    services = services_for(s, tmp_path)
    calls = []

    def boom() -> None:
        calls.append(1)
        raise RuntimeError("a bug")

    services.reconcile = boom  # type: ignore[method-assign]

    async def run() -> None:
        task = asyncio.create_task(services._loop())
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            services.kick()
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(run())
    assert len(calls) >= 3 and services.counters["scheduler_errors"] == len(calls)


# ---- DNS and the store's listeners ---------------------------------------------------------


def test_refresh_dns_never_raises_and_keeps_good_records() -> None:
    s = lax_store()
    s.put("networks", "n1", NET1, T0)
    s.put("networks", "n2", {"name": "n2", "vni": 1, "subnet": "10.0.0.0/33"}, T0)
    s.put("endpoints", "n1/good", {**ep("good", "n1", "10.1.0.5", "02:42:0a:01:00:05"),
                                   "service": "web", "slot": 1}, T0)
    s.put("endpoints", "n1/bad", {**ep("bad", "n1", "garbage", "zz"), "service": "web",
                                  "slot": 2}, T0)
    ops = ops_for(s)
    ops.refresh_dns()
    assert ops.resolver.answer_name("web", "A", None) == ["10.1.0.5"]
    assert ops.counters["dns_records_skipped"] == 1 and ops.counters["dns_refresh_errors"] == 0

    def broken(*a: Any, **k: Any) -> None:
        raise RuntimeError("a bug")

    ops.resolver.set_records = broken  # type: ignore[method-assign]
    ops.refresh_dns()  # no exception
    ops.refresh_dns()
    assert ops.counters["dns_refresh_errors"] == 2


async def test_state_service_listener_failure_does_not_starve_the_others() -> None:
    s = lax_store()
    service = StateService(s, None, "h1")  # type: ignore[arg-type]
    heard: list[str] = []

    def bad() -> None:
        raise RuntimeError("a bug")

    service.listeners += [bad, lambda: heard.append("overlay"), bad]
    service._notify()
    service._notify()
    assert heard == ["overlay", "overlay"]
    counters = service.counters
    assert counters["listener_errors"] == 4 and counters["handler_errors"] == 4
    assert "refused_invalid" in counters and "refused_by_table" in counters
    # a delta the store cannot apply for a reason it does not know is counted, never raised
    s.apply_delta = lambda *a: 1 / 0  # type: ignore[method-assign, assignment, misc]
    service.notify_message(b"x")
    assert service.counters["bad_deltas"] == 1


async def test_refusals_are_logged_at_most_a_burst_a_minute(
        caplog: pytest.LogCaptureFixture) -> None:
    s = Store("h1", StoreConfig(validator=check_value))
    service = StateService(s, None, "h1")  # type: ignore[arg-type]
    a = Store("a")
    for i in range(REFUSAL_LOG_BURST + 5):
        e = a.put("networks", f"n{i}", {**NET1, "name": f"n{i}", "subnet": "10.0.0.0/33"}, T0)
        service.notify_message(codec.encode_delta(e))
    logged = [r for r in caplog.records if "refused a replicated write" in r.getMessage()]
    assert len(logged) == REFUSAL_LOG_BURST and "networks/n0: subnet" in logged[0].getMessage()
    counters = service.counters
    assert counters["refused_invalid"] == REFUSAL_LOG_BURST + 5
    assert counters["refusals_not_logged"] == 5 and counters["bad_deltas"] == 0
