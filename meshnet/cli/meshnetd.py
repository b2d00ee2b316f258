"""meshnetd: parse flags, load and validate the config, run the agent on uvloop."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from meshnet import __version__
from meshnet import config as configmod
from meshnet.agent import logs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshnetd", description="the meshnet agent")
    p.add_argument("--config", help=f"TOML config file (default {configmod.DEFAULT_CONFIG_PATH})")
    p.add_argument("--check-config", action="store_true",
                   help="check the config (file and flags) and this host for it, list every "
                        "problem, and exit: 0 OK, 1 problems (e.g. meshnetd --check-config "
                        "--config /etc/meshnet/meshnet.toml)")
    p.add_argument("--name", help="node name (default: hostname)")
    p.add_argument("--bind", metavar="IP:PORT", help="gossip address (UDP and TCP)")
    p.add_argument("--advertise", metavar="IP", help="address other members reach us at")
    p.add_argument("--join", metavar="IP:PORT[,..]", action="append",
                   help="members to join through (repeatable, or comma-separated)")
    p.add_argument("--state-dir", metavar="DIR")
    p.add_argument("--socket", metavar="PATH", help="control socket path")
    p.add_argument("--cluster-key-file", metavar="FILE", help="file holding the base64 gossip key")
    p.add_argument("--ca-cert", metavar="FILE", help="the cluster CA's certificate (ca.crt)")
    p.add_argument("--node-cert", metavar="FILE", help="this node's certificate (node.crt)")
    p.add_argument("--node-key", metavar="FILE", help="this node's keys (node.key, mode 0600)")
    p.add_argument("--insecure-no-identity", action="store_true", default=None,
                   help="DANGER: no certificates; any holder of the cluster key is every node")
    p.add_argument("--label", metavar="K=V", action="append", help="node label (repeatable)")
    p.add_argument("--dns-listen", metavar="IP:PORT", action="append",
                   help="extra DNS listener that sees every network (repeatable)")
    p.add_argument("--metrics-listen", metavar="IP:PORT",
                   help="serve Prometheus metrics at /metrics and a health check at /health "
                        "(off unless set; e.g. --metrics-listen 10.0.0.5:9946)")
    p.add_argument("--dns-upstream", metavar="IP:PORT", action="append",
                   help="forward other names here instead of /etc/resolv.conf's resolvers "
                        "(repeatable; 'none' disables forwarding)")
    p.add_argument("--datapath", choices=configmod.DATAPATHS,
                   help="vxlan (default) or none: control plane only, no kernel devices")
    p.add_argument("--sandbox-prefix", metavar="PREFIX",
                   help="start sandbox namespace names with PREFIX (default mns; README: Names)")
    p.add_argument("--task-hidden-path", metavar="PATH", action="append",
                   dest="task_hidden_paths",
                   help="a host path no task may see (repeatable; the agent's own state, "
                        "socket, config and key are always hidden)")
    p.add_argument("--dns-ttl", type=int, metavar="SECONDS")
    p.add_argument("--profile", choices=configmod.PROFILES, help="membership timings")
    p.add_argument("--rekey-after", type=float, metavar="SECONDS", dest="rekey_after_s",
                   help="encrypted overlays: rekey this often (default 120)")
    p.add_argument("--reject-after", type=float, metavar="SECONDS", dest="reject_after_s",
                   help="encrypted overlays: refuse keys this old (default 180)")
    p.add_argument("--overlay-cipher", choices=configmod.OVERLAY_CIPHERS,
                   help="encrypted overlays: the record cipher we propose (default aes-256-gcm)")
    p.add_argument("--log-format", choices=configmod.LOG_FORMATS)
    p.add_argument("--log-level", choices=configmod.LOG_LEVELS)
    p.add_argument("--insecure-no-encryption", action="store_true", default=None,
                   help="DANGER: gossip in cleartext, with no authentication")
    p.add_argument("--version", action="version", version=f"meshnetd {__version__}")
    return p


def flag_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """Flags in the same raw shape as the TOML file, so one validator checks both."""
    out: dict[str, Any] = {}
    for key in ("name", "bind", "advertise", "state_dir", "socket", "cluster_key_file",
                "ca_cert", "node_cert", "node_key", "insecure_no_identity",
                "profile", "log_format", "log_level", "insecure_no_encryption", "dns_ttl",
                "datapath", "sandbox_prefix", "rekey_after_s", "reject_after_s",
                "overlay_cipher", "metrics_listen"):
        value = getattr(ns, key)
        if value is not None:
            out[key] = value
    if ns.join:
        out["join"] = [a for item in ns.join for a in item.split(",") if a]
    if ns.dns_listen:
        out["dns_listen"] = list(ns.dns_listen)
    if ns.task_hidden_paths:
        out["task_hidden_paths"] = list(ns.task_hidden_paths)
    if ns.dns_upstream:
        out["dns_upstreams"] = [a for a in ns.dns_upstream if a != "none"]
    if ns.label:
        labels: dict[str, str] = {}
        for text in ns.label:
            k, v = configmod.parse_label("--label", text)
            labels[k] = v
        out["labels"] = labels
    return out


def check_config(ns: argparse.Namespace) -> int:
    """--check-config: every problem of the configuration and of this host for it, one line
    each (warnings too, which do not fail it); "OK" only when there is none."""
    from meshnet.agent import preflight

    problems: list[str] = []
    cfg: configmod.Config | None = None
    bad: frozenset[str] = frozenset()
    try:
        cfg = configmod.load(ns.config, flag_overrides(ns), explicit_path=ns.config is not None)
    except configmod.ConfigError as e:
        problems += e.problems
        cfg, bad = e.partial, e.keys
    findings = preflight.check(cfg, skip=bad) if cfg is not None else preflight.Findings()
    problems += findings.errors
    for warning in findings.warnings:
        print(f"meshnetd: warning: {warning}", file=sys.stderr)
    for problem in problems:
        print(f"meshnetd: {problem}", file=sys.stderr)
    if problems:
        return 1
    print("meshnetd: configuration OK")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.check_config:
        return check_config(ns)
    try:
        overrides = flag_overrides(ns)
        cfg = configmod.load(ns.config, overrides, explicit_path=ns.config is not None)
    except configmod.ConfigError as e:
        more = len(e.problems) - 1
        print(f"meshnetd: {e}" + (f" (and {more} more: meshnetd --check-config lists them)"
                                  if more else ""), file=sys.stderr)
        return 1

    logs.setup(cfg.log_format, cfg.log_level)
    from meshnet.agent.agent import Agent, StartError

    async def run() -> int:
        return await Agent(cfg, ns.config, overrides).run()

    runner: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # non-Linux development machines keep the stock loop
        pass
    try:
        return runner(run())
    except StartError as e:
        print(f"meshnetd: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
