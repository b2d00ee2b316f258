"""Rolling updates (issue 17): the rule every node applies, from the replicated state alone, to
decide when each of ITS OWN slots of a service moves to the service's current spec, and what
`service inspect` reports of an update. Pure: no clock (``now`` is passed in), no I/O.

The service record carries ``version`` (absent: 1; +1 on every spec change), ``previous``
({"spec", "version", "replicas"}: what the tasks ran before, and how many slots there were)
and ``update_config`` ({"parallelism", "delay", "failure_action", "monitor"}); a version made
by a rollback also carries ``rollback`` ({"from": the version rolled back, "reason"}). Task
records carry ``version``, ``state``, ``health``, ``since`` and, when the owner judged that
the task failed the update, ``update_failure`` (one line saying how).

The rule (docs/design.md, *Rolling updates*):

- The *rolling* slots are the placed slots that existed before the update (all of them for a
  global service, slots <= ``previous.replicas`` otherwise), in ascending order; batch k is the
  k-th run of ``parallelism`` of them (0: one batch of all). Slots added by a scale-up are not
  rolled: they start on the current version at once. Slots with no node are not in any batch,
  so no batch ever waits on them.
- A slot is *done* when the task record at the node placement gives it runs the current
  version and is ready (health "healthy", or state running with no health check), and has
  been for ``delay`` seconds by its ``since``.
- Batch 0 may run the current version at once; batch k once every slot of batches < k is
  done; every batch once no task record of the service runs another version. A node
  replaces its own slot (old version running) when the slot's batch may; a task already on
  the current version is never taken back; a slot starting afresh (a restarted agent, a moved
  slot) starts on the current spec if its batch may, else on ``previous``'s.
- A *failure* is a task record of the current version carrying ``update_failure``: its owner
  saw it exit non-zero or turn unhealthy within ``monitor`` of (re)starting, or stop before it
  was ever done (``owner_failure``). Then no batch after the failed one may start (pause); with
  ``failure_action`` rollback an admin node writes ``rollback_value`` (deterministic in what it
  rolls back, so admins that see the failure at once write the same spec and version). A
  rollback's own failures pause it: an update ends, it never ping-pongs.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_UPDATE_CONFIG",
    "DRAIN_S",
    "FAILURE_ACTIONS",
    "MAX_MESSAGE_CHARS",
    "MAX_VERSION",
    "Plan",
    "RollingError",
    "Rollout",
    "SinceClock",
    "TaskView",
    "UpdateConfig",
    "UpdateStatus",
    "check_message",
    "check_rollback",
    "owner_failure",
    "plan",
    "rollback_value",
    "rollout_of",
    "task_view",
    "update_config",
]

FAILURE_ACTIONS = ("pause", "rollback")
# Docker's defaults: one task at a time, no delay, pause on failure, watch each task 5 s.
DEFAULT_PARALLELISM = 1
DEFAULT_DELAY_S = 0.0
DEFAULT_FAILURE_ACTION = "pause"
DEFAULT_MONITOR_S = 5.0
# A day between batches or of watching is already "never"; larger values are typos.
MAX_UPDATE_S = 86_400.0
# Parallelism beyond the most slots a service can have is "all at once" (placement/spec.py).
MAX_PARALLELISM = 10_000
# Versions count spec changes; 2^53 keeps them exact in every JSON reader.
MAX_VERSION = (1 << 53) - 1
# A failure's or rollback's one line.
MAX_MESSAGE_CHARS = 300
# Before an old task is stopped for its replacement, its endpoint leaves DNS, VIP maps and
# published ports, and the node waits this long: the withdrawal reaches every peer by gossip in
# well under a second on a LAN (~3 gossip rounds of 200 ms), and a peer's reconcile pass then
# reprograms its resolver and NAT maps; a connection opened before that still lands on a live
# process, and one in flight finishes (the process is still there, its FDB entries too).
DRAIN_S = 1.5
# Task states of a task that is up (Docker's "running").
_UP = "running"


class RollingError(ValueError):
    """An update_config or rollback mark breaks the schema; one line."""


@dataclass(frozen=True)
class UpdateConfig:
    parallelism: int = DEFAULT_PARALLELISM
    delay: float = DEFAULT_DELAY_S
    failure_action: str = DEFAULT_FAILURE_ACTION
    monitor: float = DEFAULT_MONITOR_S

    def to_value(self) -> dict[str, Any]:
        return {"parallelism": self.parallelism, "delay": self.delay,
                "failure_action": self.failure_action, "monitor": self.monitor}


DEFAULT_UPDATE_CONFIG = UpdateConfig()
_CONFIG_KEYS = frozenset(DEFAULT_UPDATE_CONFIG.to_value())


def _seconds(value: object, what: str) -> float:
    if type(value) not in (int, float):
        raise RollingError(f"update_config {what} must be a number of seconds")
    assert isinstance(value, int | float)
    if not (math.isfinite(value) and 0 <= value <= MAX_UPDATE_S):
        raise RollingError(f"update_config {what} must be 0..{MAX_UPDATE_S:g} seconds")
    return float(value)


def update_config(value: object, base: UpdateConfig = DEFAULT_UPDATE_CONFIG) -> UpdateConfig:
    """A service's ``update_config`` (None or absent: BASE), checked whole: no other keys
    (its readers take every key they are given, as a restart policy's do)."""
    if value is None:
        return base
    if type(value) is not dict:
        raise RollingError("update_config must be a map")
    unknown = sorted(str(k)[:40] for k in value if k not in _CONFIG_KEYS)
    if unknown:
        raise RollingError(f"update_config: unknown key {unknown[0]!r}")
    par = value.get("parallelism", base.parallelism)
    if type(par) is not int or not 0 <= par <= MAX_PARALLELISM:
        raise RollingError(f"update_config parallelism must be 0..{MAX_PARALLELISM}")
    action = value.get("failure_action", base.failure_action)
    if action not in FAILURE_ACTIONS:
        raise RollingError("update_config failure_action must be pause or rollback")
    return UpdateConfig(par, _seconds(value.get("delay", base.delay), "delay"), str(action),
                        _seconds(value.get("monitor", base.monitor), "monitor"))


def check_message(value: object, what: str) -> str:
    if type(value) is not str or len(value) > MAX_MESSAGE_CHARS or "\0" in value:
        raise RollingError(f"{what} must be a string of at most {MAX_MESSAGE_CHARS}")
    return value


def check_rollback(value: object, version: int) -> tuple[int, str]:
    """A version's rollback mark: {"from": the version it rolled back (< VERSION), "reason"}."""
    if type(value) is not dict or set(value) != {"from", "reason"}:
        raise RollingError("rollback must be a map of from and reason")
    origin = value["from"]
    if type(origin) is not int or not 1 <= origin < version:
        raise RollingError(f"rollback from must be a version 1..{version - 1}")
    return origin, check_message(value["reason"], "rollback reason")


@dataclass(frozen=True)
class Rollout:
    """What of a service record the rule reads."""

    name: str
    version: int = 1
    previous_version: int | None = None
    previous_replicas: int | None = None
    global_mode: bool = False
    config: UpdateConfig = DEFAULT_UPDATE_CONFIG
    rollback_from: int | None = None
    rollback_reason: str = ""


def rollout_of(value: Mapping[str, Any]) -> Rollout:
    """The rule's view of a stored (so already validated) service value; a field that is off
    anyway reads as its default, never raises."""
    def _int(v: object, default: int | None) -> int | None:
        return v if type(v) is int and v >= 1 else default

    version = _int(value.get("version"), 1) or 1
    prev = value.get("previous")
    pv = pr = None
    if type(prev) is dict and type(prev.get("spec")) is dict:
        pv = _int(prev.get("version"), None)
        replicas = prev.get("replicas")
        pr = replicas if type(replicas) is int and replicas >= 0 else None
        if pv is None or pv >= version:
            pv = pr = None
    try:
        config = update_config(value.get("update_config"))
    except RollingError:
        config = DEFAULT_UPDATE_CONFIG
    rb_from, rb_reason = None, ""
    if "rollback" in value:
        with contextlib.suppress(RollingError):  # stored values are checked; belt and braces
            rb_from, rb_reason = check_rollback(value["rollback"], version)
    return Rollout(str(value.get("name", "")), version, pv, pr,
                   value.get("mode") == "global", config, rb_from, rb_reason)


@dataclass(frozen=True)
class TaskView:
    """What of a task record the rule reads."""

    slot: int
    node: str
    version: int = 1
    state: str = "starting"
    health: str | None = None
    since: float | None = None
    update_failure: str | None = None

    @property
    def ready(self) -> bool:
        """Serving: healthy by its check, or running when it has none."""
        return self.health == "healthy" or (self.health is None and self.state == _UP)


def task_view(value: Mapping[str, Any]) -> TaskView | None:
    """A stored task record as the rule reads it; None when it is not one."""
    slot, node = value.get("slot"), value.get("node")
    if type(slot) is not int or type(node) is not str:
        return None
    version = value.get("version", 1)
    raw_since = value.get("since")
    since = float(raw_since) if isinstance(raw_since, int | float) and \
        not isinstance(raw_since, bool) and math.isfinite(raw_since) else None
    health = value.get("health")
    failure = value.get("update_failure")
    return TaskView(
        slot, node, version if type(version) is int else 0,
        str(value.get("state")),
        health if type(health) is str else None,
        since,
        failure if type(failure) is str else None)


class SinceClock:
    """When a task has been in its state, as this node may count it: the owner's ``since``,
    but never later than when this node first saw that record. An owner whose clock runs ahead
    would otherwise hold every later batch back by its lead (up to the 120 s the replay window
    of crypto/freshness.py lets clocks differ); one whose clock lags makes us count from a
    little early, by that lag. Bounded: ``prune`` keeps only the records still there."""

    def __init__(self) -> None:
        self.first_seen: dict[tuple[str, float | None], float] = {}

    def since(self, key: str, since: float | None, now: float) -> float:
        seen = self.first_seen.setdefault((key, since), now)
        return seen if since is None else min(since, seen)

    def prune(self, live: set[tuple[str, float | None]]) -> None:
        """Forget every (record key, since) not in LIVE."""
        self.first_seen = {k: v for k, v in self.first_seen.items() if k in live}


@dataclass(frozen=True)
class UpdateStatus:
    state: str  # updating | paused | rolling_back | rolled_back | completed
    message: str

    def to_json(self) -> dict[str, str]:
        return {"state": self.state, "message": self.message}


@dataclass(frozen=True)
class Plan:
    """The rule's answer for one service: the slots that may run its current version now (a
    task on it keeps running whatever this says), how the update stands, and the failure that
    stopped it, if one did (``rollback`` then says whether an admin should roll it back)."""

    allowed: frozenset[int]
    status: UpdateStatus | None
    failure: str | None = None
    rollback: bool = False


_NONE = TaskView(0, "", version=0)


def _batches(slots: list[int], parallelism: int) -> list[list[int]]:
    size = parallelism or max(len(slots), 1)
    return [slots[i:i + size] for i in range(0, len(slots), size)]


def plan(rollout: Rollout, placement: Mapping[int, str], tasks: Iterable[TaskView],
         now: float) -> Plan:
    """The rule (module docstring) for one service. PLACEMENT is slot -> node as every node
    computes it; TASKS are the service's task records with ``since`` as SinceClock gives it."""
    v = rollout.version
    cfg = rollout.config
    at = {(t.slot, t.node): t for t in tasks}
    current = [t for t in at.values() if t.version == v]
    slots = sorted(placement)
    if rollout.previous_version is None:  # nothing older to run: every slot is current
        return Plan(frozenset(slots), None)

    def done(slot: int, hold: float) -> bool:
        t = at.get((slot, placement[slot]))
        return (t is not None and t.version == v and t.ready and t.since is not None and
                now - t.since >= hold)

    grown = (set() if rollout.global_mode or rollout.previous_replicas is None else
             {s for s in slots if s > rollout.previous_replicas})
    rolling = [s for s in slots if s not in grown]
    batches = _batches(rolling, cfg.parallelism)
    failed = sorted((t.slot, t.node, t.update_failure) for t in current if t.update_failure)
    failure = f"{rollout.name}.{failed[0][0]} on {failed[0][1]} {failed[0][2]}" if failed else None
    failed_slots = {s for s, _, _ in failed}
    last = len(batches) - 1
    for k, batch in enumerate(batches):
        if failed_slots & set(batch) or not all(done(s, cfg.delay) for s in batch):
            last = k  # a failed batch stays the last one started, even once it recovers
            break
    if failed and not failed_slots & set(rolling):  # a grown or unplaced slot failed
        started = [k for k, batch in enumerate(batches)
                   if any(at.get((s, placement[s]), _NONE).version == v for s in batch)]
        last = min(last, max(started, default=0))
    allowed = grown.union(*batches[:last + 1])
    if all(t.version == v for t in at.values()):
        # No task anywhere runs an older version: nothing is left to roll, so a slot starting
        # afresh (a restarted agent, a slot moved off a dead node) starts on the current spec.
        # Without this, an update that had finished would start such slots on `previous`
        # whenever an earlier slot is down for a moment (its own restart, say).
        allowed = set(slots)
    settle = max(cfg.delay, cfg.monitor)
    finished = sum(1 for s in slots if done(s, settle))
    progress = f"{finished}/{len(slots)} tasks on version {v}"
    on_new = sum(1 for s in slots if done(s, 0.0))
    if on_new > finished:  # running the new version, not yet past the monitor period
        progress += f" ({on_new - finished} more running it, within {settle:g} s of starting)"
    rolled = rollout.rollback_from
    if failure is not None:
        if rolled is None and cfg.failure_action == "rollback":
            return Plan(frozenset(allowed), UpdateStatus(
                "rolling_back", _cut(f"update to version {v} failed: {failure}; rolling "
                                     "back")), failure, True)
        what = (f"rollback from version {rolled} paused" if rolled is not None else
                f"update to version {v} paused")
        return Plan(frozenset(allowed), UpdateStatus("paused", _cut(f"{what}: {failure}")),
                    failure)
    if finished < len(slots):
        state, what = "updating", f"updating to version {v}"
        if rolled is not None:
            state, what = "rolling_back", f"rolling back from version {rolled}"
        return Plan(frozenset(allowed), UpdateStatus(state, f"{what}: {progress}"))
    if rolled is not None:
        return Plan(frozenset(allowed), UpdateStatus(
            "rolled_back", _cut(f"rolled back from version {rolled} ({progress}): "
                                f"{rollout.rollback_reason}")))
    return Plan(frozenset(allowed), UpdateStatus("completed", progress))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS - 3] + "..."


