"""A real Prometheus scrapes a 3-host lab (#16): Debian's /usr/bin/prometheus (installed by
deploy/bootstrap.sh, never as a service), run here inside h1's namespace with temporary storage,
scrape_interval 1s, every agent's metrics_listen as a target, and its HTTP API on loopback in
that namespace. It must see every target up, 3 alive members on each, and h3 dead on the
survivors within 15 s of `kill h3` (the issue's bound)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait

from meshnet.lab import Lab
from meshnet.lab.scrape import http_get
from meshnet.platform import netns

pytestmark = pytest.mark.netns

LabFactory = Callable[[], Lab]
PROMETHEUS = "/usr/bin/prometheus"
API = ("127.0.0.1", 9090)  # inside h1's namespace: nothing else listens there
DEAD_WITHIN_S = 15.0


class Prometheus:
    """/usr/bin/prometheus in a namespace, with its storage in a temporary directory; stop()
    kills it and removes the directory, whatever happened."""

    def __init__(self, ns: str, targets: list[str]) -> None:
        self.ns = ns
        self.dir = Path(tempfile.mkdtemp(prefix="meshnet-prom-"))
        config = self.dir / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: meshnet\n    static_configs:\n"
            f"      - targets: {json.dumps(targets)}\n")
        self.log = self.dir / "prometheus.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(netns.exec_argv(ns, [
                PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address={API[0]}:{API[1]}", "--log.level=warn"]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

    def api(self, path: str) -> Any:
        reply = http_get(self.ns, API, path)
        assert reply.status == 200, reply
        return json.loads(reply.body)

    def ready(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            return http_get(self.ns, API, "/-/ready").status == 200
        except OSError:
            return False

    def query(self, promql: str) -> dict[str, float]:
        """instance -> value of an instant query."""
        doc = self.api("/api/v1/query?query=" + urllib.parse.quote(promql))
        assert doc["status"] == "success", doc
        return {r["metric"].get("instance", ""): float(r["value"][1])
                for r in doc["data"]["result"]}

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def prometheus() -> Iterator[Callable[[str, list[str]], Prometheus]]:
    if not Path(PROMETHEUS).exists():
        pytest.fail(f"{PROMETHEUS} is missing: deploy/bootstrap.sh installs Debian's prometheus",
                    pytrace=False)
    made: list[Prometheus] = []

    def start(ns: str, targets: list[str]) -> Prometheus:
        p = Prometheus(ns, targets)
        made.append(p)
        return p

    yield start
    for p in made:
        if p.log.exists():  # shown by pytest only when the test failed
            print("--- prometheus log (tail)", p.log.read_text(errors="replace")[-3000:], sep="\n")
        p.stop()


def test_prometheus_scrapes_every_agent_and_sees_a_host_die(
        lab_factory: LabFactory, prometheus: Callable[[str, list[str]], Prometheus]) -> None:
    lab = lab_factory()
    lab.up(3, profile="lan-fast")
    hosts = ["h1", "h2", "h3"]
    instance = {h: "{}:{}".format(*lab.metrics_addr(h)) for h in hosts}
    prom = prometheus(lab.host_ns("h1"), [instance[h] for h in hosts])
    wait(prom.ready, 30, "prometheus to be ready")

    every = set(instance.values())
    wait(lambda: prom.query("up") == dict.fromkeys(every, 1.0), 30, "every target up")
    wait(lambda: prom.query('meshnet_members{state="alive"}') == dict.fromkeys(every, 3.0), 30,
         "3 alive members on every target")
    assert prom.query("meshnet_health") == dict.fromkeys(every, 1.0)

    lab.kill("h3")
    killed = time.monotonic()
    survivors = {instance["h1"], instance["h2"]}

    def h3_dead() -> bool:
        dead = prom.query('meshnet_members{state="dead"}')
        alive = prom.query('meshnet_members{state="alive"}')
        return all(dead.get(i) == 1.0 and alive.get(i) == 2.0 for i in survivors)

    wait(h3_dead, DEAD_WITHIN_S - (time.monotonic() - killed),
         "h1 and h2's series to show h3 dead")
    wait(lambda: prom.query("up").get(instance["h3"]) == 0.0, 15, "h3's target down")
