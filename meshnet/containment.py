"""How a task is contained: capabilities, user, resource limits and bind mounts, as a service
spec carries them. Pure: parsing, validation and the policy (Docker's defaults); the launcher
(platform/launch.py) and the cgroup code (platform/cgroups.py) carry it out.

Every complaint is a `ContainmentError` with one line fit for `meshctl` to print. The same
checks run twice: on `service create` / `run` (the user's flags) and again on the node that
starts the task (the spec came through the replicated store, so it is hostile until checked).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Linux capability numbers (linux/capability.h), CAP_ prefix dropped.
CAP_NUMBERS: dict[str, int] = {
    name: i for i, name in enumerate((
        "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
        "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
        "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
        "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
        "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
        "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
        "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE"))
}
# Docker's default set (moby oci/caps/defaults.go): what a container gets unless told otherwise.
DEFAULT_CAPS: frozenset[str] = frozenset({
    "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "NET_BIND_SERVICE", "NET_RAW", "SYS_CHROOT", "MKNOD", "AUDIT_WRITE", "SETFCAP",
})
ALL = "ALL"

# Docker refuses memory limits below 6 MB: a process cannot even start under less.
MIN_MEMORY = 6 * 1024 * 1024
MAX_MEMORY = 1 << 50
MAX_CPUS = 1024.0
# pids.max accepts up to PID_MAX_LIMIT (4M on 64-bit).
MAX_PIDS = 4 * 1024 * 1024
MAX_MOUNTS = 16
MAX_PATH = 1024
MAX_CAP_ITEMS = len(CAP_NUMBERS) + 1
# A hostname is one DNS label; longer task names are cut and keep a hash so two stay apart.
MAX_HOSTNAME = 63
HOSTNAME_HASH = 8

# ASCII digits only (\d and float() take any script's), and short: no 400-digit sizes.
_MEMORY_RE = re.compile(r"([0-9]{1,20}(?:\.[0-9]{1,9})?)\s*([kmgtp]?)b?", re.IGNORECASE)
_CPUS_RE = re.compile(r"[0-9]{1,5}(?:\.[0-9]{1,6})?")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_NAME_RE = re.compile(r"[a-z_][a-z0-9_.-]{0,31}\$?")
_ASCII_DIGITS = re.compile(r"[0-9]{1,10}")
MAX_ID = (1 << 32) - 2  # (uid_t)-1 means "unchanged" to the kernel


class ContainmentError(ValueError):
    """A bad containment option; the message is one line naming the option."""


def normalize_cap(text: object, option: str) -> str:
    """"net_admin", "CAP_NET_ADMIN" -> "NET_ADMIN"; "all" -> "ALL"."""
    if not isinstance(text, str):
        raise ContainmentError(f"{option}: capability names are strings")
    if not text.isascii():  # upper() maps some non-ASCII letters onto ASCII ones (long s -> S)
        raise ContainmentError(f"{option}: unknown capability {text!r}")
    name = text.strip().upper().removeprefix("CAP_")
    if name != ALL and name not in CAP_NUMBERS:
        raise ContainmentError(f"{option}: unknown capability {text!r}")
    return name


def effective_caps(add: Iterable[str], drop: Iterable[str]) -> frozenset[str]:
    """Docker's rule: start from the default set (every capability if ALL is added, none if
    ALL is dropped), remove the dropped ones, then add the added ones."""
    adds, drops = set(add), set(drop)
    if ALL in adds:
        caps = set(CAP_NUMBERS)
    elif ALL in drops:
        caps = set()
    else:
        caps = set(DEFAULT_CAPS)
    caps -= drops - {ALL}
    caps |= adds - {ALL}
    return frozenset(caps)


def cap_mask(caps: Iterable[str]) -> int:
    mask = 0
    for c in caps:
        mask |= 1 << CAP_NUMBERS[c]
    return mask


def parse_memory(text: object) -> int:
    """Docker's sizes: 512, 64k, 256M, 1.5g, 2GB (powers of 1024)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    elif isinstance(text, str):
        m = _MEMORY_RE.fullmatch(text.strip()) if len(text) <= 32 and text.isascii() else None
        if not m:
            raise ContainmentError(f"--limit-memory: {text[:40]!r} is not a size like 256M "
                                   "or 1g")
        value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ContainmentError("--limit-memory: give a size like 256M")
    if not MIN_MEMORY <= value <= MAX_MEMORY:
        raise ContainmentError(f"--limit-memory: {text} is outside 6M..1P (Docker's minimum "
                               "is 6 MB)")
    return value


