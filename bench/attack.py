"""Replays and floods against a 3-host lab (issue #14): amplification, memory and control-API
latency under a stream flood, and rekeys while a captured handshake initiation is replayed.

    python bench/attack.py [--replay-seconds 300] [--replay-rate 100] [--rekey-after 3]
                           [--reject-after 6] [--status-samples 50] [--flood-seconds 20]
                           [--udp-flood-pps 5000] [--reconnect-s 0.25] [--json]

The lab (profile lan-fast, short rekey settings for every agent, one `--encrypted` network)
gets one extra namespace of ours, the attacker, plugged into the underlay switch with
addresses no member has (10.99.0.200 and 10.99.0.201-216). Everything is sent from inside the
lab's namespaces; nothing leaves them.

1. Capture. An AF_PACKET socket in the underlay namespace records every frame the hosts send
   into the switch while h3's and then h2's agent is stopped (SIGSTOP) until another member
   suspects it, and while
   the encrypted network is created and rekeys a few times: sealed gossip (classified by
   opening it with the cluster key), handshake initiations and datapath records.

2. amplification_max: per attack type, from a fresh UDP socket (so no credit is left over),
   datagrams are sent to the agents from two unverified sources: `outsider` (the attacker
   namespace, 10.99.0.200, to all three agents) and `member_ip` (a socket in h3's namespace
   on h3's address but not its gossip or datapath port, to h1 and h2). What the agents send
   back is counted on the source's side (AF_PACKET on its eth0: every UDP datagram to that
   address, any port, so reflections to another port of the source count too; for member_ip
   every port but h3's agent's 7946 and 4790), over the send and 2 s after. The ratio is UDP
   payload bytes received over UDP payload bytes sent; a type's value is the larger of its two
   sources; amplification_max the largest over the types. Types:
   - replay_ping / replay_other: sealed gossip the members sent each other over the last 3 s
     (a fresh capture), holding a Ping / anything else, replayed at once (within the senders'
     current freshness epochs) to every agent: the original receiver has seen each one, the
     others may not have (one freshness counter serves all of a sender's peers);
   - replay_suspect: the datagrams holding a Suspect captured while h3 was stopped until
     suspected, replayed to every agent as soon as h3 has refuted it (stale suspects);
   - replay_old: gossip of every kind from the first capture, minutes old;
   - sealed_ping / sealed_indirect_ping / sealed_suspect / sealed_compound: fresh datagrams
     sealed with the cluster key by a key holder who is not a member (its own freshness
     sender): pings naming the receiver, indirect pings naming each other member at its
     address and one naming the source's own address, suspects about the receiver at its
     current and at a stale incarnation, and compounds of all three;
   - garbage_gossip: random datagrams and captured ones with one byte flipped, to 7946;
   - garbage_datapath: random datagrams, and well-shaped handshake messages and records of
     random content, to 4790;
   - handshake_replay: every captured handshake initiation, to every agent's 4790;
   - handshake_forged: initiations a key holder makes (valid mac1: the psk and the receiver's
     public datapath key), with a static key no member has;
   - record_replay: captured datapath records, to every agent's 4790.

3. Stream flood on h1's gossip/stream port (TCP 7946): 128 connections, 8 from each of 16
   attacker addresses (the per-source cap), each announcing a 24 MiB frame and then:
   `raw_blast` a 4-byte length and 24 MiB of garbage at full speed; `raw_trickle` the length,
   then one byte every 0.5 s; `sealed_blast` a key holder's valid sealed head announcing
   24 MiB of push-pull, then garbage; `sealed_trickle` a valid head announcing the push-pull
   cap (20 MiB: 24 MiB is refused at the head) and one byte short of the first 64 KiB chunk,
   then nothing. A closed slot is reopened, at most once per --reconnect-s. Alongside, UDP
   garbage at --udp-flood-pps to h1's 7946 and 4790.
   - rss_growth_mb_under_stream_flood: the highest VmRSS (/proc/PID/status, sampled every
     50 ms) of h1's agent during the flood, less the median of 5 samples just before it;
   - status_latency_ms_p99_under_flood: `meshctl --json status` against h1, run
     --status-samples times one after the other during the flood, wall time of each process
     (start to exit); p99 is nearest-rank (of 50: the slowest). The same without the flood,
     just before it, is reported as status_latency_ms_p99_baseline;
   - member_keys_ok_under_flood: `keys list` on h2 (key-op streams to every member, h1
     included) every 10th status sample: the fraction that every member acked.

4. handshake_ok_under_replay: the first initiation captured each way between h1 and h2 (at
   network creation, minutes before; `handshake_drops_by_reason` says which check refused the
   copies) is sent again with the genuine sender's address and port (raw IPv4, IP_HDRINCL,
   from inside the sender's namespace) to the other at --replay-rate per direction for
   --replay-seconds.
   Meanwhile a sandbox on h1 pings a sandbox on h2 over the encrypted network once a second
   (-W 1), and both agents' views of the pair are polled every second. Expected rekeys per
   side: floor(seconds / rekey_after) - 1 (the SA's initiator rekeys rekey_after after each
   handshake, plus a round trip; one off for the edges). handshake_ok_under_replay = min(1,
   the smaller side's completed rekeys / expected); sa_expired = the growth of h1's and h2's
   sessions_expired; sa_drops = the pair's datapath drops for an expired or missing SA;
   overlay_ping_loss = the pings' loss fraction. The pair h1-h3, not replayed to, is the
   control measured in the same run.

The bench cleans up its namespace, the lab and every process it started, on success, failure,
Ctrl-C and SIGTERM. The last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from meshnet.agent.encdp import DEFAULT_PORT as DP_PORT
from meshnet.agent.gossip import STREAM_PUSH_PULL, Sealer
from meshnet.cli.meshctl import Client, NoAgent
from meshnet.crypto import certs
from meshnet.crypto.freshness import FRESH_SIZE
from meshnet.crypto.handshake import (
    INITIATION_SIZE,
    MessageType,
    create_initiation,
    derive_psk,
    tai64n,
)
from meshnet.crypto.keyring import (
    KIND_FRESH_PACKET,
    KIND_STREAM_HEAD,
    SEAL_OVERHEAD,
    Keyring,
)
from meshnet.crypto.sa import MAX_SPI, MIN_SPI
from meshnet.lab import Lab
from meshnet.lab.lab import BRIDGE, GOSSIP_PORT
from meshnet.membership.messages import (
    IndirectPing,
    Ping,
    Suspect,
    decode_packet,
    make_compound,
)
from meshnet.platform import netns, nsfd
from meshnet.wire import MAX_STREAM_BYTES

MESHCTL = str(Path(sys.executable).parent / "meshctl")
HOSTS = ("h1", "h2", "h3")
NET = "atk"
ATTACKER_IP = "10.99.0.200"
FLOOD_IPS = [f"10.99.0.{i}" for i in range(201, 217)]
ATTACKER_IF = "atk0"  # its port on the underlay switch
PACKET_OUTGOING = 4
ETH_P_ALL = 0x0003

TARGET_AMPLIFICATION = 1.0
TARGET_RSS_GROWTH_MB = 64.0
TARGET_STATUS_P99_MS = 1000.0
TARGET_HANDSHAKE_OK = 1.0

SETTLE_S = 2.0  # how long answers to one attack type are awaited after its last datagram
PACE_S = 0.002  # between attack datagrams: the agents' socket buffers never drop them
ANNOUNCED = 24 << 20  # the frame each flood connection announces
FLOOD_CONNECTIONS = 128
PER_SOURCE = FLOOD_CONNECTIONS // len(FLOOD_IPS)  # 8: the agent's MAX_STREAMS_PER_SOURCE
CHUNK_WIRE = 65536 + SEAL_OVERHEAD  # one sealed stream chunk (gossip.CHUNK_BYTES)
HEAD = struct.Struct(">BI")  # a stream request's head: service, body length


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- small helpers


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def pct(vals: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not vals:
        return None
    s = sorted(vals)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def wait(cond: Callable[[], Any], timeout: float, what: str, period: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(period)
    raise BenchError(f"timed out after {timeout:g}s waiting for {what}")


def api(lab: Lab, host: str, op: str, /, timeout: float = 10, **args: Any) -> Any:
    """One control-API call on HOST's socket, in-process; None on any failure."""
    try:
        for body in Client(str(lab.socket_path(host))).call(op, args, timeout):
            if "ok" in body:
                return body.get("result") if body["ok"] else None
    except (NoAgent, OSError, ConnectionError, ValueError):
        return None
    return None


