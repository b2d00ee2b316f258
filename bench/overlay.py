"""Overlay throughput and latency on a 2-host lab: underlay vs the plain VXLAN overlay vs an
`--encrypted` overlay (the agents' user-space datapath).

    python bench/overlay.py [--seconds 5] [--rounds 3] [--underlay-mtu 1500] [--json]

iperf3 (1 TCP stream) and ping, host to host over the underlay and sandbox to sandbox over a
plain and over an encrypted overlay network, in the same run, so `plain_ratio` and
`encrypted_ratio` (over `plain_gbps`) compare like with like. The three iperf3 runs alternate
for ROUNDS rounds and every key is the median over the rounds (the ratios: the median of the
per-round ratios): on a shared 2-vCPU machine one 10 s run of the underlay alone varies from
~11 to ~17 Gbit/s. IP fragments on the underlay are
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
import statistics
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


def rtt_p50_us(ping_output: str) -> float:
    """The median of the per-echo times (the average hides how often a slow echo happens)."""
    times = [float(t) * 1000 for t in re.findall(r"time=([\d.]+) ms", ping_output)]
    if not times:
        raise SystemExit(f"bench: no echo times in {ping_output!r}")
    return statistics.median(times)


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


def measure(seconds: int, rounds: int = 3, underlay_mtu: int = 1500) -> dict[str, Any]:
    lab = Lab(prefix=f"mnb{os.getpid() % 10000}")
    procs: list[subprocess.Popen[str]] = []
    try:
        lab.up(2, profile="lan-fast", underlay_mtu=underlay_mtu)
        ip2 = lab.underlay_ip("h2")
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", lab.host_ns("h2"), "iperf3", "-s", "-B", ip2],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        ping_u = lab.exec("h1", ["ping", "-c", "20", "-i", "0.05", "-q", ip2],
                          capture_output=True).stdout
        # a plain and an encrypted network, an iperf3 server sandbox on h2 in each
        servers = {}
        for net, flags in (("bench", ()), ("benchsec", ("--encrypted",))):
            wait(lambda net=net, flags=flags: ctl(lab, "h1", "network", "create", net, *flags)
                 .returncode == 0, 20, f"network create {net}")
            wait(lambda net=net: ctl(lab, "h2", "network", "inspect", net).returncode == 0, 20,
                 f"network {net} on h2")
            procs.append(subprocess.Popen(
                [MESHCTL, "--socket", str(lab.socket_path("h2")), "run", "--network", net,
                 "--name", f"srv-{net}", "--", "iperf3", "-s"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            servers[net] = wait(lambda net=net: endpoint_ip(lab, "h1", net, f"srv-{net}"), 30,
                                f"iperf3 server sandbox on {net}")
        srv, srv_e = servers["bench"], servers["benchsec"]
        time.sleep(1)
        ping_o = ctl(lab, "h1", "run", "--network", "bench", "--", "sh", "-c",
                     f"ping -c 3 -W 2 -q {srv} >/dev/null; ping -c 20 -i 0.05 {srv}").stdout
        frag_dump = tcpdump(lab, ["-c", "100000", "ip[6:2] & 0x3fff != 0"])
        ping_e = ctl(lab, "h1", "run", "--network", "benchsec", "--", "sh", "-c",
                     f"ping -c 3 -W 2 -q {srv_e} >/dev/null; ping -c 20 -i 0.05 {srv_e}"
                     ).stdout

        def overlay_run(net: str, target: str) -> float:
            r = ctl(lab, "h1", "run", "--network", net, "--", "iperf3", "-c", target, "-t",
                    str(seconds), "-J", timeout=seconds + 60)
            return iperf_gbps(r.stdout)

        runs: dict[str, list[float]] = {"underlay": [], "plain": [], "encrypted": []}
        for _ in range(rounds):
            r = lab.exec("h1", ["iperf3", "-c", ip2, "-t", str(seconds), "-J"],
                         capture_output=True, timeout=seconds + 30)
            runs["underlay"].append(iperf_gbps(r.stdout))
            runs["plain"].append(overlay_run("bench", srv))
            runs["encrypted"].append(overlay_run("benchsec", srv_e))
        underlay, plain, encrypted = (statistics.median(runs[k]) for k in runs)
        rounds_ = list(zip(runs["underlay"], runs["plain"], runs["encrypted"], strict=True))
        plain_ratio = statistics.median(p / u for u, p, _ in rounds_)
        enc_ratio = statistics.median(e / p for _, p, e in rounds_)
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
            "plain_ratio": round(plain_ratio, 3),
            "rtt_underlay_us": round(rtt_us(ping_u), 1),
            "rtt_plain_us": round(rtt_us(ping_o), 1),
            "encrypted_gbps": round(encrypted, 2),
            "encrypted_ratio": round(enc_ratio, 3),
            "rtt_encrypted_us": round(rtt_us(ping_e), 1),
            "rtt_encrypted_min_us": round(rtt_min_us(ping_e), 1),
            "rtt_plain_p50_us": round(rtt_p50_us(ping_o), 1),
            "rtt_encrypted_p50_us": round(rtt_p50_us(ping_e), 1),
            "encrypted_wire_gbps": round(encrypted_wire, 2),
            "max_underlay_datagram": max_datagram,
            "underlay_mtu": int(status["underlay_mtu"]),
            "frag_count": frag_count,
            "encrypted_gso": bool(status["gso"]),
            "encrypted_gro": bool(status["gro"]),
            "seconds": seconds,
            "rounds": rounds,
            "runs_gbps": {k: [round(x, 2) for x in v] for k, v in runs.items()},
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
        # ~10 MB, and lab down removes only what the lab made (then the run dir, if empty)
        (lab.run_dir / "wire.pcap").unlink(missing_ok=True)
        lab.down()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=5, help="per iperf3 run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating underlay/plain/encrypted")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--underlay-mtu", type=int, default=1500,
                    help="MTU of the lab's underlay (9000: a jumbo-frame network)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/overlay.py needs root (network namespaces)", file=sys.stderr)
        return 1
    result = measure(args.seconds, args.rounds, args.underlay_mtu)
    if not args.json:
        for k, v in result.items():
            print(f"{k}: {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
