"""Encrypted datapath (meshnet/agent/encdp.py) vs the kernel VXLAN plain overlay, same run.

    python bench/encdp_micro.py [--seconds 10] [--repeat 1] [--profile OUT.txt] [--json]

A 2-host lab (no agents). Host i has two networks: a plain one (OverlayKernel: bridge + kernel
VXLAN, static FDB/neighbours) and an encrypted one (a bridge + EncryptedDatapath with static
SAs). Each host's datapath runs in its own process (`--worker`, as the agent would run it: one
process per host). One sandbox per host per network; iperf3 (1 TCP stream) and ping, sandbox to
sandbox, over each. Then a short encrypted run with the hosts' eth0 set to gso_max_segs 1, so
the kernel cuts our UDP GSO batches into wire datagrams at the host NIC, captured on the
underlay switch: the largest IP datagram and the IP fragment count. Last, `capacity`: what one
core seals and opens through the datapath's own code with no kernel in the way (see capacity()).
The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshnet.agent.encdp import (
    EncryptedDatapath,
    InboundSA,
    OutboundSA,
    _Net,
    _RxBuf,
    _TxBuf,
    encrypted_overlay_mtu,
    frame_gso_max,
)
from meshnet.lab import Lab
from meshnet.platform import netns
from meshnet.platform.links import OverlayKernel
from meshnet.platform.sandbox import create_sandbox, delete_sandbox, sandbox_command
from meshnet.platform.tap import VNET_HDR_LEN

VNI_PLAIN = 0x2001
VNI_ENC = 0x2002
BR_PLAIN = f"mnbr-{VNI_PLAIN:06x}"
BR_ENC = f"mnbr-{VNI_ENC:06x}"
UNDERLAY_MTU = 1500  # default; --underlay-mtu 9000 models a jumbo-frame network
PORT = 4790


def mac(net: int, i: int) -> str:
    return f"02:00:00:{net:02x}:00:{i:02x}"


def ip(net: int, i: int) -> str:
    return f"10.{net}.0.{i}"


# ---------------------------------------------------------------- worker (one per host)


async def worker(cfg: dict[str, Any]) -> None:
    if cfg.get("nice"):
        os.setpriority(os.PRIO_PROCESS, 0, int(cfg["nice"]))
    dp = EncryptedDatapath(
        cfg["local_ip"],
        PORT,
        netns=cfg["netns"],
        busy_poll_us=int(os.environ.get("ENCDP_BUSY_POLL_US", "0")),
    )
    trace: list[Any] = []
    if os.environ.get("ENCDP_TRACE"):  # debugging aid: per-hop timestamps
        for meth in ("_tx_frame", "_rx_record", "_tap_write", "_send"):

            def wrap(f: Any, name: str = meth) -> Any:
                def g(*a: Any) -> Any:
                    trace.append((time.perf_counter(), cfg["local_ip"], name + "-in"))
                    r = f(*a)
                    trace.append((time.perf_counter(), cfg["local_ip"], name + "-out"))
                    return r

                return g

            setattr(dp, meth, wrap(getattr(dp, meth)))
    await dp.start()
    try:
        dp.add_network(cfg["vni"], cfg["bridge"], cfg["mtu"])
        dp.set_macs(cfg["vni"], cfg["macs"])
        dp.set_arp(cfg["vni"], cfg["arp"])
        for peer, (spi, key) in cfg["out"].items():
            dp.set_outbound(peer, OutboundSA(spi, bytes.fromhex(key)))
        for peer, (spi, key) in cfg["in"].items():
            dp.set_inbound(peer, {spi: InboundSA(spi, bytes.fromhex(key))})
        print(json.dumps({"ready": True, "gso": dp.gso, "gro": dp.gro}), flush=True)
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line or line.strip() == "quit":
                if trace:
                    Path(f"/tmp/encdp-trace-{os.getpid()}").write_text(json.dumps(trace[-200:]))
                break
            print(json.dumps({"stats": dp.stats(), "net": dp.network_stats()}), flush=True)
    finally:
        await dp.close()


# ---------------------------------------------------------------- harness


def iperf_gbps(out: str) -> float:
    doc = json.loads(out[out.index("{") :])
    return float(doc["end"]["sum_received"]["bits_per_second"]) / 1e9


def rtt_us(out: str) -> float:
    m = re.search(r"= [\d.]+/([\d.]+)/", out)
    if not m:
        raise SystemExit(f"bench: no ping summary in {out!r}")
    return float(m.group(1)) * 1000


def sb_run(ns: str, argv: list[str], timeout: float) -> str:
    r = subprocess.run(sandbox_command(ns, argv), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"bench: {' '.join(argv)} in {ns}: {r.stderr.strip() or r.stdout}")
    return r.stdout


def iperf(client: str, server_ip: str, seconds: int) -> float:
    out = sb_run(client, ["iperf3", "-c", server_ip, "-t", str(seconds), "-J"], seconds + 30)
    return iperf_gbps(out)


def ping(client: str, dst: str) -> float:
    sb_run(client, ["ping", "-c", "3", "-W", "2", "-q", dst], 20)
    return rtt_us(sb_run(client, ["ping", "-c", "50", "-i", "0.02", "-q", dst], 30))


def capture_wire(lab: Lab, client: str, server_ip: str, seconds: int) -> dict[str, Any]:
    """Encrypted iperf3 with eth0 segmenting in software, headers captured on the switch."""
    for h in ("h1", "h2"):
        netns.ip("link", "set", "dev", "eth0", "gso_max_segs", "1", ns=lab.host_ns(h))
    pcap = Path(f"/tmp/encdp-bench-{os.getpid()}.pcap")
    cap = subprocess.Popen(
        netns.exec_argv(
            lab.underlay_ns,
            [
                "tcpdump",
                "-n",
                "-U",
                "-s",
                "64",
                "-B",
                "16384",
                "-i",
                "br0",
                "-w",
                str(pcap),
                "udp or ip[6:2] & 0x3fff != 0",
            ],
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert cap.stderr is not None
        cap.stderr.readline()
        gbps = iperf(client, server_ip, seconds)
    finally:
        cap.terminate()
        cap.wait(10)
        for h in ("h1", "h2"):
            netns.ip("link", "set", "dev", "eth0", "gso_max_segs", "65535", ns=lab.host_ns(h))
    data = pcap.read_bytes()
    pcap.unlink()
    max_len = frags = n = vxlan = 0
    off = 24
    while off + 16 <= len(data):
        incl = int.from_bytes(data[off + 8 : off + 12], "little")
        pkt = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if len(pkt) < 34 or pkt[12:14] != b"\x08\x00":
            continue
        n += 1
        max_len = max(max_len, int.from_bytes(pkt[16:18], "big"))
        if int.from_bytes(pkt[20:22], "big") & 0x3FFF:
            frags += 1
        ihl = (pkt[14] & 0xF) * 4
        ports = (pkt[14 + ihl : 16 + ihl], pkt[16 + ihl : 18 + ihl])
        if pkt[23] == 17 and (4789).to_bytes(2, "big") in ports:
            vxlan += 1
    return {
        "wire_gbps": round(gbps, 2),
        "packets": n,
        "max_len": max_len,
        "frags": frags,
        "vxlan4789": vxlan,
    }


async def setup_plain(lab: Lab, underlay_mtu: int) -> None:
    for i, h in ((1, "h1"), (2, "h2")):
        other = 3 - i
        async with OverlayKernel(lab.host_ns(h)) as k:
            await k.ensure_network(VNI_PLAIN, lab.underlay_ip(h), underlay_mtu - 50)
            await k.sync_fdb(VNI_PLAIN, {mac(1, other): lab.underlay_ip(f"h{other}")})
            await k.sync_neighbors(VNI_PLAIN, {ip(1, other): mac(1, other)})


def start_workers(lab: Lab, nice: int, underlay_mtu: int) -> list[subprocess.Popen[str]]:
    mtu_enc = encrypted_overlay_mtu(underlay_mtu)
    keys = {(a, b): (0x100 * a + b, os.urandom(32).hex()) for a in (1, 2) for b in (1, 2)}
    workers = []
    for i in (1, 2):
        o = 3 - i
        hns = lab.host_ns(f"h{i}")
        netns.ip_batch(
            [f"link add {BR_ENC} mtu {mtu_enc} type bridge", f"link set {BR_ENC} up"], ns=hns
        )
        peer = lab.underlay_ip(f"h{o}")
        cfg = {
            "netns": hns,
            "local_ip": lab.underlay_ip(f"h{i}"),
            "vni": VNI_ENC,
            "bridge": BR_ENC,
            "mtu": mtu_enc,
            "macs": {mac(2, j): lab.underlay_ip(f"h{j}") for j in (1, 2)},
            "arp": {ip(2, j): mac(2, j) for j in (1, 2)},
            "out": {peer: keys[(i, o)]},
            "in": {peer: keys[(o, i)]},
            "nice": nice,
        }
        p = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        workers.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()
        if not line:
            raise SystemExit("bench: worker did not start")
    return workers


def worker_stats(p: subprocess.Popen[str]) -> dict[str, Any]:
    assert p.stdin is not None and p.stdout is not None
    p.stdin.write("stats\n")
    p.stdin.flush()
    return dict(json.loads(p.stdout.readline()))


def profile(pids: dict[str, int], seconds: int, out: str) -> dict[str, list[tuple[str, float]]]:
    """py-spy the workers at once; the top lines (by self time, on-CPU samples) of each."""
    pyspy = str(Path(sys.executable).parent / "py-spy")
    spies = {
        role: subprocess.Popen(
            [
                pyspy,
                "record",
                "-p",
                str(pid),
                "-d",
                str(seconds),
                "-r",
                "250",
                "-f",
                "raw",
                "-o",
                f"{out}.{role}.raw",
                "--threads",
                "--gil",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for role, pid in pids.items()
    }
    result: dict[str, list[tuple[str, float]]] = {}
    with open(out, "w") as f:
        for role, spy in spies.items():
            spy.wait(seconds + 60)
            self_time: dict[str, int] = {}
            total = 0
            raw = Path(f"{out}.{role}.raw")
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                leaf = stack.split(";")[-1]
                self_time[leaf] = self_time.get(leaf, 0) + int(count)
                total += int(count)
            raw.unlink()
            top = sorted(self_time.items(), key=lambda kv: -kv[1])[:20]
            f.write(f"== {role}: {total} samples holding the GIL\n")
            for k, v in top:
                f.write(f"{100 * v / max(total, 1):5.1f}%  {k}\n")
            result[role] = [(k, round(v / max(total, 1), 3)) for k, v in top[:8]]
    return result


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU time, time spent runnable but waiting for a CPU) of process PID's threads so far,
    in seconds (/proc/PID/task/*/schedstat)."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            a, b, _ = (task / "schedstat").read_text().split()
            run, wait = run + int(a), wait + int(b)
    return run / 1e9, wait / 1e9


def measure(
    seconds: int, repeat: int, prof: str | None, nice: int = 0, underlay_mtu: int = UNDERLAY_MTU
) -> dict[str, Any]:
    lab = Lab(prefix=f"mne{os.getpid() % 10000}")
    procs: list[subprocess.Popen[str]] = []
    sandboxes: list[tuple[str, str]] = []
    try:
        lab.up(2, start_agents=False, underlay_mtu=underlay_mtu)
        asyncio.run(setup_plain(lab, underlay_mtu))
        procs += start_workers(lab, nice, underlay_mtu)
        workers = list(procs)

        async def sandboxes_up() -> None:
            mtus = (underlay_mtu - 50, encrypted_overlay_mtu(underlay_mtu))
            caps = (None, frame_gso_max(underlay_mtu))  # as the agent caps its endpoints
            for net, br, mtu, cap in (
                (1, BR_PLAIN, mtus[0], caps[0]),
                (2, BR_ENC, mtus[1], caps[1]),
            ):
                for i in (1, 2):
                    name = f"{lab.prefix}-n{net}s{i}"
                    sandboxes.append((name, lab.host_ns(f"h{i}")))
                    await create_sandbox(
                        name,
                        br,
                        f"{ip(net, i)}/24",
                        mac(net, i),
                        mtu,
                        host_netns=lab.host_ns(f"h{i}"),
                        resolv_conf=None,
                        gso_max_size=cap,
                    )

        asyncio.run(sandboxes_up())
        p1, p2 = f"{lab.prefix}-n1s1", f"{lab.prefix}-n1s2"
        e1, e2 = f"{lab.prefix}-n2s1", f"{lab.prefix}-n2s2"
        for srv in (p2, e2):
            procs.append(
                subprocess.Popen(
                    sandbox_command(srv, ["iperf3", "-s"]),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(0.5)
        rtt_plain = ping(p1, ip(1, 2))
        rtt_enc = ping(e1, ip(2, 2))
        plain, enc, ratios = [], [], []
        cpu = {"sender": 0.0, "receiver": 0.0, "sender_runq": 0.0, "receiver_runq": 0.0}
        for _ in range(repeat):
            plain.append(iperf(p1, ip(1, 2), seconds))
            before = [cpu_seconds(w.pid) for w in workers]
            enc.append(iperf(e1, ip(2, 2), seconds))
            after = [cpu_seconds(w.pid) for w in workers]
            for k, i, j in (
                ("sender", 0, 0),
                ("receiver", 1, 0),
                ("sender_runq", 0, 1),
                ("receiver_runq", 1, 1),
            ):
                cpu[k] += (after[i][j] - before[i][j]) / seconds / repeat
            ratios.append(enc[-1] / plain[-1])
        top: dict[str, list[tuple[str, float]]] | None = None
        if prof:
            ps = subprocess.Popen(
                sandbox_command(e1, ["iperf3", "-c", ip(2, 2), "-t", str(seconds + 2)]),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
            top = profile({"sender": workers[0].pid, "receiver": workers[1].pid}, seconds, prof)
            ps.wait(seconds + 30)
        wire = capture_wire(lab, e1, ip(2, 2), 3)
        s1, s2 = worker_stats(workers[0]), worker_stats(workers[1])
        peer = s1["stats"][lab.underlay_ip("h2")]
        result: dict[str, Any] = {
            "plain_gbps": round(statistics.median(plain), 2),
            "encrypted_gbps": round(statistics.median(enc), 2),
            "encrypted_ratio": round(statistics.median(ratios), 3),
            "rtt_plain_us": round(rtt_plain, 1),
            "rtt_encrypted_us": round(rtt_enc, 1),
            "max_underlay_datagram": wire["max_len"],
            "underlay_mtu": underlay_mtu,
            "frag_count": wire["frags"],
            "vxlan4789_count": wire["vxlan4789"],
            "encrypted_wire_gbps": wire["wire_gbps"],
            "wire_packets": wire["packets"],
            "worker_cpu": {k: round(v, 2) for k, v in cpu.items()},  # cores, during the run
            "gso": s1["net"]["gso"],
            "gro": s1["net"]["gro"],
            "sender_records_per_frame": round(
                peer["tx_packets"] / max(1, s1["net"]["networks"][str(VNI_ENC)]["tx_frames"]), 1
            ),
            "sender_drops": peer["drops"],
            "receiver_drops": s2["stats"][lab.underlay_ip("h1")]["drops"],
            "runs": {"plain": plain, "encrypted": enc},
            "seconds": seconds,
            "streams": 1,
        }
        if top is not None:
            result["profile_top"] = top
        return result
    finally:
        for p in procs:
            with contextlib.suppress(Exception):
                if p.stdin is not None:
                    p.stdin.write("quit\n")
                    p.stdin.close()
            if p.args and "--worker" not in p.args:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

        async def sandboxes_down() -> None:
            for name, host in sandboxes:
                with contextlib.suppress(Exception):
                    await delete_sandbox(name, host_netns=host)

        asyncio.run(sandboxes_down())
        lab.down()


def capacity(underlay_mtu: int, frames: int = 2000) -> dict[str, float]:
    """What one core seals and opens, in Gbit/s of (vnet header | frame) stream, with no
    syscall, no kernel and no other process: full-sized frames (the endpoint GSO cap) through
    the datapath's own code (_seal_send, _rx_run), in this process. The gap to the iperf3
    numbers is what the kernel, both TCP stacks and sharing the machine's cores cost."""
    src = "10.0.0.1"
    tx_dp = EncryptedDatapath(src, underlay_mtu=underlay_mtu)
    rx_dp = EncryptedDatapath("10.0.0.2", underlay_mtu=underlay_mtu)
    key = bytes(range(32))
    sa = OutboundSA(spi=7, key=key)
    rx_dp.set_inbound(src, {7: InboundSA(spi=7, key=key)})
    rx_dp._nets = {VNI_ENC: _Net(VNI_ENC, None, BR_ENC)}  # type: ignore[arg-type]
    rx_dp._tap_write = lambda net, pieces: None  # type: ignore[method-assign]
    size = frame_gso_max(underlay_mtu) + VNET_HDR_LEN
    tx = _TxBuf(tx_dp.payload, tx_dp.seg)
    tx.load(bytes(i & 0xFF for i in range(size)))
    runs: list[tuple[bytes, int]] = []
    tx_dp._send = (  # type: ignore[method-assign]
        lambda addr, view, total, count, seg: runs.append((bytes(view[:total]), seg))
    )
    peer = tx_dp._peer("10.0.0.2")
    for _ in range(frames):  # the records to open later, and a warm-up of the sealing
        tx_dp._seal_send(peer, sa, VNI_ENC, size, tx)
    tx_dp._send = lambda *a: None  # type: ignore[method-assign]
    t0 = time.perf_counter()
    for _ in range(frames):
        tx_dp._seal_send(peer, sa, VNI_ENC, size, tx)
    seal_s = (time.perf_counter() - t0) / frames
    rx = _RxBuf(rx_dp.seg)
    asm: dict[Any, Any] = {}
    opened = 0
    t0 = time.perf_counter()
    for data, seg in runs:
        rx.buf[: len(data)] = data
        opened += rx_dp._rx_run(rx, len(data), seg, (src, PORT), asm)
    open_s = (time.perf_counter() - t0) / frames
    assert opened == len(runs) * -(-size // tx_dp.payload), "capacity: records went missing"
    return {
        "seal_gbps_per_core": round(size * 8 / seal_s / 1e9, 2),
        "open_gbps_per_core": round(size * 8 / open_s / 1e9, 2),
        "records_per_frame": -(-size // tx_dp.payload),
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--profile", metavar="OUT")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--nice", type=int, default=0, help="nice value of the datapath workers")
    ap.add_argument("--underlay-mtu", type=int, default=UNDERLAY_MTU)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        asyncio.run(worker(json.loads(args.worker)))
        return 0
    if os.geteuid() != 0:
        print("bench/encdp_micro.py needs root (network namespaces)", file=sys.stderr)
        return 1
    result = measure(args.seconds, args.repeat, args.profile, args.nice, args.underlay_mtu)
    result["capacity"] = capacity(args.underlay_mtu)
    if not args.json:
        for k, v in result.items():
            print(f"{k}: {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
