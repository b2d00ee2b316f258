"""Adversarial (#14, the handshake part), end to end: real agents on lab hosts (root), an
attacker on the underlay who captured handshake initiations and sends them again with the
victim's own source address and port (raw IP, so even the UDP port is the datapath's 4790).

1. Replay starvation: with short rekey settings (rekey 3 s, reject 6 s), one captured
   initiation per direction replayed 50 times a second for 20 s: the pair keeps rekeying and
   its SAs never expire.
2. Restart: initiations captured before h2's agent was killed and started again are refused by
   the new process (and counted), not answered.
"""

from __future__ import annotations

import importlib.util
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from meshnet.platform import nsfd

# The lab fixtures and helpers of tests/netns (not a package: load its conftest by path).
_spec = importlib.util.spec_from_file_location(
    "_adv_netns_conftest", Path(__file__).resolve().parents[1] / "netns" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_netns = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _netns
_spec.loader.exec_module(_netns)
Cluster = _netns.Cluster
UnderlayCapture = _netns.UnderlayCapture
wait = _netns.wait
cluster = _netns.cluster  # fixtures
lab_factory = _netns.lab_factory

pytestmark = pytest.mark.netns

PORT = 4790
INITIATION = 1


def udp_datagrams(frames: list[bytes]) -> list[tuple[str, str, int, int, bytes]]:
    """(source IP, destination IP, source port, destination port, payload) of IPv4/UDP."""
    out = []
    for f in frames:
        if len(f) < 42 or f[12:14] != b"\x08\x00" or f[23] != 17:
            continue
        ihl = (f[14] & 0x0F) * 4
        (tot,) = struct.unpack_from(">H", f, 16)
        sport, dport = struct.unpack_from(">HH", f, 14 + ihl)
        src, dst = socket.inet_ntoa(f[26:30]), socket.inet_ntoa(f[30:34])
        payload = f[14 + ihl + 8 : 14 + tot]
        out.append((src, dst, sport, dport, payload))
    return out


def initiations(cap: Any, src: str, dst: str) -> list[bytes]:
    """Every handshake initiation SRC sent DST, as captured on the underlay switch."""
    return [p for s, d, _, dport, p in udp_datagrams(cap.packets())
            if (s, d, dport) == (src, dst, PORT) and p[:4] == bytes(4) and len(p) > 5
            and p[4] == INITIATION]


class Spoofer:
    """Sends UDP datagrams with any source address and port: a raw IPv4 socket (the kernel
    takes our IP header as is) inside a lab host's namespace."""

    def __init__(self, ns: str) -> None:
        self.sock = nsfd.open_socket_in_netns(ns, socket.AF_INET, socket.SOCK_RAW,
                                              proto=socket.IPPROTO_RAW)

    def send(self, payload: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        udp = struct.pack(">HHHH", src[1], dst[1], 8 + len(payload), 0) + payload  # no csum
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0,
                         socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
        csum = _checksum(ip)
        ip = ip[:10] + struct.pack(">H", csum) + ip[12:]
        self.sock.sendto(ip + udp, (dst[0], 0))

    def close(self) -> None:
        self.sock.close()


def _checksum(header: bytes) -> int:
    total = int(sum(struct.unpack(f">{len(header) // 2}H", header)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def peer(c: Any, host: str, network: str, node: str) -> dict[str, Any]:
    for p in c.ctl_json(host, "network", "inspect", network)["peers"]:
        if p["node"] == node:
            return dict(p)
    raise AssertionError(f"{host} has no peer {node} on {network}")


def handshake_drops(p: dict[str, Any]) -> int:
    return int(sum(n for k, n in p["drops"].items() if k.startswith("handshake_")))


def encrypted_status(c: Any, host: str) -> dict[str, Any]:
    return dict(c.ctl_json(host, "status")["datapath"]["encrypted"])


def test_replayed_initiations_do_not_starve_rekeys(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    c = cluster(2, ("--rekey-after", "3", "--reject-after", "6"))
    lab = c.lab
    ip1, ip2 = lab.underlay_ip("h1"), lab.underlay_ip("h2")
    cap = UnderlayCapture(lab, tmp_path / "handshakes.pcap")
    try:
        cap.wait_ready()
        c.network("adv", "--encrypted")
        # One initiation each way (the first handshake crosses; then the rekeys every 3 s).
        got = wait(lambda: (initiations(cap, ip1, ip2)[:1], initiations(cap, ip2, ip1)[:1])
                   if initiations(cap, ip1, ip2) and initiations(cap, ip2, ip1) else None,
                   30, "an initiation each way on the underlay")
    finally:
        cap.stop()
    (from1,), (from2,) = got
    wait(lambda: peer(c, "h1", "adv", "h2")["established"]
         and peer(c, "h2", "adv", "h1")["established"], 20, "keys both ways")
    start = {h: encrypted_status(c, h)["sessions_expired"] for h in ("h1", "h2")}
    rekeys = {h: peer(c, h, "adv", o)["rekeys"] for h, o in (("h1", "h2"), ("h2", "h1"))}
    drops2 = handshake_drops(peer(c, "h2", "adv", "h1"))

    stop = threading.Event()
    sent = [0]

    def replay() -> None:
        s1, s2 = Spoofer(lab.host_ns("h1")), Spoofer(lab.host_ns("h2"))
        try:
            t = time.monotonic()
            while not stop.is_set():
                s1.send(from1, (ip1, PORT), (ip2, PORT))  # h1's initiation, "from h1", to h2
                s2.send(from2, (ip2, PORT), (ip1, PORT))  # and h2's, "from h2", to h1
                sent[0] += 1
                t += 1 / 50
                stop.wait(max(0.0, t - time.monotonic()))
        finally:
            s1.close()
            s2.close()

    attacker = threading.Thread(target=replay, daemon=True)
    attacker.start()
    gaps: list[tuple[float, str]] = []
    try:
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            for h, o in (("h1", "h2"), ("h2", "h1")):
                if not peer(c, h, "adv", o)["established"]:
                    gaps.append((round(20.0 - (deadline - time.monotonic()), 1), h))
            time.sleep(0.25)
    finally:
        stop.set()
        attacker.join(5)
    assert sent[0] >= 20 * 50 * 0.8, sent
    end = {h: encrypted_status(c, h)["sessions_expired"] for h in ("h1", "h2")}
    after = {h: peer(c, h, "adv", o)["rekeys"] for h, o in (("h1", "h2"), ("h2", "h1"))}
    # The SAs never expired, keys were there at every look, and the pair rekeyed all along
    # (every 3 s: ~6 in 20 s; at least 4 counted on each side).
    assert end == start, (start, end, gaps, peer(c, "h2", "adv", "h1")["drops"])
    assert gaps == [], gaps
    assert all(after[h] >= rekeys[h] + 4 for h in after), (rekeys, after)
    # The replays were refused and counted (by reason, under the peer's handshake_* drops).
    p2 = peer(c, "h2", "adv", "h1")
    assert handshake_drops(p2) >= drops2 + sent[0] * 0.8, p2["drops"]


def test_initiation_captured_before_a_restart_is_refused_after_it(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    c = cluster(2)  # WireGuard's timers: nobody rekeys during the test
    lab = c.lab
    ip1, ip2 = lab.underlay_ip("h1"), lab.underlay_ip("h2")
    cap = UnderlayCapture(lab, tmp_path / "before.pcap")
    try:
        cap.wait_ready()
        c.network("advr", "--encrypted")
        wait(lambda: peer(c, "h1", "advr", "h2")["established"]
             and peer(c, "h2", "advr", "h1")["established"], 20, "keys both ways")
        captured = wait(lambda: initiations(cap, ip1, ip2), 10, "h1's initiation captured")
    finally:
        cap.stop()

    # kill -9 h2's agent and start it again; it gets keys with h1 again (it initiates).
    lab.kill("h2")
    lab.start("h2")
    wait(lambda: c.ctl("h2", "network", "inspect", "advr").returncode == 0
         and peer(c, "h2", "advr", "h1")["established"], 30, "h2 has keys again")
    before = peer(c, "h2", "advr", "h1")

    spoofer = Spoofer(lab.host_ns("h1"))
    try:
        for m in captured:
            spoofer.send(m, (ip1, PORT), (ip2, PORT))
    finally:
        spoofer.close()

    def settled() -> dict[str, Any] | None:
        p = peer(c, "h2", "advr", "h1")
        moved = handshake_drops(p) >= handshake_drops(before) + len(captured)
        return p if moved or p["handshakes"] > before["handshakes"] else None

    p = wait(settled, 10, "h2 to act on the replayed initiations")
    # Refused (and counted), not answered: no new handshake on h2.
    assert p["handshakes"] == before["handshakes"], (before, p)
    assert handshake_drops(p) >= handshake_drops(before) + len(captured), p["drops"]
    # And the genuine pair still works.
    assert peer(c, "h1", "advr", "h2")["established"]
