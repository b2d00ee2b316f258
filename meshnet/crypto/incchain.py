"""Incarnation tokens: a node proves it refuted, in 16 bytes instead of a 64-byte signature.

With identity every alive is the node's own claim. A full alive is signed (Ed25519, 64 bytes);
most alives, though, are refutations that change nothing but the incarnation, and under loss
they are most of what gossip carries. So a full alive also commits, under the same signature,
to the end ("anchor") of a hash chain only its node knows the start of:

    c_0 = random seed,  c_(i+1) = H(c_i),  anchor = c_L

and the node proves "alive at incarnation base + d" (d = 1..L, base = the full alive's
incarnation) with the token c_(L-d). A receiver checks H^d(token) == anchor, or, holding the
token for an earlier incarnation, H^(d - d_earlier)(token) == that token. Tokens for the
incarnations reached so far are public; the next one needs a preimage of H. After L
refutations, or when its metadata changes, the node signs a new full alive with a new chain.

H is BLAKE2b with a 16-byte digest, personalized: 128 bits of preimage resistance.
"""

from __future__ import annotations

import hashlib
import secrets

TOKEN_BYTES = 16
# Refutations one chain covers. A check costs at most this many hashes (~0.2 ms), which bounds
# what a forged token can cost a receiver; 512 refutations between two changes of a node's
# metadata is far more than Lifeguard lets happen.
CHAIN_LENGTH = 512
# The producer keeps every CHECKPOINT-th chain value, so a token costs at most that many hashes.
CHECKPOINT = 32
_PERSON = b"meshnet-incchain"


def step(value: bytes) -> bytes:
    return hashlib.blake2b(value, digest_size=TOKEN_BYTES, person=_PERSON).digest()


def reaches(token: bytes, steps: int, target: bytes) -> bool:
    """Whether hashing TOKEN STEPS times gives TARGET (1 <= STEPS <= CHAIN_LENGTH)."""
    if not 1 <= steps <= CHAIN_LENGTH or len(token) != TOKEN_BYTES:
        return False
    for _ in range(steps):
        token = step(token)
    return secrets.compare_digest(token, target)


class IncChain:
    """One node's chain (see the module docstring)."""

    __slots__ = ("_checkpoints", "anchor")

    def __init__(self, seed: bytes | None = None) -> None:
        value = seed if seed is not None else secrets.token_bytes(TOKEN_BYTES)
        checkpoints = []
        for i in range(CHAIN_LENGTH + 1):
            if i % CHECKPOINT == 0:
                checkpoints.append(value)
            if i < CHAIN_LENGTH:
                value = step(value)
        self._checkpoints = checkpoints
        self.anchor = value  # c_L

    def token(self, d: int) -> bytes:
        """The proof of incarnation base + D: c_(L-D)."""
        if not 1 <= d <= CHAIN_LENGTH:
            raise ValueError(f"token {d} is outside the chain")
        i = CHAIN_LENGTH - d
        value = self._checkpoints[i // CHECKPOINT]
        for _ in range(i % CHECKPOINT):
            value = step(value)
        return value
