"""Fuzz what the metrics listener reads (request heads from anyone who can connect) and what it
writes (the text Prometheus parses) (#16)."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from meshnet.httphead import MAX_HEAD_BYTES, HttpError, RequestReader, parse_request_head
from meshnet.metrics import Exposition, Histogram, status_leaves

# Bytes that look like HTTP more often than random bytes do, so the fuzzer gets past the
# request line and into the headers.
PIECES = st.sampled_from([b"GET", b"HEAD", b"POST", b" ", b"/metrics", b"/health", b"?a=b",
                          b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"\r\n", b"\r\n\r\n", b":",
                          b"Host", b"Connection", b"close", b"keep-alive", b"Content-Length",
                          b"0", b"5", b"Transfer-Encoding", b"\t", b"\n", b"\xff", b"\x00"])
HTTPISH = st.lists(st.one_of(PIECES, st.binary(max_size=8)), max_size=40).map(b"".join)
INPUT = st.one_of(st.binary(max_size=600), HTTPISH)


@given(INPUT)
@settings(max_examples=1500)
def test_parse_request_head_raises_only_http_errors(raw: bytes) -> None:
    try:
        head = parse_request_head(raw)
    except HttpError as e:
        assert e.status in (400, 431, 505)
        return
    assert head.method and head.path.startswith("/")
    assert head.target.startswith(head.path)


@given(st.lists(INPUT, max_size=8))
@settings(max_examples=800)
def test_reader_on_any_stream_gives_heads_or_http_errors_with_a_bounded_buffer(
        chunks: list[bytes]) -> None:
    r = RequestReader()
    for chunk in chunks:
        r.feed(chunk)
        while True:  # what the shell does: take every complete request, stop at an error
            try:
                head = r.next_request()
            except HttpError as e:
                assert e.status in (400, 431, 505)
                return
            if head is None:
                break
        # nothing complete is left: what stays buffered is at most one unfinished head
        assert r.buffered <= MAX_HEAD_BYTES + 3


TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=30)


@given(st.sampled_from(["GET", "HEAD"]), st.sampled_from(["/metrics", "/health", "/"]),
       st.lists(st.tuples(TOKEN, VALUE), max_size=10), st.booleans())
def test_well_formed_requests_round_trip(method: str, path: str,
                                         headers: list[tuple[str, str]], close: bool) -> None:
    headers = [(k, v) for k, v in headers
               if k not in ("connection", "content-length", "transfer-encoding")]
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    if close:
        lines.append("Connection: close")
    head = parse_request_head("\r\n".join(lines).encode())
    assert (head.method, head.path, head.keep_alive) == (method, path, not close)
    assert list(head.headers[:len(headers)]) == [(k, v.strip(" \t")) for k, v in headers]


LABEL_VALUE = st.text(max_size=20)  # any unicode: quotes, backslashes, newlines included
NUMBER = st.one_of(st.integers(min_value=0, max_value=2**62),
                   st.floats(allow_nan=True, allow_infinity=True))


@given(st.text(max_size=40).filter(lambda t: t == t.strip()),  # the parser trims help
       st.lists(st.tuples(LABEL_VALUE, NUMBER), max_size=6, unique_by=lambda t: t[0]),
       st.lists(st.floats(min_value=0, max_value=100), max_size=20))
@settings(max_examples=200)
def test_prometheus_parses_back_exactly_what_was_exposed(
        help_text: str, samples: list[tuple[str, float]], observations: list[float]) -> None:
    e = Exposition()
    for value, n in samples:
        e.gauge("meshnet_fuzz", help_text, n, {"v": value})
    h = Histogram([0.5, 5.0, 50.0])
    for x in observations:
        h.observe(x)
    e.histogram("meshnet_fuzz_seconds", "h", h)
    fams = {f.name: f for f in text_string_to_metric_families(e.render())}
    if samples:
        fam = fams["meshnet_fuzz"]
        assert fam.documentation == help_text
        got = {s.labels["v"]: s.value for s in fam.samples}
        for value, n in samples:
            assert math.isnan(got[value]) if math.isnan(n) else got[value] == n
    hist = {(s.name, s.labels.get("le")): s.value for s in fams["meshnet_fuzz_seconds"].samples}
    assert hist[("meshnet_fuzz_seconds_bucket", "+Inf")] == len(observations)
    assert hist[("meshnet_fuzz_seconds_count", None)] == len(observations)


JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=30)


@given(st.dictionaries(st.text(max_size=8), JSONISH, max_size=6))
@settings(max_examples=400)
def test_any_status_document_exposes_text_prometheus_parses(doc: dict[str, object]) -> None:
    e = Exposition()
    for leaf in status_leaves(doc):
        if leaf.kind == "counter":
            e.counter(leaf.name, "x", leaf.value, leaf.labels)
        else:
            e.gauge(leaf.name, "x", leaf.value, leaf.labels)
    list(text_string_to_metric_families(e.render()))  # raises on anything malformed
