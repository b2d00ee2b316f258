"""What /metrics and /health say about this agent: gathered at scrape time, served by
meshnet/agent/metrics_server.py, formatted by meshnet/metrics.py.

Nothing here counts on the hot paths: the series are read from the counters the agent keeps
anyway (the same ones `meshctl status --json` shows, every number of which is also exported as
``meshnet_status_*``), plus three histograms kept where things happen (DNS latency in
dns_server.py, task start time in services.py, event-loop lag here). The only thing this adds
to an idle agent is the lag monitor: one timer every LAG_INTERVAL_S.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import meshnet
from meshnet.agent.metrics_server import MetricsServer, Reply
from meshnet.metrics import (
    CONTENT_TYPE,
    LAG_BUCKETS,
    LAG_WINDOW_S,
    Exposition,
    HealthInputs,
    Histogram,
    LagWindow,
    MonotonicSum,
    add_status,
    health_verdict,
    rcode_name,
)

if TYPE_CHECKING:
    from meshnet.agent.agent import Agent

__all__ = ["LAG_INTERVAL_S", "Telemetry"]

# How often the lag monitor's timer is due: a stall of LAG_UNHEALTHY_S (2 s) is seen, and an
# idle agent pays one wake-up a second (gossip's own timers wake it ~10 times).
LAG_INTERVAL_S = 1.0
# /health reads the remembered peers file (are we meant to have company?) at most this often.
JOIN_TARGETS_REFRESH_S = 30.0
# A scrape within this long of the previous one gets the same text: bounds what a client
# that asks for /metrics in a loop costs (a render reads every counter the agent has).
RENDER_REUSE_S = 0.25
# A periodic loop with no pass for this long is stalled (each runs every 2 s, and at once on
# every change; a pass that waits on the kernel for 30 s is stuck).
LOOP_STALL_S = 30.0
# The membership core's timer this far past due is not firing.
TIMER_OVERDUE_S = 5.0
TASK_STATES = ("starting", "running", "complete", "failed")
MEMBER_STATES = ("alive", "suspect", "dead", "left")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_SERVER_HELP = {
    "connections": "connections accepted by this listener",
    "connections_refused": "connections refused: every slot was busy with a request",
    "idle_evicted": "idle keep-alive connections closed to make room for a new one",
    "idle_closed": "keep-alive connections closed after their idle timeout",
    "requests": "requests read",
    "bad_requests": "requests refused unread (malformed, too large, with a body)",
    "read_timeouts": "connections cut off for sending a request head too slowly",
    "write_timeouts": "connections aborted for not reading their response",
    "internal_errors": "bugs caught while answering (logged once per kind)",
}


async def _no_events(event: dict[str, Any]) -> None:
    return None


class _LoopWatch:
    """A periodic loop's progress: its pass counter and when it last moved (loop time)."""

    __slots__ = ("count", "since")

    def __init__(self, now: float) -> None:
        self.count = -1
        self.since = now

    def sample(self, count: int, now: float) -> None:
        if count != self.count:
            self.count, self.since = count, now


