"""The metrics listener against hostile and clumsy clients (#16): bounded requests, timeouts,
a connection cap, only GET/HEAD of its paths, and a handler that raises. In-process on
loopback; the server's bounds are shrunk so each case takes well under a second."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from meshnet.agent import metrics_server
from meshnet.agent.metrics_server import MetricsServer, Reply
from meshnet.httphead import MAX_HEAD_BYTES, MAX_HEADERS

IP = "127.0.0.81"
CLIENT_TIMEOUT = 5.0  # every client read is bounded: a failure is an error, never a hang


class Routes:
    def __init__(self) -> None:
        self.calls = 0
        self.big = b"x" * (32 << 20)  # more than loopback's socket buffers hold

    async def ok(self) -> Reply:
        self.calls += 1
        return Reply(200, b"fine\n")

    async def boom(self) -> Reply:
        raise RuntimeError("a bug")

    async def huge(self) -> Reply:
        return Reply(200, self.big)


@pytest.fixture
async def server(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[MetricsServer, Routes]]:
    monkeypatch.setattr(metrics_server, "READ_TIMEOUT_S", 0.3)
    monkeypatch.setattr(metrics_server, "IDLE_TIMEOUT_S", 0.6)
    monkeypatch.setattr(metrics_server, "WRITE_TIMEOUT_S", 0.3)
    monkeypatch.setattr(metrics_server, "MAX_CONNECTIONS", 4)
    routes = Routes()
    srv = MetricsServer((IP, 0), {"/ok": routes.ok, "/boom": routes.boom, "/huge": routes.huge})
    await srv.start()
    try:
        yield srv, routes
    finally:
        await srv.close()


async def connect(srv: MetricsServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*srv.addr)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(CLIENT_TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v for k, _, v in (ln.partition(": ") for ln in lines[1:] if ln)}
        body = await reader.readexactly(int(headers["content-length"]))
    return status, headers, body


async def request(srv: MetricsServer, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await connect(srv)
    try:
        writer.write(raw)
        return await read_response(reader)
    finally:
        writer.close()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """True once the server closed (or reset) the connection, having sent nothing more."""
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT):
            return await reader.read() == b""
    except ConnectionResetError:
        return True


async def wait_until(cond: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_get_and_head_and_keep_alive(server: tuple[MetricsServer, Routes]) -> None:
    srv, routes = server
    reader, writer = await connect(srv)
    writer.write(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await read_response(reader) == (200, {
        "content-type": "text/plain; charset=utf-8", "content-length": "5",
        "cache-control": "no-store", "connection": "keep-alive"}, b"fine\n")
    # the same connection, twice more at once (pipelined), HEAD without a body
    writer.write(b"HEAD /ok HTTP/1.1\r\n\r\nGET /ok?x=1 HTTP/1.1\r\nConnection: close\r\n\r\n")
    async with asyncio.timeout(CLIENT_TIMEOUT):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Content-Length: 5" in head
    status, headers, body = await read_response(reader)  # straight after HEAD's headers
    assert (status, headers["connection"], body) == (200, "close", b"fine\n")
    assert await closed_by_server(reader)
    writer.close()
    assert routes.calls == 3 and srv.counters["requests"] == 3


@pytest.mark.parametrize(("raw", "status"), [
    (b"POST /ok HTTP/1.1\r\n\r\n", 405),
    (b"DELETE /nope HTTP/1.1\r\n\r\n", 404),
    (b"GET /nope HTTP/1.1\r\n\r\n", 404),
    (b"GET /ok HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", 400),
    (b"GET /ok HTTP/2.0\r\n\r\n", 505),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # TLS to a plain port
    (b"GET /ok HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEADERS + 1) + b"\r\n", 431),
    (b"GET /ok HTTP/1.1\r\nX: " + b"y" * MAX_HEAD_BYTES, 431),  # never ends
])
async def test_what_is_not_served_gets_its_status(server: tuple[MetricsServer, Routes],
                                                  raw: bytes, status: int) -> None:
    srv, routes = server
    got, headers, _ = await request(srv, raw)
    assert got == status
    if status == 405:
        assert headers["allow"] == "GET, HEAD"
    assert routes.calls == 0
    # and the listener goes on
    assert (await request(srv, b"GET /ok HTTP/1.1\r\n\r\n"))[0] == 200


async def test_a_handler_that_raises_gives_500_and_is_counted(
        server: tuple[MetricsServer, Routes], caplog: pytest.LogCaptureFixture) -> None:
    srv, _ = server
    for _ in range(3):
        status, headers, _ = await request(srv, b"GET /boom HTTP/1.1\r\n\r\n")
        assert status == 500 and headers["connection"] == "close"
    assert srv.counters["internal_errors"] == 3
    assert sum("RuntimeError: a bug" in r.getMessage() for r in caplog.records) == 1  # once
    assert (await request(srv, b"GET /ok HTTP/1.1\r\n\r\n"))[0] == 200


async def test_a_slow_client_is_cut_off_with_408(server: tuple[MetricsServer, Routes]) -> None:
    srv, _ = server
    reader, writer = await connect(srv)
    writer.write(b"GET /ok HTTP/1.1\r\n")  # and never the rest
    status, _, _ = await read_response(reader)
    assert status == 408
    assert await closed_by_server(reader)
    writer.close()
    assert srv.counters["read_timeouts"] == 1


async def test_an_idle_keep_alive_connection_is_closed(
        server: tuple[MetricsServer, Routes]) -> None:
    srv, _ = server
    reader, writer = await connect(srv)
    writer.write(b"GET /ok HTTP/1.1\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    assert await closed_by_server(reader)  # after IDLE_TIMEOUT_S
    writer.close()
    assert srv.counters["idle_closed"] == 1


async def test_connection_cap_evicts_idle_then_refuses(
        server: tuple[MetricsServer, Routes], monkeypatch: pytest.MonkeyPatch) -> None:
    srv, _ = server
    cap = metrics_server.MAX_CONNECTIONS
    idle = []
    for _ in range(cap):  # each served once, then idle between requests
        reader, writer = await connect(srv)
        writer.write(b"GET /ok HTTP/1.1\r\n\r\n")
        assert (await read_response(reader))[0] == 200
        idle.append((reader, writer))
    # a newcomer takes the oldest idle connection's place
    assert (await request(srv, b"GET /ok HTTP/1.1\r\n\r\n"))[0] == 200
    assert srv.counters["idle_evicted"] == 1
    assert await closed_by_server(idle[0][0])
    # now every slot is held by a client in the middle of a request: nothing to evict
    await wait_until(lambda: not srv.conns, "the idle ones to time out")
    monkeypatch.setattr(metrics_server, "READ_TIMEOUT_S", 5.0)  # hold them while we look
    busy = []
    for _ in range(cap):
        reader, writer = await connect(srv)
        writer.write(b"GET /ok HTTP/1.1\r\n")
        busy.append((reader, writer))
    await wait_until(lambda: len(srv.conns) == cap, "every slot taken")
    reader, writer = await connect(srv)
    assert await closed_by_server(reader)  # refused
    assert srv.counters["connections_refused"] == 1
    for _, w in [*idle, *busy, (reader, writer)]:
        w.close()
    # the clients went away mid-request: their slots are freed at once
    await wait_until(lambda: not srv.conns, "slots to free up", timeout=2.0)
    assert (await request(srv, b"GET /ok HTTP/1.1\r\n\r\n"))[0] == 200


async def test_a_client_that_does_not_read_is_aborted(server: tuple[MetricsServer, Routes]) -> None:
    srv, _ = server
    _, writer = await connect(srv)  # and never read
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(b"GET /huge HTTP/1.1\r\n\r\nGET /ok HTTP/1.1\r\n\r\n")
    await wait_until(lambda: srv.counters["write_timeouts"] == 1, "the write timeout")
    await wait_until(lambda: not srv.conns, "the connection to go")
    writer.close()
    assert (await request(srv, b"GET /ok HTTP/1.1\r\n\r\n"))[0] == 200


async def test_close_ends_every_connection(server: tuple[MetricsServer, Routes]) -> None:
    srv, _ = server
    reader, writer = await connect(srv)
    writer.write(b"GET /ok HTTP/1.1\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    await srv.close()
    assert await closed_by_server(reader)
    writer.close()
    with pytest.raises(OSError):
        await asyncio.open_connection(*srv.addr)
