"""meshctl as scripts and people meet it, against a scripted agent (no sockets): where --json
and --socket may go, MESHNET_SOCKET, help texts and examples, the one printer (no Python reprs
in any verb's human output), `version`, partial key rotations, permission errors, JSON lines
under --json, and the wait with progress after `service create|scale|rm`."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
import shlex
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import meshnet
from meshnet.cli import meshctl
from meshnet.cli.meshctl import (
    AgentDenied,
    NoAgent,
    Progress,
    build_parser,
    cell,
    main,
    render,
    settled,
    table,
    wait_for_services,
    why_not,
)

Reply = Any | Callable[[dict[str, Any]], Any]


class FakeAgent:
    """Stands in for meshctl.Client: OP -> the result (or a function of the args giving it);
    an op it has no answer for is `unknown_op`. Records every call."""

    def __init__(self, replies: dict[str, Reply], events: list[dict[str, Any]] | None = None,
                 error: dict[str, str] | None = None, raises: Exception | None = None) -> None:
        self.replies = replies
        self.events = events or []
        self.error = error or {}
        self.raises = raises
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, path: str) -> FakeAgent.Conn:
        return FakeAgent.Conn(self, path)

    class Conn:
        def __init__(self, agent: FakeAgent, path: str) -> None:
            self.agent, self.path = agent, path

        def call(self, op: str, args: dict[str, Any],
                 timeout: float | None) -> Iterator[dict[str, Any]]:
            a = self.agent
            a.calls.append((self.path, op, args))
            if a.raises is not None:
                raise a.raises
            for e in a.events:
                yield {"v": 1, "event": e}
            if op in a.error:
                yield {"v": 1, "ok": False, "error": a.error[op], "code": "failed"}
            elif op in a.replies:
                r = a.replies[op]
                yield {"v": 1, "ok": True, "result": r(args) if callable(r) else r}
            else:
                yield {"v": 1, "ok": False, "error": "unknown", "code": "unknown_op"}


@pytest.fixture
def agent(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeAgent]:
    monkeypatch.delenv(meshctl.SOCKET_ENV, raising=False)

    def make(replies: dict[str, Reply] | None = None, **kw: Any) -> FakeAgent:
        fake = FakeAgent(replies or {}, **kw)
        monkeypatch.setattr(meshctl, "Client", fake)
        return fake
    return make


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- where the global options go ------------------------------------------------------------------

STATUS = {"name": "h1", "version": "0.1.0", "node_id": "ab" * 16, "addr": "10.0.0.1:7946",
          "incarnation": 3, "boots": 2, "uptime_s": 12.5, "profile": "lan",
          "encryption": "aes-256-gcm",
          "identity": {"ca": "cd" * 16, "roles": ["admin"], "serial": "01" * 8,
                       "expires": "2026-01-01T00:00:00Z", "certs_known": 3, "certs_learned": 2,
                       "certs_refused": 0, "revocations": 0, "claims_refused": 0,
                       "refusals": {"expired": 1}, "last_refusal": None},
          "members": {"alive": 3, "suspect": 0, "dead": 1, "left": 0},
          "datapath": {"overlay": {"kind": "vxlan", "mtu": 1450, "local_ip": "10.0.0.1",
                                   "networks": 2, "passes": 40, "errors": 0},
                       "encrypted": {"kind": "userspace", "running": True, "port": 4800,
                                     "gso": True, "gro": False, "underlay_mtu": 1500,
                                     "overlay_mtu": 1420, "max_datagram": None, "peers": 2,
                                     "handshake_drops": {}, "handshake_guard": {
                                         "under_load": False, "sources_under_load": 0,
                                         "refused": {"rate": 0, "global": 0}}}},
          "gossip": {f"counter_{i}": i for i in range(30)},
          "store": {"entries": 12, "refused_invalid": 0},
          "dns": {"queries": 5, "internal_errors": 0}, "tasks": {"starts": 4},
          "control": {"bad_requests": 0, "internal_errors": 0}}


@pytest.mark.parametrize("argv", [
    ["status", "--json"], ["--json", "status"], ["status", "--json", "--socket", "/s"],
    ["--socket", "/s", "--json", "status"], ["--socket", "/s", "status", "--json"]])
def test_json_and_socket_go_before_or_after_the_verb(
        agent: Callable[..., FakeAgent], capsys: pytest.CaptureFixture[str],
        argv: list[str]) -> None:
    fake = agent({"status": STATUS})
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert json.loads(out)["name"] == "h1"
    want = "/s" if "/s" in argv else meshctl.DEFAULT_SOCKET
    assert fake.calls == [(want, "status", {})]


def test_json_after_a_nested_verb(agent: Callable[..., FakeAgent],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    agent({"service.ls": [{"name": "web", "replicas": "1/1"}]})
    for argv in (["service", "ls", "--json"], ["service", "--json", "ls"],
                 ["--json", "service", "ls"]):
        code, out, _ = run(capsys, *argv)
        assert code == 0 and json.loads(out) == [{"name": "web", "replicas": "1/1"}], argv
    code, out, _ = run(capsys, "service", "ls")
    assert code == 0 and "WEB" not in out and out.startswith("NAME")


def test_meshnet_socket_sets_the_socket_and_the_flag_wins(
        agent: Callable[..., FakeAgent], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = agent({"status": STATUS})
    monkeypatch.setenv(meshctl.SOCKET_ENV, "/env.sock")
    assert run(capsys, "status")[0] == 0
    assert run(capsys, "status", "--socket", "/flag.sock")[0] == 0
    monkeypatch.setenv(meshctl.SOCKET_ENV, "")  # set but empty: the default
    assert run(capsys, "status")[0] == 0
    assert [c[0] for c in fake.calls] == ["/env.sock", "/flag.sock", meshctl.DEFAULT_SOCKET]


def test_no_agent_names_the_socket_and_exits_3(agent: Callable[..., FakeAgent],
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    agent(raises=NoAgent("refused"))
    monkeypatch.setenv(meshctl.SOCKET_ENV, "/env.sock")
    code, out, err = run(capsys, "members")
    assert (code, out) == (3, "")
    assert err == "meshctl: cannot reach the agent at /env.sock (is meshnetd running?)\n"


def test_permission_denied_says_so_and_exits_1(agent: Callable[..., FakeAgent],
                                               capsys: pytest.CaptureFixture[str],
                                               tmp_path: Any) -> None:
    agent(raises=AgentDenied("Permission denied"))
    sock = tmp_path / "ctl.sock"
    sock.write_text("")
    sock.chmod(0o600)
    code, out, err = run(capsys, "--socket", str(sock), "status")
    assert (code, out) == (1, "")
    assert err.startswith(f"meshctl: permission denied on {sock} (run as ")
    assert "meshnetd running" not in err and len(err.splitlines()) == 1
    sock.chmod(0o660)  # a group that may write it is named too
    assert "or a member of group" in run(capsys, "--socket", str(sock), "status")[2]


# --- help: every verb and option has one, every verb an example -----------------------------------

def _walk(p: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, argparse.ArgumentParser,
                                                                   argparse.Action | None]]:
    yield path, p, None
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, child in action.choices.items():
                assert helps.get(name), f"{path} {name}: no help line"
                yield from _walk(child, f"{path} {name}")
        else:
            yield path, p, action


def test_every_verb_and_option_has_help_and_every_verb_an_example() -> None:
    missing = []
    verbs = 0
    for path, parser, action in _walk(build_parser(), "meshctl"):
        if action is None:
            verbs += 1
            if "example" not in (parser.epilog or ""):
                missing.append(f"{path}: no example")
            elif not isinstance(parser.formatter_class, type) or not issubclass(
                    parser.formatter_class, argparse.RawDescriptionHelpFormatter):
                missing.append(f"{path}: its examples would be re-wrapped")
            if not parser.description:
                missing.append(f"{path}: no description")
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}: no help")
    assert not missing, "\n".join(missing)
    assert verbs > 30  # the walk reached the nested verbs


def test_examples_parse() -> None:
    """Every example in the help is a command line this parser accepts."""
    parser = build_parser()
    checked = 0
    for _path, p, action in _walk(parser, "meshctl"):
        if action is not None:
            continue
        for line in (p.epilog or "").splitlines():
            line = re.sub(r"\$\([^)]*\)", "VALUE", line)  # a shell substitution: one word
            line = re.split(r"[#|>]", line)[0].strip()  # the shell's part is not ours
            if "meshctl " not in line:
                continue
            words = shlex.split(line[line.index("meshctl ") + len("meshctl "):])
            words = words[:words.index("--")] if "--" in words else words
            parser.parse_args(words)  # exits 2 on an example that does not parse
            checked += 1
    assert checked > 40


def test_build_parser_is_side_effect_free(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(meshctl.SOCKET_ENV, "/env.sock")
    ns = build_parser().parse_args(["status"])
    assert ns.socket is None and ns.json is False  # resolved in main, not at build time


# --- the one printer ------------------------------------------------------------------------------

REPR = re.compile(r"\{'|\['|\[\{|\[\d|\bTrue\b|\bFalse\b|\bNone\b|\(\)")

TASK = {"task": "web.1", "service": "web", "slot": 1, "node": "h2", "state": "running",
        "ip": "10.1.0.2", "restarts": 0, "exit_code": None}
CONTAINMENT = {"user": "0", "capabilities": ["CHOWN", "NET_RAW"], "limits": {"memory": 1 << 27},
               "mounts": ["type=bind,source=/opt/app,target=/app,readonly"]}
SPEC = {"name": "web", "mode": "replicated", "replicas": 2, "running": 0,
        "networks": ["appnet"], "command": ["sh", "-c", "echo hi; exec sleep 600"],
        "constraints": ["node.labels.zone==a"], "max_per_node": None,
        "restart": {"condition": "on-failure", "delay": 5.0, "max_attempts": 0},
        "env": {"GREETING": "hello world", "EMPTY": ""}, "placement": {"1": "h1", "2": "h2"},
        "containment": CONTAINMENT}
ENDPOINT = {"name": "web.1", "ip": "10.1.0.2", "mac": "02:42:0a:01:00:02", "node": "h2",
            "service": "web", "slot": 1, "network": "appnet", **CONTAINMENT}
KEYS_ACK = {"op": "install", "members": 3, "acked": 3, "errors": {}}
# verb argv -> (op, result) as the agent answers them
VERBS: list[tuple[list[str], str, Any]] = [
    (["status"], "status", STATUS),
    (["members"], "members", [
        {"name": "h1", "addr": "10.0.0.1:7946", "state": "alive", "incarnation": 3,
         "labels": {"zone": "a", "rack": "r 1"}, "version": "0.1.0", "roles": ["admin"],
         "cert_expires": "2026-01-01T00:00:00Z"},
        {"name": "h2", "addr": "10.0.0.2:7946", "state": "dead", "incarnation": 1,
         "labels": {}, "version": None, "roles": [], "cert_expires": None}]),
    (["join", "10.0.0.2:7946"], "join", {"joined": 1}),
    (["leave"], "leave", {"left": True}),
    (["keys", "list"], "keys", {"op": "list", "members": 2, "acked": 2, "errors": {},
                                "keys": [{"key": "k1", "primary": True, "members": 2},
                                         {"key": "k2", "primary": False, "members": 1}]}),
    (["keys", "install", "k"], "keys", KEYS_ACK),
    (["keys", "use", "k"], "keys", {**KEYS_ACK, "op": "use"}),
    (["keys", "remove", "k"], "keys", {**KEYS_ACK, "op": "remove"}),
    (["network", "create", "appnet"], "network.create",
     {"name": "appnet", "vni": 4242, "subnet": "10.1.0.0/24", "encrypted": False}),
    (["network", "ls"], "network.ls",
     [{"name": "appnet", "vni": 4242, "subnet": "10.1.0.0/24", "encrypted": True}]),
    (["network", "inspect", "appnet"], "network.inspect",
     {"name": "appnet", "vni": 4242, "subnet": "10.1.0.0/24", "encrypted": True,
      "endpoints": [ENDPOINT],
      "peers": [{"node": "h2", "addr": "10.0.0.2:4800", "spi": 7, "cipher": "aes-256-gcm",
                 "inbound_spis": [7, 8], "age": 3.5, "packets": 10, "bytes": 1000,
                 "rekeys": 0, "handshakes": 1, "drops": {"replay": 2, "auth": 0}}]}),
    (["network", "rm", "appnet"], "network.rm", {"removed": "appnet"}),
    (["endpoint", "add", "db", "10.1.0.9", "--network", "appnet"], "endpoint.add",
     {**ENDPOINT, "name": "db", "service": None, "slot": None}),
    (["endpoint", "rm", "db", "--network", "appnet"], "endpoint.rm", {"removed": "db"}),
    (["endpoint", "ls"], "endpoint.ls", [ENDPOINT]),
    (["service", "create", "web", "--network", "appnet", "-d", "--", "sh", "-c", "x y"],
     "service.create", SPEC),
    (["service", "scale", "web=3", "-d"], "service.scale", {"web": 3}),
    (["service", "ls"], "service.ls",
     [{"name": "web", "mode": "replicated", "replicas": "1/2", "desired": 2, "running": 1,
       "command": "sh -c 'echo hi; exec sleep 600'"}]),
    (["service", "ps", "web"], "service.ps",
     [TASK, {"task": "web.2", "service": "web", "slot": 2, "node": "h3", "state": "pending",
             "ip": None}]),
    (["service", "inspect", "web"], "service.inspect",
     {**SPEC, "tasks": [{"task": "web.1", "node": "h2", "state": "running", "ip": "10.1.0.2",
                         **CONTAINMENT}]}),
    (["service", "rm", "web", "--detach"], "service.rm", {"removed": "web"}),
    (["service", "update", "web", "--env-add", "A=1", "-d"], "service.update",
     {**SPEC, "version": 2, "changed": True,
      "update_config": {"parallelism": 1, "delay": 0.0, "failure_action": "pause",
                        "monitor": 5.0},
      "update_status": {"state": "updating", "message": "updating to version 2: 0/2 tasks"}}),
    (["service", "rollback", "web", "-d"], "service.rollback",
     {**SPEC, "version": 3, "update_config": None, "update_status": None}),
    (["dns", "lookup", "web"], "dns.lookup",
     {"name": "web", "type": "A", "answers": ["10.1.0.2", "10.1.0.3"]}),
    (["version"], "status", STATUS),
]


@pytest.mark.parametrize("argv,op,result", VERBS, ids=[" ".join(v[0][:2]) for v in VERBS])
def test_every_verb_prints_without_python_reprs(
        agent: Callable[..., FakeAgent], capsys: pytest.CaptureFixture[str], argv: list[str],
        op: str, result: Any) -> None:
    agent({op: result})
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert out.strip(), argv
    assert not REPR.search(out), out
    code, out, _ = run(capsys, *argv, "--json") if "--" not in argv else run(
        capsys, "--json", *argv)
    assert code == 0
    json.loads(out)


def test_members_show_roles_and_certificate_expiry(agent: Callable[..., FakeAgent],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    agent({"members": VERBS[1][2]})
    lines = run(capsys, "members")[1].splitlines()
    assert lines[0].split() == ["NAME", "ADDR", "STATE", "INCARNATION", "VERSION", "LABELS",
                                "ROLES", "CERT_EXPIRES"]
    assert lines[1].split()[-2:] == ["admin", "2026-01-01T00:00:00Z"]
    assert lines[1].startswith("h1 ") and lines[2].startswith("h2 ")


def test_status_is_readable_lines(agent: Callable[..., FakeAgent],
                                  capsys: pytest.CaptureFixture[str]) -> None:
    agent({"status": STATUS})
    out = run(capsys, "status")[1]
    lines = out.splitlines()
    assert lines[0] == "name: h1"
    assert "members: 3 alive, 0 suspect, 1 dead, 0 left" in lines
    assert "datapath:" in lines
    assert "  overlay: kind=vxlan mtu=1450 local_ip=10.0.0.1 networks=2 passes=40 errors=0" \
        in lines
    assert any(ln.startswith("    kind=userspace running=yes port=4800 gso=yes gro=no")
               for ln in lines), out
    i = lines.index("    handshake_guard:")  # a map with a map inside: a block of its own
    assert lines[i + 1:i + 3] == ["      under_load=no sources_under_load=0",
                                  "      refused: rate=0 global=0"], out
    assert lines[lines.index("identity:") + 1].startswith("  ca=cdcd"), out
    assert all(len(ln) <= meshctl.LINE_WIDTH for ln in lines), out


def test_cells_and_tables() -> None:
    assert cell(["sh", "-c", "echo hi; exit 1"], "command") == "sh -c 'echo hi; exit 1'"
    assert cell(["a", "b"]) == "a,b"
    assert (cell(True), cell(False), cell(None), cell(""), cell([]), cell({})) == \
        ("yes", "no", "-", "-", "-", "-")
    assert cell({"zone": "a", "note": "two words", "x": None}) == "zone=a note='two words' x=-"
    assert cell(b"\x01\xff") == "01ff"
    out = table([{"name": "a", "ok": True}, {"name": "bb", "ok": None, "extra": [1, 2]}])
    assert out.splitlines() == ["NAME  OK   EXTRA", "a     yes  -", "bb    -    1,2"]
    assert table([]) == "(none)"
    # argv in a table too, and the service inspect block
    spec = render("service inspect", {**SPEC, "tasks": []})
    assert "command: sh -c 'echo hi; exec sleep 600'" in spec
    assert "env: GREETING='hello world' EMPTY=''" in spec
    assert "restart: condition=on-failure delay=5.0 max_attempts=0" in spec
    assert "capabilities: " in spec and "limits: memory=128M" in spec


# --- version, key rotations, streams --------------------------------------------------------------

def test_version_shows_client_and_agent(agent: Callable[..., FakeAgent],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    agent({"status": {**STATUS, "version": "9.9.9"}})
    code, out, _ = run(capsys, "version")
    assert code == 0 and out == f"client: {meshnet.__version__}\nagent: 9.9.9\n"
    code, out, _ = run(capsys, "version", "--json")
    assert code == 0 and json.loads(out) == {"client": meshnet.__version__, "agent": "9.9.9"}


def test_version_without_agent_is_the_client_alone_and_exit_3(
        agent: Callable[..., FakeAgent], capsys: pytest.CaptureFixture[str]) -> None:
    agent(raises=NoAgent("gone"))
    code, out, err = run(capsys, "--json", "version")
    assert code == 3 and json.loads(out) == {"client": meshnet.__version__, "agent": None}
    assert "cannot reach the agent" in err


def test_partial_key_rotation_exits_1_naming_who_did_not_acknowledge(
        agent: Callable[..., FakeAgent], capsys: pytest.CaptureFixture[str]) -> None:
    partial = {"op": "install", "members": 4, "acked": 2,
               "errors": {"h4": "unreachable: TimeoutError", "h3": "bad reply"}}
    agent({"keys": partial})
    code, out, err = run(capsys, "keys", "install", "k")
    assert code == 1
    assert "2/4 members acknowledged" in out
    assert err.strip() == ("meshctl: keys install: not acknowledged by h3 (bad reply), h4 "
                           "(unreachable: TimeoutError) (the others applied it; run it again "
                           "once they answer)")
    code, out, _ = run(capsys, "--json", "keys", "use", "k")  # the document is still printed
    assert code == 1 and json.loads(out) == partial
    # a listing that some member missed is still a listing
    agent({"keys": {**partial, "op": "list", "keys": []}})
    assert run(capsys, "keys", "list")[0] == 0


def test_run_under_json_is_json_lines_only(agent: Callable[..., FakeAgent],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    events = [{"stream": "stdout", "data": b"hello\n"}, {"stream": "stderr", "data": b"\xffoops"},
              {"stream": "stdout", "data": "text"}]
    agent({"run": {"name": "probe", "exit_code": 3}}, events=events)
    code, out, err = run(capsys, "run", "--network", "n", "--json", "--", "true")
    assert code == 3 and err == ""
    docs = [json.loads(line) for line in out.splitlines()]
    assert docs == [{"stream": "stdout", "data": "hello\n"},
                    {"stream": "stderr", "data": "\ufffdoops"},
                    {"stream": "stdout", "data": "text"},
                    {"name": "probe", "exit_code": 3}]


def test_a_closed_stdout_ends_quietly(agent: Callable[..., FakeAgent],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    agent({"status": STATUS})

    class Closed(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("sys.stdout", Closed())
    assert main(["status"]) == 0


# --- waiting for services -------------------------------------------------------------------------

def doc(name: str, desired: int, *states: str, exists: bool = True,
        placed: int | None = None) -> dict[str, Any]:
    tasks = [{"task": f"{name}.{i}", "slot": i, "node": f"h{i}", "state": s,
              "exit_code": 127 if s == "failed" else None, "restarts": 2 if s == "failed" else 0}
             for i, s in enumerate(states, 1)]
    return {"name": name, "exists": exists, "desired": desired,
            "placed": desired if placed is None else placed, "tasks": tasks}


def test_settled() -> None:
    assert settled(doc("web", 2, "running", "running"), removing=False)
    assert not settled(doc("web", 2, "running", "starting"), removing=False)
    assert not settled(doc("web", 2, "running"), removing=False)
    assert not settled(doc("web", 1, "running", "running"), removing=False)  # one to stop
    assert settled(doc("web", 0), removing=False)
    assert not settled(doc("web", 2, "running", "running", exists=False), removing=False)
    assert settled(doc("web", 0, exists=False), removing=True)
    assert not settled(doc("web", 0, "running", exists=False), removing=True)
    assert not settled({"tasks": "garbage", "desired": True, "exists": 1}, removing=False)
    assert not settled({"tasks": [], "exists": "yes"}, removing=True)


def test_why_not_names_the_tasks_and_the_reason() -> None:
    line = why_not(doc("web", 3, "running", "failed", "pending", placed=2), False, 60)
    assert line == ("web: 1/3 tasks running after 60s; 1 cannot be placed (constraints, "
                    "--max-per-node or too few hosts): web.2 on h2 failed (exit 127, "
                    "2 restarts), web.3 on h3 pending (see meshctl service ps web; meshctl "
                    "service logs web)")
    assert why_not(doc("web", 0, "running", exists=False), True, 5) == \
        "web: 1 task(s) still there after 5s: web.1 on h1 running"
    many = why_not(doc("web", 9, *["starting"] * 9), False, 1)
    assert "and 4 more" in many and "web.6" not in many


class Script:
    """service.progress answers in turn, on a fake clock that each poll's sleep advances."""

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs
        self.now = 0.0

    def __call__(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.docs.pop(0) if len(self.docs) > 1 else self.docs[0]

    def sleep(self, s: float) -> None:
        self.now += s


def test_create_waits_with_a_line_per_task_then_reports_running(
        agent: Callable[..., FakeAgent]) -> None:
    script = Script([doc("web", 2, "pending", "pending"), doc("web", 2, "starting", "pending"),
                     doc("web", 2, "running", "starting"), doc("web", 2, "running", "running")])
    fake = agent({"service.progress": script})
    err = io.StringIO()
    code, result = wait_for_services("/s", "service create", ["web"], {**SPEC, "running": 0},
                                     60, err, lambda: script.now, script.sleep)
    assert code == 0 and result["running"] == 2
    # settled at the 4th look, then watched for STABLE_S (a poll every POLL_S) before done
    polls = 4 + math.ceil(meshctl.STABLE_S / meshctl.POLL_S)
    assert [c[1:] for c in fake.calls] == [("service.progress", {"name": "web"})] * polls
    assert err.getvalue().splitlines() == [
        "web: 0/2 running", "  web.1  h1  pending", "  web.2  h2  pending",
        "  web.1  h1  starting",
        "web: 1/2 running", "  web.1  h1  running", "  web.2  h2  starting",
        "web: 2/2 running", "  web.2  h2  running",
        "web: converged, 2/2 running"]


def test_a_task_that_dies_at_start_is_not_converged(agent: Callable[..., FakeAgent]) -> None:
    """Running for one look, then failed: not done (a bad command is `running` a moment)."""
    script = Script([doc("web", 1, "running"), doc("web", 1, "failed")])
    agent({"service.progress": script})
    err = io.StringIO()
    with contextlib.redirect_stderr(io.StringIO()) as why:
        code, _ = wait_for_services("/s", "service create", ["web"], SPEC, 5, err,
                                    lambda: script.now, script.sleep)
    assert code == 1 and "converged" not in err.getvalue()
    assert "web.1 on h1 failed (exit 127, 2 restarts)" in why.getvalue()


def test_settled_at_the_timeout_counts_as_done(agent: Callable[..., FakeAgent]) -> None:
    script = Script([doc("web", 1, "starting")] * 3 + [doc("web", 1, "running")])
    agent({"service.progress": script})
    err = io.StringIO()
    code, _ = wait_for_services("/s", "service create", ["web"], SPEC, 3 * meshctl.POLL_S,
                                err, lambda: script.now, script.sleep)
    assert code == 0 and err.getvalue().endswith("web: converged, 1/1 running\n")


def test_wait_gives_up_after_the_timeout_with_the_reason(
        agent: Callable[..., FakeAgent]) -> None:
    script = Script([doc("web", 2, "running", "failed")])
    agent({"service.progress": script})
    err = io.StringIO()
    real_stderr = io.StringIO()
    with contextlib.redirect_stderr(real_stderr):
        code, _ = wait_for_services("/s", "service scale", ["web"], {"web": 2}, 3, err,
                                    lambda: script.now, script.sleep)
    assert code == 1
    assert real_stderr.getvalue() == (
        "meshctl: service scale: web: 1/2 tasks running after 3s: web.2 on h2 failed (exit 127, "
        "2 restarts) (see meshctl service ps web; meshctl service logs web)\n")
    assert script.now == pytest.approx(3, abs=meshctl.POLL_S)


def test_rm_waits_until_every_task_is_gone(agent: Callable[..., FakeAgent]) -> None:
    script = Script([doc("web", 0, "running", "running", exists=False),
                     doc("web", 0, "running", exists=False), doc("web", 0, exists=False)])
    agent({"service.progress": script})
    err = io.StringIO()
    code, _ = wait_for_services("/s", "service rm", ["web"], {"removed": "web"}, 60, err,
                                lambda: script.now, script.sleep)
    assert code == 0
    assert err.getvalue().splitlines()[-1] == "web: removed, every task stopped"


def test_main_waits_by_default_and_detach_returns_at_once(
        agent: Callable[..., FakeAgent], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meshctl, "POLL_S", 0.0)
    monkeypatch.setattr(meshctl, "STABLE_S", 0.0)
    script = Script([doc("web", 3, "running", "starting", "running"),
                     doc("web", 3, "running", "running", "running")])
    fake = agent({"service.scale": {"web": 3}, "service.progress": script})
    code, out, err = run(capsys, "--json", "service", "scale", "web=3")
    assert code == 0 and json.loads(out) == {"web": 3}  # stdout: the document alone
    assert "web: converged, 3/3 running" in err
    assert [c[1] for c in fake.calls] == ["service.scale", "service.progress",
                                          "service.progress"]
    fake.calls.clear()
    code, out, err = run(capsys, "service", "scale", "web=3", "-d")
    assert code == 0 and err == "" and [c[1] for c in fake.calls] == ["service.scale"]


def test_main_create_reports_the_running_count(agent: Callable[..., FakeAgent],
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(meshctl, "POLL_S", 0.0)
    monkeypatch.setattr(meshctl, "STABLE_S", 0.0)
    agent({"service.create": SPEC, "service.progress": doc("web", 2, "running", "running")})
    code, out, _ = run(capsys, "--json", "service", "create", "web", "--network", "appnet",
                       "--", "true")
    assert code == 0 and json.loads(out)["running"] == 2


def test_an_agent_without_progress_is_not_waited_for(
        agent: Callable[..., FakeAgent], capsys: pytest.CaptureFixture[str]) -> None:
    agent({"service.rm": {"removed": "web"}})
    code, out, err = run(capsys, "service", "rm", "web")
    assert code == 0 and out == "removed: web\n" and "does not report progress" in err


def test_timeout_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["service", "rm", "web", "--timeout", "0"])
    assert e.value.code == 2


def test_progress_on_a_terminal_redraws_one_block() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    p = Progress(out)
    p.update("web", "web: 0/1 running", [("web.1", "h1", "pending")])
    p.update("web", "web: 0/1 running", [("web.1", "h1", "pending")])  # unchanged: no redraw
    p.update("web", "web: 1/1 running", [("web.1", "h1", "running")])
    text = out.getvalue()
    assert text.count("web: ") == 2 and "\x1b[2F" in text  # back up over the 2-line block
