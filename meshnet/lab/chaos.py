"""`meshnet-lab chaos`: a seeded schedule of mixed faults against a working lab cluster, then the
invariants a user relies on (meshnet/lab/invariants.py), checked after the final heal.

The schedule is a pure function of (seed, hosts, duration, fault kinds, down fraction): the
same arguments always draw the same rounds. A round starts 1-3 faults at small offsets, issues
churn (service and network writes to random live hosts, the minority side of a partition
included), sends probe requests to the frontend by name while the faults last, heals every
fault of the round, and measures convergence: the time until every host sees every host alive
and the tasks and DNS answers are what the acknowledged writes say (invariants 1, 3 and 5).

Fault kinds (DESIGN: faults are the lab's verbs):
- kill: SIGKILL one agent, start it again at the end of the fault;
- crash: the whole host (agent, tasks, underlay link), back at the end;
- partition: two symmetric groups, or a one-way block between two hosts (nftables);
- loss: 5-30 % of one host's underlay packets;
- flap: one host's underlay link down for 1-4 s;
- pause: SIGSTOP one agent for 1-10 s (a GC or VM stall);
- disk-full: one host (chosen by the seed) runs with its state dir on a small tmpfs, which the
  fault fills and frees again;
- churn: writes issued during every round while this kind is enabled.

Never more than `max_down` hosts (default fewer than half) are down (kill, crash, flap, pause)
at once. A write is acknowledged when its meshctl exited 0; only acknowledged writes are
required to survive, unacknowledged ones may or may not have taken effect.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from meshnet.lab import invariants
from meshnet.lab.demo_http import TASK_ARGV as DEMO
from meshnet.lab.demo_http import TASK_MOUNT
from meshnet.lab.invariants import Expected, Violation
from meshnet.lab.lab import Lab, LabError

FAULT_KINDS = ("kill", "crash", "partition", "loss", "flap", "pause", "disk-full", "churn")
# Kinds that take a host down while they last (the down fraction counts these).
DOWN_KINDS = frozenset({"kill", "crash", "flap", "pause"})
# (shortest, longest) seconds a fault lasts before its heal; a round's faults are also cut to
# what the run's duration leaves room for (so a short CI run still sees every kind).
DURATION_S: dict[str, tuple[float, float]] = {
    "kill": (3.0, 15.0), "crash": (5.0, 20.0), "partition": (5.0, 45.0),
    "loss": (5.0, 30.0), "flap": (1.0, 4.0), "pause": (1.0, 10.0), "disk-full": (5.0, 30.0),
}
# Time planned after each round's heal for convergence; a round that needs longer delays the
# next one (the schedule stays the same, only its clock shifts).
SETTLE_S = 15.0
# Give up waiting for convergence after this long (then the round is reported unconverged):
# several times the 10 s target, and short enough that a cluster that never converges (a
# bug) fails a CI run in minutes.
CONVERGE_TIMEOUT_S = 45.0
FINAL_CONVERGE_TIMEOUT_S = 90.0
# Before the final check the converged state (and the kernel's FDB and neighbours) must hold
# this long: a task counts as running once its process started, and a frontend that a late
# placement change has just restarted may not be listening yet (no health checks before #17).
FINAL_STABLE_S = 3.0
PROBE_REQUESTS = 10  # requests to the frontend per round, while its faults last
PROBE_JOIN_S = 120.0  # a probe is a `meshctl run` with timeouts; it ends well before this
FINAL_REQUESTS = 100
RSS_BOUND_MB = 250.0
# A round slower than this to converge (the soak's p99 target) keeps the agents' logs.
SLOW_ROUND_S = 10.0
# The disk-full host's state dir. Room for its task logs too (1 MiB per slot, plus one rotated
# file): at 4 MiB the logs of the slots it had run filled it for good after the first fault,
# and the soak's disk-full host never saved again (#15, seed 1).
DISK_TMPFS_BYTES = 32 << 20
APPNET = "appnet"
BACKEND_REPLICAS = 3
FRONTEND_REPLICAS = 3
CTL_TIMEOUT_S = 20.0


# ---- the schedule (pure) ---------------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    kind: str
    hosts: tuple[str, ...]
    offset: float  # seconds after the round starts
    duration: float
    # partition: "groups" (list of lists) or "block" [src, dst]; loss: "percent"
    params: tuple[tuple[str, Any], ...] = ()

    def param(self, name: str) -> Any:
        return dict(self.params).get(name)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "hosts": list(self.hosts), "offset": round(self.offset, 2),
                "duration": round(self.duration, 2), **dict(self.params)}


@dataclass(frozen=True)
class Churn:
    offset: float
    verb: str  # service-create, service-scale, service-rm, network-create, network-rm
    name: str
    replicas: int = 0
    host_pick: float = 0.0  # which live host gets it, as a fraction (drawn now, applied then)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"offset": round(self.offset, 2), "verb": self.verb,
                             "name": self.name}
        if self.replicas:
            d["replicas"] = self.replicas
        return d


@dataclass(frozen=True)
class Round:
    index: int
    start: float  # planned seconds after the chaos begins
    window: float  # how long its faults last, at most
    faults: tuple[Fault, ...]
    churn: tuple[Churn, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.index, "start": round(self.start, 2),
                "window": round(self.window, 2), "faults": [f.to_dict() for f in self.faults],
                "churn": [c.to_dict() for c in self.churn]}


@dataclass(frozen=True)
class Schedule:
    seed: int
    hosts: tuple[str, ...]
    duration: float
    kinds: tuple[str, ...]
    max_down: int
    disk_host: str | None
    rounds: tuple[Round, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "hosts": list(self.hosts), "duration": self.duration,
                "faults": list(self.kinds), "max_down": self.max_down,
                "disk_host": self.disk_host, "rounds": [r.to_dict() for r in self.rounds]}


def default_max_down(n: int) -> int:
    """Fewer than half the hosts."""
    return max(0, math.ceil(n / 2) - 1)


def parse_faults(text: str | None) -> tuple[str, ...]:
    """`--faults kill,partition` (default: all); ValueError names an unknown kind."""
    if not text or text == "all":
        return FAULT_KINDS
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in FAULT_KINDS]
    if unknown or not kinds:
        raise ValueError(f"unknown fault kind {unknown[0] if unknown else text!r}; "
                         f"known: {', '.join(FAULT_KINDS)}")
    return tuple(dict.fromkeys(kinds))


def make_schedule(seed: int, hosts: Sequence[str], duration: float,
                  kinds: Sequence[str] = FAULT_KINDS, max_down: int | None = None) -> Schedule:
    """The rounds of a run, drawn from SEED alone. Fault kinds are dealt from a shuffled deck
    (every enabled kind comes up before any comes twice), 1-3 per round."""
    hosts = tuple(hosts)
    n = len(hosts)
    if max_down is None:
        max_down = default_max_down(n)
    rng = random.Random(seed)
    fault_kinds = [k for k in kinds if k != "churn" and (k not in DOWN_KINDS or max_down > 0)]
    if n < 2:
        fault_kinds = [k for k in fault_kinds if k not in ("partition",)]
    disk_host = hosts[-1] if "disk-full" in fault_kinds else None
    per_round = 2 if n < 5 else 3
    rounds_wanted = max(1, math.ceil(len(fault_kinds) / per_round)) if fault_kinds else 1
    # Long runs: faults up to their kind's maximum; short ones: whatever fits.
    cap = max(3.0, duration / rounds_wanted - SETTLE_S)
    deck: list[str] = []
    seen: set[str] = set()
    rounds: list[Round] = []
    churn_seq = 0
    t = 0.0
    while t < duration:
        faults: list[Fault] = []
        busy: set[str] = set()
        down = 0
        partitioned = False
        # Until every kind has come up once, rounds are full (so a short run sees them all).
        k = per_round if len(seen) < len(fault_kinds) else rng.randint(1, per_round)
        tries = 0
        while len(faults) < k and fault_kinds and tries < 2 * len(fault_kinds):
            tries += 1
            if not deck:
                deck = list(fault_kinds)
                rng.shuffle(deck)
            kind = deck.pop()
            fault = _draw_fault(rng, kind, hosts, busy, down, max_down, partitioned, disk_host,
                                cap)
            if fault is None:
                deck.insert(0, kind)  # comes up again next round
                continue
            seen.add(kind)
            faults.append(fault)
            busy.update(fault.hosts)
            down += len(fault.hosts) if kind in DOWN_KINDS else 0
            partitioned = partitioned or kind == "partition"
        window = max((f.offset + f.duration for f in faults), default=5.0)
        churn: list[Churn] = []
        if "churn" in kinds:
            for _ in range(rng.randint(1, 3)):
                churn.append(_draw_churn(rng, window, churn_seq))
                churn_seq += 1
        rounds.append(Round(len(rounds), t, window, tuple(faults), tuple(churn)))
        t += window + SETTLE_S
    return Schedule(seed, hosts, float(duration), tuple(kinds), max_down, disk_host,
                    tuple(rounds))


def _draw_fault(rng: random.Random, kind: str, hosts: tuple[str, ...], busy: set[str],
                down: int, max_down: int, partitioned: bool, disk_host: str | None,
                cap: float) -> Fault | None:
    lo, hi = DURATION_S[kind]
    duration = round(rng.uniform(lo, max(lo, min(hi, cap))), 1)
    offset = round(rng.uniform(0.0, 3.0), 1)
    free = [h for h in hosts if h not in busy]
    if kind == "disk-full":
        if disk_host is None or disk_host in busy:
            return None
        return Fault(kind, (disk_host,), offset, duration)
    if kind == "partition":
        if partitioned or len(hosts) < 2:
            return None
        if rng.random() < 0.5 and len(hosts) >= 2:
            src, dst = rng.sample(hosts, 2)
            return Fault(kind, (src, dst), offset, duration, (("block", [src, dst]),))
        order = list(hosts)
        rng.shuffle(order)
        minority = rng.randint(1, max(1, (len(hosts) - 1) // 2))
        groups = [sorted(order[:minority]), sorted(order[minority:])]
        return Fault(kind, tuple(order[:minority]), offset, duration, (("groups", groups),))
    if not free:
        return None
    if kind in DOWN_KINDS and down + 1 > max_down:
        return None
    host = rng.choice(free)
    if kind == "loss":
        return Fault(kind, (host,), offset, duration, (("percent", rng.randint(5, 30)),))
    return Fault(kind, (host,), offset, duration)


def _draw_churn(rng: random.Random, window: float, seq: int) -> Churn:
    offset = round(rng.uniform(0.0, window), 1)
    pick = rng.random()
    verb = rng.choice(["service-create", "service-create", "service-scale", "service-rm",
                       "network-create", "network-rm"])
    if verb.startswith("network"):
        return Churn(offset, verb, f"chaosnet{rng.randint(1, 3)}", host_pick=pick)
    return Churn(offset, verb, f"churn{rng.randint(1, 3)}", rng.randint(1, 3), pick)


# ---- the run (against a real lab) ------------------------------------------------------------

@dataclass
class Report:
    schedule: Schedule
    actions: list[dict[str, Any]] = field(default_factory=list)
    convergence: list[dict[str, Any]] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    served: int = 0
    failed_during_chaos: int = 0
    final_served: int = 0
    final_failed: int = 0
    max_rss_mb: float = 0.0
    tracebacks: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.violations

    def convergence_values(self) -> list[float]:
        """Seconds to converge after each heal. A heal that never converged counts as its whole
        wait, a lower bound: leaving it out would make the percentiles look better for it."""
        return [c["seconds"] if c["seconds"] is not None else c.get("waited", CONVERGE_TIMEOUT_S)
                for c in self.convergence]

    def to_dict(self) -> dict[str, Any]:
        vals = sorted(self.convergence_values())
        unconverged = sum(1 for c in self.convergence if c["seconds"] is None)
        return {
            "ok": self.ok, "seed": self.schedule.seed, "hosts": len(self.schedule.hosts),
            "duration": self.schedule.duration, "faults": list(self.schedule.kinds),
            "schedule": self.schedule.to_dict()["rounds"],
            "actions": self.actions, "convergence": self.convergence,
            "convergence_s_p50": _pct(vals, 50), "convergence_s_p99": _pct(vals, 99),
            "convergence_s_max": vals[-1] if vals else None, "unconverged": unconverged,
            "violations": [{"invariant": v.invariant, "detail": v.detail,
                            "evidence": v.evidence} for v in self.violations],
            "served": self.served, "failed_during_chaos": self.failed_during_chaos,
            "final_requests": {"served": self.final_served, "failed": self.final_failed},
            "max_rss_mb": round(self.max_rss_mb, 1), "rss_bound_mb": RSS_BOUND_MB,
            "tracebacks": self.tracebacks, "error": self.error,
        }


def _pct(sorted_vals: list[float], p: float) -> float | None:
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, math.ceil(p / 100 * len(sorted_vals)) - 1))
    return round(sorted_vals[i], 2)


class Chaos:
    """One chaos run: lab up, deploy, rounds, final heal and check, lab down."""

    def __init__(self, schedule: Schedule, lab: Lab, log: Callable[[str], None]) -> None:
        self.s = schedule
        self.lab = lab
        self.log = log
        self.hosts = list(schedule.hosts)
        self.expected = Expected(networks={APPNET: {}}, services={})
        self.report = Report(schedule)
        self.t0 = 0.0
        self.down: dict[str, str] = {}  # host -> the fault holding it down
        self.removed: set[str] = set()  # services an acknowledged rm removed
        self.probes: list[threading.Thread] = []
        self.unconverged: list[Violation] = []  # what the last convergence wait still saw
        self.last_unconverged: list[Violation] = []  # its last failed poll (see waited_on)
        self.lock = threading.Lock()  # the probes' thread shares the report and the rng
        self.rng = random.Random(schedule.seed ^ 0x5EED)

    # -- helpers --

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def act(self, action: str, hosts: Sequence[str] = (), ok: bool = True,
            **extra: Any) -> None:
        entry = {"t": self.now(), "action": action, "hosts": list(hosts), "ok": ok, **extra}
        self.report.actions.append(entry)
        detail = " ".join(f"{k}={v}" for k, v in extra.items())
        self.log(f"  {entry['t']:7.1f}s {action} {','.join(hosts)} {detail}"
                 f"{'' if ok else ' (FAILED)'}".rstrip())

    def ctl(self, host: str, *args: str, timeout: float = CTL_TIMEOUT_S) -> tuple[int, str]:
        try:
            r = self.lab.ctl(host, list(args), capture_output=True, timeout=timeout)
        except Exception as e:  # a timeout of a meshctl against a paused agent, etc.
            return 1, f"{type(e).__name__}: {e}"
        return r.returncode, (r.stdout if r.returncode == 0 else r.stderr).strip()

    def live(self) -> list[str]:
        return [h for h in self.hosts if h not in self.down]

    # -- deploy --

    def deploy(self) -> None:
        h = self.hosts[0]
        self._must(h, "network", "create", APPNET)
        # --detach: convergence is timed below, over every invariant, not by meshctl's wait
        self._must(h, "service", "create", "backend", "--detach", "--network", APPNET,
                   "--replicas", str(BACKEND_REPLICAS), "--limit-memory", "128M", *TASK_MOUNT,
                   "--", *DEMO, "serve")
        self._must(h, "service", "create", "frontend", "--detach", "--network", APPNET,
                   "--replicas", str(FRONTEND_REPLICAS), "--limit-memory", "128M", *TASK_MOUNT,
                   "--", *DEMO, "front", "--backend", "http://backend:8080/")
        self.expected.services["backend"] = {"network": APPNET, "replicas": BACKEND_REPLICAS}
        self.expected.services["frontend"] = {"network": APPNET, "replicas": FRONTEND_REPLICAS}
        secs = self.converge(CONVERGE_TIMEOUT_S * 2)
        if secs is None:
            self.report.violations = self.unconverged
            raise LabError("the cluster did not converge after deploying appnet: " + "; ".join(
                f"[{v.invariant}] {v.detail}" for v in self.unconverged[:3]))
        self.act("deployed", converged_s=secs)

    def _must(self, host: str, *args: str) -> None:
        rc, out = self.ctl(host, *args, timeout=60)
        if rc != 0:
            raise LabError(f"meshctl {' '.join(args[:3])} on {host}: {out}")

    # -- convergence --

    def converged(self) -> list[Violation]:
        hosts = self.hosts
        out = invariants.check_membership(self.lab, hosts)
        if out:
            return out
        out = invariants.check_tasks(self.lab, hosts, self.expected)
        if out:
            return out
        return invariants.check_dns(self.lab, hosts, self.expected)

    def converge(self, timeout: float) -> float | None:
        """Seconds until invariants 1, 3 and 5 hold, or None (then `self.unconverged` holds
        what still failed)."""
        start = time.monotonic()
        self.last_unconverged = []
        while time.monotonic() - start < timeout:
            self.unconverged = self.converged()
            if not self.unconverged:
                return round(time.monotonic() - start, 2)
            self.last_unconverged = self.unconverged
            time.sleep(0.5)
        return None

    def settle(self, timeout: float) -> float | None:
        """Seconds until the converged state and the kernel invariant have both held for
        FINAL_STABLE_S in a row, or None after TIMEOUT (the final check then judges as is)."""
        start = time.monotonic()
        held_since: float | None = None
        while time.monotonic() - start < timeout:
            ok = not self.converged() and not invariants.check_kernel(self.lab, self.hosts)
            now = time.monotonic()
            if not ok:
                held_since = None
            elif held_since is None:
                held_since = now
            elif now - held_since >= FINAL_STABLE_S:
                return round(now - start, 2)
            time.sleep(0.5)
        return None

    def waited_on(self) -> dict[str, Any]:
        """What the last convergence waited on longest: the violation its last failed poll
        saw (the evidence a slow round needs)."""
        v = self.last_unconverged[:1]
        if not v:
            return {}
        evidence = json.dumps(v[0].evidence, sort_keys=True, default=str)
        return {"waited_on": f"[{v[0].invariant}] {v[0].detail}"[:200],
                "evidence": evidence[:600]}

    # -- faults --

    def begin(self, f: Fault) -> None:
        lab, h = self.lab, f.hosts[0] if f.hosts else ""
        try:
            if f.kind == "kill":
                lab.kill(h)
                self.down[h] = "kill"
            elif f.kind == "crash":
                lab.crash(h)
                self.down[h] = "crash"
            elif f.kind == "pause":
                lab.pause(h)
                self.down[h] = "pause"
            elif f.kind == "flap":
                lab.link(h, False)
                self.down[h] = "flap"
            elif f.kind == "loss":
                lab.loss(h, int(f.param("percent")))
            elif f.kind == "partition":
                block = f.param("block")
                if block:
                    lab.block(block[0], block[1])
                else:
                    lab.partition(f.param("groups"))
            elif f.kind == "disk-full":
                lab.fill_state(h)
            self.act(f"begin {f.kind}", f.hosts, **{k: v for k, v in f.params})
        except LabError as e:
            self.act(f"begin {f.kind}", f.hosts, ok=False, error=str(e))

    def end(self, f: Fault) -> None:
        lab, h = self.lab, f.hosts[0] if f.hosts else ""
        try:
            if f.kind == "kill":
                lab.start(h)
            elif f.kind == "crash":
                lab.recover(h)
            elif f.kind == "pause":
                lab.resume(h)
            elif f.kind == "flap":
                lab.link(h, True)
            elif f.kind == "loss":
                lab.loss(h, 0)
            elif f.kind == "partition":
                lab.heal()
            elif f.kind == "disk-full":
                lab.free_state(h)
            self.down.pop(h, None)
            self.act(f"end {f.kind}", f.hosts)
        except LabError as e:
            self.act(f"end {f.kind}", f.hosts, ok=False, error=str(e))

    # -- churn --

    def churn(self, c: Churn) -> None:
        live = self.live()
        if not live:
            return
        host = live[min(len(live) - 1, int(c.host_pick * len(live)))]
        exp = self.expected
        # Service writes --detach: churn must not block the round, and a write is acknowledged
        # when it is stored (exit 0), not when its tasks run.
        if c.verb == "network-create":
            args: tuple[str, ...] = ("network", "create", c.name)
        elif c.verb == "network-rm":
            args = ("network", "rm", c.name)
        elif c.verb == "service-create":
            args = ("service", "create", c.name, "--detach", "--network", APPNET, "--replicas",
                    str(c.replicas), "--limit-memory", "32M", "--", "sleep", "100000")
        elif c.verb == "service-scale":
            args = ("service", "scale", "--detach", f"{c.name}={c.replicas}")
        else:
            args = ("service", "rm", "--detach", c.name)
        rc, out = self.ctl(host, *args)
        acked = rc == 0
        # An unacknowledged write may or may not have taken effect; an acknowledged one
        # settles the name again.
        if c.verb.startswith("network"):
            if not acked:
                exp.maybe_networks.add(c.name)
            else:
                exp.maybe_networks.discard(c.name)
                if c.verb == "network-create":
                    exp.networks[c.name] = {}
                else:
                    exp.networks.pop(c.name, None)
        elif not acked:
            exp.maybe_services.add(c.name)
        elif c.verb == "service-create":
            exp.maybe_services.discard(c.name)
            exp.services[c.name] = {"network": APPNET, "replicas": c.replicas}
            self.removed.discard(c.name)
        elif c.verb == "service-scale":  # acknowledged: it exists, with this many
            exp.maybe_services.discard(c.name)
            exp.services[c.name] = {"network": APPNET, "replicas": c.replicas}
        elif c.verb == "service-rm":
            exp.maybe_services.discard(c.name)
            exp.services.pop(c.name, None)
            self.removed.add(c.name)  # DNS must stop answering it
        self.act(f"churn {c.verb}", [host], ok=acked, name=c.name,
                 **({"replicas": c.replicas} if c.replicas else {}),
                 **({} if acked else {"error": out.splitlines()[-1][:160] if out else ""}))

    # -- requests --

    def probe(self, host: str, n: int) -> tuple[int, int]:
        """N requests to the frontend by name from a sandbox on HOST: (served, failed)."""
        get = " ".join([*DEMO, "get", "http://frontend:8080/", "--tries", "1"])
        script = f"for i in $(seq {n}); do {get} >/dev/null 2>&1 && echo OK || echo FAIL; done"
        _, out = self.ctl(host, "run", "--network", APPNET, *TASK_MOUNT, "--", "sh", "-c",
                          script, timeout=30 + 6 * n)
        ok = sum(1 for ln in out.splitlines() if ln.strip() == "OK")
        return ok, n - ok

    # -- the run --

    def start(self) -> None:
        """The lab: the schedule's hosts with the lan profile, the disk-full host's state dir on
        a small tmpfs."""
        self.log(f"chaos: seed {self.s.seed}, {len(self.s.rounds)} rounds planned; lab up with "
                 f"{len(self.hosts)} hosts (profile lan)")
        disk = self.s.disk_host
        self.lab.up(len(self.hosts), tmpfs_state={disk: DISK_TMPFS_BYTES} if disk else {})

    def stop(self) -> None:
        """Heal whatever is left and remove what the run made; the agents' logs stay (in the
        lab's run dir) when the run failed or a round took longer than SLOW_ROUND_S to
        converge, for a look."""
        try:
            self.heal_all()
        finally:
            slow = any(s > SLOW_ROUND_S for s in self.report.convergence_values())
            self.lab.down(keep_logs=not self.report.ok or slow)

    def run(self) -> Report:
        self.t0 = time.monotonic()
        self.deploy()
        for rnd in self.s.rounds:
            self.run_round(rnd)
        self.final()
        return self.report

    def run_round(self, rnd: Round) -> None:
        self.join_probes()  # the last round's, if it outlived its round
        self.log(f"round {rnd.index}: " + ", ".join(
            f"{f.kind}({','.join(f.hosts)}) {f.duration:g}s" for f in rnd.faults) + (
            f"; churn x{len(rnd.churn)}" if rnd.churn else ""))
        # (seconds into the round, order at the same instant, what): begins, then churn and
        # the probe, then ends
        events: list[tuple[float, int, Fault | Churn | None]] = []
        for f in rnd.faults:
            events += [(f.offset, 0, f), (f.offset + f.duration, 2, f)]
        events += [(c.offset, 1, c) for c in rnd.churn]
        events.append((rnd.window / 2, 1, None))
        events.sort(key=lambda e: (e[0], e[1]))
        start = time.monotonic()
        for at, order, what in events:
            delay = start + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if isinstance(what, Fault):
                (self.begin if order == 0 else self.end)(what)
            elif isinstance(what, Churn):
                self.churn(what)
            else:  # in the background: a slow probe must not stretch the faults
                probe = threading.Thread(target=self._probe_during, daemon=True)
                probe.start()
                self.probes.append(probe)
        self.heal_all()
        secs = self.converge(CONVERGE_TIMEOUT_S)
        self.report.convergence.append({"round": rnd.index, "after": self.now(),
                                        "seconds": secs, "waited": CONVERGE_TIMEOUT_S})
        self.sample_rss()
        if secs is not None:
            self.act("converged", seconds=secs, **self.waited_on())
        else:
            self.act("not converged", still=[f"[{v.invariant}] {v.detail}"
                                             for v in self.unconverged[:3]])

    def sample_rss(self) -> None:
        """Keep the largest agent peak (VmHWM) seen: sampled after every round, since an agent
        killed or crashed later takes its peak with it."""
        try:
            peaks = [_rss_mb(s.pid) for s in self.lab.status() if s.pid]
        except (LabError, OSError):
            return
        self.report.max_rss_mb = max([self.report.max_rss_mb, *peaks])

    def _probe_during(self) -> None:
        live = self.live()
        if not live:
            return
        with self.lock:
            host = live[self.rng.randrange(len(live))]
        served, failed = self.probe(host, PROBE_REQUESTS)
        with self.lock:
            self.report.served += served
            self.report.failed_during_chaos += failed
            self.act("probe", [host], served=served, failed=failed)

    def join_probes(self) -> None:
        for t in self.probes:
            t.join(PROBE_JOIN_S)
        self.probes = [t for t in self.probes if t.is_alive()]

    def heal_all(self) -> None:
        """Whatever a round left (a failed end, say): every host up and connected."""
        lab = self.lab
        try:
            lab.heal()
            for h in self.hosts:
                lab.loss(h, 0)
            for h, why in list(self.down.items()):
                if why == "pause":
                    lab.resume(h)
                elif why == "flap":
                    lab.link(h, True)
                elif why == "crash":
                    lab.recover(h)
                elif why == "kill":
                    lab.start(h)
                self.down.pop(h, None)
            if self.s.disk_host is not None:
                lab.free_state(self.s.disk_host)
        except LabError as e:
            self.act("heal all", ok=False, error=str(e))

    def final(self) -> None:
        self.join_probes()
        self.heal_all()
        secs = self.converge(FINAL_CONVERGE_TIMEOUT_S)
        self.report.convergence.append({"round": "final", "after": self.now(), "seconds": secs,
                                        "waited": FINAL_CONVERGE_TIMEOUT_S})
        self.act("final heal", seconds=secs, **self.waited_on())
        if secs is not None:
            self.act("final settle", seconds=self.settle(FINAL_CONVERGE_TIMEOUT_S))
        stats: dict[str, int] = {}
        self.report.violations = invariants.check_all(
            self.lab, self.hosts, self.expected, rss_bound_mb=RSS_BOUND_MB,
            requests=FINAL_REQUESTS, stats=stats, dns_names=sorted(self.removed))
        self.report.final_served = stats.get("served", 0)
        self.report.final_failed = stats.get("failed", 0)
        self.sample_rss()
        self.report.tracebacks = sum(_tracebacks(self.lab, h) for h in self.hosts)


def _rss_mb(pid: int) -> float:
    """The agent's peak resident set (VmHWM), in MB."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _tracebacks(lab: Lab, host: str) -> int:
    try:
        return lab.log_path(host).read_text(errors="replace").count("Traceback (most recent")
    except OSError:
        return 0