def parse_cpus(text: object) -> float:
    value = float("nan")
    if isinstance(text, str) and _CPUS_RE.fullmatch(text.strip()):
        value = float(text)
    elif isinstance(text, float) or (isinstance(text, int) and not isinstance(text, bool)):
        value = float(text) if abs(text) <= MAX_CPUS else float("inf")
    if not 0.01 <= value <= MAX_CPUS:  # NaN fails too
        raise ContainmentError(f"--limit-cpu: {str(text)[:40]!r} must be a number of CPUs, "
                               "0.01..1024")
    return round(value, 3)


def parse_pids(text: object) -> int:
    if isinstance(text, bool):
        raise ContainmentError("--limit-pids: must be a whole number")
    if isinstance(text, str) and _ASCII_DIGITS.fullmatch(text.strip()):
        text = int(text.strip())
    if not isinstance(text, int) or not 1 <= text <= MAX_PIDS:
        raise ContainmentError(f"--limit-pids: {text!r} must be 1..{MAX_PIDS}")
    return text


def _id_or_name(text: str, what: str) -> int | str:
    if _ASCII_DIGITS.fullmatch(text):
        n = int(text)
        if n > MAX_ID:
            raise ContainmentError(f"--user: {what} {text} is out of range")
        return n
    if _NAME_RE.fullmatch(text):
        return text
    raise ContainmentError(f"--user: {text!r} is not a {what} number or name")


def parse_user(text: object) -> tuple[int | str, int | str | None] | None:
    """"UID[:GID]" (numbers, or names the node resolves); "" or None: root."""
    if text is None or text == "":
        return None
    if not isinstance(text, str) or len(text) > 80:
        raise ContainmentError("--user: give UID[:GID]")
    user, sep, group = text.partition(":")
    if sep and not group:
        raise ContainmentError("--user: give UID[:GID]")
    return _id_or_name(user, "user"), _id_or_name(group, "group") if sep else None


@dataclass(frozen=True)
class Mount:
    """A bind mount of a host path into the task (Docker's --mount type=bind)."""

    source: str
    target: str
    readonly: bool = False

    def to_value(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "readonly": self.readonly}

    def __str__(self) -> str:
        return f"{self.source}:{self.target}" + (":ro" if self.readonly else "")


def _abs_path(text: object, what: str) -> str:
    if not isinstance(text, str) or not text.startswith("/") or len(text) > MAX_PATH or \
            "\0" in text or "\n" in text:
        raise ContainmentError(f"--mount: {what} must be an absolute path")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ContainmentError(f"--mount: {what} {text!r} must not contain '..'")
    return "/" + "/".join(parts)


