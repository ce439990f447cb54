"""Lift measurement: a stable share of users who get no segments (``[enrich] holdout``).

A user is held out when a hash of their first user-level key falls in the lowest ``share``
of the hash space. The hash is BLAKE2b of the key alone, so the same user is held out on every
worker, every replica and every restart, and a partner can compare the held-out users'
outcomes with everyone else's to show what its segments add.
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Final

_SPACE: Final = 1 << 64


class Holdout:
    """Decides whether a user is held out; built once from the configured share (0-1)."""

    __slots__ = ("_below", "share")

    def __init__(self, share: float) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"holdout share {share!r} is not between 0 and 1")
        self.share = share
        self._below = int(share * _SPACE)

    def held_out(self, user_key: bytes) -> bool:
        """Whether the user whose first user-level key is ``user_key`` is held out."""
        digest = blake2b(user_key, digest_size=8).digest()
        return int.from_bytes(digest, "big") < self._below
