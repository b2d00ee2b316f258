"""The lab: N test hosts on one machine, each a network namespace running its own meshnetd.

Layout for prefix P (all of it inside namespaces; nothing is created in the root namespace):

    P-underlay   a namespace holding bridge br0 (the "switch")
    P-h1..P-hN   one namespace per host: lo up, eth0 (veth, MTU 1500) = 10.99.0.i/24, its peer
                 is port hI of br0. No default route: underlay traffic cannot leave the lab.
                 Its agent serves /metrics and /health at 10.99.0.i:9946 (METRICS_PORT).

Files under the run directory RUN (default /run/meshnet-lab/P, or $MESHNET_LAB_RUN):

    RUN/manifest.json    what the lab made (written atomically BEFORE making it) and agent pids
    RUN/cluster.key      32 random bytes, standard base64, 0600
    RUN/ca/              the lab's cluster CA (ca.key 0600, ca.crt)
    RUN/hI/id/           the host's certificate and keys (node.crt, node.key 0600): every host
                         is an admin unless `up --workers` makes it a worker
    RUN/hI/state/        the agent's --state-dir
    RUN/hI/meshnet.sock  the agent's control socket
    RUN/hI/meshnetd.log  the agent's stdout and stderr

Faults (each recorded in the manifest, idempotent, undone by `down`): partition / block (one-way)
/ heal and loss (nftables table meshnet_lab in each host), link (the host's switch port),
pause / resume (SIGSTOP / SIGCONT), crash / recover (link down, agent and task cgroups
SIGKILLed), and state_tmpfs / fill_state / free_state: the one thing made outside the
namespaces, a tmpfs mounted (in the root mount namespace) on RUN/hI/state.

`down` works from the manifest and, as a fallback for a lab that crashed before writing it,
sweeps namespaces named P-underlay / P-h<digits>, every process inside them, and meshnetd
processes whose --state-dir lies under RUN.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from meshnet.config import DEFAULT_METRICS_PORT
from meshnet.crypto import certs
from meshnet.fsutil import atomic_write
from meshnet.platform import cgroups, netns
from meshnet.platform.netns import NetnsError
from meshnet.platform.sandbox import processes_with_env

DEFAULT_PREFIX = "mnlab"
# Set to the lab's prefix in every agent's environment, so down() finds every agent the lab
# started (tasks never inherit it: they are found through their cgroups).
LAB_ENV = "MESHNET_LAB"
RUN_BASE = Path("/run/meshnet-lab")
UNDERLAY_NET = ipaddress.IPv4Network("10.99.0.0/24")
# .1 .. .254 of the /24; one address per host.
MAX_HOSTS = UNDERLAY_NET.num_addresses - 2
GOSSIP_PORT = 7946
# Every agent serves /metrics and /health on its underlay address at this port (issue 16).
METRICS_PORT = DEFAULT_METRICS_PORT
UNDERLAY_MTU = 1500
HOST_IFNAME = "eth0"
BRIDGE = "br0"
NFT_TABLE = "meshnet_lab"
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
# fill_state's file in a tmpfs state dir (not ".*.tmp": the agent deletes those at start).
FILLER = "lab-filler"
# How long `down` lets an agent shut down cleanly after SIGTERM before SIGKILL (the brief's 5 s).
TERM_GRACE_S = 5.0
# After SIGKILL the kernel needs a moment to tear a process down; more than this means stuck.
KILL_WAIT_S = 3.0
# An agent that has no control socket after this long is not coming up.
AGENT_START_TIMEOUT_S = 20.0
POLL_S = 0.05
# The lab's CA and host certificates live a year: longer than any lab, short of forever.
CERT_DAYS = 365
# A process as (pid, start time in ticks since boot or None when unknown).
ProcRef = tuple[int, int | None]
# Namespace names are file names under /run/netns; keep them short and shell-safe.
PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")  # fullmatch: no trailing newline
HOST_RE = re.compile(r"h([1-9][0-9]*)")


class LabError(Exception):
    """A lab operation failed; the message is one line meant for the user."""


@dataclass(frozen=True)
class HostStatus:
    name: str
    namespace: str
    underlay_ip: str
    running: bool
    socket: str
    pid: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_prefix() -> str:
    return os.environ.get("MESHNET_LAB_PREFIX") or DEFAULT_PREFIX


def default_run_dir(prefix: str) -> Path:
    env = os.environ.get("MESHNET_LAB_RUN")
    return Path(env) if env else RUN_BASE / prefix


def _venv_tool(name: str) -> str | None:
    """NAME next to the running interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


# ---------------------------------------------------------------- processes


