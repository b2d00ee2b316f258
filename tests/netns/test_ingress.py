"""Published ports, the routing mesh (issue 17), on a real 3-host lab.

A service with 2 replicas kept off h3 publishes 8080: every host's underlay address answers,
h3's too, from a client on the underlay switch that is none of the hosts, and from a host to
its own address; clashes are refused; removing the service takes the rules and the hosts'
overlay addresses away. One lab for the module; the removal test runs last.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import Cluster, new_prefix, require_root, wait

from meshnet.lab import Lab
from meshnet.lab.demo_http import TASK_ARGV as DEMO
from meshnet.lab.demo_http import TASK_MOUNT
from meshnet.lab.lab import RUN_BASE, UNDERLAY_NET
from meshnet.lab.scrape import http_get
from meshnet.platform import netns
from meshnet.platform.ingress_nft import TABLE

pytestmark = pytest.mark.netns

HOSTS = ("h1", "h2", "h3")
PORT = 8080
# The client on the underlay switch: an address of the lab's subnet no host has (hosts are
# .1..N), on the switch's own bridge in the lab's underlay namespace (gone with the lab).
CLIENT_IP = str(UNDERLAY_NET.network_address + 250)


@dataclass
class Env:
    c: Cluster
    lab: Lab


def answer(ns: str, host_ip: str) -> str | None:
    """The body a GET to HOST_IP:PORT gets from inside NS; None if nothing answers."""
    try:
        return http_get(ns, (host_ip, PORT), "/", timeout=3).body.strip()
    except OSError:
        return None


def nft_tables(lab: Lab, host: str) -> str:
    r = lab.exec(host, ["nft", "list", "tables"], capture_output=True, timeout=10)
    assert r.returncode == 0, r.stderr
    return r.stdout


def host_endpoints(c: Cluster) -> dict[str, str]:
    doc = c.ctl_json("h1", "network", "inspect", "appnet")
    return {e["node"]: e["ip"] for e in doc["endpoints"] if e["name"].startswith("host-")}


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    require_root()
    prefix = new_prefix()
    lab = Lab(prefix, RUN_BASE / prefix)
    c = Cluster(lab)
    try:
        lab.up(3, profile="lan-fast")
        wait(lambda: all(sorted(m["name"] for m in c.ctl_json(h, "members")
                                if m["state"] == "alive") == list(HOSTS) for h in HOSTS),
             30, "membership")
        netns.ip("addr", "add", f"{CLIENT_IP}/{UNDERLAY_NET.prefixlen}", "dev", "br0",
                 ns=lab.underlay_ns)
        c.network("appnet")
        r = c.ctl("h1", "service", "create", "web", "--network", "appnet", "--replicas", "2",
                  "--constraint", "node.name!=h3", "--publish", f"{PORT}:{PORT}",
                  *TASK_MOUNT, "--", *DEMO, "serve")
        assert r.returncode == 0, r.stderr
        yield Env(c, lab)
    finally:
        c.close()
        for st in lab.status():  # shown by pytest only when a test failed
            log = lab.log_path(st.name)
            if log.exists():
                print(f"--- {st.name} meshnetd.log (tail)",
                      *log.read_text(errors="replace").splitlines()[-30:], sep="\n")
        lab.down()


def test_published_port_answers_on_every_host_from_the_underlay(env: Env) -> None:
    c, lab = env.c, env.lab
    tasks = {t["node"] for t in c.ctl_json("h1", "service", "ps", "web")
             if t["state"] == "running"}
    assert tasks == {"h1", "h2"}  # h3 runs no task of it
    for h in HOSTS:
        ip = lab.underlay_ip(h)
        body = wait(lambda ip=ip: answer(lab.underlay_ns, ip), 20, f"{h}:{PORT} answering")
        assert body.startswith("web.") and " on h" in body, body
    # h3, which has no task, spreads its connections over both tasks (numgen map)
    seen = {str(answer(lab.underlay_ns, lab.underlay_ip("h3"))).split(" on ")[0]
            for _ in range(24)}
    assert seen == {"web.1", "web.2"}, seen
    # a host reaches its own published port too (the output hook), h3 included
    for h in ("h3", "h1"):
        body = answer(lab.host_ns(h), lab.underlay_ip(h))
        assert body is not None and body.startswith("web."), (h, body)
    # every host holds an overlay address, published as a kind-host endpoint, on the bridge
    held = host_endpoints(c)
    assert set(held) == set(HOSTS)
    for h, ip in held.items():
        r = lab.exec(h, ["ip", "-4", "-o", "addr", "show"], capture_output=True, timeout=10)
        assert f" {ip}/24 " in r.stdout, (h, r.stdout)
    # ... which DNS never gives for the service: tasks.web is its two tasks alone
    answers = c.ctl_json("h1", "dns", "lookup", "tasks.web", "--network", "appnet")["answers"]
    assert len(answers) == 2 and not set(held.values()) & set(answers), (answers, held)


def test_inspect_shows_the_ports(env: Env) -> None:
    doc = env.c.ctl_json("h2", "service", "inspect", "web")
    assert doc["ports"] == [{"published": PORT, "target": PORT, "protocol": "tcp"}]
    text = env.c.ctl("h2", "service", "inspect", "web").stdout
    assert f"ports: {PORT}:{PORT}/tcp" in text


@pytest.mark.parametrize("publish,why", [
    (f"{PORT}:80", f"port {PORT}/tcp is already published by service web"),
    ("4789:80/udp", "port 4789/udp cannot be published: it is VXLAN's port"),
    ("7946:80", "port 7946/tcp cannot be published: it is the agent's gossip port"),
])
def test_a_clash_is_refused_at_create(env: Env, publish: str, why: str) -> None:
    r = env.c.ctl("h3", "service", "create", "other", "--network", "appnet", "--publish",
                  publish, "--detach", "--", "sleep", "60")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"meshctl: service create: {why}"]
    assert env.c.ctl("h1", "service", "inspect", "other").returncode == 1  # nothing written


def test_removing_the_service_removes_the_rules_and_the_host_addresses(env: Env) -> None:
    c, lab = env.c, env.lab
    assert all(TABLE in nft_tables(lab, h) for h in HOSTS)
    r = c.ctl("h1", "service", "rm", "web")
    assert r.returncode == 0, r.stderr
    wait(lambda: all(TABLE not in nft_tables(lab, h) for h in HOSTS), 20, "tables removed")
    for h in HOSTS:
        assert answer(lab.underlay_ns, lab.underlay_ip(h)) is None
    wait(lambda: not host_endpoints(c), 20, "host endpoints withdrawn")
    for h in HOSTS:
        out = subprocess.run(netns.exec_argv(lab.host_ns(h), ["ip", "-4", "-o", "addr", "show"]),
                             capture_output=True, text=True, timeout=10).stdout
        assert "mnbr-" not in out, (h, out)
    # nothing holds the network any more
    assert c.ctl("h2", "network", "rm", "appnet").returncode == 0