# ---- the command -----------------------------------------------------------------------------

def format_report(rep: dict[str, Any]) -> str:
    lines = [f"chaos: seed {rep['seed']}, {rep['hosts']} hosts, {rep['duration']:g} s, faults "
             f"{','.join(rep['faults'])}"]
    lines.append("actions:")
    for a in rep["actions"]:
        extra = " ".join(f"{k}={v}" for k, v in a.items() if k not in ("t", "action", "hosts",
                                                                        "ok"))
        lines.append(f"  {a['t']:7.1f}s {a['action']} {','.join(a['hosts'])} {extra}"
                     f"{'' if a['ok'] else ' (FAILED)'}".rstrip())
    conv = ", ".join(f"{c['round']}: {c['seconds'] if c['seconds'] is not None else 'never'}"
                     for c in rep["convergence"])
    lines.append(f"convergence after each heal (s): {conv}")
    lines.append(f"  p50 {rep['convergence_s_p50']} p99 {rep['convergence_s_p99']} max "
                 f"{rep['convergence_s_max']} unconverged {rep['unconverged']}")
    lines.append(f"requests during chaos: {rep['served']} served, {rep['failed_during_chaos']} "
                 f"failed; final: {rep['final_requests']['served']} served, "
                 f"{rep['final_requests']['failed']} failed")
    lines.append(f"agents: max RSS {rep['max_rss_mb']} MB (bound {rep['rss_bound_mb']:g}), "
                 f"tracebacks {rep['tracebacks']}")
    if rep["error"]:
        lines.append(f"error: {rep['error']}")
    if rep["violations"]:
        lines.append(f"VIOLATIONS ({len(rep['violations'])}):")
        for v in rep["violations"]:
            lines.append(f"  [{v['invariant']}] {v['detail']}")
            lines.append(f"      evidence: {json.dumps(v['evidence'], default=str)[:600]}")
    else:
        lines.append("final check: every invariant holds")
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM cleans up as Ctrl-C does


def run_chaos(lab: Lab, hosts: int, seed: int, duration: float, kinds: Sequence[str],
              max_down: int | None, as_json: bool) -> int:
    names = [f"h{i}" for i in range(1, hosts + 1)]
    schedule = make_schedule(seed, names, duration, kinds, max_down)

    def log(text: str) -> None:
        print(text, file=sys.stderr if as_json else sys.stdout, flush=True)

    chaos = Chaos(schedule, lab, log)
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        chaos.start()
        chaos.run()
    except (LabError, KeyboardInterrupt) as e:
        chaos.report.error = str(e) or type(e).__name__
    finally:
        try:
            chaos.stop()
        finally:
            signal.signal(signal.SIGTERM, previous)
    rep = chaos.report.to_dict()
    print(json.dumps(rep) if as_json else format_report(rep), flush=True)
    return 0 if chaos.report.ok else 1
