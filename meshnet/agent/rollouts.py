"""Rolling updates, the agent's side (issue 17): `service update` and `service rollback`
build the new service value; `Rollouts` applies the pure rule of meshnet/state/rolling.py to
the store on every scheduler pass (agent/services.py calls it), telling the scheduler which
spec each of this node's slots runs, which running tasks are due for replacement, and which
rollbacks this node (if an admin) should write.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from meshnet.agent.control import OpError
from meshnet.agent.sandboxes import parse_env
from meshnet.containment import ContainmentError, parse_cpus, parse_memory, parse_pids
from meshnet.containment import from_value as containment_from_value
from meshnet.health import HealthError, health_from_args
from meshnet.placement import PlacementError, parse_constraint
from meshnet.placement.spec import MAX_REPLICAS
from meshnet.state import SERVICES, Service
from meshnet.state.rolling import (
    DEFAULT_UPDATE_CONFIG,
    MAX_VERSION,
    Plan,
    RollingError,
    SinceClock,
    TaskView,
    UpdateConfig,
    owner_failure,
    plan,
    rollback_value,
    rollout_of,
    task_view,
    update_config,
)
from meshnet.state.validate import ValidationError, check_command, check_value

__all__ = ["OwnerWatch", "Rollouts", "manual_rollback", "policy_from_args", "updated_value",
           "with_update_policy"]

# `service update` / `service create` request keys -> update_config keys, and their flags.
POLICY_ARGS = {"update_parallelism": "parallelism", "update_delay": "delay",
               "update_failure_action": "failure_action", "update_monitor": "monitor"}
# The rollback `service rollback` writes says this.
MANUAL_REASON = "requested with meshctl service rollback"


def policy_from_args(args: Mapping[str, Any],
                     base: UpdateConfig = DEFAULT_UPDATE_CONFIG) -> UpdateConfig:
    """The `--update-*` flags over BASE; OpError in the flags' words."""
    value = base.to_value()
    for key, name in POLICY_ARGS.items():
        if args.get(key) is not None:
            value[name] = args[key]
    try:
        return update_config(value)
    except RollingError as e:
        text = str(e)
        for key, name in POLICY_ARGS.items():
            text = text.replace(f"update_config {name} ", f"--{key.replace('_', '-')} ", 1)
        raise OpError(text) from None


def with_update_policy(svc: Service, args: Mapping[str, Any]) -> Service:
    """`service create`'s `--update-*` flags: the new service's update_config (Docker's
    defaults for those left out; version 1 is the record's default, so none is written)."""
    return replace(svc, extra={**svc.extra,
                               "update_config": policy_from_args(args).to_value()})


