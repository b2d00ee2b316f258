"""Services: specs in the store, placement by hashing on every agent, tasks supervised here.

Every agent computes the same placement from the same inputs (the alive members and the
service specs) and runs exactly the tasks that fall to itself. Each task is a sandbox plus a
supervised process: its endpoint (and so its DNS name) exists only while the process runs,
its output goes to a size-capped log, and it restarts by its policy. Task states are written
to the `tasks` table (owned by the node, so a dead node's tasks vanish from every view).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from meshnet.agent.control import Handler, OpError, SendEvent
from meshnet.agent.gossip import STREAM_LOG_LINES, STREAM_LOGS, GossipTransport, StreamError
from meshnet.agent.health import TaskHealth, TaskProbe
from meshnet.agent.logs import LogOnce, error_line
from meshnet.agent.rollouts import (
    OwnerWatch,
    Rollouts,
    manual_rollback,
    updated_value,
    with_update_policy,
)
from meshnet.agent.sandboxes import (
    LaunchFailure,
    Sandboxes,
    SandboxHandle,
    parse_env,
    stop_process,
)
from meshnet.agent.state_service import StateService
from meshnet.agent.tasklogs import (
    FOLLOW_POLL_S,
    HUNG_UP,
    LOG_SUFFIX,
    LineStamper,
    LogGatherer,
    logs_to_prune,
    open_regular,
    parse_lines_request,
    plain_text,
    read_span,
    serve_lines,
    stamped,
)
from meshnet.agent.tasklogs import task_of_log as _task_of_log
from meshnet.agent.vips import VipBalancer
from meshnet.aioutil import run_to_end
from meshnet.containment import Containment, ContainmentError, summary_view
from meshnet.containment import from_args as containment_from_args
from meshnet.containment import from_value as containment_from_value
from meshnet.crypto.keyring import KeyringError
from meshnet.events import MAX_TAIL_LINES, iso_us
from meshnet.health import (
    DRAINING,
    STARTING,
    UNHEALTHY,
    HealthError,
    HealthSpec,
    health_from_args,
    health_spec,
)
from meshnet.lb.core import VIP, endpoint_mode
from meshnet.membership import Addr, Member
from meshnet.metrics import TASK_START_BUCKETS, Histogram
from meshnet.placement import (
    Constraint,
    NodeInfo,
    PlacementError,
    ServiceSpec,
    parse_constraint,
    place,
    seed64,
)
from meshnet.placement.spec import MAX_REPLICAS
from meshnet.state import SERVICES, Service
from meshnet.state.ingress import service_ports
from meshnet.state.networks import NetworkError, check_name
from meshnet.state.ports import PortError, parse_ports
from meshnet.state.rolling import DRAIN_S
from meshnet.state.store import LIFE_FIELD
from meshnet.state.validate import (
    RESTART_CONDITIONS,
    TASKS,
    ValidationError,
    check_command,
    check_value,
    restart_policy,
)

# MAX_REPLICAS (placement/spec.py, the bound ServiceSpec enforces), RESTART_CONDITIONS and TASKS
# (state/validate.py) are the replicated schema's: `service create` applies the same rules.
__all__ = ["MAX_REPLICAS", "RESTART_CONDITIONS", "TASKS", "Restart", "Services", "Task",
           "parse_spec", "to_placement"]

log = logging.getLogger("meshnet.services")

# Each task's output is kept to this much (plus one rotated file of the same size).
LOG_CAP_BYTES = 1 << 20
# `service logs` returns at most this much of each task's log.
LOG_TAIL_BYTES = 64 << 10
# A task's log is `<service>.<slot>.log` (LOG_SUFFIX) in the log directory (a slot as
# state/validate.py's task names have it), one stamped line per line of output (tasklogs.py);
# `service logs` matches these names literally, never as a glob or path.
_SLOT_RE = re.compile(r"[0-9]{1,10}")
# A task asked to stop gets SIGTERM, then SIGKILL after this long (Docker's default is 10 s).
STOP_GRACE_S = 5.0
# Removed services' task logs are looked for this often (tasklogs.logs_to_prune).
LOG_PRUNE_PERIOD_S = 60.0
# The scheduler re-checks even with no change, so a lost wake-up never leaves a slot empty.
RECONCILE_PERIOD_S = 2.0
# An agent that has someone to join places no task until a member answers, or this long: alone,
# every slot hashes to it, and a restarted agent in a busy cluster would claim addresses and
# build sandboxes for slots it hands back a second later (each then restarted elsewhere).
START_GRACE_S = 5.0
# Exit code recorded when the sandbox or process could not be set up (as Docker's 125).
START_FAILED = 125


@dataclass
class Restart:
    condition: str = "any"
    delay: float = 1.0
    max_attempts: int = 0  # 0: unlimited
    backoff: float = 2.0
    max_delay: float = 30.0


@dataclass
class Task:
    service: str
    slot: int
    spec: dict[str, Any]
    state: str = "starting"
    exit_code: int | None = None
    restarts: int = 0
    ip: str | None = None
    runner: asyncio.Task[None] | None = None
    handle: SandboxHandle | None = None
    proc: asyncio.subprocess.Process | None = None
    stopping: bool = False
    started_at: float = field(default_factory=time.time)
    containment: Containment | None = None
    health: TaskHealth = field(default_factory=TaskHealth)  # its check (agent/health.py)
    # Its spec's version, and what judges it during a rolling update (agent/rollouts.py).
    watch: OwnerWatch = field(default_factory=OwnerWatch)

    @property
    def name(self) -> str:
        return f"{self.service}.{self.slot}"


def parse_spec(args: dict[str, Any], networks: set[str]) -> Service:
    """Validate a `service create` request into a Service; OpError with one clear line.

    The flags get messages in their own words; the value built from them is then checked whole
    by the replicated schema (state/validate.py check_value), the same check every agent makes
    when the value reaches it, so a service accepted here is never refused elsewhere."""
    try:
        name = check_name("service", args.get("name"))
    except NetworkError as e:
        raise OpError(str(e)) from None
    nets = args.get("networks") or []
    if not isinstance(nets, list) or not nets:
        raise OpError("service create needs --network")
    for n in nets:
        if n not in networks:
            raise OpError(f"network {n} not found")
    mode = args.get("mode") or "replicated"
    if mode not in ("replicated", "global"):
        raise OpError(f"unknown mode {mode!r}")
    replicas = args.get("replicas")
    replicas = 1 if replicas is None else replicas
    if type(replicas) is not int or not 0 <= replicas <= MAX_REPLICAS:
        raise OpError(f"--replicas must be 0..{MAX_REPLICAS}")
    constraints = args.get("constraints") or []
    if not isinstance(constraints, list):
        raise OpError("bad constraint: give KEY==VALUE or KEY!=VALUE")
    constraints = [str(c) for c in constraints]
    try:
        for c in constraints:
            parse_constraint(c)
    except PlacementError as e:
        raise OpError(f"bad constraint: {e}") from None
    mpn = args.get("max_per_node")
    if mpn is not None and (type(mpn) is not int or not 1 <= mpn <= MAX_REPLICAS):
        raise OpError(f"--max-per-node must be 1..{MAX_REPLICAS}")
    cond = args.get("restart_condition") or "any"
    if cond not in RESTART_CONDITIONS:
        raise OpError(f"--restart-condition must be one of {', '.join(RESTART_CONDITIONS)}")
    attempts = args.get("max_attempts") or 0
    try:
        env = parse_env(args.get("env"))
        containment = containment_from_args(args)
        restart = restart_policy({"condition": cond, "delay": 1.0, "max_attempts": attempts,
                                  "backoff": 2.0})
        command = check_command(args.get("command"))
    except ValidationError as e:
        if "command" in str(e):
            raise OpError(f"service create needs a command after -- ({e})") from None
        raise OpError(str(e)) from None
    except ContainmentError as e:
        raise OpError(str(e)) from None
    restart.pop("max_delay")  # the default: older agents' policies do not carry it
    spec = {"networks": nets, "command": command, "env": env, "constraints": constraints,
            "containment": containment.to_value(), "max_per_node": mpn, "restart": restart}
    try:
        if (health := health_from_args(args)) is not None:  # --health-* (meshnet/health.py)
            spec["health"] = health
    except HealthError as e:
        raise OpError(str(e)) from None
    try:  # --publish: top level, not in spec (a change of ports replaces no task)
        ports = parse_ports(args.get("publish"))
    except PortError as e:
        raise OpError(str(e)) from None
    svc = Service(name=name, network=nets[0], mode=mode,
                  replicas=replicas if mode == "replicated" else 0, spec=spec,
                  extra={"ports": ports} if ports else {})
    svc = with_update_policy(svc, args)  # --update-* (agent/rollouts.py)
    problem = check_value(SERVICES, name, svc.to_value())
    if problem is not None:
        raise OpError(problem)
    return svc


def to_placement(svc: Service) -> ServiceSpec:
    spec = dict(svc.spec)
    constraints: tuple[Constraint, ...] = tuple(
        parse_constraint(str(c)) for c in spec.get("constraints") or [])
    return ServiceSpec(name=svc.name, replicas=svc.replicas, mode=svc.mode,
                       constraints=constraints, max_per_node=spec.get("max_per_node"))


class Services:
    def __init__(self, state: StateService, sandboxes: Sandboxes, gossip: GossipTransport,
                 node: str, nodes: Callable[[], list[NodeInfo]],
                 peers: Callable[[], list[Member]], log_dir: Path,
                 balance: float = 1.25, expect_company: bool = False,
                 life: int | None = None) -> None:
        self.state = state
        self.store = state.store
        self.sandboxes = sandboxes
        self.gossip = gossip
        self.node = node
        self.nodes = nodes
        self.peers = peers
        self.log_dir = log_dir
        self.balance = balance
        # This agent's life (its incarnation at start, also in its metadata as LIFE_FIELD):
        # in every task record, so peers can tell our records from a previous life's.
        self.life = life
        self.tasks: dict[str, Task] = {}
        # Seeds or remembered peers to join: wait for company before placing (START_GRACE_S).
        self.expect_company = expect_company
        self.started_at = time.monotonic()
        self.wake = asyncio.Event()
        self.loop_task: asyncio.Task[None] | None = None
        self.closing = False
        self.counters = {"scheduler_errors": 0, "services_unplaceable": 0,
                         "task_start_errors": 0, "task_teardown_errors": 0,
                         "scheduler_passes": 0, "task_restarts": 0,
                         "stray_records_removed": 0,
                         "health_probes": 0, "health_probe_timeouts": 0, "unhealthy_stops": 0,
                         "health_errors": 0, "logs_pruned": 0}
        self._logs_pruned_at = time.monotonic()
        # Seconds from a task's (re)start to its command running: sandbox, address claim,
        # launcher (/metrics meshnet_task_start_seconds).
        self.start_seconds = Histogram(TASK_START_BUCKETS)
        self._unplaceable_logged: set[str] = set()
        # Rolling updates (agent/rollouts.py): the rule's plans, slots whose task was replaced
        # in place (their record kept for the successor), rollbacks this node has written.
        self.rollouts = Rollouts()
        self._handed_over: set[str] = set()
        self._rollbacks_written: set[tuple[str, int]] = set()
        self._log_once = LogOnce(log)
        # Claims VIPs at `service create` (agent/vips.py; set by the agent with its datapath).
        self.vips: VipBalancer | None = None
        # Checks of a parsed `service create` against the cluster: OpError refuses it.
        self.create_checks: list[Callable[[Service], None]] = []
        gossip.stream_handlers[STREAM_LOGS] = self._serve_logs
        gossip.stream_handlers[STREAM_LOG_LINES] = self._serve_log_lines

    def handlers(self) -> dict[str, Handler]:
        return {
            "service.create": self.op_create,
            "service.scale": self.op_scale,
            "service.ls": self.op_ls,
            "service.ps": self.op_ps,
            "service.progress": self.op_progress,
            "service.inspect": self.op_inspect,
            "service.rm": self.op_rm,
            "service.logs": self.op_logs,
            "service.update": self.op_update,
            "service.rollback": self.op_rollback,
        }

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Task records of a previous run are stale: its sandboxes were cleaned up at start.
        for entry in self.store.owned_by(self.node):
            if entry.table == TASKS:
                self.store.delete(TASKS, entry.key, time.time())
        self.state.changed()
        self.loop_task = asyncio.get_running_loop().create_task(self._loop())

    def kick(self) -> None:
        self.wake.set()

    async def close(self) -> None:
        """Stop every task (endpoints withdrawn first) before the agent says `left`."""
        self.closing = True
        if self.loop_task is not None:
            self.loop_task.cancel()
        await asyncio.gather(*(self._stop(t) for t in list(self.tasks.values())))

    # --- scheduling -------------------------------------------------------------------------

    def placement(self) -> dict[str, dict[int, str]]:
        """Slot -> node of every service that can be placed. A service whose spec placement
        cannot take (the store's schema keeps those out; this is the second line) is left out,
        so it can never keep every other service from being scheduled."""
        specs = []
        for key, s in sorted(self.store.services().items()):
            try:
                if s.name != key:
                    raise PlacementError(f"service {s.name!r} is stored under {key!r}")
                specs.append(to_placement(s))
            except (PlacementError, ValueError, TypeError) as e:
                self._unplaceable(key, e)
        nodes = self.nodes()
        current = self.running_now({n.name for n in nodes})
        try:
            return place(specs, nodes, self.balance, current)
        except Exception as e:
            # One spec the checks above let through broke the joint placement: find it by
            # placing each alone, and place the others without it.
            self._scheduler_error("placement", e)
            good = []
            for spec in specs:
                try:
                    place([spec], nodes, self.balance, current)
                    good.append(spec)
                except Exception as e1:
                    self._unplaceable(spec.name, e1)
            return place(good, nodes, self.balance, current)

    def running_now(self, alive: set[str]) -> dict[str, dict[int, str]]:
        """Where each slot runs now, by the task table: placement's `current` (rule 6 of
        placement/core.py), so a running task stays where it is. Only records of members in
        ALIVE count (and the store shows a member's records of its current life only). A slot
        that two nodes hold for a moment (their views differed) is settled the same way on
        every agent: a running task before one that is not, then the smaller hash of (service,
        slot, node), so all agents keep the same one."""
        best: dict[str, dict[int, tuple[tuple[int, int], str]]] = {}
        for data in self.store.view(TASKS).values():
            svc, slot, node = data.get("service"), data.get("slot"), data.get("node")
            if type(svc) is not str or type(slot) is not int or type(node) is not str \
                    or node not in alive:
                continue
            rank = (data.get("state") != "running", seed64("holder", svc, slot, node))
            held = best.setdefault(svc, {}).get(slot)
            if held is None or rank < held[0]:
                best[svc][slot] = (rank, node)
        return {svc: {slot: node for slot, (_, node) in slots.items()}
                for svc, slots in best.items()}

    def _unplaceable(self, name: str, e: Exception) -> None:
        self.counters["services_unplaceable"] += 1
        if name not in self._unplaceable_logged and len(self._unplaceable_logged) < 1024:
            self._unplaceable_logged.add(name)
            log.warning("service %s cannot be placed: %s", name[:80], e)

    def _scheduler_error(self, what: str, e: BaseException) -> None:
        self.counters["scheduler_errors"] += 1
        self._log_once(what, e, "scheduler_errors")

    async def _loop(self) -> None:
        while True:
            self.wake.clear()
            self.counters["scheduler_passes"] += 1
            try:
                self.reconcile()
            except Exception as e:  # a bug here must not stop scheduling for good
                self._scheduler_error("scheduler pass", e)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), RECONCILE_PERIOD_S)

    def reconcile(self) -> None:
        if self.closing or self._waiting_for_company():
            return
        services = self.store.services()
        mine: dict[str, tuple[Service, int]] = {}
        placement = self.placement()
        for svc_name, slots in placement.items():
            svc = services.get(svc_name)
            if svc is None:
                continue
            for slot, node in slots.items():
                if node == self.node:
                    mine[f"{svc_name}.{slot}"] = (svc, slot)
        # Rolling updates: which spec each slot runs, and when a task is replaced, by the rule
        # of state/rolling.py (a spec change no longer stops every task at once).
        self.rollouts.update(services, placement, self.store.view(TASKS), time.time())
        for name, task in list(self.tasks.items()):
            current = services.get(task.service)
            if name not in mine or current is None:
                asyncio.get_running_loop().create_task(self._stop(task))
            elif task.stopping:
                continue
            elif (v := self.rollouts.relabel(current, task.spec, task.watch.version)):
                task.watch.version = v  # its very spec came back (a rollback): no restart
                asyncio.get_running_loop().create_task(self._publish(task))
            elif self.rollouts.due(current, task.slot, task.spec, task.watch.version):
                asyncio.get_running_loop().create_task(self._replace(task))
        for name, (svc, slot) in sorted(mine.items()):
            if name not in self.tasks:
                target = self.rollouts.target(svc, slot)
                task = Task(service=svc.name, slot=slot, spec=target.spec, watch=target.watch())
                self.tasks[name] = task
                task.runner = asyncio.get_running_loop().create_task(self._supervise(task))
        self._after_replacements()
        self._sweep_strays()
        self._prune_logs(services)

    def _prune_logs(self, services: Mapping[str, Service]) -> None:
        """Delete the task logs of removed services (bounded disk), once our view of the
        services is trustworthy: an exchange of state has finished, or we are alone."""
        now = time.monotonic()
        if now - self._logs_pruned_at < LOG_PRUNE_PERIOD_S or not (
                self.state.synced or len(self.nodes()) <= 1):
            return
        self._logs_pruned_at = now
        keep = set(services) | {t.service for t in self.tasks.values()}
        for path in logs_to_prune(self.log_dir, keep, time.time()):
            try:
                path.unlink()
            except OSError:
                continue
            self.counters["logs_pruned"] += 1

    def _sweep_strays(self) -> None:
        """Our own task records with no task behind them, and (Sandboxes.sweep_strays) our own
        sandbox endpoints with no sandbox: a write we made, lost with an unsaved store (a full
        disk, then a restart), that a peer handed back. Only we may delete them (issue 13), and
        they would otherwise show a task that does not run, and resolve a dead address, for as
        long as we are alive."""
        for key, data in self.store.view(TASKS).items():
            name = data.get("task")
            if data.get("node") == self.node and name not in self.tasks and \
                    name not in self._handed_over:
                self.counters["stray_records_removed"] += 1
                log.info("withdrawing a record of task %s, which does not run here", name)
                self.store.delete(TASKS, key, time.time())
                self.state.changed()
        self.counters["stray_records_removed"] += self.sandboxes.sweep_strays()

    def _waiting_for_company(self) -> bool:
        if not self.expect_company:
            return False
        # Company means a member answered and one exchange of state with it finished: placing
        # before that uses a stale task table (a restarted agent then starts a slot that runs
        # elsewhere now, and both run until the records meet; the soak saw 12.8 s of that).
        synced = len(self.nodes()) > 1 and self.state.synced
        if synced or time.monotonic() - self.started_at >= START_GRACE_S:
            self.expect_company = False  # once: later we may well be alone for good reasons
            return False
        return True

    # --- one task ----------------------------------------------------------------------------

    def _task_key(self, task: Task) -> str:
        return f"{task.name}@{self.node}"  # two nodes may briefly run one task; no overwrites

    async def _publish(self, task: Task) -> None:
        if task.stopping:  # its record is withdrawn (_stop) or handed to its successor
            return
        await self.state.put(TASKS, self._task_key(task), {
            "task": task.name, "service": task.service, "slot": task.slot, "node": self.node,
            **({LIFE_FIELD: self.life} if self.life is not None else {}),
            "state": task.state, "ip": task.ip, "exit_code": task.exit_code,
            "restarts": task.restarts, **task.health.record(task.state, time.time()),
            **task.watch.record(now=time.time(), state=task.state, exit_code=task.exit_code,
                                health=task.health.status, stopping=task.stopping),
            **(task.containment.summary() if task.containment is not None else {})})

    def _log_path(self, task_name: str) -> Path:
        """`<service>.<slot>.log` in the log directory; ValueError for anything else."""
        service, dot, slot = task_name.rpartition(".")
        try:
            check_name("service", service)
        except NetworkError:
            raise ValueError(f"not a task name: {task_name[:80]!r}") from None
        if not dot or not _SLOT_RE.fullmatch(slot):
            raise ValueError(f"not a task name: {task_name[:80]!r}")
        return self.log_dir / f"{task_name}{LOG_SUFFIX}"

    async def _supervise(self, task: Task) -> None:
        try:
            restart = Restart(**restart_policy(task.spec.get("restart")))
        except ValidationError as e:
            # The store's schema keeps such specs out; should one get here, the task fails
            # with the reason instead of its supervisor dying with a TypeError.
            log.warning("task %s cannot start: %s", task.name, e)
            task.exit_code, task.state = START_FAILED, "failed"
            await self._publish(task)
            return
        delay = restart.delay
        try:
            while not task.stopping:
                task.state = "starting"
                task.watch.started(time.time())
                try:
                    code = await self._run_once(task)
                except Exception as e:  # the kernel said no; retry by the restart policy
                    self.counters["task_start_errors"] += 1
                    log.warning("task %s failed to start: %s", task.name,
                                e if isinstance(e, OpError) else error_line(e))
                    code = START_FAILED
                task.exit_code = code
                # A task stopped for failing its health check failed, whatever its exit (Swarm)
                failed = code != 0 or task.health.status == UNHEALTHY
                task.state = "failed" if failed else "complete"
                task.ip = None
                await self._publish(task)
                again = (restart.condition == "any" or
                         (restart.condition == "on-failure" and failed))
                if not again or (restart.max_attempts and task.restarts >= restart.max_attempts):
                    return
                await asyncio.sleep(delay)
                delay = min(delay * restart.backoff, restart.max_delay)
                task.restarts += 1
                self.counters["task_restarts"] += 1
        except asyncio.CancelledError:
            raise

    async def _run_once(self, task: Task) -> int:
        began = time.monotonic()
        spec = task.spec
        logf = _CappedLog(self._log_path(task.name))
        try:
            # The spec came through the store: check it here, where it would run.
            task.containment = containment_from_value(spec.get("containment"))
            health = health_spec(spec.get("health"))
            task.health.status = None  # until it runs again
            env = parse_env([f"{k}={v}" for k, v in dict(spec.get("env") or {}).items()])
            command = spec.get("command")
            if not isinstance(command, list) or not command or \
                    not all(isinstance(a, str) and "\0" not in a for a in command):
                raise ContainmentError("the service's command is not a list of strings")
        except (ContainmentError, TypeError, ValueError) as e:
            return self._start_failed(task, logf, str(e))
        network = spec["networks"][0]
        handle = await self.sandboxes.create(network, task.name, service=task.service,
                                             slot=task.slot, publish=False)
        task.handle = handle
        task.ip = handle.ip
        try:
            try:
                task.proc = await self.sandboxes.launch(
                    handle, command, task.containment, spec_env=env,
                    meta={"MESHNET_SERVICE": task.service, "MESHNET_SLOT": str(task.slot)},
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            except LaunchFailure as e:
                return self._start_failed(task, logf, str(e))
            task.state = "running"
            self.start_seconds.observe(time.monotonic() - began)
            handle.value["containment"] = task.containment.summary()
            if health is not None:  # not serving (DNS, VIP, ports) until its check passes
                task.health.status = handle.value["health"] = STARTING
            await self.sandboxes.publish(handle)  # the name resolves only while it runs
            await self._publish(task)
            log.info("task %s running", task.name, extra={"fields": {"ip": task.ip}})
            if health is not None:
                self._check_health(task, handle, health, logf)
            assert task.proc.stdout is not None and task.proc.stderr is not None
            await asyncio.gather(_copy_output(task.proc.stdout, "stdout", logf),
                                 _copy_output(task.proc.stderr, "stderr", logf))
            code = await task.proc.wait()
            return code if code >= 0 else 128 - code
        finally:
            task.health.stop()
            try:
                logf.close()
            finally:
                await run_to_end(self._teardown(task, handle))

    def _check_health(self, task: Task, handle: SandboxHandle, spec: HealthSpec,
                      logf: _CappedLog) -> None:
        """Probe the running task (agent/health.py); a change of health is published on its
        endpoint (DNS, VIP and ports use only healthy ones) and task record, and an unhealthy
        task is stopped, so its restart policy starts it again (as Swarm does)."""
        assert self.sandboxes.tools is not None and handle.plan is not None and task.proc
        proc = task.proc

        async def changed(status: str, why: str) -> None:
            task.health.status = handle.value["health"] = status
            log.info("task %s %s", task.name, status)
            try:
                await self.sandboxes.publish(handle)
                await self._publish(task)
            finally:
                if status == UNHEALTHY:
                    self.counters["unhealthy_stops"] += 1
                    logf.write(stamped("stderr", f"meshnet: {why}: stopping the task",
                                       time.time()))
                    await stop_process(proc, STOP_GRACE_S)

        task.health.start(spec, TaskProbe(self.sandboxes.tools, handle.plan, proc.pid), changed,
                          self.counters)

    def _start_failed(self, task: Task, logf: _CappedLog, why: str) -> int:
        """The task cannot start as specified on this host: say so in its log, and fail it."""
        log.warning("task %s cannot start: %s", task.name, why)
        logf.write(stamped("stderr", f"meshnet: task could not be started: {why}", time.time()))
        logf.close()
        return START_FAILED

    async def _teardown(self, task: Task, handle: SandboxHandle) -> None:
        """Stop the task's process, then remove its sandbox; runs to its end even when the
        task is cancelled (by _stop) meanwhile."""
        if task.proc is not None and task.proc.returncode is None:
            await stop_process(task.proc, STOP_GRACE_S)
        task.proc = None
        task.handle = None
        await self.sandboxes.remove(handle)

    async def _replace(self, task: Task) -> None:
        """A rolling update's turn for TASK (state/rolling.py): it leaves DNS, VIP maps and
        published ports first and, DRAIN_S later, when every peer has heard it, is stopped (its
        process and FDB entries stay until then, so requests in flight finish). Its task record
        stays: the next pass writes the same key for its successor on this node, so placement
        keeps the slot here."""
        if task.stopping:
            return
        task.stopping = True
        task.health.stop()  # no probe may make it serving again
        log.info("task %s: replacing it (rolling update)", task.name)
        handle, proc = task.handle, task.proc
        if handle is not None and proc is not None and proc.returncode is None:
            # not Endpoint.serving, still reachable: no new connections, and VIP clients keep
            # the ones they have until it is gone (agent/vips.py)
            handle.value["health"] = DRAINING
            try:
                await self.sandboxes.publish(handle)
                await asyncio.sleep(DRAIN_S)
            except Exception as e:  # stop it anyway: the update must go on
                self.counters["task_teardown_errors"] += 1
                self._log_once("withdrawing a task's endpoint", e, "tasks.task_teardown_errors")
        if proc is not None and proc.returncode is None:
            await stop_process(proc, STOP_GRACE_S)  # the supervisor then tears down
        if task.runner is not None:
            task.runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task.runner
        if self.tasks.get(task.name) is task:
            del self.tasks[task.name]
            self._handed_over.add(task.name)
        self.kick()

    def _after_replacements(self) -> None:
        """Rollbacks this node (an admin) should write, and the records of replaced tasks: the
        pass started their successors under the same keys; a slot no longer ours loses its
        record here."""
        if self.sandboxes.ops.may_write(SERVICES) is None:
            for name, value in self.rollouts.rollbacks():
                if (name, value["version"]) not in self._rollbacks_written:
                    self._rollbacks_written.add((name, value["version"]))
                    asyncio.get_running_loop().create_task(self._write_rollback(name, value))
        self._rollbacks_written = {w for w in self._rollbacks_written
                                   if w[0] in self.rollouts.services}
        for name in sorted(self._handed_over - set(self.tasks)):
            asyncio.get_running_loop().create_task(self._drop_record(f"{name}@{self.node}"))
        self._handed_over.clear()

    async def _write_rollback(self, name: str, value: dict[str, Any]) -> None:
        """Roll a failed update back (rollouts.rollback_value: the same value on every admin
        that sees the failure), unless the service has changed since."""
        current = self.store.services().get(name)
        if current is None or current.extra.get("version", 1) != value["version"] - 1:
            return
        log.warning("service %s: %s; rolling back", name, value["rollback"]["reason"])
        try:
            await self.state.put(SERVICES, name, value)
        except Exception as e:
            self._rollbacks_written.discard((name, value["version"]))  # the next pass retries
            self._scheduler_error("writing a rollback", e)
        self.kick()

    async def _drop_record(self, key: str) -> None:
        try:
            await self.state.delete(TASKS, key)
        except Exception as e:  # retried by nothing: the record goes when the agent restarts
            self.counters["task_teardown_errors"] += 1
            self._log_once("withdrawing a task record", e, "tasks.task_teardown_errors")

    async def _stop(self, task: Task) -> None:
        if task.stopping:
            return
        task.stopping = True
        if task.proc is not None and task.proc.returncode is None:
            await stop_process(task.proc, STOP_GRACE_S)  # the supervisor then tears down
        if task.runner is not None:
            task.runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task.runner
        self.tasks.pop(task.name, None)
        try:
            await self.state.delete(TASKS, self._task_key(task))
        except Exception as e:  # the task is gone here; its record is cleaned by the next pass
            self.counters["task_teardown_errors"] += 1
            self._log_once("withdrawing a task record", e, "tasks.task_teardown_errors")

    # --- control API ---------------------------------------------------------------------------

    def _service(self, args: dict[str, Any]) -> Service:
        try:
            name = check_name("service", args.get("name"))
        except NetworkError as e:
            raise OpError(str(e)) from None
        svc = self.store.services().get(name)
        if svc is None:
            raise OpError(f"service {name} not found")
        return svc

    async def op_create(self, args: dict[str, Any], send: SendEvent) -> Any:
        self.sandboxes.ops.require(SERVICES)
        svc = parse_spec(args, set(self.store.networks()))
        if svc.name in self.store.services():
            raise OpError(f"service {svc.name} already exists")
        for check in self.create_checks:  # e.g. published ports that clash (agent/ingress.py)
            check(svc)
        if self.vips is None:
            raise OpError("this agent runs no datapath: it cannot claim a service's addresses")
        # endpoint_mode, and for vip a confirmed VIP per network (agent/vips.py)
        async with self.vips.claimed(svc, args.get("endpoint_mode")) as svc:
            await self.state.put(SERVICES, svc.name, svc.to_value())
        self.kick()
        return self._service_json(svc)

    async def op_scale(self, args: dict[str, Any], send: SendEvent) -> Any:
        self.sandboxes.ops.require(SERVICES)
        scales = args.get("scales")
        if not isinstance(scales, dict) or not scales:
            raise OpError("scale needs NAME=N")
        services = self.store.services()
        for name, n in scales.items():
            if name not in services:
                raise OpError(f"service {name} not found")
            if services[name].mode == "global":
                raise OpError(f"service {name} is global; it cannot be scaled")
            if not isinstance(n, int) or not 0 <= n <= MAX_REPLICAS:
                raise OpError(f"{name}: replicas must be 0..{MAX_REPLICAS}")
        out = {}
        for name, n in scales.items():
            svc = services[name]
            value = svc.to_value()
            value["replicas"] = n
            await self.state.put(SERVICES, name, value)
            out[name] = n
        self.kick()
        return out

    def _task_rows(self, service: str | None = None,
                   detail: bool = False) -> list[dict[str, Any]]:
        keys: tuple[str, ...] = ("task", "service", "slot", "node", "state", "ip", "restarts",
                                 "exit_code", "health", "version")
        if detail:
            keys += ("user", "capabilities", "limits")
        rows = []
        for data in self.store.view(TASKS).values():
            if service is None or data.get("service") == service:
                rows.append({k: data.get(k) for k in keys})
                rows[-1]["version"] = data.get("version", 1)  # its spec's (absent: the first)
        return sorted(rows, key=lambda r: (str(r["service"]), int(r["slot"] or 0)))

    def _service_json(self, svc: Service) -> dict[str, Any]:
        spec = dict(svc.spec)
        placed = self.placement().get(svc.name, {})
        running = sum(1 for r in self._task_rows(svc.name) if r["state"] == "running")
        desired = svc.replicas if svc.mode == "replicated" else len(placed)
        return {"name": svc.name, "mode": svc.mode, "replicas": desired, "running": running,
                "networks": spec.get("networks"), "command": spec.get("command"),
                "constraints": spec.get("constraints"), "max_per_node": spec.get("max_per_node"),
                "restart": spec.get("restart"), "env": spec.get("env"),
                "placement": {str(k): v for k, v in sorted(placed.items())},
                "health": spec.get("health"),
                "endpoint_mode": endpoint_mode(svc), "vips": _vips_json(svc),
                "ports": service_ports(svc),
                "containment": _containment_json(spec.get("containment")),
                # version, update_config, update_status (agent/rollouts.py)
                **self.rollouts.describe(svc, placed, self.store.view(TASKS), time.time())}

    async def op_ls(self, args: dict[str, Any], send: SendEvent) -> Any:
        out = []
        for svc in sorted(self.store.services().values(), key=lambda s: s.name):
            doc = self._service_json(svc)
            out.append({"name": doc["name"], "mode": doc["mode"],
                        "replicas": f"{doc['running']}/{doc['replicas']}",
                        "desired": doc["replicas"], "running": doc["running"],
                        "command": shlex.join(doc["command"] or [])})
        return out

    def _rows_with_pending(self, name: str, placed: dict[int, str]) -> list[dict[str, Any]]:
        """NAME's task rows, and a `pending` row for each placed slot no node reports yet."""
        rows = self._task_rows(name)
        have = {int(r["slot"]) for r in rows if r["slot"] is not None}
        for slot, node in sorted(placed.items()):
            if slot not in have:
                rows.append({"task": f"{name}.{slot}", "service": name, "slot": slot,
                             "node": node, "state": "pending", "ip": None})
        return sorted(rows, key=lambda r: int(r["slot"] or 0))

    async def op_ps(self, args: dict[str, Any], send: SendEvent) -> Any:
        svc = self._service(args)
        return self._rows_with_pending(svc.name, self.placement().get(svc.name, {}))

    async def op_progress(self, args: dict[str, Any], send: SendEvent) -> Any:
        """Where a service stands against its spec, for meshctl's wait after `service create`,
        `scale` and `rm`: the tasks it should have, how many placement found a node for, and
        every task row (placed slots no node reports yet as `pending`). A service that does
        not exist (removed, or not yet gossiped here) wants 0 and lists the rows still left."""
        try:
            name = check_name("service", args.get("name"))
        except NetworkError as e:
            raise OpError(str(e)) from None
        svc = self.store.services().get(name)
        placed = self.placement().get(name, {}) if svc is not None else {}
        desired = 0 if svc is None else svc.replicas if svc.mode == "replicated" else len(placed)
        return {"name": name, "exists": svc is not None, "desired": desired,
                "placed": len(placed), "tasks": self._rows_with_pending(name, placed),
                **(self.rollouts.describe(svc, placed, self.store.view(TASKS), time.time())
                   if svc is not None else {})}

    async def op_inspect(self, args: dict[str, Any], send: SendEvent) -> Any:
        """The service, and each task as the node that runs it reports it: where, its state,
        its health, and the user, capabilities and limits it runs with; for tasks of this node
        with a health check, its last probes (`health_log`, kept here only)."""
        svc = self._service(args)
        doc = self._service_json(svc)
        doc["tasks"] = [{**{k: r.get(k) for k in ("task", "node", "state", "ip", "health",
                                                  "version")},
                         **summary_view(r), **self._health_log(r)}
                        for r in self._task_rows(svc.name, detail=True)]
        return doc

    def _health_log(self, row: dict[str, Any]) -> dict[str, Any]:
        task = self.tasks.get(str(row.get("task"))) if row.get("node") == self.node else None
        return {"health_log": task.health.log()} if task and task.health.check else {}

    async def op_update(self, args: dict[str, Any], send: SendEvent) -> Any:
        """`service update NAME ...`: a new spec rolls out by the rule (state/rolling.py); the
        replica count and the update policy change at once. `changed`: whether the spec did."""
        self.sandboxes.ops.require(SERVICES)
        svc = self._service(args)
        value, changed = updated_value(svc, args)
        await self.state.put(SERVICES, svc.name, value)
        self.kick()
        return {**self._service_json(self._service(args)), "changed": changed}

    async def op_rollback(self, args: dict[str, Any], send: SendEvent) -> Any:
        """`service rollback NAME`: back to the previous spec, rolled out as an update is."""
        self.sandboxes.ops.require(SERVICES)
        svc = self._service(args)
        await self.state.put(SERVICES, svc.name, manual_rollback(svc))
        self.kick()
        return self._service_json(self._service(args))

    async def op_rm(self, args: dict[str, Any], send: SendEvent) -> Any:
        self.sandboxes.ops.require(SERVICES)
        svc = self._service(args)
        await self.state.delete(SERVICES, svc.name)
        self.kick()
        return {"removed": svc.name}

    # --- logs: gathered from every host that runs a task ---------------------------------------

    def local_logs(self, service: str) -> dict[str, str]:
        """Task name -> the tail of its log, for SERVICE's tasks on this host. SERVICE is
        checked as `service create` checks it (NetworkError otherwise) and matched literally:
        the files listed are those named exactly `SERVICE.<slot>.log`, regular files only."""
        check_name("service", service)
        out: dict[str, str] = {}
        try:
            names = sorted(os.listdir(self.log_dir))
        except OSError:
            return out
        for fname in names:
            task = _task_of_log(service, fname)
            if task is None:
                continue
            text = _read_tail(self.log_dir / fname, LOG_TAIL_BYTES)
            if text is not None:
                out[task] = plain_text(text)
        return out

    async def _serve_logs(self, body: bytes, addr: Addr) -> bytes | None:
        """A peer's STREAM_LOGS request: a service name, checked and matched as ours are."""
        try:
            service = msgpack.unpackb(body, raw=False, max_str_len=256)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            return None
        if not isinstance(service, str):
            return None
        try:
            logs = self.local_logs(service)
        except NetworkError:
            return None
        return bytes(msgpack.packb({"node": self.node, "logs": logs}))

    async def _serve_log_lines(self, body: bytes, addr: Addr) -> bytes | None:
        """A peer's STREAM_LOG_LINES request (tasklogs.py), its service checked as ours are."""
        try:
            req = parse_lines_request(body)
            check_name("service", req.service)
        except ValueError:  # NetworkError is one
            return None
        # up to 256 files of 64 KiB: read off the loop, which must keep answering probes
        return await asyncio.to_thread(serve_lines, self.log_dir, self.node, req)

    async def op_logs(self, args: dict[str, Any], send: SendEvent) -> Any:
        """`service logs NAME [--tail N] [--follow]`: every task's lines from every host, then
        (follow) new ones until the client hangs up (a long-running op) or the service is
        removed."""
        try:
            check_name("service", args.get("name"))
        except NetworkError as e:
            raise OpError(str(e)) from None
        svc = self._service(args)
        tail = args.get("tail")
        if tail is not None and (type(tail) is not int or not 0 <= tail <= MAX_TAIL_LINES):
            raise OpError(f"--tail must be 0..{MAX_TAIL_LINES}")
        since = iso_us(time.time())  # files that appear later: their lines from now on

        def member(host: str) -> Member | None:
            return next((m for m in self.peers() if m.name == host), None)

        async def ask(host: str, service: int, body: bytes) -> bytes | None:
            m = member(host)
            if m is None:
                return None
            try:
                return await self.gossip.request(m.addr, service, body)
            except asyncio.IncompleteReadError:
                return HUNG_UP  # it does not serve SERVICE (an older agent)
            except (OSError, TimeoutError, StreamError, KeyringError, ValueError):
                return None

        async def legacy(host: str) -> dict[str, str] | None:
            raw = await ask(host, STREAM_LOGS, bytes(msgpack.packb(svc.name)))
            return parse_logs_reply(svc.name, raw) if raw else None

        logs = LogGatherer(
            svc.name, self.node, send,
            local=lambda req: asyncio.to_thread(serve_lines, self.log_dir, self.node, req),
            ask=lambda host, body: ask(host, STREAM_LOG_LINES, body), legacy=legacy)
        await logs.first([m.name for m in self.peers()], tail)
        while args.get("follow") is True:
            await asyncio.sleep(FOLLOW_POLL_S)
            removed = svc.name not in self.store.services()
            await logs.poll(self._hosts_running(svc.name), since)
            if removed:  # its tasks' last lines are in: the stream ends here
                break
        return {"service": svc.name, "tasks": sorted(logs.tasks)}

    def _hosts_running(self, service: str) -> list[str]:
        """The hosts that report a task of SERVICE (a follow asks them for new lines)."""
        return sorted({str(r["node"]) for r in self._task_rows(service) if r["node"]})


def parse_logs_reply(service: str, raw: bytes) -> dict[str, str]:
    """A member's STREAM_LOGS answer (what ``_serve_logs`` sends): task name -> the tail of its
    log, for SERVICE's tasks only, whatever a peer sends back; anything else in it is left out.
    Never raises."""
    try:
        doc = msgpack.unpackb(raw, raw=False)
    except (ValueError, msgpack.UnpackException):  # msgpack's decoding errors
        return {}
    logs = doc.get("logs") if isinstance(doc, dict) else None
    if not isinstance(logs, dict):
        return {}
    return {k: v for k, v in logs.items()
            if isinstance(k, str) and isinstance(v, str) and
            _task_of_log(service, k + LOG_SUFFIX) is not None}


def _read_tail(path: Path, limit: int) -> str | None:
    """The last LIMIT bytes of regular file PATH (never following a symlink, never blocking on
    a FIFO); None if it is not one or cannot be read."""
    opened = open_regular(path)
    if opened is None:
        return None
    fd, st = opened
    try:
        return read_span(fd, max(0, st.st_size - limit), st.st_size).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _vips_json(svc: Service) -> dict[str, str]:
    """network -> VIP of a vip service, as its record holds them (validated); {} for dnsrr."""
    vips = svc.extra.get("vips")
    if endpoint_mode(svc) != VIP or not isinstance(vips, Mapping):
        return {}
    return {str(n): str(ip) for n, ip in sorted(vips.items())}


def _containment_json(value: object) -> dict[str, Any] | str:
    """The spec's containment as inspect shows it; a spec this agent cannot read says why."""
    try:
        return containment_from_value(value).summary()
    except ContainmentError as e:
        return f"invalid: {e}"


async def _copy_output(pipe: asyncio.StreamReader, stream: str, logf: _CappedLog) -> None:
    """One of a task's output streams into its log, a stamped line per line (tasklogs.py)."""
    lines = LineStamper(stream)
    while chunk := await pipe.read(65536):
        if records := lines.feed(chunk, time.time()):
            logf.write(records)
    if last := lines.flush(time.time()):
        logf.write(last)


class _CappedLog:
    """Append-only log that rotates to NAME.1 when it reaches LOG_CAP_BYTES. Best effort: a
    write the disk refuses (full) is dropped and counted, never raised, so a full state dir
    cannot stop a task or leave its sandbox behind (found by the chaos soak, #15)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.f = open(path, "ab")  # noqa: SIM115 (closed by close())
        self.size = self.f.tell()
        self.dropped = 0  # bytes of output the disk refused
        self.error: OSError | None = None

    def write(self, data: bytes) -> None:
        try:
            if self.size + len(data) > LOG_CAP_BYTES:
                self.f.close()
                os.replace(self.path, self.path.with_suffix(".log.1"))
                self.f = open(self.path, "ab")  # noqa: SIM115
                self.size = 0
            self.f.write(data)
            self.f.flush()
            self.size += len(data)
        except OSError as e:
            self.dropped += len(data)
            self.error = e

    def close(self) -> None:
        try:
            self.f.close()
        except OSError as e:
            self.error = e
        if self.error is not None:
            log.warning("%s: %d bytes of the task's output not logged: %s", self.path.name,
                        self.dropped, error_line(self.error))
