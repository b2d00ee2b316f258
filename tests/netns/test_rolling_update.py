"""Rolling updates on real hosts (issue 17): an update of 4 replicas, one at a time, under a
steady probe fails no request and ends with every task on the new spec; a failing update rolls
back or pauses as its policy says. One 3-host lab for the module (h3 a worker)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Cluster, new_prefix, require_root, wait

from meshnet.lab import Lab
from meshnet.lab.lab import RUN_BASE

pytestmark = pytest.mark.netns

# Each task serves a page naming its spec's VERSION and itself ("v2 web.3"); the task's /tmp is
# its own. Short on purpose: the service record carries the spec twice (spec and previous).
SERVE = ["sh", "-c", 'mkdir /tmp/w && echo "v$VERSION $MESHNET_TASK" >/tmp/w/index.html && '
         "exec python3 -m http.server 8080 -d /tmp/w"]
# Ready once it accepts connections (bash's /dev/tcp: no interpreter start per probe).
HEALTH = ["--health-cmd", "bash -c ': </dev/tcp/127.0.0.1/8080'", "--health-interval", "0.5s",
          "--health-start-period", "10s"]
# 20 requests a second by service name, a new connection (and name lookup) each; a line each.
PROBE = """
import socket, time, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
due = time.monotonic()
for _ in range(int(__import__("sys").argv[1])):
    try:
        ip = socket.gethostbyname_ex("web")[2][0]
        with opener.open(f"http://{ip}:8080/", timeout=3) as r:
            print("ok", r.read().decode().strip(), flush=True)
    except Exception as e:
        print("ERR", repr(e)[:200], flush=True)
    due += 0.05
    time.sleep(max(0.0, due - time.monotonic()))
"""


@pytest.fixture(scope="module")
def c() -> Iterator[Cluster]:
    require_root()
    prefix = new_prefix()
    lab = Lab(prefix, RUN_BASE / prefix)
    cluster = Cluster(lab)
    try:
        lab.up(3, profile="lan-fast", workers=("h3",))
        wait(lambda: all(sum(m["state"] == "alive" for m in json.loads(
            cluster.ctl(h, "--json", "members").stdout or "[]")) == 3
            for h in ("h1", "h2", "h3")), 30, "membership")
        cluster.network("roll")
        r = cluster.ctl("h1", "service", "create", "web", "--network", "roll", "--replicas",
                        "4", "--env", "VERSION=1", "--update-monitor", "1", *HEALTH, "--",
                        *SERVE)
        assert r.returncode == 0, r.stderr
        yield cluster
    finally:
        cluster.close()
        lab.down()


def ps(c: Cluster) -> list[dict[str, Any]]:
    return list(c.ctl_json("h2", "service", "ps", "web"))


def versions(c: Cluster) -> dict[int, tuple[int, str]]:
    """slot -> (spec version, state) as h2 sees it."""
    return {int(t["slot"]): (t.get("version"), t["state"]) for t in ps(c)}


def all_on(c: Cluster, version: int) -> bool:
    rows = ps(c)
    return len(rows) == 4 and all(t.get("version") == version and t["state"] == "running" and
                                  t.get("health") == "healthy" for t in rows)


def version(c: Cluster) -> int:
    return int(c.ctl_json("h1", "service", "inspect", "web")["version"])


class Probe:
    """A sandbox on h2 running PROBE, its lines collected as they come."""

    def __init__(self, c: Cluster, requests: int) -> None:
        self.proc = c.background("h2", "run", "--network", "roll", "--", "python3", "-c", PROBE,
                                 str(requests))
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    def count(self) -> int:
        return len(self.lines)

    def finish(self) -> list[str]:
        self.proc.wait(60)
        self.reader.join(10)
        return self.lines


def replies(c: Cluster, n: int = 8) -> set[str]:
    """The versions that answer N requests by name ("v1", "v2"), all of which must succeed."""
    probe = Probe(c, n)
    lines = probe.finish()
    assert len(lines) == n and all(line.startswith("ok ") for line in lines), lines
    return {line.split()[1] for line in lines}


def test_rolling_update_under_load_fails_no_request(c: Cluster) -> None:
    wait(lambda: all_on(c, 1), 60, lambda: f"4 healthy tasks: {ps(c)}")
    # a worker may not change services: refused here, in one line
    r = c.ctl("h3", "service", "update", "web", "--env-add", "VERSION=9")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    nodes = {t["slot"]: t["node"] for t in ps(c)}
    probe = Probe(c, 20 * 120)  # at most 2 minutes; stopped once the update is done
    try:
        wait(lambda: probe.count() >= 20, 30, "the probe's first second")
        r = c.ctl("h1", "service", "update", "web", "--env-add", "VERSION=2",
                  "--update-parallelism", "1", timeout=120)
        assert r.returncode == 0, r.stderr
        assert "4/4 tasks on version 2" in r.stderr
        seen = probe.count()
        wait(lambda: probe.count() >= seen + 20, 30, "a second of probes after the update")
    finally:
        probe.proc.terminate()
    lines = probe.finish()
    failed = [line for line in lines if not line.startswith("ok ")]
    assert not failed, f"{len(failed)} of {len(lines)} requests failed: {failed[:5]}"
    assert len(lines) >= 60
    assert lines[0].startswith("ok v1 ") and lines[-1].startswith("ok v2 "), lines[::20]
    assert all_on(c, 2), ps(c)
    assert {t["slot"]: t["node"] for t in ps(c)} == nodes  # replaced in place
    assert replies(c) == {"v2"}


def test_failing_update_rolls_back_to_the_previous_spec(c: Cluster) -> None:
    wait(lambda: all_on(c, version(c)), 60, lambda: f"4 healthy tasks: {ps(c)}")
    before = version(c)
    good = replies(c)
    r = c.ctl("h1", "service", "update", "web", "--update-failure-action", "rollback", "--",
              "sh", "-c", "exit 1", timeout=120)
    assert r.returncode == 1, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "rolled back from version" in last and "exited with code 1" in last, r.stderr
    doc = c.ctl_json("h2", "service", "inspect", "web")
    assert doc["version"] == before + 2  # the update, then its rollback
    assert doc["update_status"]["state"] == "rolled_back"
    assert doc["command"] == SERVE
    wait(lambda: all_on(c, before + 2), 30, lambda: f"all on the rollback: {ps(c)}")
    assert replies(c) == good


def test_failing_update_with_pause_stops_after_the_first_batch(c: Cluster) -> None:
    wait(lambda: all_on(c, version(c)), 60, lambda: f"4 healthy tasks: {ps(c)}")
    before = version(c)
    r = c.ctl("h1", "service", "update", "web", "--update-failure-action", "pause", "--",
              "sh", "-c", "exit 1", timeout=120)
    assert r.returncode == 1, r.stderr
    assert "paused: web.1 on" in r.stderr.strip().splitlines()[-1], r.stderr
    # slot 1 (the first batch) fails on the new spec, restarting; the others keep the old one
    wait(lambda: next(t for t in ps(c) if t["slot"] == 1).get("restarts", 0) >= 2, 30,
         "slot 1 restarting")
    v = versions(c)
    assert v[1][0] == before + 1, v
    assert all(v[s] == (before, "running") for s in (2, 3, 4)), v
    assert c.ctl_json("h2", "service", "inspect", "web")["update_status"]["state"] == "paused"
    r = c.ctl("h2", "service", "rollback", "web", timeout=120)
    assert r.returncode == 0, r.stderr
    wait(lambda: all_on(c, before + 2), 30, lambda: f"all back: {ps(c)}")
    assert replies(c) == {"v2"}
