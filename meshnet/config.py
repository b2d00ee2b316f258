"""Agent configuration: a TOML file, overridden by command-line flags, validated up front.

Every key is described once, in `KEYS` and `MEMBERSHIP` (name, type, default, flag, whether a
reload applies it, a one-line doc, its parser); the parser below, `meshnetd --check-config`,
the agent's reload, the README's table and deploy/meshnet.toml.example
(`python -m meshnet.config_docs`) all read it from there.

Every problem is one line naming the key and the reason. They are all collected, so
`meshnetd --check-config` lists every one; `meshnetd` itself refuses to start with the first.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/meshnet/meshnet.toml"
DEFAULT_STATE_DIR = "/var/lib/meshnet"
DEFAULT_SOCKET = "/run/meshnet/meshnet.sock"
DEFAULT_PORT = 7946
# /metrics and /health (issue 16): exporters use 9xxx, and 946 echoes gossip's 7946.
DEFAULT_METRICS_PORT = 9946
PROFILES = ("lan", "lan-fast", "wan")
LOG_FORMATS = ("text", "json")
DATAPATHS = ("vxlan", "none")
# Record ciphers of encrypted overlays (meshnet/crypto/sa.py); the initiator of a handshake
# proposes its own and the responder agrees to it, so a cluster may mix them.
OVERLAY_CIPHERS = ("aes-256-gcm", "chacha20-poly1305")
LOG_LEVELS = ("debug", "info", "warning", "error")

# Node names end up in DNS labels, task names and file names: keep them to one safe DNS label.
# Every name pattern here is ASCII and matched whole with fullmatch (`$` would also match
# before a final newline; str.isalnum/isdigit would take any script's letters and digits).
_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
_LABEL_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,63}")
# Sandbox namespaces' names begin with it (platform/sandbox.py sandbox_ns_name).
_SANDBOX_PREFIX_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,23}")
# Label values travel in gossip metadata (512 bytes in all), so each one stays short.
MAX_LABEL_VALUE = 63

# Whether a reload (SIGHUP) applies a changed key, or it keeps its value until a restart.
LIVE = "live"
RESTART = "restart"


class ConfigError(ValueError):
    """Bad configuration: one line per problem, each naming its key and saying why; str() is
    the first. `keys` are the keys the problems are about (a misspelt key counts as the one it
    resembles), so checks that build on them can stand aside instead of piling on."""

    def __init__(self, problems: str | list[str], keys: Iterable[str] = ()) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.keys = frozenset(keys)
        # What parsed, without the bad keys (None: nothing could be read at all), so that
        # --check-config can still check the rest against the host.
        self.partial: Config | None = None
        super().__init__(self.problems[0] if self.problems else "bad configuration")


@dataclass(frozen=True)
class Config:
    name: str = field(default_factory=lambda: _default_name())
    bind: tuple[str, int] = ("0.0.0.0", DEFAULT_PORT)
    advertise: str = ""
    join: tuple[tuple[str, int], ...] = ()
    state_dir: str = DEFAULT_STATE_DIR
    socket: str = DEFAULT_SOCKET
    cluster_key_file: str = ""
    insecure_no_encryption: bool = False
    # Identity (#13): the cluster CA's certificate, this node's certificate and its keys
    # (`meshctl ca init` / `meshctl ca sign`). Without them the agent refuses to start unless
    # insecure_no_identity says otherwise.
    ca_cert: str = ""
    node_cert: str = ""
    node_key: str = ""
    insecure_no_identity: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    dns_listen: tuple[tuple[str, int], ...] = ()
    # Prometheus /metrics and /health (meshnet/agent/metrics_server.py); None: not served.
    metrics_listen: tuple[str, int] | None = None
    log_format: str = "text"
    log_level: str = "info"
    profile: str = "lan"
    dns_ttl: int = 2
    # None: the host's resolvers from /etc/resolv.conf; a list (maybe empty): exactly these.
    dns_upstreams: tuple[tuple[str, int], ...] | None = None
    address_pool: str = "10.10.0.0/16"
    # "vxlan": build the overlay in the kernel; "none": control plane only (loopback tests).
    datapath: str = "vxlan"
    # Sandbox namespace names begin with <sandbox_prefix>-<node tag>- (platform/sandbox.py
    # sandbox_ns_name; hosts sharing one /run/netns, as lab hosts do, give each agent its own).
    sandbox_prefix: str = "mns"
    # Host paths tasks must not see, besides the agent's own state, socket, config and key.
    task_hidden_paths: tuple[str, ...] = ()
    membership: dict[str, float | int] = field(default_factory=dict)
    # Encrypted overlays: start a new handshake this long after the last one; refuse an SA this
    # long after it was made (WireGuard's 120 s and 180 s; tests shorten them).
    rekey_after_s: float = 120.0
    reject_after_s: float = 180.0
    overlay_cipher: str = "aes-256-gcm"

    def advertise_addr(self) -> tuple[str, int]:
        """The address other members reach us at."""
        ip = self.advertise or self.bind[0]
        if ip in ("0.0.0.0", "::"):
            ip = _guess_local_ip()
        return (ip, self.bind[1])


def _default_name() -> str:
    name = socket.gethostname().split(".")[0]
    return name if _NAME_RE.fullmatch(name) else "meshnet"


def _guess_local_ip() -> str:
    # Ask the kernel which source address it would use; connect() on UDP sends nothing.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def parse_hostport(key: str, text: object, default_port: int | None = None) -> tuple[str, int]:
    if not isinstance(text, str):
        raise ConfigError(f"{key}: expected 'IP:PORT', got {type(text).__name__}")
    host, sep, port_text = text.rpartition(":")
    if not sep:
        if default_port is None:
            raise ConfigError(f"{key}: {text!r} is not IP:PORT")
        host, port_text = text, str(default_port)
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{key}: {host!r} is not an IP address") from None
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{key}: port {port_text!r} is not in 1..65535")
    return (host, int(port_text))


def parse_label(key: str, text: str) -> tuple[str, str]:
    k, sep, v = text.partition("=")
    if not sep:
        raise ConfigError(f"{key}: {text!r} is not K=V")
    return _check_label(key, k, v)


def _check_label(key: str, k: object, v: object) -> tuple[str, str]:
    if not isinstance(k, str) or not _LABEL_KEY_RE.fullmatch(k):
        raise ConfigError(f"{key}: label key {k!r} must be 1-63 of [A-Za-z0-9_.-]")
    if not isinstance(v, str) or len(v) > MAX_LABEL_VALUE:
        raise ConfigError(f"{key}.{k}: label value must be a string of at most 63 characters")
    return k, v


def _expect(key: str, value: object, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _choice(key: str, value: object, choices: tuple[str, ...]) -> str:
    text = _expect(key, value, str)
    if text not in choices:
        raise ConfigError(f"{key}: {text!r} is not one of {', '.join(choices)}")
    return str(text)


# --- one parser per kind of value: (key, TOML value) -> the Config value, or ConfigError ----

Parser = Callable[[str, Any], Any]


def _name(key: str, value: Any) -> str:
    text = _expect(key, value, str)
    if not _NAME_RE.fullmatch(text):
        raise ConfigError(f"{key}: {text[:80]!r} must be a DNS label (ASCII letters, digits, "
                          "-_.)")
    return str(text)


def _hostport(default_port: int) -> Parser:
    return lambda key, value: parse_hostport(key, value, default_port)


def _hostports(default_port: int) -> Parser:
    def parse(key: str, value: Any) -> tuple[tuple[str, int], ...]:
        items = _expect(key, value, list)
        return tuple(parse_hostport(f"{key}[{i}]", v, default_port) for i, v in enumerate(items))
    return parse


def _ip_or_empty(key: str, value: Any) -> str:
    text = _expect(key, value, str)
    if text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(f"{key}: {text[:80]!r} is not an IP address") from None
    return str(text)


def _path(required: bool) -> Parser:
    def parse(key: str, value: Any) -> str:
        text = _expect(key, value, str)
        if required and not text:
            raise ConfigError(f"{key}: must not be empty")
        if "\0" in text or "\n" in text:
            raise ConfigError(f"{key}: not a file path")
        return str(text)
    return parse


def _bool(key: str, value: Any) -> bool:
    return bool(_expect(key, value, bool))


def _one_of(choices: tuple[str, ...]) -> Parser:
    return lambda key, value: _choice(key, value, choices)


def _int_in(low: int, high: int, unit: str) -> Parser:
    def parse(key: str, value: Any) -> int:
        number = _expect(key, value, int)
        if not low <= number <= high:
            raise ConfigError(f"{key}: must be {low}..{high} {unit}")
        return int(number)
    return parse


def _seconds_in(low: float, high: float) -> Parser:
    def parse(key: str, value: Any) -> float:
        seconds = _expect(key, value, float)
        if not low <= seconds <= high:
            raise ConfigError(f"{key}: must be {low:g}..{high:g} seconds")
        return float(seconds)
    return parse


def _positive(kind: type) -> Parser:
    def parse(key: str, value: Any) -> Any:
        number = _expect(key, value, kind)
        if not math.isfinite(number):  # a timer set to NaN or inf would never fire
            raise ConfigError(f"{key}: must be a finite number")
        if number <= 0:
            raise ConfigError(f"{key}: must be positive")
        return number
    return parse


def _labels(key: str, value: Any) -> dict[str, str]:
    table = _expect(key, value, dict)
    return dict(_check_label(key, k, v) for k, v in table.items())


def _address_pool(key: str, value: Any) -> str:
    text = _expect(key, value, str)
    try:
        pool = ipaddress.IPv4Network(text)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    if pool.prefixlen > 24:
        raise ConfigError(f"{key}: {text} is smaller than one /24")
    return str(text)


def _sandbox_prefix(key: str, value: Any) -> str:
    text = _expect(key, value, str)
    if not _SANDBOX_PREFIX_RE.fullmatch(text):
        raise ConfigError(f"{key}: {text[:80]!r} must be 1-24 of [A-Za-z0-9_.-]")
    return str(text)


def _absolute_paths(key: str, value: Any) -> tuple[str, ...]:
    items = _expect(key, value, list)
    paths = []
    for i, item in enumerate(items):
        text = _expect(f"{key}[{i}]", item, str)
        if not text.startswith("/") or "\0" in text or "\n" in text:
            raise ConfigError(f"{key}[{i}]: {text[:80]!r} is not an absolute path")
        paths.append(text)
    return tuple(paths)


def _metrics_listen(key: str, value: Any) -> tuple[str, int] | None:
    # "" (the default) serves nothing
    return parse_hostport(key, value, DEFAULT_METRICS_PORT) if value != "" else None


def _membership(key: str, value: Any) -> dict[str, float | int]:
    table = _expect(key, value, dict)
    parsed: dict[str, float | int] = {}
    problems: list[str] = []
    for k, v in table.items():
        spec = MEMBERSHIP.get(k)
        if spec is None:
            problems.append(f"{key}: {_unknown_key(k, _MEMBERSHIP_NAMES)[0]}")
            continue
        try:
            parsed[k] = spec.parse(f"{key}.{k}", v)
        except ConfigError as e:
            problems.extend(e.problems)
    if problems:
        raise ConfigError(problems, {key})
    return parsed


def _unknown_key(key: str, known: Mapping[str, str]) -> tuple[str, str | None]:
    """The line for an unknown key, with the closest known one if one is close (difflib, as
    git and cargo suggest commands); and that key, as KNOWN shows it."""
    import difflib  # only on this error path: meshctl imports this module too

    near = difflib.get_close_matches(key[:100], list(known), n=1)
    if not near:
        return f"unknown key {key[:80]!r}", None
    shown = known[near[0]]
    return f"unknown key {key[:80]!r} (did you mean {shown!r}?)", shown


# --- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    """One config key, described once (see the module docstring)."""

    name: str
    type: str  # the TOML value, as the docs name it
    parse: Parser
    # The TOML value that means the default (Config's field holds it parsed; a test keeps the
    # two equal), or None when the default is computed: then default_text says what it is.
    default: Any
    doc: str  # one line
    flag: str = ""  # the meshnetd flag that overrides it, with its value's name
    reload: str = RESTART  # LIVE: a reload (SIGHUP) applies a change at once
    default_text: str = ""
    # The example file shows this value instead of the default; `commented`: as a comment.
    example: Any = None
    commented: bool = False
    notes: tuple[str, ...] = ()  # the example file's comment lines after the doc


def _table(*keys: Key) -> dict[str, Key]:
    return {k.name: k for k in keys}


KEYS = _table(
    Key("name", "string", _name, None, "node name, a DNS label, unique in the cluster",
        flag="--name NAME", default_text="the host name", example="node1"),
    Key("bind", "IP:PORT", _hostport(DEFAULT_PORT), f"0.0.0.0:{DEFAULT_PORT}",
        "gossip address, UDP and TCP; every member must reach every other on it",
        flag="--bind IP:PORT"),
    Key("advertise", "IP", _ip_or_empty, "", "the address other members reach us at",
        flag="--advertise IP", default_text="`bind`'s IP (the first non-loopback one for 0.0.0.0)",
        notes=("Set it behind NAT or with several interfaces.",)),
    Key("join", "list of IP:PORT", _hostports(DEFAULT_PORT), [],
        "members to join through, retried with backoff until one answers; a reload joins "
        "those added", flag="--join IP:PORT[,..]", reload=LIVE, default_text="none",
        example=["10.0.0.1:7946"],
        notes=("Empty: start a new cluster, or wait to be joined with `meshctl join`. A "
               "restarted agent also tries the peers it saved in state_dir.",)),
    Key("state_dir", "path", _path(required=True), DEFAULT_STATE_DIR,
        "node record, keyring, store and task logs (created 0700)", flag="--state-dir DIR"),
    Key("socket", "path", _path(required=True), DEFAULT_SOCKET,
        "the control socket `meshctl` talks to (mode 0600)", flag="--socket PATH"),
    Key("cluster_key_file", "path", _path(required=False), "",
        "base64 AES-256 gossip key; seeds the keyring in state_dir on first start",
        flag="--cluster-key-file FILE", default_text="none", example="/etc/meshnet/cluster.key",
        notes=("The same on every node: `meshctl keys generate > /etc/meshnet/cluster.key && "
               "chmod 600 /etc/meshnet/cluster.key`. Later rotations go through `meshctl keys "
               "install/use/remove` and are kept in state_dir.",)),
    Key("ca_cert", "path", _path(required=False), "",
        "the cluster CA's certificate (`ca.crt`); needs node_cert and node_key too",
        flag="--ca-cert FILE", reload=LIVE, default_text="none", example="/etc/meshnet/ca.crt",
        notes=("Make the CA once, offline (`meshctl ca init --out /secure/ca`), and a "
               "certificate per node (`meshctl ca sign node1 --role admin --ca /secure/ca --out "
               "node1/`); copy ca.crt, node.crt and node.key (0600) to the node. A worker "
               "(`--role worker`) runs tasks but cannot define networks or services. A reload "
               "re-reads the three files: a renewed certificate (same CA, same node.key) is "
               "used at once; a new CA or datapath key needs a restart.",)),
    Key("node_cert", "path", _path(required=False), "",
        "this node's certificate (`node.crt`, for `name`); a reload takes a renewed one",
        flag="--node-cert FILE", reload=LIVE, default_text="none",
        example="/etc/meshnet/node.crt"),
    Key("node_key", "path", _path(required=False), "",
        "this node's signing and datapath keys (`node.key`, mode 0600); its datapath key "
        "replaces `state_dir/datapath.key`",
        flag="--node-key FILE", reload=LIVE, default_text="none", example="/etc/meshnet/node.key"),
    Key("insecure_no_identity", "bool", _bool, False,
        "DANGER: no certificates, so any holder of the cluster key can speak for any node; "
        "throwaway tests only", flag="--insecure-no-identity"),
    Key("insecure_no_encryption", "bool", _bool, False,
        "DANGER: gossip in cleartext, unauthenticated; throwaway tests only",
        flag="--insecure-no-encryption"),
    Key("labels", "table of strings", _labels, {},
        "node labels, gossiped, for placement constraints such as `node.labels.zone==a`",
        flag="--label K=V (repeatable)", reload=LIVE, default_text="none",
        example={"zone": "a"}),
    Key("dns_listen", "list of IP:PORT", _hostports(53), [],
        "host-side DNS listeners that see every network (tasks get their own at 127.0.0.11)",
        flag="--dns-listen IP:PORT (repeatable)", reload=LIVE, default_text="none",
        example=["127.0.0.1:5353"]),
    Key("dns_upstreams", "list of IP:PORT", _hostports(53), None,
        "where names outside the mesh are forwarded; `[]` (`--dns-upstream none`): nowhere "
        "(SERVFAIL)", flag="--dns-upstream IP:PORT|none (repeatable)", reload=LIVE,
        default_text="`/etc/resolv.conf`'s, at most 3 (a reload reads it again)",
        example=["192.0.2.53:53"], commented=True),
    Key("dns_ttl", "int", _int_in(0, 3600, "seconds"), 2,
        "TTL of the mesh's DNS answers, seconds", flag="--dns-ttl SECONDS", reload=LIVE),
    Key("metrics_listen", "IP:PORT", _metrics_listen, "",
        "serve Prometheus metrics at /metrics and a health check at /health",
        flag="--metrics-listen IP:PORT", reload=LIVE, default_text="off",
        example="10.0.0.1:9946", commented=True),
    Key("log_format", " | ".join(LOG_FORMATS), _one_of(LOG_FORMATS), "text",
        "log lines on stderr (the journal under systemd, with priorities)",
        flag="--log-format FORMAT", reload=LIVE),
    Key("log_level", " | ".join(LOG_LEVELS), _one_of(LOG_LEVELS), "info",
        "the least severe log lines written", flag="--log-level LEVEL", reload=LIVE),
    Key("profile", " | ".join(PROFILES), _one_of(PROFILES), "lan",
        "membership timings: `lan` (memberlist's LAN), `lan-fast`, `wan`",
        flag="--profile NAME",
        notes=("lan: memberlist's LAN defaults, the baseline; lan-fast: faster failure "
               "detection on a quiet, low-latency network; wan: longer timeouts for "
               "high-latency or lossy links. [membership] below overrides single values.",)),
    Key("address_pool", "CIDR", _address_pool, "10.10.0.0/16",
        "cut into /24s for networks created without `--subnet`", reload=LIVE),
    Key("datapath", " | ".join(DATAPATHS), _one_of(DATAPATHS), "vxlan",
        "`none`: the control plane only, no kernel devices (loopback tests)",
        flag="--datapath KIND"),
    Key("sandbox_prefix", "string", _sandbox_prefix, "mns",
        "sandbox namespaces are `PREFIX-<node>-<name>`; task cgroups live under "
        "`meshnet-PREFIX-<node>`", flag="--sandbox-prefix PREFIX"),
    Key("task_hidden_paths", "list of paths", _absolute_paths, [],
        "more host paths no task may see (the agent's state, socket, config and keys, "
        "`/etc/netns`, `/etc/shadow`, `/etc/gshadow` and `/etc/ssh` always are); a reload "
        "applies to tasks started after it", flag="--task-hidden-path PATH (repeatable)",
        reload=LIVE, default_text="none"),
    Key("rekey_after_s", "float", _seconds_in(1.0, 86400.0), 120.0,
        "encrypted overlays: a new handshake with each peer this often, seconds",
        flag="--rekey-after SECONDS"),
    Key("reject_after_s", "float", _seconds_in(1.0, 86400.0), 180.0,
        "encrypted overlays: keys older than this are refused, seconds (above rekey_after_s)",
        flag="--reject-after SECONDS"),
    Key("overlay_cipher", " | ".join(OVERLAY_CIPHERS), _one_of(OVERLAY_CIPHERS), "aes-256-gcm",
        "encrypted overlays: the record cipher this host proposes (the responder agrees to the "
        "initiator's)", flag="--overlay-cipher CIPHER"),
    # Its reload is decided per key, in MEMBERSHIP.
    Key("membership", "table", _membership, {},
        "overrides of the profile's timings, one key each (the `membership.` rows)",
        reload=LIVE, default_text="the profile's"),
)

# [membership]: overrides of the profile's values (membership/config.py MembershipConfig, whose
# profiles hold the defaults; the docs show each profile's). LIVE ones are read by the core at
# each use; the others are built into state at start (the store's tombstone lifetime comes from
# push_pull_interval and reap_after, reap timers from reap_after, the retransmit limit is
# memoized, packet buffers are sized from udp_payload).
MEMBERSHIP = _table(
    Key("probe_interval", "float", _positive(float), None,
        "time between failure-detection probes, seconds", reload=LIVE),
    Key("probe_timeout", "float", _positive(float), None,
        "wait this long for an ack before asking others to probe (at most probe_interval)",
        reload=LIVE),
    Key("indirect_checks", "int", _positive(int), None,
        "members asked to probe a member that did not answer", reload=LIVE),
    Key("suspicion_mult", "float", _positive(float), None,
        "suspicion timeout = suspicion_mult x log10(n) x probe_interval (suspicions raised "
        "after a reload)", reload=LIVE),
    Key("retransmit_mult", "int", _positive(int), None,
        "each broadcast is sent retransmit_mult x ceil(log10(n + 1)) times"),
    Key("gossip_interval", "float", _positive(float), None,
        "time between gossip rounds, seconds", reload=LIVE),
    Key("gossip_nodes", "int", _positive(int), None,
        "members each gossip round sends to", reload=LIVE),
    Key("push_pull_interval", "float", _positive(float), None,
        "time between full state syncs with one random member, seconds"),
    Key("reap_after", "float", _positive(float), None,
        "dead and left members are forgotten after this long, seconds"),
    Key("reconnect_timeout", "float", _positive(float), None,
        "a member reaped while dead is still retried this long, so a long partition heals",
        reload=LIVE),
    Key("udp_payload", "int", _positive(int), None,
        "largest gossip packet, bytes (keep it below the path MTU)"),
)

_MEMBERSHIP_NAMES = {k: k for k in MEMBERSHIP}
# A [membership] key written at the top level is suggested with its table (TOML's dotted key).
_TOP_LEVEL_NAMES = {**{k: k for k in KEYS}, **{k: f"membership.{k}" for k in MEMBERSHIP}}


def live_keys() -> frozenset[str]:
    """The keys a reload applies, [membership]'s as membership.KEY."""
    top = {k.name for k in KEYS.values() if k.reload == LIVE and k.name != "membership"}
    return frozenset(top | {f"membership.{k.name}" for k in MEMBERSHIP.values()
                            if k.reload == LIVE})


