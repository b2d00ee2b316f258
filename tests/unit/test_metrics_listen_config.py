"""`metrics_listen` / `meshnetd --metrics-listen` (#16): off by default, port 9946 when left
out, "" turns it off (the lab's off switch), a bad value is one line naming the key."""

from __future__ import annotations

import pytest

from meshnet import config as configmod
from meshnet.cli.meshnetd import build_parser, flag_overrides


def test_off_by_default() -> None:
    assert configmod.from_mapping({}).metrics_listen is None


@pytest.mark.parametrize(("value", "want"), [
    ("10.0.0.5:9100", ("10.0.0.5", 9100)),
    ("10.0.0.5", ("10.0.0.5", 9946)),
    ("[::1]:9946", ("::1", 9946)),
    ("", None),
])
def test_values(value: str, want: tuple[str, int] | None) -> None:
    assert configmod.from_mapping({"metrics_listen": value}).metrics_listen == want


@pytest.mark.parametrize("value", ["host.example:9946", "10.0.0.5:0", "10.0.0.5:99999", 9946,
                                   ["10.0.0.5:9946"]])
def test_bad_values_name_the_key(value: object) -> None:
    with pytest.raises(configmod.ConfigError, match="metrics_listen"):
        configmod.from_mapping({"metrics_listen": value})


def test_the_flag_overrides_the_file_and_empty_turns_it_off() -> None:
    file_on = configmod.from_mapping({"metrics_listen": "10.0.0.5:9946"})
    ns = build_parser().parse_args(["--metrics-listen", "127.0.0.1:19946"])
    assert configmod.from_mapping(flag_overrides(ns), base=file_on).metrics_listen == (
        "127.0.0.1", 19946)
    # what the lab's "off" runs pass after its own --metrics-listen (argparse: the last wins)
    ns = build_parser().parse_args(["--metrics-listen", "10.99.0.1:9946", "--metrics-listen", ""])
    assert configmod.from_mapping(flag_overrides(ns), base=file_on).metrics_listen is None
