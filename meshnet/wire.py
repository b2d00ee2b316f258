"""Shared wire conventions: one type byte, then a msgpack body (DESIGN §3).

Every protocol of meshnet frames its messages the same way::

    [type: u8][msgpack body]

where ``type`` is a member of an IntEnum owned by that protocol which only ever grows (a value,
once shipped, is never reused or renumbered). This module holds the generic helpers and the size
constants every protocol shares. Each limit is checked *before* anything is allocated for the
input, so a hostile peer can make us do at most O(limit) work per packet.

The decoders take the protocol's exception class, so that each protocol raises exactly one
exception type from its decoders (``MembershipProtocolError`` and friends) and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import msgpack

__all__ = [
    "DEFAULT_UDP_PAYLOAD",
    "ENCRYPTION_OVERHEAD",
    "FRESHNESS_OVERHEAD",
    "MAX_DATAGRAM_BYTES",
    "MAX_MSGPACK_CONTAINER",
    "MAX_STREAM_BYTES",
    "TYPE_BYTE",
    "WireError",
    "frame",
    "pack",
    "unframe",
    "unpack",
]

# Bytes the agent shell adds around every datagram when a cluster key is set: the freshness value
# (sender 8, epoch 6, seq 4; crypto/freshness.py) in clear, then the seal: 1 version byte +
# 4 key-id bytes + 12-byte AES-GCM nonce + 16-byte GCM tag. The cores reserve it so that a packet
# built to fit ``udp_payload`` still fits once sealed.
FRESHNESS_OVERHEAD = 8 + 6 + 4
ENCRYPTION_OVERHEAD = FRESHNESS_OVERHEAD + 1 + 4 + 12 + 16

# memberlist's UDPBufferSize: 1400 bytes keeps a datagram under a 1500-byte Ethernet MTU with room
# for IP/UDP headers and tunnel encapsulation, so it is never fragmented.
DEFAULT_UDP_PAYLOAD = 1400

# The largest UDP payload IPv4 can carry (65535 - 20 IP - 8 UDP). Nothing longer can arrive in one
# datagram, so anything longer handed to a decoder is a caller bug or garbage: refuse it unread.
MAX_DATAGRAM_BYTES = 65_507

# memberlist's maxPushStateBytes: the largest full-state exchange we accept over a stream. At
# ~600 bytes a member (512 of metadata at most) this is ~35,000 members, far above any cluster we
# aim for, and it bounds the memory one peer can make us allocate.
MAX_STREAM_BYTES = 20 * 1024 * 1024

# Upper bound on any msgpack string/bytes/array/map length inside a body. Bodies are at most
# MAX_STREAM_BYTES, and no legitimate container of ours comes near this count; the msgpack
# unpacker checks each declared length against it before allocating.
MAX_MSGPACK_CONTAINER = 1 << 20

TYPE_BYTE = 1  # every message starts with exactly one type byte


class WireError(Exception):
    """Raised by the generic helpers when no protocol exception class is given."""


def _fail(exc: type[Exception], msg: str) -> NoReturn:
    raise exc(msg)


def pack(body: Any) -> bytes:
    """msgpack-encode a body (bin type for bytes, str for text)."""
    out: bytes = msgpack.packb(body, use_bin_type=True)
    return out


def frame(msg_type: int, body: Any) -> bytes:
    """``[type][msgpack(body)]``."""
    out: bytes = bytes((msg_type,)) + msgpack.packb(body, use_bin_type=True)
    return out


def unpack(
    data: bytes | memoryview,
    *,
    max_bytes: int = MAX_DATAGRAM_BYTES,
    exc: type[Exception] = WireError,
    list_hook: Callable[[list[Any]], Any] | None = None,
    map_hook: Callable[[dict[Any, Any]], Any] | None = None,
) -> Any:
    """Decode exactly one msgpack object occupying all of ``data``.

    Raises ``exc`` (and only ``exc``) on anything malformed, oversized or trailing, or raised
    by a hook (decode_budget's hooks charge every container as it is built).
    """
    if len(data) > max_bytes:
        _fail(exc, f"body of {len(data)} bytes exceeds {max_bytes}")
    if len(data) == 0:
        _fail(exc, "empty body")
    limit = min(max_bytes, MAX_MSGPACK_CONTAINER)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=limit,
            max_map_len=limit,
            max_ext_len=0,
            list_hook=list_hook,
            object_hook=map_hook,
        )
    except Exception as e:  # msgpack raises a zoo of types (ValueError, ExtraData, StackError..)
        raise exc(f"bad msgpack body: {type(e).__name__}") from None


def unframe(
    data: bytes | memoryview,
    *,
    max_bytes: int = MAX_DATAGRAM_BYTES,
    exc: type[Exception] = WireError,
) -> tuple[int, memoryview]:
    """Split ``[type][rest]``; returns the type byte and a view of the rest (not decoded)."""
    if len(data) > max_bytes:
        _fail(exc, f"message of {len(data)} bytes exceeds {max_bytes}")
    if len(data) < TYPE_BYTE:
        _fail(exc, "empty message")
    view = memoryview(data)
    return view[0], view[1:]
