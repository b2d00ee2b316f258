"""/metrics and /health of real agents on loopback (#16): Prometheus' own parser reads the whole
text, every number of `meshctl status --json` is in it, and /health follows membership."""

from __future__ import annotations

import math
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import dns.message
import dns.query
import dns.rcode
from conftest import AgentProc, free_port, wait_for
from prometheus_client.parser import text_string_to_metric_families

from meshnet.lab.scrape import HttpReply, http_get
from meshnet.metrics import status_leaves

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics_flags(ip: str) -> tuple[list[str], tuple[str, int]]:
    addr = (ip, free_port(ip))
    return ["--metrics-listen", f"{ip}:{addr[1]}"], addr


def get(addr: tuple[str, int], path: str) -> HttpReply:
    return http_get(None, addr, path)


def samples(text: str) -> Samples:
    """Every sample, as Prometheus' client library parses the text (it raises on bad text)."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"duplicate sample {key}"
            out[key] = s.value
    return out


class Pair(NamedTuple):
    a: AgentProc
    b: AgentProc
    addr_a: tuple[str, int]  # their metrics listeners
    addr_b: tuple[str, int]
    dns_a: tuple[str, int]  # a's --dns-listen


def pair(agents: Callable[..., AgentProc], key: Path) -> Pair:
    flags_a, addr_a = metrics_flags("127.0.0.91")
    dns_port = free_port("127.0.0.91")
    a = agents(name="ma", key=key, ip="127.0.0.91",
               extra=[*flags_a, "--dns-listen", f"127.0.0.91:{dns_port}"])
    flags_b, addr_b = metrics_flags("127.0.0.92")
    b = agents(name="mb", key=key, ip="127.0.0.92", extra=flags_b)
    a.start()
    b.start(join=[a.addr])
    wait_for(lambda: all(m.get(n, {}).get("state") == "alive"
                         for m in (a.members(), b.members()) for n in ("ma", "mb")),
             20, "both alive on both")
    return Pair(a, b, addr_a, addr_b, ("127.0.0.91", dns_port))


def test_the_whole_text_parses_and_holds_every_status_number(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    a, _, addr_a, _, dns_a = pair(agents, key_file)
    for name in ("nosuch", "nosuch2"):  # two NXDOMAIN answers from the mesh's own names
        r = dns.query.udp(dns.message.make_query(name, "A"), dns_a[0], 3, port=dns_a[1])
        assert r.rcode() == dns.rcode.NXDOMAIN
    wait_for(lambda: a.ctl_json("status")["gossip"]["probes"] > 0, 20, "a probe or two")

    doc = a.ctl_json("status")
    reply = get(addr_a, "/metrics")  # after the status: no counter can be behind it
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    got = samples(reply.body)

    leaves = status_leaves(doc)
    assert len(leaves) > 150  # gossip, store, dns, tasks, control, identity...
    for leaf in leaves:
        key = (leaf.name, tuple(sorted((leaf.labels or {}).items())))
        assert key in got, f"{'.'.join(leaf.path)} of `status` is not in /metrics as {key}"
        if leaf.kind == "counter":
            assert got[key] >= leaf.value, (leaf, got[key])

    def one(metric: str, /, **labels: str) -> float:
        return got[(metric, tuple(sorted(labels.items())))]

    assert one("meshnet_members", state="alive") == 2
    assert one("meshnet_members", state="dead") == 0
    assert one("meshnet_health") == 1
    assert one("meshnet_probes_total") > 0
    assert one("meshnet_gossip_bytes_total", direction="out") > 0
    assert one("meshnet_gossip_packets_total", direction="in") > 0
    assert one("meshnet_dns_answers_total", rcode="NXDOMAIN") == 2
    assert one("meshnet_dns_latency_seconds_count") == 2
    assert one("meshnet_dns_latency_seconds_bucket", le="+Inf") == 2
    assert one("meshnet_process_resident_memory_bytes") > 10 << 20
    assert one("meshnet_process_cpu_seconds_total") > 0
    # The lag monitor's first sample comes LAG_INTERVAL_S after start; a probe may come sooner.
    lag_count = ("meshnet_event_loop_lag_seconds_count", ())
    wait_for(lambda: samples(get(addr_a, "/metrics").body).get(lag_count, 0) > 0, 10,
             "a lag sample")
    assert math.isfinite(one("meshnet_event_loop_lag_last_seconds"))
    assert one("meshnet_build_info", name="ma", version=doc["version"]) == 1


def test_health_follows_membership(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    a, b, addr_a, addr_b, _ = pair(agents, key_file)
    for addr in (addr_a, addr_b):
        reply = get(addr, "/health")
        assert (reply.status, reply.body) == (200, "ok: 2 members reachable\n")

    b.kill9()
    wait_for(lambda: get(addr_a, "/health").status == 503, 30, "a to report itself alone")
    body = get(addr_a, "/health").body
    assert body.startswith("no alive member besides itself"), body
    assert body.count("\n") == 1  # one line
    assert "meshnet_health 0" in get(addr_a, "/metrics").body

    b.start(join=[a.addr])
    wait_for(lambda: get(addr_a, "/health").status == 200, 30, "a healthy again")


def test_an_address_in_use_is_a_one_line_start_error(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    addr_a = pair(agents, key_file).addr_a
    clash = agents(name="mc", key=key_file, ip="127.0.0.93",
                   extra=["--metrics-listen", f"{addr_a[0]}:{addr_a[1]}"])
    r = subprocess.run(clash.args(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith(
        f"meshnetd: metrics_listen {addr_a[0]}:{addr_a[1]}: "), r.stderr
    assert "Traceback" not in r.stderr
