"""Packaging: one version, written once; the license declared as SPDX and shipped."""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import meshnet

ROOT = Path(__file__).resolve().parents[2]
VERSION_HOME = ROOT / "meshnet" / "__init__.py"


def repository_files() -> list[Path]:
    """Tracked files and new ones not ignored (what the next commit can hold)."""
    proc = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        capture_output=True, timeout=60, check=True,
    )
    paths = (ROOT / name for name in proc.stdout.decode().split("\0") if name)
    return [p for p in paths if p.is_file()]


def version_pattern(version: str) -> re.Pattern[str]:
    """VERSION as a whole token: 2.7.1 but not 12.7.1.0 or 2.7.1.5."""
    return re.compile(rf"(?<![\w.]){re.escape(version)}(?![\w.]|\.\d)")


def test_the_version_pattern_finds_versions_and_nothing_else() -> None:
    found = version_pattern("2.7.1").search
    assert found('version = "2.7.1"') and found("meshnetd 2.7.1\n") and found("v=2.7.1,")
    assert not found("12.7.1.0/24") and not found("2.7.1.5") and not found("2.7.11")


def test_the_version_is_written_in_meshnet_init_only() -> None:
    version = meshnet.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", version), version
    pattern = version_pattern(version)
    assert pattern.search(VERSION_HOME.read_text())
    files = repository_files()
    assert ROOT / "pyproject.toml" in files and VERSION_HOME in files  # git saw the repository
    # Tests are left out: their sample agent replies may carry any version string, and one
    # that checked the real version against a literal would fail at the first release anyway.
    elsewhere = [
        rel
        for path in files
        if path != VERSION_HOME and not (rel := str(path.relative_to(ROOT))).startswith("tests/")
        and pattern.search(path.read_text(errors="replace"))
    ]
    assert elsewhere == [], (
        f"{version} is written in {elsewhere}: read meshnet.__version__ (or the package "
        "metadata) instead, so a release changes one line"
    )


def test_pyproject_reads_the_version_from_the_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "meshnet.__version__"}


def test_the_license_is_spdx_and_shipped() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"  # PEP 639: an SPDX expression
    assert pyproject["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the whole text, not a stub
    assert "Copyright 2026 the meshnet developers" in text
    # setuptools understands license expressions and license-files from 77 on.
    requires = pyproject["build-system"]["requires"]
    floor = next(r for r in requires if r.startswith("setuptools"))
    assert tuple(map(int, floor.removeprefix("setuptools>=").split("."))) >= (77,)
