"""msgpack decoding within a byte budget (issue 14, "Byte budgets").

msgpack turns one input byte into up to ~64 bytes of Python objects (an empty array is a 56-byte
list and an 8-byte slot in its parent; a 3-byte int16 a 32-byte int), so a length cap on the input
does not bound what decoding it allocates: a 20 MiB push-pull of empty arrays decodes to 1.3 GB.
``unpack`` decodes as ``wire.unpack`` does but charges every container msgpack builds, through
its list and map hooks, *as it is built*, and stops the decode once a ``Budget`` runs out.

The estimate, per container: ``CONTAINER_BYTES`` for itself and ``ELEMENT_BYTES`` for each thing
it holds (an int, a str or bytes header, a nested container's slot), twice that per map entry
(key and value). It is above what CPython allocates for every msgpack type but a non-ASCII str,
whose 74-byte header it undercounts by at most 1.5x. Characters and bytes themselves are not
charged: they are bounded by the input's length, which the caller caps (at most 4x for a str's
characters).
"""

from __future__ import annotations

from typing import Any

from meshnet import wire

__all__ = ["CONTAINER_BYTES", "ELEMENT_BYTES", "MAX_BYTES_PER_INPUT_BYTE", "Budget",
           "BudgetExceeded", "unpack"]

CONTAINER_BYTES = 64
ELEMENT_BYTES = 64
# The most estimated bytes one input byte can cost: a 1-byte empty array (its own charge and its
# slot's in the parent). An input this many times smaller than the budget left cannot exceed it,
# so it is decoded without the hooks (they cost ~70 ns a container).
MAX_BYTES_PER_INPUT_BYTE = CONTAINER_BYTES + ELEMENT_BYTES


class BudgetExceeded(Exception):
    """Decoding would build more than the budget allows (raised as the caller's ``over``)."""


class Budget:
    """Estimated bytes of decoded objects still allowed; one may span several decodes (a
    message, then the values it carries). ``used`` is what was charged so far."""

    __slots__ = ("left", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.left = limit

    @property
    def used(self) -> int:
        return self.limit - self.left

    def list_hook(self, obj: list[Any]) -> list[Any]:
        self.left -= CONTAINER_BYTES + ELEMENT_BYTES * len(obj)
        if self.left < 0:
            raise BudgetExceeded
        return obj

    def map_hook(self, obj: dict[Any, Any]) -> dict[Any, Any]:
        self.left -= CONTAINER_BYTES + 2 * ELEMENT_BYTES * len(obj)
        if self.left < 0:
            raise BudgetExceeded
        return obj


def unpack(
    data: bytes | memoryview,
    budget: Budget,
    *,
    max_bytes: int,
    exc: type[Exception],
    over: type[Exception],
    always_charge: bool = False,
) -> Any:
    """``wire.unpack(data, max_bytes=max_bytes, exc=exc)`` that raises ``over`` (and charges
    nothing more) once ``budget`` is spent. ``always_charge``: charge even an input too small to
    exceed what is left (the caller wants the estimate in ``budget.used``)."""
    if not always_charge and len(data) * MAX_BYTES_PER_INPUT_BYTE <= budget.left:
        return wire.unpack(data, max_bytes=max_bytes, exc=exc)
    try:
        return wire.unpack(data, max_bytes=max_bytes, exc=exc, list_hook=budget.list_hook,
                           map_hook=budget.map_hook)
    except exc:
        if budget.left < 0:  # a hook ran out (wire.unpack turns what it raised into exc)
            raise over(f"decoding would build over {budget.limit} bytes") from None
        raise
