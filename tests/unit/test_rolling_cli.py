"""meshctl's `service update|rollback` (meshnet/cli/rolling.py): the request each flag makes,
and the wait that ends on completed (0), paused or rolled back (1, one line why)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from meshnet.cli import meshctl
from meshnet.cli.rolling import outcome


def progress(version: int, state: str | None, *task_states: str, message: str = "msg",
             task_version: int | None = None) -> dict[str, Any]:
    return {"name": "web", "exists": True, "desired": len(task_states),
            "placed": len(task_states), "version": version,
            "update_status": None if state is None else {"state": state, "message": message},
            "tasks": [{"task": f"web.{i}", "slot": i, "node": "h1", "state": s,
                       "version": task_version or version}
                      for i, s in enumerate(task_states, 1)]}


class Agent:
    """meshctl.Client's stand-in: the update's reply, then the progress docs in turn."""

    def __init__(self, reply: dict[str, Any], docs: list[dict[str, Any]]) -> None:
        self.reply, self.docs = reply, docs
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, path: str) -> Agent:
        return self

    def call(self, op: str, args: dict[str, Any], timeout: float | None
             ) -> Iterator[dict[str, Any]]:
        self.calls.append((op, args))
        if op == "service.progress":
            doc = self.docs.pop(0) if len(self.docs) > 1 else self.docs[0]
            yield {"v": 1, "ok": True, "result": doc}
        else:
            yield {"v": 1, "ok": True, "result": self.reply}


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meshctl, "POLL_S", 0.0)
    monkeypatch.delenv(meshctl.SOCKET_ENV, raising=False)


def test_update_flags_make_the_request(monkeypatch: pytest.MonkeyPatch, fast: None,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    agent = Agent({"name": "web", "version": 2, "changed": True},
                  [progress(2, "completed", "running", "running")])
    monkeypatch.setattr(meshctl, "Client", agent)
    code = meshctl.main(["service", "update", "web", "--env-add", "VERSION=2", "--env-rm", "X",
                         "--constraint-add", "node.name!=h3", "--limit-memory", "64M",
                         "--update-parallelism", "2", "--update-delay", "1.5s",
                         "--update-failure-action", "rollback", "--update-monitor", "3",
                         "--health-cmd", "true", "--", "sleep", "9"])
    assert code == 0
    op, args = agent.calls[0]
    assert op == "service.update"
    assert args["env_add"] == ["VERSION=2"] and args["env_rm"] == ["X"]
    assert args["constraint_add"] == ["node.name!=h3"] and args["limit_memory"] == "64M"
    assert (args["update_parallelism"], args["update_delay"], args["update_failure_action"],
            args["update_monitor"]) == (2, 1.5, "rollback", 3.0)
    assert args["health_cmd"] == "true" and args["command"] == ["sleep", "9"]
    assert "web: msg" in capsys.readouterr().err


def test_create_takes_the_policy(monkeypatch: pytest.MonkeyPatch, fast: None) -> None:
    ns = meshctl.build_parser().parse_args(
        ["service", "create", "web", "--network", "n", "--update-parallelism", "0"])
    ns.command = ["true"]
    _, op, args = meshctl.to_request(ns)
    assert op == "service.create" and args["update_parallelism"] == 0
    assert args["update_failure_action"] is None  # the agent's default applies


@pytest.mark.parametrize(("docs", "code", "line"), [
    ([progress(2, "updating", "running", "starting"), progress(2, "completed", "running",
                                                               "running", message="2/2 ok")],
     0, "web: 2/2 ok"),
    ([progress(2, "paused", "running", "failed", message="update to version 2 paused: web.2 "
               "on h1 exited with code 1 0.1s after starting")],
     1, "meshctl: service update: web: update to version 2 paused: web.2 on h1 exited with "
        "code 1 0.1s after starting"),
    ([progress(2, "rolling_back", "running", "failed"),
      progress(3, "rolling_back", "running", "starting"),
      progress(3, "rolled_back", "running", "running", message="rolled back from version 2")],
     1, "meshctl: service update: web: rolled back from version 2"),
])
def test_update_waits_until_it_completes_pauses_or_rolls_back(
        monkeypatch: pytest.MonkeyPatch, fast: None, capsys: pytest.CaptureFixture[str],
        docs: list[dict[str, Any]], code: int, line: str) -> None:
    monkeypatch.setattr(meshctl, "Client", Agent({"name": "web", "version": 2}, docs))
    assert meshctl.main(["service", "update", "web", "--env-add", "A=1"]) == code
    err = capsys.readouterr().err
    assert line in err.splitlines(), err


def test_rollback_waits_for_its_end_and_detach_does_not(
        monkeypatch: pytest.MonkeyPatch, fast: None, capsys: pytest.CaptureFixture[str]) -> None:
    agent = Agent({"name": "web", "version": 4},
                  [progress(4, "rolling_back", "running", "starting"),
                   progress(4, "rolled_back", "running", "running", message="back")])
    monkeypatch.setattr(meshctl, "Client", agent)
    assert meshctl.main(["service", "rollback", "web"]) == 0
    assert "web: back" in capsys.readouterr().err
    agent.calls.clear()
    assert meshctl.main(["service", "rollback", "web", "--detach"]) == 0
    assert [op for op, _ in agent.calls] == ["service.rollback"]


def test_outcome_edges() -> None:
    assert outcome({"name": "web", "exists": False}, "service update", 2) == \
        (1, "web: the service was removed")
    assert outcome(progress(1, "completed", "running"), "service update", 2) is None  # not yet
    assert outcome(progress(3, "updating", "running"), "service update", 2) == \
        (1, "web: superseded by another change (now at version 3)")
    # a policy-only update of a service never updated: done once its tasks run
    assert outcome(progress(1, None, "running"), "service update", 1) == (0, "web: version 1")
    assert outcome(progress(2, "completed", "running", "starting"), "service update", 2) is None


def test_the_service_printed_after_the_wait_is_as_it_ended(
        monkeypatch: pytest.MonkeyPatch, fast: None, capsys: pytest.CaptureFixture[str]) -> None:
    written = {"name": "web", "version": 2,
               "update_status": {"state": "updating", "message": "0/2 on version 2"}}
    monkeypatch.setattr(meshctl, "Client", Agent(written, [
        progress(2, "completed", "running", "running", message="2/2 on version 2")]))
    assert meshctl.main(["--json", "service", "update", "web", "--env-add", "A=1"]) == 0
    out = capsys.readouterr().out
    assert '"completed"' in out and '"updating"' not in out, out
