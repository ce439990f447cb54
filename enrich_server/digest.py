"""The digest of a store (``enrich-server digest``): its applied replication sequence and an
order-independent hash of everything it serves, so that two replicas can be compared.

What is hashed, part by part (each record in a canonical form, by segment *name* where a
membership refers to a segment):

``memberships``    identity key → its segment names grouped by expiry, expiries and names
                   sorted (expired ones included: they are served, as nothing, and stay in
                   the store until a compaction removes them)
``segments``       segment id → name (``segment_names``)
``dmp_segments``   segment id → platform, title, created (unix seconds)
``aliases``        their user id → our user id
``applied_files``  drop-file name → its JSON record

Not hashed: the meta fields each node writes for itself (``built_at``, ``updated_at``,
``generation``), the sequence (reported beside the digest), and the tables derived from the
ones above (``segment_ids``, ``dmp_titles``).

Why order-independent: each record is hashed on its own (BLAKE2b, personalised with its part,
so a membership can never collide with an alias of the same bytes), and a part is the sum of
its records' hashes modulo 2**256. Addition commutes, so the same records give the same sum
whatever order they were written in, whatever the page layout or the history of rewrites;
and the scan needs no sorting and no memory beyond one record. Why a sum and not XOR: XOR
cancels a record present twice and is linear over GF(2), so a handful of differing records
that happen to XOR to zero (or that Gaussian elimination finds) pass unseen; a sum modulo
2**256 has neither weakness (Bellare and Micciancio's AdHash). The parts' counts and sums
are then hashed together, in a fixed order, into the digest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import msgspec

from enrich_server.store import SegmentStore, StoreView

#: Bumped if the canonical form of a record ever changes: digests of different versions
#: must not be compared.
_VERSION: Final = b"enrich-digest-1"
_MODULUS: Final = 2**256
_SIZE: Final = 32  # bytes of each BLAKE2b: the sum is kept to the same width
_ENCODER: Final = msgspec.msgpack.Encoder()


@dataclass(frozen=True, slots=True)
class Part:
    """One table's share of a digest: how many records, and their hashes' sum (hex)."""

    count: int
    sum: str


@dataclass(frozen=True, slots=True)
class Digest:
    """A store's applied sequence and the hash of what it serves."""

    sequence: int
    digest: str
    """Hex BLAKE2b of the parts below: equal on replicas serving the same content."""
    parts: dict[str, Part]
    """Per table, to find which one two differing replicas disagree on."""


def _part(name: str, records: Iterable[object]) -> Part:
    """The count and sum of ``records``, each encoded canonically and hashed under ``name``."""
    person = name.encode()
    encode = _ENCODER.encode
    blake2b = hashlib.blake2b
    total = 0
    count = 0
    for record in records:
        hashed = blake2b(encode(record), digest_size=_SIZE, person=person).digest()
        total += int.from_bytes(hashed)
        count += 1
    return Part(count, (total % _MODULUS).to_bytes(_SIZE).hex())


def _parts(view: StoreView) -> dict[str, Part]:
    # Generators, consumed one part at a time: nothing is held but the record in hand.
    return {
        "memberships": _part("memberships", view.membership_groups()),
        "segments": _part("segments", view.segments()),
        "dmp_segments": _part(
            "dmp_segments",
            ((s.segment_id, s.platform, s.title, s.created) for s in view.dmp_segments()),
        ),
        "aliases": _part("aliases", view.aliases()),
        "applied_files": _part("applied_files", view.applied_files()),
    }


def store_digest(store: SegmentStore) -> Digest:
    """The digest of ``store``: one read transaction, so the sequence and the content are of
    the same commit even while an applier writes. Linear in the store's size; holds the
    segment names and one record at a time."""
    with store.view() as view:
        sequence = view.applied_sequence()
        parts = _parts(view)
    summary = [(name, part.count, part.sum) for name, part in parts.items()]
    digest = hashlib.blake2b(_ENCODER.encode(summary), digest_size=_SIZE, person=_VERSION)
    return Digest(sequence, digest.hexdigest(), parts)
