"""meshctl's rolling updates (issue 17): `service update`, `service rollback`, the `--update-*`
policy flags (also on `service create`), and the wait for an update to complete, pause or roll
back. meshctl.py calls these; the agent's side is meshnet/agent/rollouts.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, Protocol

from meshnet.cli.health_flags import add_health_flags, health_args, seconds_arg
from meshnet.state.rolling import FAILURE_ACTIONS

__all__ = ["ROLLING_VERBS", "add_update_policy_flags", "add_update_verbs", "outcome",
           "rolling_request", "update_policy_args", "wait_for_rollout"]

# The verbs that wait for a rollout unless --detach.
ROLLING_VERBS = frozenset({"service update", "service rollback"})
UPDATE_EXAMPLES = (
    "meshctl service update web --env-add VERSION=2\n"
    "meshctl service update web --update-parallelism 2 --update-delay 10s -- python3 app.py\n"
    "meshctl service update web --update-failure-action rollback --update-monitor 30s "
    "--limit-memory 256M\n"
    "meshctl service update web --replicas 6 --constraint-add node.labels.zone==a --detach")


def _count(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise argparse.ArgumentTypeError("give a whole number, 0 or more")
    return int(text)


def add_update_policy_flags(p: argparse.ArgumentParser) -> None:
    """Docker's `--update-*` flags (defaults: parallelism 1, delay 0s, pause, monitor 5s)."""
    p.add_argument("--update-parallelism", type=_count, metavar="N",
                   help="tasks replaced at a time by an update (default 1; 0: all at once), "
                        "e.g. --update-parallelism 2")
    p.add_argument("--update-delay", type=seconds_arg, metavar="DURATION",
                   help="how long a batch must have run (healthy, if checked) before the next "
                        "one starts (default 0s), e.g. --update-delay 10s")
    p.add_argument("--update-failure-action", choices=FAILURE_ACTIONS,
                   help="when a new task fails: pause the update (default) or roll back to "
                        "the previous spec, e.g. --update-failure-action rollback")
    p.add_argument("--update-monitor", type=seconds_arg, metavar="DURATION",
                   help="a new task that exits non-zero or turns unhealthy this soon after "
                        "starting fails the update (default 5s), e.g. --update-monitor 30s")


def update_policy_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {"update_parallelism": ns.update_parallelism, "update_delay": ns.update_delay,
            "update_failure_action": ns.update_failure_action,
            "update_monitor": ns.update_monitor}


Verb = Callable[..., argparse.ArgumentParser]


