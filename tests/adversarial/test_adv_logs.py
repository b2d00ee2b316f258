"""Adversarial `service logs` (issue #14, "Names and logs"), on a real lab (root).

The service name asked for is matched literally against the task log files
(`<service>.<slot>.log` in the agent's log directory), never used as a path or a glob: not by
`meshctl service logs`, and not by the agent-to-agent STREAM_LOGS request that gathers logs
from the other hosts (asked here as a peer holding the cluster key would).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from conftest import Cluster, wait

from meshnet.agent.gossip import STREAM_LOGS, GossipTransport, Sealer, StreamError
from meshnet.crypto.keyring import Keyring
from meshnet.lab.lab import GOSSIP_PORT
from meshnet.platform import nsfd

pytestmark = pytest.mark.netns

SECRET = "adv-logs-secret-7f3a"
WEB_LINE = "adv-logs-web-output"


def stream_logs_request(c: Cluster, host: str, name: object) -> dict[str, Any] | None:
    """Ask HOST's agent for the logs of NAME over STREAM_LOGS, as a peer holding the cluster
    key would: from inside HOST's namespace, through the agent's own stream client (a bare
    GossipTransport: `request` uses only its sealer). None: the agent sent no reply."""
    client = object.__new__(GossipTransport)
    client.sealer = Sealer(Keyring.from_key_file(c.lab.key_path))
    addr = (c.lab.underlay_ip(host), GOSSIP_PORT)
    body = bytes(msgpack.packb(name))

    async def ask() -> bytes | None:
        try:
            return await client.request(addr, STREAM_LOGS, body)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, StreamError):
            return None

    raw = nsfd.call_in_netns(c.lab.host_ns(host), lambda: asyncio.run(ask()))
    if raw is None:
        return None
    doc = msgpack.unpackb(raw, raw=False)
    assert isinstance(doc, dict), doc
    return doc


def leaked(doc: dict[str, Any] | None) -> list[str]:
    """The task names of a STREAM_LOGS reply (empty when refused or nothing matched)."""
    if doc is None:
        return []
    return sorted(doc.get("logs") or {})


def test_logs_never_leave_the_log_dir(cluster: Callable[[int], Cluster],
                                      tmp_path: Path) -> None:
    c = cluster(1)
    c.network("advlogs")
    r = c.ctl("h1", "service", "create", "web", "--network", "advlogs", "--",
              "sh", "-c", f"echo {WEB_LINE}; exec sleep 600")
    assert r.returncode == 0, r.stderr
    state = c.lab.host_dir("h1") / "state"
    log_dir = state / "logs"
    wait(lambda: (log_dir / "web.1.log").exists() and
         WEB_LINE in (log_dir / "web.1.log").read_text(), 40, "web.1's log")

    # Files outside the log directory that a path-or-glob reading would reach.
    (state / "leak.1.log").write_text(f"{SECRET} state\n")
    (tmp_path / "leak.1.log").write_text(f"{SECRET} tmp\n")
    up = "/".join([".."] * (len(log_dir.parts) - 1))  # from the log dir to /
    outside = ["../leak", f"{up}{tmp_path}/leak", f"{up}/{tmp_path}/leak",
               str(tmp_path / "leak"), "../*", "../le?k", "../[l]eak", "..", "."]
    # Glob forms that stay inside the log directory but are not the service asked for.
    globs = ["*", "w*", "we?", "[w]eb", "**", "**/*", "web.*", "web*"]
    # Non-ASCII, newline and oversized forms of a real name.
    odd = ["web\n", "w\u0435b", "web" + "x" * 250, ""]

    # The agent-to-agent request: the same names give no task log at all.
    for name in outside + globs + odd:
        doc = stream_logs_request(c, "h1", name)
        assert leaked(doc) == [], (name, doc)
        assert SECRET not in json.dumps(doc), (name, doc)
    for name in (1, None, ["web"], {"web": 1}, b"web"):  # not a string
        assert leaked(stream_logs_request(c, "h1", name)) == [], name

    # meshctl: refused (exit 1, one line), nothing printed.
    for name in outside + globs + odd:
        if not name:
            continue
        r = c.ctl("h1", "service", "logs", name)
        assert r.returncode == 1, (name, r.stdout, r.stderr)
        assert r.stdout == "" and len(r.stderr.splitlines()) == 1, (name, r.stdout, r.stderr)
        assert SECRET not in r.stdout + r.stderr

    # The real name still works, both ways, and reads only its own task's log.
    r = c.ctl("h1", "service", "logs", "web")
    assert r.returncode == 0 and f"web.1 | {WEB_LINE}" in r.stdout, (r.stdout, r.stderr)
    assert SECRET not in r.stdout
    doc = stream_logs_request(c, "h1", "web")
    assert leaked(doc) == ["web.1"] and WEB_LINE in doc["logs"]["web.1"], doc  # type: ignore[index]
