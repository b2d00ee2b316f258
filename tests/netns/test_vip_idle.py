"""A connection through a VIP left idle for 120 s still works (issue 17; moby#31208: IPVS's
idle timeout silently broke such connections in Docker). Ours leaves established VIP
connections to the kernel's conntrack default (5 days).

The agent's VIP shell (agent/vips.py) programs a client namespace's table exactly as it does a
sandbox's, towards a server namespace. To keep the suite short, the connection is opened by
the first netns test of the session and checked by the last test of the session (see
pytest_collection_modifyitems in conftest.py), so the 120 s overlap the rest of the suite.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import new_prefix, require_root

from meshnet.agent.vips import VipBalancer
from meshnet.platform import netns, nsfd
from meshnet.platform.loopthread import LoopThread

pytestmark = pytest.mark.netns

IDLE_S = 120.0
PORT = 8080
VIP, BACKEND = "10.78.0.100", "10.78.0.2"


@dataclass
class Idle:
    conn: socket.socket
    opened_at: float
    balancer: VipBalancer
    client: str


@pytest.fixture(scope="session")
def idle_connection() -> Iterator[Idle]:
    require_root()
    prefix = new_prefix()
    client, server = f"{prefix}-ic", f"{prefix}-is"
    held: list[socket.socket] = []
    nl = LoopThread()
    try:
        for ns in (client, server):
            netns.add(ns)
            netns.ip("link", "set", "lo", "up", ns=ns)
        netns.ip("link", "add", f"{prefix}a", "netns", client, "type", "veth", "peer", "name",
                 f"{prefix}b", "netns", server)
        netns.ip_batch([f"addr add 10.78.0.1/24 dev {prefix}a", f"link set {prefix}a up"],
                       ns=client)
        netns.ip_batch([f"addr add {BACKEND}/24 dev {prefix}b", f"link set {prefix}b up"],
                       ns=server)
        listener = nsfd.open_socket_in_netns(server, socket.AF_INET, socket.SOCK_STREAM,
                                             ("0.0.0.0", PORT), reuse_addr=True)
        held.append(listener)
        listener.listen(8)

        def echo() -> None:  # one connection at a time: echo what it sends until it closes
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                held.append(conn)
                while data := conn.recv(64):
                    conn.sendall(data)

        threading.Thread(target=echo, daemon=True).start()
        sandboxes = SimpleNamespace(state=None, store=None, node="t", live={})
        balancer = VipBalancer(sandboxes, nl)  # type: ignore[arg-type]
        asyncio.run(balancer.program(client, {VIP: (BACKEND,)}))
        assert balancer.counters["apply_errors"] == 0
        conn = nsfd.call_in_netns(client, socket.socket)
        held.append(conn)
        conn.settimeout(5.0)
        conn.connect((VIP, PORT))
        conn.sendall(b"hello")
        assert conn.recv(64) == b"hello"
        yield Idle(conn, time.monotonic(), balancer, client)
    finally:
        for s in held:
            s.close()
        nl.stop()
        for ns in (client, server):
            netns.delete(ns)


@pytest.mark.run_first
def test_a_connection_through_the_vip_is_opened(idle_connection: Idle) -> None:
    """DNATed by our table: the kernel tracks it with the established timeout it has for any
    connection (nothing of ours shortens it)."""
    entries = netns.run(netns.exec_argv(idle_connection.client, ["nft", "list", "table", "ip",
                                                                  "meshnet_vip"])).stdout
    assert VIP in entries and BACKEND in entries
    conntrack = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established")
    timeout = int(conntrack.read_text())
    assert timeout >= IDLE_S  # the kernel default is 432000 s (5 days)


@pytest.mark.run_last
def test_the_vip_connection_still_works_after_120_s_idle(idle_connection: Idle) -> None:
    left = IDLE_S - (time.monotonic() - idle_connection.opened_at)
    if left > 0:
        time.sleep(left)  # only what the rest of the suite did not already spend
    idle_for = time.monotonic() - idle_connection.opened_at
    assert idle_for >= IDLE_S
    idle_connection.conn.sendall(b"still there?")
    assert idle_connection.conn.recv(64) == b"still there?"
    print(f"the connection through the VIP answered after {idle_for:.0f} s idle")