def _strings(value: object, flag: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise OpError(f"{flag} takes strings")
    return list(value)


def _limits(containment: object, args: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's containment with `--limit-*` applied (as create spells them; 0 removes)."""
    try:
        current = containment_from_value(containment)
        out = current.to_value()
        for flag, key, parse in (("limit_memory", "memory", parse_memory),
                                 ("limit_cpu", "cpus", parse_cpus),
                                 ("limit_pids", "pids", parse_pids)):
            given = args.get(flag)
            if given is None:
                continue
            if str(given).strip() in ("0", "0.0"):
                out.pop(key, None)
            else:
                out[key] = parse(given)
        containment_from_value(out)
    except ContainmentError as e:
        raise OpError(str(e)) from None
    return out


def updated_value(svc: Service, args: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """The value `service update NAME` writes, and whether its spec changed (then the version
    goes up by one and `previous` holds what the tasks ran until now, so the change rolls out
    by the rule; the replica count and the policy alone change no task). OpError, one line."""
    old = svc.to_value()
    spec = dict(svc.spec)
    env = dict(spec.get("env") or {})
    for k in _strings(args.get("env_rm"), "--env-rm"):
        env.pop(k, None)
    try:
        env.update(parse_env(_strings(args.get("env_add"), "--env-add")))
    except ContainmentError as e:
        raise OpError(str(e).replace("--env ", "--env-add ", 1)) from None
    spec["env"] = env
    constraints = [str(c) for c in spec.get("constraints") or []]
    drop = _strings(args.get("constraint_rm"), "--constraint-rm")
    missing = [c for c in drop if c not in constraints]
    if missing:
        raise OpError(f"--constraint-rm {missing[0]!r}: the service has no such constraint "
                      f"(it has: {', '.join(constraints) or 'none'})")
    constraints = [c for c in constraints if c not in drop]
    for c in _strings(args.get("constraint_add"), "--constraint-add"):
        try:
            parse_constraint(c)
        except PlacementError as e:
            raise OpError(f"bad constraint: {e}") from None
        if c not in constraints:
            constraints.append(c)
    spec["constraints"] = constraints
    spec["containment"] = _limits(spec.get("containment"), args)
    if args.get("command"):
        try:
            spec["command"] = check_command(args.get("command"))
        except ValidationError as e:
            raise OpError(str(e)) from None
    try:
        health = health_from_args(args, spec.get("health"))
    except HealthError as e:
        raise OpError(str(e)) from None
    spec.pop("health", None)
    if health is not None:
        spec["health"] = health
    new = dict(old)
    replicas = args.get("replicas")
    if replicas is not None:
        if svc.mode == "global":
            raise OpError(f"service {svc.name} is global; it has no replica count")
        if type(replicas) is not int or not 0 <= replicas <= MAX_REPLICAS:
            raise OpError(f"--replicas must be 0..{MAX_REPLICAS}")
        new["replicas"] = replicas
    rollout = rollout_of(old)
    new["update_config"] = policy_from_args(args, rollout.config).to_value()
    changed = spec != dict(svc.spec)
    if changed:
        if rollout.version >= MAX_VERSION:
            raise OpError(f"service {svc.name} has reached its last version")
        new["spec"] = spec
        new["version"] = rollout.version + 1
        new["previous"] = {"spec": dict(svc.spec), "version": rollout.version,
                           "replicas": svc.replicas}
        new.pop("rollback", None)
    problem = check_value(SERVICES, svc.name, new)
    if problem is not None:
        raise OpError(problem)
    return new, changed


def manual_rollback(svc: Service) -> dict[str, Any]:
    """`service rollback NAME`: back to the previous spec (OpError when there is none)."""
    value = rollback_value(svc.to_value(), MANUAL_REASON)
    if value is None:
        raise OpError(f"service {svc.name} has no previous spec to roll back to (it was never "
                      "updated)")
    problem = check_value(SERVICES, svc.name, value)
    if problem is not None:
        raise OpError(problem)
    return value


@dataclass
class OwnerWatch:
    """What the node running a task remembers to judge whether it failed its update
    (rolling.owner_failure), and what its task record says of it: `version` and, once judged,
    `update_failure`."""

    version: int = 1
    monitored: bool = False  # started while its service's update was in progress
    config: UpdateConfig = field(default_factory=UpdateConfig)
    run_started: float = 0.0
    ready_since: float | None = None
    failure: str | None = None

    def started(self, now: float) -> None:
        """A (re)start of the task's command: each one is watched anew."""
        self.run_started, self.ready_since = now, None

    def record(self, *, now: float, state: str, exit_code: int | None, health: str | None,
               stopping: bool) -> dict[str, Any]:
        if self.monitored and not stopping and self.failure is None:
            self.failure = owner_failure(config=self.config, now=now,
                                         run_started=self.run_started,
                                         ready_since=self.ready_since, state=state,
                                         exit_code=exit_code, health=health)
        if self.ready_since is None and (health == "healthy" or
                                         (health is None and state == "running")):
            self.ready_since = now
        out: dict[str, Any] = {"version": self.version}
        if self.failure is not None:
            out["update_failure"] = self.failure
        return out


@dataclass(frozen=True)
class Target:
    """What one slot of this node should run: a spec, its version, and whether the task is
    watched as part of an update in progress."""

    spec: dict[str, Any]
    version: int
    config: UpdateConfig
    monitored: bool

    def watch(self) -> OwnerWatch:
        return OwnerWatch(version=self.version, monitored=self.monitored, config=self.config)


class Rollouts:
    """The rule on this node: one `plans` call per scheduler pass, then questions about it."""

    def __init__(self) -> None:
        self.clock = SinceClock()
        self.plans: dict[str, Plan] = {}
        self.services: dict[str, Service] = {}

    def update(self, services: Mapping[str, Service], placement: Mapping[str, Mapping[int, str]],
               tasks: Mapping[str, Mapping[str, Any]], now: float) -> None:
        """Plan every service from the replicated state (TASKS: the task table's view)."""
        views: dict[str, list[TaskView]] = {}
        live: set[tuple[str, float | None]] = set()
        for key, value in tasks.items():
            t = task_view(value)
            service = value.get("service")
            if t is None or not isinstance(service, str) or service not in services:
                continue
            live.add((key, t.since))
            views.setdefault(service, []).append(
                replace(t, since=self.clock.since(key, t.since, now)))
        self.clock.prune(live)
        self.services = dict(services)
        self.plans = {name: self.plan_one(svc, placement.get(name, {}), views.get(name, ()), now)
                      for name, svc in services.items()}

    @staticmethod
    def plan_one(svc: Service, placed: Mapping[int, str], views: Iterable[TaskView],
                 now: float) -> Plan:
        return plan(rollout_of(svc.to_value()), placed, views, now)

    def target(self, svc: Service, slot: int) -> Target:
        """The spec SLOT of SVC starts on: the current one once its batch may, else the one
        before (`previous`)."""
        rollout = rollout_of(svc.to_value())
        p = self.plans.get(svc.name)
        monitored = (p is not None and p.status is not None and
                     p.status.state in ("updating", "rolling_back"))
        prev = svc.extra.get("previous")
        if p is None or slot in p.allowed or rollout.previous_version is None or \
                not isinstance(prev, Mapping) or not isinstance(prev.get("spec"), Mapping):
            return Target(dict(svc.spec), rollout.version, rollout.config, monitored)
        return Target(dict(prev["spec"]), rollout.previous_version, rollout.config, False)

    def due(self, svc: Service, slot: int, spec: Mapping[str, Any], version: int) -> bool:
        """Whether a running task of SVC's SLOT (on SPEC at VERSION) is to be replaced now: it
        does not run the current spec, and its batch may. A task on the current spec is never
        taken back, whatever the batches say."""
        rollout = rollout_of(svc.to_value())
        if version == rollout.version and dict(spec) == dict(svc.spec):
            return False
        p = self.plans.get(svc.name)
        return p is None or slot in p.allowed

    @staticmethod
    def relabel(svc: Service, spec: Mapping[str, Any], version: int) -> int | None:
        """The current version, when a task runs exactly the current spec under another
        version (a rollback restored the spec it never left): it only changes its label."""
        current = rollout_of(svc.to_value()).version
        return current if version != current and dict(spec) == dict(svc.spec) else None

    def rollbacks(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, value) of every rollback the rule calls for now (for an admin to write)."""
        out = []
        for name, p in sorted(self.plans.items()):
            svc = self.services.get(name)
            if p.rollback and p.failure is not None and svc is not None:
                value = rollback_value(svc.to_value(), f"update to version "
                                       f"{rollout_of(svc.to_value()).version} failed: "
                                       f"{p.failure}")
                if value is not None and check_value(SERVICES, name, value) is None:
                    out.append((name, value))
        return out

    def describe(self, svc: Service, placed: Mapping[int, str],
                 tasks: Mapping[str, Mapping[str, Any]], now: float) -> dict[str, Any]:
        """`service inspect`'s version, update_config and update_status (null: never
        updated), by the same rule the nodes follow."""
        views = [t for t in (task_view(v) for v in tasks.values()
                             if v.get("service") == svc.name) if t is not None]
        views = [replace(t, since=self.clock.since(key, t.since, now)) for key, t in
                 ((f"{svc.name}.{t.slot}@{t.node}", t) for t in views)]
        rollout = rollout_of(svc.to_value())
        p = self.plan_one(svc, placed, views, now)
        return {"version": rollout.version, "update_config": rollout.config.to_value(),
                "update_status": p.status.to_json() if p.status is not None else None}
