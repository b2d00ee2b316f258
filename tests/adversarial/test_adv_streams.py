"""Streams before authentication (issue #14), against a real agent on loopback, by a client
without the cluster key. Before the fix (seen failing on 3ac6cc7):
- a frame announced as 24 MiB was buffered whole before any authentication, so 16 of them
  grew the agent by ~400 MB (128 by over 3 GiB);
- 129 idle connections held every stream slot, so a member's key operation was refused;
- a client sending one byte a second held its slot for the full 10 s stream timeout.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

pytestmark = pytest.mark.netns  # several loopback addresses, real agents

ANNOUNCED = 24 << 20
ATTACKER_IP = "127.0.0.250"


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def member(agents: Any, key_file: Path) -> tuple[Any, Any]:
    a = agents("a", key_file).start()
    b = agents("b", key_file).start(join=[a.addr])
    wait_for(lambda: {n for n, m in a.members().items() if m["state"] == "alive"} == {"a", "b"},
             15, "a and b to see each other")
    return a, b


def flood(dst: tuple[str, int], payload: bytes) -> None:
    """Announce a 24 MiB frame and send it, as fast as the agent takes it."""
    try:
        with socket.create_connection(dst, timeout=20, source_address=(ATTACKER_IP, 0)) as s:
            s.sendall(struct.pack(">I", ANNOUNCED) + payload)
            s.settimeout(5)
            s.recv(1)
    except OSError:
        pass  # the agent hung up on us: what it should do


def test_pre_auth_frames_are_not_buffered(agents: Any, key_file: Path) -> None:
    _, b = member(agents, key_file)
    assert b.proc is not None
    base = rss_kb(b.proc.pid, "VmRSS")
    payload = os.urandom(ANNOUNCED)
    threads = [threading.Thread(target=flood, args=((b.ip, b.port), payload))
               for _ in range(16)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    grew_mb = (rss_kb(b.proc.pid, "VmHWM") - base) / 1024
    assert grew_mb <= 64, f"16 unauthenticated 24 MiB frames grew the agent by {grew_mb:.0f} MB"
    assert time.monotonic() - started < 30
    assert b.ctl_json("status")["gossip"]["auth_failures"] >= 16


class IdleConnections:
    """COUNT connections to DST that send nothing, reopened whenever the agent closes one."""

    def __init__(self, dst: tuple[str, int], count: int) -> None:
        self.dst, self.count = dst, count
        self.stop = threading.Event()
        self.refused = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        socks: list[socket.socket] = []
        try:
            while not self.stop.is_set():
                while len(socks) < self.count:
                    try:
                        socks.append(socket.create_connection(
                            self.dst, timeout=2, source_address=(ATTACKER_IP, 0)))
                    except OSError:
                        self.refused += 1
                        break
                for s in list(socks):
                    s.setblocking(False)
                    try:
                        if s.recv(1) == b"":
                            raise ConnectionResetError
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass
                    s.close()
                    socks.remove(s)
                time.sleep(0.05)
        finally:
            for s in socks:
                s.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def test_idle_connections_from_one_address_cannot_take_every_stream_slot(
        agents: Any, key_file: Path) -> None:
    a, b = member(agents, key_file)
    idle = IdleConnections((b.ip, b.port), 129)
    try:
        time.sleep(1.5)
        r = a.ctl("--json", "keys", "list")
        assert r.returncode == 0, r.stderr
    finally:
        idle.close()
    import json
    doc = json.loads(r.stdout)
    assert doc["acked"] == 2 and not doc["errors"], doc
    assert b.ctl_json("status")["gossip"]["streams_refused_per_source"] > 0


def test_a_slowloris_loses_its_slot_at_the_head_deadline(agents: Any, key_file: Path) -> None:
    _, b = member(agents, key_file)
    with socket.create_connection((b.ip, b.port), timeout=15,
                                  source_address=(ATTACKER_IP, 0)) as s:
        started = time.monotonic()
        closed_after = None
        # The old framing's 4-byte length announces a modest 4 KiB frame, then trickles it.
        trickle = b"\0\0\x10\0" + b"A" * 11
        for byte in trickle:
            try:
                s.sendall(bytes([byte]))
                s.settimeout(1.0)
                if s.recv(1) == b"":
                    closed_after = time.monotonic() - started
                    break
            except TimeoutError:
                continue
            except OSError:
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None and closed_after < 5.0, \
        f"a 1 byte/s client kept its stream slot {closed_after or 15:.1f} s"
    assert b.ctl_json("status")["gossip"]["stream_head_timeouts"] >= 1
