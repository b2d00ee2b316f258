"""meshctl's followed streams: `events` and `service logs` print lines as they come.

Human output is one line per event or log line; under --json one JSON object per line and
nothing else on stdout (notes about skipped output go to stderr). A stream runs until the agent
ends it (plain `service logs`, or a followed service that was removed) or Ctrl-C, which ends it
quietly with exit 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from meshnet.events import (
    EVENT_TYPES,
    FILTER_KEYS,
    MAX_TAIL_LINES,
    event_line,
    iso_ms,
    log_line,
    parse_duration,
    parse_filters,
)

# The verbs whose output is a stream of lines, not one document.
FOLLOWED = frozenset({"events", "service logs"})

EVENTS_HELP = "stream what changes in the cluster: members, tasks, networks, services, keys"
EVENTS_EXAMPLES = """\
meshctl events
meshctl events --since 10m --filter type=member
meshctl events --json --filter type=task --filter type=service | jq .
"""
LOGS_HELP = "the output of every task of a service, on every host"
LOGS_EXAMPLES = """\
meshctl service logs web
meshctl service logs web --follow --tail 20 --timestamps
meshctl service logs web --json --tail 100 | jq -r .line
"""


def duration_arg(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def filter_arg(text: str) -> str:
    try:
        parse_filters([text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def tail_arg(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_TAIL_LINES:
        raise argparse.ArgumentTypeError(
            f"{text[:20]!r} is not a line count 0..{MAX_TAIL_LINES}")
    return int(text)


def add_events_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", type=duration_arg, metavar="DURATION",
                   help="first replay the events of the last DURATION this agent still "
                        "holds (30s, 10m, 2h, 1h30m)")
    p.add_argument("--filter", action="append", default=[], type=filter_arg, metavar="KEY=VALUE",
                   help=f"only matching events; KEY is one of {', '.join(FILTER_KEYS)}; "
                        f"type is one of {', '.join(EVENT_TYPES)}. Repeated: the values of one "
                        "key OR together, different keys AND together")


def add_logs_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new lines, from every task including ones that start "
                        "later, until Ctrl-C")
    p.add_argument("-n", "--tail", type=tail_arg, metavar="N",
                   help="start with the last N lines of each task (default: all kept, up to "
                        "64 KiB a task)")
    p.add_argument("-t", "--timestamps", action="store_true",
                   help="show the time each line was printed")


def events_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {"since": ns.since, "filters": list(ns.filter)}


def logs_args(ns: argparse.Namespace) -> dict[str, Any]:
    return {"name": ns.name, "tail": ns.tail, "follow": ns.follow}


class StdoutClosed(Exception):
    """Our reader went away (`| head`). Not a ConnectionError, which the request loop would
    take for the agent's hanging up."""


class Printer:
    """Prints the frames of an `events` or `service logs` stream."""

    def __init__(self, as_json: bool, timestamps: bool = False) -> None:
        self.as_json = as_json
        self.timestamps = timestamps

    def __call__(self, frame: Any) -> None:
        try:
            self._print(frame)
        except BrokenPipeError:
            raise StdoutClosed from None

    def _print(self, frame: Any) -> None:
        if not isinstance(frame, dict):
            return
        out: list[str] = []
        dropped = frame.get("dropped")
        if isinstance(dropped, int) and dropped > 0:  # this client read too slowly
            out.append(self._doc({"time": iso_ms(time.time()), "type": "events",
                                  "action": "dropped", "count": dropped}, event_line))
        for doc in _maps(frame.get("events")):
            out.append(self._doc(doc, event_line))
        for rec in _maps(frame.get("logs")):
            out.append(self._doc(rec, lambda r: log_line(r, self.timestamps)))
        data = frame.get("data")  # an agent from before `logs` frames: `task | line` text
        if isinstance(data, bytes):
            data = data.decode("utf-8", "replace")
        if isinstance(data, str):
            for line in data.splitlines():
                task, _, text = line.partition(" | ")
                out.append(self._doc({"task": task, "node": None, "time": None,
                                      "stream": "stdout", "line": text},
                                     lambda r: log_line(r, self.timestamps)))
        if out:
            sys.stdout.write("\n".join(out) + "\n")
            sys.stdout.flush()
        for note in _maps(frame.get("skipped")):
            print(f"meshctl: service logs: {note.get('task')} on {note.get('node')}: "
                  f"{note.get('bytes')} bytes of output skipped (written faster than read)",
                  file=sys.stderr, flush=True)

    def _doc(self, doc: dict[str, Any], human: Callable[[dict[str, Any]], str]) -> str:
        if self.as_json:
            return json.dumps(doc, separators=(",", ":"), sort_keys=True, default=str)
        return human(doc)


def _maps(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


Remote = Callable[[Callable[[Any], None]], tuple[int, Any]]


def follow(ns: argparse.Namespace, remote: Remote) -> int:
    """Run a followed stream through REMOTE (which sends the request and hands each event frame
    to the printer); its exit code, 0 on Ctrl-C."""
    printer = Printer(bool(ns.json), bool(getattr(ns, "timestamps", False)))
    try:
        code, _ = remote(printer)
    except KeyboardInterrupt:
        return 0
    except StdoutClosed:
        raise BrokenPipeError from None  # meshctl.main ends quietly with 0
    return code
