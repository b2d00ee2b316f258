#!/usr/bin/env python3
"""DNS benchmark: meshnet's DNS server against dnsmasq under dnsperf, in the same run.

    bench/dns.py [--services N] [--seed S] [--duration S] [--rounds R] [--clients C]
                 [--latency-qps Q] [--latency-duration S] [--no-edns] [--workers W] [--json]
    bench/dns.py --serve PORT [--ip IP] [--services N] [--seed S] [--workers W]   (internal)

Records: ``--services`` services (100) with 1-50 addresses each (seeded), all on one network.

- meshnet: the real :class:`meshnet.agent.dns_server.DnsServer` with a :class:`Resolver` built
  from those records, in a separate process on uvloop (``--serve``), host-side listener on
  127.0.0.53:PORT, no upstreams (nothing is ever forwarded).
- dnsmasq: ``dnsmasq --no-daemon`` on 127.0.0.54:PORT with the same records in an addn-hosts
  file, ``--no-resolv --no-hosts`` and no server, so it never forwards either.

dnsperf (Debian's package) sends the same query file (every service name, type A, in a seeded
order, EDNS0 unless ``--no-edns`` so that answers of up to 50 addresses are whole) to each in
turn: ``rounds`` rounds, alternating which goes first, ``duration`` seconds each at unbounded
rate (at most ``--outstanding`` queries in flight); qps is the median over rounds. dnsperf 2.10
prints no percentiles, so latency comes from ``rounds`` more runs per server at a fixed offered
load (``--latency-qps``, below both servers' capacity: by default a quarter of the lower
measured qps) with ``-v``, which prints each query's latency; p99 is the median over those runs
of each run's 99th percentile. The saturated runs' average latency is reported too, and each
server's CPU time per query (from /proc/PID/task/*/schedstat, kernel time included), which
depends far less than qps on what else the machine is running.

Rotation is checked with dnspython before and after the load: successive answers for a
multi-address service must come in different orders with the same set (``rotated``). dnsmasq
2.90 turns out to rotate the addresses of a hosts-file name per answer too
(``dnsmasq_rotated``), so both do the same work.
The answer sets of every name are checked against the records on both servers first.

Every process started here (server, dnsmasq, dnsperf) runs in its own process group and is
killed on exit, error or signal. Only loopback addresses are used. The last line of stdout is
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import random
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# This file is named dns.py: drop its own directory from the path, or it would shadow dnspython's
# ``dns`` package (for meshnet.dns too), then put the repository first.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rdatatype  # noqa: E402

from meshnet.dns import Resolver, TaskRecord  # noqa: E402

MESHNET_IP = "127.0.0.53"
DNSMASQ_IP = "127.0.0.54"
NETWORK = "bench"
MAX_ADDRS = 50
START_TIMEOUT_S = 20.0
KILL_GRACE_S = 3.0

_procs: list[subprocess.Popen[Any]] = []


# -- records --------------------------------------------------------------------------------------


def make_records(services: int, seed: int) -> list[TaskRecord]:
    """``services`` services with 1..50 distinct addresses each, deterministic in ``seed``."""
    rng = random.Random(seed)
    records: list[TaskRecord] = []
    base = int(ipaddress.IPv4Address("10.64.0.0"))
    for s in range(services):
        count = rng.randint(1, MAX_ADDRS)
        for slot in range(1, count + 1):
            ip = str(ipaddress.IPv4Address(base + s * 64 + slot))
            records.append(TaskRecord(f"svc{s}", slot, f"svc{s}.{slot}", NETWORK, ip))
    return records


def expected(records: list[TaskRecord]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in records:
        out.setdefault(r.service, set()).add(r.ip)
    return out


# -- the meshnet server process -------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    """Run the real DnsServer on uvloop until SIGTERM; print READY, then stats JSON at exit."""
    import uvloop

    from meshnet.agent.dns_server import DnsServer

    async def main() -> dict[str, int]:
        resolver = Resolver()
        resolver.set_records(make_records(args.services, args.seed), 1)
        server = DnsServer(resolver, [])  # no upstreams: nothing is ever forwarded
        sock_udp = sock_tcp = None
        if args.workers > 1:  # SO_REUSEPORT group: the kernel spreads clients over workers
            sock_udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock_tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            for s in (sock_udp, sock_tcp):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind((args.ip, args.serve))
        await server.add_listener((args.ip, args.serve), None, sock_udp, sock_tcp)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print("READY", flush=True)
        await stop.wait()
        stats = server.stats()
        await server.close()
        return stats

    if args.workers > 1:
        children = []
        for _ in range(args.workers - 1):
            pid = os.fork()
            if pid == 0:
                stats = uvloop.run(main())
                os._exit(0)
            children.append(pid)
        try:
            stats = uvloop.run(main())
        finally:
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            for pid in children:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
    else:
        stats = uvloop.run(main())
    print(json.dumps(stats), flush=True)
    return 0


# -- process handling -----------------------------------------------------------------------------


def spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
    proc = subprocess.Popen(cmd, start_new_session=True, **kw)
    _procs.append(proc)
    return proc


def kill(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM the process group, then SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(KILL_GRACE_S)
    else:  # the leader is gone; make sure nothing of its group is left
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ValueError):
        _procs.remove(proc)


def kill_all() -> None:
    for proc in list(_procs):
        kill(proc)


def free_port(ip: str) -> int:
    """A port free for both UDP and TCP on ``ip`` (bounded attempts)."""
    for _ in range(64):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((ip, 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((ip, port))
                except OSError:
                    continue
            return port
    raise RuntimeError(f"no free port on {ip}")


def query(ip: str, port: int, name: str, edns: bool = True, timeout: float = 1.0) -> list[str]:
    q = dns.message.make_query(name, "A", use_edns=0 if edns else None)
    r = dns.query.udp(q, ip, timeout=timeout, port=port)
    return [rd.address for rrset in r.answer if rrset.rdtype == dns.rdatatype.A for rd in rrset]


def wait_answering(ip: str, port: int, name: str, proc: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}")
        with contextlib.suppress(Exception):
            if query(ip, port, name, timeout=0.2):
                return
        time.sleep(0.05)
    raise RuntimeError(f"{ip}:{port} did not answer within {START_TIMEOUT_S}s")


def start_meshnet(args: argparse.Namespace, port: int) -> subprocess.Popen[Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", str(port), "--ip",
           MESHNET_IP, "--services", str(args.services), "--seed", str(args.seed),
           "--workers", str(args.workers)]
    proc = spawn(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT_S)
    if not ready or proc.stdout.readline().strip() != "READY":
        raise RuntimeError("meshnet DNS server did not start")
    wait_answering(MESHNET_IP, port, "svc0", proc)
    return proc


def start_dnsmasq(workdir: Path, port: int) -> subprocess.Popen[Any]:
    cmd = ["dnsmasq", "--no-daemon", f"--port={port}", f"--listen-address={DNSMASQ_IP}",
           "--bind-interfaces", "--no-resolv", "--no-hosts", f"--addn-hosts={workdir / 'hosts'}",
           "--cache-size=10000", "--conf-file=/dev/null", "--log-facility=-"]
    proc = spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_answering(DNSMASQ_IP, port, "svc0", proc)
    return proc


def stop_meshnet(proc: subprocess.Popen[Any]) -> dict[str, int]:
    """Stop the server gracefully and read the stats it prints on the way out."""
    stats: dict[str, int] = {}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=KILL_GRACE_S)
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                stats = json.loads(line)
    except subprocess.TimeoutExpired:
        pass
    kill(proc)
    return stats


def cpu_ns(pid: int) -> int:
    """CPU time (ns) used so far by ``pid``, its threads and its direct children (workers)."""
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    total = 0
    for p in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    total += int((task / "schedstat").read_text().split()[0])
    return total


# -- dnsperf --------------------------------------------------------------------------------------

_NUM = r"([0-9.]+)"


def dnsperf(
    args: argparse.Namespace, ip: str, port: int, qfile: Path, duration: float,
    max_qps: int | None = None, verbose_file: Path | None = None, server_pid: int | None = None,
) -> dict[str, float]:
    cmd = ["dnsperf", "-s", ip, "-p", str(port), "-d", str(qfile), "-c", str(args.clients),
           "-l", str(duration), "-t", "2", "-q", str(args.outstanding)]
    if args.edns:
        cmd.append("-e")
    if max_qps:
        cmd += ["-Q", str(max_qps)]
    if verbose_file is not None:
        cmd.append("-v")
    out_f = open(verbose_file, "w") if verbose_file is not None else None  # noqa: SIM115
    cpu0 = cpu_ns(server_pid) if server_pid is not None else 0
    try:
        proc = spawn(cmd, stdout=out_f or subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=duration + 15)
        finally:
            kill(proc)
    finally:
        if out_f is not None:
            out_f.close()
    cpu = cpu_ns(server_pid) - cpu0 if server_pid is not None else 0
    text = Path(verbose_file).read_text() if verbose_file is not None else stdout
    if proc.returncode != 0:
        raise RuntimeError(f"dnsperf failed ({proc.returncode}): {stderr.strip()[-500:]}")

    def grab(pattern: str) -> re.Match[str]:
        m = re.search(pattern, text)
        if m is None:
            raise RuntimeError(f"dnsperf output lacks {pattern!r}:\n{text[-2000:]}")
        return m

    lat = grab(rf"Average Latency \(s\):\s+{_NUM} \(min {_NUM}, max {_NUM}\)")
    result = {
        "sent": float(grab(r"Queries sent:\s+(\d+)").group(1)),
        "completed": float(grab(r"Queries completed:\s+(\d+)").group(1)),
        "lost": float(grab(r"Queries lost:\s+(\d+)").group(1)),
        "qps": float(grab(rf"Queries per second:\s+{_NUM}").group(1)),
        "avg_ms": float(lat.group(1)) * 1000,
        "max_ms": float(lat.group(3)) * 1000,
    }
    if server_pid is not None and result["completed"]:
        result["cpu_us_per_query"] = cpu / 1000 / result["completed"]
    if verbose_file is not None:
        lats = sorted(float(m.group(1)) for m in re.finditer(r"^> \S+ .* ([0-9.]+)$", text, re.M))
        if not lats:
            raise RuntimeError("dnsperf -v printed no per-query latencies")
        result["p99_ms"] = lats[min(len(lats) - 1, math.ceil(0.99 * len(lats)) - 1)] * 1000
        result["p50_ms"] = lats[min(len(lats) - 1, math.ceil(0.50 * len(lats)) - 1)] * 1000
        result["samples"] = float(len(lats))
    return result


# -- checks ---------------------------------------------------------------------------------------


def check_answers(ip: str, port: int, want: dict[str, set[str]], edns: bool) -> bool:
    """Every service's answer (whole, with EDNS) holds exactly its addresses."""
    if not edns:
        return True  # 512-byte answers are truncated by design; sizes differ by server
    return all(set(query(ip, port, name)) == ips for name, ips in want.items())


