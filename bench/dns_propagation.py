"""Propagation: from a write on one agent to the name resolving on all the others.

Five real meshnetd processes on 127.0.0.x with the default (`lan`) gossip timings, each with a
host-side DNS listener. For each of `writes` rounds, a fresh endpoint is registered on one
agent (round-robin) and the other four are polled over DNS every 5 ms until the name
resolves on all of them. Returns p50/p99/max seconds. Only loopback is used; every agent is
killed at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# bench/dns.py would shadow dnspython when this runs as a script from bench/.
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rdatatype  # noqa: E402

BIN = Path(sys.executable).parent


def _free_port(ip: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
        t.bind((ip, 0))
        return int(t.getsockname()[1])


def _resolves(ip: str, port: int, name: str, want: str) -> bool:
    q = dns.message.make_query(name, dns.rdatatype.A)
    try:
        r = dns.query.udp(q, ip, port=port, timeout=0.2)
    except (dns.exception.Timeout, OSError):
        return False
    return any(rd.address == want for rr in r.answer for rd in rr)


def _identity(workdir: Path) -> Callable[[str], list[str]]:
    """A CA in WORKDIR and, per agent name, meshnetd flags naming a fresh certificate (every
    record the bench writes is then signed and checked, as in production)."""
    from meshnet.crypto import certs
    now = int(time.time())
    ca_key, ca = certs.make_ca("bench-ca", now - 60, 1)
    certs.save_ca(workdir / "ca", ca_key, ca)

    def flags(name: str) -> list[str]:
        keys = certs.generate_node_keys()
        cert = certs.sign_node(ca_key, ca, name, ["admin"], {}, keys.sign_pub, keys.dp_pub,
                               now - 60, 1)
        certs.save_node(workdir / name, keys, cert)
        return ["--ca-cert", str(workdir / "ca" / "ca.crt"), "--node-cert",
                str(workdir / name / "node.crt"), "--node-key", str(workdir / name / "node.key")]

    return flags


def measure(writes: int = 30, agents: int = 5, profile: str = "lan") -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="meshnet-bench-prop-"))
    key = workdir / "cluster.key"
    key.write_text(subprocess.run([str(BIN / "meshctl"), "keys", "generate"],
                                  capture_output=True, text=True, check=True).stdout)
    procs: list[subprocess.Popen[bytes]] = []
    nodes = []
    identity = _identity(workdir)
    try:
        for i in range(agents):
            ip = f"127.0.0.{120 + i}"
            port, dport = _free_port(ip), _free_port(ip)
            sock = str(workdir / f"n{i}.sock")
            args = [str(BIN / "meshnetd"), "--name", f"p{i}", "--bind", f"{ip}:{port}",
                    "--state-dir", str(workdir / f"s{i}"), "--socket", sock,
                    "--cluster-key-file", str(key), "--profile", profile, "--datapath", "none",
                    "--dns-upstream", "none", "--dns-listen", f"{ip}:{dport}",
                    "--log-level", "warning"]
            args += identity(f"p{i}")
            if i:
                args += ["--join", f"{nodes[0]['ip']}:{nodes[0]['port']}"]
            log = open(workdir / f"n{i}.log", "wb")  # noqa: SIM115 (lives with the process)
            procs.append(subprocess.Popen(args, stdout=log, stderr=log, start_new_session=True))
            nodes.append({"ip": ip, "port": port, "dns": dport, "sock": sock})

        def ctl(n: dict[str, Any], *a: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([str(BIN / "meshctl"), "--socket", n["sock"], *a],
                                  capture_output=True, text=True)

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r = ctl(nodes[0], "status")
            if r.returncode == 0 and f"{agents} alive" in r.stdout:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("propagation bench: cluster did not form")
        while ctl(nodes[0], "network", "create", "prop", "--subnet", "10.77.0.0/16").returncode:
            time.sleep(0.2)
        time.sleep(2)  # let the network definition itself reach everyone first
        samples = []
        for w in range(writes):
            writer = nodes[w % agents]
            others = [n for n in nodes if n is not writer]
            name, ip = f"svc{w}", f"10.77.{w // 250}.{2 + w % 250}"
            t0 = time.monotonic()
            r = ctl(writer, "endpoint", "add", name, ip, "--network", "prop")
            if r.returncode:
                raise RuntimeError(f"propagation bench: {r.stderr.strip()}")
            pending = list(others)
            while pending and time.monotonic() - t0 < 30:
                pending = [n for n in pending if not _resolves(n["ip"], n["dns"], name, ip)]
                if pending:
                    time.sleep(0.005)
            samples.append(time.monotonic() - t0)
        samples.sort()
        return {
            "propagation_p50_s": round(statistics.median(samples), 3),
            "propagation_p99_s": round(samples[min(len(samples) - 1,
                                                   int(0.99 * len(samples)))], 3),
            "propagation_max_s": round(samples[-1], 3),
            "propagation_writes": writes,
            "propagation_agents": agents,
            "propagation_profile": profile,
        }
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        if not os.environ.get("MESHNET_BENCH_KEEP"):
            subprocess.run(["rm", "-rf", str(workdir)], check=False)


if __name__ == "__main__":
    import json

    print(json.dumps(measure()))  # `make bench` passes --json; one JSON line either way
