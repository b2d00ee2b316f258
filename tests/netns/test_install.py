"""deploy/install.sh and --uninstall on this host's real paths, inside a mount namespace (root).

The test runs this file again as a script in a fresh mount namespace (`unshare --mount
--propagation private`). There /opt, /etc and /usr are overlays whose upper layers live on one
scratch tmpfs, so every write the install makes anywhere under them lands on the tmpfs and shows
in the upper layers, and the host never sees it; all of it vanishes with the namespace's last
process. python3-venv is made to look missing by an empty tmpfs over Debian's ensurepip, which a
fake apt-get on PATH takes away when asked to install python3-venv; a fake systemctl records
what it is asked. The script runs from a copy of the checkout on the tmpfs (taken first, so
edits to the working tree meanwhile do not count as changes). Then, with the DEFAULT
locations: install, install again (a no-op), uninstall
(with systemd made to look running), uninstall again; then once more with every location
moved by environment. The script prints what it saw as JSON; the test judges it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import meshnet

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
# What install.sh reads of its checkout; the test installs from a copy taken at its start, so an
# edit to the working tree meanwhile cannot make the second install differ from the first.
CHECKOUT = ("pyproject.toml", "README.md", "LICENSE", "meshnet", "deploy", "systemd", "docs")
OVERLAID = ("/opt", "/etc", "/usr")  # every default location lies under one of these
SYSTEMD_RUN = Path("/run/systemd")  # a tmpfs over it, then system/ in it: "systemd is running"
STD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULTS = {
    "PREFIX": "/opt/meshnet",
    "BINDIR": "/usr/local/bin",
    "UNITDIR": "/etc/systemd/system",
    "BASH_COMPLETIONS": "/usr/share/bash-completion/completions",
    "ZSH_COMPLETIONS": "/usr/share/zsh/vendor-completions",
}
MOVED = {
    "PREFIX": "/opt/meshnet-moved",
    "BINDIR": "/usr/local/sbin",
    "UNITDIR": "/usr/local/lib/systemd/system",
    "BASH_COMPLETIONS": "/usr/local/share/bash-completion/completions",
    "ZSH_COMPLETIONS": "/usr/local/share/zsh/site-functions",
}


# ---- inside the namespace ----------------------------------------------------------------------


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
    return {"rc": proc.returncode, "out": proc.stdout, "err": proc.stderr,
            "seconds": round(time.monotonic() - started, 1)}


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


def upper_layers(scratch: Path) -> dict[str, list[Any]]:
    """Every entry in the overlays' upper layers: what was written under OVERLAID, with enough
    to tell any later change (mode, size, mtime, content digest or link target)."""
    entries: dict[str, list[Any]] = {}
    for top in OVERLAID:
        upper = scratch / top.strip("/") / "upper"
        for dirpath, dirnames, filenames in os.walk(upper):
            for name in sorted(dirnames + filenames):
                path = Path(dirpath, name)
                st = path.lstat()
                shown = top + "/" + str(path.relative_to(upper))
                if stat.S_ISREG(st.st_mode):
                    what = hashlib.sha256(path.read_bytes()).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    what = os.readlink(path)
                elif stat.S_ISCHR(st.st_mode):
                    what = "whiteout"  # a deleted lower file
                else:
                    what = ""
                entries[shown] = [stat.filemode(st.st_mode), st.st_size if what else 0,
                                  st.st_mtime_ns, what]
    return entries


def lower_modes(lower: Path, upper: dict[str, list[Any]]) -> dict[str, str]:
    """The mode of each upper-layer path as it is on the host (absent: not there)."""
    modes = {}
    for path in upper:
        host = lower / path.lstrip("/")
        if host.exists() or host.is_symlink():
            modes[path] = stat.filemode(host.lstat().st_mode)
    return modes


def in_namespace(scratch: Path, out: Path) -> None:
    """Runs as root in a private mount namespace: set the stage, run the script, write JSON."""
    seen: dict[str, Any] = {}
    try:
        mount("-t", "tmpfs", "-o", "mode=0700", "install-test", str(scratch))
        # The host's root file system as it is below the overlays (OVERLAID lie on it).
        lower = scratch / "lower"
        lower.mkdir()
        mount("--bind", "-o", "ro", "/", str(lower))
        src = scratch / "checkout"
        src.mkdir()
        for name in CHECKOUT:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, src / name,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(ROOT / name, src / name)
        install = str(src / "deploy" / "install.sh")
        for top in OVERLAID:
            layer = scratch / top.strip("/")
            (layer / "upper").mkdir(parents=True)
            (layer / "work").mkdir()
            mount("-t", "overlay", "overlay", "-o",
                  f"lowerdir={top},upperdir={layer}/upper,workdir={layer}/work", top)
        mount("-t", "tmpfs", "-o", "mode=0755", "install-test", str(SYSTEMD_RUN))
        ensurepip = subprocess.run(
            ["/usr/bin/python3", "-c", "import ensurepip; print(ensurepip.__path__[0])"],
            capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        mount("-t", "tmpfs", "-o", "ro", "install-test", ensurepip)  # "python3-venv missing"
        fake = scratch / "fakebin"
        fake.mkdir()
        apt_log, systemctl_log = scratch / "apt-get.log", scratch / "systemctl.log"
        (fake / "apt-get").write_text(
            f'#!/bin/sh\necho "$*" >>{apt_log}\n'
            f'case " $* " in *" install "*" python3-venv "*) umount {ensurepip} ;; esac\n')
        (fake / "systemctl").write_text(f'#!/bin/sh\necho "$*" >>{systemctl_log}\n')
        for script in fake.iterdir():
            script.chmod(0o755)
        env = {**os.environ, "PATH": f"{fake}:{STD_PATH}"}
        for key in (*DEFAULTS, "PYTHON"):
            env.pop(key, None)

        def logged(log: Path) -> list[str]:
            return log.read_text().splitlines() if log.exists() else []

        seen["venv_missing_before"] = run(["/usr/bin/python3", "-m", "ensurepip", "--version"])
        seen["upper_before"] = upper_layers(scratch)

        # A meshctl the install did not make (an earlier `pip install .`) stops it at once.
        foreign = Path(DEFAULTS["BINDIR"], "meshctl")
        foreign.write_text("#!/bin/sh\n")
        seen["install_over_foreign"] = run([install], env)
        seen["upper_over_foreign"] = upper_layers(scratch)
        foreign.unlink()

        seen["install"] = run([install], env)
        seen["apt_get"] = logged(apt_log)
        seen["systemctl_after_install"] = logged(systemctl_log)
        seen["installed"] = observe_install(DEFAULTS, scratch, src)
        seen["upper_installed"] = upper_layers(scratch)

        seen["install_again"] = run([install], env)
        seen["upper_installed_again"] = upper_layers(scratch)

        # The user's own files, which no install or uninstall may touch.
        Path("/etc/meshnet/meshnet.toml").write_text('name = "mine"\n')
        Path("/etc/meshnet/cluster.key").write_text("mine\n")
        (SYSTEMD_RUN / "system").mkdir()  # systemd "is running" from here on
        seen["uninstall"] = run([install, "--uninstall"], env)
        seen["systemctl_after_uninstall"] = logged(systemctl_log)
        seen["conf_after_uninstall"] = sorted(os.listdir("/etc/meshnet"))
        shutil.rmtree("/etc/meshnet")
        (SYSTEMD_RUN / "system").rmdir()
        seen["uninstall_again"] = run([install, "--uninstall"], env)
        seen["upper_uninstalled"] = upper_layers(scratch)

        moved_env = {**env, **MOVED}
        seen["moved_install"] = run([install], moved_env)
        seen["moved"] = observe_install(MOVED, scratch, src)
        seen["moved_uninstall"] = run([install, "--uninstall"], moved_env)
        seen["upper_moved_uninstalled"] = upper_layers(scratch)
        seen["apt_get_at_end"] = logged(apt_log)
        seen["lower_modes"] = lower_modes(lower, seen["upper_moved_uninstalled"])
    except Exception as e:  # reported by the test, with what was seen up to here
        seen["error"] = f"{type(e).__name__}: {e}"
    out.write_text(json.dumps(seen))


def observe_install(where: dict[str, str], scratch: Path, src: Path) -> dict[str, Any]:
    prefix, conf = Path(where["PREFIX"]), Path("/etc/meshnet")
    path = f"{where['BINDIR']}:{STD_PATH}"
    unit = Path(where["UNITDIR"], "meshnet.service")
    seen: dict[str, Any] = {
        "which": {cmd: shutil.which(cmd, path=path) for cmd in ("meshctl", "meshnetd")},
        "realpath": {cmd: os.path.realpath(Path(where["BINDIR"], cmd))
                     for cmd in ("meshctl", "meshnetd")},
        "unit": unit.read_text() if unit.exists() else None,
        "conf_mode": stat.filemode(conf.stat().st_mode) if conf.exists() else None,
        "conf": sorted(os.listdir(conf)) if conf.exists() else None,
        "manifest": (prefix / "install-manifest").read_text().splitlines(),
        "completions": {},
        "docs": {},
    }
    env = {**os.environ, "PATH": path}
    for cmd in ("meshctl", "meshnetd"):
        seen[f"{cmd}_help"] = run([cmd, "--help"], env, timeout=60)
    seen["meshnetd_version"] = run(["meshnetd", "--version"], env, timeout=60)
    seen["metadata_version"] = run([str(prefix / "bin" / "python"), "-c",
                                    "import importlib.metadata as m; print(m.version('meshnet'))"])
    for name, file in (("bash", Path(where["BASH_COMPLETIONS"], "meshctl")),
                       ("zsh", Path(where["ZSH_COMPLETIONS"], "_meshctl"))):
        seen["completions"][name] = file.read_text() if file.exists() else None
    seen["bash_completes"] = run(["bash", "-c", f"source {where['BASH_COMPLETIONS']}/meshctl && "
                                  "complete -p meshctl"])
    for doc in ("README.md", "LICENSE", "docs/design.md"):
        copy = prefix / "share" / "doc" / "meshnet" / doc
        same = copy.exists() and copy.read_bytes() == (src / doc).read_bytes()
        seen["docs"][doc] = same
    seen["example_config_same"] = (
        (conf / "meshnet.toml.example").read_bytes()
        == (src / "deploy" / "meshnet.toml.example").read_bytes())
    # systemd-analyze verify on the unit as installed: its ExecStart exists here.
    verify_env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_LOG_LEVEL": "notice"}
    seen["verify"] = run(["systemd-analyze", "verify", "--man=no", str(unit)], verify_env)
    # ... and it is not vacuous: the same unit with an ExecStart that does not exist fails.
    broken = scratch / "broken" / "meshnet.service"
    broken.parent.mkdir(exist_ok=True)
    broken.write_text(seen["unit"].replace(f"{prefix}/bin/meshnetd", f"{prefix}/bin/nothing"))
    seen["verify_broken"] = run(["systemd-analyze", "verify", "--man=no", str(broken)],
                                verify_env)
    return seen


# ---- the test, on the host ---------------------------------------------------------------------


def host_mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[4] for line in f}


def directive(unit: str, key: str) -> str:
    values = re.findall(rf"^{key}=(.*)$", unit, re.MULTILINE)
    assert len(values) == 1, f"{key}= appears {len(values)} times"
    return values[0]


def check_installed(seen: dict[str, Any], where: dict[str, str]) -> None:
    prefix, bindir = where["PREFIX"], where["BINDIR"]
    for cmd in ("meshctl", "meshnetd"):
        assert seen["which"][cmd] == f"{bindir}/{cmd}", seen["which"]
        assert seen["realpath"][cmd] == f"{prefix}/bin/{cmd}"
        assert seen[f"{cmd}_help"]["rc"] == 0, seen[f"{cmd}_help"]
        assert f"usage: {cmd}" in seen[f"{cmd}_help"]["out"]
    assert seen["meshnetd_version"]["out"].strip() == f"meshnetd {meshnet.__version__}"
    assert seen["metadata_version"]["out"].strip() == meshnet.__version__
    unit = seen["unit"]
    assert unit is not None
    exec_start = f"{prefix}/bin/meshnetd --config /etc/meshnet/meshnet.toml"
    assert directive(unit, "ExecStart") == exec_start
    assert directive(unit, "Documentation").split() == [
        f"file://{prefix}/share/doc/meshnet/README.md",
        f"file://{prefix}/share/doc/meshnet/docs/design.md"]
    assert "/opt/meshnet/" not in unit or prefix == "/opt/meshnet"
    assert seen["docs"] == {"README.md": True, "LICENSE": True, "docs/design.md": True}
    assert seen["verify"]["rc"] == 0 and "meshnet" not in seen["verify"]["out"] + seen[
        "verify"]["err"], seen["verify"]
    assert seen["verify_broken"]["rc"] != 0, seen["verify_broken"]
    assert "nothing" in seen["verify_broken"]["err"] + seen["verify_broken"]["out"]
    assert seen["conf_mode"] == "drwx------"
    assert seen["conf"] == ["meshnet.toml.example"] and seen["example_config_same"]
    bash, zsh = seen["completions"]["bash"], seen["completions"]["zsh"]
    assert bash and zsh and "#compdef meshctl" in zsh
    for word in ("status", "members", "network", "service", "--json"):  # from the parser
        assert word in bash and word in zsh
    assert seen["bash_completes"]["rc"] == 0 and seen["bash_completes"]["out"].rstrip().endswith(
        " meshctl"), seen["bash_completes"]
    # Everything made outside PREFIX is in the manifest.
    listed = {line.split(" ", 1)[1] for line in seen["manifest"]}
    assert {f"{bindir}/meshctl", f"{bindir}/meshnetd", f"{where['UNITDIR']}/meshnet.service",
            "/etc/meshnet/meshnet.toml.example", f"{where['BASH_COMPLETIONS']}/meshctl",
            f"{where['ZSH_COMPLETIONS']}/_meshctl"} <= listed


def check_nothing_left(upper: dict[str, list[Any]], lower_modes: dict[str, str]) -> None:
    """Only directories are left in the upper layers (an overlay copies a directory up when
    something is made in it); each is a host directory, its mode unchanged."""
    left = {path: entry for path, entry in upper.items() if not entry[0].startswith("d")}
    assert left == {}, f"left behind: {sorted(left)}"
    for path, entry in upper.items():
        assert lower_modes.get(path) == entry[0], f"{path}: made, or its mode changed"


def test_install_then_uninstall_leaves_nothing(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root (mount namespaces, overlays); CI runs as root", pytrace=False)
    for path in ("/opt/meshnet", "/etc/meshnet", "/usr/local/bin/meshctl",
                 "/etc/systemd/system/meshnet.service"):
        if os.path.lexists(path):
            pytest.fail(f"{path} exists on this host (a real install?); the test expects a host "
                        "without meshnet installed", pytrace=False)
    scratch, out = tmp_path / "scratch", tmp_path / "seen.json"
    scratch.mkdir()
    started = time.monotonic()
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "--",
         sys.executable, __file__, str(scratch), str(out)],
        capture_output=True, text=True, timeout=900, check=False)
    print(f"install test in its namespace: {time.monotonic() - started:.1f} s")
    # The namespace is gone, and all its mounts with it: nothing of ours is mounted here.
    ours = {str(scratch), *OVERLAID, str(SYSTEMD_RUN)}
    assert not ours & host_mount_points()
    assert not [p for p in host_mount_points() if p.startswith(str(tmp_path))]
    assert not os.listdir(scratch)  # the tmpfs was over it, only inside the namespace
    assert not os.path.lexists("/opt/meshnet") and not os.path.lexists("/etc/meshnet")
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(out.read_text())
    assert "error" not in seen, (seen["error"], proc.stderr)

    # python3-venv looked missing, and was installed (by apt-get, with no recommends).
    assert seen["venv_missing_before"]["rc"] != 0
    assert seen["apt_get"] == ["update -qq",
                               "install -y -qq --no-install-recommends python3-venv"]
    assert seen["apt_get_at_end"] == seen["apt_get"]  # present since: not asked again

    assert seen["upper_before"] == {}
    over_foreign = seen["install_over_foreign"]
    assert over_foreign["rc"] == 1, over_foreign
    assert over_foreign["err"].startswith("install.sh: /usr/local/bin/meshctl exists and was not "
                                          "installed by deploy/install.sh")
    assert {p for p, e in seen["upper_over_foreign"].items() if not e[0].startswith("d")} == {
        "/usr/local/bin/meshctl"}  # nothing made but the test's own file
    assert seen["install"]["rc"] == 0, seen["install"]
    print(f"install: {seen['install']['seconds']} s, again: {seen['install_again']['seconds']} s")
    assert seen["systemctl_after_install"] == []  # systemd is not running here
    check_installed(seen["installed"], DEFAULTS)

    # A second install changes nothing, not even a time stamp.
    assert seen["install_again"]["rc"] == 0, seen["install_again"]
    assert "up to date" in seen["install_again"]["out"]
    assert seen["upper_installed_again"] == seen["upper_installed"]

    # Uninstall stops and forgets the service, keeps the user's files, removes the rest.
    assert seen["uninstall"]["rc"] == 0, seen["uninstall"]
    assert seen["systemctl_after_uninstall"] == ["disable --now meshnet.service", "daemon-reload"]
    assert seen["conf_after_uninstall"] == ["cluster.key", "meshnet.toml"]
    assert "kept /etc/meshnet" in seen["uninstall"]["out"]
    assert seen["uninstall_again"]["rc"] == 0, seen["uninstall_again"]
    assert "nothing to uninstall" in seen["uninstall_again"]["out"]
    check_nothing_left(seen["upper_uninstalled"], seen["lower_modes"])

    # Every location moved by environment.
    assert seen["moved_install"]["rc"] == 0, seen["moved_install"]
    check_installed(seen["moved"], MOVED)
    assert seen["moved_uninstall"]["rc"] == 0, seen["moved_uninstall"]
    check_nothing_left(seen["upper_moved_uninstalled"], seen["lower_modes"])


if __name__ == "__main__":
    in_namespace(Path(sys.argv[1]), Path(sys.argv[2]))
