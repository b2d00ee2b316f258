"""Properties of membership with identity (#13): no sequence of messages, incarnations anywhere
in 0..2^64-1, makes the core raise; and a claim about X not signed by X never changes X's
address or keys."""

from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet.crypto.certs import generate_node_keys, make_ca, sign_node
from meshnet.crypto.trust import ALIVE_DOMAIN, LEFT_DOMAIN, Trust
from meshnet.membership import Membership, MembershipConfig, NodeMeta
from meshnet.membership.messages import (
    MAX_INCARNATION,
    Alive,
    Dead,
    PushPull,
    PushPullState,
    Suspect,
    alive_payload,
    left_payload,
)
from meshnet.membership.types import MemberState

T0 = 1_800_000_000
NAMES = ("n1", "n2", "n3", "n4")
_CA_KEY, _CA = make_ca("props", T0 - 86_400, 365)
_TRUSTS: dict[str, Trust] = {}
for _n in NAMES:
    _k = generate_node_keys()
    _c = sign_node(_CA_KEY, _CA, _n, ["admin"], {}, _k.sign_pub, _k.dp_pub, T0 - 3600, 30)
    _TRUSTS[_n] = Trust(_CA, _n, _k, _c, 0.0, wall_offset=T0)


def addr(name: str, alt: int = 0) -> tuple[str, int]:
    return (f"10.{alt}.0.{NAMES.index(name) + 1}", 7946)


def meta(name: str, alt: int) -> NodeMeta:
    return NodeMeta(name, addr(name, alt), {}, {"dpk": bytes([alt]) * 32})


def fresh() -> Membership:
    core = Membership(MembershipConfig.lan(), meta("n1", 0), random.Random(1), 0.0,
                      trust=_TRUSTS["n1"])
    rows = []
    for n in NAMES[1:]:
        raw = meta(n, 0).encode()
        rows.append(PushPullState(n, 0, MemberState.ALIVE, meta(n, 0), raw, 0,
                                  _TRUSTS[n].sign(ALIVE_DOMAIN, alive_payload(0, raw))))
    certs = [_TRUSTS[n].cert.raw for n in NAMES[1:]]
    core.handle_stream_request(PushPull(False, rows, b"", certs).encode(), addr("n2"), 0.0)
    return core


incarnations = st.one_of(st.integers(0, 5), st.integers(0, MAX_INCARNATION),
                         st.sampled_from([2**63 - 1, 2**63, MAX_INCARNATION]))
claims = st.tuples(
    st.sampled_from(["alive", "suspect", "dead", "left", "row"]),
    st.sampled_from(NAMES),  # about whom
    incarnations,
    st.sampled_from((*NAMES, "garbage", "none")),  # who signs
    st.integers(0, 3),  # which address the claim carries
    st.sampled_from(list(MemberState)),
)


def encode(kind: str, subject: str, inc: int, signer: str, alt: int,
           state: MemberState) -> tuple[bytes, bool, bool]:
    """(packet or push-pull, is_stream, signed by the subject itself)."""
    m = meta(subject, alt)
    raw = m.encode()
    own = signer == subject

    def sig(domain: bytes, data: bytes) -> bytes:
        if signer in _TRUSTS:
            return _TRUSTS[signer].sign(domain, data)
        return b"\x01" * 64 if signer == "garbage" else b""

    if kind == "alive":
        return Alive(inc, m, raw, sig(ALIVE_DOMAIN, alive_payload(inc, raw))).encode(), False, own
    if kind == "suspect":
        return Suspect(inc, subject, signer if signer in NAMES else "n4").encode(), False, own
    if kind == "dead":
        return Dead(inc, subject, "n3").encode(), False, own
    if kind == "left":
        return Dead(inc, subject, subject, sig(LEFT_DOMAIN, left_payload(inc, subject))).encode(
        ), False, own
    row = PushPullState(subject, inc, state, m, raw, inc,
                        sig(ALIVE_DOMAIN, alive_payload(inc, raw)),
                        sig(LEFT_DOMAIN, left_payload(inc, subject)))
    return PushPull(False, [row], b"").encode(), True, own


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(claims, min_size=1, max_size=25))
def test_no_sequence_raises_and_only_x_changes_x(seq: list[tuple[str, str, int, str, int,
                                                                 MemberState]]) -> None:
    core = fresh()
    now = 1.0
    for kind, subject, inc, signer, alt, state in seq:
        before = {n: core.member(n) for n in NAMES}
        data, stream, own = encode(kind, subject, inc, signer, alt, state)
        if stream:
            core.handle_stream_request(data, addr("n2"), now)
        else:
            core.receive_datagram(data, addr("n3"), now)
        core.handle_timer(now)
        core.datagrams_to_send(now)
        core.streams_to_open()
        now += 0.5
        for n in NAMES[1:]:
            b, a = before[n], core.member(n)
            if b is None or a is None:
                continue
            if not (own and n == subject and kind in ("alive", "row")):
                assert (a.addr, a.meta) == (b.addr, b.meta), (kind, subject, signer)
        assert core.incarnation <= 2**63  # we never refute past the bound
