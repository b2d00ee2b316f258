"""HTTP GET of a lab agent's /metrics or /health, from inside a lab namespace (the underlay
is reachable only there): for tests, benchmarks and the walkthrough.

The socket is made inside the namespace (platform/nsfd.py) and used from the caller's thread;
nothing runs in the namespace but the kernel's side of one TCP connection.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from meshnet.platform import nsfd

# The lab's /metrics is ~50 KB; this bounds what a broken server could make us hold.
MAX_RESPONSE_BYTES = 16 << 20


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]  # names lowercased
    body: str


def http_get(ns: str | None, addr: tuple[str, int], path: str, *,
             timeout: float = 5.0) -> HttpReply:
    """GET PATH from ADDR over a connection made in namespace NS (None: ours). OSError if it
    cannot connect or the reply is not HTTP."""
    sock = nsfd.open_socket_in_netns(ns, socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(addr)
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\n"
                     "Connection: close\r\n\r\n".encode())
        chunks: list[bytes] = []
        size = 0
        while chunk := sock.recv(65536):
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise OSError(f"response from {addr[0]}:{addr[1]} is over {MAX_RESPONSE_BYTES}")
            chunks.append(chunk)
    finally:
        sock.close()
    head, sep, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if not sep or len(parts) < 2 or not parts[1].isdigit():
        raise OSError(f"not an HTTP reply from {addr[0]}:{addr[1]}: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return HttpReply(int(parts[1]), headers, body.decode("utf-8", "replace"))


def sample_values(text: str, name: str) -> dict[str, float]:
    """The samples of family NAME in exposition TEXT as {'{labels}' or '': value}; enough for
    a check on our own output (tests use prometheus_client's parser for the whole text)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        rest = line[len(name):]
        if rest[:1] not in ("{", " "):
            continue  # another family whose name begins with NAME
        labels, _, value = rest.rpartition(" ")
        try:
            out[labels.strip()] = float(value)
        except ValueError:
            continue
    return out
