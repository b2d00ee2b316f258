"""The invariants a chaos run checks after the final heal (issue 15), each a function that reads
a live lab and returns the violations it finds.

1. membership   every host sees every host alive (`members`).
2. definitions  acknowledged networks and services exist with their last acknowledged value on
                every host, nothing an acknowledged write removed (or never made) exists, and
                every host holds the same definitions. No meshctl command exposes the store's
                digest (`status` shows only an entry count and counters), so the definitions are
                compared in full: `network ls` and `service inspect` (less the fields that are
                task state, not definition: running, tasks, placement).
3. tasks        per service, running tasks == desired in every host's view (`service ps`), no
                slot running twice; physically: every running task has exactly one task cgroup
                with a live process and a sandbox namespace on its host, and no cgroup or
                sandbox of a task that is not running there is left.
4. addresses    endpoint addresses unique within each network (`network inspect`).
5. dns          `dns lookup SERVICE --network NET` answers exactly the IPs of the running tasks
                (the ones their own host reports running and whose process is alive), or for a
                vip service (issue 17) exactly its VIP on NET, and then `tasks.SERVICE` answers
                exactly the running tasks' IPs.
6. kernel       per plain network, the VXLAN device's FDB ("self" MAC -> VTEP, "master" static
                MAC) and permanent neighbour entries (IP -> MAC) name exactly the remote live
                endpoints; no device of a removed network. Encrypted networks have no VXLAN
                device and no kernel FDB (their MACs live in the userspace datapath): skipped.
7. service      from every host, GETs to http://frontend:8080/ by name; 0 failures.
8. agents       every agent alive (unless expected dead), RSS under a bound, no "Traceback" in
                any agent log.

Every check is read-only and never raises on a broken cluster: a query that fails or times out
is itself a violation, with the command and the error as evidence. Read-only queries go to the
agent's control socket with meshctl's own client (the same op and the same JSON document
`meshctl --json` prints), in parallel over the hosts: a meshctl process costs ~130 ms to start,
and the convergence loop (checks 1, 3 and 5) must stay well under 2 s on 5 hosts. Kernel state
is read with `bridge -j` / `ip -j` inside the host namespace (lab.exec); `run` (check 7) goes
through lab.ctl. Every one has a timeout.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from meshnet.cli.meshctl import Client
from meshnet.lab.demo_http import DEMO_DIR, TASK_MOUNT
from meshnet.lab.lab import Lab
from meshnet.platform import cgroups
from meshnet.platform.sandbox import node_sandboxes, sandbox_node_prefix, sandbox_ns_name

INVARIANTS = ("membership", "definitions", "tasks", "addresses", "dns", "kernel", "service",
              "agents")
# A healthy agent answers a read in milliseconds; a paused or partitioned one never does.
QUERY_TIMEOUT_S = 3.0
# `bridge`/`ip` inside a host namespace.
EXEC_TIMEOUT_S = 5.0
# Per request of check_service (urllib's timeout inside the probe), and the run's overhead.
REQUEST_TIMEOUT_S = 5.0
RUN_OVERHEAD_S = 30.0
# The agent's device names (platform/links.py, default prefix "mn").
VXLAN_DEV_RE = re.compile(r"mnvx-([0-9a-f]{6})")
BRIDGE_DEV_RE = re.compile(r"mnbr-([0-9a-f]{6})")
# A task cgroup is `<task>-<6 hex>` (platform/cgroups.py); a task is `<service>.<slot>`, and no
# `run` sandbox has a dot in its name (names are DNS labels).
TASK_CGROUP_RE = re.compile(r"(?P<task>[A-Za-z0-9][A-Za-z0-9_-]{0,62}\.[0-9]{1,10})-[0-9a-f]{6}")
TASK_NAME_RE = re.compile(r"[A-Za-z0-9_.-]*\.[0-9]{1,10}")
TRACEBACK = "Traceback"
# Evidence strings are cut to this many characters.
MAX_TEXT = 300
# The probe of check_service: N GETs of URL through demo_http's client (it connects to the
# first address of each rotated DNS answer), one line per request.
PROBE_SCRIPT = (
    "import sys\n"
    "sys.path.insert(0, sys.argv[3])\n"
    "import demo_http\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    try:\n"
    "        print('OK ' + demo_http._get(sys.argv[2], float(sys.argv[4])), flush=True)\n"
    "    except Exception as e:\n"
    "        print('FAIL %s: %s' % (type(e).__name__, e), flush=True)\n"
)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Violation:
    invariant: str  # one of INVARIANTS
    detail: str  # one line a human reads
    evidence: dict[str, Any]  # JSON-able facts that show it

    def to_dict(self) -> dict[str, Any]:
        return {"invariant": self.invariant, "detail": self.detail, "evidence": self.evidence}


@dataclass
class Expected:
    """What acknowledged writes (meshctl exit 0) say must exist after the heal.

    networks: name -> the fields the create acknowledged (e.g. {"subnet": "10.10.3.0/24"}, or {}).
    services: name -> {"network": str, "replicas": int} (the last acknowledged create/scale).
    A name removed by an acknowledged rm is absent. A name in maybe_* had an unacknowledged write
    (create, scale or rm) that may or may not have taken effect: it may exist or not, with any
    value. Any other name present in the cluster is a violation (a removed definition came back,
    or one appeared that no acknowledged write made)."""

    networks: dict[str, dict[str, Any]]
    services: dict[str, dict[str, Any]]
    maybe_networks: set[str] = field(default_factory=set)
    maybe_services: set[str] = field(default_factory=set)


# ---------------------------------------------------------------- queries


@dataclass(frozen=True)
class Answer:
    """One control-API query of one host: its result, or why there is none."""

    host: str
    command: str  # as meshctl spells it, for evidence
    result: Any = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def query(lab: Lab, host: str, op: str, args: Mapping[str, Any] | None = None, *,
          command: str | None = None, timeout: float | None = None) -> Answer:
    """What `meshctl --json COMMAND` prints on HOST, via the control socket; never raises.
    TIMEOUT: per socket operation, QUERY_TIMEOUT_S (read at call time) if None."""
    cmd = command or op.replace(".", " ")
    timeout = QUERY_TIMEOUT_S if timeout is None else timeout
    try:
        reply: dict[str, Any] | None = None
        for frame in Client(str(lab.socket_path(host))).call(op, dict(args or {}), timeout):
            reply = frame
        if reply is None:
            return Answer(host, cmd, error="no reply")
        if not reply.get("ok"):
            return Answer(host, cmd, error=str(reply.get("error") or "failed")[:MAX_TEXT])
        return Answer(host, cmd, result=reply.get("result"))
    except TimeoutError:
        return Answer(host, cmd, error=f"timed out after {timeout:g}s")
    except Exception as e:  # no agent, a reset connection, a bad frame: all are answers
        return Answer(host, cmd, error=f"{type(e).__name__}: {e}"[:MAX_TEXT])


def query_failed(invariant: str, a: Answer) -> Violation:
    return Violation(invariant, f"{a.host}: meshctl {a.command} failed: {a.error}",
                     {"host": a.host, "command": f"meshctl --json {a.command}",
                      "error": a.error})


def parallel(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """fn over items, concurrently (one slow host does not make the others wait)."""
    if len(items) <= 1:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(len(items), 16)) as ex:
        return list(ex.map(fn, items))


def _as_list(x: Any) -> list[Any]:
    return x if isinstance(x, list) else []


def _as_dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


@dataclass
class ServiceView:
    """One host's view of the services: name -> `service inspect` (None when it failed)."""

    host: str
    ls: Answer
    inspect: dict[str, Answer]

    def names(self) -> list[str]:
        return [str(d.get("name")) for d in _as_list(self.ls.result) if isinstance(d, dict)]

    def doc(self, name: str) -> dict[str, Any] | None:
        a = self.inspect.get(name)
        return a.result if a is not None and a.ok and isinstance(a.result, dict) else None

    def failures(self) -> list[Answer]:
        if not self.ls.ok:
            return [self.ls]
        return [a for a in self.inspect.values() if not a.ok and "not found" not in str(a.error)]


