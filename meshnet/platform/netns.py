"""Named network namespaces through iproute2's `ip netns` (the /run/netns convention).

A thin, synchronous wrapper for harnesses (the lab, netns tests): create, list, delete, run a
command inside, list the processes inside. It knows nothing of meshnet. Every call has a
timeout so a wedged `ip` cannot hang a test run.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")
# `ip` talks netlink to the local kernel; anything slower than this is wedged, not busy.
IP_TIMEOUT_S = 10.0


class NetnsError(Exception):
    """An `ip`/`nft` command failed; the message carries the command and its stderr."""


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is not None:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/bin", "/bin"):
        p = Path(d) / name
        if p.exists():
            return str(p)
    raise NetnsError(f"{name} not found (install iproute2/nftables)")


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = IP_TIMEOUT_S,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a short administrative command, capturing output; raise NetnsError on failure."""
    try:
        proc = subprocess.run(
            list(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"{' '.join(argv)}: timed out after {timeout:g}s") from e
    except OSError as e:
        raise NetnsError(f"{argv[0]}: {e.strerror or e}") from e
    if check and proc.returncode != 0:
        err = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        # nft and ip put the reason on an "Error:" line, then echo the input with a caret.
        detail = next((ln for ln in err if "Error" in ln), err[0] if err else "")
        detail = detail or f"exit {proc.returncode}"
        raise NetnsError(f"{' '.join(argv)}: {detail}")
    return proc


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`ip [-n NS] ARGS...`."""
    argv = [_tool("ip")]
    if ns is not None:
        argv += ["-n", ns]
    return run([*argv, *args], check=check)


def ip_batch(commands: Sequence[str], *, ns: str | None = None) -> None:
    """Several `ip` commands in one process (`ip -batch -`); stops at the first failure."""
    if not commands:
        return
    argv = [_tool("ip")]
    if ns is not None:
        argv += ["-n", ns]
    run([*argv, "-batch", "-"], input="\n".join(commands) + "\n")


def nft(script: str, *, ns: str) -> None:
    """Load an nftables script (`nft -f -`) inside namespace NS."""
    run(exec_argv(ns, [_tool("nft"), "-f", "-"]), input=script)


def list_netns() -> list[str]:
    """Names of the named network namespaces (those under /run/netns)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def add(name: str) -> None:
    ip("netns", "add", name)


def delete(name: str) -> None:
    """Delete NS if it exists. Links inside go with it once no process holds it."""
    if not exists(name):
        return
    proc = ip("netns", "del", name, check=False)
    if proc.returncode != 0 and exists(name):
        raise NetnsError(f"ip netns del {name}: {proc.stderr.strip()}")


def pids(name: str) -> list[int]:
    """Processes whose network namespace is NS (`ip netns pids`)."""
    if not exists(name):
        return []
    proc = ip("netns", "pids", name, check=False)
    out: list[int] = []
    for tok in proc.stdout.split():
        with contextlib.suppress(ValueError):
            out.append(int(tok))
    return out


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """The argv that runs ARGV inside NS (`ip netns exec` execs, so the pid is ARGV's own)."""
    return [_tool("ip"), "netns", "exec", name, *argv]


def exec_in(
    name: str,
    argv: Sequence[str],
    *,
    capture_output: bool = False,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ARGV inside NS; stdio is passed through unless capture_output."""
    return subprocess.run(
        exec_argv(name, argv),
        capture_output=capture_output,
        text=True,
        timeout=timeout,
        env=dict(env) if env is not None else None,
        check=False,
    )
