"""Log lines under journald (agent/logs.py): a `<N>` syslog priority before every line when
JOURNAL_STREAM names our stderr, nothing otherwise."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnet.agent import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def journal_stream(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_journal_stream_must_name_this_very_file(tmp_path: Path) -> None:
    log_file, other = tmp_path / "stderr", tmp_path / "other"
    other.write_text("")
    with log_file.open("w") as stream:
        assert logs.under_journald(stream, {"JOURNAL_STREAM": journal_stream(log_file)})
        assert not logs.under_journald(stream, {"JOURNAL_STREAM": journal_stream(other)})
        assert not logs.under_journald(stream, {})
        for bad in ("", "1", "a:b", "1:2:3", "\u0661:\u0662"):
            assert not logs.under_journald(stream, {"JOURNAL_STREAM": bad})
    assert not logs.under_journald(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_every_line_carries_its_priority_under_journald(
        tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch,
        restore_logging: None) -> None:
    log_file = tmp_path / "stderr"
    with log_file.open("w") as stream:
        monkeypatch.setenv("JOURNAL_STREAM", journal_stream(log_file))
        logs.setup(fmt, "debug", stream)
        log = logging.getLogger("meshnet.test")
        log.debug("d")
        log.info("i")
        log.warning("w")
        log.error("e")
        log.critical("c")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    lines = log_file.read_text().splitlines()
    assert [line[:3] for line in lines[:5]] == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    # a traceback's lines keep the record's priority, so `journalctl -p err` shows them all
    assert len(lines) > 6 if fmt == "text" else len(lines) == 6
    assert all(line.startswith("<3>") for line in lines[5:])
    assert any("ValueError: boom" in line for line in lines[5:])


def test_no_prefix_when_stderr_is_not_the_journal(tmp_path: Path, restore_logging: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    log_file, other = tmp_path / "stderr", tmp_path / "other"
    other.write_text("")
    monkeypatch.setenv("JOURNAL_STREAM", journal_stream(other))  # redirected since
    with log_file.open("w") as stream:
        logs.setup("text", "info", stream)
        logging.getLogger("meshnet.test").warning("plain")
    text = log_file.read_text()
    assert "plain" in text and not text.startswith("<")
