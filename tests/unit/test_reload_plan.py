"""The reload's plan (agent/reload.py): which changed keys apply live, which wait for a restart,
and what runs afterwards."""

from __future__ import annotations

from meshnet import config as c
from meshnet.agent import reload


def test_live_keys_apply_and_restart_keys_keep_their_running_value() -> None:
    running = c.from_mapping({"labels": {"zone": "a"}, "bind": "127.0.0.1:7000",
                              "membership": {"probe_interval": 2.0, "reap_after": 100.0}})
    fresh = c.from_mapping({"labels": {"zone": "b"}, "bind": "127.0.0.1:7001",
                            "log_level": "debug",
                            "membership": {"probe_interval": 3.0, "reap_after": 200.0}})
    plan = reload.plan(running, fresh)
    assert plan.live == {"labels", "log_level", "membership.probe_interval"}
    assert plan.restart == ("bind", "membership.reap_after")
    assert plan.config.labels == {"zone": "b"} and plan.config.log_level == "debug"
    assert plan.config.bind == ("127.0.0.1", 7000)
    assert plan.config.membership == {"probe_interval": 3.0, "reap_after": 100.0}


def test_an_override_taken_out_goes_back_to_the_profile() -> None:
    running = c.from_mapping({"membership": {"gossip_nodes": 5, "udp_payload": 1200}})
    fresh = c.from_mapping({})
    plan = reload.plan(running, fresh)
    assert plan.live == {"membership.gossip_nodes"}
    assert plan.restart == ("membership.udp_payload",)
    assert plan.config.membership == {"udp_payload": 1200}


def test_nothing_changed_is_an_empty_plan() -> None:
    cfg = c.from_mapping({"name": "a", "join": ["10.0.0.1:7946"]})
    plan = reload.plan(cfg, cfg)
    assert plan.live == frozenset() and plan.restart == () and plan.config == cfg


def test_every_key_of_the_table_is_compared() -> None:
    # a change to any key shows up in the plan, on one side or the other
    changes = {"name": "zz", "bind": "127.0.0.9:1", "advertise": "10.9.9.9",
               "join": ["10.0.0.1:1"], "state_dir": "/x", "socket": "/y",
               "cluster_key_file": "/k", "ca_cert": "/a", "node_cert": "/b", "node_key": "/c",
               "insecure_no_identity": True, "insecure_no_encryption": True,
               "labels": {"a": "b"}, "dns_listen": ["127.0.0.1:1"], "dns_upstreams": [],
               "dns_ttl": 9, "metrics_listen": "127.0.0.1:9", "log_format": "json",
               "log_level": "error", "profile": "wan", "address_pool": "10.20.0.0/16",
               "datapath": "none", "sandbox_prefix": "q", "task_hidden_paths": ["/srv"],
               "rekey_after_s": 10.0, "reject_after_s": 20.0, "overlay_cipher":
               "chacha20-poly1305", "membership": {k: 1 if c.MEMBERSHIP[k].type == "int"
                                                   else 0.5 for k in c.MEMBERSHIP}}
    assert set(changes) == set(c.KEYS)
    base = c.Config()
    # Built key by key, past the checks across keys: only the comparison is under test.
    fresh = c.Config(**{k: c.KEYS[k].parse(k, v) for k, v in changes.items()})
    plan = reload.plan(base, fresh)
    everything = set(plan.live) | set(plan.restart)
    assert everything == (set(c.KEYS) - {"membership"}) | {f"membership.{k}"
                                                           for k in c.MEMBERSHIP}
    assert plan.live == everything & c.live_keys()
