"""Five real agents on loopback: failure detection, restart, leave, wrong key, key rotation."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from conftest import MESHCTL, AgentProc, wait_for


def states(a: AgentProc) -> dict[str, str]:
    return {n: m["state"] for n, m in a.members().items()}


def all_see(nodes: list[AgentProc], expected: dict[str, str]) -> bool:
    return all({k: v for k, v in states(a).items() if k in expected} == expected
               for a in nodes)


def cluster(agents: Callable[..., AgentProc], key: Path, n: int) -> list[AgentProc]:
    nodes = [agents(key=key) for _ in range(n)]
    nodes[0].start()
    for a in nodes[1:]:
        a.start(join=[nodes[0].addr])
    alive = {a.name: "alive" for a in nodes}
    wait_for(lambda: all_see(nodes, alive), 20, "all members alive everywhere")
    return nodes


def test_five_agents_detect_crash_restart_and_leave(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    nodes = cluster(agents, key_file, 5)
    victim, others = nodes[2], [a for a in nodes if a is not nodes[2]]
    inc_before = victim.members()[victim.name]["incarnation"]

    victim.kill9()
    wait_for(lambda: all_see(others, {victim.name: "dead"}), 30, "others to hold victim dead")

    victim.start(join=[nodes[0].addr])
    wait_for(lambda: all_see(nodes, {a.name: "alive" for a in nodes}), 30, "victim back alive")
    assert all(a.members()[victim.name]["incarnation"] > inc_before for a in others)

    leaver = nodes[4]
    r = leaver.ctl("leave")
    assert r.returncode == 0, r.stderr
    assert leaver.proc is not None and leaver.proc.wait(10) == 0
    rest = nodes[:4]
    wait_for(lambda: all_see(rest, {leaver.name: "left"}), 20, "others to see left")
    # `left` is never mistaken for a failure: it stays left, never dead
    for a in rest:
        assert states(a)[leaver.name] == "left"


def test_node_with_wrong_key_never_appears(agents, key_file, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    nodes = cluster(agents, key_file, 3)
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_text(subprocess.run([MESHCTL, "keys", "generate"], capture_output=True,
                                        text=True).stdout)
    intruder = agents(name="intruder", key=wrong_key).start(join=[nodes[0].addr])
    # it keeps retrying; give it several probe and push-pull rounds
    wait_for(lambda: intruder.ctl_json("status")["gossip"].get("auth_failures", 0) > 0
             or any(a.ctl_json("status")["gossip"].get("auth_failures", 0) for a in nodes),
             10, "authentication failures to be counted")
    for a in nodes:
        assert "intruder" not in a.members()
    assert set(intruder.members()) == {"intruder"}


def test_key_rotation_keeps_five_converged(agents, key_file) -> None:  # type: ignore[no-untyped-def]
    nodes = cluster(agents, key_file, 5)
    old = key_file.read_text().strip()
    new = subprocess.run([MESHCTL, "keys", "generate"], capture_output=True,
                         text=True).stdout.strip()
    for verb, key in (("install", new), ("use", new), ("remove", old)):
        res = nodes[1].ctl_json("keys", verb, key)
        assert res["acked"] == 5 and res["members"] == 5, res
    listing = nodes[3].ctl_json("keys", "list")
    assert listing["keys"] == [{"key": new, "primary": True, "members": 5}]
    # still one converged, alive cluster after the old key is gone everywhere
    nodes[2].kill9()
    others = [a for a in nodes if a is not nodes[2]]
    wait_for(lambda: all_see(others, {nodes[2].name: "dead"}), 30, "detection with new key")
    nodes[2].start()  # its persisted keyring holds the new key only
    wait_for(lambda: all_see(nodes, {a.name: "alive" for a in nodes}), 30, "rejoin with new key")
    r = nodes[0].ctl("keys", "remove", new)
    assert r.returncode == 1 and "primary" in r.stderr
