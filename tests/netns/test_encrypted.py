"""`--encrypted` networks end to end, agent level: real agents on lab hosts negotiate keys and
carry sandbox traffic through the user-space datapath (meshnet/agent/encrypted.py + encdp.py).

A tcpdump on the underlay switch (br0 in the lab's underlay namespace) sees everything between
the hosts. The hosts' eth0 get gso_max_segs 1, so the kernel cuts the datapath's UDP GSO
batches into wire datagrams at the host, as a real NIC would, and the capture sees wire sizes.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
from conftest import PY, Cluster, UnderlayCapture, ro_mount, send_udp_from, wait

from meshnet.agent.encdp import encrypted_overlay_mtu, frame_gso_max
from meshnet.lab import Lab
from meshnet.platform import netns

pytestmark = pytest.mark.netns

PORT = 4790
UNDERLAY_MTU = 1500
MTU = encrypted_overlay_mtu(UNDERLAY_MTU)  # a sandbox's on an encrypted network
GSO_CAP = frame_gso_max(UNDERLAY_MTU)


class Capture(UnderlayCapture):
    def __init__(self, lab: Lab, path: Path) -> None:
        super().__init__(lab, path)
        self.wait_ready()


def ipv4(frame: bytes) -> tuple[str, str, int, int, int, int, bytes] | None:
    """(src, dst, total length, flags+fragment offset, proto, dport, UDP payload or b"")."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    (tot,) = struct.unpack_from(">H", frame, 16)
    (frag,) = struct.unpack_from(">H", frame, 20)
    proto = frame[23]
    src, dst = socket.inet_ntoa(frame[26:30]), socket.inet_ntoa(frame[30:34])
    dport, payload = 0, b""
    if proto in (6, 17) and len(frame) >= 14 + ihl + 8 and not frag & 0x1FFF:
        (dport,) = struct.unpack_from(">H", frame, 14 + ihl + 2)
        if proto == 17:
            payload = frame[14 + ihl + 8: 14 + tot]
    return src, dst, tot, frag, proto, dport, payload


def wire_mode(lab: Lab, hosts: list[str]) -> None:
    for h in hosts:
        netns.ip("link", "set", "dev", "eth0", "gso_max_segs", "1", ns=lab.host_ns(h))


def peer(c: Cluster, host: str, network: str, node: str) -> dict[str, Any]:
    for p in c.ctl_json(host, "network", "inspect", network)["peers"]:
        if p["node"] == node:
            return dict(p)
    raise AssertionError(f"{host} has no peer {node} on {network}")


def fetch(target: str, path: str) -> str:
    """A probe command: GET the marker file, print how many markers came back."""
    return (f"{PY} -c \"import urllib.request as u; "
            f"print('GOT', u.urlopen('http://{target}:8080{path}', timeout=5).read()"
            f".count(b'MESHNET-ENC-'))\"")


def ping(target: str) -> str:
    # The first echo can meet a peer that has not yet learnt the prober's fresh endpoint.
    return f"(ping -c1 -W2 {target} >/dev/null || ping -c1 -W2 {target} >/dev/null)"


