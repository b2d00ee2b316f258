"""Overlay throughput and latency on a 2-host lab: underlay vs the plain VXLAN overlay vs an
`--encrypted` overlay (the agents' user-space datapath).

    python bench/overlay.py [--seconds 10] [--json]

iperf3 (1 TCP stream) and ping, host to host over the underlay and sandbox to sandbox over a
plain and over an encrypted overlay network, in the same run, so `plain_ratio` and
`encrypted_ratio` (over `plain_gbps`) compare like with like. IP fragments on the underlay are
counted by tcpdump ('ip[6:2] & 0x3fff != 0') during the encrypted runs. Then a short encrypted
run with the hosts' eth0 at gso_max_segs 1, so the kernel cuts the datapath's UDP GSO batches
into wire datagrams at the host as a real NIC would (the lab's veths would otherwise carry them
whole), captured on the underlay switch: `max_underlay_datagram` is the largest IP datagram of
the datapath's port seen there. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshnet.lab import Lab
from meshnet.platform import netns

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


def rtt_min_us(ping_output: str) -> float:
    m = re.search(r"= ([\d.]+)/", ping_output)
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


def tcpdump(lab: Lab, args: list[str]) -> subprocess.Popen[bytes]:
    """tcpdump on the underlay switch; returns once it listens."""
    p = subprocess.Popen(netns.exec_argv(lab.underlay_ns, ["tcpdump", "-n", "-U", "-i", "br0",
                                                           *args]),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert p.stderr is not None
    for _ in range(3):  # "verbose output suppressed ..." may come first
        line = p.stderr.readline()
        if b"listening" in line:
            return p
    p.kill()
    p.wait()
    raise SystemExit(f"bench: tcpdump did not start: {line!r}")


def stop_tcpdump(p: subprocess.Popen[bytes]) -> str:
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=10)
    return err.decode(errors="replace")


def captured(err: str) -> int:
    m = re.search(r"(\d+) packets? captured", err)
    return int(m.group(1)) if m else -1


def max_ip_len(pcap: Path) -> int:
    data = pcap.read_bytes()
    best, off = 0, 24
    while off + 16 <= len(data):
        incl = struct.unpack_from("<IIII", data, off)[2]
        frame = data[off + 16: off + 16 + incl]
        if len(frame) >= 18 and frame[12:14] == b"\x08\x00":
            best = max(best, struct.unpack_from(">H", frame, 16)[0])
        off += 16 + incl
    return best


def measure(seconds: int, underlay_mtu: int = 1500) -> dict[str, Any]:
    lab = Lab(prefix=f"mnb{os.getpid() % 10000}")
    procs: list[subprocess.Popen[str]] = []
    try:
        lab.up(2, profile="lan-fast", underlay_mtu=underlay_mtu)
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

        # encrypted overlay: sandbox to sandbox, same hosts, same run
        wait(lambda: ctl(lab, "h1", "network", "create", "benchsec", "--encrypted").returncode
             == 0, 20, "encrypted network create")
        procs.append(subprocess.Popen(
            [MESHCTL, "--socket", str(lab.socket_path("h2")), "run", "--network", "benchsec",
             "--name", "srvsec", "--", "iperf3", "-s"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        srv_e = wait(lambda: endpoint_ip(lab, "h1", "benchsec", "srvsec"), 30,
                     "iperf3 server sandbox (encrypted)")
        time.sleep(1)
        frag_dump = tcpdump(lab, ["-c", "100000", "ip[6:2] & 0x3fff != 0"])
        ping_e = ctl(lab, "h1", "run", "--network", "benchsec", "--", "sh", "-c",
                     f"ping -c 3 -W 2 -q {srv_e} >/dev/null; ping -c 20 -i 0.05 -q {srv_e}"
                     ).stdout
        r = ctl(lab, "h1", "run", "--network", "benchsec", "--", "iperf3", "-c", srv_e, "-t",
                str(seconds), "-J", timeout=seconds + 60)
        encrypted = iperf_gbps(r.stdout)
        # wire sizes: the hosts' NICs cut GSO batches, as real ones do
        for h in ("h1", "h2"):
            netns.ip("link", "set", "dev", "eth0", "gso_max_segs", "1", ns=lab.host_ns(h))
        pcap = lab.run_dir / "wire.pcap"
        size_dump = tcpdump(lab, ["-s", "64", "-w", str(pcap), "udp", "port", "4790"])
        r = ctl(lab, "h1", "run", "--network", "benchsec", "--", "iperf3", "-c", srv_e, "-t",
                "3", "-J", timeout=60)
        encrypted_wire = iperf_gbps(r.stdout)
        stop_tcpdump(size_dump)
        frag_count = captured(stop_tcpdump(frag_dump))
        max_datagram = max_ip_len(pcap)
        status = json.loads(ctl(lab, "h1", "--json", "status").stdout)["datapath"]["encrypted"]
        return {
            "underlay_gbps": round(underlay, 2),
            "plain_gbps": round(plain, 2),
            "plain_ratio": round(plain / underlay, 3),
            "rtt_underlay_us": round(rtt_us(ping_u), 1),
            "rtt_plain_us": round(rtt_us(ping_o), 1),
            "encrypted_gbps": round(encrypted, 2),
            "encrypted_ratio": round(encrypted / plain, 3),
            "rtt_encrypted_us": round(rtt_us(ping_e), 1),
            "rtt_encrypted_min_us": round(rtt_min_us(ping_e), 1),
            "encrypted_wire_gbps": round(encrypted_wire, 2),
            "max_underlay_datagram": max_datagram,
            "underlay_mtu": int(status["underlay_mtu"]),
            "frag_count": frag_count,
            "encrypted_gso": bool(status["gso"]),
            "encrypted_gro": bool(status["gro"]),
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
    ap.add_argument("--underlay-mtu", type=int, default=1500,
                    help="MTU of the lab's underlay (9000: a jumbo-frame network)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/overlay.py needs root (network namespaces)", file=sys.stderr)
        return 1
    result = measure(args.seconds, args.underlay_mtu)
    if not args.json:
        for k, v in result.items():
            print(f"{k}: {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
