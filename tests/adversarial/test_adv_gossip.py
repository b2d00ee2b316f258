"""Gossip replay and amplification (issue #14), against real agents on loopback.

An attacker without the cluster key captures sealed gossip datagrams on the wire and replays
them to a member from a victim's address. Before the fix (seen failing on 3ac6cc7):
- a captured Ping was answered with its ack and every broadcast that fitted (28x its size);
- a captured, by then stale, Suspect about the member drew the member's full alive (33x).
After it, a replay is dropped by the freshness window, and a source that is not a member at
its address is never sent more bytes than it sent.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import LoopbackCapture, open_gossip, seal_gossip, wait_for

from meshnet.crypto.keyring import Keyring
from meshnet.membership.messages import Ping, Suspect, decode_packet

pytestmark = pytest.mark.netns  # AF_PACKET capture needs root

VICTIM_IP = "127.0.0.222"


def replay(payloads: list[bytes], dst: tuple[str, int], listen: float = 2.0) -> tuple[int, int]:
    """Send each payload once from the victim's address; (bytes sent, bytes the victim got)."""
    victim = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    victim.bind((VICTIM_IP, 0))
    victim.settimeout(0.1)
    sent = received = 0
    try:
        for p in payloads:
            victim.sendto(p, dst)
            sent += len(p)
        deadline = time.monotonic() + listen
        while time.monotonic() < deadline:
            try:
                received += len(victim.recv(70000))
            except TimeoutError:
                continue
    finally:
        victim.close()
    return sent, received


def messages(ring: Keyring, payload: bytes) -> list[Any]:
    plain = open_gossip(ring, payload)
    return [] if plain is None else decode_packet(plain)


def gossip_counters(agent: Any) -> dict[str, int]:
    return dict(agent.ctl_json("status")["gossip"])


def busy(agent: Any) -> None:
    """Give AGENT news to gossip (store writes), as a live cluster always has some: it is what
    an answer would carry piggybacked."""
    for i in range(4):
        r = agent.ctl("network", "create", f"busy{time.monotonic_ns() % 10**8}x{i}")
        assert r.returncode == 0, r.stderr


def two_members(agents: Any, key_file: Path) -> tuple[Any, Any]:
    a = agents("a", key_file).start()
    b = agents("b", key_file).start(join=[a.addr])
    wait_for(lambda: {n for n, m in b.members().items() if m["state"] == "alive"} == {"a", "b"},
             15, "a and b to see each other")
    return a, b


def test_captured_pings_replayed_from_a_victim_draw_nothing(agents: Any, key_file: Path) -> None:
    _, b = two_members(agents, key_file)
    ring = Keyring.from_key_file(str(key_file))
    cap = LoopbackCapture((b.ip, b.port))
    time.sleep(3)
    captured = cap.stop()
    pings = [p for _, p in captured if any(isinstance(m, Ping) for m in messages(ring, p))]
    assert pings, f"no ping to b among {len(captured)} captured datagrams"
    before = gossip_counters(b)
    busy(b)
    sent, received = replay(pings, (b.ip, b.port))
    assert received <= sent, f"amplification {received / sent:.1f}x ({received} B for {sent} B)"
    after = gossip_counters(b)
    assert after["fresh_duplicate"] - before["fresh_duplicate"] == len(pings)


def test_a_replayed_stale_suspect_draws_no_alive(agents: Any, key_file: Path) -> None:
    a = agents("a", key_file).start()
    b = agents("b", key_file).start(join=[a.addr])
    c = agents("c", key_file).start(join=[a.addr])
    wait_for(lambda: all(len([m for m in x.members().values() if m["state"] == "alive"]) == 3
                         for x in (a, b, c)), 15, "three members")
    ring = Keyring.from_key_file(str(key_file))
    cap = LoopbackCapture((b.ip, b.port))
    assert b.proc is not None
    os.kill(b.proc.pid, signal.SIGSTOP)  # b stalls: the others suspect it and tell it so
    try:
        wait_for(lambda: any(x.members().get("b", {}).get("state") == "suspect" for x in (a, c)),
                 10, "b to be suspected")
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    wait_for(lambda: all(x.members().get("b", {}).get("state") == "alive" for x in (a, c)),
             15, "b to refute")
    captured = cap.stop()
    suspects = [p for _, p in captured
                if any(isinstance(m, Suspect) and m.node == "b" for m in messages(ring, p))]
    assert suspects, "no suspect about b was captured"
    busy(b)
    sent, received = replay(suspects, (b.ip, b.port))
    assert received <= sent, f"amplification {received / sent:.1f}x ({received} B for {sent} B)"
    assert gossip_counters(b)["fresh_duplicate"] >= len(suspects)


def test_a_key_holder_at_a_non_member_address_gets_no_more_than_it_sent(
        agents: Any, key_file: Path) -> None:
    """Not a replay: fresh pings sealed with the key, from an address no member has. The
    answer is the bare ack, smaller than the ping (no piggybacked broadcasts)."""
    _, b = two_members(agents, key_file)
    busy(b)
    ring = Keyring.from_key_file(str(key_file))
    pings = [seal_gossip(ring, Ping(i, "b", "a").encode()) for i in range(20)]
    sent, received = replay(pings, (b.ip, b.port))
    assert 0 < received <= sent, f"{received} B answered for {sent} B"
    assert gossip_counters(b)["answers_bare"] >= 20
