"""Overlay throughput and latency on a 2-host lab: underlay vs the plain VXLAN overlay.

    python bench/overlay.py [--seconds 10] [--json]

iperf3 (1 TCP stream) and ping, host to host over the underlay and sandbox to sandbox over a
plain overlay network, in the same run, so `plain_ratio` compares like with like. The last
line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshnet.lab import Lab

MESHCTL = str(Path(sys.executable).parent / "meshctl")


def ctl(lab: Lab, host: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return lab.ctl(host, list(args), capture_output=True, timeout=timeout)


def wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise SystemExit(f"bench: timed out waiting for {what}")


def iperf_gbps(report: str) -> float:
    doc = json.loads(report[report.index("{"):])
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9


def rtt_us(ping_output: str) -> float:
    m = re.search(r"= [\d.]+/([\d.]+)/", ping_output)
    if not m:
        raise SystemExit(f"bench: no ping summary in {ping_output!r}")
    return float(m.group(1)) * 1000


def endpoint_ip(lab: Lab, host: str, network: str, name: str) -> str | None:
    r = ctl(lab, host, "--json", "network", "inspect", network)
    if r.returncode != 0:
        return None
    for ep in json.loads(r.stdout)["endpoints"]:
        if ep["name"] == name:
            return str(ep["ip"])
    return None


def measure(seconds: int) -> dict[str, Any]:
    lab = Lab(prefix=f"mnb{os.getpid() % 10000}")
    procs: list[subprocess.Popen[str]] = []
    try:
        lab.up(2, profile="lan-fast")
        ip2 = lab.underlay_ip("h2")
        # underlay: host to host
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", lab.host_ns("h2"), "iperf3", "-s", "-1", "-B", ip2],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)
        r = lab.exec("h1", ["iperf3", "-c", ip2, "-t", str(seconds), "-J"],
                     capture_output=True, timeout=seconds + 30)
        underlay = iperf_gbps(r.stdout)
        ping_u = lab.exec("h1", ["ping", "-c", "20", "-i", "0.05", "-q", ip2],
                          capture_output=True).stdout
        # plain overlay: sandbox to sandbox
        wait(lambda: ctl(lab, "h1", "network", "create", "bench").returncode == 0, 20,
             "network create")
        wait(lambda: ctl(lab, "h2", "network", "inspect", "bench").returncode == 0, 20,
             "network on h2")
        procs.append(subprocess.Popen(
            [MESHCTL, "--socket", str(lab.socket_path("h2")), "run", "--network", "bench",
             "--name", "srv", "--", "iperf3", "-s"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        srv = wait(lambda: endpoint_ip(lab, "h1", "bench", "srv"), 30, "iperf3 server sandbox")
        time.sleep(1)
        ping_o = ctl(lab, "h1", "run", "--network", "bench", "--", "sh", "-c",
                     f"ping -c 3 -W 2 -q {srv} >/dev/null; ping -c 20 -i 0.05 -q {srv}").stdout
        r = ctl(lab, "h1", "run", "--network", "bench", "--", "iperf3", "-c", srv, "-t",
                str(seconds), "-J", timeout=seconds + 60)
        plain = iperf_gbps(r.stdout)
        return {
            "underlay_gbps": round(underlay, 2),
            "plain_gbps": round(plain, 2),
            "plain_ratio": round(plain / underlay, 3),
            "rtt_underlay_us": round(rtt_us(ping_u), 1),
            "rtt_plain_us": round(rtt_us(ping_o), 1),
            "seconds": seconds,
            "streams": 1,
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        lab.down()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/overlay.py needs root (network namespaces)", file=sys.stderr)
        return 1
    result = measure(args.seconds)
    if not args.json:
        for k, v in result.items():
            print(f"{k}: {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
