from __future__ import annotations

from pathlib import Path

import pytest

from meshnet import config as c


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nmae": "x"}, "unknown key 'nmae' (did you mean 'name'?)"),
        ({"bind": "1.2.3.4:99999"}, "bind: port '99999' is not in 1..65535"),
        ({"bind": "host:1"}, "bind: 'host' is not an IP address"),
        ({"join": "1.2.3.4:1"}, "join: expected list, got str"),
        ({"join": ["1.2.3.4:1", "x"]}, "join[1]: 'x' is not an IP address"),
        ({"name": "bad name"}, "name: 'bad name' must be a DNS label"),
        ({"log_format": "xml"}, "log_format: 'xml' is not one of text, json"),
        ({"profile": "fast"}, "profile: 'fast' is not one of lan, lan-fast, wan"),
        ({"labels": {"k": 3}}, "labels.k: label value must be a string"),
        ({"labels": {"bad key": "v"}}, "labels: label key 'bad key'"),
        ({"membership": {"probe_intervall": 1}},
         "membership: unknown key 'probe_intervall' (did you mean 'probe_interval'?)"),
        ({"membership": {"gossip_nodes": 2.5}}, "membership.gossip_nodes: expected int"),
        ({"insecure_no_encryption": "yes"}, "insecure_no_encryption: expected bool"),
        ({"state_dir": ""}, "state_dir: must not be empty"),
        ({"overlay_cipher": "aes-128-cbc"}, "overlay_cipher: 'aes-128-cbc' is not one of"),
    ],
)
def test_bad_values_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(c.ConfigError) as e:
        c.from_mapping(data)
    assert str(e.value).startswith(message)


def test_flags_override_file(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text('name = "a"\nbind = "10.0.0.1:7000"\nlabels = { zone = "x" }\n'
                 '[membership]\nprobe_interval = 2\n')
    cfg = c.load(str(f), {"name": "b", "join": ["10.0.0.2"]}, explicit_path=True)
    assert cfg.name == "b"
    assert cfg.bind == ("10.0.0.1", 7000)
    assert cfg.join == (("10.0.0.2", c.DEFAULT_PORT),)
    assert cfg.labels == {"zone": "x"}
    assert cfg.membership == {"probe_interval": 2.0}


def test_missing_explicit_file_is_an_error_but_default_may_be_absent(tmp_path: Path) -> None:
    with pytest.raises(c.ConfigError, match="does not exist"):
        c.load(str(tmp_path / "nope.toml"), {}, explicit_path=True)
    cfg = c.load(str(tmp_path / "nope.toml"), {"name": "z"}, explicit_path=False)
    assert cfg.name == "z"


def test_toml_syntax_error_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "m.toml"
    f.write_text("name = \n")
    with pytest.raises(c.ConfigError) as e:
        c.load(str(f), {}, explicit_path=True)
    assert "\n" not in str(e.value)


def test_advertise_defaults_to_bind_ip() -> None:
    cfg = c.from_mapping({"bind": "127.0.0.5:7001"})
    assert cfg.advertise_addr() == ("127.0.0.5", 7001)
    cfg = c.from_mapping({"bind": "0.0.0.0:7001", "advertise": "10.1.2.3"})
    assert cfg.advertise_addr() == ("10.1.2.3", 7001)


def test_label_flag_parsing() -> None:
    assert c.parse_label("--label", "zone=a=b") == ("zone", "a=b")
    with pytest.raises(c.ConfigError, match="not K=V"):
        c.parse_label("--label", "zone")


def test_overlay_cipher_names_are_the_record_ciphers() -> None:
    from meshnet.crypto.sa import CIPHERS

    assert set(c.OVERLAY_CIPHERS) == set(CIPHERS)
    assert c.from_mapping({"overlay_cipher": "chacha20-poly1305"}).overlay_cipher == \
        "chacha20-poly1305"
    assert c.Config().overlay_cipher == "aes-256-gcm"
