"""Every name check refuses a name with a non-ASCII character in it or a line end after it.

A valid name is drawn for each check and then spoiled: a trailing newline (which `$` lets
through), a non-ASCII character (another script's digit or letter, a character that casefolds
to ASCII such as the Kelvin sign, a fullwidth letter) put anywhere, or an ASCII digit replaced by
another script's digit (which str.isdigit and int() take). Each check must accept the valid name
and refuse every spoiled one.

Checks outside this test's reach (their files belong to other changes) are listed in the
"Names and logs" report of issue #14: meshnet/lab/lab.py PREFIX_RE and HOST_RE,
meshnet/membership/types.py check_name, meshnet/cli/meshctl.py's `service scale` count.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet import config
from meshnet.agent.services import Services, _task_of_log
from meshnet.crypto import certs
from meshnet.lab.lab import Lab
from meshnet.platform import nsfd
from meshnet.platform.sandbox import is_node_sandbox, sandbox_node_prefix, sandbox_ns_name
from meshnet.state import validate
from meshnet.state.networks import check_name

# Non-ASCII characters that are digits or letters somewhere, or fold to ASCII ones.
NON_ASCII = st.sampled_from([
    "\u0661", "\u0967", "\uff11", "\u00b2", "\u2460", "\U0001d7ce",  # digits of other kinds
    "\u212a", "\u017f", "\u0131", "\u0435", "\uff41", "\u00e9", "\u00df",  # letters
    "\u00a0", "\u2028", "\u0085", "\u200b",  # spaces and line ends str.split/strip know
]) | st.characters(min_codepoint=128, max_codepoint=0x10FFFF,
                   blacklist_categories=("Cs",))
OTHER_DIGITS = st.sampled_from(["\u0661", "\u0967", "\uff11", "\u00b2", "\U0001d7ce"])


def refuses(check: Callable[[str], object], name: str) -> bool:
    try:
        return not check(name)
    except (ValueError, config.ConfigError, nsfd.PlatformError, certs.CertError,
            validate.ValidationError):
        return True


def _config_name(text: str) -> object:
    return config.from_mapping({"name": text})


def _config_prefix(text: str) -> object:
    return config.from_mapping({"sandbox_prefix": text})


def _config_label(text: str) -> object:
    return config.from_mapping({"labels": {text: "v"}})


_LAB = Lab("mnlabprop", Path("/nonexistent/mnlabprop"))


def _lab_sandbox(text: str) -> object:
    return _LAB._ns_re.fullmatch(text)


def _node_sandbox(text: str) -> object:
    return is_node_sandbox(text, "mns", "h1")


def _log_path(text: str) -> object:
    s = object.__new__(Services)
    s.log_dir = Path("/nonexistent")
    return s._log_path(text)


def _local_logs(text: str) -> object:
    s = object.__new__(Services)
    s.log_dir = Path("/nonexistent")
    s.local_logs(text)
    return True


# (name of the check, the check, a strategy for names it accepts)
LABEL = st.from_regex(re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}"), fullmatch=True).filter(
    lambda n: n.lower() not in {"com", "net", "org", "io", "arpa", "local", "localhost",
                                "meshnet", "internal", "tasks", "edu", "gov", "dev", "app"})
NODE = st.from_regex(re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,20}[A-Za-z0-9])?"),
                     fullmatch=True)
NS = st.from_regex(re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}"), fullmatch=True)
TASK = st.builds(lambda s, n: f"{s}.{n}", LABEL, st.integers(0, 10**9))

CHECKS: list[tuple[str, Callable[[str], object], st.SearchStrategy[str]]] = [
    ("networks.check_name", lambda n: check_name("service", n), LABEL),
    ("config name", _config_name, NODE),
    ("config sandbox_prefix", _config_prefix,
     st.from_regex(re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}"), fullmatch=True)),
    ("config label key", _config_label,
     st.from_regex(re.compile(r"[A-Za-z0-9_.-]{1,20}"), fullmatch=True)),
    ("nsfd.check_name", nsfd.check_name, NS),
    ("lab sandbox names", _lab_sandbox, NS.map(lambda n: f"mnlabprop-s-{n}")),
    ("agent's own sandboxes", _node_sandbox,
     st.builds(lambda n: sandbox_ns_name("mns", "h1", n), TASK)),
    ("task log path", _log_path, TASK),
    ("task log file", lambda n: _task_of_log("web", n),
     st.integers(0, 10**9).map(lambda n: f"web.{n}.log")),
    ("service logs", _local_logs, LABEL),
    ("validate node", lambda n: validate._node(n), NODE),
    ("validate endpoint name", lambda n: validate._endpoint_name(n), TASK | LABEL),
    ("certs name", lambda n: certs._name(n), NODE),
]


def spoil(name: str, how: str, char: str, where: int) -> str:
    if how == "newline":
        return name + "\n"
    if how == "crlf":
        return name + "\r\n"
    if how == "digit":
        digits = [i for i, c in enumerate(name) if c in "0123456789"]
        if digits:
            i = digits[where % len(digits)]
            return name[:i] + char + name[i + 1:]
    i = where % (len(name) + 1)
    return name[:i] + char + name[i:]


@pytest.mark.parametrize(("label", "check", "names"), CHECKS, ids=[c[0] for c in CHECKS])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_name_check_refuses_non_ascii_and_newline(
        label: str, check: Callable[[str], object], names: st.SearchStrategy[str],
        data: st.DataObject) -> None:
    name = data.draw(names, "name")
    assert not refuses(check, name), f"{label} refuses the valid {name!r}"
    how = data.draw(st.sampled_from(["newline", "crlf", "insert", "digit"]), "how")
    char = data.draw(OTHER_DIGITS if how == "digit" else NON_ASCII, "char")
    bad = spoil(name, how, char, data.draw(st.integers(0, 100), "where"))
    assert bad != name
    assert refuses(check, bad), f"{label} accepts {bad!r}"


@settings(max_examples=200, deadline=None)
@given(prefix=st.from_regex(re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,23}"), fullmatch=True),
       node=st.text(min_size=1, max_size=70), name=st.text(min_size=1, max_size=80))
def test_sandbox_names_are_always_valid(prefix: str, node: str, name: str) -> None:
    """Whatever it is given, sandbox_ns_name makes a name nsfd takes, of its own node."""
    ns = sandbox_ns_name(prefix, node, name)
    assert nsfd.check_name(ns) == ns and ns.isascii()
    assert ns.startswith(sandbox_node_prefix(prefix, node))
    assert is_node_sandbox(ns, prefix, node)
