"""config.py's table is the one description of every key: the Config dataclass, meshnetd's
flags, the README's table, deploy/meshnet.toml.example and the reload all agree with it."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from meshnet import config as c
from meshnet import config_docs
from meshnet.cli import meshnetd
from meshnet.membership.config import MembershipConfig

ROOT = Path(__file__).resolve().parents[2]

# A value each flag accepts, to see which key it sets.
FLAG_SAMPLES = {
    "name": ["node7"], "bind": ["127.0.0.1:7000"], "advertise": ["10.0.0.9"],
    "join": ["10.0.0.1:7946"], "state_dir": ["/tmp/s"], "socket": ["/tmp/s.sock"],
    "cluster_key_file": ["/tmp/k"], "ca_cert": ["/tmp/ca.crt"], "node_cert": ["/tmp/n.crt"],
    "node_key": ["/tmp/n.key"], "insecure_no_identity": [], "insecure_no_encryption": [],
    "labels": ["zone=b"], "dns_listen": ["127.0.0.1:5300"], "dns_upstreams": ["127.0.0.1:53"],
    "dns_ttl": ["7"], "metrics_listen": ["127.0.0.1:9946"], "log_format": ["json"],
    "log_level": ["debug"], "profile": ["wan"], "datapath": ["none"], "sandbox_prefix": ["abc"],
    "task_hidden_paths": ["/srv"], "rekey_after_s": ["100"], "reject_after_s": ["200"],
    "overlay_cipher": ["chacha20-poly1305"],
}


def test_readme_table_and_example_are_generated_from_the_table() -> None:
    readme = (ROOT / "README.md").read_text()
    assert config_docs.readme_table(readme) == config_docs.render_markdown(), (
        "README.md's config table differs from meshnet/config.py: "
        "python -m meshnet.config_docs --write")
    example = (ROOT / "deploy" / "meshnet.toml.example").read_text()
    assert example == config_docs.render_example(), (
        "deploy/meshnet.toml.example differs from meshnet/config.py: "
        "python -m meshnet.config_docs --write")
    assert config_docs.main(["--check"]) == 0


def test_every_config_field_is_in_the_table_with_the_same_default() -> None:
    names = [f.name for f in dataclasses.fields(c.Config)]
    assert set(names) == set(c.KEYS)
    default = c.Config()
    for key in c.KEYS.values():
        if key.default is None:
            assert key.default_text, f"{key.name}: a computed default needs default_text"
            continue
        assert key.parse(key.name, key.default) == getattr(default, key.name), key.name


def test_membership_keys_are_fields_of_the_core_config_with_their_types() -> None:
    core = {f.name: f.type for f in dataclasses.fields(MembershipConfig)}
    for key in c.MEMBERSHIP.values():
        assert key.name in core, key.name
        assert key.type == core[key.name], key.name
        value = getattr(MembershipConfig.lan(), key.name)
        assert key.parse(f"membership.{key.name}", value) == value


def test_each_flag_sets_its_key() -> None:
    parser = meshnetd.build_parser()
    for key in c.KEYS.values():
        if not key.flag:
            continue
        option = key.flag.split()[0]
        ns = parser.parse_args([option, *FLAG_SAMPLES[key.name]])
        overrides = meshnetd.flag_overrides(ns)
        assert list(overrides) == [key.name], (key.name, overrides)
        key.parse(key.name, overrides[key.name])  # and the value it took is valid


def test_the_example_file_is_a_valid_config_and_shows_the_lan_profile() -> None:
    text = (ROOT / "deploy" / "meshnet.toml.example").read_text()
    cfg = c.from_mapping(tomllib.loads(text))
    assert cfg.name == "node1" and cfg.labels == {"zone": "a"}
    # Uncommenting a [membership] line gives the lan profile's value: what the comment says.
    section = text[text.index("[membership]"):]
    shown: dict[str, Any] = {}
    for line in section.splitlines():
        m = re.fullmatch(r"# (\w+) = (\S+)\s+#.*", line)
        if m:
            shown.update(tomllib.loads(f"{m[1]} = {m[2]}"))
    assert set(shown) == set(c.MEMBERSHIP)
    lan = MembershipConfig.lan()
    assert shown == {k: getattr(lan, k) for k in c.MEMBERSHIP}
    assert shown["reap_after"] == 60.0  # the drift issue 16 found: the example said 86400


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(c.ConfigError) as e:
        c.from_mapping({"bind": "x:1", "log_level": "loud",
                        "membership": {"reap_afer": 3, "probe_interval": -1}})
    assert e.value.problems == [
        "bind: 'x' is not an IP address",
        "log_level: 'loud' is not one of debug, info, warning, error",
        "membership: unknown key 'reap_afer' (did you mean 'reap_after'?)",
        "membership.probe_interval: must be positive",
    ]
    assert str(e.value) == e.value.problems[0]
    assert e.value.partial is not None and e.value.partial.log_level == "info"


def test_unknown_keys_suggest_the_closest_one() -> None:
    def problem(data: dict[str, Any]) -> str:
        with pytest.raises(c.ConfigError) as e:
            c.from_mapping(data)
        assert len(e.value.problems) == 1, e.value.problems
        return e.value.problems[0]

    assert problem({"stat_dir": "/x"}) == "unknown key 'stat_dir' (did you mean 'state_dir'?)"
    # a [membership] key at the top level: TOML's dotted key is what was meant
    assert problem({"reap_after": 5.0}) == \
        "unknown key 'reap_after' (did you mean 'membership.reap_after'?)"
    assert problem({"zzzzqqq": 1}) == "unknown key 'zzzzqqq'"


def test_a_mistake_is_reported_once_not_again_by_the_checks_that_build_on_it() -> None:
    # rekey_after_s is wrong: the rekey < reject check stands aside rather than compare it
    with pytest.raises(c.ConfigError) as e:
        c.from_mapping({"rekey_after_s": "soon", "reject_after_s": 100.0})
    assert e.value.problems == ["rekey_after_s: expected float, got str"]
    # a misspelt node_cert counts as node_cert: no second line for the identity trio
    with pytest.raises(c.ConfigError) as e:
        c.from_mapping({"ca_cert": "/a", "node_cert_": "/b", "node_key": "/c"})
    assert e.value.problems == ["unknown key 'node_cert_' (did you mean 'node_cert'?)"]


def test_keys_are_checked_together_once_the_flags_are_in(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text('ca_cert = "/etc/meshnet/ca.crt"\n')
    cfg = c.load(str(f), {"node_cert": "/n.crt", "node_key": "/n.key"}, explicit_path=True)
    assert (cfg.ca_cert, cfg.node_cert, cfg.node_key) == ("/etc/meshnet/ca.crt", "/n.crt",
                                                            "/n.key")
    with pytest.raises(c.ConfigError, match="node_cert: identity needs"):
        c.load(str(f), {}, explicit_path=True)


def test_membership_timings_that_do_not_fit_are_a_config_error() -> None:
    # the agent used to die on this at start with a traceback (MembershipConfig's ValueError)
    with pytest.raises(c.ConfigError) as e:
        c.from_mapping({"membership": {"probe_timeout": 2.0}})
    assert e.value.problems == ["membership: probe_timeout must not exceed probe_interval"]
    cfg = c.from_mapping({"profile": "wan", "membership": {"probe_timeout": 2.0}})
    assert c.membership_timings(cfg).probe_timeout == 2.0


def test_every_live_key_has_what_applies_it_on_reload() -> None:
    from meshnet.agent.agent import Agent

    appliers = Agent(c.Config())._reload_appliers()
    covered = [k for keys in appliers for k in keys]
    assert sorted(covered) == sorted(c.live_keys())
    assert "log_level" in covered and "membership.probe_interval" in covered
    assert "bind" not in covered and "membership.reap_after" not in covered
