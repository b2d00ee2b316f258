"""Membership wire messages: ``[type u8][msgpack array]`` (memberlist's numbering).

Every decoder here raises MembershipProtocolError and nothing else (the fuzz tests check it).
Bodies are positional msgpack arrays; a decoder accepts *longer* arrays than it knows (a newer
peer may append fields) but never shorter ones.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from meshnet import decode_budget, wire
from meshnet.membership.types import (
    STATE_CODES,
    Addr,
    MembershipProtocolError,
    MemberState,
    NodeMeta,
    check_name,
    check_port,
)

__all__ = [
    "CACHE_STAT_KEYS",
    "COMPOUND_OVERHEAD",
    "COMPOUND_PART_OVERHEAD",
    "DECODE_CACHE_BYTES",
    "DECODE_CACHE_ENTRIES",
    "DECODE_CACHE_ENTRY_BYTES",
    "MAX_CLAIM_INCARNATION",
    "MAX_COMPOUND_PARTS",
    "MAX_INCARNATION",
    "MAX_PUSH_PULL_DECODE_BYTES",
    "MAX_PUSH_PULL_MEMBERS",
    "PUSH_PULL_VERSION",
    "Ack",
    "Alive",
    "AliveToken",
    "Dead",
    "DecodeCache",
    "IndirectPing",
    "Message",
    "MsgType",
    "Nack",
    "Ping",
    "PushPull",
    "PushPullOverBudget",
    "PushPullState",
    "Suspect",
    "User",
    "decode_packet",
    "decode_push_pull",
    "make_compound",
]


class MsgType(IntEnum):
    """One byte in front of every message. Only ever append; never renumber or reuse."""

    PING = 0
    INDIRECT_PING = 1
    ACK = 2
    SUSPECT = 3
    ALIVE = 4
    DEAD = 5
    PUSH_PULL = 6
    COMPOUND = 7
    USER = 8
    COMPRESS = 9  # reserved (memberlist); never sent
    ENCRYPT = 10  # reserved: encryption is the shell's envelope, not a message
    NACK = 11
    CRC = 12  # reserved (memberlist); never sent
    ALIVE_TOKEN = 13  # a refutation proved by an incarnation token (crypto/incchain.py)


# A compound packet is [COMPOUND][count u8][len u16 x count][parts]: the count is one byte.
MAX_COMPOUND_PARTS = 255
COMPOUND_OVERHEAD = 2  # type byte + count byte
COMPOUND_PART_OVERHEAD = 2  # u16 length per part
# memberlist's incarnation is a uint32; the wire carries 64 bits (a restarted node may seed from a
# clock).
MAX_INCARNATION = (1 << 64) - 1
# The core refuses (and counts) any claim above this. A refutation goes one above the claim, so a
# claim at the wire's maximum could never be refuted (and 2^64 does not encode: the refuting node
# crashed). An honest node's incarnation grows by one per restart or refutation and never comes
# near 2^63; only a forged claim can, and signed claims (crypto/certs.py) bound those further.
MAX_CLAIM_INCARNATION = (1 << 63) - 1
# Sequence numbers wrap at 32 bits like memberlist's.
SEQ_MOD = 1 << 32
# Members in one push-pull: bounded by what fits MAX_STREAM_BYTES at the smallest entry (~20 B);
# checked against the declared array length before the entries are walked.
MAX_PUSH_PULL_MEMBERS = 100_000
# Estimated bytes of Python objects one push-pull's msgpack may decode to (meshnet.decode_budget
# charges 64 bytes a container and 64 a slot). Honest bodies need at most ~68 MiB: MAX_PUSH_PULL_
# MEMBERS rows of 9 fields (640 bytes each) and as many certificates; the rest is room for a newer
# peer's extra fields. Without it, 20 MiB of empty arrays decoded to 1.3 GB (65x). Decodes run one
# at a time on the event loop, so this bounds push-pull decoding's peak; bodies under 768 KiB
# (~3,000 members) cannot reach it and are decoded without the hooks.
MAX_PUSH_PULL_DECODE_BYTES = 96 * 1024 * 1024
# Version of the push-pull body; a newer peer's extra fields are ignored, an older one refused.
PUSH_PULL_VERSION = 1
# A user (delegate) message must fit in one packet alongside a ping.
MAX_USER_BYTES = wire.DEFAULT_UDP_PAYLOAD
# An Ed25519 signature (crypto/certs.py), and an incarnation token (crypto/incchain.py).
SIG_BYTES = 64
TOKEN_BYTES = 16
# A node certificate is at most this (crypto/certs.py MAX_CERT_BYTES).
MAX_CERT_BYTES = 2048
# Names a push-pull may ask certificates for: what one exchange can answer in MAX_STREAM_BYTES
# (1,024 x 2 KB = 2 MB).
MAX_WANT = 1024


def _err(msg: str) -> MembershipProtocolError:
    return MembershipProtocolError(msg)


def _uint(value: object, what: str, limit: int = MAX_INCARNATION) -> int:
    if type(value) is not int or value < 0 or value > limit:
        raise _err(f"{what}: expected unsigned int")
    return value


def _sig(value: object) -> bytes:
    """A signature field: empty (unsigned) or one Ed25519 signature."""
    if type(value) is not bytes or len(value) not in (0, SIG_BYTES):
        raise _err("signature: expected 64 bytes")
    return value


def _token(value: object) -> bytes:
    """A chain anchor or token field: empty, or TOKEN_BYTES."""
    if type(value) is not bytes or len(value) not in (0, TOKEN_BYTES):
        raise _err("token: expected 16 bytes")
    return value


def _body(view: memoryview, n: int, what: str) -> list[Any]:
    body = wire.unpack(view, exc=MembershipProtocolError)
    if type(body) is not list or len(body) < n:
        raise _err(f"{what}: expected array of >= {n}")
    return body


@dataclass(slots=True)
class Ping:
    seq: int
    target: str
    source: str

    def encode(self) -> bytes:
        return wire.frame(MsgType.PING, [self.seq, self.target, self.source])


@dataclass(slots=True)
class IndirectPing:
    seq: int
    target: str
    addr: Addr
    nack: bool

    def encode(self) -> bytes:
        return wire.frame(
            MsgType.INDIRECT_PING, [self.seq, self.target, self.addr[0], self.addr[1], self.nack]
        )


@dataclass(slots=True)
class Ack:
    seq: int

    def encode(self) -> bytes:
        return wire.frame(MsgType.ACK, [self.seq])


@dataclass(slots=True)
class Nack:
    seq: int

    def encode(self) -> bytes:
        return wire.frame(MsgType.NACK, [self.seq])


@dataclass(frozen=True, slots=True)
class Suspect:
    incarnation: int
    node: str
    sender: str

    def encode(self) -> bytes:
        return wire.frame(MsgType.SUSPECT, [self.incarnation, self.node, self.sender])


@dataclass(frozen=True, slots=True)
class Dead:
    """``sender == node`` means the node left gracefully (memberlist's convention); with
    identity, a leave carries the node's own signature (``sig``, see left_payload)."""

    incarnation: int
    node: str
    sender: str
    sig: bytes = b""

    def encode(self) -> bytes:
        body: list[Any] = [self.incarnation, self.node, self.sender]
        if self.sig:
            body.append(self.sig)
        return wire.frame(MsgType.DEAD, body)


@dataclass(frozen=True, slots=True)
class Alive:
    """With identity, ``sig`` is the node's own signature over alive_payload (only the node
    can say it is alive, or refute a suspicion), which also commits to ``anchor``, the end of
    the hash chain its later refutations are proved with (AliveToken)."""

    incarnation: int
    meta: NodeMeta
    meta_bytes: bytes
    sig: bytes = b""
    anchor: bytes = b""

    @property
    def node(self) -> str:
        return self.meta.name

    def encode(self) -> bytes:
        body: list[Any] = [self.incarnation, self.meta_bytes]
        if self.sig:
            body.append(self.sig)
            if self.anchor:
                body.append(self.anchor)
        return wire.frame(MsgType.ALIVE, body)


@dataclass(frozen=True, slots=True)
class AliveToken:
    """"NODE is alive at INCARNATION, same metadata": a refutation, proved by the token of its
    hash chain for that incarnation (16 bytes where a signed alive carries 64 plus metadata)."""

    incarnation: int
    node: str
    token: bytes

    def encode(self) -> bytes:
        return wire.frame(MsgType.ALIVE_TOKEN, [self.incarnation, self.node, self.token])


def alive_payload(incarnation: int, meta_bytes: bytes, anchor: bytes = b"") -> bytes:
    """What a node signs to say "alive at INCARNATION with META, my chain ends in ANCHOR"
    (meta holds its name)."""
    return _U64.pack(incarnation) + bytes((len(anchor),)) + anchor + meta_bytes


def left_payload(incarnation: int, name: str) -> bytes:
    """What a node signs to say "I left at INCARNATION"."""
    return _U64.pack(incarnation) + name.encode()


_U64 = struct.Struct(">Q")


@dataclass(slots=True)
class User:
    data: bytes

    def encode(self) -> bytes:
        return bytes((MsgType.USER,)) + self.data


@dataclass(slots=True)
class PushPullState:
    name: str
    incarnation: int
    state: MemberState
    meta: NodeMeta
    meta_bytes: bytes
    # With identity: the incarnation of the alive that carried meta, the node's signature of
    # it, and (state left) its signature of the leave.
    meta_inc: int | None = None
    alive_sig: bytes = b""
    left_sig: bytes = b""
    # the chain anchor signed with meta, and the token proving ``incarnation`` (AliveToken)
    anchor: bytes = b""
    token: bytes = b""


@dataclass(slots=True)
class PushPull:
    join: bool
    states: list[PushPullState]
    user_state: bytes
    # With identity: node certificates (the sender's own always; on a join reply, or when
    # asked, the others'), and the names whose certificates the sender lacks.
    certs: list[bytes] = field(default_factory=list)
    want: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        rows = []
        for s in self.states:
            row: list[Any] = [s.name, s.incarnation, STATE_CODES.index(s.state), s.meta_bytes]
            if s.meta_inc is not None:
                row += [s.meta_inc, s.alive_sig, s.left_sig]
                if s.anchor or s.token:
                    row += [s.anchor, s.token]
            rows.append(row)
        return encode_push_pull_raw(self.join, rows, self.user_state, self.certs, self.want)


Message = Ping | IndirectPing | Ack | Nack | Suspect | Dead | Alive | AliveToken | User


def encode_push_pull_raw(
    join: bool, entries: list[list[Any]], user_state: bytes,
    certs: list[bytes] | None = None, want: list[str] | None = None,
) -> bytes:
    """Encode from prebuilt ``[name, inc, state_code, meta_bytes(, meta_inc, alive_sig,
    left_sig)]`` rows (the hot path)."""
    body: list[Any] = [PUSH_PULL_VERSION, join, entries, user_state]
    if certs or want:
        body += [certs or [], want or []]
    return wire.frame(MsgType.PUSH_PULL, body)


MetaCache = dict[bytes, NodeMeta]

# Entries in each of a DecodeCache's three tables before it is cleared (it only saves work). 16384
# decoded metadata objects of at most 512 bytes each stay near 10 MB, and the table holds every
# member of a 5,000-node simulation; broadcast parts are short-lived (a few seconds of gossip).
DECODE_CACHE_ENTRIES = 16_384
# Estimated bytes the whole cache (its three tables together) may hold before it is cleared.
# The entry bound alone let padded entries in (a decoder accepts arrays longer than it knows, so a
# part may be a whole 64 KB datagram): 16,384 of them in two tables held ~1 GB. An entry is
# charged its key's length and DECODE_CACHE_ENTRY_BYTES (the dict slot, the key's header and the
# decoded message's objects: ~300 bytes measured), plus what it holds beyond that: an alive part
# its copy of the metadata, a packet its tuple, metadata its NodeMeta (up to 7x its size, measured
# with 123 two-letter labels: charged META_DECODED_PER_BYTE). So 64 MiB holds 30,000-100,000
# honest gossip parts and packets (charged 0.5-2 KB each) or ~13,000 metadata of the full 512
# bytes; the simulator's shared cache holds ~2 MB at 1,000 nodes.
DECODE_CACHE_BYTES = 64 * 1024 * 1024
DECODE_CACHE_ENTRY_BYTES = 512
META_DECODED_PER_BYTE = 8


class DecodeCache:
    """Validated decodes of broadcast parts (suspect, alive, dead), of whole packets made only of
    them (gossip), and of metadata, by exact bytes.

    Decoding is a pure function of the bytes, so a hit returns what decoding would (the objects
    are frozen and may be shared). Every broadcast reaches each member about
    RetransmitMult x log10(n) times, so most parts a member receives were decoded before, and a
    gossip round sends one packet to gossip_nodes members. A core owns one by default; the
    simulator gives all its cores one, as the same bytes reach them all.

    Bounded: a table past ``max_entries``, or the whole past ``max_bytes`` (estimated, see
    DECODE_CACHE_BYTES), clears all three tables (packets share the parts' messages, and alives
    the metadata's NodeMeta, so a table is never emptied while another still holds its objects);
    counted in ``stats`` (``decode_cache_clears``, ``decode_cache_clears_bytes``), the core's
    counters when it made the cache.
    """

    __slots__ = ("max_bytes", "max_entries", "meta", "packets", "parts", "stats", "used")

    def __init__(self, max_entries: int = DECODE_CACHE_ENTRIES,
                 max_bytes: int = DECODE_CACHE_BYTES, stats: dict[str, int] | None = None) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.meta: MetaCache = {}
        self.parts: dict[bytes, Message] = {}
        self.packets: dict[bytes, tuple[Message, ...]] = {}
        self.used = 0  # estimated bytes held (entries put in self.meta directly are not counted)
        self.stats = stats if stats is not None else {}
        for key in CACHE_STAT_KEYS:
            self.stats.setdefault(key, 0)

    def _make_room(self, table: dict[bytes, Any], cost: int) -> None:
        """Clear everything (counted) if ``table`` is full or ``cost`` more bytes would not fit."""
        if len(table) >= self.max_entries:
            self.stats["decode_cache_clears"] += 1
        elif self.used + cost > self.max_bytes:
            self.stats["decode_cache_clears_bytes"] += 1
        else:
            return
        self.meta.clear()
        self.parts.clear()
        self.packets.clear()
        self.used = 0

    def decode(self, data: bytes | memoryview) -> tuple[Message, ...] | list[Message]:
        """decode_packet through the cache; the result is shared: read it, never change it."""
        if type(data) is not bytes:
            return _split_compound(data, self.decode_part)
        packets = self.packets
        hit = packets.get(data)
        if hit is not None:
            return hit
        msgs = _split_compound(data, self.decode_part)
        # Only packets of frozen broadcast parts: a ping or an ack is unique to one probe.
        if not all(type(m) in _CACHED_CLASSES for m in msgs):
            return msgs
        cost = len(data) + DECODE_CACHE_ENTRY_BYTES + 8 * len(msgs)
        self._make_room(packets, cost)
        kept = self.packets[data] = tuple(msgs)
        self.used += cost
        return kept

    def decode_part(self, part: bytes) -> Message | None:
        """One non-compound message (``part`` starts with its type byte), through the cache."""
        t = part[0]
        if t not in _CACHED_TYPES:
            return _decode_one(t, memoryview(part)[1:], self)
        parts = self.parts
        msg = parts.get(part)
        if msg is None:
            msg = _decode_one(t, memoryview(part)[1:], self)
            assert msg is not None
            cost = len(part) + DECODE_CACHE_ENTRY_BYTES
            if type(msg) is Alive:
                cost += len(msg.meta_bytes)
            self._make_room(parts, cost)
            self.parts[part] = msg
            self.used += cost
        return msg

    def add_meta(self, raw: bytes, meta: NodeMeta) -> None:
        cost = DECODE_CACHE_ENTRY_BYTES + (1 + META_DECODED_PER_BYTE) * len(raw)
        self._make_room(self.meta, cost)
        self.meta[raw] = meta
        self.used += cost


# Counters a DecodeCache keeps (in the core's stats when the core made it).
CACHE_STAT_KEYS = ("decode_cache_clears", "decode_cache_clears_bytes")


def _decode_meta(raw: object, cache: DecodeCache | MetaCache | None) -> tuple[NodeMeta, bytes]:
    """Decode (or look up an already-validated copy of) encoded metadata."""
    if type(raw) is not bytes:
        raise _err("meta: expected bytes")
    if cache is None:
        return NodeMeta.decode(raw), raw
    if isinstance(cache, DecodeCache):
        hit = cache.meta.get(raw)
        if hit is None:
            hit = NodeMeta.decode(raw)
            cache.add_meta(raw, hit)
        return hit, raw
    hit = cache.get(raw)
    if hit is None:
        hit = NodeMeta.decode(raw)
        if len(cache) >= DECODE_CACHE_ENTRIES:
            cache.clear()
        cache[raw] = hit
    return hit, raw


def _decode_one(
    t: int, view: memoryview, cache: DecodeCache | MetaCache | None
) -> Message | None:
    """Decode one non-compound message; None for a type we do not know (newer peer)."""
    if t == MsgType.PING:
        b = _body(view, 3, "ping")
        return Ping(_uint(b[0], "seq", SEQ_MOD - 1), check_name(b[1]), check_name(b[2]))
    if t == MsgType.ACK:
        b = _body(view, 1, "ack")
        return Ack(_uint(b[0], "seq", SEQ_MOD - 1))
    if t == MsgType.NACK:
        b = _body(view, 1, "nack")
        return Nack(_uint(b[0], "seq", SEQ_MOD - 1))
    if t == MsgType.SUSPECT:
        b = _body(view, 3, "suspect")
        return Suspect(_uint(b[0], "incarnation"), check_name(b[1]), check_name(b[2]))
    if t == MsgType.DEAD:
        b = _body(view, 3, "dead")
        return Dead(_uint(b[0], "incarnation"), check_name(b[1]), check_name(b[2]),
                    _sig(b[3]) if len(b) > 3 else b"")
    if t == MsgType.ALIVE:
        b = _body(view, 2, "alive")
        meta, raw = _decode_meta(b[1], cache)
        return Alive(_uint(b[0], "incarnation"), meta, raw, _sig(b[2]) if len(b) > 2 else b"",
                     _token(b[3]) if len(b) > 3 else b"")
    if t == MsgType.ALIVE_TOKEN:
        b = _body(view, 3, "alive token")
        token = _token(b[2])
        if not token:
            raise _err("alive token: empty token")
        return AliveToken(_uint(b[0], "incarnation"), check_name(b[1]), token)
    if t == MsgType.INDIRECT_PING:
        b = _body(view, 5, "indirect ping")
        host = b[2]
        if type(host) is not str or not host or len(host) > 255:
            raise _err("indirect ping: bad host")
        if type(b[4]) is not bool:
            raise _err("indirect ping: nack flag must be bool")
        return IndirectPing(
            _uint(b[0], "seq", SEQ_MOD - 1), check_name(b[1]), (host, check_port(b[3])), b[4]
        )
    if t == MsgType.USER:
        if len(view) > MAX_USER_BYTES:
            raise _err("user message too large")
        return User(bytes(view))
    if t in (MsgType.COMPOUND, MsgType.PUSH_PULL):
        raise _err(f"message type {t} not allowed here")
    if t in (MsgType.COMPRESS, MsgType.ENCRYPT, MsgType.CRC):
        raise _err(f"message type {t} is not supported")
    return None


_CACHED_TYPES = frozenset((MsgType.SUSPECT, MsgType.ALIVE, MsgType.DEAD, MsgType.ALIVE_TOKEN))
_CACHED_CLASSES = frozenset((Suspect, Alive, Dead, AliveToken))


def _meta_table(cache: DecodeCache | MetaCache | None) -> MetaCache | None:
    return cache.meta if isinstance(cache, DecodeCache) else cache


def decode_packet(
    data: bytes | memoryview, cache: DecodeCache | MetaCache | None = None
) -> list[Message]:
    """Decode one datagram into its messages (a compound yields several).

    Parts of a type newer than we know are skipped, so the enum can grow without breaking
    older peers; a malformed part of a known type fails the whole packet. ``cache`` is either
    a DecodeCache (broadcast parts and metadata) or a bare metadata table.
    """
    if isinstance(cache, DecodeCache):
        return list(cache.decode(data))
    meta = cache
    return _split_compound(data, lambda part: _decode_one(part[0], memoryview(part)[1:], meta))


def _split_compound(
    data: bytes | memoryview, decode_part: Callable[[bytes], Message | None]
) -> list[Message]:
    """The framing checks of a datagram, in one order for every caller; ``decode_part`` turns
    one message (type byte first) into a Message, or None for a type newer than we know."""
    if len(data) > wire.MAX_DATAGRAM_BYTES:
        raise _err(f"message of {len(data)} bytes exceeds {wire.MAX_DATAGRAM_BYTES}")
    if not data:
        raise _err("empty message")
    if type(data) is not bytes:
        data = bytes(data)  # parts are bytes slices: a cache keys on them
    if data[0] != MsgType.COMPOUND:
        msg = decode_part(data)
        if msg is None:
            raise _err(f"unknown message type {data[0]}")
        return [msg]
    if len(data) < 2:
        raise _err("compound: missing count")
    count = data[1]
    header_end = 2 + COMPOUND_PART_OVERHEAD * count
    if count == 0 or len(data) < header_end:
        raise _err("compound: truncated header")
    lengths = struct.unpack_from(f">{count}H", data, 2)
    if header_end + sum(lengths) != len(data):
        raise _err("compound: part lengths do not match packet")
    out: list[Message] = []
    off = header_end
    for ln in lengths:
        if ln < 1:
            raise _err("compound: empty part")
        msg = decode_part(data[off : off + ln])
        off += ln
        if msg is not None:
            out.append(msg)
    return out


def make_compound(parts: list[bytes]) -> bytes:
    """``[COMPOUND][count u8][len u16 x count][parts]``; one part is sent as itself."""
    if len(parts) == 1:
        return parts[0]
    if not 1 <= len(parts) <= MAX_COMPOUND_PARTS:
        raise ValueError("compound needs 1..255 parts")
    n = len(parts)
    try:
        header = _COMPOUND_HEADERS[n].pack(MsgType.COMPOUND, n, *map(len, parts))
    except struct.error:
        raise ValueError("compound part too long") from None
    return header + b"".join(parts)


# Compiled compound headers by part count: make_compound runs for every packet we send.
_COMPOUND_HEADERS = [struct.Struct(f">BB{n}H") for n in range(MAX_COMPOUND_PARTS + 1)]


class PushPullOverBudget(MembershipProtocolError):
    """A push-pull whose decoding would build more than MAX_PUSH_PULL_DECODE_BYTES."""


def decode_push_pull(
    data: bytes | memoryview,
    max_bytes: int = wire.MAX_STREAM_BYTES,
    cache: DecodeCache | MetaCache | None = None,
    budget: int = MAX_PUSH_PULL_DECODE_BYTES,
) -> PushPull:
    """Decode a push-pull stream payload (request or reply); PushPullOverBudget if its msgpack
    would decode to more than ``budget`` bytes (estimated: meshnet.decode_budget)."""
    meta_cache = _meta_table(cache)
    t, rest = wire.unframe(data, max_bytes=max_bytes, exc=MembershipProtocolError)
    if t != MsgType.PUSH_PULL:
        raise _err("stream: expected push-pull")
    b = decode_budget.unpack(rest, decode_budget.Budget(budget), max_bytes=max_bytes,
                             exc=MembershipProtocolError, over=PushPullOverBudget)
    if type(b) is not list or len(b) < 4:
        raise _err("push-pull: expected array of >= 4")
    if type(b[0]) is not int or b[0] < PUSH_PULL_VERSION:
        raise _err("push-pull: unsupported version")
    join, rows, user_state = b[1], b[2], b[3]
    if type(join) is not bool:
        raise _err("push-pull: join flag must be bool")
    if type(rows) is not list or len(rows) > MAX_PUSH_PULL_MEMBERS:
        raise _err("push-pull: bad member list")
    if type(user_state) is not bytes:
        raise _err("push-pull: user state must be bytes")
    certs: list[bytes] = []
    want: list[str] = []
    if len(b) >= 6:
        certs, want = b[4], b[5]
        if type(certs) is not list or len(certs) > MAX_PUSH_PULL_MEMBERS or not all(
                type(c) is bytes and 0 < len(c) <= MAX_CERT_BYTES for c in certs):
            raise _err("push-pull: bad certificate list")
        if type(want) is not list or len(want) > MAX_WANT:
            raise _err("push-pull: bad want list")
        want = [check_name(w) for w in want]
    states: list[PushPullState] = []
    append = states.append
    n_codes = len(STATE_CODES)
    for row in rows:
        if type(row) is not list or len(row) < 4:
            raise _err("push-pull: bad member row")
        code = row[2]
        if type(code) is not int or not 0 <= code < n_codes:
            raise _err("push-pull: bad state code")
        raw = row[3]
        meta = meta_cache.get(raw) if meta_cache is not None and type(raw) is bytes else None
        if meta is None:
            meta, raw = _decode_meta(raw, cache)
        name = row[0]
        # A name equal to already-validated metadata's passes check_name: skip the call.
        if (type(name) is not str or name != meta.name) and check_name(name) != meta.name:
            raise _err("push-pull: name does not match metadata")
        inc = row[1]
        if type(inc) is not int or inc < 0 or inc > MAX_INCARNATION:
            raise _err("incarnation: expected unsigned int")
        n = len(row)
        if n >= 5:
            append(PushPullState(name, inc, STATE_CODES[code], meta, raw,
                                 _uint(row[4], "meta incarnation"),
                                 _sig(row[5]) if n > 5 else b"", _sig(row[6]) if n > 6 else b"",
                                 _token(row[7]) if n > 7 else b"",
                                 _token(row[8]) if n > 8 else b""))
        else:
            append(PushPullState(name, inc, STATE_CODES[code], meta, raw))
    return PushPull(join, states, user_state, certs, want)
