"""Fixtures for tests that build real hosts as network namespaces (root; CI runs as root).

Each lab gets a prefix of its own (so parallel runs never touch each other's namespaces) and is
always torn down, pass or fail.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator

import pytest

from meshnet.lab import Lab
from meshnet.lab.lab import RUN_BASE

_counter = itertools.count(1)

LabFactory = Callable[[], Lab]


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "tests/netns need root to create network namespaces (CI runs them as root); "
            "run them as root or deselect them with -m 'not netns'",
            pytrace=False,
        )


def new_prefix() -> str:
    """mnt + 4 digits of our pid + a 2-digit counter: unique per test, fixed width (so one
    prefix is never another's prefix plus digits), and short (namespace names stay small)."""
    while True:
        prefix = f"mnt{os.getpid() % 10000:04d}{next(_counter) % 100:02d}"
        if not Lab(prefix, RUN_BASE / prefix).is_up():
            return prefix


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    """lab_factory() -> a new, not yet up, Lab with a unique prefix; every one made is downed
    in teardown even when the test failed."""
    require_root()
    made: list[Lab] = []

    def make() -> Lab:
        prefix = new_prefix()
        lab = Lab(prefix, RUN_BASE / prefix)
        made.append(lab)
        return lab

    yield make
    errors = []
    for lab in reversed(made):
        try:
            lab.down()
        except Exception as e:  # report every lab that failed, after trying them all
            errors.append(f"{lab.prefix}: {e}")
    if errors:
        pytest.fail("lab teardown failed: " + "; ".join(errors), pytrace=False)
