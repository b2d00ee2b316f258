"""Fuzz the config parser: whatever a config file or the flags hold, the agent gets a Config or
a ConfigError whose every problem is one line; never another exception. And every unknown key
is a problem of its own, so --check-config's count is honest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet import config as c

KEY_NAMES = st.sampled_from([*c.KEYS, *c.MEMBERSHIP, "nmae", "reap_afer", "x", ""]) | st.text(
    max_size=12)
TEXT = st.text(max_size=20) | st.sampled_from(
    ["127.0.0.1:7946", "::1", "[::1]:53", "10.10.0.0/16", "lan", "json", "a\nb", "/x", "",
     "0.0.0.0:0", "1.2.3.4:65536", "\u0661", "mns"])
SCALARS = (st.booleans() | st.integers(-(1 << 70), 1 << 70)
           | st.floats(allow_nan=True, allow_infinity=True) | TEXT)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEY_NAMES, inner, max_size=4),
    max_leaves=12,
)
MAPPINGS = st.dictionaries(KEY_NAMES, VALUES, max_size=8)


def _outcome(layers: list[dict[str, Any]]) -> c.ConfigError | c.Config:
    try:
        return c.build(layers)
    except c.ConfigError as e:
        return e


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(MAPPINGS, MAPPINGS)
def test_any_mapping_gives_a_config_or_one_line_problems(file: dict[str, Any],
                                                         flags: dict[str, Any]) -> None:
    out = _outcome([file, flags])
    if isinstance(out, c.Config):
        # timers the agent will arm: finite and positive (NaN and inf are refused)
        assert all(0 < v < float("inf") for v in out.membership.values()), out.membership
        assert 1 <= out.rekey_after_s < out.reject_after_s <= 86400
        return
    assert out.problems and all(isinstance(p, str) and p for p in out.problems)
    assert all("\n" not in p for p in out.problems), out.problems
    assert out.partial is not None  # what parsed, for the host checks
    unknown = [k for layer in (file, flags) for k in layer if k not in c.KEYS]
    assert sum(p.startswith("unknown key ") for p in out.problems) == len(unknown)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_any_file_text_gives_a_config_or_a_config_error(tmp_path_factory: Any,
                                                        text: str) -> None:
    path: Path = tmp_path_factory.mktemp("cfg") / "m.toml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        c.load(str(path), {}, explicit_path=True)
    except c.ConfigError as e:
        assert all("\n" not in p for p in e.problems), e.problems
