"""SWIM + Lifeguard gossip membership: a pure, sans-IO core (see core.py for the rules)."""

from meshnet.membership.config import MAX_PUSH_PULL_CONCURRENT, PROFILES, MembershipConfig
from meshnet.membership.core import (
    MAX_MEMBERS,
    MAX_PENDING_EVENTS,
    MAX_RELAYS,
    MAX_TOMBSTONES,
    Membership,
)
from meshnet.membership.messages import MAX_CLAIM_INCARNATION, MAX_PUSH_PULL_MEMBERS, MsgType
from meshnet.membership.types import (
    MAX_META_BYTES,
    Addr,
    Delegate,
    Member,
    MemberAlive,
    MemberDead,
    MemberEvent,
    MemberJoined,
    MemberLeft,
    MemberReaped,
    MembershipProtocolError,
    MemberState,
    MemberSuspect,
    MemberUpdated,
    NodeMeta,
)
from meshnet.wire import ENCRYPTION_OVERHEAD, MAX_STREAM_BYTES

MAX_PUSH_PULL_BYTES = MAX_STREAM_BYTES

__all__ = [
    "ENCRYPTION_OVERHEAD",
    "MAX_CLAIM_INCARNATION",
    "MAX_MEMBERS",
    "MAX_META_BYTES",
    "MAX_PENDING_EVENTS",
    "MAX_PUSH_PULL_BYTES",
    "MAX_PUSH_PULL_CONCURRENT",
    "MAX_PUSH_PULL_MEMBERS",
    "MAX_RELAYS",
    "MAX_TOMBSTONES",
    "PROFILES",
    "Addr",
    "Delegate",
    "Member",
    "MemberAlive",
    "MemberDead",
    "MemberEvent",
    "MemberJoined",
    "MemberLeft",
    "MemberReaped",
    "MemberState",
    "MemberSuspect",
    "MemberUpdated",
    "Membership",
    "MembershipConfig",
    "MembershipProtocolError",
    "MsgType",
    "NodeMeta",
]
