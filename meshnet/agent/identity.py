"""The node's record in the state dir: who it is and how many times it has started.

The incarnation is stored so a restarted node announces itself above anything the cluster
may still believe about its previous life, and each start begins at least at the wall clock in
milliseconds: refutations raise the incarnation in memory only, and with identity a claim
about us above what this life has signed is refused, so the cluster could not lift a node that
restarted below the incarnation it holds for it (found by the chaos soak, #15). A record that
cannot be used (unparseable, or an incarnation membership would refuse) is set aside under a
new name, with one log line, and the node starts afresh (from the clock). Failing instead
would make `Restart=on-failure` loop for good.

A full disk does not stop the node either: the record it cannot write is kept in memory (one
warning line), the node runs on, and the write is retried when space returns (fsutil.DEFERRED,
retried by the store's loop). Its next start may then count from an older record, which the
clock covers.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from meshnet.agent.logs import error_line
from meshnet.fsutil import DEFERRED, remove_stale_temporaries
from meshnet.membership import MAX_CLAIM_INCARNATION

# A start never begins higher than this from the clock (a clock gone wild must leave room for
# refutations below membership's bound); 2**62 ms is a hundred million years.
MAX_START_INCARNATION = 1 << 62

log = logging.getLogger("meshnet.agent")
# node.json is a few dozen bytes; anything much bigger is not ours.
MAX_NODE_FILE_BYTES = 4096
_NODE_ID_RE = re.compile(r"[0-9a-f]{32}")

NODE_FILE = "node.json"


class StateDirError(Exception):
    pass


@dataclass
class NodeRecord:
    node_id: str
    name: str
    boots: int
    incarnation: int
    # The first freshness epoch (ms) of this node's latest life (crypto/freshness.py); the
    # next life starts above it.
    fresh_epoch: int = 0


def load_or_create(state_dir: str, name: str, now: float | None = None) -> NodeRecord:
    """Read node.json (creating the dir and file on first start) and count this boot."""
    directory = Path(state_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        remove_stale_temporaries(directory)
    except OSError as e:
        raise StateDirError(f"state dir {state_dir}: {e.strerror}") from None
    path = directory / NODE_FILE
    record = NodeRecord(node_id=secrets.token_hex(16), name=name, boots=0, incarnation=0)
    if path.exists():
        try:
            record = _parse(path, name)
        except (OSError, ValueError, KeyError, TypeError) as e:
            aside = path.with_name(f"{NODE_FILE}.bad-{int(time.time())}")
            try:
                os.replace(path, aside)
            except OSError as e2:
                raise StateDirError(f"{path}: unusable ({e}) and cannot be set aside: "
                                    f"{e2.strerror}") from None
            log.warning("%s is unusable (%s); set aside as %s, starting with a new node record",
                        path, e, aside.name)
    record.name = name
    record.boots += 1
    # Above the saved one, and above the wall clock in ms: a previous life that refuted
    # suspicions raised its incarnation in memory only, and with identity the cluster's claims
    # above what this life has signed are refused, so "the cluster tells it" cannot lift it.
    # A life would need more than one refutation a millisecond to outrun the clock.
    record.incarnation = max(record.incarnation + 1,
                             0 if now is None else min(int(now * 1000), MAX_START_INCARNATION))
    try:
        save(state_dir, record)
    except OSError as e:
        raise StateDirError(f"state dir {state_dir}: cannot write {NODE_FILE}: "
                            f"{e.strerror or error_line(e)}") from None
    return record


def _parse(path: Path, name: str) -> NodeRecord:
    """node.json, checked: ValueError (or KeyError/TypeError) says what is wrong."""
    if path.stat().st_size > MAX_NODE_FILE_BYTES:
        raise ValueError("larger than any node record")
    try:
        data = json.loads(path.read_bytes())
    except RecursionError:  # `[[[[...` within the size bound: json's own stack limit
        raise ValueError("nested too deeply to be a node record") from None
    node_id, boots, incarnation = data["node_id"], data["boots"], data["incarnation"]
    if type(node_id) is not str or not _NODE_ID_RE.fullmatch(node_id):
        raise ValueError("node_id is not 32 hex digits")
    if type(boots) is not int or boots < 0:
        raise ValueError("boots is not a count")
    # One below the bound: this boot adds one, and a refutation may add one more.
    if type(incarnation) is not int or not 0 <= incarnation < MAX_CLAIM_INCARNATION - 1:
        raise ValueError(f"incarnation {incarnation!r} is out of range")
    fresh_epoch = data.get("fresh_epoch", 0)  # absent in records written before it existed
    if type(fresh_epoch) is not int or not 0 <= fresh_epoch < 1 << 48:
        raise ValueError(f"fresh_epoch {fresh_epoch!r} is out of range")
    return NodeRecord(node_id=node_id, name=name, boots=boots, incarnation=incarnation,
                      fresh_epoch=fresh_epoch)


def save(state_dir: str, record: NodeRecord) -> bool:
    """Write node.json; False if the disk is full (kept and retried later, one warning line
    per outage). Any other OSError is raised."""
    path = Path(state_dir) / NODE_FILE
    was_pending = path in DEFERRED.pending
    if DEFERRED.write(path, json.dumps(asdict(record)).encode() + b"\n"):
        return True
    if not was_pending:
        log.warning("cannot write %s: the disk is full; running on with the record in memory, "
                    "written when space returns (counted in store.file_save_errors)", path)
    return False
