"""Suppressed errors in loops (#14): one line each, no stack trace, once per kind, and the
line names the counter that keeps counting."""

from __future__ import annotations

import logging

import pytest

from meshnet.agent.logs import JsonFormatter, LogOnce, TextFormatter, error_line


def boom(n: int) -> None:
    if n:
        boom(n - 1)
    raise ValueError("bad value\nsecond line")


def caught() -> ValueError:
    try:
        boom(3)
    except ValueError as e:
        return e
    raise AssertionError("unreachable")


def test_error_line_is_one_line_naming_type_and_place() -> None:
    line = error_line(caught())
    assert line.startswith("ValueError: bad value second line ")
    assert "(at test_log_once.py:" in line and "in boom)" in line
    assert "Traceback" not in line


def test_log_once_logs_each_kind_once_as_one_line(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.logonce")
    once = LogOnce(logger, max_kinds=2)
    with caplog.at_level(logging.ERROR, logger="test.logonce"):
        for _ in range(5):
            once("reconcile", caught(), "errors")
        once("reconcile", KeyError("x"), "errors")
        once("other", ValueError("y"), "errors")  # past max_kinds: only the counter grows
    assert len(caplog.records) == 2
    for record in caplog.records:
        assert record.exc_info is None
        for fmt in (TextFormatter(), JsonFormatter()):
            out = fmt.format(record)
            assert "\n" not in out and "Traceback" not in out
        assert "counted in errors" in record.getMessage()
