"""What the agent checks on the host before it starts, and `meshnetd --check-config` with it.

The agent runs `check` first thing and refuses to start on its first error, so whatever it
would refuse for its configuration, --check-config refuses too (and lists every problem at
once). Nothing here creates a file or a directory (loading a datapath key that others can
read tightens its mode, as the agent's start does).
"""

from __future__ import annotations

import os
import shutil
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from meshnet.config import Config

KEYRING_FILE = "keyring.json"
# The node's static X25519 key for the encrypted datapath's handshakes, without identity.
DATAPATH_KEY_FILE = "datapath.key"
# What the vxlan datapath runs (sandboxes: `ip netns`, their firewall: `nft`); found on PATH
# or in the usual sbin directories, as platform/netns.py looks for them.
TOOLS = ("ip", "nft")
TOOL_DIRS = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")

NO_CLUSTER_KEY = ("no cluster key: set cluster_key_file (--cluster-key-file) or, for a "
                  "throwaway test only, --insecure-no-encryption")
NO_IDENTITY = ("no identity: set ca_cert, node_cert and node_key (--ca-cert, --node-cert, "
               "--node-key; `meshctl ca init` and `meshctl ca sign` make them) or, for a "
               "throwaway test only, --insecure-no-identity")
NOT_ENCRYPTED = ("GOSSIP IS NOT ENCRYPTED: --insecure-no-encryption is set; anyone who can "
                 "reach {bind} can read and change membership")
NO_IDENTITY_WARNING = ("NO IDENTITY: --insecure-no-identity is set; any holder of the cluster "
                       "key can speak for any node and define services")


@dataclass
class Findings:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def check(cfg: Config, skip: Iterable[str] = ()) -> Findings:
    """Every problem the host has with CFG. SKIP: keys already reported wrong (the checks
    that read them stand aside rather than add a second line for one mistake)."""
    out = Findings()
    skipped = frozenset(skip)
    state_ok = "state_dir" not in skipped and _state_dir(cfg.state_dir, out)
    if state_ok and not skipped & {"cluster_key_file", "insecure_no_encryption"}:
        _encryption(cfg, out)
    if not skipped & {"name", "ca_cert", "node_cert", "node_key", "insecure_no_identity"}:
        _identity(cfg, out, datapath_key_readable=state_ok)
    if "datapath" not in skipped and cfg.datapath == "vxlan":
        for tool in TOOLS:
            if find_tool(tool) is None:
                out.errors.append(f"datapath: `{tool}` not found on PATH or in "
                                  f"{', '.join(TOOL_DIRS)} (install iproute2 and nftables, "
                                  "or set datapath = \"none\")")
    for key, path in (("cluster_key_file", cfg.cluster_key_file), ("node_key", cfg.node_key)):
        if path and key not in skipped:
            _private(key, path, out)
    return out


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found is not None:
        return found
    for directory in TOOL_DIRS:
        path = Path(directory) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def _state_dir(path: str, out: Findings) -> bool:
    """state_dir must be a writable directory, or one the agent can create."""
    target = Path(path)
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        out.errors.append(f"state_dir: {path}: {probe} is not a directory")
        return False
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == target else f"cannot be created in {probe}"
        out.errors.append(f"state_dir: {path} {what}")
        return False
    return True


def _encryption(cfg: Config, out: Findings) -> None:
    """As the agent loads its keyring: state_dir's keyring (the truth once it has run), else
    the cluster key file, else nothing, which only insecure_no_encryption allows."""
    from meshnet.crypto.keyring import Keyring, KeyringError

    ring = Path(cfg.state_dir) / KEYRING_FILE
    if ring.exists():
        try:
            Keyring.load(ring)
        except KeyringError as e:
            out.errors.append(str(e))
        except OSError as e:
            out.errors.append(f"state_dir: cannot read {ring}: {e.strerror}")
        return
    if cfg.cluster_key_file:
        try:
            Keyring.from_key_file(cfg.cluster_key_file)
        except KeyringError as e:
            out.errors.append(f"cluster_key_file: {e}")
        except OSError as e:
            out.errors.append(f"cluster_key_file: cannot read {cfg.cluster_key_file}: "
                              f"{e.strerror}")
        return
    if cfg.insecure_no_encryption:
        out.warnings.append(NOT_ENCRYPTED.format(bind=f"{cfg.bind[0]}:{cfg.bind[1]}"))
    else:
        out.errors.append(NO_CLUSTER_KEY)


def _identity(cfg: Config, out: Findings, datapath_key_readable: bool) -> None:
    if not cfg.ca_cert:
        if not cfg.insecure_no_identity:
            out.errors.append(NO_IDENTITY)
            return
        out.warnings.append(NO_IDENTITY_WARNING)
        # Without a certificate the datapath key is state_dir's own (made at first start).
        path = Path(cfg.state_dir) / DATAPATH_KEY_FILE
        if datapath_key_readable and path.exists():
            from meshnet.crypto.identity import IdentityError, load_identity
            try:
                load_identity(path)
            except (IdentityError, OSError, ValueError) as e:
                out.errors.append(f"datapath key: {e}")
        return
    from meshnet.agent.certificates import load_trust
    from meshnet.crypto.certs import CertError
    try:
        load_trust(cfg, 0.0, time.time())
    except CertError as e:
        out.errors.append(f"identity: {e}")


def _private(key: str, path: str, out: Findings) -> None:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return  # a missing file is an error of its own, reported above
    if mode & 0o044:
        out.warnings.append(f"{key}: {path} is readable by group or others (mode {mode:04o}); "
                            f"chmod 600 {path}")
