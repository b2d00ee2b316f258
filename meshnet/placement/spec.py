"""Placement inputs: nodes, service specs, constraints, and their validation.

Everything here is a frozen dataclass validated at construction, so :func:`meshnet.placement.place`
only ever sees well-formed input. Every complaint is a :class:`PlacementError` (a ``ValueError``)
with a message fit to print as the one line ``meshctl`` shows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

#: The two scheduling modes, as in Docker Swarm.
REPLICATED = "replicated"
GLOBAL = "global"
MODES = (REPLICATED, GLOBAL)

#: Constraint keys: ``node.name`` (``node.hostname`` is accepted as Swarm's spelling of it) and
#: ``node.labels.<K>``.
NAME_KEY = "node.name"
LABEL_PREFIX = "node.labels."
_NAME_ALIASES = (NAME_KEY, "node.hostname")
OPS = ("==", "!=")
#: Slots one replicated service may ask for (Swarm has no bound; ours keeps one bad spec from
#: making every agent build a placement of 10^12 slots). Placement's cost grows with the total
#: slot count, and 10,000 slots of one service is already far beyond one cluster's hosts.
MAX_REPLICAS = 10_000


class PlacementError(ValueError):
    """A bad placement input: constraint text, spec field, node, or duplicate name."""


@dataclass(frozen=True)
class Constraint:
    """``key op value``: ``node.name==h1``, ``node.labels.zone!=b``.

    A node without the label never matches ``==`` and always matches ``!=`` (Swarm's rule).
    """

    key: str
    op: Literal["==", "!="]
    value: str

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise PlacementError(f"constraint operator must be == or !=, not {self.op!r}")
        if self.key in _NAME_ALIASES:
            object.__setattr__(self, "key", NAME_KEY)
        elif not self.key.startswith(LABEL_PREFIX) or not self.key[len(LABEL_PREFIX) :]:
            raise PlacementError(
                f"constraint key must be node.name or node.labels.<label>, not {self.key!r}"
            )
        label = self.key[len(LABEL_PREFIX) :] if self.key != NAME_KEY else ""
        for part, what in ((label, "label"), (self.value, "value")):
            if any(ch.isspace() for ch in part) or "=" in part or "!" in part:
                raise PlacementError(f"constraint {what} {part!r} may not hold spaces, = or !")
        if not self.value:
            raise PlacementError(f"constraint {self.key}{self.op} has an empty value")

    def matches(self, node: NodeInfo) -> bool:
        have = node.name if self.key == NAME_KEY else node.labels.get(self.key[len(LABEL_PREFIX) :])
        return (have == self.value) == (self.op == "==")

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.value}"


def parse_constraint(text: str) -> Constraint:
    """Parse ``node.labels.zone==a``, ``node.name != h2`` (spaces around the operator are fine).

    Raises :class:`PlacementError` saying what is wrong with the expression.
    """
    if not isinstance(text, str):
        raise PlacementError(f"constraint must be a string, not {type(text).__name__}")
    found = [(text.find(op), op) for op in OPS if op in text]
    if not found:
        raise PlacementError(f"bad constraint {text!r}: expected KEY==VALUE or KEY!=VALUE")
    if len(found) > 1 or text.count(found[0][1]) > 1:
        raise PlacementError(f"bad constraint {text!r}: exactly one == or != expected")
    at, op = found[0]
    key, value = text[:at].strip(), text[at + 2 :].strip()
    if not key:
        raise PlacementError(f"bad constraint {text!r}: missing key before {op}")
    if not value:
        raise PlacementError(f"bad constraint {text!r}: missing value after {op}")
    try:
        return Constraint(key, op, value)  # type: ignore[arg-type]  # op is one of OPS
    except PlacementError as exc:
        raise PlacementError(f"bad constraint {text!r}: {exc}") from None


@dataclass(frozen=True)
class NodeInfo:
    """An alive member as placement sees it. ``weight`` is its capacity share (> 0, finite)."""

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PlacementError(f"node name must be a non-empty string, not {self.name!r}")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w <= 0:
            raise PlacementError(f"node {self.name}: weight must be a finite number > 0, not {w!r}")


@dataclass(frozen=True)
class ServiceSpec:
    """What to place: ``replicas`` slots (1..replicas, at most MAX_REPLICAS), or one task per
    eligible node (global)."""

    name: str
    replicas: int = 1
    mode: str = REPLICATED
    constraints: tuple[Constraint, ...] = ()
    max_per_node: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise PlacementError(f"service name must be a non-empty string, not {self.name!r}")
        if self.mode not in MODES:
            raise PlacementError(f"service {self.name}: mode must be replicated or global")
        r = self.replicas
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise PlacementError(f"service {self.name}: replicas must be an int >= 0, not {r!r}")
        if r > MAX_REPLICAS:
            raise PlacementError(f"service {self.name}: replicas {r} > {MAX_REPLICAS}")
        m = self.max_per_node
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise PlacementError(
                f"service {self.name}: max_per_node must be an integer >= 1 or None, not {m!r}"
            )
        cons = tuple(self.constraints)
        if not all(isinstance(c, Constraint) for c in cons):
            raise PlacementError(f"service {self.name}: constraints must be Constraint objects")
        object.__setattr__(self, "constraints", cons)

    def eligible(self, node: NodeInfo) -> bool:
        """Constraints are ANDed."""
        return all(c.matches(node) for c in self.constraints)
