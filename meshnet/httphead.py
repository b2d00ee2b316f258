"""The HTTP/1.1 the metrics listener speaks, pure: request heads in, responses out.

Just enough HTTP for Prometheus, curl and a load balancer's health check: GET and HEAD of a
few fixed paths, no request bodies, keep-alive. Everything a client sends is bounded before
it is looked at (MAX_HEAD_BYTES, MAX_HEADERS) and every way it can be wrong is an HttpError
carrying the status to answer with. Modelled on h11's reader (a buffer that is cut into
events) with its bounds made much smaller: nothing here needs more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "HttpError",
    "RequestHead",
    "RequestReader",
    "parse_request_head",
    "response",
]

# A request head, request line to the blank line. curl sends ~80 bytes and Prometheus ~250;
# browsers with cookies a few KB. 8 KiB is what nginx allows by default for one header line.
MAX_HEAD_BYTES = 8192
# Header fields in one request (Prometheus sends 4, curl 3).
MAX_HEADERS = 32
_END = b"\r\n\r\n"

_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION_RE = re.compile(rb"HTTP/([0-9])\.([0-9])")
# Visible ASCII, spaces and tabs: what a field value may hold (obs-text refused).
_VALUE_RE = re.compile(rb"[\x20-\x7e\t]*")
_TARGET_RE = re.compile(rb"/[\x21-\x7e]*")

REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


class HttpError(Exception):
    """The request cannot be served: answer with ``status`` (and close the connection)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str
    path: str  # the target without its query
    keep_alive: bool
    headers: tuple[tuple[str, str], ...]  # names lowercased, in order


def parse_request_head(raw: bytes) -> RequestHead:
    """A request head without its final blank line (``raw`` ends before ``\\r\\n\\r\\n``).
    HttpError for anything we do not serve or cannot read."""
    if len(raw) > MAX_HEAD_BYTES:
        raise HttpError(431, "request head too large")
    lines = raw.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN_RE.fullmatch(method):
        raise HttpError(400, "malformed method")
    v = _VERSION_RE.fullmatch(version)
    if v is None:
        raise HttpError(400, "malformed HTTP version")
    if v.group(1) != b"1":
        raise HttpError(505, "only HTTP/1.x is served")
    # origin-form only (RFC 9112 3.2.1): what every client sends to a server it talks to
    if not _TARGET_RE.fullmatch(target):
        raise HttpError(400, "request target must be a path")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN_RE.fullmatch(name):  # also a folded (obs-fold) line
            raise HttpError(400, "malformed header field")
        value = value.strip(b" \t")
        if not _VALUE_RE.fullmatch(value):
            raise HttpError(400, "malformed header value")
        headers.append((name.decode("ascii").lower(), value.decode("ascii")))
    fields = dict(headers)
    # No request bodies: reading past one safely would need a body parser for nothing.
    if "transfer-encoding" in fields or fields.get("content-length", "0") != "0":
        raise HttpError(400, "request bodies are not accepted")
    tokens = {t.strip().lower() for t in fields.get("connection", "").split(",")}
    http10 = v.group(2) == b"0"
    keep_alive = "keep-alive" in tokens if http10 else "close" not in tokens
    text = target.decode("ascii")
    return RequestHead(method.decode("ascii"), text, text.partition("?")[0], keep_alive,
                       tuple(headers))


class RequestReader:
    """Request heads cut from a connection's bytes, one at a time.

    ``feed`` appends what arrived; ``next_request`` gives the next complete head, None while
    it is incomplete, or raises HttpError (then the connection is to be answered and closed).
    The buffer grows past MAX_HEAD_BYTES only by what one read brought; the shell stops
    reading while a request is being answered.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_request(self) -> RequestHead | None:
        buf = self._buf
        while buf.startswith(b"\r\n"):  # RFC 9112 2.2: ignore empty lines before a request
            del buf[:2]
        end = buf.find(_END, 0, MAX_HEAD_BYTES + len(_END))
        if end < 0:
            if len(buf) > MAX_HEAD_BYTES:
                raise HttpError(431, "request head too large")
            return None
        raw = bytes(buf[:end])
        del buf[: end + len(_END)]
        return parse_request_head(raw)


def response(status: int, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
             keep_alive: bool = True, head_only: bool = False,
             extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole HTTP/1.1 response. HEAD gets the headers GET would (Content-Length too)."""
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
             f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}",
             "Cache-Control: no-store",
             f"Connection: {'keep-alive' if keep_alive else 'close'}",
             *(f"{k}: {v}" for k, v in extra)]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
    return head if head_only else head + body