# --- checks that need several keys ------------------------------------------------------------


def membership_timings(config: Config) -> Any:
    """The MembershipConfig the agent runs: the profile with [membership]'s overrides;
    ValueError if they do not fit together (say, probe_timeout above probe_interval)."""
    from meshnet.membership.config import MembershipConfig  # not for meshctl's imports

    return MembershipConfig.profile(config.profile).replace(**config.membership)


def _identity_together(config: Config) -> str | None:
    given = [k for k in ("ca_cert", "node_cert", "node_key") if getattr(config, k)]
    if given and len(given) < 3:
        missing = sorted({"ca_cert", "node_cert", "node_key"} - set(given))
        return f"{missing[0]}: identity needs ca_cert, node_cert and node_key together"
    return None


def _reject_after_rekey(config: Config) -> str | None:
    if config.reject_after_s <= config.rekey_after_s:
        return (f"reject_after_s: {config.reject_after_s:g} must be greater than "
                f"rekey_after_s ({config.rekey_after_s:g})")
    return None


def _membership_fits(config: Config) -> str | None:
    try:
        membership_timings(config)
    except ValueError as e:
        return f"membership: {e}"
    return None


# Each with the keys it reads: a check stands aside when one of them is already wrong.
_CROSS_CHECKS: tuple[tuple[frozenset[str], Callable[[Config], str | None]], ...] = (
    (frozenset({"ca_cert", "node_cert", "node_key"}), _identity_together),
    (frozenset({"rekey_after_s", "reject_after_s"}), _reject_after_rekey),
    (frozenset({"profile", "membership"}), _membership_fits),
)


