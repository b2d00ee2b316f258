"""The replicated cluster store: a sans-IO LWW-map CRDT per table (see store.py)."""

from meshnet.state.codec import MsgType
from meshnet.state.hlc import Hlc
from meshnet.state.store import NO_HORIZON, Changes, Horizon, Store, StoreFull
from meshnet.state.tables import (
    ENDPOINTS,
    NETWORKS,
    SERVICES,
    Endpoint,
    Network,
    Service,
    endpoint_key,
)
from meshnet.state.types import (
    SIG_BYTES,
    Authorizer,
    ChangeEvent,
    Entry,
    EventsLost,
    Refusal,
    Signer,
    StateProtocolError,
    StoreConfig,
    StoreEvent,
    StoreStats,
    copy_order,
    entry_order,
    merge,
    tombstone_ttl_for,
)

__all__ = [
    "ENDPOINTS",
    "NETWORKS",
    "NO_HORIZON",
    "SERVICES",
    "SIG_BYTES",
    "Authorizer",
    "ChangeEvent",
    "Changes",
    "Endpoint",
    "Entry",
    "EventsLost",
    "Hlc",
    "Horizon",
    "MsgType",
    "Network",
    "Refusal",
    "Service",
    "Signer",
    "StateProtocolError",
    "Store",
    "StoreConfig",
    "StoreEvent",
    "StoreFull",
    "StoreStats",
    "copy_order",
    "endpoint_key",
    "entry_order",
    "merge",
    "tombstone_ttl_for",
]