def service_view(lab: Lab, host: str, timeout: float | None = None) -> ServiceView:
    ls = query(lab, host, "service.ls", timeout=timeout)
    view = ServiceView(host, ls, {})
    if ls.ok:
        for name in view.names():
            view.inspect[name] = query(lab, host, "service.inspect", {"name": name},
                                       command=f"service inspect {name}", timeout=timeout)
    return view


def task_rows(doc: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """A `service inspect` document's task rows (task, node, state, ip)."""
    return [r for r in _as_list((doc or {}).get("tasks")) if isinstance(r, dict)]


def owner_running(views: Sequence[ServiceView]) -> dict[str, dict[str, dict[str, Any]]]:
    """service -> task -> row of the tasks running by their own host's word: each host's own
    rows from its own view, and, for a host that did not answer, what the others say of it."""
    answered = {v.host for v in views if v.ls.ok}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for v in views:
        for name in v.names():
            for row in task_rows(v.doc(name)):
                node = row.get("node")
                if row.get("state") != "running":
                    continue
                if node == v.host or node not in answered:
                    out.setdefault(name, {}).setdefault(str(row.get("task")), row)
    return out


# ---------------------------------------------------------------- physical task state


def pid_alive(pid: int) -> bool:
    """PID exists and is not a zombie."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return False
    try:
        return data[data.rindex(")") + 2:].split()[0] not in ("Z", "X")
    except (ValueError, IndexError):
        return False


def task_of_cgroup(name: str) -> str | None:
    """`backend.2-207e18` -> `backend.2`; None for a cgroup that is not a service task's."""
    m = TASK_CGROUP_RE.fullmatch(name)
    return m.group("task") if m else None


def sandbox_readable(ns: str, prefix: str, node: str) -> str | None:
    """The readable part of one of NODE's sandbox namespace names (the task or run name, maybe
    cut), or None if NS is not one of NODE's."""
    head = sandbox_node_prefix(prefix, node)
    if not ns.startswith(head):
        return None
    rest = ns[len(head):]
    readable, dash, _ = rest.rpartition("-")
    return readable if dash else ""


@dataclass
class HostTasks:
    """What physically runs on one host: task -> {cgroup name: live pids}, sandbox names."""

    host: str
    cgroups: dict[str, dict[str, list[int]]]
    sandboxes: list[str]
    error: str | None = None

    def live(self, task: str) -> dict[str, list[int]]:
        return {cg: pids for cg, pids in self.cgroups.get(task, {}).items() if pids}


def host_tasks(lab: Lab, host: str) -> HostTasks:
    """HOST's task cgroups (found as the agent and `lab down` find them) and sandboxes."""
    parent = f"{lab.cgroup_prefix}{host}"
    try:
        parents = [p for p in cgroups.find_parents(parent) if p.name == parent]
        found: dict[str, dict[str, list[int]]] = {}
        for name, cg in cgroups.task_cgroups(parents).items():
            task = task_of_cgroup(name)
            if task is not None:
                found.setdefault(task, {})[name] = sorted(p for p in cg.pids() if pid_alive(p))
        sandboxes = node_sandboxes(lab.sandbox_prefix, host)
    except Exception as e:
        return HostTasks(host, {}, [], f"{type(e).__name__}: {e}"[:MAX_TEXT])
    return HostTasks(host, found, sandboxes)


# ---------------------------------------------------------------- 1. membership


def check_membership(lab: Lab, hosts: list[str]) -> list[Violation]:
    """Every host sees every host alive."""
    out: list[Violation] = []
    for a in parallel(lambda h: query(lab, h, "members"), hosts):
        if not a.ok:
            out.append(query_failed("membership", a))
            continue
        states = {str(m.get("name")): str(m.get("state")) for m in _as_list(a.result)
                  if isinstance(m, dict)}
        bad = {h: states.get(h) for h in hosts if states.get(h) != "alive"}
        if bad:
            out.append(Violation(
                "membership",
                f"{a.host} sees " + ", ".join(f"{h} {s or 'missing'}" for h, s in bad.items()),
                {"host": a.host, "not_alive": bad, "members": states}))
    return out


# ---------------------------------------------------------------- 2. definitions

# `service inspect` fields that are task state (they change as tasks start), not definition.
NOT_DEFINITION = ("running", "tasks", "placement")


def definition(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k not in NOT_DEFINITION}


def _same_value(key: str, have: Any, want: Any) -> bool:
    if key == "subnet":
        try:
            return ipaddress.ip_network(str(have)) == ipaddress.ip_network(str(want))
        except ValueError:
            return False
    return bool(have == want)


def compare_expected(kind: str, have: Mapping[str, Mapping[str, Any]],
                     want: Mapping[str, Mapping[str, Any]], maybe: Iterable[str]) -> list[str]:
    """Problems of one host's KIND definitions (name -> document) against the acknowledged
    ones: one line each, e.g. "service web missing". Services' wanted fields are "network"
    (one of its networks) and "replicas"; any other field is compared as is."""
    maybe = set(maybe)
    problems = []
    for name, fields in sorted(want.items()):
        if name in maybe:
            continue
        doc = have.get(name)
        if doc is None:
            problems.append(f"{kind} {name} missing")
            continue
        for k, v in sorted(fields.items()):
            if kind == "service" and k == "network":
                nets = _as_list(doc.get("networks"))
                if v not in nets:
                    problems.append(f"{kind} {name} is on {nets}, acknowledged {v}")
            elif not _same_value(k, doc.get(k), v):
                problems.append(f"{kind} {name} has {k}={doc.get(k)!r}, acknowledged {v!r}")
    for name in sorted(set(have) - set(want) - maybe):
        problems.append(f"{kind} {name} exists but no acknowledged write made it "
                        "(or an acknowledged rm removed it)")
    return problems


def check_definitions(lab: Lab, hosts: list[str], expected: Expected) -> list[Violation]:
    """Acknowledged networks/services exist with their last acknowledged value on every host;
    no other exists (unless an unacknowledged write may have made it); every host holds the
    same definitions (compared in full: no command exposes the store's digest)."""
    out: list[Violation] = []

    def read(h: str) -> tuple[Answer, ServiceView]:
        return query(lab, h, "network.ls", command="network ls"), service_view(lab, h)

    views: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    for h, (nets, svcs) in zip(hosts, parallel(read, hosts), strict=True):
        failed = [a for a in (nets, *svcs.failures()) if not a.ok]
        out += [query_failed("definitions", a) for a in failed]
        if failed:
            continue
        networks = {str(n.get("name")): n for n in _as_list(nets.result) if isinstance(n, dict)}
        services = {n: definition(d) for n in svcs.names() if (d := svcs.doc(n)) is not None}
        views[h] = (networks, services)

    # Against the acknowledged writes, each problem once with the hosts that have it.
    problems: dict[str, list[str]] = {}
    for h, (networks, services) in views.items():
        for p in compare_expected("network", networks, expected.networks,
                                  expected.maybe_networks) + \
                compare_expected("service", services, expected.services,
                                 expected.maybe_services):
            problems.setdefault(p, []).append(h)
    for p, on in problems.items():
        name = p.split()[1]
        kind = p.split()[0]
        out.append(Violation("definitions", f"{p} on {', '.join(on)}", {
            "kind": kind, "name": name, "hosts": on,
            "acknowledged": (expected.networks if kind == "network"
                             else expected.services).get(name),
            "seen": {h: views[h][0 if kind == "network" else 1].get(name) for h in on}}))

    # Every host the same.
    for idx, kind in ((0, "network"), (1, "service")):
        names = sorted({n for v in views.values() for n in v[idx]})
        for name in names:
            seen = {h: v[idx].get(name) for h, v in views.items()}
            distinct = {json.dumps(d, sort_keys=True, default=str) for d in seen.values()}
            if len(distinct) > 1:
                lacking = [h for h, d in seen.items() if d is None]
                detail = (f"hosts disagree on {kind} {name}: {', '.join(lacking)} lack it"
                          if lacking else f"hosts disagree on {kind} {name}'s definition")
                out.append(Violation("definitions", detail,
                                     {"kind": kind, "name": name, "per_host": seen}))
    return out


# ---------------------------------------------------------------- 3. tasks


def check_tasks(lab: Lab, hosts: list[str], expected: Expected) -> list[Violation]:
    """Per service, running == desired in every host's view, no slot running twice; physically,
    each running task has one live cgroup and a sandbox on its host, and nothing of a task not
    running there (a removed slot, service or network) is left: cgroup, process or sandbox."""
    out: list[Violation] = []
    views = parallel(lambda h: service_view(lab, h), hosts)
    phys = {h: host_tasks(lab, h) for h in hosts}

    for v in views:
        out += [query_failed("tasks", a) for a in v.failures()]
        for name in v.names():
            doc = v.doc(name)
            if doc is None:
                continue
            rows = task_rows(doc)
            running = [r for r in rows if r.get("state") == "running"]
            desired = doc.get("replicas")
            summary = [{k: r.get(k) for k in ("task", "node", "state", "ip")} for r in rows]
            if len(running) != desired:
                out.append(Violation(
                    "tasks", f"{v.host} sees {name} {len(running)}/{desired} running",
                    {"host": v.host, "service": name, "desired": desired,
                     "running": len(running), "tasks": summary}))
            by_task: dict[str, list[str]] = {}
            for r in running:
                by_task.setdefault(str(r.get("task")), []).append(str(r.get("node")))
            for task, nodes in sorted(by_task.items()):
                if len(nodes) > 1:
                    out.append(Violation(
                        "tasks", f"{v.host} sees {task} running on {', '.join(nodes)}",
                        {"host": v.host, "task": task, "nodes": nodes}))

    running_at: dict[str, set[str]] = {h: set() for h in hosts}
    for tasks in owner_running(views).values():
        for task, row in tasks.items():
            if row.get("node") in running_at:
                running_at[str(row.get("node"))].add(task)

    live_on: dict[str, list[str]] = {}
    for h in hosts:
        p = phys[h]
        if p.error is not None:
            out.append(Violation("tasks", f"{h}: cannot read its task cgroups: {p.error}",
                                 {"host": h, "error": p.error}))
            continue
        mine = running_at[h]
        for task in sorted(mine):
            live = p.live(task)
            if not live:
                out.append(Violation(
                    "tasks", f"{task} is running on {h} by its view, but no process of it is",
                    {"host": h, "task": task, "cgroups": p.cgroups.get(task, {})}))
            elif len(live) > 1:
                out.append(Violation("tasks", f"{task} runs {len(live)} times on {h}",
                                     {"host": h, "task": task, "cgroups": live}))
            if sandbox_ns_name(lab.sandbox_prefix, h, task) not in p.sandboxes:
                out.append(Violation(
                    "tasks", f"{task} is running on {h} but has no sandbox namespace",
                    {"host": h, "task": task,
                     "namespace": sandbox_ns_name(lab.sandbox_prefix, h, task)}))
        for task, cgs in sorted(p.cgroups.items()):
            if any(cgs.values()):
                live_on.setdefault(task, []).append(h)
            if task not in mine:
                what = "processes" if any(cgs.values()) else "an empty cgroup"
                out.append(Violation(
                    "tasks", f"{h} has {what} of {task}, which is not running there",
                    {"host": h, "task": task, "cgroups": cgs}))
        want = {sandbox_ns_name(lab.sandbox_prefix, h, t) for t in mine}
        for ns in sorted(set(p.sandboxes) - want):
            readable = sandbox_readable(ns, lab.sandbox_prefix, h) or ""
            if TASK_NAME_RE.fullmatch(readable):  # a run's sandbox is the run's business
                out.append(Violation(
                    "tasks", f"{h} has sandbox {ns} of {readable}, which is not running there",
                    {"host": h, "namespace": ns, "task": readable}))
    for task, on in sorted(live_on.items()):
        if len(on) > 1:
            out.append(Violation("tasks", f"{task} has live processes on {', '.join(on)}",
                                 {"task": task, "hosts": on,
                                  "cgroups": {h: phys[h].cgroups.get(task) for h in on}}))
    return out


# ---------------------------------------------------------------- 4. addresses


def duplicate_addresses(endpoints: Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """ip -> ["name@node", ...] for every IP more than one endpoint holds."""
    by_ip: dict[str, list[str]] = {}
    for ep in endpoints:
        by_ip.setdefault(str(ep.get("ip")), []).append(f"{ep.get('name')}@{ep.get('node')}")
    return {ip: sorted(who) for ip, who in sorted(by_ip.items()) if len(who) > 1}


def check_addresses(lab: Lab, hosts: list[str]) -> list[Violation]:
    """Endpoint addresses are unique within each network, in every host's view."""
    out: list[Violation] = []

    def read(h: str) -> tuple[Answer, list[Answer]]:
        ls = query(lab, h, "network.ls", command="network ls")
        names = [str(n.get("name")) for n in _as_list(ls.result) if isinstance(n, dict)]
        return ls, [query(lab, h, "network.inspect", {"name": n}, command=f"network inspect {n}")
                    for n in names]

    seen: dict[tuple[str, str, tuple[str, ...]], list[str]] = {}
    for h, (ls, inspects) in zip(hosts, parallel(read, hosts), strict=True):
        if not ls.ok:
            out.append(query_failed("addresses", ls))
        for a in inspects:
            if not a.ok:
                if "not found" not in str(a.error):  # removed meanwhile
                    out.append(query_failed("addresses", a))
                continue
            doc = _as_dict(a.result)
            eps = [e for e in _as_list(doc.get("endpoints")) if isinstance(e, dict)]
            for ip, who in duplicate_addresses(eps).items():
                seen.setdefault((str(doc.get("name")), ip, tuple(who)), []).append(h)
    for (net, ip, holders), on in sorted(seen.items()):
        out.append(Violation("addresses", f"{ip} on {net} is held by {', '.join(holders)} "
                                          f"(seen on {', '.join(on)})",
                             {"network": net, "ip": ip, "endpoints": list(holders), "hosts": on}))
    return out


# ---------------------------------------------------------------- 5. DNS


def check_dns(lab: Lab, hosts: list[str], expected: Expected,
              names: Iterable[str] = ()) -> list[Violation]:
    """On every host, each service's name on its network answers exactly the IPs of its
    running tasks: running by their own host's word, with a live process. No dead address. A
    vip service's name answers exactly its VIP there, and `tasks.<service>` those IPs.
    Looked up on every host: every service any host knows, every one EXPECTED names (maybe ones
    too), and NAMES (e.g. services an acknowledged rm removed): a service with no running task
    must answer nothing."""
    out: list[Violation] = []
    views = parallel(lambda h: service_view(lab, h), hosts)
    phys = {h: host_tasks(lab, h) for h in hosts}
    running = owner_running(views)
    truth: dict[str, dict[str, str]] = {}  # service -> ip -> task@node
    dead: dict[str, dict[str, str]] = {}  # service -> ip -> task@node (no live process)
    for svc, tasks in running.items():
        for task, row in tasks.items():
            node, ip = str(row.get("node")), row.get("ip")
            if not ip:
                continue
            p = phys.get(node)
            alive = p is None or p.error is not None or bool(p.live(task))
            (truth if alive else dead).setdefault(svc, {})[str(ip)] = f"{task}@{node}"
    # service -> the network its name is looked up on (a task joins its first network only,
    # services.py _run_once); None: every network.
    network_of: dict[str, str | None] = {n: None for n in names}
    network_of.update({n: None for n in expected.maybe_services})
    network_of.update({n: str(f["network"]) if f.get("network") else None
                       for n, f in expected.services.items()})
    vip_of: dict[str, str] = {}  # vip service -> its VIP on the network it is looked up on
    for v in views:
        for n in v.names():
            doc = v.doc(n) or {}
            nets = _as_list(doc.get("networks"))
            if nets:
                network_of[n] = str(nets[0])
                vip = _as_dict(doc.get("vips")).get(str(nets[0]))
                if doc.get("endpoint_mode") == "vip" and vip:
                    vip_of[n] = str(vip)

    def lookups(v: ServiceView) -> list[tuple[str, str, str | None, Answer]]:
        """(service, name looked up, network, answer): a vip service's name and its tasks."""
        res = []
        for svc, net in sorted(network_of.items()):
            for name in (svc, f"tasks.{svc}") if svc in vip_of else (svc,):
                args = {"name": name, "network": net, "type": "A"}
                cmd = f"dns lookup {name}" + (f" --network {net}" if net else "")
                res.append((svc, name, net, query(lab, v.host, "dns.lookup", args, command=cmd)))
        return res

    for v, found in zip(views, parallel(lookups, views), strict=True):
        out += [query_failed("dns", a) for a in v.failures()]
        for svc, name, net, a in found:
            if a.ok:
                answers = sorted(str(x) for x in _as_list(_as_dict(a.result).get("answers")))
            elif "no A records" in str(a.error):
                answers = []
            else:
                out.append(query_failed("dns", a))
                continue
            want = {vip_of[svc]: "VIP"} if name == svc and svc in vip_of else truth.get(svc, {})
            if set(answers) == set(want):
                continue
            stale = sorted(set(answers) - set(want))
            missing = sorted(set(want) - set(answers))
            out.append(Violation(
                "dns", f"{v.host}: {name} on {net or 'any network'} answers {answers or 'nothing'}"
                + (f"; dead {stale}" if stale else "")
                + (f"; missing {missing}" if missing else ""),
                {"host": v.host, "service": svc, "network": net, "answers": answers,
                 "running": want, "dead": {ip: dead.get(svc, {}).get(ip, "no running task")
                                           for ip in stale},
                 "missing": missing}))
    return out


# ---------------------------------------------------------------- 6. kernel


def parse_fdb_json(text: str) -> tuple[dict[str, list[str]], set[str]]:
    """`bridge -j fdb show dev VXLAN` -> ("self" entries MAC -> [VTEP IPs], MACs with a static
    "master" entry). The bridge's own address (master, permanent) is not an entry we make."""
    selfs: dict[str, list[str]] = {}
    masters: set[str] = set()
    data = json.loads(text) if text.strip() else []
    for e in data if isinstance(data, list) else []:
        if not isinstance(e, dict) or not e.get("mac"):
            continue
        mac = str(e["mac"]).lower()
        flags = e.get("flags") or []
        if "self" in flags:
            if e.get("dst"):
                selfs.setdefault(mac, []).append(str(e["dst"]))
        elif e.get("master") and e.get("state") != "permanent":
            masters.add(mac)
    return {m: sorted(d) for m, d in selfs.items()}, masters


def parse_neigh_json(text: str) -> dict[str, str]:
    """`ip -j neigh show dev VXLAN` -> permanent entries IP -> MAC."""
    out: dict[str, str] = {}
    data = json.loads(text) if text.strip() else []
    for e in data if isinstance(data, list) else []:
        if isinstance(e, dict) and "PERMANENT" in (e.get("state") or []) and e.get("lladdr"):
            out[str(e.get("dst"))] = str(e["lladdr"]).lower()
    return out


def parse_links_json(text: str) -> list[str]:
    """`ip -j link show` -> interface names."""
    data = json.loads(text) if text.strip() else []
    return [str(e["ifname"]) for e in data if isinstance(e, dict) and e.get("ifname")] \
        if isinstance(data, list) else []


def fdb_problems(selfs: Mapping[str, list[str]], masters: set[str], neigh: Mapping[str, str],
                 want_fdb: Mapping[str, str], want_neigh: Mapping[str, str]
                 ) -> list[dict[str, Any]]:
    """Differences between one VXLAN device's entries and the wanted ones (MAC -> VTEP,
    IP -> MAC), each {"entry", "key", "have", "want"}."""
    out: list[dict[str, Any]] = []
    for mac in sorted(set(selfs) | set(want_fdb)):
        have, want = selfs.get(mac), want_fdb.get(mac)
        if have != ([want] if want else None):
            out.append({"entry": "fdb", "key": mac, "have": have, "want": want})
    for mac in sorted(masters ^ set(want_fdb)):
        out.append({"entry": "fdb master", "key": mac, "have": mac in masters,
                    "want": mac in want_fdb})
    for ip in sorted(set(neigh) | set(want_neigh)):
        if neigh.get(ip) != want_neigh.get(ip):
            out.append({"entry": "neigh", "key": ip, "have": neigh.get(ip),
                        "want": want_neigh.get(ip)})
    return out


def _exec(lab: Lab, host: str, argv: list[str]) -> tuple[str | None, str | None]:
    """(stdout, None) or (None, why); never raises."""
    try:
        r = lab.exec(host, argv, capture_output=True, timeout=EXEC_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"{' '.join(argv)}: timed out after {EXEC_TIMEOUT_S:g}s"
    except Exception as e:
        return None, f"{' '.join(argv)}: {type(e).__name__}: {e}"[:MAX_TEXT]
    if r.returncode != 0:
        return None, f"{' '.join(argv)}: exit {r.returncode}: {r.stderr.strip()}"[:MAX_TEXT]
    return r.stdout, None


def check_kernel(lab: Lab, hosts: list[str]) -> list[Violation]:
    """Per host and plain network, the VXLAN device's FDB and neighbour entries name exactly the
    remote endpoints on members that host sees alive (MAC -> the owner's underlay IP, IP -> MAC),
    as their owners report them; no device of a network that is gone. Encrypted networks are
    skipped: no VXLAN device, no kernel FDB (the userspace datapath holds their MACs)."""
    out: list[Violation] = []

    def read(h: str) -> tuple[Answer, Answer, list[Answer]]:
        members = query(lab, h, "members")
        ls = query(lab, h, "network.ls", command="network ls")
        names = [str(n.get("name")) for n in _as_list(ls.result) if isinstance(n, dict)]
        return members, ls, [query(lab, h, "network.inspect", {"name": n},
                                   command=f"network inspect {n}") for n in names]

    reads = dict(zip(hosts, parallel(read, hosts), strict=True))
    docs: dict[str, dict[str, dict[str, Any]]] = {}  # host -> network -> inspect document
    for h, (members, ls, inspects) in reads.items():
        for a in (members, ls, *inspects):
            if not a.ok and "not found" not in str(a.error):
                out.append(query_failed("kernel", a))
        docs[h] = {str(d.get("name")): d for a in inspects if a.ok
                   for d in [_as_dict(a.result)]}
    answered = [h for h in hosts if reads[h][1].ok]
    any_view = docs[answered[0]] if answered else {}

    def owners_endpoints(net: str, fallback: Mapping[str, dict[str, Any]]
                         ) -> list[dict[str, Any]]:
        """NET's endpoints, each as its own host reports it (else as the fallback view has it)."""
        eps: list[dict[str, Any]] = []
        for e in _as_list(fallback.get(net, {}).get("endpoints")):
            if isinstance(e, dict) and (e.get("node") not in answered):
                eps.append(e)
        for owner in answered:
            eps += [e for e in _as_list(docs[owner].get(net, {}).get("endpoints"))
                    if isinstance(e, dict) and e.get("node") == owner]
        return eps

    def check_host(h: str) -> list[Violation]:
        res: list[Violation] = []
        members, _, _ = reads[h]
        view = docs[h] if reads[h][1].ok else any_view
        vtep = {str(m.get("name")): str(m.get("addr", "")).rpartition(":")[0]
                for m in _as_list(members.result)
                if isinstance(m, dict) and m.get("state") == "alive"}
        if not members.ok:  # the agent does not say: take the lab's running hosts
            vtep = {s.name: s.underlay_ip for s in lab.status() if s.running}
        plain = {int(d["vni"]): n for n, d in view.items()
                 if not d.get("encrypted") and isinstance(d.get("vni"), int)}
        encrypted = {int(d["vni"]) for d in view.values()
                     if d.get("encrypted") and isinstance(d.get("vni"), int)}
        text, err = _exec(lab, h, ["ip", "-j", "link", "show"])
        if err is not None or text is None:
            return [Violation("kernel", f"{h}: cannot list links: {err}",
                              {"host": h, "error": err})]
        links = set(parse_links_json(text))
        for dev in sorted(links):
            vx, br = VXLAN_DEV_RE.fullmatch(dev), BRIDGE_DEV_RE.fullmatch(dev)
            vni = int((vx or br).group(1), 16) if (vx or br) else None  # type: ignore[union-attr]
            if vni is None:
                continue
            if (vx and vni not in plain) or (br and vni not in plain and vni not in encrypted):
                res.append(Violation("kernel", f"{h}: {dev} is left from a network that is gone",
                                     {"host": h, "device": dev, "vni": vni}))
        for vni, net in sorted(plain.items()):
            dev = f"mnvx-{vni:06x}"
            if dev not in links:
                res.append(Violation("kernel", f"{h}: network {net} has no VXLAN device {dev}",
                                     {"host": h, "network": net, "device": dev}))
                continue
            want_fdb: dict[str, str] = {}
            want_neigh: dict[str, str] = {}
            for e in owners_endpoints(net, view):
                node = str(e.get("node"))
                if node == h or node not in vtep:
                    continue
                mac = str(e.get("mac")).lower()
                want_fdb[mac] = vtep[node]
                want_neigh[str(e.get("ip"))] = mac
            fdb_text, err1 = _exec(lab, h, ["bridge", "-j", "fdb", "show", "dev", dev])
            neigh_text, err2 = _exec(lab, h, ["ip", "-j", "neigh", "show", "dev", dev])
            if fdb_text is None or neigh_text is None:
                res.append(Violation("kernel", f"{h}: cannot read {dev}: {err1 or err2}",
                                     {"host": h, "device": dev, "error": err1 or err2}))
                continue
            try:
                selfs, masters = parse_fdb_json(fdb_text)
                neigh = parse_neigh_json(neigh_text)
            except ValueError as e:
                res.append(Violation("kernel", f"{h}: unreadable entries of {dev}: {e}",
                                     {"host": h, "device": dev, "error": str(e)}))
                continue
            for p in fdb_problems(selfs, masters, neigh, want_fdb, want_neigh):
                kind = "stale" if p["want"] in (None, False) else \
                    "missing" if p["have"] in (None, False) else "wrong"
                res.append(Violation(
                    "kernel", f"{h}: {kind} {p['entry']} entry {p['key']} on {dev} ({net}): "
                    f"has {p['have']}, wants {p['want']}",
                    {"host": h, "network": net, "device": dev, **p}))
        return res

    for found in parallel(check_host, hosts):
        out += found
    return out


# ---------------------------------------------------------------- 7. service


def parse_probe(stdout: str, n: int, frontend: str) -> tuple[int, int, list[str]]:
    """(served, failed, failure lines) of a probe that made N requests: a request is served
    when its answer comes from FRONTEND's task and names no backend error; a request with no
    line at all (the probe died) failed."""
    served = 0
    bad: list[str] = []
    for line in stdout.splitlines():
        if line.startswith("OK ") and line[3:].startswith(f"{frontend}.") \
                and "backend error" not in line:
            served += 1
        elif line.startswith(("OK ", "FAIL ")):
            bad.append(line[:MAX_TEXT])
    served = min(served, n)
    return served, n - served, bad


def check_service(lab: Lab, hosts: list[str], frontend: str = "frontend",
                  network: str = "appnet", requests: int = 100
                  ) -> tuple[list[Violation], dict[str, int]]:
    """REQUESTS GETs of http://FRONTEND:8080/ by name, spread over HOSTS, one `run` per host
    (run concurrently); 0 failures. Returns (violations, {"served": n, "failed": m})."""
    if not hosts or requests <= 0:
        return [], {"served": 0, "failed": 0}
    share = [requests // len(hosts) + (1 if i < requests % len(hosts) else 0)
             for i in range(len(hosts))]
    url = f"http://{frontend}:8080/"

    def probe(item: tuple[str, int]) -> tuple[str, int, int, int, list[str], str | None]:
        h, n = item
        if n == 0:
            return h, 0, 0, 0, [], None
        name = f"invprobe-{secrets.token_hex(3)}"
        timeout = RUN_OVERHEAD_S + n * (REQUEST_TIMEOUT_S + 1)
        try:
            r = lab.ctl(h, ["run", "--network", network, "--name", name, *TASK_MOUNT, "--",
                            "python3", "-c", PROBE_SCRIPT, str(n), url, DEMO_DIR,
                            str(REQUEST_TIMEOUT_S)], capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else \
                (e.stdout or "")
            served, failed, bad = parse_probe(out, n, frontend)
            return h, n, served, failed, bad, f"meshctl run timed out after {timeout:g}s"
        except Exception as e:
            return h, n, 0, n, [], f"meshctl run: {type(e).__name__}: {e}"[:MAX_TEXT]
        served, failed, bad = parse_probe(r.stdout, n, frontend)
        err = None if r.returncode == 0 else \
            f"meshctl run exited {r.returncode}: {r.stderr.strip()[-MAX_TEXT:]}"
        return h, n, served, failed, bad, err

    out: list[Violation] = []
    total_served = total_failed = 0
    for h, n, served, failed, bad, err in parallel(probe, list(zip(hosts, share, strict=True))):
        total_served += served
        total_failed += failed
        if failed or err:
            out.append(Violation(
                "service", f"{h}: {failed} of {n} requests to {url} failed"
                + (f" ({err})" if err else ""),
                {"host": h, "url": url, "requests": n, "served": served, "failed": failed,
                 "failures": bad[:10], "error": err}))
    return out, {"served": total_served, "failed": total_failed}


# ---------------------------------------------------------------- 8. agents


def rss_mb(pid: int) -> float | None:
    """VmRSS of PID in MiB, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def agent_rss_mb(lab: Lab) -> dict[str, float]:
    """host -> its running agent's RSS in MiB."""
    out = {}
    for s in lab.status():
        if s.running and s.pid is not None and (mb := rss_mb(s.pid)) is not None:
            out[s.name] = round(mb, 1)
    return out


def tracebacks(text: str) -> list[str]:
    """The lines of an agent log that carry a traceback."""
    return [line for line in text.splitlines() if TRACEBACK in line]


def log_tracebacks(lab: Lab, host: str, offset: int = 0) -> tuple[list[str], int]:
    """(traceback lines of HOST's agent log from byte OFFSET on, the log's size now)."""
    try:
        with open(lab.log_path(host), "rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return [], offset
    return tracebacks(data.decode(errors="replace")), offset + len(data)


def log_sizes(lab: Lab, hosts: Iterable[str]) -> dict[str, int]:
    """host -> its agent log's size: pass as log_offsets to look only at what comes after."""
    out = {}
    for h in hosts:
        try:
            out[h] = os.path.getsize(lab.log_path(h))
        except OSError:
            out[h] = 0
    return out


def check_agents(lab: Lab, hosts: list[str], *, expected_dead: set[str] | None = None,
                 rss_bound_mb: float = 250.0,
                 log_offsets: dict[str, int] | None = None) -> list[Violation]:
    """Every agent not in EXPECTED_DEAD runs, each running agent's RSS is under RSS_BOUND_MB, and
    no agent log (from LOG_OFFSETS[host] on, if given) holds a traceback."""
    dead_ok = expected_dead or set()
    out: list[Violation] = []
    try:
        status = {s.name: s for s in lab.status()}
    except Exception as e:
        return [Violation("agents", f"cannot read the lab's status: {e}", {"error": str(e)})]
    for h in hosts:
        s = status.get(h)
        if s is None or not s.running:
            if h not in dead_ok:
                out.append(Violation("agents", f"the agent on {h} is not running",
                                     {"host": h, "known": s is not None}))
        elif s.pid is not None:
            mb = rss_mb(s.pid)
            if mb is not None and mb > rss_bound_mb:
                out.append(Violation(
                    "agents", f"the agent on {h} uses {mb:.1f} MiB RSS (bound {rss_bound_mb:g})",
                    {"host": h, "pid": s.pid, "rss_mb": round(mb, 1),
                     "bound_mb": rss_bound_mb}))
        offset = (log_offsets or {}).get(h, 0)
        lines, _ = log_tracebacks(lab, h, offset)
        if lines:
            out.append(Violation(
                "agents", f"{h}'s agent log holds {len(lines)} traceback line(s): "
                f"{lines[0][:120]}",
                {"host": h, "log": str(lab.log_path(h)), "offset": offset, "count": len(lines),
                 "lines": [ln[:MAX_TEXT] for ln in lines[:5]]}))
    return out


# ---------------------------------------------------------------- all


def check_all(lab: Lab, hosts: list[str], expected: Expected, *,
              expected_dead: set[str] | None = None, rss_bound_mb: float = 250.0,
              log_offsets: dict[str, int] | None = None, frontend: str = "frontend",
              network: str = "appnet", requests: int = 100,
              skip: Iterable[str] = (), stats: dict[str, int] | None = None,
              dns_names: Iterable[str] = ()) -> list[Violation]:
    """Every invariant, in order. SKIP names invariants not to check (e.g. "service"); STATS,
    if given, receives check_service's {"served", "failed"}; DNS_NAMES go to check_dns."""
    skipped = set(skip)
    out: list[Violation] = []
    if "membership" not in skipped:
        out += check_membership(lab, hosts)
    if "definitions" not in skipped:
        out += check_definitions(lab, hosts, expected)
    if "tasks" not in skipped:
        out += check_tasks(lab, hosts, expected)
    if "addresses" not in skipped:
        out += check_addresses(lab, hosts)
    if "dns" not in skipped:
        out += check_dns(lab, hosts, expected, dns_names)
    if "kernel" not in skipped:
        out += check_kernel(lab, hosts)
    if "service" not in skipped:
        found, counts = check_service(lab, hosts, frontend, network, requests)
        out += found
        if stats is not None:
            stats.update(counts)
    if "agents" not in skipped:
        out += check_agents(lab, hosts, expected_dead=expected_dead, rss_bound_mb=rss_bound_mb,
                            log_offsets=log_offsets)
    return out
