"""/health on real hosts (#16): 200 while joined, 503 with a one-line reason once the host is
partitioned from every member, 200 again after the heal. Fetched from inside the host's own
namespace (the partition drops only what crosses the switch)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from conftest import wait
from prometheus_client.parser import text_string_to_metric_families

from meshnet.lab import Lab
from meshnet.lab.scrape import HttpReply, http_get, sample_values

pytestmark = pytest.mark.netns

LabFactory = Callable[[], Lab]


def health(lab: Lab, host: str) -> HttpReply:
    return http_get(lab.host_ns(host), lab.metrics_addr(host), "/health")


def members(lab: Lab, host: str) -> dict[str, float]:
    text = http_get(lab.host_ns(host), lab.metrics_addr(host), "/metrics").body
    return sample_values(text, "meshnet_members")


def test_health_is_503_while_partitioned_from_every_member(lab_factory: LabFactory) -> None:
    lab = lab_factory()
    lab.up(3, profile="lan-fast")
    hosts = ["h1", "h2", "h3"]

    def all_alive() -> bool:
        for h in hosts:
            r = lab.ctl(h, ["--json", "members"], capture_output=True, timeout=20)
            if r.returncode != 0 or sorted(m["name"] for m in json.loads(r.stdout)
                                           if m["state"] == "alive") != hosts:
                return False
        return True

    wait(all_alive, 30, "all three alive")
    # A lab agent has what a loopback one lacks (identity, the vxlan overlay, the encrypted
    # overlay's glue): its whole /metrics parses too, and holds their series.
    text = http_get(lab.host_ns("h1"), lab.metrics_addr("h1"), "/metrics").body
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("meshnet_encrypted_sas", "meshnet_encrypted_peers", "meshnet_networks",
                 "meshnet_tasks", "meshnet_task_start_seconds",
                 "meshnet_status_identity_certs_known"):
        assert name in families, name
    passes = {tuple(s.labels.items()): s.value
              for s in families["meshnet_reconcile_passes"].samples}
    assert passes[(("loop", "overlay"),)] > 0 and passes[(("loop", "scheduler"),)] > 0
    for h in hosts:
        reply = health(lab, h)
        assert (reply.status, reply.body) == (200, "ok: 3 members reachable\n"), h
        assert reply.headers["content-type"].startswith("text/plain")

    lab.partition([["h1"], ["h2", "h3"]])
    wait(lambda: health(lab, "h1").status == 503, 60, "h1's /health to say 503")
    reply = health(lab, "h1")
    assert reply.body.startswith("no alive member besides itself"), reply.body
    assert reply.body.count("\n") == 1
    assert members(lab, "h1")['{state="alive"}'] == 1
    # the other side still has company
    assert health(lab, "h2").status == 200

    lab.heal()
    wait(lambda: health(lab, "h1").status == 200, 90, "h1's /health to say 200 after heal")
    wait(lambda: members(lab, "h1")['{state="alive"}'] == 3, 30, "h1 to see all three")
