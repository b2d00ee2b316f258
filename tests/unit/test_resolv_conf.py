"""Upstream resolvers from resolv.conf text: which nameserver lines count."""

from __future__ import annotations

from pathlib import Path

from meshnet.agent.dns_server import parse_resolv_conf, read_resolv_conf


def test_plain() -> None:
    text = "search example.com\nnameserver 10.0.0.2\nnameserver 10.0.0.3\noptions ndots:1\n"
    assert parse_resolv_conf(text) == [("10.0.0.2", 53), ("10.0.0.3", 53)]


def test_at_most_three_in_order() -> None:
    text = "".join(f"nameserver 192.0.2.{i}\n" for i in range(1, 6))
    assert parse_resolv_conf(text) == [(f"192.0.2.{i}", 53) for i in (1, 2, 3)]


def test_skips_ourselves_invalid_and_commented_lines() -> None:
    text = """
# nameserver 192.0.2.99
; nameserver 192.0.2.98
nameserver 127.0.0.11
nameserver
nameserver not-an-ip
nameserver 300.1.2.3
nameserver 192.0.2.1 # trailing comment
  nameserver   192.0.2.2;also a comment
nameservers 192.0.2.97
Nameserver 192.0.2.96
nameserver 192.0.2.1
nameserver 127.0.0.53
nameserver 192.0.2.3
"""
    # 127.0.0.11 is the sandbox resolver itself; the duplicate 192.0.2.1 does not take a slot.
    assert parse_resolv_conf(text) == [("192.0.2.1", 53), ("192.0.2.2", 53), ("127.0.0.53", 53)]


def test_ipv6_and_normalisation() -> None:
    text = "nameserver 2001:DB8:0:0::1\nnameserver ::1\n"
    assert parse_resolv_conf(text) == [("2001:db8::1", 53), ("::1", 53)]


def test_empty_and_crlf() -> None:
    assert parse_resolv_conf("") == []
    assert parse_resolv_conf("options edns0\r\n") == []
    assert parse_resolv_conf("nameserver 192.0.2.1\r\n") == [("192.0.2.1", 53)]


def test_max_upstreams_argument() -> None:
    text = "nameserver 192.0.2.1\nnameserver 192.0.2.2\n"
    assert parse_resolv_conf(text, max_upstreams=1) == [("192.0.2.1", 53)]


def test_read_file(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 192.0.2.5\n")
    assert read_resolv_conf(path) == [("192.0.2.5", 53)]
    assert read_resolv_conf(tmp_path / "missing") == []
    path.write_bytes(b"nameserver 192.0.2.6\n\xff\xfe junk\n")
    assert read_resolv_conf(str(path)) == [("192.0.2.6", 53)]
