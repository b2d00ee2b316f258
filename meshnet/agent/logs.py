"""Logging to stderr: readable lines by default, JSON lines with --log-format json; under
journald, every line starts with its syslog priority (`<3>` ... `<7>`, sd-daemon(3)), so
`journalctl -p warning` filters."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

# sd-daemon(3): SD_CRIT, SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
               (logging.INFO, 6))
SD_DEBUG = 7


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            doc.update(extra)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{stamp}.{int(record.msecs):03d} {record.levelname:<7} {record.name}: "
        line += record.getMessage()
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict) and extra:
            line += " " + " ".join(f"{k}={v}" for k, v in extra.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def syslog_priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return SD_DEBUG


class JournalFormatter(logging.Formatter):
    """Another formatter's lines, each behind the record's `<N>`: journald takes every line
    of a stream as an entry of its own, so a traceback's lines keep the record's priority."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in self.inner.format(record).split("\n"))


def under_journald(stream: TextIO, environ: Mapping[str, str] = os.environ) -> bool:
    """systemd connects stderr to the journal and says so in JOURNAL_STREAM=<dev>:<inode>;
    only if STREAM is that very file (not redirected since) do the prefixes belong."""
    dev, sep, ino = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (sep and dev.isascii() and dev.isdigit() and ino.isascii() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a file (a test's StringIO)
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


def setup(fmt: str, level: str, stream: TextIO | None = None) -> None:
    out = stream if stream is not None else sys.stderr
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(out)
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    if under_journald(out):
        formatter = JournalFormatter(formatter)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level.upper())


def error_line(e: BaseException) -> str:
    """An exception in one line: its type, message and where it was raised. Loops that must
    survive whatever arrives log this instead of a stack trace (which a peer could make us
    print again and again)."""
    where = ""
    if e.__traceback__ is not None:
        last = traceback.extract_tb(e.__traceback__)[-1]
        where = f" (at {Path(last.filename).name}:{last.lineno} in {last.name})"
    message = " ".join(str(e).split())[:300]  # a peer's bytes may hold newlines: one line
    return f"{type(e).__name__}: {message}{where}"


class LogOnce:
    """Logs each kind (what, exception type) of a suppressed error once, as one line; the caller
    counts every occurrence in COUNTER, which the line names. Bounded: past MAX_KINDS kinds,
    only the counter grows."""

    def __init__(self, logger: logging.Logger, max_kinds: int = 64) -> None:
        self.logger = logger
        self.max_kinds = max_kinds
        self._seen: set[str] = set()

    def __call__(self, what: str, e: BaseException, counter: str) -> None:
        kind = f"{what}: {type(e).__name__}"
        if kind in self._seen or len(self._seen) >= self.max_kinds:
            return
        self._seen.add(kind)
        self.logger.error("%s failed: %s (logged once; counted in %s)", what, error_line(e),
                          counter)
