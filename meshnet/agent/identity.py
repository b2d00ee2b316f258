"""The node's record in the state dir: who it is and how many times it has started.

The incarnation is stored so a restarted node announces itself above anything the cluster
may still believe about its previous life.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from meshnet.fsutil import atomic_write, remove_stale_temporaries

NODE_FILE = "node.json"


class StateDirError(Exception):
    pass


@dataclass
class NodeRecord:
    node_id: str
    name: str
    boots: int
    incarnation: int


def load_or_create(state_dir: str, name: str) -> NodeRecord:
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
            data = json.loads(path.read_bytes())
            record = NodeRecord(
                node_id=str(data["node_id"]),
                name=str(data.get("name", name)),
                boots=int(data["boots"]),
                incarnation=int(data["incarnation"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StateDirError(f"{path}: unreadable node record ({e})") from None
    record.name = name
    record.boots += 1
    record.incarnation += 1
    save(state_dir, record)
    return record


def save(state_dir: str, record: NodeRecord) -> None:
    atomic_write(Path(state_dir) / NODE_FILE, json.dumps(asdict(record)).encode() + b"\n")
