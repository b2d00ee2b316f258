"""Service-discovery DNS: the pure answer logic (resolver) and upstream bookkeeping (upstream).

See :mod:`meshnet.dns.resolver` for the names served, the namespace rule and the cache design.
The sockets live in the agent.
"""

from meshnet.dns.resolver import (
    DEFAULT_TTL,
    MAX_CACHE_ENTRIES,
    Answer,
    Drop,
    Forward,
    Resolver,
    TaskRecord,
    servfail_reply,
)
from meshnet.dns.upstream import (
    DEFAULT_TIMEOUT,
    MAX_IN_FLIGHT,
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
    "MAX_UPSTREAMS",
    "Answer",
    "Drop",
    "Forward",
    "ReplyClient",
    "Resolver",
    "SendUpstream",
    "TaskRecord",
    "UpstreamPool",
    "servfail_reply",
]