def add_update_verbs(svc: Any, verb: Verb,
                     add_wait_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """`service update NAME ...` and `service rollback NAME` under SVC (meshctl's helpers)."""
    su = verb(svc, "update", "change a service and roll its tasks over to it, a batch at a "
              "time; waits until the update completes, pauses or rolls back", UPDATE_EXAMPLES)
    su.add_argument("name", help="the service's name")
    su.add_argument("--env-add", action="append", default=[], metavar="K=V",
                    help="set an environment variable (repeatable), e.g. --env-add VERSION=2")
    su.add_argument("--env-rm", action="append", default=[], metavar="K",
                    help="remove an environment variable (repeatable), e.g. --env-rm DEBUG")
    su.add_argument("--replicas", type=_count, metavar="N",
                    help="run N tasks (new slots start on the new spec at once)")
    su.add_argument("--constraint-add", action="append", default=[], metavar="EXPR",
                    help="add a placement constraint (repeatable), e.g. node.labels.zone==a")
    su.add_argument("--constraint-rm", action="append", default=[], metavar="EXPR",
                    help="remove a placement constraint, as written (repeatable)")
    su.add_argument("--limit-memory", metavar="BYTES",
                    help="memory limit, e.g. 256M (0: none)")
    su.add_argument("--limit-cpu", metavar="CPUS", help="CPU limit, e.g. 0.5 (0: none)")
    su.add_argument("--limit-pids", metavar="N",
                    help="most processes and threads at once (0: none)")
    add_health_flags(su)
    add_update_policy_flags(su)
    add_wait_flags(su)
    sr = verb(svc, "rollback", "go back to the spec before the last update, rolled out as an "
              "update is; waits until it completes",
              "meshctl service rollback web\nmeshctl service rollback web --detach")
    sr.add_argument("name", help="the service's name")
    add_wait_flags(sr)


def rolling_request(ns: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """(display name, op, args) of `service update|rollback`."""
    if ns.svc_cmd == "rollback":
        return "service rollback", "service.rollback", {"name": ns.name}
    return "service update", "service.update", {
        "name": ns.name, "env_add": ns.env_add, "env_rm": ns.env_rm, "replicas": ns.replicas,
        "constraint_add": ns.constraint_add, "constraint_rm": ns.constraint_rm,
        "limit_memory": ns.limit_memory, "limit_cpu": ns.limit_cpu,
        "limit_pids": ns.limit_pids, **health_args(ns), **update_policy_args(ns),
        "command": list(ns.command)}


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _settled(doc: dict[str, Any]) -> bool:
    """Exactly the desired tasks, one per slot, all running."""
    tasks = [t for t in doc.get("tasks") or [] if isinstance(t, dict)]
    desired = _int(doc.get("desired")) or 0
    return (len(tasks) == desired and len({str(t.get("slot")) for t in tasks}) == desired and
            all(t.get("state") == "running" for t in tasks))


def outcome(doc: dict[str, Any], verb: str, target: int) -> tuple[int, str] | None:
    """Where a rollout to version TARGET stands in a `service.progress` DOC: None while it goes
    on, else (exit code, one line): 0 completed (an update) or rolled back (a rollback), 1
    paused, rolled back after a failure, superseded or removed."""
    name = str(doc.get("name"))
    if doc.get("exists") is False:
        return 1, f"{name}: the service was removed"
    version = _int(doc.get("version"))
    status = doc.get("update_status")
    state = status.get("state") if isinstance(status, dict) else None
    message = str(status.get("message")) if isinstance(status, dict) else ""
    if version is None:  # an agent from before rolling updates: the tasks are all there is
        return (0, f"{name}: {len(doc.get('tasks') or [])} tasks running") \
            if _settled(doc) else None
    rolling_back = verb == "service rollback"
    if version == target:
        if state == "paused":
            return 1, f"{name}: {message}"
        finished = "rolled_back" if rolling_back else "completed"
        if (state in (finished, None) or (state == "rolled_back" and not rolling_back)) \
                and _settled(doc):
            return 0, f"{name}: {message or f'version {version}'}"
        return None
    if version > target and not rolling_back and state in ("rolling_back", "rolled_back",
                                                            "paused"):
        if state == "rolling_back":
            return None  # the rollback of our update: wait for its end
        return 1, f"{name}: {message}"  # says why the update failed
    if version > target:
        return 1, f"{name}: superseded by another change (now at version {version})"
    return None  # our write has not reached this agent's view yet


class ProgressLike(Protocol):
    def update(self, service: str, summary: str, tasks: list[tuple[str, str, str]]) -> None: ...

    def done(self, line: str) -> None: ...


def _lines(doc: dict[str, Any],
           task_progress: Callable[[dict[str, Any]], list[tuple[str, str, str]]]
           ) -> list[tuple[str, str, str]]:
    """meshctl's per-task lines, each with the spec version the task runs."""
    tasks = [t for t in doc.get("tasks") or [] if isinstance(t, dict)]
    out = []
    for (task, node, state), row in zip(task_progress(doc), tasks, strict=False):
        v = _int(row.get("version"))
        out.append((task, node, f"{state} v{v}" if v is not None else state))
    return out


def wait_for_rollout(fetch: Callable[[], dict[str, Any] | None], verb: str, result: Any,
                     timeout: float, progress: ProgressLike,
                     task_progress: Callable[[dict[str, Any]], list[tuple[str, str, str]]],
                     clock: Callable[[], float], sleep: Callable[[float], None],
                     poll_s: float, warn: Callable[[str], None]) -> tuple[int, Any]:
    """Poll FETCH (the agent's `service.progress`) until the rollout RESULT started ends
    (`outcome`), showing a line per task with its version on PROGRESS; exit 1 with the why
    (WARN) on a pause, a rollback or after TIMEOUT s."""
    target = _int(result.get("version")) if isinstance(result, dict) else None
    start = clock()
    last: dict[str, Any] = {}
    while True:
        doc = fetch()
        if doc is None:
            warn("this agent does not report progress; not waiting")
            return 0, result
        last = doc
        status = doc.get("update_status")
        summary = (str(status.get("message")) if isinstance(status, dict) else
                   f"{doc.get('name')}: version {doc.get('version')}")
        progress.update(str(doc.get("name")), summary, _lines(doc, task_progress))
        ended = outcome(doc, verb, target if target is not None else
                        _int(doc.get("version")) or 1)
        if ended is not None:
            code, line = ended
            if code == 0:
                progress.done(line)
            else:
                warn(line)
            # what is printed after is the service as it ended, not as it was written
            if isinstance(result, dict) and "update_status" in doc:
                result = {**result, "update_status": doc["update_status"]}
            return code, result
        waited = clock() - start
        if waited >= timeout:
            status = last.get("update_status")
            why = status.get("message") if isinstance(status, dict) else "not all running"
            warn(f"{last.get('name')}: not finished after {round(waited)}s: {why} (see "
                 f"meshctl service ps {last.get('name')})")
            return 1, result
        sleep(poll_s)
