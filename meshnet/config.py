"""Agent configuration: a TOML file, overridden by command-line flags, validated up front.

Every problem is reported as one `ConfigError` whose message names the key and the reason, so
`meshnetd` can refuse to start with a single readable line instead of failing later.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/meshnet/meshnet.toml"
DEFAULT_STATE_DIR = "/var/lib/meshnet"
DEFAULT_SOCKET = "/run/meshnet/meshnet.sock"
DEFAULT_PORT = 7946
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

# Overrides of the membership profile that a config file may carry, with their types.
MEMBERSHIP_KEYS: dict[str, type] = {
    "probe_interval": float,
    "probe_timeout": float,
    "indirect_checks": int,
    "suspicion_mult": float,
    "retransmit_mult": int,
    "gossip_interval": float,
    "gossip_nodes": int,
    "push_pull_interval": float,
    "reap_after": float,
    "reconnect_timeout": float,
    "udp_payload": int,
}


class ConfigError(ValueError):
    """A bad configuration value: the message names the key and says why."""


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


def _parse_key(cfg: dict[str, Any], key: str, value: object) -> None:
    """Validate one top-level key and store its parsed value in cfg."""
    if key == "name":
        text = _expect(key, value, str)
        if not _NAME_RE.fullmatch(text):
            raise ConfigError(f"name: {text[:80]!r} must be a DNS label (ASCII letters, "
                              "digits, -_.)")
        cfg[key] = text
    elif key == "bind":
        cfg[key] = parse_hostport(key, value, DEFAULT_PORT)
    elif key == "advertise":
        text = _expect(key, value, str)
        if text:
            try:
                ipaddress.ip_address(text)
            except ValueError:
                raise ConfigError(f"advertise: {text!r} is not an IP address") from None
        cfg[key] = text
    elif key == "dns_ttl":
        ttl = _expect(key, value, int)
        if not 0 <= ttl <= 3600:
            raise ConfigError(f"{key}: must be 0..3600 seconds")
        cfg[key] = ttl
    elif key == "address_pool":
        text = _expect(key, value, str)
        try:
            pool = ipaddress.IPv4Network(text)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
        if pool.prefixlen > 24:
            raise ConfigError(f"{key}: {text} is smaller than one /24")
        cfg[key] = text
    elif key in ("join", "dns_listen", "dns_upstreams"):
        items = _expect(key, value, list)
        port = DEFAULT_PORT if key == "join" else 53
        cfg[key] = tuple(parse_hostport(f"{key}[{i}]", v, port) for i, v in enumerate(items))
    elif key in ("state_dir", "socket", "cluster_key_file", "ca_cert", "node_cert", "node_key"):
        text = _expect(key, value, str)
        if key in ("state_dir", "socket") and not text:
            raise ConfigError(f"{key}: must not be empty")
        if "\0" in text or "\n" in text:
            raise ConfigError(f"{key}: not a file path")
        cfg[key] = text
    elif key in ("insecure_no_encryption", "insecure_no_identity"):
        cfg[key] = _expect(key, value, bool)
    elif key == "labels":
        table = _expect(key, value, dict)
        cfg[key] = dict(_check_label(key, k, v) for k, v in table.items())
    elif key == "log_format":
        cfg[key] = _choice(key, value, LOG_FORMATS)
    elif key == "log_level":
        cfg[key] = _choice(key, value, LOG_LEVELS)
    elif key == "sandbox_prefix":
        text = _expect(key, value, str)
        if not _SANDBOX_PREFIX_RE.fullmatch(text):
            raise ConfigError(f"{key}: {text[:80]!r} must be 1-24 of [A-Za-z0-9_.-]")
        cfg[key] = text
    elif key == "task_hidden_paths":
        items = _expect(key, value, list)
        paths = []
        for i, item in enumerate(items):
            text = _expect(f"{key}[{i}]", item, str)
            if not text.startswith("/") or "\0" in text or "\n" in text:
                raise ConfigError(f"{key}[{i}]: {text!r} is not an absolute path")
            paths.append(text)
        cfg[key] = tuple(paths)
    elif key == "datapath":
        cfg[key] = _choice(key, value, DATAPATHS)
    elif key == "overlay_cipher":
        cfg[key] = _choice(key, value, OVERLAY_CIPHERS)
    elif key == "profile":
        cfg[key] = _choice(key, value, PROFILES)
    elif key in ("rekey_after_s", "reject_after_s"):
        seconds = _expect(key, value, float)
        if not 1.0 <= seconds <= 86400.0:
            raise ConfigError(f"{key}: must be 1..86400 seconds")
        cfg[key] = seconds
    elif key == "membership":
        table = _expect(key, value, dict)
        parsed: dict[str, float | int] = {}
        for k, v in table.items():
            full = f"membership.{k}"
            if k not in MEMBERSHIP_KEYS:
                raise ConfigError(f"{full}: unknown key")
            number = _expect(full, v, MEMBERSHIP_KEYS[k])
            if number <= 0:
                raise ConfigError(f"{full}: must be positive")
            parsed[k] = number
        cfg[key] = parsed
    else:
        raise ConfigError(f"{key}: unknown key")


def from_mapping(data: dict[str, Any], base: Config | None = None) -> Config:
    parsed: dict[str, Any] = {}
    for key, value in data.items():
        _parse_key(parsed, key, value)
    config = replace(base or Config(), **parsed)
    given = [k for k in ("ca_cert", "node_cert", "node_key") if getattr(config, k)]
    if given and len(given) < 3:
        missing = sorted({"ca_cert", "node_cert", "node_key"} - set(given))
        raise ConfigError(f"{missing[0]}: identity needs ca_cert, node_cert and node_key together")
    if config.reject_after_s <= config.rekey_after_s:
        raise ConfigError(f"reject_after_s: {config.reject_after_s:g} must be greater than "
                          f"rekey_after_s ({config.rekey_after_s:g})")
    return config


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
    """File first (the default file may be absent), then flag overrides on top."""
    file_data: dict[str, Any] = {}
    target = path or DEFAULT_CONFIG_PATH
    if explicit_path or Path(target).exists():
        file_data = load_file(target)
    config = from_mapping(file_data)
    return from_mapping(overrides, base=config)
