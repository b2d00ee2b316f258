from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from meshnet.fsutil import atomic_write, remove_stale_temporaries


def test_atomic_write_sets_mode_and_content(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "f.json"
    atomic_write(p, b"hello", mode=0o600)
    assert p.read_bytes() == b"hello"
    assert (p.stat().st_mode & 0o777) == 0o600


def test_kill9_mid_write_never_leaves_a_torn_file(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, json.dumps({"n": 0, "pad": "x" * 100_000}).encode())
    for round_ in range(10):
        pid = os.fork()
        if pid == 0:  # child: rewrite forever until killed
            n = 0
            while True:
                n += 1
                atomic_write(target, json.dumps({"n": n, "pad": "x" * 100_000}).encode())
        time.sleep(0.02 + 0.01 * round_)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        doc = json.loads(target.read_bytes())  # raises if torn
        assert len(doc["pad"]) == 100_000
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
