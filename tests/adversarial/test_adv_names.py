"""Adversarial names (issue #14, "Names and logs"), on a real lab (root).

- Two tasks whose names differ only past the point where a namespace name used to be cut
  (`<60-char service>.1` and `.10`) each get a namespace of their own.
- Names with non-ASCII digits or a trailing newline are refused with one line by
  `meshctl service create`, `meshctl run --name`, `meshctl network create`, `meshctl service
  logs`, and the agent's own config (`meshnetd --check-config --name/--sandbox-prefix/--label`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, wait

from meshnet.platform import nsfd

pytestmark = pytest.mark.netns

MESHNETD = str(Path(sys.executable).parent / "meshnetd")
LONG = "svc" + "x" * 57  # 60 characters: a valid DNS label, too long for the old cut
assert len(LONG) == 60

# Non-ASCII digits (Arabic-Indic, Devanagari, fullwidth, superscript), letters that casefold
# to ASCII (Kelvin sign, long s), and trailing/embedded line ends.
BAD_NAMES = ["svc\u0661", "svc\u0967", "svc\uff11", "svc\u00b2", "\u212aelvin", "\u017fvc",
             "svc\n", "svc\r", "svc\nx", "svc\x00"]


def ps(c: Cluster, host: str, service: str) -> list[dict[str, Any]]:
    r = c.ctl(host, "--json", "service", "ps", service)
    return json.loads(r.stdout) if r.returncode == 0 else []


def running(c: Cluster, host: str, service: str) -> dict[int, dict[str, Any]]:
    return {int(t["slot"]): t for t in ps(c, host, service) if t["state"] == "running"}


def test_long_service_tasks_get_distinct_namespaces(
        cluster: Callable[[int], Cluster]) -> None:
    c = cluster(1)
    c.network("advnames")
    # Every task prints the identity of the network namespace it runs in, then stays up.
    r = c.ctl("h1", "service", "create", LONG, "--network", "advnames", "--replicas", "10",
              "--", "sh", "-c", "echo netns=$(readlink /proc/self/ns/net); exec sleep 600")
    assert r.returncode == 0, r.stderr
    wait(lambda: len(running(c, "h1", LONG)) == 10, 60,
         lambda: f"10 tasks of {LONG} running (ps: {ps(c, 'h1', LONG)})")
    tasks = running(c, "h1", LONG)
    assert tasks[1]["ip"] != tasks[10]["ip"]

    # One namespace per task on the host, each name within nsfd's limit.
    sandboxes = nsfd.list_netns(f"{c.lab.sandbox_prefix}-")
    assert len(sandboxes) == 10, sandboxes
    assert all(len(n) <= 64 for n in sandboxes), sandboxes

    # ... and each task really lives in a different one (its own view of /proc/self/ns/net).
    def seen() -> dict[str, str]:
        out = c.ctl("h1", "service", "logs", LONG).stdout
        ns: dict[str, str] = {}
        for line in out.splitlines():
            task, _, text = line.partition(" | ")
            if text.startswith("netns="):
                ns[task] = text
        return ns

    ns = wait(lambda: s if len(s := seen()) == 10 else None, 20, "every task's netns line")
    assert ns[f"{LONG}.1"] != ns[f"{LONG}.10"], ns
    assert len(set(ns.values())) == 10, ns
    # Still all ten, none killed by a sibling's start-up in a shared namespace.
    assert sorted(running(c, "h1", LONG)) == list(range(1, 11))


def test_non_ascii_and_newline_names_refused(cluster: Callable[[int], Cluster]) -> None:
    c = cluster(1)
    c.network("advbad")
    for name in BAD_NAMES:
        if "\x00" in name:
            continue  # not expressible as a command-line argument
        r = c.ctl("h1", "service", "create", name, "--network", "advbad", "--", "true")
        assert r.returncode == 1, (name, r.stdout, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and "name" in r.stderr, (name, r.stderr)
        r = c.ctl("h1", "run", "--network", "advbad", "--name", name, "--", "true")
        assert r.returncode == 1, (name, r.stdout, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and "name" in r.stderr, (name, r.stderr)
        r = c.ctl("h1", "network", "create", name)
        assert r.returncode == 1, (name, r.stdout, r.stderr)
        assert len(r.stderr.splitlines()) == 1, (name, r.stderr)
        r = c.ctl("h1", "service", "logs", name)
        assert r.returncode == 1 and r.stdout == "", (name, r.stdout, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and "name" in r.stderr, (name, r.stderr)
    assert json.loads(c.ctl("h1", "--json", "service", "ls").stdout) == []
    names = [n["name"] for n in json.loads(c.ctl("h1", "--json", "network", "ls").stdout)]
    assert names == ["advbad"], names


def check_config(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MESHNETD, "--check-config", "--config", "/dev/null",
                           "--insecure-no-identity", "--insecure-no-encryption", *flags],
                          capture_output=True, text=True, timeout=30)


def test_agent_config_names_refused() -> None:
    """The node name and sandbox prefix end up in namespace, cgroup and file names."""
    ok = check_config("--name", "node1", "--sandbox-prefix", "mns")
    assert ok.returncode == 0, ok.stderr
    for name in BAD_NAMES:
        if "\x00" in name:
            continue
        for flags in (["--name", name], ["--sandbox-prefix", name],
                      ["--label", f"{name}=v"]):
            r = check_config(*flags)
            assert r.returncode == 1, (flags, r.stdout, r.stderr)
            # one line for the one mistake (the insecure modes add warning lines, #16)
            errors = [line for line in r.stderr.splitlines()
                      if not line.startswith("meshnetd: warning: ")]
            assert len(errors) == 1, (flags, r.stderr)
