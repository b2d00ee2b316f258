"""Service-discovery DNS: the pure answer logic (resolver) and upstream bookkeeping (upstream).

See :mod:`meshnet.dns.resolver` for the names served, the namespace rule and the cache design,
:mod:`meshnet.dns.upstream` for forwarding and :mod:`meshnet.dns.limits` for the per-sandbox
caps. The sockets live in the agent.
"""

from meshnet.dns.limits import Admit, FairSlots, Refuse
from meshnet.dns.resolver import (
    DEFAULT_TTL,
    MAX_CACHE_ENTRIES,
    Answer,
    Drop,
    Forward,
    Resolver,
    TaskRecord,
    VipRecord,
    servfail_reply,
)
from meshnet.dns.upstream import (
    DEFAULT_TIMEOUT,
    MAX_IN_FLIGHT,
    MAX_IN_FLIGHT_PER_OWNER,
    MAX_UPSTREAMS,
    ReplyClient,
    SendUpstream,
    UpstreamPool,
)

__all__ = [
    "DEFAULT_TIMEOUT",
    "DEFAULT_TTL",
    "MAX_CACHE_ENTRIES",
    "MAX_IN_FLIGHT",
    "MAX_IN_FLIGHT_PER_OWNER",
    "MAX_UPSTREAMS",
    "Admit",
    "Answer",
    "Drop",
    "FairSlots",
    "Forward",
    "Refuse",
    "ReplyClient",
    "Resolver",
    "SendUpstream",
    "TaskRecord",
    "UpstreamPool",
    "VipRecord",
    "servfail_reply",
]
