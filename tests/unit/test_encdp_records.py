"""The encrypted datapath's record layer without sockets or TAPs: frames are sealed into records
and opened again, and the burst fast path on receive (_rx_burst) behaves exactly like opening
record by record (_rx_each), whatever an attacker or the network does to the datagrams."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.agent import encdp
from meshnet.agent.encdp import (
    INNER_LEN,
    EncryptedDatapath,
    InboundSA,
    OutboundSA,
    _Net,
    _RxBuf,
    _TxBuf,
)

PEER = "10.0.0.2"
VNI = 42
KEY = bytes(range(32))
SPI = 0x1234
GRO_MAX = 44


class Harness:
    """One sending and one receiving datapath; what the sender sends is captured as datagrams,
    what the receiver writes to its TAP is captured as frames."""

    def __init__(self, mtu: int = 1500) -> None:
        self.tx_dp = EncryptedDatapath("10.0.0.1", underlay_mtu=mtu)
        self.rx_dp = EncryptedDatapath(PEER, underlay_mtu=mtu)
        self.sa = OutboundSA(spi=SPI, key=KEY)
        self.peer = self.tx_dp._peer(PEER)
        self.tx = _TxBuf(self.tx_dp.payload, self.tx_dp.seg)
        self.datagrams: list[bytes] = []

        def send(addr: Any, view: memoryview, total: int, count: int, seg: int) -> None:
            self.datagrams += [bytes(view[o : min(o + seg, total)]) for o in range(0, total, seg)]

        self.tx_dp._send = send  # type: ignore[method-assign]

    def seal(self, stream: bytes) -> list[bytes]:
        """Seal one (vnet header | frame) stream; return its datagrams."""
        self.datagrams = []
        self.tx.load(stream)
        self.tx_dp._seal_send(self.peer, self.sa, VNI, len(stream), self.tx)
        return self.datagrams


def receiver(mtu: int = 1500) -> tuple[EncryptedDatapath, list[bytes]]:
    dp = EncryptedDatapath(PEER, underlay_mtu=mtu)
    dp.set_inbound("10.0.0.1", {SPI: InboundSA(spi=SPI, key=KEY)})
    dp._nets = {VNI: _Net(VNI, None, "br")}  # type: ignore[arg-type]
    frames: list[bytes] = []
    dp._tap_write = lambda net, pieces: frames.append(b"".join(pieces))  # type: ignore[method-assign]
    return dp, frames


def gro_runs(datagrams: list[bytes]) -> list[tuple[bytes, int]]:
    """What UDP GRO hands up: consecutive datagrams of one size glued together (at most
    GRO_MAX, and at most 64 KB), a shorter one ending a run."""
    runs: list[tuple[bytes, int]] = []
    cur: list[bytes] = []
    for d in datagrams:
        if cur and (
            len(d) > len(cur[0])
            or len(cur[-1]) < len(cur[0])
            or len(cur) == GRO_MAX
            or sum(map(len, cur)) + len(d) > 65535
        ):
            runs.append((b"".join(cur), len(cur[0])))
            cur = []
        cur.append(d)
    if cur:
        runs.append((b"".join(cur), len(cur[0])))
    return runs


def feed(dp: EncryptedDatapath, runs: list[tuple[bytes, int]], *, burst: bool) -> None:
    """Hand DP the receives RUNS; without BURST every record takes the one-by-one path."""
    if not burst:
        dp._rx_burst = lambda *a: False  # type: ignore[method-assign]
    rx = _RxBuf(dp.seg)
    asm: dict[Any, Any] = {}
    for data, seg in runs:
        rx.buf[: len(data)] = data
        dp._rx_run(rx, len(data), seg, ("10.0.0.1", encdp.DEFAULT_PORT), asm)


def count_slow_path(dp: EncryptedDatapath) -> list[int]:
    """A list that grows by one each time DP opens a receive record by record."""
    calls: list[int] = []
    each = dp._rx_each

    def counted(*a: Any) -> int:
        calls.append(1)
        return each(*a)

    dp._rx_each = counted  # type: ignore[method-assign]
    return calls


def stream(size: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(size))


def test_frames_of_every_size_arrive_whole_and_records_fit_the_mtu() -> None:
    h = Harness()
    dp, frames = receiver()
    P = h.tx_dp.payload
    sizes = [INNER_LEN + 1, 100, P - 1, P, P + 1, 2 * P, 20_000, encdp.MAX_FRAME]
    for i, size in enumerate(sizes):
        datagrams = h.seal(stream(size, i))
        assert len(datagrams) == -(-size // P)
        assert max(len(d) for d in datagrams) <= h.tx_dp.seg == 1500 - 28
        feed(dp, gro_runs(datagrams), burst=True)
    assert frames == [stream(size, i) for i, size in enumerate(sizes)]
    peer = dp._peers["10.0.0.1"]
    assert peer.rx_packets == sum(-(-s // P) for s in sizes)
    assert not any(peer.drops.values())


def test_a_burst_is_opened_at_once_and_its_replay_is_dropped() -> None:
    h = Harness()
    dp, frames = receiver()
    runs = gro_runs(h.seal(stream(60_000)))
    calls = count_slow_path(dp)
    feed(dp, runs, burst=True)
    assert frames == [stream(60_000)] and not calls  # no record needed the slow path
    feed(dp, runs, burst=True)  # the same datagrams again
    assert frames == [stream(60_000)]
    assert dp._peers["10.0.0.1"].drops["replay"] == -(-60_000 // dp.payload)


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["dup", "drop", "swap", "flip", "truncate", "reseq", "none"]),
        st.integers(0, 10_000),
        st.integers(0, 10_000),
    ),
    max_size=12,
)


@settings(max_examples=120, deadline=None)
@given(st.lists(st.integers(1, encdp.MAX_FRAME), min_size=1, max_size=4), _OPS)
def test_burst_path_equals_record_by_record(sizes: list[int], ops: list[Any]) -> None:
    h = Harness()
    datagrams: list[bytes] = []
    for i, size in enumerate(sizes):
        datagrams += h.seal(stream(max(size, INNER_LEN + 1), i))
    for op, a, b in ops:
        if not datagrams:
            break
        i, j = a % len(datagrams), b % len(datagrams)
        d = bytearray(datagrams[i])
        if op == "dup":
            datagrams.insert(j, bytes(d))
        elif op == "drop":
            del datagrams[i]
        elif op == "swap":
            datagrams[i], datagrams[j] = datagrams[j], datagrams[i]
        elif op == "flip" and d:
            d[b % len(d)] ^= 1 << (a % 8)
            datagrams[i] = bytes(d)
        elif op == "truncate":
            datagrams[i] = bytes(d[: b % (len(d) or 1)])
        elif op == "reseq" and len(d) >= 12:  # a rewritten sequence number: the tag fails
            d[4:12] = (a * 1000 + b).to_bytes(8, "big")
            datagrams[i] = bytes(d)
    runs = gro_runs(datagrams)
    runs.append((b"", 0))  # UDP allows an empty datagram
    fast, fast_frames = receiver()
    slow, slow_frames = receiver()
    feed(fast, runs, burst=True)
    feed(slow, runs, burst=False)
    assert fast_frames == slow_frames
    fp, sp = fast._peers["10.0.0.1"], slow._peers["10.0.0.1"]
    assert (fp.rx_packets, fp.rx_bytes, fp.drops) == (sp.rx_packets, sp.rx_bytes, sp.drops)
    assert fast.counters == slow.counters
    fw, sw = fast._by_spi[SPI][1].window, slow._by_spi[SPI][1].window
    assert fw.top == sw.top
    assert all(fw.check(s) == sw.check(s) for s in range(max(1, fw.top - 300), fw.top + 3))


def test_an_expired_or_unknown_sa_never_takes_the_fast_path() -> None:
    h = Harness()
    dp, frames = receiver()
    dp._by_spi[SPI][1].expires_at = 0.0  # long past
    runs = gro_runs(h.seal(stream(30_000)))
    feed(dp, runs, burst=True)
    assert frames == []
    assert dp._peers["10.0.0.1"].drops["expired"] > 0
    other, other_frames = receiver()
    other.set_inbound("10.0.0.1", {})
    feed(other, runs, burst=True)
    assert other_frames == [] and other._peers["10.0.0.1"].drops["unknown_spi"] > 0


def test_a_frame_of_the_interface_gso_cap_is_one_udp_segment_send() -> None:
    """frame_gso_max: the largest frame (plus its vnet header) fills exactly the records one
    UDP_SEGMENT send may carry; one byte more would need another send."""
    for mtu in (1280, 1500, 9000):
        h = Harness(mtu)
        cap = encdp.frame_gso_max(mtu)
        per_send = encdp.records_per_send(mtu)
        assert per_send * h.tx_dp.seg <= encdp.GSO_MAX_BYTES and per_send <= encdp.GSO_MAX_SEGS
        assert len(h.seal(stream(cap + encdp.VNET_HDR_LEN, 1))) == per_send
        assert len(h.seal(stream(cap + encdp.VNET_HDR_LEN + 1, 2))) == per_send + 1
        assert h.tx_dp.frame_gso_max() == cap
    assert encdp.frame_gso_max(1500) == 44 * 1430 - 10


def test_a_peer_with_another_mtu_still_takes_the_burst_path() -> None:
    """Records of another segment size (a peer on a jumbo or a smaller underlay) are opened a
    burst at a time too, in a layout of their own, and arrive whole."""
    for tx_mtu, rx_mtu in ((9000, 1500), (1280, 1500), (1500, 9000)):
        h = Harness(tx_mtu)
        dp, frames = receiver(rx_mtu)
        calls = count_slow_path(dp)
        sizes = [encdp.frame_gso_max(tx_mtu) + encdp.VNET_HDR_LEN, 30_000, encdp.MAX_FRAME]
        singles = 0  # a receive of one record is opened by _rx_each, as it should
        for i, size in enumerate(sizes):
            runs = gro_runs(h.seal(stream(size, i)))
            singles += sum(len(data) <= seg for data, seg in runs)
            feed(dp, runs, burst=True)
        assert frames == [stream(size, i) for i, size in enumerate(sizes)], (tx_mtu, rx_mtu)
        assert len(calls) == singles, (tx_mtu, rx_mtu)
