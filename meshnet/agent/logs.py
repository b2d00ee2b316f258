"""Logging to stderr: readable lines by default, JSON lines with --log-format json."""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path


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


def setup(fmt: str, level: str) -> None:
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level.upper())


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
