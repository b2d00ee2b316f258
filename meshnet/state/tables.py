"""Typed views of the three known tables.

The store itself only knows tables as names and values as msgpack-able dicts; these dataclasses
are conveniences over that. ``from_value`` is lenient about *extra* fields (a newer agent may add
some; they survive a round trip in ``extra``) and strict about the known ones: a value whose
known fields have the wrong type yields None, and the typed views skip it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "ENDPOINTS",
    "NETWORKS",
    "SERVICES",
    "Endpoint",
    "Network",
    "Service",
    "endpoint_key",
]

NETWORKS = "networks"
SERVICES = "services"
ENDPOINTS = "endpoints"

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _empty() -> Mapping[str, Any]:
    return _EMPTY


_NETWORK_FIELDS = frozenset({"name", "vni", "subnet", "encrypted"})
_SERVICE_FIELDS = frozenset({"name", "network", "mode", "replicas", "spec"})
_ENDPOINT_FIELDS = frozenset({"name", "network", "ip", "mac", "node", "service", "slot"})


def _extra(value: Mapping[str, Any], known: frozenset[str]) -> Mapping[str, Any]:
    rest = {k: v for k, v in value.items() if k not in known}
    return MappingProxyType(rest) if rest else _EMPTY


def _opt_str(value: object) -> bool:
    return value is None or type(value) is str


def endpoint_key(network: str, name: str) -> str:
    """Endpoints are keyed per network: one task attached to two networks has two endpoints."""
    return f"{network}/{name}"


@dataclass(frozen=True, slots=True)
class Network:
    name: str
    vni: int
    subnet: str
    encrypted: bool = False
    extra: Mapping[str, Any] = field(default_factory=_empty, compare=False)

    @property
    def key(self) -> str:
        return self.name

    def to_value(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(name=self.name, vni=self.vni, subnet=self.subnet, encrypted=self.encrypted)
        return out

    @classmethod
    def from_value(cls, value: Mapping[str, Any]) -> Network | None:
        name, vni, subnet = value.get("name"), value.get("vni"), value.get("subnet")
        encrypted = value.get("encrypted", False)
        if type(name) is not str or type(vni) is not int or type(subnet) is not str:
            return None
        if type(encrypted) is not bool:
            return None
        return cls(name, vni, subnet, encrypted, _extra(value, _NETWORK_FIELDS))


@dataclass(frozen=True, slots=True)
class Service:
    """A service definition; the scheduler's own fields (command, env, constraints...) live in
    ``spec`` so this module does not have to track them."""

    name: str
    network: str
    mode: str = "replicated"  # "replicated" | "global"
    replicas: int = 1
    spec: Mapping[str, Any] = field(default_factory=_empty, compare=False)
    extra: Mapping[str, Any] = field(default_factory=_empty, compare=False)

    @property
    def key(self) -> str:
        return self.name

    def to_value(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(
            name=self.name,
            network=self.network,
            mode=self.mode,
            replicas=self.replicas,
            spec=dict(self.spec),
        )
        return out

    @classmethod
    def from_value(cls, value: Mapping[str, Any]) -> Service | None:
        name, network = value.get("name"), value.get("network")
        mode, replicas = value.get("mode", "replicated"), value.get("replicas", 1)
        spec = value.get("spec", {})
        if type(name) is not str or type(network) is not str or type(mode) is not str:
            return None
        if type(replicas) is not int or type(spec) is not dict:
            return None
        return cls(
            name, network, mode, replicas, MappingProxyType(spec), _extra(value, _SERVICE_FIELDS)
        )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One running task or one-off sandbox on one network. ``node`` owns it."""

    name: str
    network: str
    ip: str
    mac: str
    node: str
    service: str | None = None
    slot: int | None = None
    extra: Mapping[str, Any] = field(default_factory=_empty, compare=False)

    @property
    def key(self) -> str:
        return endpoint_key(self.network, self.name)

    @property
    def serving(self) -> bool:
        """Whether traffic may be sent to it: DNS names, VIP maps and published ports use only
        serving endpoints. A claim still being confirmed (``pending``) is not; nor is a task
        whose health check has not passed (``health`` starting or unhealthy; absent: no check);
        nor a host's own address on the network (``kind`` host) or a VIP claim (``kind`` vip)."""
        x = self.extra
        return (not x.get("pending") and x.get("health", "healthy") == "healthy"
                and x.get("kind") is None)

    def to_value(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update(
            name=self.name,
            network=self.network,
            ip=self.ip,
            mac=self.mac,
            node=self.node,
            service=self.service,
            slot=self.slot,
        )
        return out

    @classmethod
    def from_value(cls, value: Mapping[str, Any]) -> Endpoint | None:
        v = value
        if not all(type(v.get(f)) is str for f in ("name", "network", "ip", "mac", "node")):
            return None
        service, slot = v.get("service"), v.get("slot")
        if not _opt_str(service) or not (slot is None or type(slot) is int):
            return None
        return cls(
            v["name"],
            v["network"],
            v["ip"],
            v["mac"],
            v["node"],
            service,
            slot,
            _extra(v, _ENDPOINT_FIELDS),
        )
