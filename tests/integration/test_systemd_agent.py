"""A real meshnetd under a fake systemd: sd_notify to a NOTIFY_SOCKET the test binds (READY,
RELOADING/READY around a reload, STATUS= with the member count), journald priorities on a
stderr that JOURNAL_STREAM names, and what a reload applies and what it leaves for a restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProc, wait_for


class FakeSystemd:
    """The notify socket's end: every message the agent sent, split into fields."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def wait(self, pred: Callable[[dict[str, str]], bool], timeout: float,
             what: str) -> dict[str, str]:
        """The first message from now on that PRED accepts."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                raw = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            fields = dict(line.split("=", 1) for line in raw.splitlines() if "=" in line)
            self.messages.append(fields)
            if pred(fields):
                return fields
        raise AssertionError(f"no {what} within {timeout}s; got {self.messages[-10:]}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_path / "notify.sock")
    yield fake
    fake.close()


def log_records(agent: AgentProc) -> list[dict[str, Any]]:
    out = []
    for line in agent.log.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_notify_ready_member_count_and_reload(agents, key_file, tmp_path: Path,  # type: ignore[no-untyped-def]
                                              systemd: FakeSystemd) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text('labels = { zone = "a" }\n')
    env = dict(os.environ, NOTIFY_SOCKET=str(systemd.path))
    a: AgentProc = agents(key=key_file, extra=["--config", str(cfg)]).start(env=env)
    ready = systemd.wait(lambda m: m.get("READY") == "1", 10, "READY=1")
    assert ready["STATUS"] == "1 member alive, 0 suspect"

    b: AgentProc = agents(key=key_file).start(join=[a.addr])
    systemd.wait(lambda m: m.get("STATUS") == "2 members alive, 0 suspect", 15,
                 "STATUS= with b alive")
    b.stop()
    systemd.wait(lambda m: m.get("STATUS") == "1 member alive, 0 suspect", 15,
                 "STATUS= after b left")

    cfg.write_text('labels = { zone = "b" }\n')
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert a.proc is not None
    a.proc.send_signal(signal.SIGHUP)
    reloading = systemd.wait(lambda m: "RELOADING" in m, 10, "RELOADING=1")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert reloading["RELOADING"] == "1"
    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
    done = systemd.wait(lambda m: m.get("READY") == "1", 10, "READY=1 after the reload")
    assert done["STATUS"] == "1 member alive, 0 suspect"
    assert a.members()[a.name]["labels"] == {"zone": "b"}  # applied before READY=1


def test_reload_applies_live_keys_and_names_the_others(agents, key_file, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "a.toml"
    cfg.write_text('labels = { zone = "a" }\n[membership]\nreap_after = 20.0\n')
    a: AgentProc = agents(key=key_file, extra=["--config", str(cfg)]).start()
    b: AgentProc = agents(key=key_file).start(join=[a.addr])
    wait_for(lambda: a.name in b.members(), 15, "b to see a")
    assert a.proc is not None

    cfg.write_text('labels = { zone = "b" }\nsandbox_prefix = "zz"\n'
                   '[membership]\nreap_after = 40.0\nprobe_interval = 0.4\n')
    a.proc.send_signal(signal.SIGHUP)
    # live: our own view at once, and b's through gossip (a re-announced its metadata)
    wait_for(lambda: a.members()[a.name]["labels"] == {"zone": "b"}, 10, "labels on a")
    wait_for(lambda: b.members().get(a.name, {}).get("labels") == {"zone": "b"}, 15,
             "labels gossiped to b")
    records = wait_for(lambda: [r for r in log_records(a)
                                if r.get("msg") == "configuration reloaded"], 10,
                       "the reload's summary line")
    assert records[-1]["applied"] == "labels,membership.probe_interval"
    assert records[-1]["restart_needed"] == "sandbox_prefix,membership.reap_after"
    warnings = [r["msg"] for r in log_records(a) if r.get("level") == "warning"
                and r["msg"].startswith("reload:")]
    assert warnings == ["reload: sandbox_prefix, membership.reap_after changed but need a "
                        "restart; running with the old value until then"]

    # A file that does not parse changes nothing, and says why.
    cfg.write_text('labels = 3\nlog_level = "loud"\n')
    a.proc.send_signal(signal.SIGHUP)
    refused = wait_for(lambda: [r for r in log_records(a)
                                if r.get("msg", "").startswith("reload refused")], 10,
                       "the refusal")
    assert refused[-1]["msg"] == (
        "reload refused, nothing changed: labels: expected dict, got int; "
        "log_level: 'loud' is not one of debug, info, warning, error")
    assert a.members()[a.name]["labels"] == {"zone": "b"}
    assert a.ctl("status").returncode == 0


def test_journald_priorities_when_stderr_is_the_journal(agents, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "a.toml"
    cfg.write_text('labels = { zone = "a" }\n')
    # --insecure-no-encryption: a warning at start
    a: AgentProc = agents(key=None, extra=["--config", str(cfg)])
    a.log.touch()
    st = os.stat(a.log)
    a.start(env=dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"))
    plain: AgentProc = agents(key=None).start()  # no JOURNAL_STREAM: lines as they were
    wait_for(lambda: "serving" in a.log.read_text(), 10, "the agent's start line")
    cfg.write_text("labels = 3\n")  # an error line: the reload is refused
    assert a.proc is not None
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in a.log.read_text(), 10, "the refused reload")
    a.stop()
    plain.stop()
    lines = [line for line in a.log.read_text().splitlines() if line]
    assert lines and all(line[:3] in ("<2>", "<3>", "<4>", "<6>", "<7>") for line in lines), \
        lines[:5]
    by_msg = {json.loads(line[3:])["msg"]: line[:3] for line in lines}
    assert by_msg[next(m for m in by_msg if m.startswith("GOSSIP IS NOT ENCRYPTED"))] == "<4>"
    assert by_msg[next(m for m in by_msg if m.startswith("meshnetd ") and "serving" in m)] \
        == "<6>"
    assert by_msg[next(m for m in by_msg if m.startswith("reload refused"))] == "<3>"
    assert not any(line.startswith("<") for line in plain.log.read_text().splitlines())
