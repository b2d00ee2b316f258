"""Fuzz the stream replies (and requests) the agent parses from peers (issue #14, "Fuzzing"):
key operations, service logs, IPAM claims and their confirmations.

A peer that holds the cluster key can send any bytes on these streams. Each parser must give a
valid value or its documented refusal (None, "bad reply", an empty map, or an exception its
caller catches), never another exception, and never let a value the schema refuses into the
store. ``str()`` of a msgpack value nested ~1000 deep raises RecursionError, so the shaped cases
carry such values where a parser used to stringify them.
"""

from __future__ import annotations

import asyncio
import atexit
import re
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meshnet import api
from meshnet.agent.agent import Agent, parse_key_op_reply, parse_key_op_request
from meshnet.agent.sandboxes import MAX_COMPETITORS, Sandboxes
from meshnet.agent.services import LOG_SUFFIX, Services, parse_logs_reply
from meshnet.crypto.keyring import Keyring
from meshnet.state import Entry, Hlc, StateProtocolError, Store, StoreConfig, codec
from meshnet.state.validate import TASKS, check_value

T0 = 1_700_000_000.0
T0_MS = int(T0 * 1000)

# ---- msgpack of any shape, and raw msgpack nested past what str()/repr() can walk ----------

TEXT = st.text(max_size=10) | st.sampled_from(["ok", "keys", "error", "logs", "node", "web.1"])
SCALARS = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
           | st.floats(allow_nan=True) | TEXT | st.binary(max_size=8)
           | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4)))
MSGPACK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)


def _pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


def _deep(depth: int) -> bytes:
    """Raw msgpack of a list nested DEPTH deep (msgpack's packer stops at 511)."""
    return b"\x91" * depth + b"\xc0"


DEEP = st.integers(990, 1020).map(_deep)


def _raw_map(items: list[tuple[str, bytes]]) -> bytes:
    """A msgpack map from already-packed values (so a value may be nested deeper than
    msgpack.packb allows)."""
    assert len(items) < 16
    return bytes([0x80 | len(items)]) + b"".join(_pack(k) + v for k, v in items)


RAW_VALUE = MSGPACK.map(_pack) | DEEP


