"""The agent's shell as a user meets it: config errors, the control socket, signals, systemd."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import stat
import struct
import subprocess
import time
from pathlib import Path

import msgpack
from conftest import MESHCTL, MESHNETD, AgentProc, wait_for


def test_meshctl_without_agent_prints_one_line_and_exits_3(tmp_path: Path) -> None:
    sock = tmp_path / "nothing.sock"
    r = subprocess.run([MESHCTL, "--socket", str(sock), "status"], capture_output=True, text=True)
    assert r.returncode == 3
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert lines == [f"meshctl: cannot reach the agent at {sock} (is meshnetd running?)"]


def test_meshctl_usage_error_exits_2(tmp_path: Path) -> None:
    r = subprocess.run([MESHCTL, "service", "scale", "web=x"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "NAME=N" in r.stderr
    r = subprocess.run([MESHCTL, "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2


def test_bad_config_key_is_refused_with_a_line_naming_it(tmp_path: Path) -> None:
    cfg = tmp_path / "meshnet.toml"
    cfg.write_text('name = "a"\nprobe_intervall = 3\n')
    r = subprocess.run([MESHNETD, "--config", str(cfg)], capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 1
    assert r.stderr.strip() == ("meshnetd: unknown key 'probe_intervall' (did you mean "
                                "'membership.probe_interval'?)")


def test_bad_value_and_missing_file_are_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "meshnet.toml"
    cfg.write_text('bind = "not-an-ip:7946"\n')
    r = subprocess.run([MESHNETD, "--check-config", "--config", str(cfg)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "bind" in r.stderr and "not an IP" in r.stderr
    r = subprocess.run([MESHNETD, "--config", str(tmp_path / "absent.toml")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "does not exist" in r.stderr
    cfg.write_text('[membership]\nprobe_interval = -1\n')
    r = subprocess.run([MESHNETD, "--check-config", "--config", str(cfg)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "membership.probe_interval: must be positive" in r.stderr


def test_check_config_accepts_the_example(tmp_path: Path, test_ca) -> None:  # type: ignore[no-untyped-def]
    example = Path(__file__).parents[2] / "deploy" / "meshnet.toml.example"
    test_ca.node_files("node1", tmp_path)
    text = example.read_text().replace("/etc/meshnet/cluster.key", str(tmp_path / "k"))
    text = text.replace("/etc/meshnet/ca.crt", str(test_ca.ca_cert))
    for f in ("node.crt", "node.key"):
        text = text.replace(f"/etc/meshnet/{f}", str(tmp_path / f))
    (tmp_path / "k").write_text(subprocess.run([MESHCTL, "keys", "generate"],
                                               capture_output=True, text=True).stdout)
    cfg = tmp_path / "meshnet.toml"
    cfg.write_text(text)
    r = subprocess.run([MESHNETD, "--check-config", "--config", str(cfg)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_agent_without_key_refuses_to_start(tmp_path: Path) -> None:
    r = subprocess.run([MESHNETD, "--state-dir", str(tmp_path / "s"), "--socket",
                        str(tmp_path / "c.sock"), "--bind", "127.0.0.1:7999"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert "no cluster key" in r.stderr


def test_status_socket_mode_and_json_shape(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    a: AgentProc = agents(key=key_file).start()
    mode = stat.S_IMODE(os.stat(a.socket).st_mode)
    assert mode == 0o600
    st = a.ctl_json("status")
    assert st["name"] == a.name
    assert st["version"]
    assert st["members"] == {"alive": 1, "suspect": 0, "dead": 0, "left": 0}
    assert isinstance(st["datapath"], dict)
    assert st["encryption"] == "aes-256-gcm"
    text = a.ctl("status")
    assert text.returncode == 0 and f"name: {a.name}" in text.stdout


def test_not_yet_available_commands_say_so(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    a: AgentProc = agents(key=key_file).start()
    # this agent runs the control plane only (--datapath none): no sandboxes, no tasks
    r = a.ctl("run", "--network", "appnet", "--", "true")
    assert r.returncode == 1
    assert "not available" in r.stderr


def _raw_request(path: str, payload: bytes, timeout: float = 5) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(payload)
        chunks = []
        while True:
            try:
                c = s.recv(65536)
            except TimeoutError:
                break
            if not c:
                break
            chunks.append(c)
        return b"".join(chunks)


def test_malformed_requests_get_errors_and_the_agent_lives(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    a: AgentProc = agents(key=key_file).start()
    garbage = [
        struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1",         # not msgpack
        struct.pack(">I", 3) + b"[1]",                         # not a map
        struct.pack(">I", 1 << 30),                             # over the size limit
        struct.pack(">I", 12) + b'{"v":99,"o":',               # bad JSON
    ]
    body = msgpack.packb({"v": 99, "op": "status"})
    garbage.append(struct.pack(">I", len(body)) + body)         # wrong version
    for g in garbage:
        reply = _raw_request(a.socket, g)
        (n,) = struct.unpack(">I", reply[:4])
        doc = msgpack.unpackb(reply[4:4 + n]) if reply[4:5] != b"{" else json.loads(reply[4:4 + n])
        assert doc["ok"] is False and doc["error"]
    rng = random.Random(7)
    for _ in range(50):
        _raw_request(a.socket, rng.randbytes(rng.randrange(0, 64)), timeout=0.05)
    assert a.ctl("status").returncode == 0
    assert not a.exited()
    # JSON requests get JSON replies
    req = json.dumps({"v": 1, "op": "status", "args": {}}).encode()
    reply = _raw_request(a.socket, struct.pack(">I", len(req)) + req)
    assert json.loads(reply[4:])["result"]["name"] == a.name


def test_sigterm_exits_gracefully_within_5s(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    a: AgentProc = agents(key=key_file).start()
    t0 = time.monotonic()
    assert a.stop(signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 5
    assert not Path(a.socket).exists()
    logs = a.log.read_text()
    assert "shutting down" in logs
    for line in logs.splitlines():
        json.loads(line)  # --log-format json: every line is a JSON document


def test_systemd_ready_stopping_and_watchdog(agents, key_file, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    notify_path = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(10)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="400000")
    a: AgentProc = agents(key=key_file)
    a.start(env=env)
    got: list[str] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and got.count("WATCHDOG=1") < 3:
        got.append(listener.recv(4096).decode())
    assert any(m.startswith("READY=1") for m in got)
    assert got.count("WATCHDOG=1") >= 3
    a.stop(signal.SIGTERM)
    rest = []
    listener.settimeout(1)
    try:
        while True:
            rest.append(listener.recv(4096).decode())
    except TimeoutError:
        pass
    assert "STOPPING=1" in rest
    listener.close()


def test_sighup_reloads_labels(agents, key_file, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "live.toml"
    cfg.write_text('labels = { zone = "a" }\n')
    a: AgentProc = agents(key=key_file, extra=["--config", str(cfg)])
    a.start()
    assert a.members()[a.name]["labels"] == {"zone": "a"}
    cfg.write_text('labels = { zone = "b" }\nlog_level = "warning"\n')
    assert a.proc is not None
    a.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: a.members()[a.name]["labels"] == {"zone": "b"}, 5, "labels to reload")


def test_kill9_during_state_writes_leaves_a_readable_state_dir(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    """Kill the agent at random moments of its start-up writes; every next start must read."""
    a: AgentProc = agents(key=key_file)
    rng = random.Random(1)
    for _ in range(12):
        a.start(wait=False)
        time.sleep(rng.uniform(0.0, 0.4))
        a.kill9()
    a.start()
    st = a.ctl_json("status")
    boots = json.loads((a.state_dir / "node.json").read_text())["boots"]
    assert st["boots"] == boots >= 1
    leftovers = [p.name for p in a.state_dir.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    # keys rotated while running are persisted too
    new = subprocess.run([MESHCTL, "keys", "generate"], capture_output=True, text=True).stdout
    assert a.ctl("keys", "install", new.strip()).returncode == 0
    a.kill9()
    a.start()
    keys = [k["key"] for k in a.ctl_json("keys", "list")["keys"]]
    assert new.strip() in keys


def test_second_agent_on_same_socket_path_is_clear(agents, key_file, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    a: AgentProc = agents(key=key_file).start()
    b = subprocess.run([MESHNETD, "--state-dir", str(tmp_path / "x"), "--socket", a.socket,
                        "--bind", a.addr, "--cluster-key-file", str(key_file),
                        "--insecure-no-identity"],
                       capture_output=True, text=True, timeout=20)
    assert b.returncode == 1
    last = b.stderr.strip().splitlines()[-1]
    assert last.startswith(f"meshnetd: bind {a.addr}"), b.stderr
    assert "Traceback" not in b.stderr
    assert a.ctl("status").returncode == 0
    wait_for(lambda: not a.exited(), 1, "first agent alive")


# Every drop and refusal of #14 (replays and floods) that a control-plane agent can count, by
# the status section it shows in: a counter that is kept but not shown cannot be watched.
REFUSAL_COUNTERS = {
    "gossip": ("fresh_duplicate", "fresh_too_old", "fresh_old_epoch", "fresh_skew",
               "auth_failures", "answers_bare", "answers_limited", "stale_answers_withheld",
               "relays_refused", "amplification_drops", "stream_head_timeouts",
               "stream_over_cap", "streams_refused_total", "streams_refused_per_source",
               "stream_handler_errors", "push_pulls_over_budget", "decode_cache_clears_bytes"),
    "store": ("refused_invalid", "handler_errors", "refused_skew", "refused_capacity",
              "refused_bytes", "over_budget", "bytes_held"),
    "dns": ("internal_errors", "dns_refresh_errors", "upstream_bad_id", "upstream_bad_source",
            "upstream_bad_question", "upstream_bad_reply", "upstream_owner_overflow",
            "tcp_evicted"),
    "control": ("internal_errors", "bad_requests"),
}


def test_status_shows_every_refusal_counter(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    a: AgentProc = agents(key=key_file).start()
    st = a.ctl_json("status")
    missing = {section: [k for k in keys if not isinstance(st.get(section, {}).get(k), int)]
               for section, keys in REFUSAL_COUNTERS.items()}
    assert not any(missing.values()), missing
