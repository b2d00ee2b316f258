"""meshctl: parse arguments, call the local agent's control API, print the answer.

Exit codes (docs/design.md §4): 0 done; 1 the operation failed (a permission error on the
socket too: the agent is there, this user may not use it); 2 usage error; 3 no agent.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import meshnet
from meshnet import api
from meshnet.cli import rolling, streams
from meshnet.cli.health_flags import add_health_flags, health_args
from meshnet.config import DEFAULT_SOCKET
from meshnet.containment import describe_caps, describe_limits
from meshnet.state.ports import PortError, parse_publish, port_text

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_AGENT = 0, 1, 2, 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports it
# Streaming ops (run, logs) may wait on a long-running task; plain ops answer quickly.
PLAIN_TIMEOUT_S = 60.0
# The socket when --socket is not given (DOCKER_HOST's role); then DEFAULT_SOCKET.
SOCKET_ENV = "MESHNET_SOCKET"
# How long `service create|scale|rm` wait for the cluster to get there (docker's default is
# to wait for ever; a script wants an answer).
WAIT_TIMEOUT_S = 60.0
# Between two looks at a service's tasks while waiting: task starts take ~0.1-1 s.
POLL_S = 0.3
# Tasks must stay running this long before create/scale count as done: one that dies at
# start (a bad command, a crash on load) is `running` for a moment. Docker watches 5 s
# (--update-monitor); 1 s catches the quick failures without making every create 5 s slower.
STABLE_S = 1.0


class NoAgent(Exception):
    """Nothing answers at the socket (exit 3)."""


class AgentDenied(NoAgent):
    """The socket is there but this user may not connect to it (EACCES/EPERM)."""


class Client:
    def __init__(self, path: str) -> None:
        self.path = path

    def call(
        self, op: str, args: dict[str, Any], timeout: float | None
    ) -> Iterator[dict[str, Any]]:
        """Yield every frame the agent sends for one request (events, then the reply)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except PermissionError as e:
            sock.close()
            raise AgentDenied(str(e)) from None
        except OSError as e:  # no such file, connection refused, not a socket, ...
            sock.close()
            raise NoAgent(str(e)) from None
        with sock:
            try:
                sock.sendall(api.encode({"v": api.API_VERSION, "op": op, "args": args}))
            except BrokenPipeError as e:  # the agent's end, not our stdout's (see _remote)
                raise ConnectionAbortedError(f"the agent closed the connection ({e})") from None
            while True:
                header = _recv_exactly(sock, 4)
                body, _ = api.decode_body(
                    _recv_exactly(sock, api.frame_length(header, api.MAX_REPLY_BYTES)))
                yield body
                if "ok" in body:
                    return


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("the agent closed the connection")
        buf += chunk
    return bytes(buf)


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _epilog(examples: str) -> str:
    lines = [ln.strip() for ln in examples.strip().splitlines()]
    head = "example:" if len(lines) == 1 else "examples:"
    return "\n".join([head, *(f"  {ln}" for ln in lines)])


