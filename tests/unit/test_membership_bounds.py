"""Incarnation numbers are bounded: a claim above MAX_CLAIM_INCARNATION is refused and counted,
a refutation never overflows, and a node record that would break either is set aside (#13)."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest

from meshnet.agent import identity
from meshnet.membership import (
    MAX_CLAIM_INCARNATION,
    Membership,
    MembershipConfig,
    MemberState,
    NodeMeta,
)
from meshnet.membership.messages import (
    MAX_INCARNATION,
    Alive,
    Dead,
    PushPull,
    PushPullState,
    Suspect,
    make_compound,
)


def mk(i: int) -> Membership:
    return Membership(MembershipConfig.lan(), NodeMeta(f"n{i}", (f"10.0.0.{i}", 7946)),
                      random.Random(i), 0.0)


def alive(i: int, inc: int) -> bytes:
    meta = NodeMeta(f"n{i}", (f"10.0.0.{i}", 7946))
    return Alive(inc, meta, meta.encode()).encode()


def drain(m: Membership) -> list[tuple[bytes, tuple[str, int]]]:
    return m.datagrams_to_send(0.0)


@pytest.mark.parametrize("inc", [MAX_CLAIM_INCARNATION + 1, 1 << 63, MAX_INCARNATION])
def test_claims_above_the_bound_are_refused_and_counted(inc: int) -> None:
    a = mk(1)
    a.receive_datagram(alive(2, 3), ("10.0.0.2", 7946), 0.0)
    before = a.member("n2")
    assert before is not None and before.incarnation == 3
    forged = NodeMeta("n2", ("10.6.6.6", 7946))
    for msg in (Alive(inc, forged, forged.encode()).encode(), Suspect(inc, "n2", "n9").encode(),
                Dead(inc, "n2", "n9").encode(), Dead(inc, "n2", "n2").encode()):
        a.receive_datagram(msg, ("10.0.0.9", 7946), 1.0)
    after = a.member("n2")
    assert after == before  # same address, state and incarnation
    assert a.stats["claims_out_of_bound"] == 4
    # about ourselves: no refutation, so nothing can push us past what encodes
    for msg in (Suspect(inc, "n1", "n9").encode(), Dead(inc, "n1", "n9").encode()):
        a.receive_datagram(msg, ("10.0.0.9", 7946), 2.0)
    assert a.incarnation == 0 and a.stats["claims_out_of_bound"] == 6


def test_a_claim_at_the_bound_is_refuted_and_the_refutation_encodes() -> None:
    a = mk(1)
    a.receive_datagram(alive(2, 0), ("10.0.0.2", 7946), 0.0)  # someone to refute to
    drain(a)
    a.receive_datagram(Suspect(MAX_CLAIM_INCARNATION - 1, "n1", "n2").encode(),
                       ("10.0.0.2", 7946), 1.0)
    assert a.incarnation == MAX_CLAIM_INCARNATION
    assert drain(a)  # the refutation went out: it encoded
    a.receive_datagram(Suspect(MAX_CLAIM_INCARNATION, "n1", "n2").encode(),
                       ("10.0.0.2", 7946), 2.0)
    assert a.incarnation == MAX_CLAIM_INCARNATION + 1  # one above the bound is the most
    assert drain(a)


def test_push_pull_rows_above_the_bound_are_skipped() -> None:
    a = mk(1)
    meta = NodeMeta("n2", ("10.0.0.2", 7946))
    ok = NodeMeta("n3", ("10.0.0.3", 7946))
    pp = PushPull(False, [PushPullState("n2", MAX_INCARNATION, MemberState.ALIVE, meta,
                                        meta.encode()),
                          PushPullState("n3", 1, MemberState.ALIVE, ok, ok.encode())], b"")
    assert a.handle_stream_request(pp.encode(), ("10.0.0.2", 7946), 0.0) is not None
    assert a.member("n2") is None and a.member("n3") is not None
    assert a.stats["claims_out_of_bound"] == 1


def test_a_bound_claim_in_a_compound_does_not_drop_its_neighbours() -> None:
    a = mk(1)
    packet = make_compound([Suspect(MAX_INCARNATION, "n1", "n9").encode(), alive(3, 1)])
    a.receive_datagram(packet, ("10.0.0.9", 7946), 0.0)
    assert a.member("n3") is not None and a.stats["bad_packets"] == 0


def test_membership_refuses_to_start_above_the_bound() -> None:
    with pytest.raises(ValueError, match="incarnation"):
        Membership(MembershipConfig.lan(), NodeMeta("n1", ("10.0.0.1", 7946)),
                   random.Random(1), 0.0, incarnation=MAX_CLAIM_INCARNATION + 1)


# ---------------------------------------------------------------- node.json


def write_record(d: Path, **over: object) -> None:
    rec = {"node_id": "ab" * 16, "name": "n1", "boots": 3, "incarnation": 7}
    rec.update(over)
    (d / identity.NODE_FILE).write_text(json.dumps(rec))


def test_a_good_record_counts_the_boot(tmp_path: Path) -> None:
    write_record(tmp_path)
    rec = identity.load_or_create(str(tmp_path), "n1")
    assert (rec.node_id, rec.boots, rec.incarnation) == ("ab" * 16, 4, 8)


@pytest.mark.parametrize("over", [
    {"incarnation": 1 << 64}, {"incarnation": MAX_CLAIM_INCARNATION}, {"incarnation": -1},
    {"incarnation": "7"}, {"boots": -2}, {"node_id": "not hex"}, {"node_id": "ab" * 16 + "\n"},
])
def test_a_bad_record_is_set_aside_and_the_node_starts_afresh(
        tmp_path: Path, over: dict[str, object], caplog: pytest.LogCaptureFixture) -> None:
    write_record(tmp_path, **over)
    with caplog.at_level(logging.WARNING):
        rec = identity.load_or_create(str(tmp_path), "n1")
    assert rec.boots == 1 and rec.incarnation == 1 and rec.node_id != "ab" * 16
    aside = list(tmp_path.glob("node.json.bad-*"))
    assert len(aside) == 1 and json.loads(aside[0].read_text())["node_id"] == over.get(
        "node_id", "ab" * 16)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and aside[0].name in warnings[0].getMessage()
    # and the next start reads the fresh record
    assert identity.load_or_create(str(tmp_path), "n1").boots == 2


def test_garbage_node_json_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / identity.NODE_FILE).write_bytes(b"\x00garbage{")
    assert identity.load_or_create(str(tmp_path), "n1").incarnation == 1
    assert len(list(tmp_path.glob("node.json.bad-*"))) == 1


def test_a_start_begins_at_the_wall_clock_in_ms(tmp_path: Path) -> None:
    """Refutations raise the incarnation in memory only; each start begins at least at the
    clock in ms, so it is above what a previous life reached (test_membership_reconnect)."""
    now = 1_800_000_000.5
    first = identity.load_or_create(str(tmp_path), "n1", now)
    assert first.incarnation == int(now * 1000)
    again = identity.load_or_create(str(tmp_path), "n1", now - 3600)  # clock set back
    assert again.incarnation == first.incarnation + 1
    later = identity.load_or_create(str(tmp_path), "n1", now + 5)
    assert later.incarnation == int((now + 5) * 1000)
