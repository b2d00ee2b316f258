"""Public value types of the membership core: metadata, member snapshots, events, delegate."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from meshnet import wire

Addr = tuple[str, int]

# Encoded NodeMeta (name, address, labels, extra) must fit this. 512 bytes is memberlist's
# MetaMaxSize; it keeps an alive message well inside one 1400-byte packet, so a member update is
# never split, and bounds a 1000-member push-pull to ~0.6 MB.
MAX_META_BYTES = 512
# Node names are DNS-label-ish host names; 255 is the longest DNS name.
MAX_NAME_BYTES = 255


class MembershipProtocolError(Exception):
    """The one exception the membership decoders raise. Anything else escaping one is a bug."""


class MemberState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


# Rank used to order two claims at the same incarnation (a larger rank wins a tie).
STATE_RANK: dict[MemberState, int] = {
    MemberState.ALIVE: 0,
    MemberState.SUSPECT: 1,
    MemberState.DEAD: 2,
    MemberState.LEFT: 3,
}
STATE_CODES: tuple[MemberState, ...] = (
    MemberState.ALIVE,
    MemberState.SUSPECT,
    MemberState.DEAD,
    MemberState.LEFT,
)


def _check_str(value: object, what: str, max_len: int = MAX_META_BYTES) -> str:
    if not isinstance(value, str):
        raise MembershipProtocolError(f"{what}: expected str")
    if len(value) > max_len:
        raise MembershipProtocolError(f"{what}: too long")
    return value


def check_name(value: object) -> str:
    """A node name as the agent's config allows it (one DNS label of ASCII letters, digits,
    '.', '_' and '-'): names end up in logs, file names and DNS, so nothing else is let in."""
    name = _check_str(value, "name", MAX_NAME_BYTES)
    if not _NODE_NAME_RE.fullmatch(name):
        raise MembershipProtocolError("name: expected 1-63 ASCII letters, digits, '.', '_', '-'")
    return name


_NODE_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")


def check_port(value: object) -> int:
    if type(value) is not int or not 0 <= value <= 65535:
        raise MembershipProtocolError("port: expected int in 0..65535")
    return value


@dataclass(frozen=True, slots=True)
class NodeMeta:
    """What a node says about itself: name, address it is reached at, labels and extras.

    ``extra`` has room for what other layers need to gossip (datapath public key, capacity).
    Encoded, the whole thing is at most MAX_META_BYTES.
    """

    name: str
    addr: Addr
    labels: Mapping[str, str]
    extra: Mapping[str, bytes | str | int]

    def __init__(
        self,
        name: str,
        addr: Addr,
        labels: Mapping[str, str] | None = None,
        extra: Mapping[str, bytes | str | int] | None = None,
    ) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "addr", (addr[0], int(addr[1])))
        object.__setattr__(self, "labels", dict(labels or {}))
        object.__setattr__(self, "extra", dict(extra or {}))

    def __hash__(self) -> int:
        return hash((self.name, self.addr, tuple(sorted(self.labels.items()))))

    def encode(self) -> bytes:
        """msgpack ``[name, host, port, labels, extra]``; ValueError if over MAX_META_BYTES."""
        body = [self.name, self.addr[0], self.addr[1], dict(self.labels), dict(self.extra)]
        try:
            out = wire.pack(body)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"node metadata not encodable: {e}") from None
        if len(out) > MAX_META_BYTES:
            raise ValueError(f"node metadata is {len(out)} bytes, limit {MAX_META_BYTES}")
        # Re-validate what we produce so a bad local value fails here, not on every peer.
        try:
            NodeMeta.decode(out)
        except MembershipProtocolError as e:
            raise ValueError(f"invalid node metadata: {e}") from None
        return out

    @staticmethod
    def decode(data: bytes | memoryview) -> NodeMeta:
        if len(data) > MAX_META_BYTES:
            raise MembershipProtocolError("metadata too large")
        body: Any = wire.unpack(data, max_bytes=MAX_META_BYTES, exc=MembershipProtocolError)
        if not isinstance(body, list) or len(body) != 5:
            raise MembershipProtocolError("metadata: expected 5-element array")
        name = check_name(body[0])
        host = _check_str(body[1], "host", MAX_NAME_BYTES)
        port = check_port(body[2])
        labels_in, extra_in = body[3], body[4]
        if not isinstance(labels_in, dict) or not isinstance(extra_in, dict):
            raise MembershipProtocolError("metadata: labels/extra must be maps")
        labels: dict[str, str] = {}
        for k, v in labels_in.items():
            labels[_check_str(k, "label key")] = _check_str(v, "label value")
        extra: dict[str, bytes | str | int] = {}
        for k, v in extra_in.items():
            if not isinstance(v, bytes | str | int) or isinstance(v, bool):
                raise MembershipProtocolError("metadata: extra values are bytes, str or int")
            extra[_check_str(k, "extra key")] = v
        return NodeMeta(name, (host, port), labels, extra)


@dataclass(frozen=True, slots=True)
class Member:
    """A snapshot of what this node believes about one member."""

    name: str
    addr: Addr
    state: MemberState
    incarnation: int
    meta: NodeMeta
    state_changed_at: float


@dataclass(frozen=True, slots=True)
class MemberEvent:
    member: Member


@dataclass(frozen=True, slots=True)
class MemberJoined(MemberEvent):
    """A member became alive: first sight, or a rejoin after dead/left."""


@dataclass(frozen=True, slots=True)
class MemberUpdated(MemberEvent):
    """An alive member re-announced itself with new metadata."""


@dataclass(frozen=True, slots=True)
class MemberSuspect(MemberEvent):
    pass


@dataclass(frozen=True, slots=True)
class MemberAlive(MemberEvent):
    """A suspect member refuted the suspicion (recovered)."""


@dataclass(frozen=True, slots=True)
class MemberDead(MemberEvent):
    pass


@dataclass(frozen=True, slots=True)
class MemberLeft(MemberEvent):
    pass


@dataclass(frozen=True, slots=True)
class MemberReaped(MemberEvent):
    """A dead or left member was forgotten after ``reap_after``."""


class Delegate(Protocol):
    """memberlist-style hooks for a layer that rides on membership (the replicated store)."""

    def get_broadcasts(self, overhead: int, limit_bytes: int) -> list[bytes]:
        """User messages to piggyback in ``limit_bytes`` of spare packet room (total), each
        costing its length plus ``overhead`` bytes of framing (memberlist's GetBroadcasts)."""
        ...

    def notify_message(self, data: bytes) -> None:
        """A user message arrived."""
        ...

    def local_state(self, join: bool) -> bytes:
        """State to carry in a push-pull exchange."""
        ...

    def merge_remote_state(self, data: bytes, join: bool) -> None:
        """The peer's ``local_state`` from a push-pull exchange."""
        ...
