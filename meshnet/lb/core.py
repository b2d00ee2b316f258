"""VIP load balancing as a pure core: from the replicated state to each network's VIP map, and
from a VIP map to the nftables ruleset a sandbox on that network runs.

A service in endpoint mode ``vip`` (the default of ``service create``; a record without
``endpoint_mode`` is ``dnsrr``, as every service was before) holds one virtual IP per network
of its spec in its record's ``vips``. The VIP belongs to no sandbox: each sandbox on the network
translates it itself, in its own network namespace, on a connection's first packet:

    table ip meshnet_vip {
        set vips { type ipv4_addr; elements = { VIP, ... } }
        chain guard {                      # before NAT (-150): still the VIP as destination
            type filter hook output priority -150; policy accept;
            ip daddr @vips ct state invalid drop
            ip daddr @vips ct state new tcp flags != syn / fin,syn,rst,ack reject with tcp reset
            ip daddr EMPTY-VIP reject with tcp reset       # a VIP with no serving task
            ip daddr EMPTY-VIP reject                      # (icmp port unreachable)
        }
        chain lb {
            type nat hook output priority -100; policy accept;
            ip daddr VIP dnat to numgen random mod N map { 0 : TASK-IP, ... }
        }
    }

This is kube-proxy's nftables mode in small: NAT decides once per connection (the nat hook sees
only a conntrack's first packet) and conntrack carries the rest, with the kernel's own timeouts
(no IPVS idle timeout: moby#31208). Every port of the VIP is forwarded, as Docker's VIP does.

The ``guard`` rule for a *new* TCP packet that is not a SYN is what makes a removed backend fail
fast: when a task leaves a VIP's map, the agent deletes the conntrack entries that pointed at
it; the client's next packet on that connection then starts a new conntrack entry, which is not
a SYN, and is answered with a reset at once instead of being sent, un-NATed or to a new task
that knows nothing of it, into a retransmission timeout.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence

from meshnet.state.tables import Endpoint, Service

VIP = "vip"
DNSRR = "dnsrr"
ENDPOINT_MODES = (VIP, DNSRR)
# The endpoint `kind` of a VIP's IPAM claim (ipam.py's protocol, agent/vips.py).
VIP_CLAIM_KIND = "vip"
# Our own table in each sandbox's namespace; nothing else of the ruleset is touched.
VIP_TABLE = "meshnet_vip"
# Priorities as numbers: nft 1.0.6 takes no `dstnat` keyword on the output hook.
GUARD_PRIORITY = -150
NAT_PRIORITY = -100

# vip -> the serving task addresses behind it (sorted; empty: nobody serves, reject).
VipMap = Mapping[str, tuple[str, ...]]


def endpoint_mode(svc: Service) -> str:
    """The service's endpoint mode: ``vip`` only when its record says so (absent: dnsrr, the
    only mode agents before issue 17 knew)."""
    return VIP if svc.extra.get("endpoint_mode") == VIP else DNSRR


def vip_usable(ip: str, subnet: str) -> bool:
    """Whether IP may be a VIP on SUBNET: a host address of it that is neither the network's
    first address (.1, the gateway Docker keeps) nor its network or broadcast address. Never
    raises."""
    try:
        net = ipaddress.IPv4Network(subnet)
        addr = ipaddress.IPv4Address(ip)
    except (ValueError, TypeError):
        return False
    first = int(net.network_address)
    return addr in net and first + 2 <= int(addr) <= int(net.broadcast_address) - 1


def _service_vip_items(svc: Service) -> list[tuple[str, str]]:
    """(network, ip) pairs of a vip service's record; nothing for a dnsrr one or a bad map."""
    if endpoint_mode(svc) != VIP:
        return []
    vips = svc.extra.get("vips")
    if not isinstance(vips, Mapping):
        return []
    return sorted((n, ip) for n, ip in vips.items() if isinstance(n, str) and isinstance(ip, str))


def vips_taken(services: Iterable[Service], network: str) -> set[str]:
    """Every address a service's record holds as a VIP on NETWORK: IPAM never hands them to a
    task (the record is their lasting claim; agent/vips.py)."""
    return {ip for svc in services for n, ip in _service_vip_items(svc) if n == network}


