"""meshnet/containment.py on hostile input: a service spec's containment comes through the
replicated store (JSON from the control API, msgpack between nodes), so `from_value` and the
option parsers must answer anything with a ContainmentError and nothing else; and whatever
they accept must survive the trip through the replicated form unchanged."""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.containment import (
    CAP_NUMBERS,
    MAX_MOUNTS,
    Containment,
    ContainmentError,
    from_value,
    parse_cpus,
    parse_memory,
    parse_mount,
    parse_pids,
    parse_user,
)

KEYS = ("cap_add", "cap_drop", "user", "memory", "cpus", "pids", "mounts")

# Numbers of any magnitude: JSON ints are unbounded, decimal strings become inf as floats.
huge_ints = st.builds(lambda k, sign: sign * 10 ** k, st.integers(0, 400), st.sampled_from([1, -1]))
digit_runs = st.builds(lambda n, u: "9" * n + u, st.integers(1, 400),
                       st.sampled_from(["", "k", "g", ".5"]))
# Anything JSON or msgpack can carry (and then some: tuples, bytes keys, huge ints).
leaves = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(1 << 64), max_value=1 << 64), huge_ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.binary(max_size=30),
)
json_like = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=10), st.binary(max_size=5),
                                  st.integers()), inner, max_size=5),
    ),
    max_leaves=20,
)

# Values that are often, but not always, acceptable: they reach the checks past the type tests.
cap_names = st.sampled_from([*CAP_NUMBERS, "ALL", "all", "net_admin", "CAP_SYS_ADMIN",
                             " chown ", "NOPE", "", "CAP_"])
caps = st.lists(cap_names, max_size=8)
ids = st.one_of(st.integers(0, (1 << 32) + 2).map(str),
                st.sampled_from(["nobody", "nogroup", "_apt", "www-data", "machine$", "Root",
                                 "a b", "", "\u0663", "1\n", "x" * 40]))
users = st.one_of(ids, st.tuples(ids, ids).map(":".join))
units = st.sampled_from(["", "b", "k", "K", "kb", "m", "MB", "g", "G", "t", "p", "x", " m"])
memory = st.one_of(
    st.integers(0, 1 << 52), huge_ints, digit_runs,
    st.builds(lambda n, u: f"{n}{u}", st.integers(0, 1 << 40), units),
    st.builds(lambda n, u: f"{n:.3f}{u}", st.floats(0, 5000), units),
    st.from_regex(r"[0-9]{1,400}(\.[0-9]{1,3})?[kmgtpKMGTP]?[bB]?", fullmatch=True),
)
cpus = st.one_of(st.floats(-1, 2000), st.floats(-1, 2000).map(str), st.integers(-1, 2000),
                 huge_ints, digit_runs,
                 st.sampled_from(["nan", "inf", "1e3", "0.01", "1_0", "\u0660.\u0665"]))
pids = st.one_of(st.integers(-1, (4 << 20) + 1), st.integers(-1, 5000).map(str), huge_ints,
                 digit_runs,
                 st.sampled_from(["\u0663", "64\n", " 7 ", "0x10"]))
components = st.sampled_from(["a", "b", "proc", "sys", "dev", "etc", "resolv.conf", "hosts",
                              "..", ".", "", "x y", "\u00fc", "c,d", "e=f"])
paths = st.lists(components, max_size=4).map(lambda cs: "/" + "/".join(cs)) | \
    st.lists(components, min_size=1, max_size=3).map("/".join)
mount_keys = st.sampled_from(["type", "source", "src", "target", "dst", "destination",
                              "readonly", "ro", "bogus"])
mount_text = st.one_of(
    st.builds(lambda s, t, ro: f"type=bind,source={s},target={t}" + (",readonly" if ro else ""),
              paths, paths, st.booleans()),
    st.lists(st.builds(lambda k, v: f"{k}={v}", mount_keys, paths | st.sampled_from(
        ["bind", "volume", "true", "no", "maybe"])), max_size=5).map(",".join),
)
mount_map = st.fixed_dictionaries(
    {}, optional={"source": paths | json_like, "target": paths | json_like,
                  "readonly": st.booleans() | st.sampled_from(["yes", "0", "x"]) | json_like,
                  "type": st.sampled_from(["bind", "volume"])})
mounts = st.lists(st.one_of(mount_text, mount_map, json_like), max_size=MAX_MOUNTS + 2)

plausible: dict[str, st.SearchStrategy[Any]] = {
    "cap_add": caps, "cap_drop": caps, "user": users, "memory": memory, "cpus": cpus,
    "pids": pids, "mounts": mounts,
}
specs = st.one_of(
    st.fixed_dictionaries({}, optional={k: st.one_of(plausible[k], json_like) for k in KEYS}),
    st.fixed_dictionaries({}, optional={k: plausible[k] for k in KEYS}),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)),
                    json_like, max_size=4),
    json_like,
)


def _check_round_trip(c: Containment) -> None:
    value = c.to_value()
    again = from_value(value)
    assert again == c
    assert again.to_value() == value
    summary = c.summary()
    assert set(summary) == {"user", "capabilities", "limits", "mounts"}


@settings(max_examples=250, deadline=None)
@given(specs)
def test_from_value_raises_only_containment_error(value: Any) -> None:
    try:
        c = from_value(value)
    except ContainmentError as e:
        assert str(e) and "\n" not in str(e)
        return
    _check_round_trip(c)


@settings(max_examples=150, deadline=None)
@given(st.fixed_dictionaries({k: plausible[k] for k in KEYS}))
def test_from_value_full_specs(value: dict[str, Any]) -> None:
    try:
        c = from_value(value)
    except ContainmentError:
        return
    _check_round_trip(c)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=60), mount_text))
def test_parse_mount_text(text: str) -> None:
    try:
        m = parse_mount(text)
    except ContainmentError:
        return
    assert m.source.startswith("/") and m.target.startswith("/")
    assert ".." not in m.source.split("/") and ".." not in m.target.split("/")
    assert parse_mount(m.to_value()) == m


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=40), memory.map(str)))
def test_parse_memory_text(text: str) -> None:
    try:
        value = parse_memory(text)
    except ContainmentError:
        return
    assert isinstance(value, int)
    assert parse_memory(value) == value


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=40), users))
def test_parse_user_text(text: str) -> None:
    try:
        parsed = parse_user(text)
    except ContainmentError:
        return
    assert parsed is None or isinstance(parsed, tuple)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=20), cpus, pids, leaves))
def test_parse_cpus_and_pids(value: Any) -> None:
    for parse in (parse_cpus, parse_pids):
        with contextlib.suppress(ContainmentError):
            parse(value)
