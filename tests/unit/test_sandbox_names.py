"""Sandbox namespace names (platform/sandbox.py sandbox_ns_name), the agent's refusal of two
sandboxes hashing to one name, and `service logs` matching task log files literally."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest

from meshnet.agent import sandboxes as sandboxes_mod
from meshnet.agent.control import OpError
from meshnet.agent.gossip import STREAM_LOGS
from meshnet.agent.sandboxes import Sandboxes
from meshnet.agent.services import Services, _task_of_log
from meshnet.platform import nsfd
from meshnet.platform.sandbox import (
    SANDBOX_NAME_HEX,
    SandboxError,
    host_ifname,
    is_node_sandbox,
    sandbox_node_prefix,
    sandbox_ns_name,
)
from meshnet.state.networks import NetworkError

LONG = "svc" + "x" * 57  # 60 characters


# --- naming ----------------------------------------------------------------------------------


def test_example_is_stable() -> None:
    """Pinned: a running agent's sandboxes are found again by these names after a restart
    (and the README shows this one)."""
    assert sandbox_ns_name("mns", "host1", "web.1") == "mns-host1.17eac5-web.1-8855f3c0a5"
    assert sandbox_node_prefix("mns", "host1") == "mns-host1.17eac5-"


def test_fixed_length_and_valid() -> None:
    for prefix in ("mns", "mnt123401-s", "p" * 24):
        for node in ("h1", "n" * 63, "a-b.c_d"):
            for name in ("web.1", LONG + ".10", "s" * 63 + ".4294967295", "run-1a2b3c", "x"):
                ns = sandbox_ns_name(prefix, node, name)
                assert len(ns) <= nsfd.NETNS_NAME_MAX, ns
                assert nsfd.check_name(ns) == ns
                assert ns.startswith(sandbox_node_prefix(prefix, node))
                assert is_node_sandbox(ns, prefix, node)
                digest = ns.rsplit("-", 1)[1]
                assert len(digest) == SANDBOX_NAME_HEX and int(digest, 16) >= 0
                # a cut name fills the limit exactly; the hash is always there
                full = f"{sandbox_node_prefix(prefix, node)}{name}-{digest}"
                assert ns == full or len(ns) == nsfd.NETNS_NAME_MAX, ns
                assert len(host_ifname(ns)) == 14


def test_long_service_slots_are_distinct() -> None:
    one, ten = (sandbox_ns_name("mnt123401-s", "h1", f"{LONG}.{i}") for i in (1, 10))
    assert one != ten
    assert len(one) == len(ten) == nsfd.NETNS_NAME_MAX
    assert "-svcxxx" in one and ".1-" in one and ".10-" in ten  # recognizable, slot kept
    assert host_ifname(one) != host_ifname(ten)
    names = {sandbox_ns_name("mns", "h1", f"{LONG}.{i}") for i in range(1, 2001)}
    assert len(names) == 2000
    # the old scheme cut them to one name
    assert f"mnt123401-s-h1-{LONG}.1"[:64] == f"mnt123401-s-h1-{LONG}.10"[:64]


def test_node_and_name_both_count() -> None:
    assert sandbox_ns_name("mns", "h1", "web.1") != sandbox_ns_name("mns", "h2", "web.1")
    assert sandbox_ns_name("mns", "h1", "web.1") != sandbox_ns_name("mns", "h1", "web.2")
    # same first 8 characters of node, different nodes: different tags
    a, b = "longnode-a", "longnode-b"
    assert sandbox_node_prefix("mns", a) != sandbox_node_prefix("mns", b)


def test_node_prefixes_never_cover_another_nodes_sandboxes() -> None:
    """A restarted agent sweeps the names starting with its node prefix: node `h1` must not
    sweep `h1-x`'s or `h10`'s sandboxes (the old `<prefix>-<node>-` did, for `h1-x`)."""
    nodes = ["h1", "h10", "h1-x", "h1.x", "h1-x-y", "a" * 8, "a" * 8 + "-b", "a" * 7 + "-"]
    nodes = [n for n in nodes if n[-1].isalnum()]
    for mine in nodes:
        head = sandbox_node_prefix("P-s", mine)
        for other in nodes:
            if other == mine:
                continue
            for name in ("web.1", "x-" + "y" * 40, LONG + ".7"):
                theirs = sandbox_ns_name("P-s", other, name)
                assert not theirs.startswith(head), (mine, other, theirs)
                assert not is_node_sandbox(theirs, "P-s", mine)
    assert "P-s-h1-x-web.1".startswith("P-s-h1-")  # the ambiguity of the old names


def test_bad_inputs() -> None:
    with pytest.raises(SandboxError, match="too long"):
        sandbox_ns_name("p" * 40, "n" * 63, "web.1")
    for prefix in ("", "p\n", "p/q", "\u0661"):
        with pytest.raises(SandboxError):
            sandbox_node_prefix(prefix, "h1")
    with pytest.raises(SandboxError):
        sandbox_ns_name("mns", "", "web.1")
    with pytest.raises(SandboxError):
        sandbox_ns_name("mns", "h1", "")
    # whatever the input, the result is a valid namespace name (odd characters are replaced
    # in the readable parts; the hashes are of the input as given)
    odd = sandbox_ns_name("mns", "h\u0661/..", "../x\n")
    assert nsfd.check_name(odd) == odd
    assert odd != sandbox_ns_name("mns", "h_/..", "../x_")


def test_is_node_sandbox_is_strict() -> None:
    ns = sandbox_ns_name("mns", "h1", "web.1")
    head = sandbox_node_prefix("mns", "h1")
    assert is_node_sandbox(ns, "mns", "h1")
    for other in (ns + "\n", ns + "0", ns[:-1], head + "web.1", head + "web.1-XYZ0123456",
                  "mns-h1-web.1"):
        assert not is_node_sandbox(other, "mns", "h1"), other


# --- the agent refuses a second sandbox on a held namespace ----------------------------------


def fake_sandboxes(holders: dict[str, str]) -> Sandboxes:
    sb = object.__new__(Sandboxes)
    sb.prefix, sb.node = "mns", "h1"
    sb.store = SimpleNamespace(networks=lambda: {"net": SimpleNamespace(encrypted=False)},
                               endpoints=lambda network: [])
    sb.overlay = SimpleNamespace(encrypted=None)
    sb.live = {}
    sb.holders = holders
    sb.claiming = set()

    async def no_allocation(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a refused sandbox must claim no address")

    sb.allocate = no_allocation  # type: ignore[method-assign]
    return sb


def test_collision_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # Force the two names to hash alike.
    monkeypatch.setattr(sandboxes_mod, "sandbox_ns_name", lambda prefix, node, name: "mns-same")
    sb = fake_sandboxes({"mns-same": "first"})
    with pytest.raises(OpError) as e:
        asyncio.run(sb.create("net", "second"))
    msg = str(e.value)
    assert "\n" not in msg and "mns-same" in msg and "first" in msg and "second" in msg
    assert "refusing to share" in msg
    assert sb.holders == {"mns-same": "first"} and sb.live == {}


def test_same_task_twice_is_refused() -> None:
    ns = sandbox_ns_name("mns", "h1", "web.3")
    sb = fake_sandboxes({ns: "web.3"})
    with pytest.raises(OpError, match=r"already held by sandbox web\.3"):
        asyncio.run(sb.create("net", None, service="web", slot=3))


# --- service logs: literal names only --------------------------------------------------------


def fake_services(log_dir: Path, services: dict[str, Any] | None = None,
                  peer_logs: dict[Any, Any] | None = None) -> Services:
    s = object.__new__(Services)
    s.log_dir = log_dir
    s.node = "h1"
    s.store = SimpleNamespace(services=lambda: services or {})
    s.peers = lambda: [SimpleNamespace(name="h2", addr=("192.0.2.1", 7946))] if peer_logs else []

    async def request(addr: Any, service: int, body: bytes, *a: Any) -> bytes:
        if service != STREAM_LOGS:  # an agent from before STREAM_LOG_LINES hangs up
            raise asyncio.IncompleteReadError(b"", 4)
        return bytes(msgpack.packb({"node": "h2", "logs": peer_logs}))

    s.gossip = SimpleNamespace(request=request)
    return s


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    d = tmp_path / "state" / "logs"
    d.mkdir(parents=True)
    for name in ("web.1.log", "web.10.log", "web.1.log.1", "web-2.1.log", "web.x.log",
                 "webx.1.log", "web..log", "web.1.LOG", "web.log", "other.1.log",
                 "web.12345678901.log"):
        (d / name).write_text(f"{name} says hi\n")
    (tmp_path / "state" / "leak.1.log").write_text("secret\n")
    (tmp_path / "outside.log").write_text("secret\n")
    (d / "web.3.log").symlink_to(tmp_path / "outside.log")
    os.mkfifo(d / "web.4.log")
    (d / "web.5.log").mkdir()
    return d


def test_local_logs_match_exact_task_names(logs: Path) -> None:
    s = fake_services(logs)
    got = s.local_logs("web")
    assert sorted(got) == ["web.1", "web.10"]
    assert got["web.1"] == "web.1.log says hi\n"
    assert sorted(s.local_logs("other")) == ["other.1"]
    assert s.local_logs("nothing") == {}


@pytest.mark.parametrize("name", [
    "../leak", "..", ".", "*", "w*", "we?", "[w]eb", "**", "web.*", "web/..", "/tmp/x",
    "web\n", "web\u0661", "w\u0435b", "", "web.", "web.1", "x" * 64, "tasks"])
def test_local_logs_refuse_non_names(logs: Path, name: str) -> None:
    s = fake_services(logs)
    with pytest.raises(NetworkError):
        s.local_logs(name)
    reply = asyncio.run(s._serve_logs(bytes(msgpack.packb(name)), ("192.0.2.1", 1)))
    assert reply is None
    with pytest.raises(OpError) as e:
        asyncio.run(s.op_logs({"name": name}, _no_send))
    assert "\n" not in str(e.value)


async def _no_send(event: dict[str, Any]) -> None:
    raise AssertionError(f"nothing may be sent: {event}")


def test_serve_logs_answers_a_real_name(logs: Path) -> None:
    s = fake_services(logs)
    reply = asyncio.run(s._serve_logs(bytes(msgpack.packb("web")), ("192.0.2.1", 1)))
    assert reply is not None
    doc = msgpack.unpackb(reply, raw=False)
    assert doc["node"] == "h1" and sorted(doc["logs"]) == ["web.1", "web.10"]
    for body in (b"\xc1", bytes(msgpack.packb(1)), bytes(msgpack.packb(["web"]))):
        assert asyncio.run(s._serve_logs(body, ("192.0.2.1", 1))) is None


def test_op_logs_keeps_only_the_services_tasks_from_peers(logs: Path) -> None:
    svc = SimpleNamespace(name="web")
    s = fake_services(logs, {"web": svc}, peer_logs={
        "web.2": "from h2\n", "other.1": "not this\n", "web.2\nweb.9 | forged": "no\n",
        "web.*": "no\n", "../web.1": "no\n", "web.3.log": "no\n"})
    sent: list[dict[str, Any]] = []

    async def send(event: dict[str, Any]) -> None:
        sent.append(event)

    result = asyncio.run(s.op_logs({"name": "web"}, send))
    assert result == {"service": "web", "tasks": ["web.1", "web.10", "web.2"]}
    text = "".join(f"{r['task']} | {r['line']}\n" for e in sent for r in e["logs"])
    assert "web.2 | from h2" in text
    assert "not this" not in text and "forged" not in text and "| no" not in text


def test_task_of_log_and_log_path(tmp_path: Path) -> None:
    assert _task_of_log("web", "web.1.log") == "web.1"
    for fname in ("web.1.log.1", "web.log", "web..log", "web.-1.log", "web.1 .log",
                  "web.\u0661.log", "web.1.log\n", "wEb.1.log"):
        assert _task_of_log("web", fname) is None, fname
    s = fake_services(tmp_path)
    assert s._log_path("web.1") == tmp_path / "web.1.log"
    for bad in ("../x.1", "web", "web.x", "web.1\n", "web.\u0661", "/abs.1", "a/b.1"):
        with pytest.raises(ValueError):
            s._log_path(bad)


# --- a start cancelled while its address is being confirmed withdraws its claim ---------------


def test_a_cancelled_start_withdraws_its_pending_claim() -> None:
    """Found with the chaos runs (#15): a restarted agent places every slot on itself before it
    has heard of the others, claims their addresses, then loses the slots; the pending claims
    used to stay until the confirmation gave up, holding the network against `network rm`."""
    from meshnet.state import Store
    from meshnet.state.validate import ENDPOINTS

    store = Store("h1")
    sb = fake_sandboxes({})
    sb.store = SimpleNamespace(networks=lambda: {"net": SimpleNamespace(encrypted=False)},
                               endpoints=lambda network: [], entry=store.entry,
                               delete=store.delete)
    sb.state = SimpleNamespace(changed=lambda: None)
    key = "net/web.3@h1"
    claimed = asyncio.Event()

    async def confirming(*args: Any, **kwargs: Any) -> None:
        store.put(ENDPOINTS, key, {"name": "web.3", "network": "net", "ip": "10.9.0.5",
                                   "mac": "02:42:0a:09:00:05", "node": "h1",
                                   "pending": True}, 1.0)
        claimed.set()
        await asyncio.sleep(3600)  # the members' confirmations, which never come

    async def ensure(network: str) -> None:
        return None

    sb.allocate = confirming  # type: ignore[method-assign]
    sb.overlay = SimpleNamespace(encrypted=None, ensure=ensure)

    async def run() -> None:
        start = asyncio.ensure_future(sb.create("net", None, service="web", slot=3))
        waiting = asyncio.ensure_future(claimed.wait())
        await asyncio.wait([start, waiting], timeout=10, return_when=asyncio.FIRST_COMPLETED)
        if start.done():  # it failed before claiming: say why instead of waiting forever
            waiting.cancel()
            start.result()
        assert claimed.is_set()
        assert store.entry(ENDPOINTS, key) is not None
        start.cancel()  # the slot moved to another host
        with pytest.raises(asyncio.CancelledError):
            await start

    asyncio.run(run())
    held = store.entry(ENDPOINTS, key)
    assert held is not None and held.value is None  # withdrawn: a tombstone
    assert sb.holders == {} and sb.claiming == set()


def test_an_agent_with_seeds_places_nothing_until_company_or_the_grace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from meshnet.agent import services as services_mod

    clock = [100.0]
    monkeypatch.setattr(services_mod.time, "monotonic", lambda: clock[0])
    s = object.__new__(Services)
    members: list[str] = ["h1"]
    s.nodes = lambda: members  # type: ignore[assignment,return-value]
    s.started_at = 100.0
    s.expect_company = True
    s.state = SimpleNamespace(synced=False)  # type: ignore[assignment]
    assert s._waiting_for_company()  # alone, just started, seeds to join: wait
    members.append("h2")
    assert s._waiting_for_company()  # a member answered, but no state exchange finished yet
    s.state.synced = True
    assert not s._waiting_for_company()  # a member answered and its state is here
    members.pop()
    assert not s._waiting_for_company()  # once: alone later is no reason to stop placing
    s.expect_company, s.started_at = True, 100.0
    clock[0] = 100.0 + services_mod.START_GRACE_S
    assert not s._waiting_for_company()  # nobody answered within the grace: place anyway
    s.expect_company = False
    clock[0] = 100.0
    assert not s._waiting_for_company()  # nobody to join: a lone host places at once
