"""`meshctl events` and `meshctl service logs --follow/--tail/--timestamps` on a real lab (#16).

Events: a `meshctl events --json` subscriber on h1 sees network, service, task and key changes
made anywhere, and a `member` event with state dead for a killed host within the membership
detection bound. Logs: `--tail N` gives the last N lines of each task, `--follow` lines printed
after it started, from tasks that start later too, and ends when the service is removed.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Cluster, wait

from meshnet.crypto.keyring import key_id, parse_key
from meshnet.events import iso_us
from meshnet.membership import MembershipConfig
from meshnet.membership.lifeguard import suspicion_bounds

pytestmark = pytest.mark.netns

HOSTS = 3
# Each task prints a numbered line on stdout and on stderr every 0.3 s.
TICKER = ["sh", "-c", "i=0; while :; do echo tick-$MESHNET_SLOT-$i; echo err-$MESHNET_SLOT-$i >&2;"
          " i=$((i+1)); sleep 0.3; done"]


def detection_bound_s(n: int) -> float:
    """Crash to `dead` on every survivor, lan-fast (the lab's profile): the first probe of the
    dead host (round robin: at most one probe period per member), its probe timeout and late-ack
    grace, the longest suspicion (no confirmations), and a generous margin for a loaded
    machine and the event's way to meshctl."""
    cfg = MembershipConfig.lan_fast()
    _, longest = suspicion_bounds(cfg.suspicion_mult, cfg.suspicion_max_timeout_mult, n,
                                  cfg.probe_interval)
    return n * cfg.probe_interval + cfg.probe_timeout + cfg.probe_grace + longest + 10.0


class Lines:
    """A background meshctl's stdout, one JSON object per line, collected by a thread with the
    time each arrived."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.got: list[tuple[float, dict[str, Any]]] = []
        self.bad: list[str] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                doc = None
            with self.lock:
                if isinstance(doc, dict):
                    self.got.append((time.monotonic(), doc))
                else:
                    self.bad.append(line)

    def docs(self) -> list[dict[str, Any]]:
        with self.lock:
            return [d for _, d in self.got]

    def first(self, pred: Callable[[dict[str, Any]], bool], timeout: float,
              what: str) -> tuple[float, dict[str, Any]]:
        def find() -> tuple[float, dict[str, Any]] | None:
            with self.lock:
                return next(((t, d) for t, d in self.got if pred(d)), None)
        return wait(find, timeout, lambda: f"{what}; got {self.docs()[-15:]}")  # type: ignore[no-any-return]


def event(kind: str, action: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda d: d.get("type") == kind and d.get("action") == action and \
        all(d.get(k) == v for k, v in fields.items())


def test_events_stream_every_kind_of_change_and_a_dead_member(
        cluster: Callable[[int], Cluster]) -> None:
    c = cluster(HOSTS)
    # --since: what happened before the subscriber came (the joins) is replayed first, so
    # seeing a join proves the subscription is live before anything below happens.
    events = Lines(c.background("h1", "--json", "events", "--since", "10m"))
    members = Lines(c.background("h2", "events", "--json", "--since", "1h", "--filter",
                                 "type=member"))
    events.first(event("member", "join", name="h3"), 20, "h3's join replayed")
    members.first(event("member", "join", name="h3"), 20, "h3's join replayed on h2")

    # Changes made on other hosts show on h1: they come through the replicated store.
    assert c.ctl("h2", "network", "create", "evnet").returncode == 0
    events.first(event("network", "created", name="evnet"), 20, "network created")
    r = c.ctl("h3", "service", "create", "web", "--network", "evnet", "--", *TICKER)
    assert r.returncode == 0, r.stderr
    events.first(event("service", "created", name="web", replicas=1), 20, "service created")
    _, running = events.first(event("task", "running", task="web.1"), 40, "web.1 running")
    assert running["service"] == "web" and running["slot"] == 1 and running["node"] in \
        {f"h{i}" for i in range(1, HOSTS + 1)}
    assert c.ctl("h1", "service", "scale", "web=2").returncode == 0
    events.first(event("service", "updated", name="web", replicas=2, old_replicas=1), 20,
                 "service scaled")
    events.first(event("task", "running", task="web.2"), 40, "web.2 running")

    key = c.ctl("h1", "keys", "generate").stdout.strip()
    assert c.ctl("h3", "keys", "install", key).returncode == 0
    _, installed = events.first(event("key", "install"), 20, "key installed")
    assert installed["key_id"] == key_id(parse_key(key)).hex() and installed["by"] == "h3"
    assert key not in json.dumps(events.docs())  # the key itself is never shown

    assert c.ctl("h2", "service", "rm", "web").returncode == 0
    events.first(event("service", "removed", name="web"), 20, "service removed")
    for task in ("web.1", "web.2"):
        events.first(event("task", "removed", task=task), 40, f"{task} removed")
    wait(lambda: c.ctl("h1", "network", "rm", "evnet").returncode == 0, 30, "network rm")
    events.first(event("network", "removed", name="evnet"), 20, "network removed")

    bound = detection_bound_s(HOSTS)
    killed = time.monotonic()
    c.lab.kill("h3")
    seen, dead = events.first(event("member", "dead", name="h3"), bound + 5, "h3 dead")
    assert seen - killed <= bound, f"h3 dead after {seen - killed:.1f}s (bound {bound:.1f}s)"
    assert dead["state"] == "dead" and isinstance(dead["incarnation"], int)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", dead["time"])
    members.first(event("member", "dead", name="h3"), bound + 5, "h3 dead on h2")
    assert {d["type"] for d in members.docs()} == {"member"}  # the filter held
    assert events.bad == [] and members.bad == []  # JSON lines and nothing else
    for lines in (events, members):
        assert lines.proc.poll() is None  # a stream runs until interrupted


def test_service_logs_tail_timestamps_and_follow(cluster: Callable[[int], Cluster]) -> None:
    c = cluster(2)
    c.network("lognet")
    # two tasks on two equal hosts: placement's balance cap puts one on each
    r = c.ctl("h1", "service", "create", "web", "--network", "lognet", "--replicas", "2",
              "--", *TICKER)
    assert r.returncode == 0, r.stderr

    def docs(*args: str) -> list[dict[str, Any]]:
        r = c.ctl("h2", "--json", "service", "logs", "web", *args)
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in r.stdout.splitlines()]

    # every task on both hosts, and both of its streams
    wait(lambda: {(d["task"], d["stream"]) for d in docs()} >=
         {("web.1", "stdout"), ("web.2", "stdout"), ("web.1", "stderr"), ("web.2", "stderr")},
         30, "output of both tasks")
    assert {d["node"] for d in docs()} == {"h1", "h2"}
    # --tail N: the last N lines of each task
    tail = docs("--tail", "1")
    assert sorted(d["task"] for d in tail) == ["web.1", "web.2"], tail
    assert len(docs("--tail", "3")) == 6
    assert all(set(d) >= {"task", "node", "time", "stream", "line"} for d in tail)
    human = c.ctl("h1", "service", "logs", "web", "--tail", "2", "--timestamps").stdout
    assert len(human.splitlines()) == 4
    for line in human.splitlines():
        assert re.fullmatch(r"web\.[12] \| \d{4}-\d\d-\d\dT[0-9:]{8}\.\d{6}Z (tick|err)-\d+-\d+",
                            line), line

    # --follow: lines printed after it started, including from a task that starts later
    started = iso_us(time.time())
    follow = Lines(c.background("h2", "--json", "service", "logs", "web", "--follow",
                                "--tail", "0"))
    _, line = follow.first(lambda d: d["task"] == "web.1", 20, "a new line of web.1")
    assert line["time"] >= started and line["line"].split("-")[0] in ("tick", "err")
    follow.first(lambda d: d["task"] == "web.2" and d["stream"] == "stderr", 20, "web.2 stderr")
    r = c.ctl("h1", "service", "scale", "web=3")
    assert r.returncode == 0, r.stderr
    follow.first(lambda d: d["task"] == "web.3", 40, "the new task web.3's lines")
    ticks = [int(d["line"].rsplit("-", 1)[1]) for d in follow.docs()
             if d["task"] == "web.1" and d["stream"] == "stdout"]
    assert ticks == sorted(ticks) and len(set(ticks)) == len(ticks)  # in order, never twice

    # removing the service ends the stream (exit 0), after its last lines
    assert c.ctl("h1", "service", "rm", "web").returncode == 0
    wait(lambda: follow.proc.poll() is not None, 30, "the follow to end with the service")
    assert follow.proc.returncode == 0
    assert follow.bad == []
