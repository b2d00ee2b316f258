"""DNS wire-format helpers for the resolver core: a minimal hand parser and a few encoders.

The hot path of :class:`meshnet.dns.resolver.Resolver` never gets here: it answers from cached
bytes. These helpers run on a cache miss and build the pieces the cache stores. They parse only
what the resolver needs (header, one question, an optional OPT record), with a bounds check
before every read, and report anything unusual as :class:`NeedsFullParse` so that the caller can
fall back to dnspython, or as :class:`DnsFormatError` when the message is plainly malformed.

Nothing here raises anything but those two exceptions on any input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

__all__ = [
    "CLASS_ANY",
    "CLASS_IN",
    "DEFAULT_EDNS_PAYLOAD",
    "FLAG_AA",
    "FLAG_CD",
    "FLAG_QR",
    "FLAG_RA",
    "FLAG_RD",
    "FLAG_TC",
    "HEADER_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_NAME_BYTES",
    "MIN_UDP_PAYLOAD",
    "OPCODE_MASK",
    "OPT_RR_BYTES",
    "RCODE_BADVERS",
    "RCODE_FORMERR",
    "RCODE_NOERROR",
    "RCODE_NOTIMP",
    "RCODE_NXDOMAIN",
    "RCODE_REFUSED",
    "RCODE_SERVFAIL",
    "TYPE_A",
    "TYPE_AAAA",
    "TYPE_ANY",
    "TYPE_OPT",
    "TYPE_PTR",
    "TYPE_SRV",
    "DnsFormatError",
    "NeedsFullParse",
    "ParsedQuery",
    "a_rr",
    "encode_name",
    "error_reply",
    "opt_rr",
    "parse_query",
    "ptr_rr",
    "question_end",
    "reply_question",
]

HEADER_BYTES = 12

# RFC 1035 §2.3.4: a name is at most 255 octets on the wire, a label at most 63.
MAX_NAME_BYTES = 255
MAX_LABEL_BYTES = 63

# RFC 1035 §4.2.1: a UDP answer without EDNS is at most 512 bytes; EDNS sizes below 512 are
# treated as 512 (RFC 6891 §6.2.5).
MIN_UDP_PAYLOAD = 512

# The EDNS UDP payload we advertise and never exceed over UDP: DNS Flag Day 2020's 1232 bytes
# fits a 1280-byte IPv6 minimum MTU with headers, so our answers are never fragmented.
DEFAULT_EDNS_PAYLOAD = 1232

# The largest DNS message there is: TCP frames it with a 16-bit length (RFC 1035 §4.2.2). A query
# longer than this is not a DNS message, and a TCP answer never grows beyond it.
MAX_MESSAGE_BYTES = 65_535

# Size of an OPT pseudo-RR without options: root name (1), type (2), class (2), ttl (4), rdlen (2).
OPT_RR_BYTES = 11

# Size of an A record whose owner is a compression pointer to the question name.
A_RR_BYTES = 16

FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_CD = 0x0010
OPCODE_MASK = 0x7800
EDNS_DO = 0x8000

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
RCODE_BADVERS = 16  # extended: upper 8 bits go in the OPT TTL (RFC 6891 §6.1.3)

TYPE_A = 1
TYPE_PTR = 12
TYPE_AAAA = 28
TYPE_SRV = 33
TYPE_OPT = 41
TYPE_ANY = 255

CLASS_IN = 1
CLASS_ANY = 255

# A pointer to the question name at offset 12, the owner of every answer record we write.
NAME_POINTER_TO_QUESTION = b"\xc0\x0c"

_HEADER = struct.Struct("!HHHHHH")
_U16 = struct.Struct("!H")
_TYPE_CLASS = struct.Struct("!HH")


class DnsFormatError(Exception):
    """The message is malformed: answer FORMERR if the header was readable."""


class NeedsFullParse(Exception):
    """The message is unusual but maybe valid (compressed question, extra records, ...)."""


@dataclass(frozen=True, slots=True)
class ParsedQuery:
    """What the resolver needs from a query that the hand parser could read.

    ``labels`` are the raw question labels as sent (case preserved), without the root label;
    ``question`` is the question section as sent on the wire (name + type + class) and
    ``qend`` the offset just past it in the message.
    """

    qid: int
    flags: int
    labels: tuple[bytes, ...]
    qtype: int
    qclass: int
    question: bytes
    qend: int
    edns: bool
    edns_payload: int
    edns_version: int
    edns_do: bool


def question_end(msg: bytes, offset: int = HEADER_BYTES) -> int:
    """Offset just past an uncompressed question (name, type, class) starting at ``offset``.

    Raises DnsFormatError if it runs past the end or breaks the name rules, NeedsFullParse on a
    compression pointer.
    """
    n = len(msg)
    i = offset
    total = 1
    while True:
        if i >= n:
            raise DnsFormatError("question name runs past the end")
        length = msg[i]
        if length == 0:
            break
        if length > MAX_LABEL_BYTES:
            if length >= 0xC0:
                raise NeedsFullParse("compressed question name")
            raise DnsFormatError("bad label type")
        total += length + 1
        if total > MAX_NAME_BYTES:
            raise DnsFormatError("name too long")
        i += length + 1
    end = i + 5
    if end > n:
        raise DnsFormatError("question runs past the end")
    return end


def reply_question(msg: bytes) -> bytes:
    """The question of a message with exactly one, in the form replies are matched by.

    That is the name as sent on the wire with ASCII letters folded to lower case (a resolver may
    echo 0x20-randomised case either way), then type and class exactly. A name length byte is at
    most 63 and so never folded. Raises DnsFormatError unless there is exactly one uncompressed
    question (nothing precedes it for a compression pointer to refer to, so a pointer there is
    never valid), NeedsFullParse never.
    """
    if len(msg) < HEADER_BYTES:
        raise DnsFormatError("short header")
    if _U16.unpack_from(msg, 4)[0] != 1:
        raise DnsFormatError("not exactly one question")
    try:
        end = question_end(msg)
    except NeedsFullParse:
        raise DnsFormatError("compressed question name") from None
    return msg[HEADER_BYTES : end - 4].lower() + msg[end - 4 : end]


def _labels(msg: bytes, offset: int, end: int) -> tuple[bytes, ...]:
    out = []
    i = offset
    while i < end:
        length = msg[i]
        if length == 0:
            break
        out.append(msg[i + 1 : i + 1 + length])
        i += length + 1
    return tuple(out)


def parse_query(msg: bytes) -> ParsedQuery:
    """Parse a standard query: one question, no answer/authority, at most an OPT record.

    The header must be readable (len >= 12) and its opcode 0; callers check that first.
    Raises DnsFormatError or NeedsFullParse.
    """
    n = len(msg)
    qid, flags, qd, an, ns, ar = _HEADER.unpack_from(msg, 0)
    if qd != 1:
        raise DnsFormatError("query must have exactly one question")
    if an or ns or ar > 1:
        raise NeedsFullParse("records beyond one OPT")
    qend = question_end(msg)
    qtype, qclass = _TYPE_CLASS.unpack_from(msg, qend - 4)
    edns = False
    payload = 0
    version = 0
    do = False
    if ar:
        if qend + OPT_RR_BYTES > n:
            raise DnsFormatError("additional record runs past the end")
        if msg[qend] != 0 or _U16.unpack_from(msg, qend + 1)[0] != TYPE_OPT:
            raise NeedsFullParse("additional record is not an OPT")
        payload = _U16.unpack_from(msg, qend + 3)[0]
        version = msg[qend + 6]
        do = bool(msg[qend + 7] & 0x80)
        rdlen = _U16.unpack_from(msg, qend + 9)[0]
        if qend + OPT_RR_BYTES + rdlen != n:
            raise DnsFormatError("OPT record length does not match the message")
        edns = True
        # Options are ignored, as RFC 6891 §6.1.2 allows for options we do not implement
        # (we implement none; a COOKIE is ignored per RFC 7873 §5.2.1).
    elif qend != n:
        raise DnsFormatError("trailing bytes after the question")
    return ParsedQuery(
        qid=qid,
        flags=flags,
        labels=_labels(msg, HEADER_BYTES, qend),
        qtype=qtype,
        qclass=qclass,
        question=msg[HEADER_BYTES:qend],
        qend=qend,
        edns=edns,
        edns_payload=payload,
        edns_version=version,
        edns_do=do,
    )


def encode_name(labels: tuple[bytes, ...]) -> bytes:
    """Uncompressed wire form of a name given as labels (without the root label)."""
    return b"".join(bytes((len(label),)) + label for label in labels) + b"\x00"


def a_rr(ip_packed: bytes, ttl: int) -> bytes:
    """An A record owned by the question name (compression pointer), 16 bytes."""
    return NAME_POINTER_TO_QUESTION + struct.pack("!HHIH", TYPE_A, CLASS_IN, ttl, 4) + ip_packed


def ptr_rr(target: bytes, ttl: int) -> bytes:
    """A PTR record owned by the question name; ``target`` is an encoded name."""
    return (
        NAME_POINTER_TO_QUESTION
        + struct.pack("!HHIH", TYPE_PTR, CLASS_IN, ttl, len(target))
        + target
    )


def opt_rr(payload: int, do: bool, ext_rcode: int = 0) -> bytes:
    """Our OPT pseudo-RR: advertised UDP size, version 0, the DO bit echoed, no options."""
    return b"\x00" + struct.pack(
        "!HHBBHH", TYPE_OPT, payload, ext_rcode, 0, EDNS_DO if do else 0, 0
    )


def error_reply(query: bytes, rcode: int, payload: int = DEFAULT_EDNS_PAYLOAD) -> bytes | None:
    """A reply carrying only ``rcode`` (FORMERR, SERVFAIL, NOTIMP, REFUSED, BADVERS, ...).

    Echoes the ID, opcode, RD and CD bits; echoes the question and answers with an OPT record
    when the query is a well-formed standard query, else sends the bare header. Returns None when
    not even the header is readable, or the message is itself a response (never answer those).
    """
    if len(query) < HEADER_BYTES:
        return None
    qid, qflags = struct.unpack_from("!HH", query, 0)
    if qflags & FLAG_QR:
        return None
    flags = FLAG_QR | FLAG_RA | (qflags & (OPCODE_MASK | FLAG_RD | FLAG_CD)) | (rcode & 0xF)
    question = b""
    opt = b""
    if not qflags & OPCODE_MASK and len(query) <= MAX_MESSAGE_BYTES:
        try:
            parsed = parse_query(query)
        except (DnsFormatError, NeedsFullParse):
            parsed = None
        if parsed is not None:
            question = parsed.question
            if parsed.edns:
                opt = opt_rr(payload, parsed.edns_do, rcode >> 4)
    if rcode > 0xF and not opt:
        flags = (flags & ~0xF) | RCODE_FORMERR  # an extended rcode needs an OPT to carry it
    return _HEADER.pack(qid, flags, 1 if question else 0, 0, 0, 1 if opt else 0) + question + opt