def test_encrypted_network_end_to_end(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    c: Cluster = cluster(3)
    lab = c.lab
    hosts = ["h1", "h2", "h3"]
    wire_mode(lab, hosts)
    net = c.network("sec", "--encrypted")
    assert net["encrypted"] is True
    marker = f"MESHNET-ENC-{os.urandom(6).hex()}-".encode()
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    try:
        (www / "m.txt").write_bytes(marker * 8000)  # ~200 KB: GSO super-frames, many records
        path = f"{www}/m.txt"
        cap = Capture(lab, tmp_path / "underlay.pcap")
        try:
            ips = {h: c.serve(h, "sec", f"srv{h[1:]}", *ro_mount(www)) for h in hosts}
            for src in hosts:
                # MTU, and the GSO cap that keeps a super-frame to one UDP_SEGMENT send.
                checks = [f"ip -o link show eth0 | grep -q 'mtu {MTU} '",
                          f"ip -d -o link show eth0 | grep -q 'gso_max_size {GSO_CAP} '"]
                for dst in hosts:
                    if dst != src:
                        checks += [ping(f"srv{dst[1:]}"), fetch(f"srv{dst[1:]}", path),
                                   fetch(ips[dst], path)]
                r = c.probe(src, "sec", " && ".join(checks))
                assert r.returncode == 0, (src, r.stdout, r.stderr)
                assert r.stdout.split().count("8000") == 4, r.stdout
        finally:
            cap.stop()
    finally:
        (www / "m.txt").unlink(missing_ok=True)
        www.rmdir()

    # Nothing in clear on the underlay: no marker, no VXLAN (4789), no overlay address, no
    # datagram above the MTU, no fragment; the overlay's traffic is there, on 4790.
    underlay = {lab.underlay_ip(h) for h in hosts}
    pkts = cap.packets()
    parsed = [p for p in map(ipv4, pkts) if p is not None]
    assert not [p for p in pkts if marker in p], "plaintext marker on the underlay"
    assert not [p for p in parsed if p[4] == 17 and p[5] == 4789], "cleartext VXLAN"
    assert all(p[0] in underlay and p[1] in underlay for p in parsed), "overlay addresses"
    assert not [p for p in parsed if p[3] & 0x3FFF], "IP fragments on the underlay"
    assert max(p[2] for p in parsed) <= UNDERLAY_MTU
    records = [p for p in parsed if p[4] == 17 and p[5] == PORT and p[6][:4] != bytes(4)]
    assert sum(len(p[6]) for p in records) > 3 * 8000 * len(marker), "overlay traffic missing"
    for h in hosts:  # an encrypted network has no kernel VXLAN device, ever
        links = lab.exec(h, ["ip", "-o", "link"], capture_output=True).stdout
        assert "mnvx-" not in links and f"mnet-{net['vni']:06x}" in links, links

    # inspect: per peer SPIs, age, packets, bytes, rekeys, drops by reason; status: the datapath
    p12 = peer(c, "h1", "sec", "h2")
    assert p12["established"] and p12["spi"] and p12["inbound_spis"] and p12["packets"] > 0
    assert p12["bytes"] > 0 and p12["age"] is not None and p12["rekeys"] == 0
    assert {"replay", "auth", "unknown_spi", "expired"} <= set(p12["drops"])
    enc = c.ctl_json("h1", "status")["datapath"]["encrypted"]
    assert enc["kind"] == "userspace-aes-256-gcm" and enc["peers"] == 2 and enc["running"]

    # A replayed record is dropped and counted; so is a tampered one (a fresh sequence number,
    # so it gets past the window to the tag); the stream is not disturbed by either.
    ip1, ip2 = lab.underlay_ip("h1"), lab.underlay_ip("h2")
    h1_to_h2 = [p[6] for p in records if p[0] == ip1 and p[1] == ip2 and len(p[6]) < 400]
    assert h1_to_h2, "no small h1 -> h2 record captured"
    rec = h1_to_h2[-1]
    before = peer(c, "h2", "sec", "h1")["drops"]
    send_udp_from(lab.host_ns("h1"), rec, (ip2, PORT))
    wait(lambda: peer(c, "h2", "sec", "h1")["drops"]["replay"] > before["replay"], 10,
         "replay counted")
    spi, seq = struct.unpack_from(">IQ", rec)
    forged = struct.pack(">IQ", spi, seq + 1_000_000) + rec[12:]
    flipped = bytearray(struct.pack(">IQ", spi, seq + 1_000_001) + rec[12:])
    flipped[20] ^= 0x01
    send_udp_from(lab.host_ns("h1"), forged, (ip2, PORT))
    send_udp_from(lab.host_ns("h1"), bytes(flipped), (ip2, PORT))
    wait(lambda: peer(c, "h2", "sec", "h1")["drops"]["auth"] >= before["auth"] + 2, 10,
         "tampered records counted")
    r = c.probe("h1", "sec", f"{ping('srv2')} && {fetch('srv2', '/etc/hostname')}")
    assert r.returncode == 0 and "GOT" in r.stdout, r.stdout + r.stderr

    # kill -9 h2's agent and start it again: a new handshake, and traffic flows again.
    handshakes = peer(c, "h1", "sec", "h2")["handshakes"]
    lab.kill("h2")
    lab.start("h2")
    c.serve("h2", "sec", "back")
    wait(lambda: peer(c, "h1", "sec", "h2")["handshakes"] > handshakes, 20, "a new handshake")
    for src in ("h1", "h3"):
        r = c.probe(src, "sec", f"{ping('back')} && {fetch('back', '/etc/hostname')}")
        assert r.returncode == 0 and "GOT" in r.stdout, (src, r.stdout, r.stderr)

    # The last encrypted network removed: every host stops its datapath (the UDP port, the TAP
    # and the sessions go with it).
    c.close()
    wait(lambda: c.ctl("h1", "network", "rm", "sec").returncode == 0, 30, "network rm")
    for h in hosts:
        wait(lambda h=h: not c.ctl_json(h, "status")["datapath"]["encrypted"]["running"], 15,
             f"{h}: encrypted datapath stopped")
        udp = lab.exec(h, ["ss", "-Hunl"], capture_output=True).stdout
        assert f":{PORT} " not in udp, (h, udp)
        assert "mnet-" not in lab.exec(h, ["ip", "-o", "link"], capture_output=True).stdout


STREAM_SERVER = r"""
import socket, struct, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5001)); s.listen(1)
c, _ = s.accept(); n = 0; buf = b""; bad = 0
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    buf += d
    k = len(buf) // 8
    for i in range(k):
        if struct.unpack_from(">Q", buf, 8 * i)[0] != n + i:
            bad += 1
    n += k; buf = buf[8 * k:]
c.sendall(f"{n} {bad} {len(buf)}".encode()); c.close()
"""

STREAM_CLIENT = r"""
import os, socket, struct, sys
for _ in range(50):
    try:
        c = socket.create_connection((sys.argv[1], 5001), timeout=20); break
    except OSError:
        import time; time.sleep(0.2)
n = 0
print("connected", flush=True)
while not os.path.exists(sys.argv[2]):
    c.sendall(b"".join(struct.pack(">Q", n + i) for i in range(4096))); n += 4096
c.shutdown(socket.SHUT_WR)
print("sent", n, "got", c.recv(100).decode(), flush=True)
"""


def test_tcp_stream_crosses_rekeys(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    c: Cluster = cluster(2, ("--rekey-after", "3", "--reject-after", "6"))
    c.network("rk", "--encrypted")
    stop = tmp_path / "stop"
    try:
        server = c.background("h2", "run", "--network", "rk", "--name", "sink", "--",
                              PY, "-c", STREAM_SERVER)
        wait(lambda: c.endpoint_ip("h1", "rk", "sink"), 20, "sink published")
        client = c.background("h1", "run", "--network", "rk", *ro_mount(tmp_path), "--", PY,
                              "-c", STREAM_CLIENT, "sink", str(stop))
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "connected"
        start = peer(c, "h1", "rk", "h2")["rekeys"]
        wait(lambda: peer(c, "h1", "rk", "h2")["rekeys"] >= start + 3, 40, "three rekeys")
        stop.touch()
        out, err = client.communicate(timeout=30)
        assert client.returncode == 0, out + err
        words = out.split()
        sent, got, bad, tail = int(words[1]), int(words[3]), int(words[4]), int(words[5])
        assert sent > 0 and got == sent and bad == 0 and tail == 0, out
        server.communicate(timeout=10)
        assert server.returncode == 0
    finally:
        stop.unlink(missing_ok=True)
    p = peer(c, "h1", "rk", "h2")
    assert p["rekeys"] >= start + 3 and p["drops"]["auth"] == 0 and p["drops"]["replay"] == 0, p


def test_chacha20_poly1305_option(cluster) -> None:  # type: ignore[no-untyped-def]
    """`--overlay-cipher chacha20-poly1305`: the handshake agrees on it, the SAs use it, and
    sandboxes reach each other by name over it."""
    c: Cluster = cluster(2, ("--overlay-cipher", "chacha20-poly1305"))
    c.network("secc", "--encrypted")
    c.serve("h2", "secc", "web")
    r = c.probe("h1", "secc", f"{ping('web')} && {fetch('web', '/etc/hostname')}")
    assert r.returncode == 0 and "GOT" in r.stdout, r.stdout + r.stderr
    p = peer(c, "h1", "secc", "h2")
    assert p["established"] and p["cipher"] == "chacha20-poly1305" and p["rx_packets"] > 0, p
    enc = c.ctl_json("h1", "status")["datapath"]["encrypted"]
    assert enc["kind"] == "userspace-chacha20-poly1305" and enc["running"], enc
