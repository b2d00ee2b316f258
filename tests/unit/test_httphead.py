"""meshnet/httphead.py: the metrics listener's request heads and responses (#16)."""

from __future__ import annotations

import pytest

from meshnet.httphead import (
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    HttpError,
    RequestReader,
    parse_request_head,
    response,
)

PROMETHEUS = (b"GET /metrics HTTP/1.1\r\nHost: 10.99.0.1:9946\r\nUser-Agent: Prometheus/2.42.0\r\n"
              b"Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;"
              b"q=0.5,*/*;q=0.1\r\nAccept-Encoding: gzip\r\n"
              b"X-Prometheus-Scrape-Timeout-Seconds: 10")


def test_a_prometheus_scrape_parses() -> None:
    head = parse_request_head(PROMETHEUS)
    assert (head.method, head.path, head.keep_alive) == ("GET", "/metrics", True)
    assert ("user-agent", "Prometheus/2.42.0") in head.headers


def test_query_is_cut_from_the_path_and_connection_close_is_heard() -> None:
    head = parse_request_head(b"HEAD /health?verbose=1 HTTP/1.1\r\nConnection: close")
    assert (head.method, head.target, head.path) == ("HEAD", "/health?verbose=1", "/health")
    assert head.keep_alive is False


def test_http10_closes_unless_asked_to_keep_alive() -> None:
    assert parse_request_head(b"GET / HTTP/1.0").keep_alive is False
    assert parse_request_head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive").keep_alive is True


@pytest.mark.parametrize(("raw", "status"), [
    (b"", 400),
    (b"GET /metrics", 400),
    (b"GET  /metrics HTTP/1.1", 400),
    (b"G(T /metrics HTTP/1.1", 400),
    (b"GET metrics HTTP/1.1", 400),
    (b"GET http://x/metrics HTTP/1.1", 400),
    (b"GET /m\xffetrics HTTP/1.1", 400),
    (b"GET /metrics HTTP/2.0", 505),
    (b"GET /metrics HTTX/1.1", 400),
    (b"GET /metrics HTTP/1.1\r\nNo colon here", 400),
    (b"GET /metrics HTTP/1.1\r\nBad Name: x", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded", 400),
    (b"GET /metrics HTTP/1.1\r\nX: caf\xc3\xa9", 400),
    (b"GET /metrics HTTP/1.1\r\nContent-Length: 5", 400),
    (b"GET /metrics HTTP/1.1\r\nTransfer-Encoding: chunked", 400),
    (b"GET /metrics HTTP/1.1" + b"\r\nX: y" * (MAX_HEADERS + 1), 431),
    (b"GET /" + b"a" * MAX_HEAD_BYTES + b" HTTP/1.1", 431),
])
def test_what_is_refused_and_with_which_status(raw: bytes, status: int) -> None:
    with pytest.raises(HttpError) as e:
        parse_request_head(raw)
    assert e.value.status == status


def test_a_body_of_length_zero_is_fine() -> None:
    assert parse_request_head(b"GET / HTTP/1.1\r\nContent-Length: 0").path == "/"


def test_reader_cuts_heads_across_reads_and_pipelines() -> None:
    r = RequestReader()
    data = b"\r\nGET /metrics HTTP/1.1\r\nHost: a\r\n\r\nHEAD /health HTTP/1.1\r\n\r\nGET /x"
    for i in range(0, len(data), 7):  # in small pieces
        r.feed(data[i:i + 7])
    first = r.next_request()
    second = r.next_request()
    assert first is not None and first.path == "/metrics"
    assert second is not None and (second.method, second.path) == ("HEAD", "/health")
    assert r.next_request() is None  # "GET /x" waits for the rest
    assert r.buffered == len(b"GET /x")


def test_reader_refuses_a_head_that_never_ends() -> None:
    r = RequestReader()
    r.feed(b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * MAX_HEAD_BYTES)
    with pytest.raises(HttpError) as e:
        r.next_request()
    assert e.value.status == 431


def test_reader_takes_a_head_of_exactly_the_maximum() -> None:
    line = b"GET /metrics HTTP/1.1\r\nX: "
    raw = line + b"y" * (MAX_HEAD_BYTES - len(line))
    r = RequestReader()
    r.feed(raw + b"\r\n\r\n")
    head = r.next_request()
    assert head is not None and head.path == "/metrics"


def test_response_has_length_and_head_has_no_body() -> None:
    full = response(200, b"hello\n", keep_alive=True)
    head, _, body = full.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
    assert b"Content-Length: 6" in head and b"Connection: keep-alive" in head
    assert body == b"hello\n"
    only = response(503, b"down\n", keep_alive=False, head_only=True,
                    extra=(("Retry-After", "5"),))
    assert only.endswith(b"\r\n\r\n") and b"Content-Length: 5" in only
    assert b"HTTP/1.1 503 Service Unavailable" in only and b"Retry-After: 5" in only
    assert b"Connection: close" in only