class Telemetry:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.loop = asyncio.get_running_loop()
        now = self.loop.time()
        self.lag = LagWindow(LAG_WINDOW_S, now)
        self.lag_seconds = Histogram(LAG_BUCKETS)
        self.server: MetricsServer | None = None
        self._due = now + LAG_INTERVAL_S
        self._handle: asyncio.TimerHandle | None = None
        self._overlay = _LoopWatch(now)
        self._scheduler = _LoopWatch(now)
        self._rendered: tuple[float, bytes] | None = None
        self._enc_rekeys = MonotonicSum()
        self._enc_bytes = {d: MonotonicSum() for d in ("tx", "rx")}
        self._enc_packets = {d: MonotonicSum() for d in ("tx", "rx")}
        self._enc_drops: dict[str, MonotonicSum] = {}
        self._join_targets: tuple[float, bool] | None = None  # (when read, any)

    async def start(self, addr: tuple[str, int]) -> None:
        self._handle = self.loop.call_at(self._due, self._tick)
        self.server = MetricsServer(addr, {"/metrics": self._metrics, "/health": self._health})
        try:
            await self.server.start()
        except BaseException:
            self._handle.cancel()
            raise

    async def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self.server is not None:
            await self.server.close()

    # -- the lag monitor --------------------------------------------------------------------

    def _tick(self) -> None:
        now = self.loop.time()
        lag = now - self._due
        self.lag.observe(now, lag)
        self.lag_seconds.observe(max(0.0, lag))
        a = self.agent
        if a.overlay is not None:
            self._overlay.sample(a.overlay.counters["passes"], now)
        if a.services is not None:
            self._scheduler.sample(a.services.counters["scheduler_passes"], now)
        self._due = now + LAG_INTERVAL_S
        self._handle = self.loop.call_at(self._due, self._tick)

    # -- /health --------------------------------------------------------------------------------

    def health(self) -> tuple[bool, str]:
        a = self.agent
        now = self.loop.time()
        reachable = lost = 0
        if a.membership is not None:
            me = a.config.name
            for m in a.membership.members():
                state = str(m.state.value)
                if m.name == me:
                    continue
                if state in ("alive", "suspect"):
                    reachable += 1
                elif state == "dead":
                    lost += 1
        stalled = []
        if a.gossip is not None and a.gossip.timer_at is not None \
                and now - a.gossip.timer_at > TIMER_OVERDUE_S:
            stalled.append(f"membership timer {now - a.gossip.timer_at:.0f} s overdue")
        loops = []
        if a.overlay is not None:
            loops.append(("overlay reconcile loop", self._overlay, a.overlay.task))
        if a.services is not None:
            loops.append(("task scheduler loop", self._scheduler, a.services.loop_task))
        for what, watch, task in loops:
            if task is not None and task.done() and not a.stopping.is_set():
                stalled.append(f"{what} ended")
            elif now - watch.since > LOOP_STALL_S:
                stalled.append(f"{what} made no pass in {now - watch.since:.0f} s")
        return health_verdict(HealthInputs(
            now=now, left=a.left, others_reachable=reachable, others_lost=lost,
            join_targets=self._has_join_targets(now),
            worst_lag=self.lag.worst(now), lag_monitor_at=self.lag.last_at,
            lag_interval=LAG_INTERVAL_S, stalled=tuple(stalled)))

    def _has_join_targets(self, now: float) -> bool:
        """--join, or peers remembered from an earlier run (re-read now and then)."""
        a = self.agent
        if a.config.join:
            return True
        cached = self._join_targets
        if cached is None or now - cached[0] > JOIN_TARGETS_REFRESH_S:
            cached = self._join_targets = (now, bool(a._remembered_peers()))
        return cached[1]

    async def _health(self) -> Reply:
        ok, why = self.health()
        return Reply(200 if ok else 503, f"{why}\n".encode())

    # -- /metrics -------------------------------------------------------------------------------

    async def _metrics(self) -> Reply:
        now = self.loop.time()
        if self._rendered is not None and now - self._rendered[0] < RENDER_REUSE_S:
            return Reply(200, self._rendered[1], CONTENT_TYPE)
        body = (await self.render()).encode()
        self._rendered = (self.loop.time(), body)
        return Reply(200, body, CONTENT_TYPE)

    async def render(self) -> str:
        """The whole /metrics text, fresh."""
        doc = await self.agent._op_status({}, _no_events)
        expo = Exposition()
        self._agent_series(expo, doc)
        add_status(expo, doc)
        return expo.render()

    def _agent_series(self, expo: Exposition, doc: Mapping[str, Any]) -> None:
        a = self.agent
        expo.gauge("meshnet_build_info", "the agent's version (value 1)", 1,
                   {"version": meshnet.__version__, "name": a.config.name})
        ok, _ = self.health()
        expo.gauge("meshnet_health", "1 when /health answers 200, else 0", int(ok))

        members = doc.get("members") or {}
        for state in MEMBER_STATES:
            expo.gauge("meshnet_members", "members in this agent's view, by state",
                       int(members.get(state, 0)), {"state": state})
        g = doc.get("gossip") or {}
        expo.counter("meshnet_probes_total", "failure-detector probes sent", g.get("probes", 0))
        expo.counter("meshnet_probe_failures_total", "probes that got no ack in time",
                     g.get("probe_failures", 0))
        expo.counter("meshnet_suspicions_total", "members this agent began to suspect",
                     g.get("suspicions_raised", 0))
        expo.counter("meshnet_refutations_total",
                     "suspicions of this agent it refuted (by raising its incarnation)",
                     g.get("refuted_suspicions", 0))
        expo.counter("meshnet_deaths_declared_total", "members this agent declared dead",
                     g.get("deaths_declared", 0))
        for direction, suffix in (("in", "received"), ("out", "sent")):
            expo.counter("meshnet_gossip_packets_total",
                         "gossip datagrams (UDP) by direction", g.get(f"packets_{suffix}", 0),
                         {"direction": direction})
            expo.counter("meshnet_gossip_bytes_total",
                         "gossip datagram payload bytes (before sealing), by direction",
                         g.get(f"bytes_{suffix}", 0), {"direction": direction})
        expo.counter("meshnet_push_pulls_total", "push-pull exchanges this agent started",
                     g.get("push_pulls_started", 0))

        st = doc.get("store") or {}
        expo.gauge("meshnet_store_entries", "entries in the replicated store (tombstones too)",
                   st.get("entries", 0))
        expo.gauge("meshnet_store_bytes", "what the store's entries are estimated to hold",
                   st.get("bytes_held", 0))
        expo.counter("meshnet_store_merges_total", "remote writes merged (they changed the store)",
                     st.get("applied", 0))
        for key, value in sorted(st.items()):
            if key.startswith("refused_") and isinstance(value, int) and \
                    not isinstance(value, bool) and not key.endswith("_repeats"):
                expo.counter("meshnet_store_refusals_total", "writes the store refused, by reason",
                             value, {"reason": key.removeprefix("refused_")})

        self._dns_series(expo, doc.get("dns") or {})
        self._task_series(expo)
        self._network_series(expo)
        self._encrypted_series(expo)
        self._process_series(expo)

    def _dns_series(self, expo: Exposition, dns: Mapping[str, Any]) -> None:
        server = self.agent.dns
        expo.counter("meshnet_dns_queries_total", "DNS queries received (UDP and TCP)",
                     dns.get("queries", 0))
        expo.counter("meshnet_dns_forwarded_total", "DNS queries forwarded upstream",
                     dns.get("forwarded", 0))
        if server is None:
            return
        for rcode, n in enumerate(server.rcodes):
            if n or rcode in (0, 2, 3):  # the usual three always, the rest once seen
                expo.counter("meshnet_dns_answers_total", "DNS answers sent, by RCODE", n,
                             {"rcode": rcode_name(rcode)})
        expo.histogram("meshnet_dns_latency_seconds",
                       "from a DNS query's arrival to its answer (forwarded: with the upstream)",
                       server.latency)

    def _task_series(self, expo: Exposition) -> None:
        services = self.agent.services
        if services is None:
            return
        states = dict.fromkeys(TASK_STATES, 0)
        for task in list(services.tasks.values()):
            states[task.state] = states.get(task.state, 0) + 1
        for state, n in states.items():
            expo.gauge("meshnet_tasks", "tasks this agent runs, by state", n, {"state": state})
        expo.counter("meshnet_task_restarts_total", "task restarts by their restart policy",
                     services.counters["task_restarts"])
        expo.histogram("meshnet_task_start_seconds",
                       "from a task's (re)start to its command running", services.start_seconds)

    def _network_series(self, expo: Exposition) -> None:
        a = self.agent
        if a.ops is not None:
            expo.gauge("meshnet_networks", "overlay networks in the cluster",
                       len(a.ops.store.networks()))
        help_passes = "passes of the periodic reconcile loops"
        help_errors = "reconcile passes that failed (logged once per kind)"
        if a.overlay is not None:
            expo.counter("meshnet_reconcile_passes_total", help_passes,
                         a.overlay.counters["passes"], {"loop": "overlay"})
            expo.counter("meshnet_reconcile_errors_total", help_errors,
                         a.overlay.counters["errors"], {"loop": "overlay"})
        if a.encrypted is not None:
            expo.counter("meshnet_reconcile_errors_total", help_errors,
                         a.encrypted.counters["errors"], {"loop": "encrypted_overlay"})
        if a.services is not None:
            expo.counter("meshnet_reconcile_passes_total", help_passes,
                         a.services.counters["scheduler_passes"], {"loop": "scheduler"})
            expo.counter("meshnet_reconcile_errors_total", help_errors,
                         a.services.counters["scheduler_errors"], {"loop": "scheduler"})

    def _encrypted_series(self, expo: Exposition) -> None:
        enc = self.agent.encrypted
        if enc is None:
            return
        peers = enc.peers_info()
        out_sas = sum(1 for p in peers if p["spi"] is not None)
        in_sas = sum(len(p["inbound_spis"]) for p in peers)
        expo.gauge("meshnet_encrypted_peers", "peers of the encrypted overlay", len(peers))
        expo.gauge("meshnet_encrypted_sas", "security associations held, by direction",
                   out_sas, {"direction": "out"})
        expo.gauge("meshnet_encrypted_sas", "security associations held, by direction",
                   in_sas, {"direction": "in"})
        # Per-peer numbers summed so a peer that leaves (or restarts) does not take what it
        # counted out of the totals: Prometheus would read the drop as a counter reset.
        expo.counter("meshnet_encrypted_rekeys_total", "rekeys of encrypted-overlay sessions",
                     self._enc_rekeys.update({p["node"]: p["rekeys"] for p in peers}))
        for d in ("tx", "rx"):
            expo.counter("meshnet_encrypted_bytes_total", "encrypted-overlay bytes, by direction",
                         self._enc_bytes[d].update({p["node"]: p[f"{d}_bytes"] for p in peers}),
                         {"direction": d})
            expo.counter("meshnet_encrypted_packets_total",
                         "encrypted-overlay records, by direction",
                         self._enc_packets[d].update({p["node"]: p[f"{d}_packets"]
                                                      for p in peers}), {"direction": d})
        by_reason: dict[str, dict[str, int]] = {}
        for p in peers:
            for reason, n in (p.get("drops") or {}).items():
                if isinstance(n, int):
                    by_reason.setdefault(str(reason), {})[p["node"]] = n
        status = enc.status()
        for reason in ("unknown_spi", "malformed", "handshakes_dropped"):  # not per peer
            n = status.get(reason)
            if isinstance(n, int):
                by_reason.setdefault(reason, {})[""] = n
        for reason in list(self._enc_drops):
            by_reason.setdefault(reason, {})  # a reason whose peers all left keeps its total
        for reason, parts in sorted(by_reason.items()):
            total = self._enc_drops.setdefault(reason, MonotonicSum()).update(parts)
            expo.counter("meshnet_encrypted_drops_total",
                         "encrypted-overlay records and handshakes dropped, by reason", total,
                         {"reason": reason})

    def _process_series(self, expo: Exposition) -> None:
        try:
            with open("/proc/self/statm", "rb") as f:
                rss = int(f.read().split()[1]) * _PAGE
            expo.gauge("meshnet_process_resident_memory_bytes", "resident memory", rss)
        except (OSError, ValueError, IndexError):  # no /proc: left out, never made up
            pass
        t = os.times()
        expo.counter("meshnet_process_cpu_seconds_total", "user and system CPU time, all threads",
                     t.user + t.system)
        started = time.time() - (time.monotonic() - self.agent.started_at)
        expo.gauge("meshnet_process_start_time_seconds", "when the agent started (Unix time)",
                   round(started, 3))
        try:
            fds = len(os.listdir("/proc/self/fd"))
            expo.gauge("meshnet_process_open_fds", "open file descriptors", fds)
        except OSError:
            pass
        expo.histogram("meshnet_event_loop_lag_seconds",
                       f"how late the lag monitor's timer (every {LAG_INTERVAL_S:g} s) fired",
                       self.lag_seconds)
        expo.gauge("meshnet_event_loop_lag_last_seconds", "the lag monitor's latest reading",
                   self.lag.last)
        if self.server is not None:
            srv = self.server
            expo.gauge("meshnet_metrics_open_connections", "open connections to this listener",
                       len(srv.conns))
            for status, n in sorted(srv.responses.items()):
                expo.counter("meshnet_metrics_responses_total",
                             "responses of this listener, by HTTP status", n,
                             {"code": str(status)})
            for key, n in srv.counters.items():
                expo.counter(f"meshnet_metrics_{key}_total", _SERVER_HELP.get(key, key), n)
