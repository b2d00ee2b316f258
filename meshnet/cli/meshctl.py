"""meshctl: parse arguments, call the local agent's control API, print the answer.

Exit codes (docs/design.md §4): 0 done; 1 the operation failed; 2 usage error; 3 no agent.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Iterator
from typing import Any

from meshnet import api
from meshnet.config import DEFAULT_SOCKET
from meshnet.containment import describe_caps, describe_limits

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_AGENT = 0, 1, 2, 3
# Streaming ops (run, logs) may wait on a long-running task; plain ops answer quickly.
PLAIN_TIMEOUT_S = 60.0


class NoAgent(Exception):
    pass


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
        except (FileNotFoundError, ConnectionRefusedError, PermissionError, OSError) as e:
            sock.close()
            raise NoAgent(str(e)) from None
        with sock:
            sock.sendall(api.encode({"v": api.API_VERSION, "op": op, "args": args}))
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


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="meshctl", description="drive the local meshnet agent")
    p.add_argument("--socket", default=DEFAULT_SOCKET, help="the agent's control socket")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    sub.add_parser("status", help="this agent and the cluster at a glance")
    sub.add_parser("members", help="the member list")
    j = sub.add_parser("join", help="join the cluster through members")
    j.add_argument("addrs", nargs="+", metavar="IP:PORT")
    sub.add_parser("leave", help="leave the cluster gracefully and stop the agent")

    keys = sub.add_parser("keys", help="gossip keyring rotation").add_subparsers(
        dest="keys_cmd", required=True, parser_class=Parser)
    keys.add_parser("list")
    keys.add_parser("generate")
    for verb in ("install", "use", "remove"):
        keys.add_parser(verb).add_argument("key")

    net = sub.add_parser("network", help="overlay networks").add_subparsers(
        dest="net_cmd", required=True, parser_class=Parser)
    c = net.add_parser("create")
    c.add_argument("name")
    c.add_argument("--subnet", metavar="CIDR")
    c.add_argument("--encrypted", action="store_true")
    net.add_parser("ls")
    net.add_parser("inspect").add_argument("name")
    net.add_parser("rm").add_argument("name")

    ep = sub.add_parser("endpoint", help="register names owned by this host").add_subparsers(
        dest="ep_cmd", required=True, parser_class=Parser)
    ea = ep.add_parser("add")
    ea.add_argument("name")
    ea.add_argument("ip")
    ea.add_argument("--network", required=True)
    ea.add_argument("--service")
    er = ep.add_parser("rm")
    er.add_argument("name")
    er.add_argument("--network", required=True)
    ep.add_parser("ls")

    r = sub.add_parser("run", help="run a one-off command in a sandbox on a network")
    r.add_argument("--network", required=True)
    r.add_argument("--name")
    r.add_argument("--env", action="append", default=[], metavar="K=V")
    add_containment_flags(r)

    svc = sub.add_parser("service", help="services").add_subparsers(
        dest="svc_cmd", required=True, parser_class=Parser)
    sc = svc.add_parser("create")
    sc.add_argument("name")
    sc.add_argument("--network", required=True, action="append")
    mode = sc.add_mutually_exclusive_group()
    mode.add_argument("--replicas", type=int)
    mode.add_argument("--mode", choices=("replicated", "global"))
    sc.add_argument("--constraint", action="append", default=[])
    sc.add_argument("--max-per-node", type=int)
    sc.add_argument("--restart-condition", choices=("none", "on-failure", "any"))
    sc.add_argument("--env", action="append", default=[], metavar="K=V")
    add_containment_flags(sc)
    svc.add_parser("scale").add_argument("scales", nargs="+", metavar="NAME=N")
    svc.add_parser("ls")
    for verb in ("ps", "inspect", "rm", "logs"):
        svc.add_parser(verb).add_argument("name")

    dns = sub.add_parser("dns", help="service discovery").add_subparsers(
        dest="dns_cmd", required=True, parser_class=Parser)
    lk = dns.add_parser("lookup")
    lk.add_argument("name")
    lk.add_argument("--network")
    lk.add_argument("--type", default="A", choices=("A", "SRV", "PTR"))
    add_ca_parser(sub)
    return p


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
                "env": ns.env, **containment_args(ns), "command": _command(ns.command)}
        if verb == "scale":
            scales: dict[str, int] = {}
            for item in ns.scales:
                name, sep, n = item.partition("=")
                if not sep or not (n.isascii() and n.isdigit()) or len(n) > 9:
                    raise UsageError(f"{item!r} is not NAME=N with N >= 0")
                scales[name] = int(n)
            return "service scale", "service.scale", {"scales": scales}
        return f"service {verb}", f"service.{verb}", {"name": getattr(ns, "name", None)}
    if cmd == "dns":
        return "dns lookup", "dns.lookup", {"name": ns.name, "network": ns.network,
                                            "type": ns.type}
    raise UsageError(f"unknown command {cmd}")


# --- printing ----------------------------------------------------------------------------------

def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


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


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, dict):
        return ",".join(f"{k}={x}" for k, x in sorted(v.items())) or "-"
    if isinstance(v, list):
        return ",".join(map(str, v)) or "-"
    return str(v)


def render(name: str, result: Any) -> str:
    if name == "status" and isinstance(result, dict):
        members = result.get("members", {})
        lines = [f"{k}: {_cell(result.get(k))}" for k in
                 ("name", "version", "addr", "incarnation", "encryption", "profile", "uptime_s")]
        lines.append("members: " + ", ".join(f"{v} {k}" for k, v in members.items()))
        ident = result.get("identity")
        if isinstance(ident, dict):
            lines.append(f"identity: roles {_cell(ident.get('roles'))}, certificate expires "
                         f"{ident.get('expires')}, CA {ident.get('ca')}")
        elif ident is not None:
            lines.append(f"identity: {ident}")
        lines.append("datapath: " + _cell(result.get("datapath")))
        return "\n".join(lines)
    if name == "members" and isinstance(result, list):
        cols = ["name", "addr", "state", "incarnation", "labels"]
        if result and isinstance(result[0], dict) and "roles" in result[0]:
            cols += ["roles", "cert_expires"]
        return table(result, cols)
    if name.startswith("keys") and isinstance(result, dict):
        out = []
        if "key" in result:
            return str(result["key"])
        if "keys" in result:
            out.append(table(result["keys"], ["key", "primary", "members"]))
        out.append(f"{result.get('acked')}/{result.get('members')} members acknowledged")
        out += [f"  {n}: {err}" for n, err in sorted(result.get("errors", {}).items())]
        return "\n".join(out)
    if name == "dns lookup" and isinstance(result, dict):
        return "\n".join(map(str, result.get("answers", [])))
    if name in ("service inspect", "service create") and isinstance(result, dict):
        lines = [f"{k}: {_cell(v)}" for k, v in result.items()
                 if k not in ("containment", "tasks", "command")]
        lines.append("command: " + " ".join(map(str, result.get("command") or [])))
        c = result.get("containment")
        if isinstance(c, dict):
            lines += [f"user: {c.get('user')}",
                      f"capabilities: {describe_caps(c.get('capabilities') or [])}",
                      f"limits: {describe_limits(c.get('limits') or {})}",
                      f"mounts: {_cell(c.get('mounts'))}"]
        elif c is not None:
            lines.append(f"containment: {c}")
        if "tasks" in result:
            lines += ["tasks:", table(_containment_rows(result.get("tasks") or []),
                                      ["task", "node", "state", "ip", "user", "caps",
                                       "limits"])]
        return "\n".join(lines)
    if name == "network inspect" and isinstance(result, dict):
        head = [f"{k}: {_cell(result.get(k))}" for k in ("name", "vni", "subnet", "encrypted")]
        eps = table(_containment_rows(result.get("endpoints", [])),
                    ["name", "ip", "mac", "node", "service", "user", "caps", "limits"])
        lines = [*head, "endpoints:", eps]
        if isinstance(result.get("peers"), list):  # an encrypted network's key state per peer
            rows = [{**p, "drops": " ".join(f"{k}={v}" for k, v in (p.get("drops") or {}).items()
                                            if v) or "-"} for p in result["peers"]]
            lines += ["peers:", table(rows, ["node", "spi", "age", "packets", "bytes", "rekeys",
                                             "drops"])]
        return "\n".join(lines)
    if name == "network ls" and isinstance(result, list):
        return table(result, ["name", "vni", "subnet", "encrypted"])
    if isinstance(result, list) and result and isinstance(result[0], dict):
        return table(result, list(result[0].keys()))
    if isinstance(result, dict):
        return "\n".join(f"{k}: {_cell(v)}" for k, v in result.items())
    return _cell(result)


def _local(name: str) -> Any:
    """Commands that need no agent."""
    if name == "keys generate":
        from meshnet.crypto.keyring import generate_key
        return {"key": generate_key()}
    return None


def main(argv: list[str] | None = None) -> int:
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
    if ns.cmd == "ca":  # local files, no agent needed (revoke submits if one answers)
        return ca_main(ns)
    try:
        name, op, args = to_request(ns)
    except UsageError as e:
        print(f"meshctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    result = _local(name)
    if result is None:
        code, result = _remote(ns, name, op, args)
        if code != EXIT_OK:
            return code
    if ns.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif name != "run":  # run's output was the command's own, streamed as it came
        print(render(name, result))
    if name == "run" and isinstance(result, dict):
        return int(result.get("exit_code", 0))
    return EXIT_OK


def _remote(ns: argparse.Namespace, name: str, op: str, args: dict[str, Any]) -> tuple[int, Any]:
    streaming = op in ("run", "service.logs")
    try:
        for frame in Client(ns.socket).call(op, args, None if streaming else PLAIN_TIMEOUT_S):
            if "event" in frame:
                _print_event(frame["event"])
                continue
            if frame.get("ok"):
                return EXIT_OK, frame.get("result")
            if frame.get("code") == "unknown_op":
                print(f"meshctl: '{name}' is not available on this agent (not built yet, or "
                      "turned off, e.g. by --datapath none)", file=sys.stderr)
            else:
                print(f"meshctl: {name}: {frame.get('error', 'failed')}", file=sys.stderr)
            return EXIT_FAILED, None
    except NoAgent:
        print(f"meshctl: cannot reach the agent at {ns.socket} (is meshnetd running?)",
              file=sys.stderr)
        return EXIT_NO_AGENT, None
    except (ConnectionError, TimeoutError, api.ApiError) as e:
        print(f"meshctl: {name}: lost the agent mid-answer ({e})", file=sys.stderr)
        return EXIT_NO_AGENT, None
    except KeyboardInterrupt:
        return 130, None
    print(f"meshctl: {name}: the agent sent no reply", file=sys.stderr)
    return EXIT_FAILED, None


def _print_event(event: dict[str, Any]) -> None:
    stream = sys.stderr if event.get("stream") == "stderr" else sys.stdout
    data = event.get("data")
    if isinstance(data, bytes):
        stream.buffer.write(data)
        stream.flush()
    elif data is not None:
        stream.write(str(data))
        stream.flush()


# --- ca: the cluster CA and node certificates (local files; revoke also submits) ----------------

def add_ca_parser(sub: argparse._SubParsersAction[Parser]) -> None:
    ca = sub.add_parser("ca", help="the offline cluster CA: node certificates").add_subparsers(
        dest="ca_cmd", required=True, parser_class=Parser)
    i = ca.add_parser("init", help="make a new CA (ca.key, ca.crt) in a new 0700 directory")
    i.add_argument("--out", required=True, metavar="DIR")
    i.add_argument("--name", default="meshnet-ca")
    i.add_argument("--days", type=int, default=3650)
    s = ca.add_parser("sign", help="make a node's keys and certificate (node.key, node.crt)")
    s.add_argument("name")
    s.add_argument("--role", required=True, action="append", choices=("admin", "worker"))
    s.add_argument("--label", action="append", default=[], metavar="K=V")
    s.add_argument("--days", type=int, default=365)
    s.add_argument("--ca", required=True, metavar="DIR")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--force", action="store_true", help="overwrite an existing node.key")
    s.add_argument("--renew", action="store_true",
                   help="keep the keys in --out/node.key and write a new node.crt for them "
                        "(a running agent takes it on SIGHUP)")
    sh = ca.add_parser("show", help="print a certificate or revocation")
    sh.add_argument("file")
    sh.add_argument("--ca", metavar="DIR|CA.CRT", help="also check it against this CA")
    r = ca.add_parser("revoke", help="revoke a node's certificate(s)")
    r.add_argument("name")
    r.add_argument("--serial", metavar="HEX", help="only this certificate (default: every "
                   "certificate of NAME issued until now)")
    r.add_argument("--ca", required=True, metavar="DIR")
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
    return "\n".join(f"{k}: {_cell(v)}" for k, v in doc.items())


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
    except NoAgent:
        return EXIT_NO_AGENT, f"cannot reach the agent at {path}"
    except (ConnectionError, TimeoutError, api.ApiError) as e:
        return EXIT_NO_AGENT, f"lost the agent mid-answer: {e}"
    return EXIT_FAILED, "the agent sent no reply"


if __name__ == "__main__":
    sys.exit(main())
