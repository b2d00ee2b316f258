"""What every task's file system covers (issue 12): the agent's state, socket, config, cluster
key and identity, whole directories unless they are shared ones like /etc, and the paths no
task ever sees. (tests/netns/test_task_containment.py covers them on the real kernel.)"""

from __future__ import annotations

from meshnet.agent.agent import Agent
from meshnet.config import Config
from meshnet.platform.container import ALWAYS_HIDDEN, hidden_paths


def test_directories_whole_files_on_their_own_in_shared_directories() -> None:
    got = hidden_paths(["/var/lib/meshnet/", "/srv/x/../secrets", "/etc", "/run"],
                       ["/etc/meshnet.toml", "/run/meshnet.sock", "/var/lib/meshnet/keyring.json",
                        "/srv/secrets/a.key"])
    assert got[:4] == ["/var/lib/meshnet", "/srv/secrets", "/etc/meshnet.toml",
                       "/run/meshnet.sock"]
    assert set(got[4:]) == set(ALWAYS_HIDDEN)
    assert "/etc" not in got and "/run" not in got  # a task keeps /etc/passwd, ...
    assert len(got) == len(set(got))


def test_always_hidden() -> None:
    assert {"/etc/netns", "/etc/shadow", "/etc/gshadow", "/etc/ssh"} <= set(ALWAYS_HIDDEN)
    assert set(hidden_paths([], [])) == set(ALWAYS_HIDDEN)


def test_the_agents_own_paths_as_installed() -> None:
    """deploy/install.sh's layout: state in /var/lib/meshnet, the socket in /run/meshnet, the
    config, cluster key and identity in /etc/meshnet."""
    cfg = Config(name="n1", state_dir="/var/lib/meshnet", socket="/run/meshnet/meshnet.sock",
                 cluster_key_file="/etc/meshnet/cluster.key", ca_cert="/etc/meshnet/ca.crt",
                 node_cert="/etc/meshnet/node.crt", node_key="/etc/meshnet/node.key",
                 task_hidden_paths=("/srv/private",))
    got = Agent(cfg, "/etc/meshnet/meshnet.toml")._hidden_from_tasks()
    assert {"/var/lib/meshnet", "/run/meshnet", "/etc/meshnet", "/srv/private",
            *ALWAYS_HIDDEN} == set(got)


def test_the_agents_own_files_in_shared_directories() -> None:
    """A config, key or socket lying directly in /etc or /run: that file, never the whole
    directory."""
    cfg = Config(name="n1", state_dir="/var/lib/meshnet", socket="/run/meshnet.sock",
                 cluster_key_file="/etc/cluster.key", node_key="/etc/meshnet/id/node.key",
                 insecure_no_identity=True)
    got = Agent(cfg, "/etc/meshnet.toml")._hidden_from_tasks()
    assert {"/var/lib/meshnet", "/run/meshnet.sock", "/etc/cluster.key", "/etc/meshnet.toml",
            "/etc/meshnet/id"} <= set(got)
    assert "/etc" not in got and "/run" not in got
