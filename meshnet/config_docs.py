"""The README's config table and deploy/meshnet.toml.example, rendered from config.py's table.

    python -m meshnet.config_docs --markdown   # the README's table
    python -m meshnet.config_docs --example    # the example config file
    python -m meshnet.config_docs --write      # both, into the files of this checkout
    python -m meshnet.config_docs --check      # exit 1 if either file differs (a test does too)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from pathlib import Path
from typing import Any

from meshnet.config import KEYS, LIVE, MEMBERSHIP, PROFILES, Key

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
EXAMPLE = ROOT / "deploy" / "meshnet.toml.example"
TABLE_BEGIN = ("<!-- BEGIN config table: generated from meshnet/config.py by "
               "`python -m meshnet.config_docs --write`; edit the table there -->")
TABLE_END = "<!-- END config table -->"
WIDTH = 96
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

EXAMPLE_HEADER = """\
# meshnetd configuration: every key, with its default or an example value.
# Generated from meshnet/config.py by `python -m meshnet.config_docs --write`: edit the table there.
#
# Install as /etc/meshnet/meshnet.toml (the systemd unit runs
# `meshnetd --config /etc/meshnet/meshnet.toml`). Every key is optional, and the flag named
# beside a key overrides it. `meshnetd --check-config --config FILE` checks a file and this
# host and lists every problem. `systemctl reload meshnet` (SIGHUP) applies the keys marked
# "a reload applies it" and logs the name of each changed key that needs a restart.
"""

MEMBERSHIP_HEADER = """\
# Overrides of single values of the profile; leave out what you do not need to change. Shown
# commented, with the lan profile's values (membership/config.py); lan-fast and wan differ.
[membership]
"""


def toml_value(value: Any) -> str:
    """VALUE as TOML (the few kinds the table holds)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string for the ASCII text the table holds
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = (f"{k if _BARE_KEY.fullmatch(k) else json.dumps(k)} = {toml_value(v)}"
                 for k, v in value.items())
        return "{ " + ", ".join(items) + " }"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _plain(value: Any) -> str:
    """A default as the README shows it: TOML, but a string without its quotes."""
    return value if isinstance(value, str) else toml_value(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _flag_cell(flag: str) -> str:
    option, _, note = flag.partition(" (")
    return _code(option) + (f" ({note}" if note else "")


def _reload_cell(key: Key) -> str:
    return "live" if key.reload == LIVE else "restart"


def _membership_default(name: str) -> str:
    from meshnet.membership.config import MembershipConfig

    values = {p: getattr(MembershipConfig.profile(p), name) for p in PROFILES}
    if len(set(values.values())) == 1:
        return _code(toml_value(values[PROFILES[0]]))
    return ", ".join(f"{p} {_code(toml_value(v))}" for p, v in values.items())


def render_markdown() -> str:
    """The README's table: one row per key, [membership]'s as membership.KEY."""
    rows = ["| key | type | default | flag | reload | meaning |",
            "|---|---|---|---|---|---|"]
    for key in KEYS.values():
        if key.name == "membership":
            continue
        default = key.default_text or _code(_plain(key.default))
        rows.append(f"| `{key.name}` | {_cell(key.type)} | {_cell(default)} | "
                    f"{_cell(_flag_cell(key.flag))} | {_reload_cell(key)} | {_cell(key.doc)} |")
    for key in MEMBERSHIP.values():
        rows.append(f"| `membership.{key.name}` | {key.type} | "
                    f"{_cell(_membership_default(key.name))} | | {_reload_cell(key)} | "
                    f"{_cell(key.doc)} |")
    return "\n".join(rows) + "\n"


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent="# ", subsequent_indent="# ",
                         break_on_hyphens=False, break_long_words=False)


def _tag(key: Key) -> str:
    """The example's trailing comment on a key's line: reload, and the flag."""
    reload = "a reload applies it" if key.reload == LIVE else "needs a restart"
    return f"  # {reload}" + (f"; {key.flag.partition(' (')[0]}" if key.flag else "")


def _sentence(text: str) -> str:
    return f"{text[0].upper()}{text[1:]}."


def render_example() -> str:
    """deploy/meshnet.toml.example: every key, documented."""
    from meshnet.membership.config import MembershipConfig

    out = [EXAMPLE_HEADER]
    for key in KEYS.values():
        if key.name == "membership":
            continue
        lines = _comment(_sentence(key.doc))
        for note in key.notes:
            lines += _comment(note)
        value = key.example if key.example is not None else key.default
        lines.append(f"{'# ' if key.commented else ''}{key.name} = {toml_value(value)}"
                     f"{_tag(key)}")
        out.append("\n".join(lines) + "\n")
    lan = MembershipConfig.profile("lan")
    out.append(MEMBERSHIP_HEADER)
    for key in MEMBERSHIP.values():
        lines = [*_comment(_sentence(key.doc)),
                 f"# {key.name} = {toml_value(getattr(lan, key.name))}{_tag(key)}"]
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def readme_table(text: str) -> str | None:
    """The generated table in the README's TEXT, or None if its markers are missing."""
    begin, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    if begin < 0 or end < begin:
        return None
    return text[begin + len(TABLE_BEGIN):end].strip("\n") + "\n"


def with_table(text: str, table: str) -> str:
    begin, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    if begin < 0 or end < begin:
        raise ValueError(f"README.md has no {TABLE_BEGIN!r} ... {TABLE_END!r} markers")
    return text[:begin + len(TABLE_BEGIN)] + "\n" + table + text[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshnet.config_docs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--markdown", action="store_true", help="print the README's table")
    mode.add_argument("--example", action="store_true", help="print the example config")
    mode.add_argument("--write", action="store_true",
                      help="write both into README.md and deploy/meshnet.toml.example")
    mode.add_argument("--check", action="store_true",
                      help="exit 1 if README.md or the example differ from the table")
    ns = p.parse_args(argv)
    if ns.markdown:
        sys.stdout.write(render_markdown())
        return 0
    if ns.example:
        sys.stdout.write(render_example())
        return 0
    try:
        readme = README.read_text()
        if ns.write:
            README.write_text(with_table(readme, render_markdown()))
            EXAMPLE.write_text(render_example())
            return 0
    except (OSError, ValueError) as e:
        print(f"config_docs: {e}", file=sys.stderr)
        return 1
    stale = [str(path) for path, ok in (
        (README, readme_table(readme) == render_markdown()),
        (EXAMPLE, EXAMPLE.exists() and EXAMPLE.read_text() == render_example())) if not ok]
    for path in stale:
        print(f"config_docs: {path} differs from meshnet/config.py's table "
              "(python -m meshnet.config_docs --write)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