def verb(sub: argparse._SubParsersAction[Parser], name: str, summary: str,
         examples: str) -> Parser:
    """A subcommand with its one-line SUMMARY (its help in the parent's list, and its
    description) and EXAMPLES (one per line, the epilog of its own --help).
    tests/unit/test_meshctl_cli.py fails on a verb without either."""
    return sub.add_parser(name, help=summary,
                          description=summary[:1].upper() + summary[1:] + ".",
                          epilog=_epilog(examples),
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def verbs(sub: argparse._SubParsersAction[Parser], name: str, summary: str, examples: str,
          dest: str) -> argparse._SubParsersAction[Parser]:
    """A group of subcommands (`keys`, `network`, ...): the group's parser and its verbs."""
    return verb(sub, name, summary, examples).add_subparsers(
        dest=dest, required=True, parser_class=Parser, metavar="VERB")


GLOBAL_EPILOG = f"""\
examples:
  meshctl status
  meshctl members --json
  MESHNET_SOCKET=/tmp/h1.sock meshctl service ls

--json and --socket may come before or after the verb. The socket is --socket, else
${SOCKET_ENV}, else {DEFAULT_SOCKET}.

exit codes: 0 done; 1 the operation failed (also: permission denied on the socket, or a
change not acknowledged everywhere); 2 usage error; 3 the agent cannot be reached."""


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; importable without side effects (shell completions are
    generated from it)."""
    p = Parser(prog="meshctl", description="Drive the local meshnet agent.",
               epilog=GLOBAL_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_global_options(p, top=True)
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser, metavar="VERB")

    verb(sub, "status", "this agent and the cluster at a glance",
         "meshctl status\nmeshctl status --json")
    verb(sub, "version", "the versions of meshctl and of the agent",
         "meshctl version\nmeshctl version --json")
    verb(sub, "members", "the member list, with each member's state and agent version",
         "meshctl members\nmeshctl members --json")
    j = verb(sub, "join", "join the cluster through one or more members",
             "meshctl join 10.0.0.2:7946 10.0.0.3:7946")
    j.add_argument("addrs", nargs="+", metavar="IP:PORT", help="a member's gossip address")
    verb(sub, "leave", "leave the cluster gracefully and stop the agent", "meshctl leave")
    streams.add_events_flags(verb(sub, "events", streams.EVENTS_HELP, streams.EVENTS_EXAMPLES))

    keys = verbs(sub, "keys", "rotate the cluster's gossip keys",
                 "meshctl keys install $(meshctl keys generate)", "keys_cmd")
    verb(keys, "list", "the keys every member holds, and which one is primary",
         "meshctl keys list")
    verb(keys, "generate", "print a new random key (nothing is sent to the agent)",
         "meshctl keys generate > new.key")
    for name, what in (("install", "add KEY to every member's keyring"),
                       ("use", "make KEY the primary (encrypting) key on every member"),
                       ("remove", "remove KEY from every member's keyring")):
        k = verb(keys, name, what + "; exit 1 names the members that did not acknowledge",
                 f"meshctl keys {name} \"$(cat new.key)\"")
        k.add_argument("key", help="the key, base64 (as `keys generate` prints it)")

    net = verbs(sub, "network", "overlay networks",
                "meshctl network create appnet --encrypted", "net_cmd")
    c = verb(net, "create", "define an overlay network on every host",
             "meshctl network create appnet\nmeshctl network create db --subnet 10.20.0.0/24 "
             "--encrypted")
    c.add_argument("name", help="the network's name")
    c.add_argument("--subnet", metavar="CIDR",
                   help="its IPv4 subnet (default: the next free /24 of the address pool)")
    c.add_argument("--encrypted", action="store_true",
                   help="encrypt its traffic between hosts")
    verb(net, "ls", "list networks", "meshctl network ls")
    verb(net, "inspect", "a network's endpoints (and peers, if encrypted)",
         "meshctl network inspect appnet").add_argument("name", help="the network's name")
    verb(net, "rm", "remove a network no service or endpoint uses",
         "meshctl network rm appnet").add_argument("name", help="the network's name")

    ep = verbs(sub, "endpoint", "register names owned by this host",
               "meshctl endpoint add db 10.0.1.5 --network appnet", "ep_cmd")
    ea = verb(ep, "add", "register NAME at IP on a network (it resolves in DNS)",
              "meshctl endpoint add db 10.0.1.5 --network appnet --service db")
    ea.add_argument("name", help="the endpoint's name")
    ea.add_argument("ip", help="its address, inside the network's subnet")
    ea.add_argument("--network", required=True, help="the network it is on")
    ea.add_argument("--service", help="also answer for this service name")
    er = verb(ep, "rm", "remove an endpoint this host registered",
              "meshctl endpoint rm db --network appnet")
    er.add_argument("name", help="the endpoint's name")
    er.add_argument("--network", required=True, help="the network it is on")
    verb(ep, "ls", "list every endpoint", "meshctl endpoint ls")

    r = verb(sub, "run", "run a one-off command in a sandbox on a network, streaming its output",
             "meshctl run --network appnet -- curl -s http://web:8080/\n"
             "meshctl run --network appnet --json -- date   # JSON lines")
    r.add_argument("--network", required=True, help="the network to attach the sandbox to")
    r.add_argument("--name", help="the sandbox's name (and DNS name while it runs)")
    r.add_argument("--env", action="append", default=[], metavar="K=V",
                   help="set an environment variable (repeatable)")
    add_containment_flags(r)

    svc = verbs(sub, "service", "replicated services",
                "meshctl service create web --network appnet --replicas 3 -- httpd", "svc_cmd")
    sc = verb(svc, "create", "define a service and wait until its tasks run",
              "meshctl service create web --network appnet --replicas 3 -- python3 -m "
              "http.server 8080\n"
              "meshctl service create agent --network appnet --mode global --detach -- "
              "collector\n"
              "meshctl service create api --network appnet --health-cmd 'test -e /tmp/ready' "
              "--health-interval 5s --health-retries 2 -- python3 -m http.server 8080\n"
              "meshctl service create front --network appnet --replicas 2 --publish 8080:80 "
              "-- python3 -m http.server 80")
    sc.add_argument("name", help="the service's name (and DNS name)")
    sc.add_argument("--network", required=True, action="append",
                    help="the network its tasks join (repeatable)")
    mode = sc.add_mutually_exclusive_group()
    mode.add_argument("--replicas", type=int, metavar="N", help="run N tasks (default 1)")
    mode.add_argument("--mode", choices=("replicated", "global"),
                      help="global: one task on every eligible host")
    sc.add_argument("--constraint", action="append", default=[], metavar="EXPR",
                    help="place only where EXPR holds, e.g. node.labels.zone==a (repeatable)")
    sc.add_argument("--max-per-node", type=int, metavar="N",
                    help="at most N of its tasks on one host")
    sc.add_argument("--restart-condition", choices=("none", "on-failure", "any"),
                    help="when a finished task is started again")
    sc.add_argument("--env", action="append", default=[], metavar="K=V",
                    help="set an environment variable (repeatable)")
    sc.add_argument("--endpoint-mode", choices=("vip", "dnsrr"), default="vip",
                    help="vip (default): NAME resolves to one virtual IP per network, balanced "
                    "over the serving tasks by the kernel on any port, tasks.NAME to the tasks; "
                    "dnsrr: NAME resolves to the task addresses (round-robin DNS), e.g. "
                    "--endpoint-mode dnsrr")
    sc.add_argument("--publish", "-p", action="append", default=[],
                    metavar="PUBLISHED:TARGET[/PROTO]",
                    help="answer on port PUBLISHED of every host's address with port TARGET of "
                    "a task (the routing mesh), e.g. 8080:80 or 5353:53/udp, or Docker's long "
                    "form published=8080,target=80,protocol=tcp (repeatable)")
    add_containment_flags(sc)
    add_health_flags(sc)
    rolling.add_update_policy_flags(sc)
    add_wait_flags(sc)
    ss = verb(svc, "scale", "change services' replica counts and wait until they run",
              "meshctl service scale web=5\nmeshctl service scale web=2 api=4 --detach")
    ss.add_argument("scales", nargs="+", metavar="NAME=N", help="a service and its new count")
    add_wait_flags(ss)
    verb(svc, "ls", "list services with running/desired tasks", "meshctl service ls")
    verb(svc, "ps", "a service's tasks: where each runs and its state",
         "meshctl service ps web").add_argument("name", help="the service's name")
    verb(svc, "inspect", "a service's spec and its tasks",
         "meshctl service inspect web --json").add_argument("name", help="the service's name")
    sr = verb(svc, "rm", "remove a service and wait until its tasks are gone",
              "meshctl service rm web\nmeshctl service rm web --detach")
    sr.add_argument("name", help="the service's name")
    add_wait_flags(sr)
    rolling.add_update_verbs(svc, verb, add_wait_flags)
    sl = verb(svc, "logs", streams.LOGS_HELP, streams.LOGS_EXAMPLES)
    sl.add_argument("name", help="the service's name")
    streams.add_logs_flags(sl)

    dns = verbs(sub, "dns", "service discovery", "meshctl dns lookup web --network appnet",
                "dns_cmd")
    lk = verb(dns, "lookup", "answer a name as the sandboxes' resolver would",
              "meshctl dns lookup web --network appnet\nmeshctl dns lookup tasks.web --json")
    lk.add_argument("name", help="the name to look up")
    lk.add_argument("--network", help="answer as a sandbox on this network would")
    lk.add_argument("--type", default="A", choices=("A", "SRV", "PTR"),
                    help="the record type (default A)")
    add_ca_parser(sub)
    for q in _subparsers(p):
        add_global_options(q, top=False)
    return p


def add_global_options(p: argparse.ArgumentParser, top: bool) -> None:
    """--socket and --json, on the top parser and again on every verb, so they may come before
    or after it. A verb's copies default to SUPPRESS: left out, they do not overwrite what was
    given before the verb."""
    p.add_argument("--socket", metavar="PATH", default=None if top else argparse.SUPPRESS,
                   help=f"the agent's control socket (default: ${SOCKET_ENV}, else "
                        f"{DEFAULT_SOCKET})")
    p.add_argument("--json", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="print one JSON document (streams: JSON lines) on stdout, and nothing "
                        "else there")


def _subparsers(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser below P, depth first."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                yield child
                yield from _subparsers(child)


def add_wait_flags(p: argparse.ArgumentParser) -> None:
    """How `service create|scale|rm` wait for the cluster to reach the new state."""
    p.add_argument("-d", "--detach", action="store_true",
                   help="return once the change is stored, without waiting for the tasks")
    p.add_argument("--timeout", type=_seconds, default=WAIT_TIMEOUT_S, metavar="SECONDS",
                   help=f"give up waiting (exit 1, naming the tasks not there yet) after "
                        f"SECONDS (default {WAIT_TIMEOUT_S:g})")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 86400 seconds")
    return value


def add_containment_flags(p: argparse.ArgumentParser) -> None:
    """docker service create's spelling of a task's privileges and limits."""
    p.add_argument("--cap-add", action="append", default=[], metavar="CAP",
                   help="add a capability to Docker's default set (ALL: every one)")
    p.add_argument("--cap-drop", action="append", default=[], metavar="CAP",
                   help="drop a capability from Docker's default set (ALL: every one)")
    p.add_argument("--user", metavar="UID[:GID]", help="run the command as this user")
    p.add_argument("--limit-memory", metavar="BYTES", help="memory limit, e.g. 256M")
    p.add_argument("--limit-cpu", metavar="CPUS", help="CPU limit, e.g. 0.5")
    p.add_argument("--limit-pids", metavar="N", help="most processes and threads at once")
    p.add_argument("--mount", action="append", default=[], metavar="SPEC",
                   help="type=bind,source=PATH,target=PATH[,readonly]")


def containment_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {"cap_add": ns.cap_add, "cap_drop": ns.cap_drop, "user": ns.user,
            "limit_memory": ns.limit_memory, "limit_cpu": ns.limit_cpu,
            "limit_pids": ns.limit_pids, "mounts": ns.mount}


def _command(words: list[str]) -> list[str]:
    if not words:
        raise UsageError("a command is needed after --")
    return words


def to_request(ns: argparse.Namespace) -> tuple[str, str, dict[str, Any]]:
    """Map parsed arguments to (display name, op, args)."""
    cmd = ns.cmd
    if cmd in ("status", "members", "leave"):
        return cmd, cmd, {}
    if cmd == "version":  # the agent's version is in its status
        return cmd, "status", {}
    if cmd == "join":
        return cmd, "join", {"addrs": ns.addrs}
    if cmd == "keys":
        return f"keys {ns.keys_cmd}", "keys", {"op": ns.keys_cmd, "key": getattr(ns, "key", "")}
    if cmd == "network":
        args = {"name": getattr(ns, "name", None)}
        if ns.net_cmd == "create":
            args.update(subnet=ns.subnet, encrypted=ns.encrypted)
        return f"network {ns.net_cmd}", f"network.{ns.net_cmd}", args
    if cmd == "endpoint":
        args = {k: getattr(ns, k, None) for k in ("name", "ip", "network", "service")}
        return f"endpoint {ns.ep_cmd}", f"endpoint.{ns.ep_cmd}", args
    if cmd == "run":
        return "run", "run", {"network": ns.network, "name": ns.name, "env": ns.env,
                              **containment_args(ns), "command": _command(ns.command)}
    if cmd == "service":
        verb = ns.svc_cmd
        if verb == "create":
            if ns.replicas is not None and ns.replicas < 0:
                raise UsageError("--replicas must be 0 or more")
            return "service create", "service.create", {
                "name": ns.name, "networks": ns.network, "replicas": ns.replicas,
                "mode": ns.mode or "replicated", "constraints": ns.constraint,
                "max_per_node": ns.max_per_node, "restart_condition": ns.restart_condition,
                "env": ns.env, "endpoint_mode": ns.endpoint_mode,
                **containment_args(ns), **health_args(ns), **rolling.update_policy_args(ns),
                "publish": _publish(ns.publish), "command": _command(ns.command)}
        if verb == "scale":
            scales: dict[str, int] = {}
            for item in ns.scales:
                name, sep, n = item.partition("=")
                if not sep or not (n.isascii() and n.isdigit()) or len(n) > 9:
                    raise UsageError(f"{item!r} is not NAME=N with N >= 0")
                scales[name] = int(n)
            return "service scale", "service.scale", {"scales": scales}
        if verb == "logs":
            return "service logs", "service.logs", streams.logs_args(ns)
        if verb in ("update", "rollback"):
            return rolling.rolling_request(ns)
        return f"service {verb}", f"service.{verb}", {"name": getattr(ns, "name", None)}
    if cmd == "events":
        return "events", "events", streams.events_args(ns)
    if cmd == "dns":
        return "dns lookup", "dns.lookup", {"name": ns.name, "network": ns.network,
                                            "type": ns.type}
    raise UsageError(f"unknown command {cmd}")


# --- printing: one cell renderer, one table printer, one key: value printer ---------------------

# Keys whose value is a command line: shown as a shell would read it back (shlex.join).
ARGV_KEYS = frozenset({"command", "argv", "cmd"})
# Field lines wrap here (continuations indented), so a section of counters stays readable.
LINE_WIDTH = 100


def cell(value: Any, key: str | None = None) -> str:
    """VALUE as text for a human: None "-", booleans yes/no, argv by shlex.join, a map as
    `k=v` pairs, a list comma-separated (`admin,worker`); never a Python repr."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, str):
        return value or "-"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex() or "-"
    if isinstance(value, dict):
        return " ".join(_pair(k, v) for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        if key in ARGV_KEYS and all(isinstance(a, str) for a in value):
            return shlex.join(value) or "-"
        return ",".join(cell(v) for v in value) or "-"
    return str(value)


def _pair(key: Any, value: Any) -> str:
    text = f"({cell(value)})" if isinstance(value, dict) and value else cell(value, str(key))
    if isinstance(value, str) and (not value or any(c.isspace() for c in value)):
        text = shlex.quote(value)  # so `k=v k2=v2` stays unambiguous
    return f"{cell(key)}={text}"


def table(rows: list[Any], columns: list[str] | None = None) -> str:
    """Rows (maps) as aligned columns, headed by the upper-cased column names; COLUMNS defaults
    to every key, in the order the rows first use them."""
    rows = [r for r in rows if isinstance(r, dict)]
    if not rows:
        return "(none)"
    if columns is None:
        columns = list(dict.fromkeys(str(k) for r in rows for k in r))
    cells = [[cell(r.get(c), c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _block(value: Any) -> bool:
    """A non-empty map or a list of maps: more than one line's worth inside a map."""
    return (isinstance(value, dict) and bool(value)) or _is_rows(value)


def _nested(value: Any) -> bool:
    """A map with maps or rows inside: printed as an indented block, not one line."""
    return isinstance(value, dict) and any(_block(v) for v in value.values())


def _wrapped(head: str, pairs: list[str], indent: str) -> list[str]:
    lines, line = [], head
    for p in pairs:
        if line != head and len(line) + 1 + len(p) > LINE_WIDTH:
            lines.append(line)
            line = indent + "  " + p
        else:
            line = f"{line} {p}" if line != head else head + p
    return [*lines, line]


def fields(doc: dict[str, Any], indent: str = "") -> list[str]:
    """`key: value` lines; a map of scalars on one (wrapped) line of `k=v` pairs, nested maps
    as indented blocks, lists of maps as tables."""
    out: list[str] = []
    for k, v in doc.items():
        key = cell(k)
        if _nested(v):
            out.append(f"{indent}{key}:")
            flat = {kk: vv for kk, vv in v.items() if not _block(vv)}
            if flat:
                out += _wrapped(indent + "  ", [_pair(kk, vv) for kk, vv in flat.items()],
                                indent + "  ")
            out += fields({kk: vv for kk, vv in v.items() if kk not in flat}, indent + "  ")
        elif _is_rows(v):
            out.append(f"{indent}{key}:")
            out += [indent + "  " + line for line in table(v).splitlines()]
        elif isinstance(v, dict) and v:
            out += _wrapped(f"{indent}{key}: ", [_pair(kk, vv) for kk, vv in v.items()],
                            indent)
        else:
            out.append(f"{indent}{key}: {cell(v, key)}")
    return out


def _containment_rows(rows: list[Any]) -> list[dict[str, Any]]:
    """Rows with a task's capabilities and limits in short form (JSON keeps the lists)."""
    out = []
    for r in rows:
        if not isinstance(r, dict):
            continue
        caps = r.get("capabilities")
        limits = r.get("limits")
        out.append({**r, "caps": describe_caps(caps) if isinstance(caps, list) else None,
                    "limits": describe_limits(limits) if isinstance(limits, dict) else None})
    return out


def _short(doc: dict[str, Any]) -> dict[str, Any]:
    """DOC with a task's capabilities and limits in their short forms, where it has them."""
    caps, limits = doc.get("capabilities"), doc.get("limits")
    out = dict(doc)
    if isinstance(caps, list):
        out["capabilities"] = describe_caps(caps)
    if isinstance(limits, dict):
        out["limits"] = describe_limits(limits)
    return out


STATUS_HEAD = ("name", "version", "node_id", "addr", "incarnation", "boots", "uptime_s",
               "profile", "encryption")


def _render_status(result: dict[str, Any]) -> str:
    lines = fields({k: result[k] for k in STATUS_HEAD if k in result})
    members = result.get("members")
    if isinstance(members, dict):
        lines.append("members: " + ", ".join(f"{cell(v)} {cell(k)}" for k, v in members.items()))
    rest = {k: v for k, v in result.items() if k not in (*STATUS_HEAD, "members")}
    return "\n".join(lines + fields(rest))


def _publish(items: list[str]) -> list[dict[str, Any]]:
    """--publish values, each checked here so a typo is a usage error (exit 2); a port given
    twice, like a clash, is the agent's to refuse (exit 1)."""
    try:
        return [parse_publish(i) for i in items]
    except PortError as e:
        raise UsageError(str(e)) from None


def _render_spec(result: dict[str, Any]) -> str:
    """`service inspect` and `service create`: the spec, its containment, then its tasks."""
    ports = result.get("ports")
    if isinstance(ports, list) and all(isinstance(p, dict) for p in ports):
        result = {**result, "ports": [port_text(p) for p in ports]}  # 8080:80/tcp, as given
    lines = fields({k: v for k, v in result.items() if k not in ("containment", "tasks")})
    c = result.get("containment")
    if isinstance(c, dict):
        caps, limits = c.get("capabilities"), c.get("limits")
        lines += fields({"user": c.get("user"),
                         "capabilities": describe_caps(caps) if isinstance(caps, list) else caps,
                         "limits": describe_limits(limits) if isinstance(limits, dict)
                         else limits,
                         "mounts": c.get("mounts")})
    elif c is not None:
        lines += fields({"containment": c})
    if "tasks" in result:
        lines += ["tasks:", table(_containment_rows(result.get("tasks") or []),
                                  ["task", "node", "state", "health", "version", "ip",
                                   "user", "caps", "limits"])]
        probes = _probe_rows(result.get("tasks"))
        if probes:
            lines += ["health log:", table(probes, ["task", "start", "exit_code", "output"])]
    return "\n".join(lines)


def _probe_rows(tasks: Any) -> list[dict[str, Any]]:
    """The last health probes of the tasks that have them (each output on one short line)."""
    rows = []
    for t in tasks if isinstance(tasks, list) else []:
        probes = t.get("health_log") if isinstance(t, dict) else None
        for p in probes if isinstance(probes, list) else []:
            if isinstance(p, dict):
                rows.append({"task": t.get("task"), "start": p.get("start"),
                             "exit_code": p.get("exit_code"),
                             "output": " ".join(str(p.get("output") or "").split())[:100]})
    return rows


def _render_network(result: dict[str, Any]) -> str:
    lines = fields({k: result.get(k) for k in ("name", "vni", "subnet", "encrypted")})
    lines += ["endpoints:", table(_containment_rows(result.get("endpoints") or []),
                                  ["name", "ip", "mac", "node", "service", "user", "caps",
                                   "limits"])]
    if isinstance(result.get("peers"), list):  # an encrypted network's key state per peer
        rows = [{**p, "drops": {k: n for k, n in (p.get("drops") or {}).items() if n}}
                for p in result["peers"] if isinstance(p, dict)]
        lines += ["peers:", table(rows, ["node", "spi", "age", "packets", "bytes", "rekeys",
                                         "drops"])]
    return "\n".join(lines)


def _render_keys(result: dict[str, Any]) -> str:
    if "key" in result:
        return cell(result["key"])
    out = []
    if "keys" in result:
        out.append(table(result["keys"] if isinstance(result["keys"], list) else [],
                         ["key", "primary", "members"]))
    out.append(f"{cell(result.get('acked'))}/{cell(result.get('members'))} members "
               "acknowledged")
    errors = result.get("errors")
    if isinstance(errors, dict):
        out += [f"  {cell(n)}: {cell(err)}" for n, err in sorted(errors.items(), key=str)]
    return "\n".join(out)


def render(name: str, result: Any) -> str:
    """A verb's result as text for a human (--json prints the result itself)."""
    if isinstance(result, dict):
        if name == "status":
            return _render_status(result)
        if name.startswith("keys"):
            return _render_keys(result)
        if name == "dns lookup":
            answers = result.get("answers")
            return "\n".join(map(cell, answers)) if isinstance(answers, list) else cell(answers)
        if name in ("service inspect", "service create", "service update",
                    "service rollback"):
            return _render_spec(result)
        if name == "network inspect":
            return _render_network(result)
        return "\n".join(fields(_short(result)))
    if isinstance(result, list):
        if name == "members":
            cols = ["name", "addr", "state", "incarnation", "version", "labels"]
            if any(isinstance(r, dict) and "roles" in r for r in result):
                cols += ["roles", "cert_expires"]
            return table(result, cols)
        if name == "network ls":
            return table(result, ["name", "vni", "subnet", "encrypted"])
        if _is_rows(result) or not result:
            return table([_short(r) for r in result])
    return cell(result)


def _local(name: str) -> Any:
    """Commands that need no agent."""
    if name == "keys generate":
        from meshnet.crypto.keyring import generate_key
        return {"key": generate_key()}
    return None


# Ops whose events are a stream (a command's output, logs): under --json each event is one JSON
# line and the final result one more.
STREAMING_OPS = frozenset({"run", "service.logs", "events"})
# Key changes that every member must acknowledge (a partial one exits 1).
KEY_CHANGES = frozenset({"keys install", "keys use", "keys remove"})
# Verbs that wait for the cluster to reach the new state unless --detach.
WAITING_VERBS = frozenset({"service create", "service scale", "service rm"})


def main(argv: list[str] | None = None) -> int:
    """The exit code of one meshctl command. A reader that closes our stdout early (`| head`,
    `| true`) ends us quietly with 0, as if it had taken everything it wanted."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe can be caught, not at interpreter exit
        return code
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush has nowhere to fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file behind stdout (tests capture it)
        pass


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    # Everything after `--` is the command to run, options and all: split it off first so that
    # options after the positional NAME (`service create web --network n -- cmd`) still parse.
    tail: list[str] = []
    if "--" in words:
        cut = words.index("--")
        words, tail = words[:cut], words[cut + 1:]
    ns = parser.parse_args(words)
    ns.command = tail
    ns.socket = ns.socket or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
    if ns.cmd == "ca":  # local files, no agent needed (revoke submits if one answers)
        return ca_main(ns)
    if ns.cmd == "version":
        return version_main(ns)
    try:
        name, op, args = to_request(ns)
    except UsageError as e:
        print(f"meshctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    if name in streams.FOLLOWED:  # lines as they come; Ctrl-C ends them with 0
        return streams.follow(ns, lambda on_event: _remote(ns, name, op, args, on_event))
    result = _local(name)
    if result is None:
        code, result = _remote(ns, name, op, args)
        if code != EXIT_OK:
            return code
    code = EXIT_OK
    if name in WAITING_VERBS and not ns.detach:
        targets = list(args["scales"]) if name == "service scale" else [str(args["name"])]
        code, result = wait_for_services(ns.socket, name, targets, result, ns.timeout)
    if name in rolling.ROLLING_VERBS and not ns.detach:
        code, result = wait_for_rollout(ns.socket, name, str(args["name"]), result, ns.timeout)
    if op in STREAMING_OPS:
        if ns.json:  # the stream's last line; a human saw the stream itself
            print(json.dumps(result, separators=(",", ":"), sort_keys=True, default=_json_text))
    elif ns.json:
        print(json.dumps(result, indent=2, sort_keys=True, default=_json_text))
    else:
        print(render(name, result))
    if name in KEY_CHANGES and isinstance(result, dict) and (missing := unacknowledged(result)):
        print(f"meshctl: {name}: not acknowledged by {', '.join(missing)} (the others "
              "applied it; run it again once they answer)", file=sys.stderr)
        code = EXIT_FAILED
    if name == "run" and isinstance(result, dict):
        exit_code = _count(result.get("exit_code", 0))
        return exit_code if exit_code is not None and 0 <= exit_code <= 255 else EXIT_FAILED
    return code


def _remote(ns: argparse.Namespace, name: str, op: str, args: dict[str, Any],
            on_event: Callable[[Any], None] | None = None) -> tuple[int, Any]:
    streaming = op in STREAMING_OPS
    try:
        for frame in Client(ns.socket).call(op, args, None if streaming else PLAIN_TIMEOUT_S):
            if "event" in frame:
                if on_event is not None:
                    on_event(frame["event"])
                else:
                    emit_event(frame["event"], ns.json)
                continue
            if frame.get("ok"):
                return EXIT_OK, frame.get("result")
            if frame.get("code") == "unknown_op":
                print(f"meshctl: '{name}' is not available on this agent (not built yet, or "
                      "turned off, e.g. by --datapath none)", file=sys.stderr)
            else:
                print(f"meshctl: {name}: {frame.get('error', 'failed')}", file=sys.stderr)
            return EXIT_FAILED, None
    except AgentDenied:
        print(f"meshctl: {denied_message(ns.socket)}", file=sys.stderr)
        return EXIT_FAILED, None
    except NoAgent:
        print(f"meshctl: cannot reach the agent at {ns.socket} (is meshnetd running?)",
              file=sys.stderr)
        return EXIT_NO_AGENT, None
    except BrokenPipeError:
        raise  # our stdout's reader left (`| head`), not the agent: main ends quietly
    except (ConnectionError, TimeoutError, api.ApiError) as e:
        print(f"meshctl: {name}: lost the agent mid-answer ({e})", file=sys.stderr)
        return EXIT_NO_AGENT, None
    print(f"meshctl: {name}: the agent sent no reply", file=sys.stderr)
    return EXIT_FAILED, None


def denied_message(path: str) -> str:
    """Why this user cannot use the socket at PATH, and who can (its owner, and its group's
    members if the group may write it)."""
    import grp
    import pwd
    who = "root"
    try:
        st = os.stat(path)
    except OSError:  # its directory is closed to us too (the agent makes it 0700)
        st = None
    if st is not None:
        try:
            who = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            who = f"uid {st.st_uid}"
        if st.st_mode & 0o020:
            try:
                group = grp.getgrgid(st.st_gid).gr_name
            except KeyError:
                group = f"gid {st.st_gid}"
            who += f" or a member of group {group}"
    return f"permission denied on {path} (run as {who}, e.g. with sudo)"


def _json_text(value: Any) -> str:
    """What JSON cannot hold (bytes from a msgpack reply), as text."""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def emit_event(event: Any, as_json: bool) -> None:
    """One event of a stream: under --json one JSON line on stdout (bytes as UTF-8 text), else
    its data as it came, on the stream it names."""
    if not isinstance(event, dict):
        return
    if as_json:
        doc = {str(k): v for k, v in event.items()}
        print(json.dumps(doc, separators=(",", ":"), sort_keys=True, default=_json_text),
              flush=True)
        return
    stream = sys.stderr if event.get("stream") == "stderr" else sys.stdout
    data = event.get("data")
    if isinstance(data, bytes):
        stream.flush()
        stream.buffer.write(data)
        stream.buffer.flush()
    elif data is not None:
        stream.write(str(data))
        stream.flush()


def unacknowledged(result: dict[str, Any]) -> list[str]:
    """The members that did not acknowledge a key change, as `name (why)`."""
    errors = result.get("errors")
    out = ([f"{cell(n)} ({cell(why)})" for n, why in sorted(errors.items(), key=str)]
           if isinstance(errors, dict) else [])
    acked, members = _count(result.get("acked")), _count(result.get("members"))
    if not out and acked is not None and members is not None and acked < members:
        out.append(f"{members - acked} member(s)")
    return out


def version_main(ns: argparse.Namespace) -> int:
    """`meshctl version`: this client's version, and the agent's if one answers (else exit 3
    with the client's alone)."""
    code, status = _remote(ns, "version", "status", {})
    agent = status.get("version") if isinstance(status, dict) else None
    doc = {"client": meshnet.__version__, "agent": agent if isinstance(agent, str) else None}
    print(json.dumps(doc, indent=2, sort_keys=True) if ns.json else "\n".join(fields(doc)))
    return code


# --- waiting for services: progress per task --------------------------------------------------

def _tasks(doc: dict[str, Any]) -> list[dict[str, Any]]:
    tasks = doc.get("tasks")
    return [t for t in tasks if isinstance(t, dict)] if isinstance(tasks, list) else []


def _count(value: Any) -> int | None:
    """VALUE if it is an integer (a JSON true is not), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _desired(doc: dict[str, Any]) -> int:
    return _count(doc.get("desired")) or 0


def _running(doc: dict[str, Any]) -> int:
    return sum(1 for t in _tasks(doc) if t.get("state") == "running")


def settled(doc: dict[str, Any], removing: bool) -> bool:
    """Whether a service's `service.progress` shows the state a verb waits for: every task gone
    (rm), or exactly its desired tasks, one per slot, all running (create, scale)."""
    tasks = _tasks(doc)
    exists = doc.get("exists") is not False  # anything but a plain "no" may still be there
    if removing:
        return not exists and not tasks
    desired = _desired(doc)
    return (doc.get("exists") is True and len(tasks) == desired and
            len({cell(t.get("slot")) for t in tasks}) == desired and
            all(t.get("state") == "running" for t in tasks))


def task_state(t: dict[str, Any]) -> str:
    """A task's state with why it is not running, if known: `failed (exit 127, 2 restarts)`."""
    detail = []
    exit_code, restarts = _count(t.get("exit_code")), _count(t.get("restarts"))
    if t.get("state") != "running" and exit_code is not None:
        detail.append(f"exit {exit_code}")
    if restarts is not None and restarts > 0:
        detail.append(f"{restarts} restart{'s' if restarts != 1 else ''}")
    return cell(t.get("state")) + (f" ({', '.join(detail)})" if detail else "")


def task_progress(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(task, node, state) for each task of a service, in slot order."""
    return [(cell(t.get("task")), cell(t.get("node")), task_state(t)) for t in _tasks(doc)]


def progress_summary(doc: dict[str, Any], removing: bool) -> str:
    name = cell(doc.get("name"))
    if removing:
        left = len(_tasks(doc))
        return f"{name}: {left} task{'s' if left != 1 else ''} left"
    return f"{name}: {_running(doc)}/{_desired(doc)} running"


def done_line(doc: dict[str, Any], removing: bool) -> str:
    name = cell(doc.get("name"))
    if removing:
        return f"{name}: removed, every task stopped"
    return f"{name}: converged, {_running(doc)}/{_desired(doc)} running"


# At most this many tasks are named in a timeout's one line; the rest are counted.
MAX_TASKS_NAMED = 5


def why_not(doc: dict[str, Any], removing: bool, waited: float) -> str:
    """One line: why a service is not where the verb waited for it to be after WAITED s."""
    name = cell(doc.get("name"))
    tasks = _tasks(doc)
    if removing:
        what = f"{name}: {len(tasks)} task(s) still there after {waited:g}s"
        if doc.get("exists"):
            what = f"{name}: the service exists again after {waited:g}s"
        lagging = tasks
    else:
        desired, placed = _desired(doc), _count(doc.get("placed"))
        what = f"{name}: {_running(doc)}/{desired} tasks running after {waited:g}s"
        if placed is not None and placed < desired:
            what += (f"; {desired - placed} cannot be placed (constraints, --max-per-node or "
                     "too few hosts)")
        lagging = [t for t in tasks if t.get("state") != "running"]
        extra = sum(1 for t in tasks if t.get("state") == "running") - desired
        if extra > 0:
            what += f"; {extra} more still to stop"
    named = [f"{cell(t.get('task'))} on {cell(t.get('node'))} {task_state(t)}"
             for t in lagging[:MAX_TASKS_NAMED]]
    if len(lagging) > MAX_TASKS_NAMED:
        named.append(f"and {len(lagging) - MAX_TASKS_NAMED} more")
    if named:
        what += ": " + ", ".join(named)
    if not removing:
        what += f" (see meshctl service ps {name}; meshctl service logs {name})"
    return what


class Progress:
    """Progress lines on OUT (stderr): on a terminal one block redrawn in place, a line per
    task as docker shows it; otherwise a line each time a task's line changes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.blocks: dict[str, list[str]] = {}  # service -> its lines, as last drawn
        self.drawn = 0  # lines of the block on screen (tty)
        self.printed: dict[str, str] = {}  # key -> text last printed (no tty)

    def update(self, service: str, summary: str, tasks: list[tuple[str, str, str]]) -> None:
        wt = max((len(t) for t, _, _ in tasks), default=0)
        wn = max((len(n) for _, n, _ in tasks), default=0)
        lines = [summary] + [f"  {t.ljust(wt)}  {n.ljust(wn)}  {s}" for t, n, s in tasks]
        if self.tty:
            if self.blocks.get(service) != lines:
                self.blocks[service] = lines
                self._redraw()
            return
        keyed = [(service, summary)] + [(t, f"  {t}  {n}  {s}") for t, n, s in tasks]
        for key, text in keyed:
            if self.printed.get(key) != text:
                self.printed[key] = text
                print(text, file=self.out, flush=True)

    def done(self, line: str) -> None:
        print(line, file=self.out, flush=True)
        if self.tty:
            self.drawn += 1

    def _redraw(self) -> None:
        lines = [ln for block in self.blocks.values() for ln in block]
        up = f"\x1b[{self.drawn}F" if self.drawn else ""  # to the block's first line
        self.out.write(up + "".join(f"{ln}\x1b[K\n" for ln in lines) + "\x1b[J")
        self.out.flush()
        self.drawn = len(lines)


class _StopWaiting(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


def _progress_of(path: str, name: str, service: str) -> dict[str, Any] | None:
    """The agent's `service.progress` of SERVICE; None if this agent has no such op."""
    try:
        for frame in Client(path).call("service.progress", {"name": service}, PLAIN_TIMEOUT_S):
            if "ok" not in frame:
                continue
            if frame["ok"] and isinstance(frame.get("result"), dict):
                return dict(frame["result"])
            if frame.get("code") == "unknown_op":
                return None
            print(f"meshctl: {name}: {frame.get('error', 'no progress')}", file=sys.stderr)
            raise _StopWaiting(EXIT_FAILED)
    except AgentDenied:
        print(f"meshctl: {denied_message(path)}", file=sys.stderr)
        raise _StopWaiting(EXIT_FAILED) from None
    except (NoAgent, ConnectionError, TimeoutError, api.ApiError) as e:
        print(f"meshctl: {name}: lost the agent while waiting ({e})", file=sys.stderr)
        raise _StopWaiting(EXIT_NO_AGENT) from None
    print(f"meshctl: {name}: the agent sent no reply", file=sys.stderr)
    raise _StopWaiting(EXIT_FAILED)


def wait_for_services(path: str, name: str, services: list[str], result: Any, timeout: float,
                      out: TextIO | None = None,
                      clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], None] = time.sleep) -> tuple[int, Any]:
    """After `service create|scale|rm` (NAME): poll each service's progress until it is
    settled, showing a line per task on OUT (stderr); exit 1 with why after TIMEOUT s. Returns
    (exit code, the result to print: create's `running` brought up to date)."""
    removing = name == "service rm"
    progress = Progress(out if out is not None else sys.stderr)
    start = clock()
    pending = list(dict.fromkeys(services))
    last: dict[str, dict[str, Any]] = {}
    since: dict[str, float] = {}  # service -> when it was first seen settled, this time
    stable_s = 0.0 if removing else STABLE_S  # gone is gone
    try:
        while True:
            for service in list(pending):
                doc = _progress_of(path, name, service)
                if doc is None:
                    print(f"meshctl: {name}: this agent does not report progress; not "
                          "waiting", file=sys.stderr)
                    return EXIT_OK, result
                last[service] = doc
                progress.update(service, progress_summary(doc, removing), task_progress(doc))
                now = clock()
                if not settled(doc, removing):
                    since.pop(service, None)
                elif now - since.setdefault(service, now) >= stable_s:
                    pending.remove(service)
                    progress.done(done_line(doc, removing))
            waited = clock() - start
            if waited >= timeout:  # settled but not yet seen for STABLE_S: done, unverified
                for service in [s for s in pending if s in since]:
                    pending.remove(service)
                    progress.done(done_line(last[service], removing))
                for service in pending:
                    print(f"meshctl: {name}: {why_not(last[service], removing, round(waited))}",
                          file=sys.stderr)
                if pending:
                    return EXIT_FAILED, result
            if not pending:
                break
            sleep(POLL_S)
    except _StopWaiting as stop:
        return stop.code, result
    except KeyboardInterrupt:
        print(f"meshctl: {name}: stopped waiting; the change goes on in the background",
              file=sys.stderr)
        return EXIT_INTERRUPTED, result
    if name == "service create" and isinstance(result, dict) and services[0] in last:
        result = {**result, "running": _running(last[services[0]])}
    return EXIT_OK, result


def wait_for_rollout(path: str, name: str, service: str, result: Any,
                     timeout: float) -> tuple[int, Any]:
    """After `service update|rollback`: until the rollout completes, pauses or rolls back
    (meshnet/cli/rolling.py); exit 1 with why on a pause or a rollback."""
    try:
        return rolling.wait_for_rollout(
            lambda: _progress_of(path, name, service), name, result, timeout,
            Progress(sys.stderr), task_progress, time.monotonic, time.sleep, POLL_S,
            lambda line: print(f"meshctl: {name}: {line}", file=sys.stderr))
    except _StopWaiting as stop:
        return stop.code, result
    except KeyboardInterrupt:
        print(f"meshctl: {name}: stopped waiting; the update goes on in the background",
              file=sys.stderr)
        return EXIT_INTERRUPTED, result


# --- ca: the cluster CA and node certificates (local files; revoke also submits) ----------------

def add_ca_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    ca = verbs(sub, "ca", "the offline cluster CA: node certificates",
               "meshctl ca init --out /root/meshnet-ca\n"
               "meshctl ca sign h1 --role admin --ca /root/meshnet-ca --out ./h1", "ca_cmd")
    i = verb(ca, "init", "make a new CA (ca.key, ca.crt) in a new 0700 directory",
             "meshctl ca init --out /root/meshnet-ca")
    i.add_argument("--out", required=True, metavar="DIR", help="the new directory")
    i.add_argument("--name", default="meshnet-ca", help="the CA's name (default meshnet-ca)")
    i.add_argument("--days", type=int, default=3650, help="validity in days (default 3650)")
    s = verb(ca, "sign", "make a node's keys and certificate (node.key, node.crt)",
             "meshctl ca sign h1 --role admin --label zone=a --ca /root/meshnet-ca --out ./h1\n"
             "meshctl ca sign h1 --role admin --ca /root/meshnet-ca --out ./h1 --renew")
    s.add_argument("name", help="the node's name (its meshnetd --name)")
    s.add_argument("--role", required=True, action="append", choices=("admin", "worker"),
                   help="admin: may define networks and services and rotate keys; worker: "
                        "runs tasks (repeatable)")
    s.add_argument("--label", action="append", default=[], metavar="K=V",
                   help="a label the certificate vouches for (repeatable)")
    s.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    s.add_argument("--ca", required=True, metavar="DIR", help="the CA's directory")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="where node.key and node.crt go")
    s.add_argument("--force", action="store_true", help="overwrite an existing node.key")
    s.add_argument("--renew", action="store_true",
                   help="keep the keys in --out/node.key and write a new node.crt for them "
                        "(a running agent takes it on SIGHUP)")
    sh = verb(ca, "show", "print a certificate or revocation",
              "meshctl ca show /etc/meshnet/node.crt --ca /etc/meshnet/ca.crt")
    sh.add_argument("file", help="a ca.crt, node.crt or revocation file")
    sh.add_argument("--ca", metavar="DIR|CA.CRT", help="also check it against this CA")
    r = verb(ca, "revoke", "revoke a node's certificate(s) and hand the revocation to the agent",
             "meshctl ca revoke h3 --ca /root/meshnet-ca --out h3.revoked")
    r.add_argument("name", help="the node whose certificates to revoke")
    r.add_argument("--serial", metavar="HEX", help="only this certificate (default: every "
                   "certificate of NAME issued until now)")
    r.add_argument("--ca", required=True, metavar="DIR", help="the CA's directory")
    r.add_argument("--out", metavar="FILE", help="also write the revocation here")


def ca_main(ns: argparse.Namespace) -> int:
    """`meshctl ca ...`: prints one document (or its text form) and returns the exit code."""
    from meshnet.crypto.certs import CertError
    verb = ns.ca_cmd
    try:
        code, doc, text = {"init": _ca_init, "sign": _ca_sign, "show": _ca_show,
                           "revoke": _ca_revoke}[verb](ns)
    except UsageError as e:
        print(f"meshctl: ca {verb}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (CertError, OSError) as e:
        print(f"meshctl: ca {verb}: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(doc, indent=2, sort_keys=True) if ns.json else text)
    return code


CaResult = tuple[int, dict[str, Any], str]


def _now() -> int:
    import time
    return int(time.time())


def _iso(t: int) -> str:
    from meshnet.crypto.certs import iso_time
    return iso_time(t)


def _lines(doc: dict[str, Any]) -> str:
    return "\n".join(fields(doc))


def _cert_doc(obj: Any) -> dict[str, Any]:
    """A CaCert, NodeCert or Revocation as JSON-ready fields (bytes as hex, times ISO UTC)."""
    from meshnet.crypto.certs import CaCert, NodeCert
    if isinstance(obj, CaCert):
        return {"kind": "ca certificate", "name": obj.name, "fingerprint": obj.fingerprint_hex,
                "public_key": obj.public_key.hex(), "not_before": _iso(obj.not_before),
                "not_after": _iso(obj.not_after)}
    if isinstance(obj, NodeCert):
        return {"kind": "node certificate", "name": obj.name, "roles": list(obj.roles),
                "labels": obj.labels, "serial": obj.serial.hex(),
                "not_before": _iso(obj.not_before), "not_after": _iso(obj.not_after),
                "ca": obj.issuer.hex(), "sign_key": obj.sign_key.hex(),
                "dp_key": obj.dp_key.hex()}
    scope = (f"certificate {obj.serial.hex()}" if obj.serial is not None else
             f"every certificate of {obj.name} issued before {_iso(obj.issued_at)}")
    return {"kind": "revocation", "name": obj.name, "revokes": scope,
            "serial": obj.serial.hex() if obj.serial is not None else None,
            "issued_at": _iso(obj.issued_at), "ca": obj.issuer.hex()}


def _ca_init(ns: argparse.Namespace) -> CaResult:
    from meshnet.crypto import certs
    key, ca = certs.make_ca(ns.name, _now(), ns.days)
    certs.save_ca(ns.out, key, ca)
    doc = {**_cert_doc(ca), "dir": ns.out}
    return EXIT_OK, doc, f"created CA {ca.name} in {ns.out} (keep ca.key offline)\n" + _lines(doc)


def _ca_sign(ns: argparse.Namespace) -> CaResult:
    from meshnet.crypto import certs
    labels: dict[str, str] = {}
    for item in ns.label:
        k, sep, v = item.partition("=")
        if not sep:
            raise UsageError(f"--label {item!r} is not K=V")
        labels[k] = v
    ca_key, ca = certs.load_ca(ns.ca)
    if ns.renew:
        from pathlib import Path
        keys = certs.load_node_keys(Path(ns.out) / certs.NODE_KEY_FILE)
    else:
        keys = certs.generate_node_keys()
    now = _now()
    cert = certs.sign_node(ca_key, ca, ns.name, ns.role, labels, keys.sign_pub, keys.dp_pub,
                           now, ns.days)
    certs.save_node(ns.out, keys, cert, overwrite=ns.force or ns.renew)
    clamped = cert.not_after < now + ns.days * certs.DAY  # the CA expires first
    doc = {**_cert_doc(cert), "dir": ns.out, "clamped_to_ca_expiry": clamped}
    return EXIT_OK, doc, f"signed {cert.name} into {ns.out}\n" + _lines(doc)


def _ca_show(ns: argparse.Namespace) -> CaResult:
    from pathlib import Path

    from meshnet.crypto import certs
    kind, raw = certs.read_armored(ns.file)
    obj: Any = {certs.ARMOR_CA: certs.decode_ca, certs.ARMOR_NODE: certs.peek_node_cert,
                certs.ARMOR_REVOCATION: certs.peek_revocation}[kind](raw)
    doc = _cert_doc(obj)
    if ns.ca is None:
        return EXIT_OK, doc, _lines(doc)
    ca_path = Path(ns.ca) / certs.CA_CERT_FILE if Path(ns.ca).is_dir() else Path(ns.ca)
    ca = certs.load_ca_cert(ca_path)
    try:
        if kind == certs.ARMOR_CA:
            if obj.fingerprint != ca.fingerprint:
                raise certs.CertError("another CA")
        elif kind == certs.ARMOR_NODE:
            certs.check_node_cert(certs.decode_node_cert(raw, ca), ca, _now())
        else:
            certs.decode_revocation(raw, ca)
        doc["verified"] = "yes"
        code = EXIT_OK
    except certs.CertError as e:
        doc["verified"] = f"no: {e}"
        print(f"meshctl: ca show: {ns.file} does not verify against {ca_path}: {e}",
              file=sys.stderr)
        code = EXIT_FAILED
    return code, doc, _lines(doc)


def _ca_revoke(ns: argparse.Namespace) -> CaResult:
    from meshnet.crypto import certs
    from meshnet.fsutil import atomic_write
    serial = None
    if ns.serial is not None:
        try:
            serial = bytes.fromhex(ns.serial)
        except ValueError:
            serial = b""
        if len(serial) != certs.SERIAL_BYTES:
            raise UsageError(f"--serial must be {certs.SERIAL_BYTES * 2} hex digits")
    ca_key, ca = certs.load_ca(ns.ca)
    rev = certs.sign_revocation(ca_key, ca, ns.name, serial, _now())
    armored = certs.armor(certs.ARMOR_REVOCATION, rev.raw)
    if ns.out:
        atomic_write(ns.out, armored.encode(), mode=certs.CERT_MODE)
    doc = {**_cert_doc(rev), "out": ns.out, "submitted": False, "revocation": armored}
    code, why = _submit_revocation(ns.socket, armored)
    if code == EXIT_OK:
        doc["submitted"] = True
        return EXIT_OK, doc, _lines({k: v for k, v in doc.items() if k != "revocation"})
    where = f"; written to {ns.out}" if ns.out else ""
    print(f"meshctl: ca revoke: not submitted ({why}){where}", file=sys.stderr)
    if code == EXIT_NO_AGENT and ns.out:
        code = EXIT_OK  # the revocation is safe in --out; the operator distributes it
    return code, doc, armored.rstrip("\n")


def _submit_revocation(path: str, armored: str) -> tuple[int, str]:
    """Hand a revocation to the local agent: (exit code, why it was not submitted)."""
    try:
        for frame in Client(path).call("ca.revoke", {"revocation": armored}, PLAIN_TIMEOUT_S):
            if "event" in frame:
                continue
            if frame.get("ok"):
                return EXIT_OK, ""
            if frame.get("code") == "unknown_op":
                return EXIT_FAILED, "this agent does not accept revocations yet (no op ca.revoke)"
            return EXIT_FAILED, f"the agent refused it: {frame.get('error', 'failed')}"
    except AgentDenied:
        return EXIT_FAILED, denied_message(path)
    except NoAgent:
        return EXIT_NO_AGENT, f"cannot reach the agent at {path}"
    except (ConnectionError, TimeoutError, api.ApiError) as e:
        return EXIT_NO_AGENT, f"lost the agent mid-answer: {e}"
    return EXIT_FAILED, "the agent sent no reply"


if __name__ == "__main__":
    sys.exit(main())