def _parse_layer(data: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], set[str]]:
    """Every key of one layer: (parsed values, problems, keys the problems are about)."""
    parsed: dict[str, Any] = {}
    problems: list[str] = []
    bad: set[str] = set()
    for key, value in data.items():
        spec = KEYS.get(key)
        if spec is None:
            message, near = _unknown_key(str(key), _TOP_LEVEL_NAMES)
            problems.append(message)
            if near is not None:
                bad.add(near.split(".")[0])  # what was meant is not what was set
            continue
        try:
            parsed[key] = spec.parse(key, value)
        except ConfigError as e:
            problems.extend(e.problems)
            bad |= {key, *e.keys}
    return parsed, problems, bad


def build(layers: Iterable[Mapping[str, Any]], base: Config | None = None) -> Config:
    """LAYERS (the file's keys, then the flags') over BASE, each key checked alone and then
    the keys together. ConfigError lists every problem."""
    parsed: dict[str, Any] = {}
    problems: list[str] = []
    bad: set[str] = set()
    for layer in layers:
        values, layer_problems, layer_bad = _parse_layer(layer)
        parsed.update(values)
        problems += layer_problems
        bad |= layer_bad
    config = replace(base or Config(), **{k: v for k, v in parsed.items() if k not in bad})
    for involved, check in _CROSS_CHECKS:
        if involved & bad:
            continue
        problem = check(config)
        if problem is not None:
            problems.append(problem)
            bad |= involved
    if problems:
        error = ConfigError(problems, bad)
        error.partial = config
        raise error
    return config


def from_mapping(data: Mapping[str, Any], base: Config | None = None) -> Config:
    return build([data], base)

def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a missing or unreadable file is a ConfigError."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: file {str(path)!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config: cannot read {str(path)!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path}: {e}") from None


def load(
    path: str | None, overrides: dict[str, Any], explicit_path: bool = False
) -> Config:
    """File first (the default file may be absent), then flag overrides on top; the keys are
    checked together once both are in, so a flag may complete what the file began."""
    file_data: dict[str, Any] = {}
    target = path or DEFAULT_CONFIG_PATH
    if explicit_path or Path(target).exists():
        file_data = load_file(target)
    return build([file_data, overrides])
