"""Sandboxes (what a task or a `meshctl run` lives in) and the IPAM that addresses them.

A sandbox is a network namespace with a veth on the network's bridge, an address from IPAM,
a default route, a resolv.conf pointing at 127.0.0.11, and our DNS listener opened inside it.
Its endpoint is published (pending cleared) only once the address is confirmed and the
sandbox is wired, and withdrawn before the sandbox is torn down.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from meshnet.agent.cluster_ops import ClusterOps
from meshnet.agent.control import OpError, SendEvent
from meshnet.agent.dns_server import DnsServer, Listener
from meshnet.agent.gossip import STREAM_IPAM, GossipTransport, StreamError
from meshnet.agent.logs import LogOnce
from meshnet.agent.overlay import Overlay
from meshnet.agent.state_service import StateService
from meshnet.aioutil import run_to_end
from meshnet.containment import DEFAULT_CAPS, Containment, ContainmentError, task_hostname
from meshnet.containment import from_args as containment_from_args
from meshnet.crypto.keyring import KeyringError
from meshnet.lb.core import vips_taken
from meshnet.membership import Addr, Member
from meshnet.platform import container, nsfd
from meshnet.platform.cgroups import (
    CgroupError,
    Cgroups,
    TaskCgroup,
    find_parents,
    sweep,
    task_cgroups,
)
from meshnet.platform.container import ContainerError, Tools
from meshnet.platform.sandbox import (
    SandboxError,
    SandboxExists,
    create_sandbox,
    delete_sandbox,
    etc_files,
    node_sandbox_leftovers,
    sandbox_node_prefix,
    sandbox_ns_name,
    write_identity,
)
from meshnet.state import Entry, StateProtocolError
from meshnet.state.codec import decode_delta, encode_delta
from meshnet.state.ipam import IpamExhausted, beaten_by, pick_address
from meshnet.state.networks import NetworkError, check_name, mac_for_ip
from meshnet.state.store import LIFE_FIELD
from meshnet.state.tables import ENDPOINTS, Endpoint, endpoint_key

log = logging.getLogger("meshnet.sandbox")

# Each lost claim means someone else took the address at the same moment; with hash-spread
# picks a handful of rounds settles even 200 simultaneous allocations on one /24.
MAX_CLAIM_ROUNDS = 32
# Competing claims a member reports back; more than a few for one address cannot happen.
MAX_COMPETITORS = 16
CONFIRM_CONCURRENCY = 32
# A member that does not answer a confirmation is asked again, backing off to once a second,
# until it answers or membership stops listing it (dead or left). The deadline is above the
# LAN profile's longest suspicion (6 x 1.5 x log10(1,000) x 1 s = 27 s), so a member that is
# really gone is declared dead before it; past it the allocation fails (the caller retries
# later) rather than treat silence as "no rival".
CONFIRM_RETRY_S = 0.1
CONFIRM_RETRY_MAX_S = 1.0
CONFIRM_DEADLINE_S = 60.0
# `meshctl run` output is streamed in chunks of at most this much.
OUTPUT_CHUNK = 64 * 1024
STOP_GRACE_S = 5.0


@dataclass
class SandboxHandle:
    name: str
    network: str
    ns: str
    ip: str
    key: str
    listener: Listener | None = None
    value: dict[str, Any] = field(default_factory=dict)
    cgroup: TaskCgroup | None = None
    # create found the namespace already there (not made by this sandbox): never torn down.
    ns_taken: bool = False
    # The launcher's plan of the command running in it: a health probe runs with the same.
    plan: dict[str, Any] | None = None


# What keeps a task from starting as asked on this host: its spec, the host's users, paths or
# tools, or the cgroup file system. The task fails with the one line these carry.
LaunchFailure = (ContainmentError, ContainerError, CgroupError)


class Sandboxes:
    def __init__(self, ops: ClusterOps, state: StateService, overlay: Overlay,
                 dns: DnsServer, gossip: GossipTransport,
                 peers: Any, prefix: str = "mns", hidden: list[str] | None = None) -> None:
        self.prefix = prefix
        # Host paths no task may see (the agent's state, socket, config and key).
        self.hidden = hidden or []
        self.cgroups: Cgroups | None = None
        self.tools: Tools | None = None
        # Why tasks cannot be contained on this host (missing tools or cgroups), if they can't.
        self.unavailable: str | None = None
        # () -> whether this node's certificate has the admin role (None: no identity).
        self.is_admin: Callable[[], bool] | None = None
        # The agent's life (state/store.py LIFE_FIELD), in every sandbox endpoint we write: a
        # sandbox dies with its agent, so peers hide a previous life's at once.
        self.life: int | None = None
        self.ops = ops
        self.state = state
        self.store = state.store
        self.overlay = overlay
        self.dns = dns
        self.gossip = gossip
        self.peers = peers  # () -> list[Member]: alive members other than us
        self.node = ops.node
        self.live: dict[str, SandboxHandle] = {}
        # Namespace -> the sandbox holding it, from the moment create picks the name until the
        # sandbox is gone: two sandboxes whose names hash alike are refused, never share one.
        self.holders: dict[str, str] = {}
        # endpoint keys of starts still claiming their address (not in `live` yet)
        self.claiming: set[str] = set()
        gossip.stream_handlers[STREAM_IPAM] = self._serve_claim
        self.counters = {"claims": 0, "claims_lost": 0, "confirm_retries": 0,
                         "confirm_member_gone": 0, "confirm_unreachable": 0,
                         "sandbox_teardown_errors": 0}
        self._log_once = LogOnce(log)
        # Called once a sandbox is wired, before its process starts (agent/vips.py writes the
        # sandbox's VIP table there, so no connection of the task is ever tracked un-NATed).
        self.on_wired: Callable[[SandboxHandle], Awaitable[None]] | None = None

    def ns_prefix(self) -> str:
        """What every sandbox namespace of this agent is named starting with."""
        return sandbox_node_prefix(self.prefix, self.node)

    def ns_name(self, name: str) -> str:
        """Sandbox NAME's namespace: `<prefix>-<node tag>-<name cut to fit>-<hash>`, at most 64
        characters (platform/sandbox.py sandbox_ns_name)."""
        return sandbox_ns_name(self.prefix, self.node, name)

    # --- start-up: clean what a previous run of this agent left ----------------------------

    def cgroup_parent(self) -> str:
        return f"meshnet-{self.prefix}-{self.node}"

    async def adopt(self) -> None:
        """Find the task cgroups and tools; then, since one-off sandboxes cannot outlive their
        agent (their client is gone) and a restarted agent starts its tasks afresh, kill
        whatever a previous run left (found by cgroup: its namespaces' names may have died
        with its mount namespace) and remove its sandboxes and endpoints."""
        try:
            self.tools = container.find_tools()
            self.cgroups = await asyncio.to_thread(Cgroups.for_agent, self.cgroup_parent())
            await asyncio.to_thread(self.cgroups.prepare)
        except (ContainerError, CgroupError, OSError) as e:
            self.unavailable = str(e)
            log.error("tasks cannot run on this host: %s", e)
        if self.cgroups is not None:
            for problem in self.cgroups.problems:
                log.warning("task containment: %s", problem)
            leftovers = self.cgroups.leftovers()
            for cg in leftovers:
                await asyncio.to_thread(self.cgroups.destroy, cg)
            # A previous run started from another cgroup (by hand, then by systemd) left its
            # parent elsewhere: the same name anywhere in the hierarchies is ours too.
            ours = set(self.cgroups.parents.values())
            elsewhere = [p for p in await asyncio.to_thread(find_parents, self.cgroup_parent())
                         if p.name == self.cgroup_parent() and p not in ours]
            leftovers += [cg for p in elsewhere for cg in task_cgroups([p]).values()]
            await asyncio.to_thread(sweep, elsewhere)
            if leftovers:
                log.info("killed %d tasks left by a previous run", len(leftovers))
        for ns in node_sandbox_leftovers(self.prefix, self.node):
            await _kill_namespace_processes(ns)
            await self._teardown("removing a sandbox left by a previous run",
                                 self.overlay.nl.run(delete_sandbox(ns)))
            log.info("removed sandbox %s left by a previous run", ns)
        for entry in self.store.owned_by(self.node):
            data = entry.data() or {}
            if entry.table == ENDPOINTS and data.get("sandbox"):
                self.store.delete(ENDPOINTS, entry.key, time.time())
        self.state.changed()

    # --- IPAM -------------------------------------------------------------------------------

    def _competitors(self, network: str, ip: str, key: str) -> list[Entry]:
        out = []
        for e in self.store.entries():
            if e.table != ENDPOINTS or e.tombstone or e.key == key:
                continue
            d = e.data() or {}
            if d.get("network") == network and d.get("ip") == ip:
                out.append(e)
        return out

    def _taken(self, network: str, key: str) -> set[str]:
        taken = set()
        for e in self.store.entries():
            if e.table == ENDPOINTS and not e.tombstone and e.key != key:
                d = e.data() or {}
                if d.get("network") == network and isinstance(d.get("ip"), str):
                    taken.add(str(d["ip"]))
        # Services' VIPs: their records are their lasting claims (agent/vips.py says why).
        return taken | vips_taken(self.store.services().values(), network)

    async def _serve_claim(self, body: bytes, addr: Addr) -> bytes | None:
        """A peer's claim: take it into our store, answer with every competing claim we hold."""
        try:
            self.store.apply_delta(body, time.time())
        except StateProtocolError:
            return None
        self.state.changed()
        claim = decode_delta(body).entry
        data = claim.data() or {}
        rivals = self._competitors(str(data.get("network")), str(data.get("ip")), claim.key)
        return bytes(msgpack.packb([encode_delta(e) for e in rivals[:MAX_COMPETITORS]]))

    async def _confirm(self, claim: Entry) -> list[Entry]:
        """Send the claim to every alive or suspect member; gather the competing claims they
        hold. A member that does not answer is asked again until it does or membership drops
        it: silence is never taken for "no rival" (OpError past CONFIRM_DEADLINE_S)."""
        body = encode_delta(claim)
        sem = asyncio.Semaphore(CONFIRM_CONCURRENCY)
        deadline = time.monotonic() + CONFIRM_DEADLINE_S

        def still_member(m: Member) -> bool:
            return any(p.name == m.name and p.addr == m.addr for p in self.peers())

        async def ask(m: Member) -> list[Entry] | None:
            """Its competing claims; None once it is no longer a member."""
            delay = CONFIRM_RETRY_S
            while True:
                async with sem:
                    try:
                        raw = await self.gossip.request(m.addr, STREAM_IPAM, body)
                        return self._take_competitors(raw)
                    except (OSError, TimeoutError, asyncio.IncompleteReadError, StreamError,
                            KeyringError, ValueError, TypeError, StateProtocolError,
                            msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
                        self.counters["confirm_retries"] += 1
                        error = e
                await asyncio.sleep(delay)
                delay = min(delay * 2, CONFIRM_RETRY_MAX_S)
                if not still_member(m):
                    # Declared dead or gone: its claims, if any, lose their owner's
                    # liveness with it.
                    self.counters["confirm_member_gone"] += 1
                    return None
                if time.monotonic() >= deadline:
                    self.counters["confirm_unreachable"] += 1
                    raise OpError(f"could not confirm address {claim.key} with member {m.name} "
                                  f"(no answer for {CONFIRM_DEADLINE_S:g} s: "
                                  f"{type(error).__name__}); not taking silence for consent")

        results = await asyncio.gather(*(ask(m) for m in self.peers()))
        return [e for r in results if r is not None for e in r]

    def _take_competitors(self, raw: bytes) -> list[Entry]:
        """A member's answer to our claim: the competing claims it holds, which we merge. Only
        claims our store accepted count as rivals: one the schema or the signature check
        refused (a forged older claim) would otherwise beat ours every round."""
        out = []
        for item in msgpack.unpackb(raw, raw=False, max_array_len=MAX_COMPETITORS,
                                    max_bin_len=65536)[:MAX_COMPETITORS]:
            if self.store.apply_delta(item, time.time()):
                self.state.changed()
            entry = decode_delta(item).entry
            held = self.store.entry(entry.table, entry.key)
            if held is not None and (held.hlc, held.writer) == (entry.hlc, entry.writer):
                out.append(entry)
        return out

    async def allocate(self, network: str, name: str, extra: dict[str, Any]) -> Endpoint:
        """Claim an address, confirm it with every member, re-pick on loss; returns the
        (still pending) endpoint."""
        net = self.store.networks()[network]
        subnet = ipaddress.IPv4Network(net.subnet)
        key = f"{endpoint_key(network, name)}@{self.node}"
        for attempt in range(MAX_CLAIM_ROUNDS):
            try:
                ip = pick_address(net.subnet, self._taken(network, key),
                                  f"{self.node}/{name}/{attempt}")
            except IpamExhausted as e:
                raise OpError(str(e)) from None
            ep = Endpoint(name=name, network=network, ip=ip, mac=mac_for_ip(ip), node=self.node,
                          service=extra.get("service"), slot=extra.get("slot"),
                          extra={"pending": True, "sandbox": extra.get("sandbox", ""),
                                 "prefixlen": subnet.prefixlen,
                                 **({LIFE_FIELD: self.life} if self.life is not None else {}),
                                 **({"kind": extra["kind"]} if extra.get("kind") else {})})
            claim = self.store.put(ENDPOINTS, key, ep.to_value(), time.time())
            self.state.changed()
            self.counters["claims"] += 1
            rivals = await self._confirm(claim) + self._competitors(network, ip, key)
            mine = self.store.entry(ENDPOINTS, key)
            if mine is None or mine.writer != self.node:
                raise OpError(f"endpoint {name} on {network} was taken over concurrently")
            if beaten_by(mine, rivals) is None:
                return ep
            self.counters["claims_lost"] += 1
        raise OpError(f"could not settle an address on {network} after {MAX_CLAIM_ROUNDS} "
                      "rounds of contention")

    # --- sandboxes --------------------------------------------------------------------------

    async def create(self, network: str, name: str | None, service: str | None = None,
                     slot: int | None = None, publish: bool = True) -> SandboxHandle:
        """A wired sandbox on NETWORK with a confirmed address. With publish=False the endpoint
        stays pending (no DNS, no peer FDB) until `publish` is called."""
        net = self.store.networks().get(network)
        if net is None:
            raise OpError(f"network {network} not found")
        if net.encrypted and self.overlay.encrypted is None:
            raise OpError(f"network {network} is encrypted and this agent has no encrypted "
                          "datapath (it runs without a cluster key); it carries no traffic here")
        try:
            if slot is not None and service:  # a task: `<service>.<slot>`
                name = f"{check_name('service', service)}.{slot}"
            else:
                name = check_name("sandbox", name) if name else f"run-{secrets.token_hex(3)}"
        except NetworkError as e:
            raise OpError(str(e)) from None
        # Keyed per node: during a failover two nodes may briefly run the same task, and their
        # endpoints must not overwrite each other.
        key = f"{endpoint_key(network, name)}@{self.node}"
        if slot is None and (any(e.name == name for e in self.store.endpoints(network)) or
                             key in {h.key for h in self.live.values()}):
            raise OpError(f"name {name} is already in use on {network}")
        try:
            ns = self.ns_name(name)
        except SandboxError as e:
            raise OpError(str(e)) from None
        holder = self.holders.get(ns)
        if holder is not None:
            raise OpError(f"sandbox {name}: its namespace name {ns} is already held by sandbox "
                          f"{holder} on this host; refusing to share it")
        self.holders[ns] = name  # no await between the check and the hold
        self.claiming.add(key)
        try:
            # The devices and the address do not depend on each other: one waits on netlink,
            # the other on the members' confirmations (a failover starts tasks at once).
            dev, ep = await asyncio.gather(
                self.overlay.ensure(network),
                self.allocate(network, name, {"service": service, "slot": slot, "sandbox": ns}),
                return_exceptions=True)
            if isinstance(ep, BaseException):
                raise ep
            if isinstance(dev, BaseException):  # no devices: withdraw the address too
                await self._teardown("withdrawing an address", self.state.delete(ENDPOINTS, key))
                raise dev
        except BaseException:
            self.holders.pop(ns, None)
            self._withdraw_claim(key)
            raise
        finally:
            self.claiming.discard(key)
        handle = SandboxHandle(name=name, network=network, ns=ns, ip=ep.ip, key=key)
        self.live[ns] = handle
        try:
            prefix = ipaddress.IPv4Network(net.subnet).prefixlen
            try:
                await self.overlay.nl.run(
                    create_sandbox(ns, dev.bridge, f"{ep.ip}/{prefix}", ep.mac,
                                   dev.mtu or self.overlay.mtu, gso_max_size=dev.gso_max_size,
                                   exclusive=True))
            except SandboxExists as e:  # not ours: leave it be, and refuse in one line
                handle.ns_taken = True
                raise OpError(str(e)) from None
            await write_identity(ns, task_hostname(name), ep.ip)
            if self.on_wired is not None:
                await self.on_wired(handle)
            udp, tcp = await asyncio.gather(
                asyncio.to_thread(nsfd.open_socket_in_netns, ns, socket.AF_INET,
                                  socket.SOCK_DGRAM, ("127.0.0.11", 53)),
                asyncio.to_thread(nsfd.open_socket_in_netns, ns, socket.AF_INET,
                                  socket.SOCK_STREAM, ("127.0.0.11", 53), reuse_addr=True))
            handle.listener = await self.dns.add_listener(("127.0.0.11", 53),
                                                          frozenset({network}), udp, tcp)
            handle.value = dict(ep.to_value())
            if publish:
                await self.publish(handle)
        except BaseException:
            await self.remove(handle)
            raise
        return handle

    def sweep_strays(self) -> int:
        """Our own sandbox endpoints (they name a `sandbox`) that no live sandbox of ours has
        and no start is claiming: withdrawn (see Services._sweep_strays). A count."""
        ours = {h.key for h in self.live.values()} | self.claiming
        gone = 0
        for key, data in self.store.view(ENDPOINTS).items():
            if data.get("node") != self.node or not data.get("sandbox") or data.get("kind") \
                    or key in ours:
                continue
            log.info("withdrawing endpoint %s, which has no sandbox here", key[:160])
            self.store.delete(ENDPOINTS, key, time.time())
            gone += 1
        if gone:
            self.state.changed()
        return gone

    def _withdraw_claim(self, key: str) -> None:
        """A start that failed or was cancelled before its sandbox existed (its slot moved to
        another host while the address was being confirmed, as when a restarted agent places
        every slot on itself before it has heard of the others) leaves no claim behind: a
        pending endpoint would hold its address, and its network against `network rm`, until
        the confirmation gave up. Synchronous: it runs while the task is being cancelled."""
        held = self.store.entry(ENDPOINTS, key)
        if held is not None and held.value is not None and held.writer == self.node:
            self.store.delete(ENDPOINTS, key, time.time())
            self.state.changed()

    async def publish(self, handle: SandboxHandle) -> None:
        """Clear `pending`: the name resolves and peers program their FDB for it."""
        value = dict(handle.value)
        value.pop("pending", None)
        await self.state.put(ENDPOINTS, handle.key, value)

    async def remove(self, handle: SandboxHandle) -> None:
        """Withdraw the endpoint first (so no one resolves a dying address), then tear down;
        all of it, even if our caller is cancelled meanwhile."""
        await run_to_end(self._remove(handle))

    async def _remove(self, handle: SandboxHandle) -> None:
        self.live.pop(handle.ns, None)
        try:
            await self._teardown("withdrawing an endpoint",
                                 self.state.delete(ENDPOINTS, handle.key))
            if handle.listener is not None:
                await self._teardown("removing a DNS listener",
                                     self.dns.remove_listener(handle.listener))
            if handle.cgroup is not None and self.cgroups is not None:
                await self._teardown("removing a task cgroup",
                                     asyncio.to_thread(self.cgroups.destroy, handle.cgroup))
            if not handle.ns_taken:  # a namespace we found already there is not ours to end
                await _kill_namespace_processes(handle.ns)
                await self._teardown("deleting a sandbox namespace",
                                     self.overlay.nl.run(delete_sandbox(handle.ns)))
        finally:
            if self.holders.get(handle.ns) == handle.name:
                del self.holders[handle.ns]

    async def _teardown(self, what: str, step: Awaitable[object]) -> None:
        """One teardown step: a failure is counted and logged in one line, and the steps after
        it still run (a half-removed sandbox must not keep the rest of it alive)."""
        try:
            await step
        except Exception as e:
            self.counters["sandbox_teardown_errors"] += 1
            self._log_once(what, e, "tasks.sandbox_teardown_errors")

    async def close(self) -> None:
        for handle in list(self.live.values()):
            await self.remove(handle)
        if self.cgroups is not None:
            await asyncio.to_thread(self.cgroups.close)

    async def launch(self, handle: SandboxHandle, argv: list[str], containment: Containment,
                     *, spec_env: dict[str, str], meta: dict[str, str], stdout: int,
                     stderr: int) -> asyncio.subprocess.Process:
        """Start ARGV contained in HANDLE's sandbox (platform/launch.py): its own namespaces,
        Docker's capabilities, a cgroup with the spec's limits. Raises one of LaunchFailure
        when this host cannot start it as asked."""
        if self.unavailable is not None or self.tools is None or self.cgroups is None:
            raise ContainerError(f"tasks cannot run on this host: {self.unavailable}")
        user = container.resolve_user(containment.user)
        container.check_mounts(containment.mounts, self.hidden)
        hostname = task_hostname(handle.name)
        env = container.task_env(
            {"MESHNET_TASK": handle.name, "MESHNET_NODE": self.node,
             "MESHNET_NETWORK": handle.network, "MESHNET_IP": handle.ip, **meta},
            spec_env, hostname, user["home"] if user else "/root")
        handle.cgroup = await asyncio.to_thread(
            self.cgroups.create, handle.name, containment.memory, containment.cpus,
            containment.pids)
        plan = container.build_plan(
            netns_path=str(nsfd.netns_path(handle.ns)), hostname=hostname,
            etc_files=etc_files(handle.ns), containment=containment, hidden=self.hidden,
            env=env, argv=argv, cgroup_procs=handle.cgroup.procs_files(), tools=self.tools,
            user=user)
        handle.plan = plan
        return await container.spawn(plan, self.tools, stdout=stdout, stderr=stderr)

    # --- meshctl run ------------------------------------------------------------------------

    async def op_run(self, args: dict[str, Any], send: SendEvent) -> Any:
        command = args.get("command")
        if not isinstance(command, list) or not command or \
                not all(isinstance(c, str) for c in command):
            raise OpError("run needs a command")
        try:
            containment = containment_from_args(args)
            spec_env = parse_env(args.get("env"))
        except ContainmentError as e:
            raise OpError(str(e)) from None
        extra = sorted(containment.caps - DEFAULT_CAPS)
        if extra and self.is_admin is not None and not self.is_admin():
            raise OpError(f"--cap-add {','.join(extra)}: capabilities beyond Docker's default "
                          "set take the admin role")
        handle = await self.create(str(args.get("network")), args.get("name") or None,
                                   publish=False)
        proc: asyncio.subprocess.Process | None = None
        try:
            proc = await self.launch(handle, command, containment, spec_env=spec_env, meta={},
                                     stdout=asyncio.subprocess.PIPE,
                                     stderr=asyncio.subprocess.PIPE)
            handle.value["containment"] = containment.summary()
            await self.publish(handle)  # the name resolves once the command runs
            assert proc.stdout is not None and proc.stderr is not None
            await asyncio.gather(_pump(proc.stdout, "stdout", send),
                                 _pump(proc.stderr, "stderr", send))
            code = await proc.wait()
        except LaunchFailure as e:
            raise OpError(str(e)) from None
        finally:
            if proc is not None and proc.returncode is None:
                await stop_process(proc)
            await self.remove(handle)
        return {"name": handle.name, "ip": handle.ip, "network": handle.network,
                "exit_code": code if code >= 0 else 128 - code,
                **containment.summary()}


MAX_ENV = 256


def parse_env(items: object) -> dict[str, str]:
    """--env K=V items; ContainmentError names the bad one."""
    if items is None:
        return {}
    if not isinstance(items, list) or len(items) > MAX_ENV:
        raise ContainmentError(f"--env: at most {MAX_ENV} items")
    env: dict[str, str] = {}
    for item in items:
        k, sep, v = str(item).partition("=")
        if not sep or not k or "\0" in k or "\0" in v:
            raise ContainmentError(f"--env {item!r} is not K=V")
        env[k] = v
    return env


async def _pump(stream: asyncio.StreamReader, name: str, send: SendEvent) -> None:
    while chunk := await stream.read(OUTPUT_CHUNK):
        await send({"stream": name, "data": chunk})


async def stop_process(proc: asyncio.subprocess.Process, grace: float = STOP_GRACE_S) -> None:
    """SIGTERM the process group, SIGKILL after a grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


async def _kill_namespace_processes(ns: str) -> None:
    """Anything still running inside a sandbox dies with it."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "pids", ns, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    out, _ = await proc.communicate()
    for pid in out.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
