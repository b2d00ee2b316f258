"""Attacks of issue #14 replayed against real agents: each test failed on the code before the
fix (the commit is named in the test's docstring) and passes after it.

The fixtures are those of tests/netns (real hosts as network namespaces) and
tests/integration (agents on loopback), loaded by path: both directories call their module
`conftest`, so they cannot simply be imported."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_HERE = Path(__file__).resolve().parent
netns = _load("meshnet_tests_netns_conftest", _HERE.parent / "netns" / "conftest.py")
integration = _load("meshnet_tests_integration_conftest",
                    _HERE.parent / "integration" / "conftest.py")

# Fixtures (pytest finds them by name in this module).
lab_factory = netns.lab_factory
cluster = netns.cluster
test_ca = integration.test_ca
key_file = integration.key_file
agents = integration.agents

# Helpers, for `from conftest import ...`.
Cluster = netns.Cluster
inject_record = netns.inject_record
send_udp_from = netns.send_udp_from
task_trees = netns.task_trees
wait = netns.wait
wait_for = integration.wait_for
free_port = integration.free_port


class LoopbackCapture:
    """Records the UDP payloads that cross the loopback device to DST (an ip:port), as an
    attacker on the path would: with AF_PACKET, so nothing of the agents is involved."""

    def __init__(self, dst: tuple[str, int]) -> None:
        import socket
        import threading

        self.dst = dst
        self.payloads: list[tuple[tuple[str, int], bytes]] = []
        self._sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self._sock.bind(("lo", 0))
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import socket
        import struct

        while not self._stop.is_set():
            try:
                frame, meta = self._sock.recvfrom(70000)
            except TimeoutError:
                continue
            if meta[2] == socket.PACKET_OUTGOING:
                continue  # loopback shows each packet twice: keep the receiving copy
            ip = frame[14:]
            if len(ip) < 28 or ip[0] >> 4 != 4 or ip[9] != 17:
                continue
            ihl = (ip[0] & 0x0F) * 4
            src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
            sport, dport, length = struct.unpack_from(">HHH", ip, ihl)
            if (dst, dport) == self.dst:
                self.payloads.append(((src, sport), bytes(ip[ihl + 8: ihl + length])))

    def stop(self) -> list[tuple[tuple[str, int], bytes]]:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        return self.payloads


def open_gossip(keyring: object, data: bytes) -> bytes | None:
    """The plaintext of a captured gossip datagram, in the format before #14 (a bare seal) or
    after it (a freshness value in front); None if it opens as neither."""
    for attempt in (lambda: keyring.open(data, 1),  # type: ignore[attr-defined]
                    lambda: keyring.open(data[18:], 3, data[:18])):  # type: ignore[attr-defined]
        try:
            return bytes(attempt())
        except Exception:
            continue
    return None


def seal_gossip(keyring: object, plain: bytes, sender: str = "stranger") -> bytes:
    """A datagram a key holder would send, in the format of the code under test (before #14
    a bare seal, after it a fresh freshness value in front)."""
    from meshnet.agent import gossip

    if hasattr(gossip.Sealer, "seal_datagram"):
        sealer = _SEALERS.get((id(keyring), sender))
        if sealer is None:
            sealer = _SEALERS[(id(keyring), sender)] = gossip.Sealer(keyring, sender)  # type: ignore[arg-type]
        return bytes(sealer.seal_datagram(plain))
    return bytes(keyring.seal(plain, 1))  # type: ignore[attr-defined]


_SEALERS: dict[tuple[int, str], object] = {}
