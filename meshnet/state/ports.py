"""Published ports (issue 17, the routing mesh): the `ports` field of a service record.

A service's ``ports`` is a list of ``{"published": 1..65535, "target": 1..65535, "protocol":
"tcp" | "udp"}``: connections to PUBLISHED on any host's address go to TARGET on one of the
service's serving tasks (agent/ingress.py). It is a top-level field, not part of ``spec``:
changing the published ports does not replace tasks.

Pure: the CLI parses ``--publish`` with ``parse_publish``, ``service create`` checks clashes
with ``clash``, and the replicated schema (state/validate.py) checks every stored value with
``check_ports``, so a value accepted at create is accepted by every agent.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["HOST_KIND", "MAX_PORTS", "PROTOCOLS", "PortError", "check_ports", "clash",
           "host_endpoint_name", "parse_ports", "parse_publish", "port_text"]

PROTOCOLS = ("tcp", "udp")
# Ports one service publishes: Docker has no limit, but every port is a rule on every host and
# a line in every ruleset; a few dozen covers any real service (a range is not supported).
MAX_PORTS = 64
_SHORT_RE = re.compile(r"([0-9]{1,5}):([0-9]{1,5})(?:/([a-z]{1,8}))?")
_LONG_KEYS = {"published", "target", "protocol", "mode"}


class PortError(ValueError):
    """A published port that cannot be used; the message says why, in one line."""


def _port(value: object, what: str) -> int:
    if type(value) is not int or not 1 <= value <= 65535:
        shown = value if type(value) is int else type(value).__name__
        raise PortError(f"{what} port {shown} is not 1..65535")
    return value


def _number(text: str, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise PortError(f"{what} port {_shown(text)} is not 1..65535")
    return _port(int(text), what)


def _protocol(value: object) -> str:
    if value not in PROTOCOLS:
        shown = _shown(value) if isinstance(value, str) else type(value).__name__
        raise PortError(f"protocol {shown} is not tcp or udp")
    assert isinstance(value, str)
    return value


def _shown(text: str) -> str:
    """TEXT quoted for a one-line message: at most 40 characters of its repr (an escaped
    character can take ten)."""
    shown = repr(text[:40])
    return shown if len(shown) <= 40 else shown[:37] + "..."


def parse_publish(item: str) -> dict[str, Any]:
    """One ``--publish`` value: ``PUBLISHED:TARGET[/tcp|/udp]`` (Docker's short form) or
    ``published=P,target=T[,protocol=tcp|udp][,mode=ingress]`` (its long form). PortError says
    what is wrong."""
    if not isinstance(item, str) or len(item) > 128:
        raise PortError("--publish takes PUBLISHED:TARGET[/PROTOCOL]")
    m = _SHORT_RE.fullmatch(item)
    if m is not None:
        return {"published": _number(m.group(1), "published"),
                "target": _number(m.group(2), "target"),
                "protocol": _protocol(m.group(3) or "tcp")}
    if "=" not in item:
        raise PortError(f"--publish {_shown(item)} is not PUBLISHED:TARGET[/tcp|/udp] "
                        "(e.g. 8080:80 or 53:53/udp)")
    fields: dict[str, str] = {}
    for part in item.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in _LONG_KEYS or key in fields:
            raise PortError(f"--publish {_shown(item)}: expected published=P,target=T"
                            "[,protocol=tcp|udp]")
        fields[key] = value.strip()
    if fields.get("mode", "ingress") != "ingress":
        raise PortError("--publish mode must be ingress (host mode is not supported)")
    if "published" not in fields or "target" not in fields:
        raise PortError("--publish needs both published= and target=")
    return {"published": _number(fields["published"], "published"),
            "target": _number(fields["target"], "target"),
            "protocol": _protocol(fields.get("protocol", "tcp"))}


def check_ports(value: object) -> list[dict[str, Any]]:
    """A service record's ``ports``, as every agent checks it: a list of at most MAX_PORTS maps
    with exactly the keys published, target and protocol, no (protocol, published) twice."""
    if type(value) is not list:
        raise PortError("ports must be a list")
    if len(value) > MAX_PORTS:
        raise PortError(f"{len(value)} published ports > {MAX_PORTS}")
    seen: set[tuple[str, int]] = set()
    for p in value:
        if type(p) is not dict or set(p) != {"published", "target", "protocol"}:
            raise PortError("a published port must be a map of published, target, protocol")
        published = _port(p["published"], "published")
        _port(p["target"], "target")
        proto = _protocol(p["protocol"])
        if (proto, published) in seen:
            raise PortError(f"port {published}/{proto} is published twice")
        seen.add((proto, published))
    return value


def parse_ports(items: object) -> list[dict[str, Any]]:
    """`service create`'s ``publish`` argument: None, or a list of ``--publish`` strings or of
    maps as ``check_ports`` takes them; the checked list (duplicates refused)."""
    if items is None:
        return []
    if type(items) is not list or len(items) > MAX_PORTS:
        raise PortError(f"--publish: at most {MAX_PORTS} ports")
    out = [parse_publish(i) if isinstance(i, str) else i for i in items]
    return check_ports(out)


def port_text(p: Mapping[str, Any]) -> str:
    """8080:80/tcp, as --publish takes it."""
    return f"{p.get('published')}:{p.get('target')}/{p.get('protocol')}"


def clash(ports: Iterable[Mapping[str, Any]], others: Mapping[str, Iterable[Mapping[str, Any]]],
          reserved: Mapping[tuple[str, int], str]) -> str | None:
    """Why one of PORTS cannot be published, or None. OTHERS: service name -> its published
    ports; RESERVED: (protocol, port) -> what holds it (the agents' own ports)."""
    taken = {(str(p.get("protocol")), p.get("published")): name
             for name, theirs in sorted(others.items()) for p in theirs}
    for p in ports:
        key = (str(p["protocol"]), int(p["published"]))
        if key in reserved:
            return (f"port {key[1]}/{key[0]} cannot be published: it is {reserved[key]}")
        if key in taken:
            return (f"port {key[1]}/{key[0]} is already published by service {taken[key]}")
    return None


# A host's own address on a network whose services publish ports (Docker's ingress sandbox
# address) is an endpoint of this kind, named for its node (state/validate.py).
HOST_KIND = "host"


def host_endpoint_name(node: str) -> str:
    return f"host-{node}"
