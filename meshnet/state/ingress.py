"""What the routing mesh should do on one host (issue 17), as a pure function of the store.

Every host DNATs connections to a published port on its own addresses to a serving task of the
service, wherever that task runs, and SNATs them to its own address on the task's network so the
reply comes back through it (agent/ingress.py applies it; platform/ingress_nft.py renders it).
This module decides, from the services, the endpoints and the alive members:

- which ports are published and to which task addresses (``Endpoint.serving`` only, on the
  service's first network, owned by a member that is alive or suspect: the overlay programs
  nothing for a dead owner, so a connection sent there would hang);
- which networks need this host's own address (every network a service with ports is on).

Two services can only publish the same port if two admins created them at the same moment on
different hosts (`service create` refuses a clash it can see). Every host then gives the port
to the service whose name sorts first, so the cluster still agrees; the other is "shadowed".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshnet.state.ports import PortError, check_ports
from meshnet.state.tables import Endpoint, Service

__all__ = ["IngressPlan", "PublishedPort", "plan", "service_ports"]


@dataclass(frozen=True, slots=True)
class PublishedPort:
    protocol: str  # "tcp" | "udp"
    published: int
    target: int
    service: str
    network: str
    backends: tuple[str, ...]  # serving task addresses on NETWORK, sorted


@dataclass(frozen=True, slots=True)
class IngressPlan:
    ports: tuple[PublishedPort, ...] = ()  # sorted by (protocol, published)
    networks: frozenset[str] = frozenset()  # networks this host needs an address on
    shadowed: tuple[str, ...] = ()  # "8080/tcp of web": lost a clash to an earlier name


def service_ports(svc: Service) -> list[dict[str, object]]:
    """SVC's published ports; [] for none, and for a value the schema would refuse (the store
    keeps those out; this is the second line)."""
    raw = svc.extra.get("ports")
    if not raw:
        return []
    try:
        return list(check_ports(raw))
    except PortError:
        return []


def plan(services: Mapping[str, Service], endpoints: Iterable[Endpoint],
         networks: Iterable[str], alive: Iterable[str]) -> IngressPlan:
    """The routing mesh's desired state. NETWORKS: the networks that exist; ALIVE: members
    alive or suspect (this host among them)."""
    known, up = set(networks), set(alive)
    backends: dict[tuple[str, str], set[str]] = {}
    for ep in endpoints:
        if ep.service and ep.serving and ep.node in up:
            backends.setdefault((ep.service, ep.network), set()).add(ep.ip)
    ports: dict[tuple[str, int], PublishedPort] = {}
    shadowed: list[str] = []
    need: set[str] = set()
    for name in sorted(services):
        svc = services[name]
        if svc.name != name or svc.network not in known:
            continue
        mine = service_ports(svc)
        if mine:
            need.add(svc.network)
        for p in mine:
            key = (str(p["protocol"]), int(str(p["published"])))
            if key in ports:
                shadowed.append(f"{key[1]}/{key[0]} of {name}")
                continue
            ips = backends.get((name, svc.network), set())
            ports[key] = PublishedPort(key[0], key[1], int(str(p["target"])), name, svc.network,
                                       tuple(sorted(ips, key=_ip_order)))
    return IngressPlan(tuple(ports[k] for k in sorted(ports)), frozenset(need), tuple(shadowed))


def _ip_order(ip: str) -> tuple[int, ...]:
    """Numeric order, so the same backends render the same ruleset on every pass."""
    try:
        return tuple(int(x) for x in ip.split("."))
    except ValueError:
        return (1 << 16,)