def parse_mount(text: object) -> Mount:
    """type=bind,source=/a,target=/b[,readonly] (also src=, dst=/destination=, ro)."""
    if isinstance(text, Mapping):
        unknown = set(text) - {"source", "target", "readonly"}
        if unknown:
            raise ContainmentError(f"--mount: unknown key {sorted(map(str, unknown))[0]!r}")
        return Mount(_abs_path(text.get("source"), "source"),
                     _check_target(_abs_path(text.get("target"), "target")),
                     _flag(text.get("readonly", False)))
    if not isinstance(text, str):
        raise ContainmentError("--mount: give type=bind,source=PATH,target=PATH[,readonly]")
    fields: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not key.isascii():
            raise ContainmentError(f"--mount: unknown key {key!r}")
        key = key.strip().lower()
        if key in ("readonly", "ro") and not sep:
            value = "true"
        elif not sep:
            raise ContainmentError(f"--mount: {item!r} is not KEY=VALUE")
        key = {"src": "source", "dst": "target", "destination": "target", "ro": "readonly"}.get(
            key, key)
        if key not in ("type", "source", "target", "readonly"):
            raise ContainmentError(f"--mount: unknown key {key!r} (type, source, target, "
                                   "readonly)")
        fields[key] = value
    if fields.get("type", "bind") != "bind":
        raise ContainmentError("--mount: only type=bind is supported")
    if "source" not in fields or "target" not in fields:
        raise ContainmentError("--mount: needs source= and target=")
    return Mount(_abs_path(fields["source"], "source"),
                 _check_target(_abs_path(fields["target"], "target")),
                 _flag(fields.get("readonly", "false")))


# Mount targets the launcher manages itself; a bind there would undo the containment.
_RESERVED_TARGETS = ("/", "/proc", "/sys", "/dev", "/etc/resolv.conf", "/etc/hosts",
                     "/etc/hostname")


def _check_target(target: str) -> str:
    for r in _RESERVED_TARGETS:
        if target == r or (r != "/" and r in ("/proc", "/sys", "/dev")
                           and target.startswith(r + "/")):
            raise ContainmentError(f"--mount: target {target} is managed by meshnet")
    return target


def _flag(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no"):
        return False
    raise ContainmentError(f"--mount: readonly={value!r} is not true or false")


@dataclass(frozen=True)
class Containment:
    """What one task may do and use. Empty means Docker's defaults: root, the default
    capabilities, no limits, no mounts."""

    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    user: str = ""
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = None
    mounts: tuple[Mount, ...] = field(default_factory=tuple)

    @property
    def caps(self) -> frozenset[str]:
        return effective_caps(self.cap_add, self.cap_drop)

    @property
    def has_limits(self) -> bool:
        return self.memory is not None or self.cpus is not None or self.pids is not None

    def limits(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.memory is not None:
            out["memory"] = self.memory
        if self.cpus is not None:
            out["cpus"] = self.cpus
        if self.pids is not None:
            out["pids"] = self.pids
        return out

    def to_value(self) -> dict[str, Any]:
        """The replicated form (in a service spec); empty fields are left out."""
        out: dict[str, Any] = {}
        if self.cap_add:
            out["cap_add"] = list(self.cap_add)
        if self.cap_drop:
            out["cap_drop"] = list(self.cap_drop)
        if self.user:
            out["user"] = self.user
        out.update(self.limits())
        if self.mounts:
            out["mounts"] = [m.to_value() for m in self.mounts]
        return out

    def summary(self) -> dict[str, Any]:
        """What `service inspect` / `network inspect` show of a task."""
        return {"user": self.user or "0", "capabilities": sorted(self.caps),
                "limits": self.limits(), "mounts": [str(m) for m in self.mounts]}


_CONTAINMENT_KEYS = frozenset({"cap_add", "cap_drop", "user", "memory", "cpus", "pids",
                               "mounts"})


def _cap_list(value: object, option: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)) or len(value) > MAX_CAP_ITEMS:
        raise ContainmentError(f"{option}: give a list of capability names")
    return tuple(sorted({normalize_cap(c, option) for c in value}))


def from_value(value: object) -> Containment:
    """Parse and check the replicated form (also what the control API sends). Anything
    unexpected is a ContainmentError, never another exception."""
    if value is None:
        return Containment()
    if not isinstance(value, Mapping):
        raise ContainmentError("containment: not a mapping")
    unknown = set(value) - _CONTAINMENT_KEYS
    if unknown:
        raise ContainmentError(f"containment: unknown key {sorted(map(str, unknown))[0]!r}")
    user = value.get("user")
    parse_user(user)
    mounts_raw = value.get("mounts") or []
    if not isinstance(mounts_raw, (list, tuple)) or len(mounts_raw) > MAX_MOUNTS:
        raise ContainmentError(f"--mount: at most {MAX_MOUNTS} mounts")
    mounts = tuple(parse_mount(m) for m in mounts_raw)
    targets = [m.target for m in mounts]
    if len(set(targets)) != len(targets):
        raise ContainmentError("--mount: two mounts share a target")
    return Containment(
        cap_add=_cap_list(value.get("cap_add"), "--cap-add"),
        cap_drop=_cap_list(value.get("cap_drop"), "--cap-drop"),
        user=str(user or ""),
        memory=None if value.get("memory") is None else parse_memory(value.get("memory")),
        cpus=None if value.get("cpus") is None else parse_cpus(value.get("cpus")),
        pids=None if value.get("pids") is None else parse_pids(value.get("pids")),
        mounts=mounts,
    )


def from_args(args: Mapping[str, Any]) -> Containment:
    """The control API's flags (`--cap-add`, `--limit-memory`, ...) as meshctl sends them."""
    return from_value({k: v for k, v in {
        "cap_add": args.get("cap_add") or None, "cap_drop": args.get("cap_drop") or None,
        "user": args.get("user") or None, "memory": args.get("limit_memory"),
        "cpus": args.get("limit_cpu"), "pids": args.get("limit_pids"),
        "mounts": args.get("mounts") or None,
    }.items() if v is not None})


def summary_view(value: object) -> dict[str, Any]:
    """The well-typed part of a summary() another node published (endpoints, task rows), for
    display: a peer's odd value is left out, never passed on to `meshctl --json`."""
    if not isinstance(value, Mapping):
        return {}
    out: dict[str, Any] = {}
    user, caps, limits = value.get("user"), value.get("capabilities"), value.get("limits")
    if isinstance(user, str):
        out["user"] = user
    if isinstance(caps, list) and all(isinstance(c, str) for c in caps):
        out["capabilities"] = list(caps)
    if isinstance(limits, Mapping) and all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in limits.items()):
        out["limits"] = dict(limits)
    return out


