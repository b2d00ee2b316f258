"""Signatures and authorization in the replicated store (issue #13): the signer signs every local
write, the authorizer judges every remote one; final refusals are remembered, deferred ones are
retried by anti-entropy until accepted. The identity layer's real signer/authorizer are stood in
for by a keyed BLAKE2b (64 bytes, like Ed25519) and a table of known writers."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from meshnet import wire
from meshnet.agent.state_service import StateService
from meshnet.agent.store_db import StoreDb
from meshnet.state import (
    SIG_BYTES,
    Entry,
    Hlc,
    Refusal,
    StateProtocolError,
    Store,
    StoreConfig,
    codec,
    copy_order,
    entry_order,
    merge,
)
from meshnet.state.validate import check_value

T0 = 1_700_000_000.0
NET = {"name": "n1", "vni": 5000, "subnet": "10.1.0.0/24", "encrypted": False}


def sign_as(writer: str) -> Callable[[bytes], bytes]:
    """A fake signer: keyed BLAKE2b of the signed bytes, 64 bytes long like an Ed25519 sig."""
    def sign(msg: bytes) -> bytes:
        return hashlib.blake2b(msg, key=writer.encode(), digest_size=SIG_BYTES).digest()
    return sign


def signed(e: Entry, writer: str | None = None) -> Entry:
    return Entry(e.table, e.key, e.value, e.hlc, e.writer,
                 sign_as(writer or e.writer)(codec.signed_bytes(e)))


def forged(e: Entry) -> Entry:
    return Entry(e.table, e.key, e.value, e.hlc, e.writer, bytes(SIG_BYTES))


class Authority:
    """A fake authorizer: a writer must be known (else: deferred, "no certificate yet") and
    the signature must be its own (else: final). Records every call."""

    def __init__(self, *known: str) -> None:
        self.known = set(known)
        self.calls: list[tuple[Entry, Mapping[str, Any] | None, float]] = []

    def __call__(self, e: Entry, data: Mapping[str, Any] | None, now: float) -> Refusal | None:
        self.calls.append((e, None if data is None else dict(data), now))
        if e.writer not in self.known:
            return Refusal(f"{e.table}/{e.key}: no certificate yet for {e.writer}", final=False)
        if not e.sig:
            return Refusal(f"{e.table}/{e.key}: unsigned", final=True)
        if e.sig != sign_as(e.writer)(codec.signed_bytes(e)):
            return Refusal(f"{e.table}/{e.key}: bad signature of {e.writer}", final=True)
        return None


def node(name: str, auth: Authority | None = None, **kw: Any) -> Store:
    return Store(name, StoreConfig(signer=sign_as(name), authorizer=auth, **kw))


def write(table: str, key: str, value: dict[str, Any] | None, wall: float, writer: str,
          sig: bool = True) -> Entry:
    e = Entry(table, key, None if value is None else wire.pack(value),
              Hlc(int(wall * 1000), 0), writer)
    return signed(e) if sig else e


def exchange(a: Store, b: Store, now: float) -> tuple[int, int]:
    """One anti-entropy exchange started by A; (entries B shipped, entries A shipped back)."""
    diff = b.diff_for(a.digest())
    back = a.apply_entries(diff, now)
    assert back is not None
    assert b.apply_entries(back, now) is None
    return len(codec.decode_entries(diff).entries), len(codec.decode_entries(back).entries)


def quiet_both_ways(a: Store, b: Store, now: float) -> bool:
    return exchange(a, b, now) == (0, 0) and exchange(b, a, now) == (0, 0)


def full(s: Store) -> list[Entry]:
    return sorted(s.entries(), key=lambda e: (e.table, e.key))


# ---- codec -----------------------------------------------------------------------------------


def test_signed_bytes_are_the_unsigned_entry() -> None:
    e = write("networks", "n1", NET, T0, "a", sig=False)
    s = signed(e)
    assert codec.signed_bytes(e) == codec.signed_bytes(s) == codec.encode_entry(e)
    assert codec.signed_bytes(s) == wire.pack(["networks", "n1", e.value, e.hlc.pack(), "a"])
    assert wire.unpack(codec.encode_entry(e)) == ["networks", "n1", e.value, e.hlc.pack(), "a"]
    assert wire.unpack(codec.encode_entry(s))[5] == s.sig and len(s.sig) == SIG_BYTES
    tomb = write("networks", "n1", None, T0, "a", sig=False)
    assert codec.signed_bytes(tomb) == wire.pack(["networks", "n1", None, tomb.hlc.pack(), "a"])


@pytest.mark.parametrize("sig", [False, True])
def test_codec_round_trips_with_and_without_sig(sig: bool) -> None:
    live = write("networks", "n1", NET, T0, "a", sig=sig)
    tomb = write("services", "web", None, T0 + 1, "b", sig=sig)
    for e in (live, tomb):
        assert codec.decode_delta(codec.encode_delta(e)).entry == e
    msg = codec.decode_entries(codec.encode_entries([live, tomb], {"networks": (0, [0])}))
    assert [d.entry for d in msg.entries] == [live, tomb]
    assert msg.entries[0].data == NET and msg.entries[1].data is None
    assert msg.requests == {"networks": (0, frozenset({0}))}


def test_decoder_takes_longer_entries_and_nil_as_unsigned() -> None:
    e = write("networks", "n1", NET, T0, "a")
    body = codec.entry_body(e)
    newer = wire.frame(codec.MsgType.DELTA, [[*body, "a field from a newer peer"]])
    assert codec.decode_delta(newer).entry == e
    nil = wire.frame(codec.MsgType.DELTA, [[*body[:5], None, 7]])
    assert codec.decode_delta(nil).entry.sig == b""


@pytest.mark.parametrize("bad", [b"", b"x" * 63, b"x" * 65, "x" * 64, 64, [b"x" * 64], True])
def test_a_bad_sig_is_a_protocol_error(bad: object) -> None:
    body = codec.entry_body(write("networks", "n1", NET, T0, "a", sig=False))
    with pytest.raises(StateProtocolError, match="sig"):
        codec.decode_delta(wire.frame(codec.MsgType.DELTA, [[*body, bad]]))
    with pytest.raises(StateProtocolError, match="sig"):
        codec.decode_entries(wire.frame(codec.MsgType.ENTRIES, [1, [[*body, bad]], None]))
    s = Store("z")
    with pytest.raises(StateProtocolError):
        s.apply_delta(wire.frame(codec.MsgType.DELTA, [[*body, bad]]), T0)
    assert s.stats.bad_messages == 1 and len(s) == 0


def test_order_ignores_the_sig_copy_order_breaks_the_tie() -> None:
    e = write("networks", "n1", NET, T0, "a", sig=False)
    s, f = signed(e), forged(e)
    assert entry_order(e) == entry_order(s) == entry_order(f)
    assert copy_order(e) < copy_order(f) < copy_order(s)  # b"" < zeros < the BLAKE2b here
    for x, y in ((e, s), (s, f), (e, f)):
        assert merge(x, y) == merge(y, x) == max(x, y, key=copy_order)
    newer = write("networks", "n1", NET, T0 + 1, "a", sig=False)
    assert merge(s, newer) == newer  # a signature never makes a write newer


# ---- the signer ------------------------------------------------------------------------------


def test_every_local_write_is_signed() -> None:
    a = node("a")
    put = a.put("endpoints", "n1/x", {"node": "a", "ip": "10.1.0.5"}, T0)
    assert put.sig == sign_as("a")(codec.signed_bytes(put)) and len(put.sig) == SIG_BYTES
    other = a.put("networks", "n1", NET, T0)
    gone = a.delete("networks", "n1", T0 + 1)
    assert gone is not None and gone.sig == sign_as("a")(codec.signed_bytes(gone))
    (again,) = a.reannounce("a", T0 + 2)
    assert again.hlc > put.hlc and again.sig == sign_as("a")(codec.signed_bytes(again))
    assert other.sig != gone.sig
    # what is gossiped and what is persisted carries the signature
    b = Store("b")
    for msg in a.take_deltas(100_000):
        b.apply_delta(msg, T0 + 3)
    assert full(b) == full(a)
    assert all(e.sig for e in a.take_dirty().upserts)


def test_set_signer_applies_to_later_writes_only() -> None:
    a = Store("a")
    unsigned = a.put("networks", "n1", NET, T0)
    assert unsigned.sig == b"" and a.signer is None
    a.set_signer(sign_as("a"))
    assert a.entry("networks", "n1") == unsigned
    assert a.put("networks", "n2", {**NET, "name": "n2"}, T0).sig
    a.set_signer(None)
    assert a.put("networks", "n3", {**NET, "name": "n3"}, T0).sig == b""
    with pytest.raises(ValueError):
        a.set_signer(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        StoreConfig(signer=42)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [b"short", b"x" * 65, "x" * 64, None])
def test_a_signer_returning_no_signature_fails_the_write(bad: object) -> None:
    a = Store("a", StoreConfig(signer=lambda _msg: bad))  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="signer"):
        a.put("networks", "n1", NET, T0)
    assert len(a) == 0 and a.pending_deltas() == 0 and a.take_dirty().upserts == []


# ---- the authorizer --------------------------------------------------------------------------


def test_authorizer_judges_remote_writes_only() -> None:
    auth = Authority("a", "b")
    b = node("b", auth, validator=check_value)
    b.put("networks", "n1", NET, T0)
    b.delete("networks", "n1", T0 + 1)
    b.load([write("networks", "n9", {**NET, "name": "n9"}, T0, "x", sig=False)], T0)
    assert auth.calls == []  # neither local writes nor our own disk
    e = write("networks", "n2", {**NET, "name": "n2"}, T0 + 2, "a")
    assert b.apply_delta(codec.encode_delta(e), T0 + 2)
    tomb = write("networks", "n2", None, T0 + 3, "a")
    assert b.apply_delta(codec.encode_delta(tomb), T0 + 3)
    assert auth.calls == [(e, {**NET, "name": "n2"}, T0 + 2), (tomb, None, T0 + 3)]
    # the validator goes first: an invalid value never reaches the authorizer
    bad = write("networks", "n3", {**NET, "name": "n3", "vni": 1}, T0 + 4, "a")
    assert not b.apply_delta(codec.encode_delta(bad), T0 + 4)
    assert b.stats.refused_invalid == 1 and len(auth.calls) == 2
    # nor does anything we would not take anyway (stale)
    assert not b.apply_delta(codec.encode_delta(e), T0 + 5)
    assert len(auth.calls) == 2


def test_final_refusal_not_installed_counted_logged_remembered() -> None:
    auth = Authority("a", "b")
    b = node("b", auth)
    clock = b.clock
    evil = forged(write("networks", "n1", NET, T0 + 100, "a", sig=False))
    assert not b.apply_delta(codec.encode_delta(evil), T0)
    assert len(b) == 0 and b.pending_deltas() == 0 and b.take_dirty().upserts == []
    assert b.clock == clock  # a refused write does not drag our clock along
    st = b.stats
    assert st.refused_unauthorized == 1 and st.refused_unauthorized_by_table == {"networks": 1}
    assert st.refused_invalid == 0 and st.refused_by_table == {} and st.refused_deferred == 0
    assert b.take_refusals() == ["networks/n1: bad signature of a"]
    # offered again: recognized, not judged, counted or logged again
    calls = len(auth.calls)
    assert not b.apply_delta(codec.encode_delta(evil), T0)
    assert st.refused_unauthorized == 1 and st.refused_unauthorized_repeats == 1
    assert len(auth.calls) == calls and b.take_refusals() == []
    # unsigned writes are this authority's final refusal too
    assert not b.apply_delta(codec.encode_delta(write("services", "s", {}, T0, "a", False)), T0)
    assert st.refused_unauthorized_by_table == {"networks": 1, "services": 1}


def test_a_forged_copy_first_does_not_block_the_genuine_write() -> None:
    b = node("b", Authority("a", "b"))
    genuine = write("networks", "n1", NET, T0, "a")
    assert not b.apply_delta(codec.encode_delta(forged(genuine)), T0)
    assert b.apply_delta(codec.encode_delta(genuine), T0)
    assert b.entry("networks", "n1") == genuine and b.stats.refused_unauthorized == 1


def test_unauthorized_by_table_is_bounded() -> None:
    b = node("b", Authority("a"))
    for i in range(100):
        b.apply_delta(codec.encode_delta(forged(write(f"t{i}", "k", {}, T0, "a"))), T0)
    by = b.stats.refused_unauthorized_by_table
    assert len(by) <= 17 and sum(by.values()) == 100 and by["(other)"] == 84


def test_a_forged_expired_tombstone_moves_no_horizon() -> None:
    b = node("b", Authority("a", "b"), tombstone_ttl=10.0)
    late = forged(write("networks", "gone", None, T0 - 100, "a", sig=False))
    assert not b.apply_delta(codec.encode_delta(late), T0)
    assert b.gc_horizon == (0, "") and b.stats.refused_unauthorized == 1
    # so an old (genuine) write of another key still comes in
    assert b.apply_delta(codec.encode_delta(write("networks", "n1", NET, T0 - 200, "a")), T0)
    # a genuine expired tombstone does move it
    assert not b.apply_delta(codec.encode_delta(write("networks", "x", None, T0 - 50, "a")), T0)
    assert b.gc_horizon[0] == Hlc(int((T0 - 50) * 1000), 0).pack()


def test_deferred_write_is_counted_not_remembered_and_taken_on_a_later_exchange() -> None:
    auth = Authority("b")  # b knows no certificate of a's yet
    a = node("a", Authority("a"))
    b = node("b", auth)
    e = a.put("networks", "n1", NET, T0)
    (msg,) = a.take_deltas(100_000)
    assert not b.apply_delta(msg, T0)
    assert len(b) == 0 and b.pending_deltas() == 0
    assert b.stats.refused_deferred == 1 and b.stats.refused_unauthorized == 0
    assert b.take_refusals() == [] and not b._refused  # not logged, not remembered
    # anti-entropy offers it again at each exchange (one bucket), still deferred...
    for i in range(3):
        assert exchange(b, a, T0 + 1 + i) == (1, 0)
    assert b.stats.refused_deferred == 4 and len(b) == 0
    # ...until the authorizer knows the writer: the next exchange takes it
    auth.known.add("a")
    assert exchange(b, a, T0 + 10) == (1, 0)
    assert b.entry("networks", "n1") == e and b.stats.applied == 1
    assert b.digest() == a.digest() and quiet_both_ways(a, b, T0 + 11)
    assert b.stats.refused_deferred == 4


def test_authorizer_errors_defer_and_are_logged() -> None:
    def broken(e: Entry, data: Mapping[str, Any] | None, now: float) -> Refusal | None:
        raise RuntimeError("bug")

    b = node("b", broken)  # type: ignore[arg-type]
    e = write("networks", "n1", NET, T0, "a")
    assert not b.apply_delta(codec.encode_delta(e), T0)
    assert b.stats.authorizer_errors == 1 and b.stats.refused_deferred == 1
    assert b.take_refusals() == ["networks/n1: authorizer failed (RuntimeError)"]
    b.set_authorizer(lambda e, d, n: "no")  # type: ignore[arg-type,return-value]
    assert not b.apply_delta(codec.encode_delta(e), T0)
    assert b.stats.authorizer_errors == 2 and "returned str" in b.take_refusals()[0]
    b.set_authorizer(Authority("a"))
    assert b.apply_delta(codec.encode_delta(e), T0)  # never lost to the bug


def test_set_authorizer_any_time_forgets_the_old_ones_refusals() -> None:
    b = node("b", Authority("a"))
    evil = forged(write("networks", "n1", NET, T0, "a"))
    b.apply_delta(codec.encode_delta(evil), T0)
    b.put("networks", "n2", {**NET, "name": "n2"}, T0)
    assert b._refused
    same = b.authorizer
    assert same is not None
    b.set_authorizer(same)
    assert b._refused  # the same judge: its refusals stand
    bound = Authority("a")
    b.set_authorizer(bound.__call__)
    b.apply_delta(codec.encode_delta(evil), T0)
    assert b.stats.refused_unauthorized == 2
    b.set_authorizer(bound.__call__)  # the same bound method again (a new object, equal)
    assert b._refused
    b.set_authorizer(lambda e, d, n: None)
    assert not b._refused
    assert b.apply_delta(codec.encode_delta(evil), T0)  # the new judge lets it in
    with pytest.raises(ValueError):
        b.set_authorizer(1)  # type: ignore[arg-type]


# ---- replicas together -----------------------------------------------------------------------


def test_two_signing_authorizing_stores_converge() -> None:
    a = node("a", Authority("a", "b"))
    b = node("b", Authority("a", "b"))
    for i in range(30):
        a.put("networks", f"a{i}", {**NET, "name": f"a{i}"}, T0 + i)
        b.put("networks", f"b{i}", {**NET, "name": f"b{i}"}, T0 + i)
        if i % 3 == 0:
            b.put("networks", f"a{i}", {**NET, "name": f"a{i}", "vni": 6000}, T0 + i + 0.5)
    a.delete("networks", "a1", T0 + 40)
    for msg in a.take_deltas(3000):
        b.apply_delta(msg, T0 + 41)
    exchange(a, b, T0 + 42)
    assert full(a) == full(b) and a.digest() == b.digest()
    assert quiet_both_ways(a, b, T0 + 43)
    assert all(e.sig == sign_as(e.writer)(codec.signed_bytes(e)) for e in a.entries())
    for s in (a, b):
        assert s.stats.refused_unauthorized == s.stats.refused_deferred == 0


def test_anti_entropy_with_a_holder_of_forged_writes_goes_quiet() -> None:
    """A replica that does not judge (an agent from before identity) holds a forged write of a
    new key and a forged copy of a genuine write: the judging one refuses both once, and then
    the two exchange nothing either way."""
    holder = Store("h")
    b = node("b", Authority("a", "b"))
    genuine = write("networks", "n1", NET, T0, "a")
    for e in (genuine, forged(write("networks", "n2", {**NET, "name": "n2"}, T0, "a"))):
        holder.apply_delta(codec.encode_delta(e), T0)
    exchange(b, holder, T0)
    assert b.stats.refused_unauthorized == 1 and set(b.networks()) == {"n1"}
    # a forged copy of the genuine write with a larger signature: the holder keeps it
    # (copy_order), the judge keeps the genuine one
    big = Entry(genuine.table, genuine.key, genuine.value, genuine.hlc, "a", b"\xff" * SIG_BYTES)
    holder.apply_delta(codec.encode_delta(big), T0 + 1)
    assert holder.entry("networks", "n1") == big
    exchange(b, holder, T0 + 2)
    assert b.entry("networks", "n1") == genuine and b.stats.refused_unauthorized == 2
    assert holder.digest() != b.digest()
    repeats = b.stats.refused_unauthorized_repeats
    for i in range(4):
        assert quiet_both_ways(b, holder, T0 + 3 + i)
    assert b.stats.refused_unauthorized == 2
    assert b.stats.refused_unauthorized_repeats == repeats
    assert b.stats.ae_buckets_skipped + holder.stats.ae_buckets_skipped > 0
    # the genuine write with a newer value at the holder still gets through
    newer = write("networks", "n1", {**NET, "vni": 6000}, T0 + 10, "a")
    holder.apply_delta(codec.encode_delta(newer), T0 + 10)
    exchange(b, holder, T0 + 10)
    assert b.entry("networks", "n1") == newer


def test_a_judge_replaces_a_bad_copy_of_a_write_by_the_genuine_one() -> None:
    """A copy that came from our own disk (never judged) is replaced by the genuine copy of
    the same write as soon as one arrives, whatever the tie-break says."""
    genuine = write("networks", "n1", NET, T0, "a")
    for bad_sig in (b"", b"\x00" * SIG_BYTES, b"\xff" * SIG_BYTES):
        bad = Entry(genuine.table, genuine.key, genuine.value, genuine.hlc, "a", bad_sig)
        b = node("b", Authority("a", "b"))
        assert b.load([bad], T0) == 1
        assert b.apply_delta(codec.encode_delta(genuine), T0)
        assert b.entry("networks", "n1") == genuine and b.stats.copies_replaced == 1
        assert b.take_dirty().upserts == [genuine]  # persisted, and re-gossiped
        assert b.pending_deltas() == 1
        # and a judge holding the genuine copy never takes another one
        assert not b.apply_delta(codec.encode_delta(bad), T0)
        assert b.entry("networks", "n1") == genuine


def test_replicas_without_a_judge_converge_on_the_same_copy() -> None:
    e = write("networks", "n1", NET, T0, "a", sig=False)
    copies = [e, signed(e), forged(e), Entry(e.table, e.key, e.value, e.hlc, "a", b"\x07" * 64)]
    stores = [Store(f"s{i}") for i in range(len(copies))]
    for s, c in zip(stores, copies, strict=True):
        s.apply_delta(codec.encode_delta(c), T0)
    for _ in range(2):
        for x in stores:
            for y in stores:
                if x is not y:
                    exchange(x, y, T0)
    best = max(copies, key=copy_order)
    assert all(s.entry("networks", "n1") == best for s in stores)
    assert len({s.digest() for s in stores}) == 1


def test_digests_see_the_signature() -> None:
    e = write("networks", "n1", NET, T0, "a", sig=False)
    plain, sig = Store("x"), Store("y")
    plain.apply_delta(codec.encode_delta(e), T0)
    sig.apply_delta(codec.encode_delta(signed(e)), T0)
    assert plain.digest() != sig.digest()
    # an unsigned entry hashes as it always did: unsigned stores keep their digests
    old = Store("z")
    old.apply_entries(wire.frame(codec.MsgType.ENTRIES, [1, [codec.entry_body(e)], None]), T0)
    assert old.digest() == plain.digest()


def test_horizon_tombstone_in_a_reply_is_signed() -> None:
    a = node("a", Authority("a", "b"), tombstone_ttl=10.0)
    b = node("b", Authority("a", "b"), tombstone_ttl=10.0)
    old = b.put("networks", "n1", NET, T0)
    a.apply_delta(codec.encode_delta(old), T0)
    a.delete("networks", "n1", T0 + 1)
    a.handle_timer(T0 + 20)  # collected: a's horizon now covers b's old write
    assert len(a) == 0
    diff = b.diff_for(a.digest())
    back = a.apply_entries(diff, T0 + 21)
    assert back is not None
    (gone,) = [d.entry for d in codec.decode_entries(back).entries]
    assert gone.value is None and gone.writer == "a"
    assert gone.sig == sign_as("a")(codec.signed_bytes(gone))
    b.apply_entries(back, T0 + 21)
    assert b.get("networks", "n1") is None and b.stats.refused_unauthorized == 0


def test_status_counters_include_the_new_fields(tmp_path: Path) -> None:
    async def counters() -> dict[str, Any]:
        s = node("b", Authority("b"))
        s.apply_delta(codec.encode_delta(write("networks", "n1", NET, T0, "a")), T0)
        s.apply_delta(codec.encode_delta(forged(write("networks", "n2", NET, T0, "b"))), T0)
        db = StoreDb(tmp_path / "s.db")
        try:
            return StateService(s, db, "b").counters
        finally:
            db.close()

    c = asyncio.run(counters())
    assert c["refused_deferred"] == 1 and c["refused_unauthorized"] == 1
    assert c["refused_unauthorized_by_table"] == {"networks": 1}
    for name in ("refused_unauthorized_repeats", "authorizer_errors", "copies_replaced"):
        assert c[name] == 0
