"""meshnet-lab: build and drive test hosts (network namespaces) on this machine.

Only argument parsing and printing live here; the work is meshnet.lab.Lab.
Exit codes: 0 done, 1 failed (one line on stderr), 2 usage; exec and ctl pass through the
exit code of the command they run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from meshnet.lab import Lab, LabError, default_prefix
from meshnet.lab.chaos import FAULT_KINDS, parse_faults, run_chaos
from meshnet.lab.lab import AGENT_START_TIMEOUT_S, MAX_HOSTS, UNDERLAY_MTU, format_table

PROG = "meshnet-lab"


def _percent(text: str) -> int:
    try:
        value = int(text.removesuffix("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole percentage: {text!r}") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"percentage must be 0..100, not {value}")
    return value


def _host_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= MAX_HOSTS:
        raise argparse.ArgumentTypeError(f"must be 1..{MAX_HOSTS}, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Test hosts as network namespaces, each running its own meshnetd.",
    )
    p.add_argument(
        "--prefix",
        default=None,
        help=f"name prefix of the lab's namespaces (default $MESHNET_LAB_PREFIX or "
        f"{default_prefix()!r})",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help="where the lab keeps its records, keys, sockets and logs "
        "(default $MESHNET_LAB_RUN or /run/meshnet-lab/PREFIX)",
    )
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    up = sub.add_parser("up", help="create the hosts and start their agents")
    up.add_argument("--hosts", type=_host_count, default=3, help="number of hosts (default 3)")
    up.add_argument("--profile", default=None, help="meshnetd membership profile, e.g. lan-fast")
    up.add_argument("--no-agents", action="store_true", help="build the network only")
    up.add_argument(
        "--timeout",
        type=float,
        default=AGENT_START_TIMEOUT_S,
        help=f"seconds to wait for the agents' sockets (default {AGENT_START_TIMEOUT_S:g})",
    )
    up.add_argument(
        "--underlay-mtu", type=int, default=UNDERLAY_MTU,
        help=f"MTU of the underlay switch and the hosts' eth0 (default {UNDERLAY_MTU})",
    )
    up.add_argument(
        "--workers", default="", metavar="H3,H4",
        help="hosts whose certificates carry the worker role (default: every host is admin)",
    )

    down = sub.add_parser("down", help="remove every namespace, link and process of the lab")
    down.add_argument("--keep-logs", action="store_true", help="keep RUN/hN/meshnetd.log")

    st = sub.add_parser("status", help="show the hosts")
    st.add_argument("--json", action="store_true", help="print one JSON document")

    ex = sub.add_parser("exec", help="run a command in a host's namespace")
    ex.add_argument("host")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")

    ctl = sub.add_parser("ctl", help="run meshctl against a host's agent")
    ctl.add_argument("host")
    ctl.add_argument("args", nargs=argparse.REMAINDER, metavar="-- MESHCTL-ARGS...")

    k = sub.add_parser("kill", help="SIGKILL a host's agent")
    k.add_argument("host")

    s = sub.add_parser("start", help="start a host's agent again")
    s.add_argument("host")
    s.add_argument("--timeout", type=float, default=AGENT_START_TIMEOUT_S)

    pa = sub.add_parser("partition", help="split the hosts into groups that cannot talk")
    pa.add_argument("groups", nargs="+", metavar="H1,H2")

    sub.add_parser("heal", help="remove the partition and every one-way block")

    bl = sub.add_parser("block", help="drop every underlay packet from SRC to DST (one way)")
    bl.add_argument("src")
    bl.add_argument("dst")

    ub = sub.add_parser("unblock", help="remove the one-way block from SRC to DST")
    ub.add_argument("src")
    ub.add_argument("dst")

    li = sub.add_parser("link", help="take a host's underlay link down (its switch port, as a "
                        "pulled cable) or bring it up")
    li.add_argument("host")
    li.add_argument("state", choices=("up", "down"))

    pz = sub.add_parser("pause", help="SIGSTOP a host's agent (a GC or VM stall)")
    pz.add_argument("host")

    rs = sub.add_parser("resume", help="SIGCONT a paused agent")
    rs.add_argument("host")

    cr = sub.add_parser("crash", help="fail a whole host: link down, agent and tasks SIGKILLed")
    cr.add_argument("host")

    rc = sub.add_parser("recover", help="after crash: link up and the agent started again")
    rc.add_argument("host")
    rc.add_argument("--timeout", type=float, default=AGENT_START_TIMEOUT_S)

    lo = sub.add_parser("loss", help="drop PERCENT%% of a host's underlay packets (0 removes)")
    lo.add_argument("host")
    lo.add_argument("percent", type=_percent)
    ch = sub.add_parser(
        "chaos",
        help="run a seeded schedule of faults against a fresh lab, then check the invariants",
    )
    ch.add_argument("--hosts", type=_host_count, default=5, help="lab size (default 5)")
    ch.add_argument("--seed", type=int, default=1, help="draws the schedule (default 1)")
    ch.add_argument("--duration", type=_seconds, default=120.0,
                    help="seconds of faults (default 120)")
    ch.add_argument("--faults", default="all",
                    help=f"comma-separated kinds (default all: {','.join(FAULT_KINDS)})")
    ch.add_argument("--max-down", type=int, default=None,
                    help="most hosts down at once (default: fewer than half)")
    ch.add_argument("--json", action="store_true", help="the report as one JSON document")
    return p


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"must be 1..86400 seconds, not {value:g}")
    return value


def _strip_dashdash(argv: list[str]) -> list[str]:
    return argv[1:] if argv[:1] == ["--"] else argv


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    lab = Lab(args.prefix, args.run_dir)
    verb: str = args.verb
    if verb == "up":
        lab.up(
            args.hosts,
            profile=args.profile,
            start_agents=not args.no_agents,
            timeout=args.timeout,
            underlay_mtu=args.underlay_mtu,
            workers=[w for w in args.workers.split(",") if w],
        )
        rows = lab.status()
        print(
            f"lab '{lab.prefix}' is up: {len(rows)} host(s) "
            f"{rows[0].underlay_ip}..{rows[-1].underlay_ip}, run dir {lab.run_dir}"
        )
    elif verb == "down":
        lab.down(keep_logs=args.keep_logs)
    elif verb == "status":
        rows = lab.status()
        if args.json:
            print(json.dumps({"hosts": [r.to_dict() for r in rows]}))
        elif rows:
            format_table(rows, sys.stdout)
        else:
            print(f"no lab '{lab.prefix}' is up")
    elif verb == "exec":
        cmd = _strip_dashdash(args.cmd)
        if not cmd:
            parser.error("exec needs a command: exec HOST -- CMD...")
        sys.stdout.flush()
        return lab.exec(args.host, cmd).returncode
    elif verb == "ctl":
        sys.stdout.flush()
        return lab.ctl(args.host, _strip_dashdash(args.args)).returncode
    elif verb == "kill":
        lab.kill(args.host)
    elif verb == "start":
        lab.start(args.host, timeout=args.timeout)
    elif verb == "partition":
        groups = [[h for h in g.split(",") if h] for g in args.groups]
        lab.partition(groups)
    elif verb == "heal":
        lab.heal()
    elif verb == "loss":
        lab.loss(args.host, args.percent)
    elif verb == "chaos":
        try:
            kinds = parse_faults(args.faults)
        except ValueError as e:
            parser.error(f"--faults: {e}")
        return run_chaos(lab, args.hosts, args.seed, args.duration, kinds, args.max_down,
                         args.json)
    elif verb == "block":
        lab.block(args.src, args.dst)
    elif verb == "unblock":
        lab.unblock(args.src, args.dst)
    elif verb == "link":
        lab.link(args.host, args.state == "up")
    elif verb == "pause":
        lab.pause(args.host)
    elif verb == "resume":
        lab.resume(args.host)
    elif verb == "crash":
        lab.crash(args.host)
    elif verb == "recover":
        lab.recover(args.host, timeout=args.timeout)
    else:  # pragma: no cover - argparse rejects unknown verbs
        parser.error(f"unknown verb {verb}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print(f"{PROG}: must run as root (it creates network namespaces)", file=sys.stderr)
        return 1
    try:
        return run(args, parser)
    except LabError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"{PROG}: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