def check_rotation(ip: str, port: int, want: dict[str, set[str]], tries: int = 4) -> bool:
    """Successive answers for multi-address services come in different orders, same set."""
    names = sorted((n for n, ips in want.items() if len(ips) >= 3), key=lambda n: len(want[n]))
    picks = [names[0], names[len(names) // 2], names[-1]] if names else []
    for name in picks:
        orders = []
        for _ in range(tries):
            got = query(ip, port, name)
            if set(got) != want[name] and len(got) == len(want[name]):
                return False
            orders.append(tuple(got))
        if len(set(orders)) < 2:
            return False
    return bool(picks)


# -- main -----------------------------------------------------------------------------------------


def propagation() -> dict[str, Any]:
    """The 5-agent write-to-resolve measurement (bench/dns_propagation.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from dns_propagation import measure
    finally:
        sys.path.pop(0)
    return measure()


def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("dnsperf") is None or shutil.which("dnsmasq") is None:
        raise RuntimeError("dnsperf and dnsmasq are needed (apt-get install dnsperf dnsmasq)")
    records = make_records(args.services, args.seed)
    want = expected(records)
    workdir = Path(tempfile.mkdtemp(prefix="meshnet-bench-dns-"))
    workdir.chmod(0o755)  # dnsmasq reads its hosts file after dropping privileges
    try:
        (workdir / "hosts").write_text("".join(f"{r.ip} {r.service}\n" for r in records))
        names = sorted(want)
        random.Random(args.seed).shuffle(names)
        qfile = workdir / "queries"
        qfile.write_text("".join(f"{n} A\n" for n in names))
        for f in (workdir / "hosts", qfile):
            f.chmod(0o644)

        m_port, d_port = free_port(MESHNET_IP), free_port(DNSMASQ_IP)
        meshnet = start_meshnet(args, m_port)
        dnsmasq = start_dnsmasq(workdir, d_port)
        targets = {"meshnet": (MESHNET_IP, m_port), "dnsmasq": (DNSMASQ_IP, d_port)}
        pids = {"meshnet": meshnet.pid, "dnsmasq": dnsmasq.pid}

        correct = {k: check_answers(ip, p, want, args.edns) for k, (ip, p) in targets.items()}
        rotated_before = check_rotation(MESHNET_IP, m_port, want)
        dnsmasq_rotated = check_rotation(DNSMASQ_IP, d_port, want)

        runs: dict[str, list[dict[str, float]]] = {"meshnet": [], "dnsmasq": []}
        order = ["meshnet", "dnsmasq"]
        for _ in range(args.rounds):
            for name in order:
                ip, port = targets[name]
                runs[name].append(
                    dnsperf(args, ip, port, qfile, args.duration, server_pid=pids[name])
                )
            order.reverse()
        rotated_after = check_rotation(MESHNET_IP, m_port, want)

        latency_qps = args.latency_qps or max(1000, round(0.25 * min(
            statistics.median(r["qps"] for r in runs[k]) for k in runs)))
        latency: dict[str, list[dict[str, float]]] = {"meshnet": [], "dnsmasq": []}
        for i in range(args.rounds):
            for name in order:
                ip, port = targets[name]
                latency[name].append(dnsperf(
                    args, ip, port, qfile, args.latency_duration, max_qps=latency_qps,
                    verbose_file=workdir / f"{name}.{i}.latency", server_pid=pids[name]))
            order.reverse()
        server_stats = stop_meshnet(meshnet)
        kill(dnsmasq)
    finally:
        kill_all()
        shutil.rmtree(workdir, ignore_errors=True)

    def med(name: str, key: str, source: dict[str, list[dict[str, float]]] = runs) -> float:
        return statistics.median(r[key] for r in source[name])

    m_qps, d_qps = med("meshnet", "qps"), med("dnsmasq", "qps")
    sent = {k: sum(r["sent"] for r in v) for k, v in runs.items()}
    lost = {k: sum(r["lost"] for r in v) for k, v in runs.items()}
    return {
        "bench": "dns",
        "meshnet_qps": round(m_qps),
        "dnsmasq_qps": round(d_qps),
        "ratio": round(m_qps / d_qps, 3) if d_qps else None,
        "meshnet_p99_ms": round(med("meshnet", "p99_ms", latency), 3),
        "dnsmasq_p99_ms": round(med("dnsmasq", "p99_ms", latency), 3),
        "meshnet_p50_ms": round(med("meshnet", "p50_ms", latency), 3),
        "dnsmasq_p50_ms": round(med("dnsmasq", "p50_ms", latency), 3),
        "meshnet_p99_ms_runs": [round(r["p99_ms"], 3) for r in latency["meshnet"]],
        "dnsmasq_p99_ms_runs": [round(r["p99_ms"], 3) for r in latency["dnsmasq"]],
        "meshnet_avg_ms_saturated": round(med("meshnet", "avg_ms"), 3),
        "dnsmasq_avg_ms_saturated": round(med("dnsmasq", "avg_ms"), 3),
        # Server CPU time per answered query (the server's own threads, kernel time included):
        # unlike qps this hardly depends on what else runs on the machine.
        "meshnet_cpu_us_per_query": round(med("meshnet", "cpu_us_per_query"), 2),
        "dnsmasq_cpu_us_per_query": round(med("dnsmasq", "cpu_us_per_query"), 2),
        "meshnet_cpu_us_per_query_at_fixed_load": round(
            med("meshnet", "cpu_us_per_query", latency), 2),
        "dnsmasq_cpu_us_per_query_at_fixed_load": round(
            med("dnsmasq", "cpu_us_per_query", latency), 2),
        "meshnet_lost": lost["meshnet"] / sent["meshnet"] if sent["meshnet"] else None,
        "dnsmasq_lost": lost["dnsmasq"] / sent["dnsmasq"] if sent["dnsmasq"] else None,
        "meshnet_qps_runs": [round(r["qps"]) for r in runs["meshnet"]],
        "dnsmasq_qps_runs": [round(r["qps"]) for r in runs["dnsmasq"]],
        "rotated": rotated_before and rotated_after,
        **propagation(),
        "dnsmasq_rotated": dnsmasq_rotated,
        "answers_correct": correct,
        "meshnet_cache_misses": server_stats.get("resolver_misses"),
        "meshnet_answered": server_stats.get("answered"),
        "settings": {
            "services": args.services,
            "addresses_per_service": [1, MAX_ADDRS],
            "records": len(records),
            "seed": args.seed,
            "clients": args.clients,
            "outstanding": args.outstanding,
            "duration_s": args.duration,
            "rounds": args.rounds,
            "qps_statistic": "median over rounds, alternating order",
            "edns": args.edns,
            "workers": args.workers,
            "p99_at_offered_qps": latency_qps,
            "p99_duration_s": args.latency_duration,
            "p99_statistic": "median over rounds of each run's p99, alternating order",
            "p99_source": "dnsperf -v per-query latencies at a fixed offered load (-Q)",
            "cpus": os.cpu_count(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
            "dnsperf": "dnsperf -s IP -p PORT -d QFILE -c C -l S -t 2 -q Q"
                       + (" -e" if args.edns else ""),
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ap.add_argument("--services", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per throughput run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--outstanding", type=int, default=100,
                    help="dnsperf -q; far above 100 the loopback socket buffers overflow")
    ap.add_argument("--latency-qps", type=int, default=0,
                    help="offered load of the p99 runs; 0: a quarter of the lower measured qps")
    ap.add_argument("--latency-duration", type=float, default=3.0)
    ap.add_argument("--no-edns", dest="edns", action="store_false")
    ap.add_argument("--workers", type=int, default=1,
                    help="meshnet server processes sharing the port (SO_REUSEPORT); dnsmasq is 1")
    ap.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--ip", default=MESHNET_IP, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve is not None:
        return serve(args)

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through run()'s finally: kills everything

    signal.signal(signal.SIGTERM, on_signal)
    try:
        result = run(args)
    finally:
        kill_all()
    if not args.json:
        for k, v in result.items():
            print(f"{k}: {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