def _drive(coro: Any) -> Any:
    """Run a coroutine that never suspends (the handlers below await nothing real)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("the handler suspended")


# ---- key operations: the reply -----------------------------------------------------------


def _check_key_op_reply(result: object) -> None:
    assert isinstance(result, list | str), result
    if isinstance(result, list):
        assert all(isinstance(k, str) for k in result)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_key_op_reply_any_bytes(raw: bytes) -> None:
    _check_key_op_reply(parse_key_op_reply(raw))


KEY_REPLY = st.lists(
    st.tuples(st.sampled_from(["ok", "keys", "error", "x"]),
              RAW_VALUE | st.sampled_from([_pack(True), _pack(False), _pack(["k1", "k2"])])),
    max_size=4, unique_by=lambda kv: kv[0])


@settings(max_examples=200, deadline=None)
@given(KEY_REPLY)
@example([("ok", _pack(True)), ("keys", _deep(1000))])
@example([("ok", _pack(True)), ("keys", _pack(7))])
@example([("ok", _pack(False)), ("error", _deep(1000))])
@example([("ok", _pack(False)), ("error", _pack(b"\xff"))])
def test_key_op_reply_shaped(items: list[tuple[str, bytes]]) -> None:
    """An ack only from a reply that says ok and lists its keys as strings; anything else is
    an error line (a string, so `meshctl --json` can print it)."""
    result = parse_key_op_reply(_raw_map(items))
    _check_key_op_reply(result)
    fields = dict(items)
    if isinstance(result, list):
        assert msgpack.unpackb(fields["ok"], raw=False)
        assert result == msgpack.unpackb(fields.get("keys", _pack([])), raw=False)


@given(st.lists(st.text(max_size=50), max_size=8), st.text(max_size=80))
def test_key_op_reply_round_trip(keys: list[str], error: str) -> None:
    # What _key_op_in sends.
    assert parse_key_op_reply(_pack({"ok": True, "keys": keys})) == keys
    assert parse_key_op_reply(_pack({"ok": False, "error": error})) == error


# ---- key operations: the request --------------------------------------------------------------


KEY_REQUEST = st.lists(
    st.tuples(st.sampled_from(["op", "key", "by", "at", "sig", "x"]),
              RAW_VALUE | st.sampled_from([_pack("list"), _pack("install"), _pack("k")])),
    max_size=6, unique_by=lambda kv: kv[0])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | KEY_REQUEST.map(_raw_map))
@example(_raw_map([("op", _deep(1000))]))
@example(_raw_map([("op", _pack("list")), ("key", _deep(1000))]))
def test_key_op_request_is_a_map_with_text_fields_or_value_error(body: bytes) -> None:
    try:
        req = parse_key_op_request(body)
    except ValueError:
        return
    assert isinstance(req, dict)
    assert isinstance(req["op"], str) and isinstance(req.get("key", ""), str)


def test_key_op_request_round_trip() -> None:
    agent = object.__new__(Agent)
    agent.trust = None
    for op, key in (("list", ""), ("install", "k" * 44), ("remove", "x")):
        assert parse_key_op_request(agent._key_op_request(op, key)) == {"op": op, "key": key}


# ---- key operations: the whole `meshctl keys list` fan-out --------------------------------------

RING = Keyring(bytes(range(32)), (bytes(range(32, 64)),))


def _keys_agent(replies: list[bytes]) -> Agent:
    agent = object.__new__(Agent)
    agent.keyring = RING
    agent.trust = None
    agent.config = SimpleNamespace(name="h1")
    members = [SimpleNamespace(name=f"h{i + 2}", addr=("192.0.2.1", 7946 + i),
                               state=SimpleNamespace(value="alive"))
               for i in range(len(replies))]
    agent.membership = SimpleNamespace(members=lambda: members)
    by_addr = {m.addr: raw for m, raw in zip(members, replies, strict=True)}

    async def request(addr: Any, service: int, body: bytes, *a: Any) -> bytes:
        return by_addr[addr]

    agent.gossip = SimpleNamespace(request=request)
    return agent


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=60) | KEY_REPLY.map(_raw_map), min_size=1, max_size=4))
def test_keys_list_survives_any_replies(replies: list[bytes]) -> None:
    agent = _keys_agent(replies)
    result = asyncio.run(agent._op_keys({"op": "list"}, lambda _: None))  # type: ignore[arg-type]
    acks = sum(isinstance(parse_key_op_reply(r), list) for r in replies)
    assert result["acked"] == 1 + acks and result["members"] == 1 + len(replies)
    assert len(result["errors"]) == len(replies) - acks
    assert all(isinstance(v, str) for v in result["errors"].values())
    assert all(1 <= k["members"] <= 1 + acks for k in result["keys"])
    # what the control API sends back, both ways
    api.encode(api.ok(result), as_json=True)
    api.encode(api.ok(result))


# ---- service logs: the reply --------------------------------------------------------------------

SERVICE = "web"
LOG_NAMES = st.sampled_from(["web.1", "web.10", "web.0", "web.01", "web.9999999999",
                             "web.99999999999", "web.x", "web.", "web", "web.1.log", "webx.1",
                             "../web.1", "web.1/..", "web.\u0661", "web.1\n", "Web.1", "*.1",
                             "web.1 "]) | TEXT
LOGS_REPLY = st.lists(st.tuples(LOG_NAMES, RAW_VALUE | st.text(max_size=20).map(_pack)),
                      max_size=6, unique_by=lambda kv: kv[0])
_TASK_RE = re.compile(re.escape(SERVICE) + r"\.[0-9]{1,10}")


def _logs_doc(node: bytes, logs: list[tuple[str, bytes]]) -> bytes:
    return _raw_map([("node", node), ("logs", _raw_map(logs))])


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | MSGPACK.map(_pack))
def test_logs_reply_any_bytes(raw: bytes) -> None:
    out = parse_logs_reply(SERVICE, raw)
    assert isinstance(out, dict)
    assert all(_TASK_RE.fullmatch(k) and isinstance(v, str) for k, v in out.items())


@settings(max_examples=200, deadline=None)
@given(RAW_VALUE, LOGS_REPLY)
@example(_pack("h2"), [("web.1", _deep(1000))])
def test_logs_reply_keeps_exactly_this_services_text_logs(
        node: bytes, logs: list[tuple[str, bytes]]) -> None:
    out = parse_logs_reply(SERVICE, _logs_doc(node, logs))
    want = {}
    for k, raw in logs:
        try:
            v = msgpack.unpackb(raw, raw=False)
        except ValueError:  # too deep to decode alone: never text
            continue
        if _TASK_RE.fullmatch(k) and isinstance(v, str):
            want[k] = v
    assert out == want


# ---- service logs: the request ------------------------------------------------------------------

_LOG_FILES = ["web.1.log", "web.10.log", "web.1.log.1", "webx.1.log", "other.2.log", "web.log",
              "web.x.log"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=100) | MSGPACK.map(_pack)
       | st.sampled_from(["web", "../web", "web*", "*", "w?b", "[w]eb", "", "web\n", "\u0661",
                          "web.1", "x" * 300]).map(_pack))
def test_serve_logs_answers_only_with_the_named_services_files(body: bytes) -> None:
    s = object.__new__(Services)
    s.log_dir = _LOG_DIR
    s.node = "h1"
    reply = _drive(s._serve_logs(body, ("192.0.2.1", 1)))
    if reply is None:
        return
    doc = msgpack.unpackb(reply, raw=False)
    service = msgpack.unpackb(body, raw=False)
    assert doc["node"] == "h1"
    assert sorted(doc["logs"]) == sorted(
        f[: -len(LOG_SUFFIX)] for f in _LOG_FILES
        if re.fullmatch(re.escape(service) + r"\.[0-9]{1,10}" + re.escape(LOG_SUFFIX), f))


def _make_log_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="mn-logs-fuzz-"))
    atexit.register(shutil.rmtree, d, True)
    for f in _LOG_FILES:
        (d / f).write_text(f"line of {f}\n")
    return d


_LOG_DIR = _make_log_dir()


# ---- IPAM: the claim a peer sends us, and its answer to ours ----------------------------------


def _endpoint(name: str, node: str, ip: str = "10.1.0.5") -> dict[str, Any]:
    return {"name": name, "network": "n1", "ip": ip, "mac": "02:42:0a:01:00:05", "node": node,
            "service": None, "slot": None, "pending": True, "sandbox": f"mns-{name}"}


def _claim(name: str, node: str, wall: int, ip: str = "10.1.0.5") -> Entry:
    return Entry("endpoints", f"n1/{name}@{node}", msgpack.packb(_endpoint(name, node, ip)),
                 Hlc(T0_MS + wall, 0), node)


def _ipam_sandboxes() -> Sandboxes:
    store = Store("h1", StoreConfig(validator=check_value,
                                    owned_tables={"endpoints": "node", TASKS: "node"}))
    for node in ("h1", "h2", "h3"):
        store.set_node_live(node, True)
    store.apply_delta(codec.encode_delta(_claim("a", "h2", 1)), T0)
    store.apply_delta(codec.encode_delta(_claim("b", "h3", 2)), T0)
    store.apply_delta(codec.encode_delta(_claim("c", "h3", 3, "10.1.0.6")), T0)
    sb = object.__new__(Sandboxes)
    sb.store = store
    sb.state = SimpleNamespace(changed=lambda: None)
    return sb


def _held_values_valid(store: Store) -> None:
    for e in store.entries():
        data = e.data()
        if data is not None:
            assert check_value(e.table, e.key, data) is None, e


GOOD_CLAIM = codec.encode_delta(_claim("z", "h4", 5))


@st.composite
def mutated(draw: st.DrawFn, msg: bytes) -> bytes:
    b = bytearray(msg)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(b) - 1))
        b[i] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        b = b[: draw(st.integers(0, len(b)))]
    return bytes(b)


ENTRY_VALUES = st.dictionaries(TEXT, MSGPACK, max_size=5) | st.builds(
    lambda name, node, ip, extra: {**_endpoint(name, node, ip), **extra},
    st.sampled_from(["z", "a", "web.1", "-x", "com"]), st.sampled_from(["h2", "h4", "h1", "_"]),
    st.sampled_from(["10.1.0.5", "10.1.0.6", "10.1.0.256", "127.0.0.1", ""]),
    st.dictionaries(st.sampled_from(["pending", "slot", "prefixlen", "x"]), MSGPACK, max_size=2))
DELTAS = st.builds(
    lambda table, key, value, wall, writer: codec.encode_delta(
        Entry(table, key, None if value is None else _pack(value), Hlc(T0_MS + wall, 0), writer)),
    st.sampled_from(["endpoints", "networks", "tasks", "zz"]),
    st.sampled_from(["n1/z@h4", "n1/a@h2", "n1/z", "z"]) | TEXT,
    st.none() | ENTRY_VALUES, st.integers(0, 10_000), st.sampled_from(["h2", "h4", "x"]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200) | mutated(GOOD_CLAIM) | DELTAS)
def test_serve_claim_answers_with_rivals_or_nothing(body: bytes) -> None:
    sb = _ipam_sandboxes()
    try:
        claim = codec.decode_delta(body)
    except StateProtocolError:
        claim = None
    reply = _drive(sb._serve_claim(body, ("192.0.2.1", 1)))
    _held_values_valid(sb.store)
    if claim is None:
        assert reply is None
        return
    assert reply is not None
    rivals = msgpack.unpackb(reply, raw=False)
    assert isinstance(rivals, list) and len(rivals) <= MAX_COMPETITORS
    data = claim.data or {}
    for blob in rivals:
        rival = codec.decode_delta(blob)
        assert rival.entry.table == "endpoints" and rival.entry.key != claim.entry.key
        assert rival.data is not None
        assert rival.data["network"] == data.get("network") and rival.data["ip"] == data.get("ip")


REPLY_ITEMS = st.lists(
    st.sampled_from([codec.encode_delta(_claim("r", "h5", 0)),
                     codec.encode_delta(_claim("s", "h6", 9, "10.1.0.9"))])
    | mutated(GOOD_CLAIM) | DELTAS | MSGPACK, max_size=MAX_COMPETITORS + 2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200) | MSGPACK.map(_pack) | REPLY_ITEMS.map(_pack))
@example(_pack("abc"))
@example(_pack({"a": 1}))
def test_confirm_reply_gives_claims_or_an_error_the_confirmation_catches(raw: bytes) -> None:
    """`_take_competitors` (what `_confirm` does with an answer): the competing claims, or an
    exception `_confirm` catches and retries on (msgpack's errors are ValueErrors)."""
    sb = _ipam_sandboxes()
    try:
        out = sb._take_competitors(raw)
    except (ValueError, TypeError, StateProtocolError):
        _held_values_valid(sb.store)
        return
    _held_values_valid(sb.store)
    assert isinstance(out, list) and len(out) <= MAX_COMPETITORS
    assert all(isinstance(e, Entry) for e in out)


def test_confirm_reply_round_trip() -> None:
    """What _serve_claim answers is what _take_competitors takes, and the rivals land in our
    store."""
    server = _ipam_sandboxes()
    reply = _drive(server._serve_claim(GOOD_CLAIM, ("192.0.2.1", 1)))
    client = object.__new__(Sandboxes)
    client.store = Store("h9", StoreConfig(validator=check_value))
    client.state = SimpleNamespace(changed=lambda: None)
    got = client._take_competitors(reply)
    assert sorted(e.key for e in got) == ["n1/a@h2", "n1/b@h3"]
    assert client.store.entry("endpoints", "n1/a@h2") is not None