def owner_failure(*, config: UpdateConfig, now: float, run_started: float,
                  ready_since: float | None, state: str, exit_code: int | None,
                  health: str | None) -> str | None:
    """Whether a task of an update in progress, judged by the node running it (its own clock),
    failed the update, and how (one line), else None: it exited non-zero or turned unhealthy
    within ``monitor`` of (re)starting (each restart watched anew, as Docker watches each new
    task), or it stopped or turned unhealthy before it was ever done, ready for ``delay``
    (Docker's "early termination"; such a task would otherwise hold the update for ever).
    READY_SINCE: when this run last became ready, None if it never did."""
    after = max(0.0, now - run_started)
    if health == "unhealthy":
        how, bad = "turned unhealthy", True
    elif state in ("failed", "complete") and exit_code is not None:
        how, bad = f"exited with code {exit_code}", exit_code != 0
    else:
        return None
    early = ready_since is None or now - ready_since < config.delay
    if (bad and after <= config.monitor) or early:
        return _cut(f"{how} {after:.1f}s after starting")
    return None


def rollback_value(value: Mapping[str, Any], reason: str) -> dict[str, Any] | None:
    """The service value that rolls VALUE back to its previous spec: that spec, version + 1,
    ``previous`` the spec rolled back, marked with where it came from and why. Deterministic,
    so every admin that writes it for the same failure writes the same spec and version; None
    when there is nothing to go back to."""
    prev = value.get("previous")
    if type(prev) is not dict or type(prev.get("spec")) is not dict:
        return None
    version = value.get("version", 1)
    if type(version) is not int or version >= MAX_VERSION:
        return None
    out = dict(value)
    out["spec"] = prev["spec"]
    nets = prev["spec"].get("networks")
    if type(nets) is list and nets and type(nets[0]) is str:
        out["network"] = nets[0]  # the record's network is its spec's first
    out["version"] = version + 1
    out["previous"] = {"spec": value.get("spec"), "version": version,
                       "replicas": value.get("replicas", 1)}
    out["rollback"] = {"from": version, "reason": _cut(reason)}
    return out
