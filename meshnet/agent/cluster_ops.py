"""Control-API operations on the replicated store: networks, endpoints, DNS lookups."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from meshnet.agent.control import Handler, OpError, SendEvent
from meshnet.agent.logs import LogOnce
from meshnet.agent.state_service import StateService
from meshnet.containment import summary_view
from meshnet.dns import Resolver, TaskRecord, VipRecord
from meshnet.lb.core import is_vip_claim, service_vips
from meshnet.state import Network
from meshnet.state.networks import (
    NetworkError,
    assign_vnis,
    check_name,
    check_overlap,
    mac_for_ip,
    parse_subnet,
    pick_subnet,
    vni_hash,
)
from meshnet.state.tables import ENDPOINTS, NETWORKS, Endpoint, endpoint_key
from meshnet.state.validate import ValidationError, check_ipv4

log = logging.getLogger("meshnet.cluster")


def endpoint_json(ep: Endpoint) -> dict[str, Any]:
    doc = {"name": ep.name, "ip": ep.ip, "mac": ep.mac, "node": ep.node, "service": ep.service,
           "slot": ep.slot, "network": ep.network}
    # A task's user, capabilities and limits, as the node running it published them.
    doc.update(summary_view(ep.extra.get("containment")))
    return doc


def _subnets(nets: Any) -> dict[str, ipaddress.IPv4Network]:
    """Existing networks' subnets; one that does not parse (the schema keeps such values out of
    the store) is left out rather than failing every `network create` for good."""
    out = {}
    for n in nets:
        try:
            out[n.name] = ipaddress.IPv4Network(n.subnet)
        except (ValueError, TypeError):
            continue
    return out


class ClusterOps:
    def __init__(self, state: StateService, resolver: Resolver, node: str,
                 address_pool: str) -> None:
        self.state = state
        self.store = state.store
        self.resolver = resolver
        self.node = node
        self.address_pool = address_pool
        self.dns_version = 0
        # DNS records left out because a value would not serve (the store's schema keeps them
        # out already; this is the second line), and rebuilds that failed outright.
        self.counters = {"dns_records_skipped": 0, "dns_refresh_errors": 0}
        # table -> why this node may not write it (None: it may); the agent sets it from the
        # node's certificate (only admins define networks and services).
        self.may_write: Callable[[str], str | None] = lambda table: None
        self._log_once = LogOnce(log)
        # () -> per-peer datapath numbers, for `network inspect` of encrypted networks (set by
        # the agent when it runs an encrypted datapath).
        self.encrypted_peers: Callable[[], list[dict[str, Any]]] | None = None

    def handlers(self) -> dict[str, Handler]:
        return {
            "network.create": self.network_create,
            "network.ls": self.network_ls,
            "network.inspect": self.network_inspect,
            "network.rm": self.network_rm,
            "endpoint.add": self.endpoint_add,
            "endpoint.rm": self.endpoint_rm,
            "endpoint.ls": self.endpoint_ls,
            "dns.lookup": self.dns_lookup,
        }

    # --- views --------------------------------------------------------------------------------

    def vnis(self) -> dict[str, int]:
        """Effective VNIs: hash collisions resolved by creation order, the same on every agent."""
        order = []
        for name in self.store.networks():
            entry = self.store.entry(NETWORKS, name)
            assert entry is not None
            order.append((name, (entry.hlc.pack(), entry.writer)))
        return assign_vnis(order)

    def network_json(self, net: Network, vnis: dict[str, int]) -> dict[str, Any]:
        return {"name": net.name, "vni": vnis.get(net.name, net.vni), "subnet": net.subnet,
                "encrypted": net.encrypted}

    def refresh_dns(self) -> None:
        """Rebuild the resolver's records from the store (called after every change). Never
        raises: an endpoint whose values would not serve is left out and counted, and a rebuild
        that fails keeps the previous records (logged once) until the next change."""
        try:
            records = []
            for ep in self.store.endpoints():
                if not ep.serving:
                    continue
                try:
                    check_ipv4(ep.ip)
                    records.append(TaskRecord(service=ep.service or "", slot=ep.slot,
                                              task=ep.name, network=ep.network, ip=ep.ip))
                except (ValidationError, TypeError):
                    self.counters["dns_records_skipped"] += 1
            # vip services: <service> answers the VIP (lb/core.py keeps only usable ones)
            nets = self.store.networks()
            vips = [VipRecord(service=svc, network=network, ip=ip)
                    for network, table in service_vips(
                        self.store.services(), {n: net.subnet for n, net in nets.items()}).items()
                    for ip, svc in table.items()]
            self.dns_version += 1
            self.resolver.set_records(records, self.dns_version, networks=list(nets), vips=vips)
        except Exception as e:
            self.counters["dns_refresh_errors"] += 1
            self._log_once("rebuilding DNS records", e, "dns_refresh_errors")

    # --- networks -----------------------------------------------------------------------------

    def require(self, table: str) -> None:
        """OpError unless this node may write TABLE (its certificate's role)."""
        reason = self.may_write(table)
        if reason is not None:
            raise OpError(reason)

    async def network_create(self, args: dict[str, Any], send: SendEvent) -> Any:
        self.require(NETWORKS)
        try:
            name = check_name("network", args.get("name"))
            nets = self.store.networks()
            if name in nets:
                raise OpError(f"network {name} already exists")
            existing = _subnets(nets.values())
            subnet_arg = args.get("subnet")
            if subnet_arg:
                subnet = parse_subnet(str(subnet_arg))
                check_overlap(subnet, existing)
            else:
                subnet = pick_subnet(existing.values(), self.address_pool)
        except NetworkError as e:
            raise OpError(str(e)) from None
        net = Network(name=name, vni=vni_hash(name), subnet=str(subnet),
                      encrypted=bool(args.get("encrypted")))
        await self.state.put(NETWORKS, name, net.to_value())
        return self.network_json(net, self.vnis())

    async def network_ls(self, args: dict[str, Any], send: SendEvent) -> Any:
        vnis = self.vnis()
        return [self.network_json(n, vnis) for n in sorted(self.store.networks().values(),
                                                           key=lambda n: n.name)]

    def _network(self, args: dict[str, Any], field: str = "name") -> Network:
        name = args.get(field)
        net = self.store.networks().get(str(name))
        if net is None:
            raise OpError(f"network {name} not found")
        return net

    async def network_inspect(self, args: dict[str, Any], send: SendEvent) -> Any:
        net = self._network(args)
        doc = self.network_json(net, self.vnis())
        doc["endpoints"] = [endpoint_json(ep) for ep in self.store.endpoints(net.name)
                            if not ep.extra.get("pending")]
        if net.encrypted:
            doc["peers"] = self.encrypted_peers() if self.encrypted_peers is not None else []
        return doc

    async def network_rm(self, args: dict[str, Any], send: SendEvent) -> Any:
        self.require(NETWORKS)
        net = self._network(args)
        users = sorted(f"service {s.name}" for s in self.store.services().values()
                       if s.network == net.name)
        # a VIP claim is its service's (listed above), withdrawn by its owner after the service;
        # so is a host's own address (agent/ingress.py), once no service with ports is left
        users += sorted(f"endpoint {e.name} (on {e.node})" for e in self.store.endpoints(net.name)
                        if not is_vip_claim(e.extra) and e.extra.get("kind") != "host")
        if users:
            raise OpError(f"network {net.name} is in use by {', '.join(users)}")
        await self.state.delete(NETWORKS, net.name)
        return {"removed": net.name}

    # --- endpoints (registrations owned by this node) ------------------------------------------

    async def endpoint_add(self, args: dict[str, Any], send: SendEvent) -> Any:
        net = self._network(args, "network")
        try:
            name = check_name("endpoint", args.get("name"))
            ip = ipaddress.IPv4Address(str(args.get("ip")))
        except (NetworkError, ValueError) as e:
            raise OpError(str(e)) from None
        subnet = ipaddress.IPv4Network(net.subnet)
        if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address):
            raise OpError(f"{ip} is not a host address of {net.name}'s subnet {subnet}")
        for other in self.store.endpoints(net.name):
            if other.ip == str(ip) and other.name != name:
                raise OpError(f"{ip} is already used by {other.name} on {other.node}")
            if other.name == name and other.node != self.node:
                raise OpError(f"name {name} is already registered by {other.node}")
        service = args.get("service") or None
        if service is not None:
            try:
                service = check_name("service", service)
            except NetworkError as e:
                raise OpError(str(e)) from None
        ep = Endpoint(name=name, network=net.name, ip=str(ip), mac=mac_for_ip(str(ip)),
                      node=self.node, service=str(service) if service else None)
        # Keyed by owner like every owned record: only we may change or delete it (authz).
        await self.state.put(ENDPOINTS, f"{ep.key}@{self.node}", ep.to_value())
        return endpoint_json(ep)

    async def endpoint_rm(self, args: dict[str, Any], send: SendEvent) -> Any:
        net = self._network(args, "network")
        key = f"{endpoint_key(net.name, str(args.get('name')))}@{self.node}"
        current = self.store.get(ENDPOINTS, key)
        if current is None:
            owners = [e.node for e in self.store.endpoints(net.name)
                      if e.name == args.get("name")]
            if owners:
                raise OpError(f"endpoint {args.get('name')} belongs to {owners[0]}; "
                              "remove it there")
            raise OpError(f"endpoint {args.get('name')} not found on {net.name}")
        await self.state.delete(ENDPOINTS, key)
        return {"removed": args.get("name")}

    async def endpoint_ls(self, args: dict[str, Any], send: SendEvent) -> Any:
        return [endpoint_json(ep) for ep in self.store.endpoints()]

    # --- DNS ----------------------------------------------------------------------------------

    async def dns_lookup(self, args: dict[str, Any], send: SendEvent) -> Any:
        name = args.get("name")
        if not isinstance(name, str) or not name:
            raise OpError("dns lookup needs a name")
        network = args.get("network")
        qtype = str(args.get("type") or "A")
        scope = frozenset({str(network)}) if network else None
        answers = self.resolver.answer_name(name, qtype, scope)
        if not answers:
            raise OpError(f"{name}: no {qtype} records" +
                          (f" on network {network}" if network else ""))
        return {"name": name, "type": qtype, "answers": answers}