def service_vips(services: Mapping[str, Service],
                 subnets: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """network -> vip -> service, for the VIPs that can be served: on a network that exists,
    usable on its subnet (vip_usable). Should two records hold one VIP (they cannot, unless
    hostile or broken), the service first by name keeps it, on every agent alike."""
    out: dict[str, dict[str, str]] = {}
    for name in sorted(services):
        svc = services[name]
        for network, ip in _service_vip_items(svc):
            subnet = subnets.get(network)
            if subnet is None or not vip_usable(ip, subnet):
                continue
            out.setdefault(network, {}).setdefault(ip, svc.name)
    return out


def _ip_key(ip: str) -> int:
    return int(ipaddress.IPv4Address(ip))


def vip_maps(services: Mapping[str, Service], subnets: Mapping[str, str],
             endpoints: Iterable[Endpoint]) -> dict[str, dict[str, tuple[str, ...]]]:
    """network -> vip -> the addresses of the service's serving tasks on that network (sorted,
    deduplicated). Only ``Endpoint.serving`` endpoints count (not pending, healthy if checked,
    no ``kind``); an address that is not a host address of the network, or is itself a VIP, is
    left out."""
    vips = service_vips(services, subnets)
    by_service: dict[tuple[str, str], set[str]] = {}
    for ep in endpoints:
        if not ep.serving or not ep.service or ep.network not in vips:
            continue
        if ep.ip in vips[ep.network] or not vip_usable(ep.ip, subnets[ep.network]):
            continue
        by_service.setdefault((ep.network, ep.service), set()).add(ep.ip)
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for network, table in vips.items():
        out[network] = {vip: tuple(sorted(by_service.get((network, svc), ()), key=_ip_key))
                        for vip, svc in table.items()}
    return out


def ruleset(vmap: VipMap) -> str:
    """The `nft -f` script that makes a sandbox's VIP table exactly VMAP, in one transaction
    (the table is created if missing, deleted, and made again, so no packet ever sees half of
    it). An empty VMAP removes the table. Pure and deterministic: equal maps, equal text."""
    head = f"table ip {VIP_TABLE}\ndelete table ip {VIP_TABLE}\n"
    if not vmap:
        return head
    vips = sorted(vmap, key=_ip_key)
    guard = [
        "ip daddr @vips ct state invalid drop",
        "ip daddr @vips ct state new tcp flags & (fin | syn | rst | ack) != syn "
        "reject with tcp reset",
    ]
    nat = []
    for vip in vips:
        backends = vmap[vip]
        if not backends:
            guard += [f"ip daddr {vip} meta l4proto tcp reject with tcp reset",
                      f"ip daddr {vip} reject"]
            continue
        if len(backends) == 1:
            nat.append(f"ip daddr {vip} dnat to {backends[0]}")
            continue
        items = ", ".join(f"{i} : {ip}" for i, ip in enumerate(backends))
        nat.append(f"ip daddr {vip} dnat to numgen random mod {len(backends)} map {{ {items} }}")
    lines = [f"table ip {VIP_TABLE} {{",
             "\tset vips {", "\t\ttype ipv4_addr",
             f"\t\telements = {{ {', '.join(vips)} }}", "\t}",
             "\tchain guard {",
             f"\t\ttype filter hook output priority {GUARD_PRIORITY}; policy accept;",
             *(f"\t\t{r}" for r in guard), "\t}",
             "\tchain lb {",
             f"\t\ttype nat hook output priority {NAT_PRIORITY}; policy accept;",
             *(f"\t\t{r}" for r in nat), "\t}",
             "}"]
    return head + "\n".join(lines) + "\n"


def dropped_backends(old: VipMap, new: VipMap) -> dict[str, frozenset[str]]:
    """vip -> the backends OLD sent it to that NEW does not (a VIP gone from NEW: all of them):
    the connections whose conntrack entries must go so their clients fail fast."""
    out: dict[str, frozenset[str]] = {}
    for vip, backends in old.items():
        gone = frozenset(backends) - frozenset(new.get(vip, ()))
        if gone:
            out[vip] = gone
    return out


def hold_draining(
    dropped: Mapping[str, frozenset[str]], draining: frozenset[str]
) -> tuple[dict[str, frozenset[str]], dict[str, frozenset[str]]]:
    """DROPPED split in two: the backends whose connections go now, and the draining ones
    (a rolling update's, still running) whose connections are left to finish."""
    now: dict[str, frozenset[str]] = {}
    held: dict[str, frozenset[str]] = {}
    for vip, gone in dropped.items():
        if gone - draining:
            now[vip] = gone - draining
        if gone & draining:
            held[vip] = gone & draining
    return now, held


def vip_claim_name(service: str) -> str:
    """The endpoint name of SERVICE's VIP claims: `<service>.0`, a task name no task has
    (slots start at 1), so it passes the endpoint schema and never meets a task's."""
    return f"{service}.0"


def is_vip_claim(value: Mapping[str, object]) -> bool:
    return value.get("kind") == VIP_CLAIM_KIND


def check_vip_map(vmap: Mapping[str, Sequence[str]]) -> None:
    """Every key and value is canonical IPv4 text (what ruleset() interpolates); ValueError
    otherwise. vip_maps only builds such maps; this is the shell's last line before nft."""
    for vip, backends in vmap.items():
        for ip in (vip, *backends):
            if str(ipaddress.IPv4Address(ip)) != ip:
                raise ValueError(f"{ip!r} is not canonical IPv4 text")
