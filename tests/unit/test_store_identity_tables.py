"""The identity tables of the replicated schema (meshnet/state/validate.py): ``certs`` and
``revocations`` are shape-checked only (their content is the authorizer's)."""

from __future__ import annotations

from typing import Any

import pytest

from meshnet.state import Store, StoreConfig
from meshnet.state.validate import (
    CERTS,
    KNOWN_TABLES,
    MAX_CERT_BYTES,
    REVOCATIONS,
    check_value,
)

SERIAL = "0123456789abcdef" * 2
T0 = 1_700_000_000.0


def test_table_names() -> None:
    assert CERTS == "certs" and REVOCATIONS == "revocations"
    assert {CERTS, REVOCATIONS} <= KNOWN_TABLES


@pytest.mark.parametrize("key", [f"h1/{SERIAL}", f"host-2.lab/{SERIAL}", f"a_b/{SERIAL}"])
@pytest.mark.parametrize("cert", [b"x", bytes(MAX_CERT_BYTES)])
def test_certs_accepted(key: str, cert: bytes) -> None:
    assert check_value(CERTS, key, {"cert": cert}) is None
    assert check_value(CERTS, key, {"cert": cert, "newer": 1}) is None  # forward compatible


@pytest.mark.parametrize("key", [
    "h1", f"/{SERIAL}", f"h1/{SERIAL.upper()}", f"h1/{SERIAL[:-1]}", f"h1/{SERIAL}0",
    f"h1/{SERIAL}/", f"h1/x/{SERIAL}", f"-h1/{SERIAL}", f"h\u00e91/{SERIAL}", "h1/all",
    f"h1/{SERIAL[:-1]}g", f"h1/{SERIAL}\n",
])
def test_cert_keys_refused(key: str) -> None:
    why = check_value(CERTS, key, {"cert": b"x"})
    assert why is not None and why.startswith("certs/")


@pytest.mark.parametrize("value", [
    {}, {"cert": b""}, {"cert": bytes(MAX_CERT_BYTES + 1)}, {"cert": "x"}, {"cert": None},
    {"cert": [1]}, {"revocation": b"x"},
])
def test_cert_values_refused(value: dict[str, Any]) -> None:
    assert check_value(CERTS, f"h1/{SERIAL}", value) is not None


@pytest.mark.parametrize("key", [
    f"h1/{SERIAL}/1700000000", "h1/all/1700000000", "h1/all/0", f"h.2/{SERIAL}/999999999999",
])
def test_revocations_accepted(key: str) -> None:
    assert check_value(REVOCATIONS, key, {"revocation": b"r"}) is None
    assert check_value(REVOCATIONS, key, {"revocation": bytes(MAX_CERT_BYTES)}) is None


@pytest.mark.parametrize("key", [
    f"h1/{SERIAL}", "h1/all", "h1/ALL/1", "h1/none/1", f"h1/{SERIAL}/01", f"h1/{SERIAL}/-1",
    f"h1/{SERIAL}/1.5", f"h1/{SERIAL}/1e9", f"h1/{SERIAL}/1000000000000", f"h1/{SERIAL}/",
    f"/{SERIAL}/1", f"h1/{SERIAL}/1/2", "h1/all/\u0661", "h1/all/1 ",
])
def test_revocation_keys_refused(key: str) -> None:
    why = check_value(REVOCATIONS, key, {"revocation": b"r"})
    assert why is not None and why.startswith("revocations/")


@pytest.mark.parametrize("value", [
    {}, {"revocation": b""}, {"revocation": bytes(MAX_CERT_BYTES + 1)}, {"revocation": 1},
    {"cert": b"x"},
])
def test_revocation_values_refused(value: dict[str, Any]) -> None:
    assert check_value(REVOCATIONS, "h1/all/1", value) is not None


def test_a_validating_store_carries_them() -> None:
    a = Store("h1", StoreConfig(validator=check_value))
    b = Store("h2", StoreConfig(validator=check_value))
    a.put(CERTS, f"h1/{SERIAL}", {"cert": b"\x01" * 300}, T0)
    a.put(REVOCATIONS, "h3/all/1700000000", {"revocation": b"\x02" * 100}, T0)
    with pytest.raises(ValueError, match="certs/h1: key is not"):
        a.put(CERTS, "h1", {"cert": b"x"}, T0)
    for msg in a.take_deltas(100_000):
        assert b.apply_delta(msg, T0)
    assert b.view(CERTS) == {f"h1/{SERIAL}": {"cert": b"\x01" * 300}}
    assert b.view(REVOCATIONS) == {"h3/all/1700000000": {"revocation": b"\x02" * 100}}
    assert b.stats.refused_invalid == 0
