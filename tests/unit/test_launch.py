"""The task launcher's own checks and its setpriv command line (no namespaces needed)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from meshnet.containment import Containment
from meshnet.platform import container, launch


def plan(**over: object) -> dict[str, object]:
    tools = container.Tools(python=sys.executable, setpriv="/usr/bin/setpriv",
                            init="/usr/bin/tini",
                            launcher_id=container.find_tools().launcher_id)
    p = container.build_plan(netns_path="/nonexistent", hostname="t.1", etc_files={},
                             containment=Containment(), hidden=[], env={"PATH": "/bin"},
                             argv=["true"], cgroup_procs=[], tools=tools, user=None)
    p.update(over)
    return p


def run_launcher(stdin: bytes) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-I", "-S", str(container.LAUNCHER)], input=stdin,
                       capture_output=True, timeout=30, check=False)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(),
                                       r.stderr.decode())


def test_a_launcher_that_changed_under_the_agent_refuses_its_plan() -> None:
    r = run_launcher(container.encode_plan(plan(launcher_id="0:0:0:0")))
    assert r.returncode == launch.START_FAILED
    assert "restart meshnetd" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_garbage_on_stdin_is_one_line_and_125() -> None:
    for garbage in (b"{not a plan", b"", container.encode_plan({}) + b"x", b"\xff" * 64):
        r = run_launcher(garbage)
        assert r.returncode == launch.START_FAILED, garbage
        assert r.stderr.startswith("meshnet: task could not be started:") and \
            r.stderr.count("\n") == 1, r.stderr


def test_a_capability_past_the_bounding_set_is_named() -> None:
    p = plan()
    p["cap_bits"] = {"CHOWN": 0, "FUTURE_CAP": 62}  # no kernel has bit 62 in a bounding set
    with pytest.raises(launch.LaunchError, match="FUTURE_CAP"):
        launch.check_ceiling(p)
    launch.check_ceiling(plan())  # Docker's set is within ours


def test_privileges_argv() -> None:
    argv = launch.privileges_argv(plan(argv=["sleep", "1"]))
    assert argv[0] == "/usr/bin/setpriv"
    bounding = next(a for a in argv if a.startswith("--bounding-set="))
    assert bounding.split("=", 1)[1].split(",")[0] == "-all"
    assert sorted(bounding.split(",")[1:]) == sorted(
        f"+{c.lower()}" for c in Containment().caps)
    assert "--no-new-privs" in argv and "--inh-caps=-all" in argv
    assert "--ambient-caps=-all" in argv
    assert not any(a.startswith("--reuid") for a in argv)  # root unless --user
    assert argv[-5:] == ["/usr/bin/tini", "-g", "--", "sleep", "1"]
    user = launch.privileges_argv(plan(user={"uid": 65534, "gid": 65534, "groups": []}))
    assert "--reuid=65534" in user and "--regid=65534" in user and "--clear-groups" in user
    grouped = launch.privileges_argv(plan(user={"uid": 1000, "gid": 1000, "groups": [27, 44]}))
    assert "--groups=27,44" in grouped and "--clear-groups" not in grouped
