"""The plain overlay on real hosts: reachability by name, isolation, IPAM, repair, failures."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import PY, Cluster, ro_mount, wait

pytestmark = pytest.mark.netns


def http_get(target: str) -> str:
    return (f"{PY} -c \"import urllib.request as u; "
            f"print(u.urlopen('http://{target}:8080/', timeout=5).status)\"")


def test_reachability_by_address_and_name_in_both_directions(cluster) -> None:  # type: ignore[no-untyped-def]
    c: Cluster = cluster(3)
    c.network("appnet")
    ips = {h: c.serve(h, "appnet", f"srv{h[1:]}") for h in ("h1", "h2", "h3")}
    for src in ("h1", "h2", "h3"):
        checks = []
        for dst in ("h1", "h2", "h3"):
            if dst == src:
                continue
            name, ip = f"srv{dst[1:]}", ips[dst]
            checks += [f"ping -c1 -W2 {name} >/dev/null || ping -c1 -W2 {name} >/dev/null",
                       f"ping -c1 -W2 {ip} >/dev/null", http_get(name), http_get(ip)]
        r = c.probe(src, "appnet", " && ".join(checks))
        assert r.returncode == 0, (src, r.stdout, r.stderr)
        assert r.stdout.split().count("200") == 4


def test_isolation_between_networks(cluster) -> None:  # type: ignore[no-untyped-def]
    c: Cluster = cluster(2)
    a = c.network("neta")
    b = c.network("netb")
    b1 = c.serve("h1", "netb", "bsame")
    b2 = c.serve("h2", "netb", "bother")
    c.serve("h2", "neta", "aother")
    vx_b = f"mnvx-{b['vni']:06x}"
    sniff = subprocess.Popen(
        ["ip", "netns", "exec", c.lab.host_ns("h2"), "tcpdump", "-i", vx_b, "-n", "-l",
         "-c", "1000", "net", a["subnet"]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        script = " ; ".join([
            f"ping -c1 -W1 {b1} >/dev/null && echo REACHED-{b1}",
            f"ping -c1 -W1 {b2} >/dev/null && echo REACHED-{b2}",
            "getent hosts bother && echo RESOLVED-bother",
            "ping -c2 -W2 aother >/dev/null && echo A-OK",
        ])
        r = c.probe("h1", "neta", script)
        assert "A-OK" in r.stdout, r.stdout + r.stderr  # traffic on A itself flows
        assert "REACHED" not in r.stdout and "RESOLVED" not in r.stdout, r.stdout
    finally:
        sniff.terminate()
        out, err = sniff.communicate(timeout=10)
    assert out.strip() == "", f"netb's VXLAN device saw neta traffic: {out}"
    assert re.search(r"\b0 packets captured", err), err


def test_ipam_race_fills_most_of_a_small_subnet(cluster, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # 50 sandboxes started at once, 10 per host, on a /26 (61 free addresses): most of the
    # subnet is contended, as 200 on a /24 would be, at a quarter of the suite's time.
    c: Cluster = cluster(5)
    assert c.ctl("h1", "network", "create", "race", "--subnet", "10.50.0.0/26").returncode == 0
    wait(lambda: all(c.ctl(h, "network", "inspect", "race").returncode == 0
                     for h in ("h1", "h2", "h3", "h4", "h5")), 10, "network everywhere")
    barrier = tmp_path / "go"  # all 50 hold their address until it exists
    script = (f"ip -4 -o addr show eth0 | awk '{{print $4}}'; "
              f"while [ ! -e {barrier} ]; do sleep 0.2; done")
    procs = [c.background(h, "run", "--network", "race", *ro_mount(tmp_path), "--", "sh",
                          "-c", script)
             for _ in range(10) for h in ("h1", "h2", "h3", "h4", "h5")]
    try:
        outs = []
        for p in procs:
            assert p.stdout is not None
            outs.append(p.stdout.readline().strip())  # printed while every sandbox is alive
    finally:
        barrier.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    barrier.unlink()
    assert len(outs) == 50
    assert len(set(outs)) == 50, "two sandboxes got the same address"
    assert all(o.startswith("10.50.0.") and o.endswith("/26") for o in outs)
    # exited sandboxes release their addresses everywhere
    wait(lambda: all(c.ctl_json(h, "network", "inspect", "race")["endpoints"] == []
                     for h in ("h1", "h2", "h3", "h4", "h5")), 20, "addresses released")


def test_repair_host_failure_and_lifecycle(cluster) -> None:  # type: ignore[no-untyped-def]
    c: Cluster = cluster(3)
    net = c.network("life")
    vx = f"mnvx-{net['vni']:06x}"
    ip1 = c.serve("h1", "life", "one")
    ip3 = c.serve("h3", "life", "three")

    def fdb_macs(host: str) -> set[str]:
        r = c.lab.exec(host, ["bridge", "fdb", "show", "dev", vx], capture_output=True)
        return {line.split()[0] for line in r.stdout.splitlines() if "dst" in line}

    mac3 = "02:42:" + ":".join(f"{int(o):02x}" for o in ip3.split("."))
    wait(lambda: mac3 in fdb_macs("h1") and mac3 in fdb_macs("h2"), 10, "fdb for three")

    # repair: delete h3's VXLAN device by hand; traffic resumes without anyone restarting
    before = c.lab.exec("h3", ["ip", "-o", "link", "show", vx], capture_output=True).stdout
    assert c.lab.exec("h3", ["ip", "link", "del", vx], capture_output=True).returncode == 0
    wait(lambda: c.lab.exec("h3", ["ip", "-o", "link", "show", vx],
                            capture_output=True).returncode == 0, 10, "vxlan device recreated")
    after = c.lab.exec("h3", ["ip", "-o", "link", "show", vx], capture_output=True).stdout
    assert before.split(":")[0] != after.split(":")[0]  # a new device, not the old one
    r = c.probe("h1", "life", "ping -c1 -W2 three || ping -c1 -W2 three")
    assert r.returncode == 0, r.stdout + r.stderr

    # lifecycle: rm refused while sandboxes are attached, and says which
    r = c.ctl("h2", "network", "rm", "life")
    assert r.returncode == 1 and "one" in r.stderr and "three" in r.stderr

    # host failure: h3's entries vanish from every other host once it is declared dead
    c.lab.kill("h3")

    def neigh_ips(host: str) -> str:
        return c.lab.exec(host, ["ip", "neigh", "show", "dev", vx], capture_output=True).stdout

    # one reconcile pass removes the FDB entry and then the neighbour: wait for both
    wait(lambda: all(mac3 not in fdb_macs(h) and ip3 not in neigh_ips(h) for h in ("h1", "h2")),
         30, "dead host's fdb and neighbour entries removed")
    assert ip1  # h1's own sandbox keeps running

    # tear down: stop sandboxes, remove the network; no bridge, vxlan or veth of ours remains
    c.close()
    c.lab.start("h3")
    wait(lambda: c.ctl_json("h1", "network", "inspect", "life")["endpoints"] == [], 30,
         "endpoints gone")
    r = c.ctl("h1", "network", "rm", "life")
    assert r.returncode == 0, r.stderr

    def ours_left() -> list[str]:
        left = []
        for h in ("h1", "h2", "h3"):
            links = c.lab.exec(h, ["ip", "-o", "link"], capture_output=True).stdout
            left += [f"{h}: {line.split(':')[1].strip()}" for line in links.splitlines()
                     if re.search(r": mn(br|vx|v[0-9a-f])", line)]
        return left

    wait(lambda: not ours_left(), 15, "no devices of ours")
