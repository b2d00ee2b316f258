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

    sub.add_parser("heal", help="remove the partition")

    lo = sub.add_parser("loss", help="drop PERCENT%% of a host's underlay packets (0 removes)")
    lo.add_argument("host")
    lo.add_argument("percent", type=_percent)
    return p


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
