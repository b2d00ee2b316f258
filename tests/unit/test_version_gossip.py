"""The agent's version rides in its gossiped metadata: it fits the 512-byte budget with room
for labels, and `members` shows a peer's only when it looks like a version."""

from __future__ import annotations

import meshnet
from meshnet.agent.agent import VERSION_META_KEY, gossiped_version, member_json
from meshnet.membership import MAX_META_BYTES, Member, MemberState, NodeMeta

LONGEST_HOST = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def fixed_meta(version: str, labels: dict[str, str] | None = None) -> NodeMeta:
    """A node's metadata at its largest apart from labels: what `Agent._meta` sends."""
    return NodeMeta("n" * 63, (LONGEST_HOST, 65535), labels or {},
                    {"id": "0" * 32, VERSION_META_KEY: version, "dpk": b"\x01" * 32})


def test_the_version_leaves_room_for_labels() -> None:
    ours = len(fixed_meta(meshnet.__version__).encode())
    longest = len(fixed_meta("9" * 32).encode())
    # the value's bytes and its header: 1 byte under 32 characters, 2 at 32 (str8)
    assert len(fixed_meta("9" * 31).encode()) - len(fixed_meta("").encode()) == 31
    assert longest - len(fixed_meta("").encode()) == 33
    assert MAX_META_BYTES - longest >= 280, longest
    # two labels of 63-character keys and values still fit beside our version
    labels = {f"{i}" + "k" * 62: "v" * 63 for i in range(2)}
    assert len(fixed_meta(meshnet.__version__, labels).encode()) <= MAX_META_BYTES, ours


def test_members_show_a_gossiped_version_or_null() -> None:
    def member(extra: dict[str, bytes | str | int]) -> Member:
        meta = NodeMeta("h2", ("10.0.0.2", 7946), {"zone": "a"}, extra)
        return Member("h2", meta.addr, MemberState.ALIVE, 4, meta, 0.0)

    assert member_json(member({VERSION_META_KEY: "1.2.3rc1+local.7"}))["version"] == \
        "1.2.3rc1+local.7"
    for bad in ({}, {VERSION_META_KEY: 5}, {VERSION_META_KEY: b"1.0"},
                {VERSION_META_KEY: "1.0\x1b[31m"}, {VERSION_META_KEY: "1" * 33},
                {VERSION_META_KEY: ""}):
        assert member_json(member(bad))["version"] is None, bad
    assert gossiped_version({VERSION_META_KEY: meshnet.__version__}) == meshnet.__version__
