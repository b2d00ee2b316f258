"""VIP load balancing (issue 17): which VIP maps to which tasks, and the nftables ruleset that
does it inside a sandbox, as a pure core. The agent's shell is meshnet/agent/vips.py."""

from meshnet.lb.core import (
    DNSRR,
    ENDPOINT_MODES,
    VIP,
    VIP_CLAIM_KIND,
    VIP_TABLE,
    VipMap,
    check_vip_map,
    dropped_backends,
    endpoint_mode,
    is_vip_claim,
    ruleset,
    service_vips,
    vip_claim_name,
    vip_maps,
    vip_usable,
    vips_taken,
)

__all__ = [
    "DNSRR",
    "ENDPOINT_MODES",
    "VIP",
    "VIP_CLAIM_KIND",
    "VIP_TABLE",
    "VipMap",
    "check_vip_map",
    "dropped_backends",
    "endpoint_mode",
    "is_vip_claim",
    "ruleset",
    "service_vips",
    "vip_claim_name",
    "vip_maps",
    "vip_usable",
    "vips_taken",
]
