"""systemd/meshnet.service: systemd itself accepts it, and it keeps the directives we rely on.

`systemd-analyze verify` is the judge of syntax. It exits 0 even for unknown keys (it only
warns), so the test also fails on any warning about the unit. It refuses a unit whose ExecStart
binary does not exist, so it checks a copy whose ExecStart points at a stub in tmp_path (the
unit as deploy/install.sh installs it, with the real ExecStart, is verified by
tests/netns/test_install.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from meshnet.containment import DEFAULT_CAPS

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "meshnet.service"
EXAMPLE_CONFIG = ROOT / "deploy" / "meshnet.toml.example"
# deploy/install.sh's default PREFIX is /opt/meshnet, a venv whose bin/ holds meshnetd.
INSTALLED_MESHNETD = "/opt/meshnet/bin/meshnetd"
EXEC_START = f"{INSTALLED_MESHNETD} --config /etc/meshnet/meshnet.toml"
# Where deploy/install.sh puts its copies of the repository's documents.
INSTALLED_DOCS = "/opt/meshnet/share/doc/meshnet/"
# The agent's own, the launcher's (SETPCAP SETUID SETGID MKNOD) and Docker's default set for tasks.
AGENT_CAPS = {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_ADMIN", "CAP_NET_BIND_SERVICE", "CAP_KILL"}
LAUNCHER_CAPS = {"CAP_SETPCAP", "CAP_SETUID", "CAP_SETGID", "CAP_MKNOD"}
CAPS = AGENT_CAPS | LAUNCHER_CAPS | {f"CAP_{c}" for c in DEFAULT_CAPS}

# What systemd prints about a unit it does not fully accept.
BAD_OUTPUT = re.compile(
    r"unknown|failed|invalid|ignoring|not executable|bad|error|missing|deprecated|"
    r"unsupported|not allowed|no such",
    re.IGNORECASE,
)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """[section] -> key -> every value assigned (a key may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        assert "=" in line, f"not a directive: {line!r}"
        assert not line.endswith("\\"), "keep directives on one line"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(
            "systemd-analyze is not installed; run `make test` (deploy/bootstrap.sh installs "
            "the systemd package) or `apt-get install systemd`"
        )
    return path


def verify(unit_text: str, tmp_path: Path) -> tuple[int, str]:
    """Run `systemd-analyze verify` on a copy of the unit whose binaries exist."""
    stub = tmp_path / "meshnetd"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copied = unit_text.replace(f"ExecStart={INSTALLED_MESHNETD} ", f"ExecStart={stub} ")
    assert copied != unit_text, f"ExecStart={INSTALLED_MESHNETD} not found in the unit"
    unit_dir = tmp_path / "units"
    unit_dir.mkdir(exist_ok=True)
    unit = unit_dir / "meshnet.service"
    unit.write_text(copied)
    env = dict(os.environ, SYSTEMD_LOG_LEVEL="notice", SYSTEMD_LOG_COLOR="0")
    proc = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


def problems(returncode: int, output: str) -> list[str]:
    bad = [line for line in output.splitlines() if "meshnet" in line or BAD_OUTPUT.search(line)]
    if returncode != 0:
        bad.insert(0, f"systemd-analyze verify exited {returncode}")
    return bad


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    returncode, output = verify(UNIT.read_text(), tmp_path)
    assert problems(returncode, output) == [], output


@pytest.mark.parametrize(
    ("mutation", "why"),
    [
        (("NoNewPrivileges=yes", "NoNewPrivilegez=yes"), "unknown key"),
        (("Type=notify", "Type=notifyy"), "bad value"),
        (("[Service]", "[Servise]"), "unknown section"),
        (("SystemCallFilter=@system-service ", "SystemCallFilter=@system-servise "),
         "unknown system call group"),
        (("TasksMax=", "TasksMax=x"), "bad number"),
    ],
)
def test_verify_catches_broken_units(tmp_path: Path, mutation: tuple[str, str], why: str) -> None:
    """The check above is not vacuous: a broken copy of the unit is reported."""
    old, new = mutation
    text = UNIT.read_text()
    assert old in text
    returncode, output = verify(text.replace(old, new, 1), tmp_path)
    assert problems(returncode, output), f"{why} not reported: {output!r}"


def test_required_directives() -> None:
    unit = parse_unit(UNIT.read_text())
    service = unit["Service"]

    def one(key: str) -> str:
        values = service.get(key, [])
        assert len(values) == 1, f"{key}= must be set exactly once, got {values}"
        return values[0]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("WatchdogSec") == "30s"
    assert one("ExecStart") == EXEC_START
    assert one("Restart") == "on-failure"
    assert one("RestartSec") == "2s"
    assert one("TimeoutStopSec") == "10s"
    assert one("KillMode") == "mixed"
    assert one("Delegate") == "yes"  # task cgroups below the unit's
    assert one("StateDirectory") == "meshnet"
    assert one("StateDirectoryMode") == "0700"
    assert one("RuntimeDirectory") == "meshnet"
    assert one("RuntimeDirectoryMode") == "0700"
    assert one("ConfigurationDirectory") == "meshnet"
    assert one("ConfigurationDirectoryMode") == "0700"  # as deploy/install.sh makes it
    # systemctl reload: SIGHUP, which the agent answers with RELOADING=1, then READY=1.
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("ProtectKernelLogs") == "yes"
    assert one("SystemCallErrorNumber") == "EPERM"
    assert set(one("SystemCallFilter").split()) == {"@system-service", "@mount", "sethostname",
                                                    "bpf"}
    assert 1024 <= int(one("TasksMax")) < 32768  # room for tasks, below the default pid_max
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("ProtectHome") == "yes"
    assert one("PrivateTmp") == "yes"
    assert one("ProtectKernelModules") == "yes"
    assert set(one("RestrictAddressFamilies").split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
        "AF_PACKET",
    }
    assert set(one("CapabilityBoundingSet").split()) == CAPS
    assert set(one("AmbientCapabilities").split()) == CAPS
    rw = " ".join(service.get("ReadWritePaths", [])).split()
    assert {p.lstrip("-") for p in rw} >= {"/run/netns", "/var/run/netns"}
    # Left off on purpose (see the comments in the unit): these would break the agent.
    for key in ("ProtectControlGroups", "PrivateDevices", "ProtectKernelTunables", "User",
                "ProtectHostname"):
        assert key not in service, f"{key}= would break the agent; see the unit's comments"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_documentation_is_installed_copies_of_repository_files() -> None:
    docs = " ".join(parse_unit(UNIT.read_text())["Unit"]["Documentation"]).split()
    assert docs
    for url in docs:
        prefix = f"file://{INSTALLED_DOCS}"
        assert url.startswith(prefix), f"{url}: not a copy deploy/install.sh installs"
        assert (ROOT / url.removeprefix(prefix)).is_file(), f"{url}: no such repository file"


def syscall_filter(*items: str) -> set[str]:
    """The system calls systemd allows for ITEMS (names and @groups, expanded)."""
    proc = subprocess.run([systemd_analyze(), "syscall-filter", "--no-pager"],
                          capture_output=True, text=True, timeout=60, check=True)
    groups: dict[str, list[str]] = {}
    members: list[str] = []
    for line in proc.stdout.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif line.strip() and not line.lstrip().startswith("#"):
            members.append(line.strip())

    def expand(names: list[str]) -> set[str]:
        return set().union(*(expand(groups[n]) if n.startswith("@") else {n} for n in names))

    return expand(list(items))


# A call of a libc function through ctypes (`_libc.mount(`, `c.unshare(`, `_c().setns(`) or of
# an os function, and a raw system call's number constant (`SYS_BPF = ...`).
LIBC_CALL = re.compile(r"\b(?:_?libc|c|_c\(\))\.(\w+)\(")
OS_CALL = re.compile(r"\bos\.(\w+)\(")
SYS_NUMBER = re.compile(r"^SYS_(\w+)\s*=", re.MULTILINE)


def test_the_syscall_filter_allows_every_call_the_agent_and_launcher_make() -> None:
    """Nothing runs the agent under systemd in the tests, so a system call outside the filter
    would first fail (EPERM) on a real host: every system call the code names (through ctypes,
    os or a raw number) must be allowed. ip, nft, setpriv and tini make the same kinds of calls
    (setns, unshare, mount, capset, setresuid, prctl)."""
    known = syscall_filter("@known")
    allowed = syscall_filter(*parse_unit(UNIT.read_text())["Service"]["SystemCallFilter"][0]
                             .split())
    called: dict[str, set[str]] = {}
    for path in sorted((ROOT / "meshnet").rglob("*.py")):
        text = path.read_text()
        names = set(OS_CALL.findall(text)) | {n.lower() for n in SYS_NUMBER.findall(text)}
        if "ctypes" in text:  # libc's syscall() is no call itself: its SYS_ number names it
            names |= set(LIBC_CALL.findall(text)) - {"syscall"}
        for name in names & known:
            called.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    # The scan finds what it should (else it proves nothing).
    assert {"mount", "umount2", "setns", "unshare", "sethostname", "mount_setattr", "bpf",
            "mknod", "prctl"} <= called.keys()
    refused = {name: sorted(where) for name, where in called.items() if name not in allowed}
    assert refused == {}, f"add these to SystemCallFilter= (with a comment): {refused}"
    # And the filter is not everything: it does refuse what nothing here needs.
    assert not {"ptrace", "kexec_load", "swapon", "init_module", "reboot"} & allowed


def test_example_config_parses_and_matches_the_unit() -> None:
    config = tomllib.loads(EXAMPLE_CONFIG.read_text())
    assert config["insecure_no_encryption"] is False
    assert config["state_dir"] == "/var/lib/meshnet"  # StateDirectory=meshnet
    assert config["socket"].startswith("/run/meshnet/")  # RuntimeDirectory=meshnet
    assert config["cluster_key_file"].startswith("/etc/meshnet/")  # ConfigurationDirectory
    assert config["insecure_no_identity"] is False
    for key in ("ca_cert", "node_cert", "node_key"):
        assert config[key].startswith("/etc/meshnet/")
    assert config["profile"] in {"lan", "lan-fast", "wan"}
    assert isinstance(config["membership"], dict)