def ctl(lab: Lab, host: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return lab.ctl(host, list(args), capture_output=True, timeout=timeout)


def agent_pid(lab: Lab, host: str) -> int:
    for s in lab.status():
        if s.name == host and s.pid is not None:
            return s.pid
    raise BenchError(f"agent on {host} is not running")


def vm_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BenchError(f"no {field} for pid {pid}")


def peer_info(lab: Lab, host: str, node: str) -> dict[str, Any] | None:
    doc = api(lab, host, "network.inspect", name=NET)
    for p in (doc or {}).get("peers", []):
        if p.get("node") == node:
            return dict(p)
    return None


def state_of(lab: Lab, host: str, node: str) -> str | None:
    """NODE's state in HOST's member list."""
    for m in api(lab, host, "members", timeout=2) or []:
        if m.get("name") == node:
            return str(m.get("state"))
    return None


def endpoint_ip(lab: Lab, host: str, name: str) -> str | None:
    doc = api(lab, host, "network.inspect", name=NET)
    for ep in (doc or {}).get("endpoints", []):
        if ep.get("name") == name:
            return str(ep["ip"])
    return None


def udp_of(frame: bytes) -> tuple[str, str, int | None, int | None, bytes] | None:
    """(src, dst, sport, dport, payload) of an Ethernet/IPv4/UDP frame; a later fragment
    has no ports and its IP payload as payload; None for anything else."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00" or frame[14] >> 4 != 4 or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    (total,) = struct.unpack_from(">H", frame, 16)
    (frag,) = struct.unpack_from(">H", frame, 20)
    src, dst = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
    ip_end = min(len(frame), 14 + total) if total else len(frame)  # 0: a GSO super-packet
    if frag & 0x1FFF:
        return src, dst, None, None, frame[14 + ihl: ip_end]
    if len(frame) < 14 + ihl + 8:
        return None
    sport, dport = struct.unpack_from(">HH", frame, 14 + ihl)
    return src, dst, sport, dport, frame[14 + ihl + 8: ip_end]


class Tap:
    """An AF_PACKET socket in a namespace (bound to IFNAME, or every interface if None),
    handing each frame and its address (ifname, proto, pkttype, ...) to ON_FRAME in a thread."""

    def __init__(self, ns: str, ifname: str | None,
                 on_frame: Callable[[bytes, tuple[Any, ...]], None]) -> None:
        self.on_frame = on_frame
        self.sock = nsfd.open_socket_in_netns(ns, socket.AF_PACKET, socket.SOCK_RAW,
                                              proto=socket.htons(ETH_P_ALL))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            if ifname is not None:
                self.sock.bind((ifname, 0))
            self.sock.settimeout(0.2)
        except BaseException:
            self.sock.close()
            raise
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                frame, meta = self.sock.recvfrom(70000)
            except TimeoutError:
                continue
            except OSError:
                return
            self.on_frame(frame, meta)

    def close(self) -> None:
        self.stop_event.set()
        self.thread.join(2)
        self.sock.close()


class Spoofer:
    """UDP with any source address and port: a raw IPv4 socket (IPPROTO_RAW implies
    IP_HDRINCL) inside a lab namespace."""

    def __init__(self, ns: str) -> None:
        self.sock = nsfd.open_socket_in_netns(ns, socket.AF_INET, socket.SOCK_RAW,
                                              proto=socket.IPPROTO_RAW)

    def send(self, payload: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        udp = struct.pack(">HHHH", src[1], dst[1], 8 + len(payload), 0) + payload  # no csum
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                         socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
        total = sum(struct.unpack(">10H", ip))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        ip = ip[:10] + struct.pack(">H", ~total & 0xFFFF) + ip[12:]
        self.sock.sendto(ip + udp, (dst[0], 0))

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------- the attacker's namespace


def attacker_up(lab: Lab, ns: str) -> None:
    """Our namespace on the lab's switch, with every attacker address on its eth0."""
    mtu = 1500
    with contextlib.suppress(OSError, ValueError, KeyError):
        mtu = int(json.loads(lab.manifest_path.read_text()).get("underlay_mtu", 1500))
    netns.add(ns)
    netns.ip_batch([f"link add {ATTACKER_IF} mtu {mtu} type veth peer name eth0 mtu {mtu} "
                    f"netns {ns}", f"link set {ATTACKER_IF} master {BRIDGE} up"],
                   ns=lab.underlay_ns)
    netns.ip_batch(["link set lo up",
                    *(f"addr add {ip}/24 dev eth0" for ip in [ATTACKER_IP, *FLOOD_IPS]),
                    "link set eth0 up"], ns=ns)


# ---------------------------------------------------------------- 1. capture


class UnderlayCapture:
    """Every UDP datagram a host sends into the switch (seen once: as it enters its port)."""

    def __init__(self, lab: Lab) -> None:
        self.ports = set(HOSTS)
        self.packets: list[tuple[str, str, int, int, bytes]] = []
        self.lock = threading.Lock()
        self.tap = Tap(lab.underlay_ns, None, self._on)

    def _on(self, frame: bytes, meta: tuple[Any, ...]) -> None:
        if meta[0] not in self.ports or meta[2] == PACKET_OUTGOING:
            return
        u = udp_of(frame)
        if u is None or u[2] is None or u[3] is None:
            return
        with self.lock:
            self.packets.append((u[0], u[1], u[2], u[3], bytes(u[4])))

    def stop(self) -> list[tuple[str, str, int, int, bytes]]:
        self.tap.close()
        with self.lock:
            return list(self.packets)


def gossip_messages(ring: Keyring, payload: bytes) -> list[Any]:
    try:
        plain = ring.open(payload[FRESH_SIZE:], KIND_FRESH_PACKET, payload[:FRESH_SIZE])
        return list(decode_packet(plain))
    except Exception:
        return []


def is_initiation(p: bytes) -> bool:
    return len(p) == INITIATION_SIZE and p[:4] == bytes(4) and p[4] == MessageType.INITIATION


def suspicion(lab: Lab, victim: str) -> None:
    """Stop VICTIM's agent (SIGSTOP) until another member suspects it, then let it refute:
    the wire carries Suspects about it, then its refutation."""
    pid = agent_pid(lab, victim)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait(lambda: any(state_of(lab, h, victim) == "suspect" for h in HOSTS if h != victim),
             15, f"{victim} to be suspected", period=0.05)
        time.sleep(0.5)
    finally:
        os.kill(pid, signal.SIGCONT)
    wait(lambda: all(state_of(lab, h, victim) == "alive" for h in HOSTS), 30,
         f"{victim} to refute")


def capture(lab: Lab, rekey_after: float) -> list[tuple[str, str, int, int, bytes]]:
    """The first capture: suspicions of h3 and h2, then the encrypted network's creation and
    first rekeys (its handshake initiations and records)."""
    cap = UnderlayCapture(lab)
    try:
        time.sleep(2)
        for victim in ("h3", "h2"):
            suspicion(lab, victim)
        r = ctl(lab, "h1", "network", "create", NET, "--encrypted")
        if r.returncode != 0:
            raise BenchError(f"network create: {r.stderr.strip()}")
        wait(lambda: all(api(lab, h, "network.inspect", name=NET) for h in HOSTS), 30,
             "the network on every host")
        pairs = [(a, b) for a in HOSTS for b in HOSTS if a != b]
        wait(lambda: all((peer_info(lab, a, b) or {}).get("established") for a, b in pairs),
             60, "keys between every pair")
        time.sleep(2 * rekey_after + 1)  # a few rekeys: more initiations and records
    finally:
        packets = cap.stop()
    return packets


def live_capture(lab: Lab, seconds: float = 0.0, suspect: str | None = None
                 ) -> list[tuple[str, str, int, int, bytes]]:
    """A capture of SECONDS of ordinary traffic, or of a suspicion of SUSPECT, to replay at
    once (within the senders' current freshness epochs)."""
    cap = UnderlayCapture(lab)
    try:
        time.sleep(seconds)
        if suspect is not None:
            suspicion(lab, suspect)
    finally:
        packets = cap.stop()
    return packets


def gossip_by_kind(ring: Keyring, packets: list[tuple[str, str, int, int, bytes]],
                   rng: random.Random) -> dict[str, list[bytes]]:
    """Captured gossip datagrams holding a Suspect, a Ping, or anything else (at most 60, 60
    and 120 of them)."""
    kinds: dict[str, list[bytes]] = {"ping": [], "suspect": [], "other": []}
    for _, _, _, dport, p in packets:
        if dport != GOSSIP_PORT:
            continue
        names = {type(m).__name__ for m in gossip_messages(ring, p)}
        if "Suspect" in names:
            kinds["suspect"].append(p)
        elif "Ping" in names:
            kinds["ping"].append(p)
        elif names:
            kinds["other"].append(p)
    for k, cap in (("ping", 60), ("suspect", 60), ("other", 120)):
        if len(kinds[k]) > cap:
            kinds[k] = rng.sample(kinds[k], cap)
    return kinds


# ---------------------------------------------------------------- 2. amplification


class SourceMeter:
    """UDP payload bytes arriving at a source, counted on its side, by phase."""

    def __init__(self, ns: str, match: Callable[[str, int | None], bool]) -> None:
        self.match = match
        self.phase: str | None = None
        self.bytes: Counter[str] = Counter()
        self.datagrams: Counter[str] = Counter()
        self.tap = Tap(ns, "eth0", self._on)

    def _on(self, frame: bytes, meta: tuple[Any, ...]) -> None:
        phase = self.phase
        if phase is None or meta[2] == PACKET_OUTGOING:
            return
        u = udp_of(frame)
        if u is not None and self.match(u[1], u[3]):
            self.bytes[phase] += len(u[4])
            self.datagrams[phase] += 1

    def close(self) -> None:
        self.tap.close()


Sends = list[tuple[bytes, tuple[str, int]]]


def attack_sets(lab: Lab, ring: Keyring, packets: list[tuple[str, str, int, int, bytes]],
                targets: list[str], source: tuple[str, int | None]) -> dict[str, Sends]:
    """The datagrams (payload, destination) of every attack type but the live replays, for a
    source at SOURCE; PACKETS: the first capture."""
    rng = random.Random(7)
    ips = {h: lab.underlay_ip(h) for h in HOSTS}
    gossip = [p for _, _, _, dport, p in packets if dport == GOSSIP_PORT]
    dp = [p for _, _, _, dport, p in packets if dport == DP_PORT]

    def to_all(payloads: list[bytes], port: int) -> Sends:
        return [(p, (ips[h], port)) for p in payloads for h in targets]

    # Gossip captured minutes ago (older freshness epochs), every kind.
    old = gossip_by_kind(ring, packets, rng)
    out: dict[str, Sends] = {
        "replay_old": to_all(old["ping"] + old["suspect"] + old["other"], GOSSIP_PORT)}
    # A key holder who is not a member: its own freshness sender, fresh values.
    sealer = Sealer(ring, f"stranger-{source[0]}-{os.getpid()}")
    incs = {m["name"]: int(m["incarnation"]) for m in api(lab, "h1", "members") or []}
    pings: Sends = []
    indirect: Sends = []
    suspects: Sends = []
    compounds: Sends = []
    seq = rng.randrange(1 << 20)
    back = (source[0], 9)  # the source's own address, another port: a reflection there counts
    for h in targets:
        dst = (ips[h], GOSSIP_PORT)
        others = [o for o in HOSTS if o != h]
        for _ in range(30):
            seq += 1
            pings.append((sealer.seal_datagram(Ping(seq, h, "stranger").encode()), dst))
        for _ in range(10):
            for o in others:
                seq += 1
                msg = IndirectPing(seq, o, (ips[o], GOSSIP_PORT), True).encode()
                indirect.append((sealer.seal_datagram(msg), dst))
            seq += 1
            indirect.append((sealer.seal_datagram(IndirectPing(seq, "ghost", back, True)
                                                  .encode()), dst))
        inc = incs.get(h, 1)
        for i in range(20):
            msg = Suspect(inc if i % 2 else max(0, inc - 1), h, "stranger").encode()
            suspects.append((sealer.seal_datagram(msg), dst))
        for _ in range(20):
            seq += 1
            parts = [Ping(seq, h, "stranger").encode(),
                     IndirectPing(seq + 1, others[0], (ips[others[0]], GOSSIP_PORT),
                                  True).encode(),
                     Suspect(inc, h, "stranger").encode()]
            seq += 1
            compounds.append((sealer.seal_datagram(make_compound(parts)), dst))
    out.update(sealed_ping=pings, sealed_indirect_ping=indirect, sealed_suspect=suspects,
               sealed_compound=compounds)
    # Garbage: random, and captured datagrams with one byte flipped.
    garbage: list[bytes] = [rng.randbytes(rng.randint(1, 1400)) for _ in range(60)]
    for p in rng.sample(gossip, min(60, len(gossip))):
        b = bytearray(p)
        b[rng.randrange(len(b))] ^= 0x40
        garbage.append(bytes(b))
    out["garbage_gossip"] = to_all(garbage, GOSSIP_PORT)
    dgarbage: list[bytes] = [rng.randbytes(rng.randint(1, 1400)) for _ in range(40)]
    for kind, size in ((1, 152), (2, 80), (3, 56)):
        for _ in range(15):
            dgarbage.append(bytes(4) + bytes([kind, 2]) + rng.randbytes(size - 6))
    for _ in range(40):  # records: a non-zero SPI, a sequence number, junk
        dgarbage.append(struct.pack(">IQ", rng.randint(MIN_SPI, MAX_SPI), rng.randrange(1 << 40))
                        + rng.randbytes(rng.randint(16, 1400)))
    out["garbage_datapath"] = to_all(dgarbage, DP_PORT)
    out["handshake_replay"] = to_all([p for p in dp if is_initiation(p)][:40], DP_PORT)
    psk = derive_psk(base64.b64decode(lab.key_path.read_text().strip()))
    forged: Sends = []
    for h in targets:
        # The receiver's public datapath key (also in its gossiped metadata as dpk).
        dpk = certs.load_node_keys(lab.host_dir(h) / "id" / "node.key").dp_pub
        for _ in range(20):
            msg, _ = create_initiation(X25519PrivateKey.generate(), dpk, psk,
                                       rng.randint(MIN_SPI, MAX_SPI), tai64n(time.time()))
            forged.append((msg, (ips[h], DP_PORT)))
    out["handshake_forged"] = forged
    records = [p for p in dp if p[:4] != bytes(4)]
    out["record_replay"] = to_all(rng.sample(records, min(60, len(records))), DP_PORT)
    return out


def run_attack(meter: SourceMeter, phase: str, open_sock: Callable[[], socket.socket],
               sends: Sends) -> dict[str, Any]:
    sock = open_sock()
    sent = 0
    try:
        meter.phase = phase
        for payload, dst in sends:
            with contextlib.suppress(OSError):
                sock.sendto(payload, dst)
                sent += len(payload)
            time.sleep(PACE_S)
        time.sleep(SETTLE_S)
    finally:
        meter.phase = None
        sock.close()
    got = meter.bytes[phase]
    return {"datagrams": len(sends), "bytes_in": sent, "bytes_out": got,
            "answers": meter.datagrams[phase],
            "ratio": round(got / sent, 4) if sent else None}


def amplification(lab: Lab, atk_ns: str, ring: Keyring,
                  packets: list[tuple[str, str, int, int, bytes]]) -> dict[str, Any]:
    ip3 = lab.underlay_ip("h3")
    h3_ns = lab.host_ns("h3")
    sources: dict[str, tuple[str, str, list[str], SourceMeter]] = {}
    meters: list[SourceMeter] = []
    before = agent_counters(lab)
    try:
        m_out = SourceMeter(atk_ns, lambda dst, _port: dst == ATTACKER_IP)
        meters.append(m_out)
        m_mem = SourceMeter(h3_ns, lambda dst, port: dst == ip3
                            and port not in (GOSSIP_PORT, DP_PORT))
        meters.append(m_mem)
        sources["outsider"] = (atk_ns, ATTACKER_IP, list(HOSTS), m_out)
        sources["member_ip"] = (h3_ns, ip3, ["h1", "h2"], m_mem)
        time.sleep(0.5)
        per: dict[str, dict[str, Any]] = {}
        for sname, (ns, ip, targets, meter) in sources.items():

            def run(kind: str, sends: Sends, sname: str = sname, ns: str = ns, ip: str = ip,
                    meter: SourceMeter = meter) -> None:
                if not sends:
                    per.setdefault(kind, {})[sname] = {"datagrams": 0, "ratio": None}
                    return

                def opener() -> socket.socket:
                    return nsfd.open_socket_in_netns(ns, socket.AF_INET, socket.SOCK_DGRAM,
                                                     (ip, 0))

                per.setdefault(kind, {})[sname] = run_attack(meter, f"{sname}:{kind}", opener,
                                                             sends)

            def to_all(payloads: list[bytes], targets: list[str] = targets) -> Sends:
                return [(p, (lab.underlay_ip(h), GOSSIP_PORT)) for p in payloads
                        for h in targets]

            # Live replays: what the members sent each other over the last 3 s, replayed at
            # once (within the senders' current epochs); then the Suspects sent during a
            # suspicion of h3, replayed once h3 has refuted it (stale).
            rng = random.Random(13)
            live = gossip_by_kind(ring, live_capture(lab, seconds=3.0), rng)
            run("replay_ping", to_all(live["ping"]))
            run("replay_other", to_all(live["other"]))
            suspects = gossip_by_kind(ring, live_capture(lab, suspect="h3"), rng)["suspect"]
            run("replay_suspect", to_all(suspects))
            for kind, sends in attack_sets(lab, ring, packets, targets, (ip, None)).items():
                run(kind, sends)
    finally:
        for m in meters:
            m.close()
    by_type = {k: max((v["ratio"] for v in srcs.values() if v.get("ratio") is not None),
                      default=None) for k, srcs in per.items()}
    total_in = sum(v.get("bytes_in", 0) for srcs in per.values() for v in srcs.values())
    total_out = sum(v.get("bytes_out", 0) for srcs in per.values() for v in srcs.values())
    ratios = [r for r in by_type.values() if r is not None]
    after = agent_counters(lab)
    counters = {k: after[k] - before.get(k, 0) for k in sorted(after)
                if after[k] != before.get(k, 0)}
    return {"max": max(ratios) if ratios else None, "by_type": by_type, "detail": per,
            "bytes_in": total_in, "bytes_out": total_out, "agent_counters": counters}


AMP_COUNTERS = ("fresh_duplicate", "fresh_too_old", "fresh_old_epoch", "fresh_skew",
                "auth_failures", "amplification_drops", "answers_bare", "answers_limited",
                "misdirected_pings", "relays_refused", "stale_answers_withheld",
                "refuted_suspicions")
ENC_COUNTERS = ("handshakes_in", "handshakes_unknown_sender", "handshakes_rejected",
                "cookies_sent")


def agent_counters(lab: Lab) -> dict[str, int]:
    """The agents' drop and answer counters, summed over the hosts."""
    out: Counter[str] = Counter()
    for h in HOSTS:
        st = api(lab, h, "status", timeout=30) or {}
        g = st.get("gossip", {})
        e = st.get("datapath", {}).get("encrypted", {})
        for k in AMP_COUNTERS:
            out[f"gossip.{k}"] += int(g.get(k) or 0)
        for k in ENC_COUNTERS:
            out[f"encrypted.{k}"] += int(e.get(k) or 0)
        for k, n in (e.get("handshake_drops") or {}).items():
            out[f"encrypted.handshake_drops.{k}"] += int(n)
    return dict(out)


# ---------------------------------------------------------------- 3. stream flood


class StreamFlood:
    """FLOOD_CONNECTIONS connections to DST from the attacker's FLOOD_IPS, each reopened when
    the agent closes it (at most once per reconnect_s), plus UDP garbage at udp_pps."""

    FLAVORS = ("raw_blast", "raw_trickle", "sealed_blast", "sealed_trickle")

    def __init__(self, ns: str, dst_ip: str, ring: Keyring, reconnect_s: float,
                 udp_pps: int) -> None:
        self.ns, self.dst = ns, (dst_ip, GOSSIP_PORT)
        self.ring = ring
        self.reconnect_s = reconnect_s
        self.udp_pps = udp_pps
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.stats: Counter[str] = Counter()
        self.active = 0
        self.garbage = os.urandom(1 << 20)
        self.threads = [threading.Thread(target=self._slot, args=(i,), daemon=True)
                        for i in range(FLOOD_CONNECTIONS)]
        self.threads.append(threading.Thread(target=self._udp, daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(10)

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] += n

    def _head(self, sealer: Sealer, length: int) -> bytes:
        prefix = sealer.fresh.next().pack()
        return prefix + sealer.seal(HEAD.pack(STREAM_PUSH_PULL, length), KIND_STREAM_HEAD, prefix)

    def _blast(self, s: socket.socket, head: bytes) -> None:
        s.sendall(head)
        sent, view = 0, memoryview(self.garbage)
        while sent < ANNOUNCED and not self.stop_event.is_set():
            n = min(65536, ANNOUNCED - sent)
            off = sent % (len(self.garbage) - 65536)
            s.sendall(view[off: off + n])
            sent += n
            self.count("garbage_bytes", n)

    def _hold(self, s: socket.socket) -> None:
        """Send nothing more; return once the agent closes the connection."""
        s.settimeout(0.5)
        while not self.stop_event.is_set():
            try:
                if s.recv(4096) == b"":
                    return
            except TimeoutError:
                continue

    def _slot(self, i: int) -> None:
        src = FLOOD_IPS[i // PER_SOURCE]
        flavor = self.FLAVORS[i % len(self.FLAVORS)]
        sealer = Sealer(self.ring, f"flood-{os.getpid()}-{i}")
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            s: socket.socket | None = None
            connected = False
            try:
                s = nsfd.open_socket_in_netns(self.ns, socket.AF_INET, socket.SOCK_STREAM,
                                              (src, 0))
                s.settimeout(5)
                s.connect(self.dst)
                connected = True
                with self.lock:
                    self.active += 1
                    self.stats["connections"] += 1
                    self.stats["max_concurrent"] = max(self.stats["max_concurrent"],
                                                       self.active)
                self.count(f"connections_{flavor}")
                if flavor == "raw_blast":
                    self._blast(s, struct.pack(">I", ANNOUNCED))
                elif flavor == "raw_trickle":
                    s.sendall(struct.pack(">I", ANNOUNCED))
                    s.settimeout(0.5)
                    while not self.stop_event.is_set():
                        s.sendall(self.garbage[:1])
                        try:
                            if s.recv(1) == b"":
                                break
                        except TimeoutError:
                            continue
                elif flavor == "sealed_blast":
                    self._blast(s, self._head(sealer, ANNOUNCED))
                else:
                    s.sendall(self._head(sealer, MAX_STREAM_BYTES)
                              + self.garbage[: CHUNK_WIRE - 1])
                self._hold(s)
            except TimeoutError:
                self.count("timeouts")
            except OSError:
                self.count("closed_by_agent")  # reset, refused, broken pipe
            except Exception:
                self.count("errors")
            finally:
                if s is not None:
                    s.close()
                if connected:
                    with self.lock:
                        self.active -= 1
            self.stop_event.wait(max(0.0, self.reconnect_s - (time.monotonic() - t0)))

    def _udp(self) -> None:
        if self.udp_pps <= 0:
            return
        sock = nsfd.open_socket_in_netns(self.ns, socket.AF_INET, socket.SOCK_DGRAM,
                                         (FLOOD_IPS[-1], 0))
        rng = random.Random(11)
        batch = max(1, self.udp_pps // 100)
        try:
            t = time.monotonic()
            while not self.stop_event.is_set():
                for k in range(batch):
                    port = GOSSIP_PORT if k % 2 else DP_PORT
                    with contextlib.suppress(OSError):
                        sock.sendto(rng.randbytes(rng.randint(1, 1400)), (self.dst[0], port))
                        self.count("udp_datagrams")
                t += batch / self.udp_pps
                self.stop_event.wait(max(0.0, t - time.monotonic()))
        finally:
            sock.close()


class RssSampler:
    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.pid, self.period = pid, period
        self.samples: list[int] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            with contextlib.suppress(OSError, BenchError):
                self.samples.append(vm_kb(self.pid, "VmRSS"))
            self.stop_event.wait(self.period)

    def stop(self) -> list[int]:
        self.stop_event.set()
        self.thread.join(2)
        return self.samples


def meshctl_status_ms(lab: Lab, host: str) -> tuple[float, bool]:
    t0 = time.monotonic()
    try:
        r = subprocess.run([MESHCTL, "--socket", str(lab.socket_path(host)), "--json", "status"],
                           capture_output=True, text=True, timeout=30)
        ok = r.returncode == 0 and bool(json.loads(r.stdout).get("name"))
    except (subprocess.TimeoutExpired, ValueError):
        ok = False
    return (time.monotonic() - t0) * 1000, ok


def keys_ok(lab: Lab, host: str) -> bool:
    doc = api(lab, host, "keys", timeout=30, op="list", key="")
    return bool(doc) and doc.get("acked") == doc.get("members") and not doc.get("errors")


def stream_flood(lab: Lab, atk_ns: str, ring: Keyring, args: argparse.Namespace
                 ) -> dict[str, Any]:
    host = "h1"
    pid = agent_pid(lab, host)
    base_lat = [meshctl_status_ms(lab, host) for _ in range(args.status_samples)]
    before = api(lab, host, "status") or {}
    base_rss = []
    for _ in range(5):
        base_rss.append(vm_kb(pid, "VmRSS"))
        time.sleep(0.2)
    base_kb = statistics.median(base_rss)
    hwm0 = vm_kb(pid, "VmHWM")
    flood = StreamFlood(atk_ns, lab.underlay_ip(host), ring, args.reconnect_s,
                        args.udp_flood_pps)
    sampler = RssSampler(pid)
    lat: list[tuple[float, bool]] = []
    keys: list[bool] = []
    t0 = time.monotonic()
    try:
        flood.start()
        time.sleep(3)  # every slot has connected once
        while len(lat) < args.status_samples or time.monotonic() - t0 < args.flood_seconds:
            if len(lat) < args.status_samples:
                lat.append(meshctl_status_ms(lab, host))
                if len(lat) % 10 == 0:
                    keys.append(keys_ok(lab, "h2"))
            else:
                time.sleep(0.2)
        during = api(lab, host, "status", timeout=30) or {}
    finally:
        flood.stop()
        elapsed = time.monotonic() - t0
        samples = sampler.stop()
    time.sleep(5)
    after_kb = vm_kb(pid, "VmRSS")
    after = api(lab, host, "status") or {}
    peak_kb = max(samples) if samples else base_kb
    ms = [m for m, _ in lat]
    g0, g1 = before.get("gossip", {}), during.get("gossip", {})
    counters = {k: g1.get(k, 0) - g0.get(k, 0) for k in (
        "auth_failures", "stream_failures", "stream_head_timeouts", "stream_over_cap",
        "streams_refused_per_source", "streams_refused_total", "oversize_drops")}
    e0 = before.get("datapath", {}).get("encrypted", {})
    e1 = after.get("datapath", {}).get("encrypted", {})
    return {
        "rss_growth_mb": round((peak_kb - base_kb) / 1024, 1),
        "rss_base_mb": round(base_kb / 1024, 1),
        "rss_peak_mb": round(peak_kb / 1024, 1),
        "rss_after_mb": round(after_kb / 1024, 1),
        "hwm_growth_mb": round((vm_kb(pid, "VmHWM") - hwm0) / 1024, 1),
        "status_p99_ms": round(pct(ms, 99) or 0.0, 1),
        "status_p50_ms": round(statistics.median(ms), 1),
        "status_max_ms": round(max(ms), 1),
        "status_failures": sum(1 for _, ok in lat if not ok),
        "status_samples": len(lat),
        "baseline_p99_ms": round(pct([m for m, _ in base_lat], 99) or 0.0, 1),
        "baseline_p50_ms": round(statistics.median(m for m, _ in base_lat), 1),
        "keys_ok": round(sum(keys) / len(keys), 3) if keys else None,
        "keys_checks": len(keys),
        "flood_seconds": round(elapsed, 1),
        "flood": dict(sorted(flood.stats.items())),
        "agent_counters": counters,
        "sessions_expired_during_flood": (e1.get("sessions_expired", 0)
                                          - e0.get("sessions_expired", 0)),
    }


# ---------------------------------------------------------------- 4. handshake replay


def pair_snapshot(lab: Lab) -> dict[str, Any]:
    snap: dict[str, Any] = {"peers": {}, "expired": {}}
    for a, b in (("h1", "h2"), ("h2", "h1"), ("h1", "h3"), ("h3", "h1")):
        p = peer_info(lab, a, b)
        if p is None:
            raise BenchError(f"{a} has no peer {b} on {NET}")
        snap["peers"][f"{a}->{b}"] = p
    for h in HOSTS:
        st = api(lab, h, "status", timeout=30) or {}
        snap["expired"][h] = int(st.get("datapath", {}).get("encrypted", {})
                                 .get("sessions_expired", 0))
    return snap


def handshake_replay(lab: Lab, packets: list[tuple[str, str, int, int, bytes]],
                     args: argparse.Namespace, procs: list[subprocess.Popen[str]]
                     ) -> dict[str, Any]:
    ip1, ip2 = lab.underlay_ip("h1"), lab.underlay_ip("h2")

    def first(src: str, dst: str) -> bytes:
        for s, d, _, dport, p in packets:
            if (s, d, dport) == (src, dst, DP_PORT) and is_initiation(p):
                return p
        raise BenchError(f"no initiation {src} -> {dst} was captured")

    from1, from2 = first(ip1, ip2), first(ip2, ip1)
    # A sandbox on h2 to ping, and the path to it working before anything is measured.
    procs.append(subprocess.Popen(
        [MESHCTL, "--socket", str(lab.socket_path("h2")), "run", "--network", NET, "--name",
         "tgt", "--", "sleep", "1000000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        text=True))
    tgt = wait(lambda: endpoint_ip(lab, "h1", "tgt"), 60, "the ping target sandbox")
    wait(lambda: ctl(lab, "h1", "run", "--network", NET, "--", "ping", "-n", "-c", "1", "-W",
                     "1", tgt).returncode == 0, 60, "a first ping across the overlay", 1.0)
    seconds = args.replay_seconds
    before = pair_snapshot(lab)
    stop = threading.Event()
    sent = [0]

    def replay() -> None:
        s1, s2 = Spoofer(lab.host_ns("h1")), Spoofer(lab.host_ns("h2"))
        try:
            t = time.monotonic()
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    s1.send(from1, (ip1, DP_PORT), (ip2, DP_PORT))  # h1's, "from h1", to h2
                    s2.send(from2, (ip2, DP_PORT), (ip1, DP_PORT))  # h2's, "from h2", to h1
                    sent[0] += 1
                t += 1 / args.replay_rate
                stop.wait(max(0.0, t - time.monotonic()))
        finally:
            s1.close()
            s2.close()

    attacker = threading.Thread(target=replay, daemon=True)
    pinger = subprocess.Popen(
        [MESHCTL, "--socket", str(lab.socket_path("h1")), "run", "--network", NET, "--",
         "ping", "-n", "-O", "-i", "1", "-W", "1", "-c", str(seconds), tgt],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs.append(pinger)
    attacker.start()
    t0 = time.monotonic()
    gaps: list[dict[str, Any]] = []
    polls = 0
    try:
        while pinger.poll() is None and time.monotonic() - t0 < seconds + 60:
            for a, b in (("h1", "h2"), ("h2", "h1")):
                p = peer_info(lab, a, b)
                if p is not None and not p.get("established"):
                    gaps.append({"t": round(time.monotonic() - t0, 1), "side": f"{a}->{b}"})
            polls += 1
            time.sleep(1.0)
        out, _ = pinger.communicate(timeout=30)
    finally:
        stop.set()
        attacker.join(5)
    elapsed = time.monotonic() - t0
    after = pair_snapshot(lab)
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out or "")
    if not m:
        raise BenchError(f"no ping summary: {(out or '')[-300:]!r}")
    transmitted, received = int(m.group(1)), int(m.group(2))
    late = [int(x) for x in re.findall(r"no answer yet for icmp_seq=(\d+)", out)]

    def delta(side: str, key: str) -> int:
        return int(after["peers"][side][key]) - int(before["peers"][side][key])

    def drops(side: str, prefix: str = "", names: tuple[str, ...] = ()) -> int:
        a, b = after["peers"][side]["drops"], before["peers"][side]["drops"]
        keys = [k for k in a if (prefix and k.startswith(prefix)) or k in names]
        return sum(int(a[k]) - int(b.get(k, 0)) for k in keys)

    def refusals(side: str) -> dict[str, int]:
        a, b = after["peers"][side]["drops"], before["peers"][side]["drops"]
        return {k.removeprefix("handshake_"): int(a[k]) - int(b.get(k, 0)) for k in sorted(a)
                if k.startswith("handshake_") and int(a[k]) != int(b.get(k, 0))}

    expected = max(1, math.floor(seconds / args.rekey_after) - 1)
    victim = {s: delta(s, "rekeys") for s in ("h1->h2", "h2->h1")}
    control = {s: delta(s, "rekeys") for s in ("h1->h3", "h3->h1")}
    completed = min(victim.values())
    return {
        "handshake_ok": round(min(1.0, completed / expected), 3),
        "rekeys_expected_per_side": expected,
        "rekeys_completed": victim,
        "rekeys_control_h1_h3": control,
        "handshakes_completed": {s: delta(s, "handshakes") for s in ("h1->h2", "h2->h1")},
        "sa_expired": sum(after["expired"][h] - before["expired"][h] for h in ("h1", "h2")),
        "sa_expired_h3": after["expired"]["h3"] - before["expired"]["h3"],
        "sa_drops": {s: drops(s, names=("expired", "no_sa")) for s in ("h1->h2", "h2->h1")},
        "replays_refused": {s: drops(s, prefix="handshake_") for s in ("h2->h1", "h1->h2")},
        "handshake_drops_by_reason": {s: refusals(s) for s in ("h2->h1", "h1->h2")},
        "replays_sent_per_direction": sent[0],
        "replay_rate_achieved": round(sent[0] / elapsed, 1) if elapsed else None,
        "overlay_ping_loss": round(1 - received / transmitted, 4) if transmitted else None,
        "overlay_pings": {"transmitted": transmitted, "received": received,
                          "no_answer_within_1s": late[:50]},
        "established_gaps": gaps[:50],
        "established_polls": polls,
        "guard_h2": (api(lab, "h2", "status") or {}).get("datapath", {}).get("encrypted", {})
        .get("handshake_guard"),
        "seconds": round(elapsed, 1),
    }


# ---------------------------------------------------------------- main


def measure(args: argparse.Namespace) -> dict[str, Any]:
    prefix = f"mna{os.getpid() % 10000:04d}"
    lab = Lab(prefix=prefix)
    atk_ns = f"{prefix}-atk"
    procs: list[subprocess.Popen[str]] = []
    started = time.monotonic()
    try:
        lab.up(len(HOSTS), profile="lan-fast",
               agent_args=["--rekey-after", f"{args.rekey_after:g}",
                           "--reject-after", f"{args.reject_after:g}"])
        wait(lambda: all(sorted(m["name"] for m in api(lab, h, "members") or []
                                if m["state"] == "alive") == list(HOSTS) for h in HOSTS),
             60, "membership to converge")
        attacker_up(lab, atk_ns)
        ring = Keyring.from_key_file(lab.key_path)
        packets = capture(lab, args.rekey_after)
        amp = amplification(lab, atk_ns, ring, packets)
        flood = stream_flood(lab, atk_ns, ring, args)
        hs = handshake_replay(lab, packets, args, procs)
    finally:
        # Cleanup must not be cut short by a second Ctrl-C.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for h in HOSTS:  # never leave an agent stopped (SIGSTOP in capture)
                with contextlib.suppress(Exception):
                    os.kill(agent_pid(lab, h), signal.SIGCONT)
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            netns.delete(atk_ns)
            lab.down()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    amp_max = amp["max"]
    result: dict[str, Any] = {
        "amplification_max": amp_max,
        "amplification_max_target": TARGET_AMPLIFICATION,
        "amplification_by_type": amp["by_type"],
        "rss_growth_mb_under_stream_flood": flood["rss_growth_mb"],
        "rss_growth_mb_under_stream_flood_target": TARGET_RSS_GROWTH_MB,
        "status_latency_ms_p99_under_flood": flood["status_p99_ms"],
        "status_latency_ms_p99_under_flood_target": TARGET_STATUS_P99_MS,
        "status_latency_ms_p99_baseline": flood["baseline_p99_ms"],
        "handshake_ok_under_replay": hs["handshake_ok"],
        "handshake_ok_under_replay_target": TARGET_HANDSHAKE_OK,
        "sa_expired": hs["sa_expired"],
        "sa_expired_target": 0,
        "overlay_ping_loss": hs["overlay_ping_loss"],
    }
    result["targets_met"] = {
        "amplification_max": amp_max is not None and amp_max <= TARGET_AMPLIFICATION,
        "rss_growth_mb_under_stream_flood": flood["rss_growth_mb"] <= TARGET_RSS_GROWTH_MB,
        "status_latency_ms_p99_under_flood": flood["status_p99_ms"] <= TARGET_STATUS_P99_MS,
        "handshake_ok_under_replay": hs["handshake_ok"] >= TARGET_HANDSHAKE_OK
        and hs["sa_expired"] == 0,
    }
    result.update({
        "amplification": {k: amp[k] for k in ("bytes_in", "bytes_out", "agent_counters",
                                               "detail")},
        "stream_flood": {k: v for k, v in flood.items()
                         if k not in ("rss_growth_mb", "status_p99_ms", "baseline_p99_ms")},
        "handshake_replay": {k: v for k, v in hs.items()
                             if k not in ("handshake_ok", "sa_expired", "overlay_ping_loss")},
        "hosts": len(HOSTS),
        "profile": "lan-fast",
        "rekey_after_s": args.rekey_after,
        "reject_after_s": args.reject_after,
        "replay_seconds": args.replay_seconds,
        "replay_rate": args.replay_rate,
        "captured_datagrams": len(packets),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "wall_s": round(time.monotonic() - started, 1),
    })
    return result


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replay-seconds", type=int, default=300,
                    help="how long the captured initiations are replayed (and pings run)")
    ap.add_argument("--replay-rate", type=float, default=100.0,
                    help="replayed initiations per second, each direction")
    ap.add_argument("--rekey-after", type=float, default=3.0, help="agents' --rekey-after")
    ap.add_argument("--reject-after", type=float, default=6.0, help="agents' --reject-after")
    ap.add_argument("--status-samples", type=int, default=50,
                    help="meshctl status runs, without and during the flood")
    ap.add_argument("--flood-seconds", type=float, default=20.0,
                    help="the stream flood lasts at least this long")
    ap.add_argument("--udp-flood-pps", type=int, default=5000,
                    help="UDP garbage datagrams per second during the stream flood")
    ap.add_argument("--reconnect-s", type=float, default=0.25,
                    help="a flood connection closed by the agent is reopened after this long")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/attack.py needs root (network namespaces)", file=sys.stderr)
        return 1
    if args.replay_seconds < 2 * args.rekey_after or args.replay_rate <= 0:
        print("bench/attack.py: --replay-seconds must cover two rekeys, --replay-rate > 0",
              file=sys.stderr)
        return 2

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        result = measure(args)
    except BenchError as e:
        print(f"bench/attack.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench/attack.py: interrupted; the lab and our namespace are removed",
              file=sys.stderr)
        return 130
    if not args.json:
        for k, v in result.items():
            print(f"{k}: {v}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
