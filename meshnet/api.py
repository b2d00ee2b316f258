"""The control API's wire format, shared by the agent and meshctl.

A frame is a 4-byte big-endian length and a body. The body is msgpack, or JSON when it starts
with `{` (handy for `socat` and scripts); the reply uses the request's encoding. Every request
carries `v` (the API version), an `op` and `args`; a reply is `{"v", "ok": true, "result"}` or
`{"v", "ok": false, "error", "code"}`. An op that streams (e.g. `run`) sends any number of
`{"v", "event": ...}` frames before its final reply.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import msgpack

API_VERSION = 1
# Requests are small commands; 1 MiB leaves room for a large service spec yet stops a client
# from making the agent buffer arbitrary amounts.
MAX_REQUEST_BYTES = 1 << 20
# Replies can list a whole cluster (members, endpoints, logs), so they may be larger.
MAX_REPLY_BYTES = 64 << 20
_LEN = struct.Struct(">I")


class ApiError(Exception):
    """A malformed frame or body; the message says what was wrong."""


def encode(body: dict[str, Any], as_json: bool = False) -> bytes:
    data = (
        json.dumps(body, separators=(",", ":")).encode()
        if as_json
        else msgpack.packb(body, use_bin_type=True)
    )
    return _LEN.pack(len(data)) + data


def decode_body(data: bytes) -> tuple[dict[str, Any], bool]:
    """Decode one frame body; returns (body, was_json)."""
    as_json = data[:1] == b"{"
    try:
        body = json.loads(data) if as_json else msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise ApiError(f"undecodable body: {e}") from None
    if not isinstance(body, dict):
        raise ApiError("body must be a map")
    return body, as_json


def frame_length(header: bytes, limit: int) -> int:
    length: int = _LEN.unpack(header)[0]
    if length > limit:
        raise ApiError(f"frame of {length} bytes exceeds the limit of {limit}")
    return length


def parse_request(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    version = body.get("v")
    if version != API_VERSION:
        raise ApiError(f"unsupported API version {version!r} (this agent speaks {API_VERSION})")
    op = body.get("op")
    args = body.get("args", {})
    if not isinstance(op, str) or not op:
        raise ApiError("missing op")
    if not isinstance(args, dict):
        raise ApiError("args must be a map")
    return op, args


def request(op: str, **args: Any) -> dict[str, Any]:
    return {"v": API_VERSION, "op": op, "args": args}


def ok(result: Any) -> dict[str, Any]:
    return {"v": API_VERSION, "ok": True, "result": result}


def error(message: str, code: str = "failed") -> dict[str, Any]:
    return {"v": API_VERSION, "ok": False, "error": message, "code": code}


def event(payload: dict[str, Any]) -> dict[str, Any]:
    return {"v": API_VERSION, "event": payload}