def describe_caps(caps: Iterable[str]) -> str:
    """Capabilities as a difference from Docker's default set: "default",
    "default+NET_ADMIN-NET_RAW", "none"."""
    have = set(caps)
    if not have:
        return "none"
    added = sorted(have - DEFAULT_CAPS)
    dropped = sorted(DEFAULT_CAPS - have)
    return "default" + "".join(f"+{c}" for c in added) + "".join(f"-{c}" for c in dropped)


def describe_limits(limits: Mapping[str, Any]) -> str:
    """{"memory": 67108864, "cpus": 0.5} -> "memory=64M cpus=0.5"; none -> "-"."""
    parts = []
    for key in ("memory", "cpus", "pids"):
        v = limits.get(key)
        if v is None:
            continue
        if key == "memory" and isinstance(v, int):
            unit = next((u for u in "gmk" if v % _UNITS[u] == 0), "")
            v = f"{v // _UNITS[unit]}{unit.upper()}" if unit else v
        parts.append(f"{key}={v}")
    return " ".join(parts) or "-"


def task_hostname(name: str) -> str:
    """The task's hostname: its name, cut to one DNS label with a hash suffix if too long."""
    if len(name) <= MAX_HOSTNAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:HOSTNAME_HASH]
    return f"{name[:MAX_HOSTNAME - HOSTNAME_HASH - 1]}-{digest}"


def overlaps(path: str, others: Sequence[str]) -> str | None:
    """The first of OTHERS that PATH is, lies inside, or contains; None if none."""
    for o in others:
        o = o.rstrip("/") or "/"
        p = path.rstrip("/") or "/"
        if p == o or p.startswith(o.rstrip("/") + "/") or o.startswith(p.rstrip("/") + "/"):
            return o
    return None