def _proc_starttime(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if gone or a zombie.

    Recorded with every pid so that a pid reused by an unrelated process is never signalled.
    """
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    try:
        fields = data[data.rindex(")") + 2 :].split()
        state, start = fields[0], int(fields[19])  # fields 3 and 22 of proc(5)
    except (ValueError, IndexError):
        return None
    if state in ("Z", "X"):
        return None
    return start


def _alive(pid: int, starttime: int | None) -> bool:
    st = _proc_starttime(pid)
    return st is not None and (starttime is None or st == starttime)


def _reap(pid: int) -> None:
    """Collect PID if it is our child (a Lab in this process started it); harmless otherwise."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _wait_dead(procs: Iterable[ProcRef], timeout: float, *, reap: bool = False) -> list[ProcRef]:
    """Poll until every (pid, starttime) is gone; return those still alive at the deadline.

    With reap, also collect them if they are our children (agents a Lab in this process
    started); never done for other processes, whose exit status belongs to their parent.
    """
    left = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        if reap:
            for pid, _ in left:
                _reap(pid)
        left = [(p, s) for p, s in left if _alive(p, s)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(POLL_S)


def _stop_processes(procs: Sequence[ProcRef], grace: float) -> list[int]:
    """SIGTERM, wait up to GRACE, SIGKILL (the process and its process group); return survivors."""
    live = [(p, s) for p, s in procs if _alive(p, s)]
    for pid, _ in live:
        _signal(pid, signal.SIGTERM)
        _signal(pid, signal.SIGCONT)  # a paused (SIGSTOPped) agent acts on SIGTERM only now
    survivors = _wait_dead(live, grace, reap=True) if grace > 0 else live
    for pid, _ in survivors:
        _signal(pid, signal.SIGKILL)
    for pid, _ in live:
        # Agents run with start_new_session, so pid == pgid; this takes their task processes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    return [p for p, _ in _wait_dead(survivors, KILL_WAIT_S, reap=True)]


def _mountpoints() -> list[str]:
    """Mount points in our mount namespace (/proc/self/mountinfo field 5, unescaped)."""
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) > 4:
            out.append(re.sub(r"\\([0-7]{3})", lambda g: chr(int(g.group(1), 8)), fields[4]))
    return out


def _is_mountpoint(path: Path) -> bool:
    return str(path) in _mountpoints()


def _umount(path: str) -> str | None:
    """Unmount PATH (every mount stacked there); lazily if busy. None, or what went wrong."""
    for _ in range(8):
        if path not in _mountpoints():
            return None
        res = subprocess.run(["umount", path], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            res = subprocess.run(["umount", "-l", path], capture_output=True, text=True,
                                 check=False)
            if res.returncode != 0:
                return f"umount {path}: {res.stderr.strip()}"
    return None if path not in _mountpoints() else f"umount {path}: still mounted"


def _log_tail(path: Path, limit: int = 200) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:limit] if lines else ""


def _socket_ready(path: Path) -> bool:
    if not path.exists():
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(1.0)
        s.connect(str(path))
    except OSError:
        return False
    finally:
        s.close()
    return True


# ---------------------------------------------------------------- the lab


class Lab:
    """One lab, named by its prefix, with its records under run_dir.

    Every method reads the manifest afresh, so a new Lab(prefix, run_dir) in another process
    (the CLI, or a test after a simulated crash) sees and controls the same lab.
    """

    def __init__(
        self,
        prefix: str | None = None,
        run_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.prefix = prefix if prefix is not None else default_prefix()
        if not PREFIX_RE.fullmatch(self.prefix):
            raise LabError(
                f"bad prefix {self.prefix!r}: use 1-32 of A-Z a-z 0-9 _ . - "
                "starting with a letter or digit"
            )
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(self.prefix)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        # P-underlay, P-h<n>, and the agents' sandboxes P-s-<node tag>-... (see sandbox_prefix
        # and platform/sandbox.py sandbox_ns_name); matched whole (fullmatch), ASCII only.
        self._ns_re = re.compile(
            rf"{re.escape(self.prefix)}-(underlay|h[1-9][0-9]*|s-[A-Za-z0-9_.-]+)")

    # ------------------------------------------------------------ names and records

    @property
    def sandbox_prefix(self) -> str:
        return f"{self.prefix}-s"

    @property
    def cgroup_prefix(self) -> str:
        """Every agent's task cgroups live under meshnet-<sandbox prefix>-<host>."""
        return f"meshnet-{self.sandbox_prefix}-"

    @property
    def underlay_ns(self) -> str:
        return f"{self.prefix}-underlay"

    @property
    def manifest_path(self) -> Path:
        return self.run_dir / MANIFEST

    @property
    def key_path(self) -> Path:
        return self.run_dir / "cluster.key"

    @property
    def ca_dir(self) -> Path:
        return self.run_dir / "ca"

    def host_ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def host_dir(self, host: str) -> Path:
        return self.run_dir / host

    def socket_path(self, host: str) -> Path:
        return self.host_dir(host) / "meshnet.sock"

    def log_path(self, host: str) -> Path:
        return self.host_dir(host) / "meshnetd.log"

    def _load(self) -> dict[str, Any] | None:
        try:
            raw = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise LabError(f"cannot read {self.manifest_path}: {e.strerror}") from e
        try:
            m = json.loads(raw)
        except ValueError as e:
            raise LabError(f"{self.manifest_path} is corrupt; run 'meshnet-lab down'") from e
        if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION:
            raise LabError(f"{self.manifest_path} is not a lab manifest of this version")
        return m

    def _save(self, m: dict[str, Any]) -> None:
        atomic_write(self.manifest_path, json.dumps(m, indent=1, sort_keys=True).encode(), 0o600)

    def _require(self) -> dict[str, Any]:
        m = self._load()
        if m is None:
            raise LabError(f"no lab '{self.prefix}' is up (no {self.manifest_path})")
        return m

    def _host(self, m: dict[str, Any], name: str) -> str:
        hosts: dict[str, Any] = m["hosts"]
        for cand in (name, f"h{name}", name.removeprefix(f"{self.prefix}-")):
            if cand in hosts:
                return cand
        raise LabError(f"no host {name!r} in lab '{self.prefix}' (hosts: {', '.join(hosts)})")

    @staticmethod
    def _require_root() -> None:
        if os.geteuid() != 0:
            raise LabError("must run as root (it creates network namespaces)")

    def _our_namespaces(self) -> list[str]:
        return [n for n in netns.list_netns() if self._ns_re.fullmatch(n)]

    def _our_netns_etc(self) -> list[str]:
        try:
            return sorted(p.name for p in Path("/etc/netns").iterdir()
                          if self._ns_re.fullmatch(p.name))
        except OSError:
            return []

    def hosts(self) -> list[str]:
        m = self._load()
        return list(m["hosts"]) if m else []

    def metrics_addr(self, host: str) -> tuple[str, int]:
        """Where HOST's agent serves /metrics and /health (reachable inside the lab only)."""
        return (self.underlay_ip(host), METRICS_PORT)

    def underlay_ip(self, host: str) -> str:
        m = self._require()
        return str(m["hosts"][self._host(m, host)]["underlay_ip"])

    def is_up(self) -> bool:
        return self.manifest_path.exists() or bool(self._our_namespaces())

    # ------------------------------------------------------------ up

    def up(
        self,
        hosts: int = 3,
        *,
        profile: str | None = None,
        start_agents: bool = True,
        timeout: float = AGENT_START_TIMEOUT_S,
        agent_args: Sequence[str] = (),
        underlay_mtu: int = UNDERLAY_MTU,
        workers: Sequence[str] = (),
        tmpfs_state: dict[str, int] | None = None,
    ) -> None:
        """Create the underlay and N hosts; with start_agents, start meshnetd on each (with
        AGENT_ARGS added to its flags) and wait for every control socket. On any failure
        everything made so far is removed again. UNDERLAY_MTU is the MTU of the switch and
        of every host's eth0 (1500 by default; 9000 models a jumbo-frame network). WORKERS
        (host names) get certificates with the worker role; the others are admins.
        TMPFS_STATE {host: bytes}: those hosts' state dirs are tmpfs mounts of that size,
        mounted before their agents first start (see state_tmpfs)."""
        self._require_root()
        if not 1 <= hosts <= MAX_HOSTS:
            raise LabError(f"--hosts must be between 1 and {MAX_HOSTS}, not {hosts}")
        if not 1280 <= underlay_mtu <= 9000:
            raise LabError(f"--underlay-mtu must be between 1280 and 9000, not {underlay_mtu}")
        if self.manifest_path.exists() or self._our_namespaces():
            raise LabError(
                f"lab '{self.prefix}' is already up (run dir {self.run_dir}); "
                "run 'meshnet-lab down' first"
            )
        unknown = sorted(set(workers) - {f"h{i}" for i in range(1, hosts + 1)})
        if unknown:
            raise LabError(f"--workers: no host {unknown[0]} in a lab of {hosts}")
        tmpfs_state = dict(tmpfs_state or {})
        unknown = sorted(set(tmpfs_state) - {f"h{i}" for i in range(1, hosts + 1)})
        if unknown:
            raise LabError(f"tmpfs_state: no host {unknown[0]} in a lab of {hosts}")
        meshnetd = _venv_tool("meshnetd") if start_agents else None
        if start_agents and meshnetd is None:
            raise LabError("meshnetd not found next to the Python interpreter or on PATH")

        self._clear_run_dir(keep_logs=False)
        self.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        addrs = list(UNDERLAY_NET.hosts())
        names = [f"h{i}" for i in range(1, hosts + 1)]
        # h1 starts the cluster; h2 joins h1; the rest join h1 and h2 (either one suffices).
        seeds = [f"{addrs[i]}:{GOSSIP_PORT}" for i in range(min(2, hosts))]
        m: dict[str, Any] = {
            "version": MANIFEST_VERSION,
            "prefix": self.prefix,
            "run_dir": str(self.run_dir),
            "subnet": str(UNDERLAY_NET),
            "profile": profile,
            "underlay_mtu": underlay_mtu,
            "state": "creating",
            # Everything below is recorded before it is made (down removes what exists of it).
            "namespaces": [self.underlay_ns, *(self.host_ns(h) for h in names)],
            "links": [{"ns": self.underlay_ns, "name": BRIDGE, "kind": "bridge"}]
            + [
                {
                    "ns": self.underlay_ns,
                    "name": h,
                    "kind": "veth",
                    "peer_ns": self.host_ns(h),
                    "peer": HOST_IFNAME,
                }
                for h in names
            ],
            "hosts": {},
            "partition": None,
            "loss": {},
            # One-way drops [src, dst]; hosts whose bridge port is down; tmpfs state dirs.
            "blocks": [],
            "links_down": [],
            "tmpfs": {},
        }
        for i, h in enumerate(names):
            ip = str(addrs[i])
            join = seeds[:i]
            args = [
                "--name", h,
                "--bind", f"{ip}:{GOSSIP_PORT}",
                "--advertise", ip,
                "--metrics-listen", f"{ip}:{METRICS_PORT}",
                "--state-dir", str(self.host_dir(h) / "state"),
                "--socket", str(self.socket_path(h)),
                "--cluster-key-file", str(self.key_path),
                "--ca-cert", str(self.ca_dir / "ca.crt"),
                "--node-cert", str(self.host_dir(h) / "id" / "node.crt"),
                "--node-key", str(self.host_dir(h) / "id" / "node.key"),
            ]  # fmt: skip
            if join:
                args += ["--join", ",".join(join)]
            if profile:
                args += ["--profile", profile]
            # Lab hosts never forward DNS outside the lab: no upstream resolvers at all.
            # Sandboxes carry the lab's prefix: lab hosts share /run/netns, and `down` sweeps them.
            args += ["--log-format", "json", "--dns-upstream", "none",
                     "--sandbox-prefix", self.sandbox_prefix, *agent_args]
            m["hosts"][h] = {
                "namespace": self.host_ns(h),
                "underlay_ip": ip,
                "role": "worker" if h in workers else "admin",
                "agent_args": args,
                "pid": None,
                "starttime": None,
            }
        self._save(m)
        try:
            self._build(m, names)
            key = base64.b64encode(os.urandom(32)) + b"\n"
            atomic_write(self.key_path, key, 0o600)
            for h in names:
                self.host_dir(h).mkdir(mode=0o700, exist_ok=True)
                (self.host_dir(h) / "state").mkdir(mode=0o700, exist_ok=True)
            self._make_certificates(m, names)
            for h, size in sorted(tmpfs_state.items()):
                self._mount_state_tmpfs(m, h, size)
            if start_agents:
                assert meshnetd is not None
                for h in names:
                    self._spawn(m, h, meshnetd)
                self._wait_ready(m, names, timeout)
            m["state"] = "up"
            self._save(m)
        except BaseException as e:
            try:
                self.down(keep_logs=True)
            except LabError as e2:
                raise LabError(f"{e}; and cleaning up failed too: {e2}") from e
            if isinstance(e, NetnsError):
                raise LabError(str(e)) from e
            raise

    def _make_certificates(self, m: dict[str, Any], names: list[str]) -> None:
        """The lab's CA, and a certificate and keys for every host, as an operator would make
        them with `meshctl ca init` and `meshctl ca sign`."""
        now = int(time.time())
        ca_key, ca = certs.make_ca(f"{self.prefix}-ca", now - 60, CERT_DAYS)
        certs.save_ca(self.ca_dir, ca_key, ca, overwrite=True)
        for h in names:
            keys = certs.generate_node_keys()
            cert = certs.sign_node(ca_key, ca, h, [m["hosts"][h]["role"]], {}, keys.sign_pub,
                                   keys.dp_pub, now - 60, CERT_DAYS)
            certs.save_node(self.host_dir(h) / "id", keys, cert, overwrite=True)

    def _build(self, m: dict[str, Any], names: list[str]) -> None:
        u = self.underlay_ns
        mtu = int(m.get("underlay_mtu", UNDERLAY_MTU))
        netns.add(u)
        netns.ip_batch(
            ["link set lo up", f"link add {BRIDGE} mtu {mtu} type bridge"], ns=u
        )
        for h in names:
            hns = self.host_ns(h)
            netns.add(hns)
            netns.ip_batch(
                [
                    f"link add {h} mtu {mtu} type veth "
                    f"peer name {HOST_IFNAME} mtu {mtu} netns {hns}",
                    f"link set {h} master {BRIDGE} up",
                ],
                ns=u,
            )
            netns.ip_batch(
                [
                    "link set lo up",
                    f"addr add {m['hosts'][h]['underlay_ip']}/{UNDERLAY_NET.prefixlen} "
                    f"dev {HOST_IFNAME}",
                    f"link set {HOST_IFNAME} up",
                ],
                ns=hns,
            )
        netns.ip("link", "set", BRIDGE, "up", ns=u)

    # ------------------------------------------------------------ agents

    def _spawn(self, m: dict[str, Any], host: str, meshnetd: str) -> None:
        rec = m["hosts"][host]
        sock = self.socket_path(host)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()  # a stale socket from a killed agent would look like readiness
        self.host_dir(host).mkdir(mode=0o700, parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{LAB_ENV: self.prefix})
        with open(self.log_path(host), "ab") as log:
            proc = subprocess.Popen(
                netns.exec_argv(rec["namespace"], [meshnetd, *rec["agent_args"]]),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=env,
            )
        self._procs[host] = proc
        rec["pid"] = proc.pid
        rec["starttime"] = _proc_starttime(proc.pid)
        self._save(m)

    def _wait_ready(self, m: dict[str, Any], names: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = list(names)
        while pending:
            for h in list(pending):
                rec = m["hosts"][h]
                if _socket_ready(self.socket_path(h)):
                    pending.remove(h)
                    continue
                proc = self._procs.get(h)
                code = proc.poll() if proc is not None else None
                if code is not None or not _alive(rec["pid"], rec["starttime"]):
                    tail = _log_tail(self.log_path(h))
                    raise LabError(
                        f"agent on {h} exited (code {code}) before creating its socket"
                        + (f": {tail}" if tail else f"; see {self.log_path(h)}")
                    )
            if not pending:
                break
            if time.monotonic() >= deadline:
                raise LabError(
                    f"agent(s) {', '.join(pending)} did not create a control socket within "
                    f"{timeout:g}s; see {self.log_path(pending[0])}"
                )
            time.sleep(POLL_S)

    def _running(self, host: str, rec: dict[str, Any]) -> bool:
        proc = self._procs.get(host)
        if proc is not None and proc.pid == rec.get("pid"):
            proc.poll()  # reap it if it died, so it does not linger as a zombie
        pid = rec.get("pid")
        return pid is not None and _alive(pid, rec.get("starttime"))

    def kill(self, host: str) -> None:
        """SIGKILL the host's agent and wait until it is gone."""
        self._require_root()
        m = self._require()
        h = self._host(m, host)
        rec = m["hosts"][h]
        if not self._running(h, rec):
            raise LabError(f"agent on {h} is not running")
        self._kill_agent(m, h)

    def _kill_agent(self, m: dict[str, Any], h: str) -> None:
        """SIGKILL H's agent (paused or not) if it runs, wait until it is gone, record it."""
        rec = m["hosts"][h]
        if self._running(h, rec):
            pid, start = rec["pid"], rec["starttime"]
            _signal(pid, signal.SIGKILL)
            _signal(pid, signal.SIGCONT)  # SIGKILL ends a stopped process too; no harm
            if _wait_dead([(pid, start)], KILL_WAIT_S, reap=True):
                raise LabError(f"agent on {h} (pid {pid}) survived SIGKILL")
        self._procs.pop(h, None)
        rec["pid"] = rec["starttime"] = None
        rec.pop("paused", None)
        self._save(m)

    def start(self, host: str, *, timeout: float = AGENT_START_TIMEOUT_S) -> None:
        """Start the host's agent again (same arguments, same state dir); wait for its socket."""
        self._require_root()
        m = self._require()
        h = self._host(m, host)
        rec = m["hosts"][h]
        if self._running(h, rec):
            raise LabError(f"agent on {h} is already running (pid {rec['pid']})")
        if not netns.exists(rec["namespace"]):
            raise LabError(f"namespace {rec['namespace']} is gone; run down and up again")
        meshnetd = _venv_tool("meshnetd")
        if meshnetd is None:
            raise LabError("meshnetd not found next to the Python interpreter or on PATH")
        self._spawn(m, h, meshnetd)
        self._wait_ready(m, [h], timeout)

    # ------------------------------------------------------------ down

    def _stray_agents(self) -> list[ProcRef]:
        """meshnetd processes whose --state-dir lies under our run dir (crash fallback)."""
        root = str(self.run_dir).rstrip("/") + "/"
        found: list[ProcRef] = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                argv = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            for i, a in enumerate(argv[:-1]):
                if a == b"--state-dir" and argv[i + 1].decode(errors="replace").startswith(root):
                    found.append((int(d.name), _proc_starttime(int(d.name))))
                    break
        return found

    def down(self, *, keep_logs: bool = False) -> None:
        """Remove every namespace, link and process of this lab; idempotent."""
        self._require_root()
        errors: list[str] = []
        try:
            m = self._load()
        except LabError:
            m = None  # unreadable records: the sweep below still finds everything by prefix
        recs: dict[str, Any] = m["hosts"] if m else {}

        # 1. Agents: SIGTERM, up to TERM_GRACE_S, then SIGKILL.
        agents: dict[int, int | None] = {}
        for rec in recs.values():
            if rec.get("pid") is not None:
                agents[int(rec["pid"])] = rec.get("starttime")
        for pid, start in self._stray_agents():
            agents.setdefault(pid, start)
        stuck = _stop_processes(list(agents.items()), TERM_GRACE_S)
        if stuck:
            errors.append(f"processes {stuck} survived SIGKILL")
        for proc in self._procs.values():
            with contextlib.suppress(OSError):
                proc.poll()
        self._procs.clear()

        # 2. Tasks of agents that died without stopping them: every process in our agents'
        #    task cgroups (a sandbox whose name died with its agent's mount namespace is found
        #    only that way), and the cgroups themselves.
        stuck_cgroups = cgroups.sweep(cgroups.find_parents(self.cgroup_prefix))
        if stuck_cgroups:
            errors.append(f"task cgroups {stuck_cgroups} could not be emptied")

        # 3. Anything else still living inside our namespaces, or carrying LAB_ENV, then the
        #    namespaces themselves (their links, the bridge and the veths, and their nft tables
        #    go with them).
        names = set(self._our_namespaces())
        if m:
            names.update(n for n in m.get("namespaces", []) if netns.exists(n))
        ordered = sorted(names, key=lambda n: (n == self.underlay_ns, n))
        marker = f"{LAB_ENV}={self.prefix}"
        for _ in range(3):
            pids = {p for n in ordered for p in netns.pids(n)}
            pids.update(processes_with_env(marker))
            inside = [(p, _proc_starttime(p)) for p in sorted(pids)]
            if not inside:
                break
            for pid, _ in inside:
                _signal(pid, signal.SIGKILL)
            _wait_dead(inside, KILL_WAIT_S)
        for n in ordered:
            try:
                netns.delete(n)
            except NetnsError as e:
                errors.append(str(e))
            shutil.rmtree(Path("/etc/netns") / n, ignore_errors=True)  # a sandbox's resolv.conf
        # A sandbox whose namespace died with its agent's mount namespace leaves its
        # /etc/netns directory behind.
        for n in self._our_netns_etc():
            shutil.rmtree(Path("/etc/netns") / n, ignore_errors=True)

        # 4. Links recorded outside any namespace of ours (none today; kept for safety).
        for link in m.get("links", []) if m else []:
            if link.get("ns") is None:
                res = netns.ip("link", "del", str(link["name"]), check=False)
                if res.returncode != 0 and "Cannot find device" not in res.stderr:
                    errors.append(f"ip link del {link['name']}: {res.stderr.strip()}")

        # 5. tmpfs state dirs (recorded, and any other mount under the run dir left by a lab
        #    that crashed before recording it), now that nothing uses them.
        mounts = {str(v["path"]) for v in (m.get("tmpfs") or {}).values()} if m else set()
        mounts.update(self._mounts_under_run_dir())
        for path in sorted(mounts, key=len, reverse=True):
            err = _umount(path)
            if err:
                errors.append(err)

        if errors:
            # Keep the manifest: a second `down` retries with the same records.
            raise LabError("; ".join(errors))
        self._clear_run_dir(keep_logs=keep_logs)

    def _clear_run_dir(self, *, keep_logs: bool) -> None:
        """Remove what the lab put in its run dir (only that: run_dir may be user-chosen)."""
        d = self.run_dir
        if not d.is_dir():
            return
        for name in (MANIFEST, "cluster.key"):
            with contextlib.suppress(FileNotFoundError):
                (d / name).unlink()
        shutil.rmtree(d / "ca", ignore_errors=True)
        for p in d.glob(f".{MANIFEST}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        for p in d.iterdir():
            if not (p.is_dir() and HOST_RE.fullmatch(p.name)):
                continue
            for child in p.iterdir():
                if keep_logs and child.name == "meshnetd.log":
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        child.unlink()
            with contextlib.suppress(OSError):
                p.rmdir()
        with contextlib.suppress(OSError):
            d.rmdir()  # only if empty

    def _mounts_under_run_dir(self) -> list[str]:
        """Mounts at RUN/h<N>/state (only there: run_dir may be user-chosen)."""
        root = re.escape(str(self.run_dir.resolve()).rstrip("/"))
        state = re.compile(rf"{root}/h[1-9][0-9]*/state")
        return [p for p in _mountpoints() if state.fullmatch(p)]

    # ------------------------------------------------------------ inspection and commands

    def status(self) -> list[HostStatus]:
        m = self._load()
        if m is None:
            return []
        out = []
        for h, rec in m["hosts"].items():
            running = self._running(h, rec)
            out.append(
                HostStatus(
                    name=h,
                    namespace=rec["namespace"],
                    underlay_ip=rec["underlay_ip"],
                    running=running,
                    socket=str(self.socket_path(h)),
                    pid=rec["pid"] if running else None,
                )
            )
        return out

    def exec(
        self,
        host: str,
        argv: Sequence[str],
        *,
        capture_output: bool = False,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ARGV inside the host's namespace; stdio passes through unless capture_output."""
        self._require_root()
        if not argv:
            raise LabError("exec needs a command")
        m = self._require()
        ns = m["hosts"][self._host(m, host)]["namespace"]
        if not netns.exists(ns):
            raise LabError(f"namespace {ns} does not exist")
        try:
            return netns.exec_in(ns, argv, capture_output=capture_output, timeout=timeout)
        except OSError as e:
            raise LabError(f"cannot run ip netns exec: {e.strerror}") from e

    def ctl(
        self,
        host: str,
        args: Sequence[str],
        *,
        capture_output: bool = False,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `meshctl --socket <host's socket> ARGS...`."""
        m = self._require()
        h = self._host(m, host)
        meshctl = _venv_tool("meshctl")
        if meshctl is None:
            raise LabError("meshctl not found next to the Python interpreter or on PATH")
        return subprocess.run(
            [meshctl, "--socket", str(self.socket_path(h)), *args],
            capture_output=capture_output,
            text=True,
            timeout=timeout,
            check=False,
        )

    # ------------------------------------------------------------ faults (nftables)

    def partition(self, groups: Sequence[Sequence[str]]) -> None:
        """Hosts in different groups cannot exchange underlay packets; hosts in no group are
        untouched. Replaces any earlier partition."""
        self._require_root()
        m = self._require()
        if len(groups) < 2:
            raise LabError("partition needs at least two groups, e.g. h1,h2 h3")
        seen: set[str] = set()
        resolved: list[list[str]] = []
        for g in groups:
            names = [self._host(m, h) for h in g]
            if not names:
                raise LabError("empty partition group")
            dup = seen.intersection(names) or {n for n in names if names.count(n) > 1}
            if dup:
                raise LabError(f"host {sorted(dup)[0]} is in more than one group")
            seen.update(names)
            resolved.append(names)
        m["partition"] = resolved
        self._save(m)
        self._apply_faults(m, list(m["hosts"]))

    def heal(self) -> None:
        """Remove the partition and every one-way block (loss settings and links stay)."""
        self._require_root()
        m = self._require()
        m["partition"] = None
        m["blocks"] = []
        self._save(m)
        self._apply_faults(m, list(m["hosts"]))

    def block(self, src: str, dst: str) -> None:
        """Drop every underlay packet from host SRC to host DST (one way: DST's packets still
        reach SRC). Blocks add up; heal() or unblock() removes them."""
        self._require_root()
        m = self._require()
        s, d = self._host(m, src), self._host(m, dst)
        if s == d:
            raise LabError(f"block needs two different hosts, not {s} and {d}")
        blocks: list[list[str]] = m.setdefault("blocks", [])
        if [s, d] not in blocks:
            blocks.append([s, d])
            self._save(m)
        self._apply_faults(m, [d])

    def unblock(self, src: str, dst: str) -> None:
        """Remove the block from SRC to DST (if any)."""
        self._require_root()
        m = self._require()
        s, d = self._host(m, src), self._host(m, dst)
        blocks: list[list[str]] = m.setdefault("blocks", [])
        if [s, d] in blocks:
            blocks.remove([s, d])
            self._save(m)
        self._apply_faults(m, [d])

    # ------------------------------------------------------------ faults (links, processes)

    def link(self, host: str, up: bool) -> None:
        """The host's underlay link down or up: its port on the switch (hN in the underlay
        namespace), so its eth0 loses carrier as with a pulled cable. Idempotent."""
        self._require_root()
        m = self._require()
        h = self._host(m, host)
        down: list[str] = m.setdefault("links_down", [])
        if up:
            if h in down:
                down.remove(h)
        elif h not in down:
            down.append(h)
        self._save(m)
        self._set_link(h, up)

    def _set_link(self, h: str, up: bool) -> None:
        try:
            netns.ip("link", "set", h, "up" if up else "down", ns=self.underlay_ns)
        except NetnsError as e:
            raise LabError(str(e)) from e

    def pause(self, host: str) -> None:
        """SIGSTOP the host's agent (a GC or VM stall); its tasks run on. Idempotent."""
        self._require_root()
        m = self._require()
        h = self._host(m, host)
        rec = m["hosts"][h]
        if not self._running(h, rec):
            raise LabError(f"agent on {h} is not running")
        rec["paused"] = True
        self._save(m)
        _signal(rec["pid"], signal.SIGSTOP)

    def resume(self, host: str) -> None:
        """SIGCONT the host's agent after pause(). Idempotent."""
        self._require_root()
        m = self._require()
        h = self._host(m, host)
        rec = m["hosts"][h]
        if self._running(h, rec):
            _signal(rec["pid"], signal.SIGCONT)
        if rec.pop("paused", None) is not None:
            self._save(m)

    def paused(self, host: str) -> bool:
        m = self._require()
        h = self._host(m, host)
        return bool(m["hosts"][h].get("paused")) and self._running(h, m["hosts"][h])

    def crash(self, host: str) -> None:
        """The whole host fails at once: its underlay link goes down, then its agent and every
        task process of that host (found through its task cgroups) are SIGKILLed and those
        cgroups removed, as a power cut would leave them. Idempotent; recover() undoes it."""
        self._require_root()
        m = self._require()
        h = self._host(m, host)
        down: list[str] = m.setdefault("links_down", [])
        if h not in down:
            down.append(h)
            self._save(m)
        self._set_link(h, False)
        self._kill_agent(m, h)
        name = f"{self.cgroup_prefix}{h}"
        parents = [p for p in cgroups.find_parents(name) if p.name == name]
        stuck = cgroups.sweep(parents)
        if stuck:
            raise LabError(f"task cgroups {stuck} of {h} could not be emptied")

    def recover(self, host: str, *, timeout: float = AGENT_START_TIMEOUT_S) -> None:
        """After crash(): link up, the agent started again (same state dir); waits for its
        socket. Also fine after kill() or link(host, False) alone."""
        self._require_root()
        m = self._require()
        h = self._host(m, host)
        self.link(h, True)
        if not self._running(h, m["hosts"][h]):
            self.start(h, timeout=timeout)

    # ------------------------------------------------------------ faults (disk)

    def state_dir(self, host: str) -> Path:
        return self.host_dir(host) / "state"

    def state_tmpfs(self, host: str, size_bytes: int) -> None:
        """Put the host's state dir on a tmpfs of SIZE_BYTES (what is in it is copied in),
        mounted in the root mount namespace; the agent must not be running (start it after).
        down() unmounts it. Also available as up(..., tmpfs_state={host: size})."""
        self._require_root()
        m = self._require()
        h = self._host(m, host)
        if self._running(h, m["hosts"][h]):
            raise LabError(f"agent on {h} is running; kill it before putting its state on tmpfs")
        if (m.get("tmpfs") or {}).get(h):
            raise LabError(f"the state dir of {h} is already a tmpfs")
        self._mount_state_tmpfs(m, h, size_bytes)

    def _mount_state_tmpfs(self, m: dict[str, Any], h: str, size: int) -> None:
        if not 64 * 1024 <= size <= 1 << 30:
            raise LabError(f"tmpfs size must be between 64 KiB and 1 GiB, not {size}")
        state = self.state_dir(h)
        m.setdefault("tmpfs", {})[h] = {"path": str(state.resolve()), "size": size}
        self._save(m)  # recorded before it is made
        old = state.with_name("state.disk")
        if state.exists():
            os.replace(state, old)
        state.mkdir(mode=0o700)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700",
                              f"{self.prefix}-{h}-state", str(state)],
                             capture_output=True, text=True, check=False)
        try:
            if res.returncode != 0:
                raise LabError(f"mount tmpfs on {state}: {res.stderr.strip()}")
            if old.exists():
                try:
                    shutil.copytree(old, state, symlinks=True, dirs_exist_ok=True)
                except (OSError, shutil.Error) as e:
                    raise LabError(f"cannot copy {h}'s state into a {size}-byte tmpfs: "
                                   f"{e}") from None
        except LabError:
            _umount(str(state))
            shutil.rmtree(state, ignore_errors=True)
            if old.exists():
                os.replace(old, state)
            m["tmpfs"].pop(h, None)
            self._save(m)
            raise
        shutil.rmtree(old, ignore_errors=True)

    def _tmpfs_dir(self, host: str) -> Path:
        m = self._require()
        h = self._host(m, host)
        if not (m.get("tmpfs") or {}).get(h):
            raise LabError(f"the state dir of {h} is not a tmpfs (use state_tmpfs first)")
        return self.state_dir(h)

    def fill_state(self, host: str) -> int:
        """Fill the host's tmpfs state dir with a filler file until it is full (ENOSPC);
        returns the bytes the filler took. Idempotent: a second call tops it up."""
        self._require_root()
        state = self._tmpfs_dir(host)
        written = 0
        chunk = b"\0" * 65536
        with open(state / FILLER, "ab") as f:
            for size in (65536, 4096, 512, 1):
                while True:
                    try:
                        n = os.write(f.fileno(), chunk[:size])
                    except OSError as e:
                        if e.errno in (errno.ENOSPC, errno.EDQUOT):
                            break
                        raise LabError(f"filling {state}: {e.strerror}") from None
                    if n == 0:
                        break
                    written += n
        return written

    def free_state(self, host: str) -> None:
        """Delete the filler fill_state() made (if any)."""
        self._require_root()
        state = self._tmpfs_dir(host)
        with contextlib.suppress(FileNotFoundError):
            (state / FILLER).unlink()

    def loss(self, host: str, percent: int) -> None:
        """Drop PERCENT% of the host's underlay packets, each way, at random; 0 removes it."""
        self._require_root()
        if not 0 <= percent <= 100:
            raise LabError(f"loss must be between 0 and 100 percent, not {percent}")
        m = self._require()
        h = self._host(m, host)
        if percent:
            m["loss"][h] = percent
        else:
            m["loss"].pop(h, None)
        self._save(m)
        self._apply_faults(m, [h])

    def _nft_script(self, m: dict[str, Any], host: str) -> str:
        groups: list[list[str]] = m.get("partition") or []
        blocked: list[str] = []
        if any(host in g for g in groups):
            blocked = [m["hosts"][o]["underlay_ip"] for g in groups if host not in g for o in g]
        # One-way blocks towards this host: dropped as they arrive (its sends are untouched).
        blocked_in = sorted({m["hosts"][s]["underlay_ip"] for s, d in m.get("blocks") or []
                             if d == host} - set(blocked))
        pct = int(m.get("loss", {}).get(host, 0))
        # Creating then deleting first makes the script idempotent: the table always starts anew.
        lines = [f"table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}"]
        if not blocked and not blocked_in and not pct:
            return "\n".join(lines) + "\n"
        rules_in: list[str] = []
        rules_out: list[str] = []
        if blocked:
            addrs = ", ".join(blocked)
            rules_in.append(f"ip saddr {{ {addrs} }} drop")
            rules_out.append(f"ip daddr {{ {addrs} }} drop")
        if blocked_in:
            rules_in.append(f"ip saddr {{ {', '.join(blocked_in)} }} drop")
        if pct:
            # numgen yields 0..99 and nft rejects "< 100" as out of range: 100% is a plain drop.
            rnd = f"numgen random mod 100 < {pct} " if pct < 100 else ""
            rules_in.append(f'iifname "{HOST_IFNAME}" {rnd}drop')
            rules_out.append(f'oifname "{HOST_IFNAME}" {rnd}drop')
        lines.append(f"table inet {NFT_TABLE} {{")
        for chain, hook, rules in (("input", "input", rules_in), ("output", "output", rules_out)):
            lines.append(f"  chain {chain} {{")
            lines.append(f"    type filter hook {hook} priority -10; policy accept;")
            lines += [f"    {r}" for r in rules]
            lines.append("  }")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def _apply_faults(self, m: dict[str, Any], hosts: Sequence[str]) -> None:
        for h in hosts:
            try:
                netns.nft(self._nft_script(m, h), ns=m["hosts"][h]["namespace"])
            except NetnsError as e:
                raise LabError(str(e)) from e


def format_table(rows: Sequence[HostStatus], out: TextIO) -> None:
    if not rows:
        out.write("no hosts\n")
        return
    cols = ("HOST", "NAMESPACE", "UNDERLAY", "RUNNING", "PID", "SOCKET")
    data = [
        (r.name, r.namespace, r.underlay_ip, "yes" if r.running else "no",
         str(r.pid) if r.pid is not None else "-", r.socket)
        for r in rows
    ]  # fmt: skip
    widths = [max(len(c), *(len(d[i]) for d in data)) for i, c in enumerate(cols)]
    for row in (cols, *data):
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")
