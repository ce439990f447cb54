"""``compact`` on a replicated node: every node drops the same expired memberships (DESIGN §8).

Dropping them on one node, at its own clock, would set its store apart from the others'
(their digests differ, though all serve the same: an expired membership is served as
nothing). So the command publishes ``Compact`` entries, made once at this node's clock, each
naming a slice of the key space, which every applier applies in its own transaction like
any entry. Slices, not one entry: a whole-store scan in one transaction would hold every
node's applier, and so every write, for as long as it takes; a slice of ``SLICE_KEYS`` keys
takes milliseconds, and the command waits for this node to apply each one and then pauses as
long, so that compaction takes at most half of the appliers' time. Slice bounds are keys of
this node's store; on any other node a slice means the same range of keys whatever it holds.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from enrich_server.config import ReplicationConfig
from enrich_server.ingest import entries, objectstore, publisher
from enrich_server.ingest.entries import Compact
from enrich_server.store import SegmentStore

#: Identity keys per ``Compact`` entry.
SLICE_KEYS: Final = 20_000


@dataclass(frozen=True, slots=True)
class Compacted:
    """What a replicated compaction published."""

    at: int  # unix seconds the expiries were compared with
    slices: int
    first: int  # log entries first..last
    last: int


def compact_published(
    config: ReplicationConfig, store: Path, slice_keys: int = SLICE_KEYS
) -> Compacted:
    """Publish the compaction of every node as of now, slice by slice, each applied by the
    node at ``store`` before the next; raises ``StoreError`` (NATS, or the node not applying)."""
    at_ms = time.time_ns() // 1_000_000  # once: every slice, on every node, at this time
    return asyncio.run(_publish_slices(config, store, at_ms, _bounds(store, slice_keys)))


def _bounds(store: Path, slice_keys: int) -> list[bytes]:
    """Every ``slice_keys``-th key of the store: the starts of the slices after the first."""
    opened = SegmentStore(store)
    try:
        return list(itertools.islice(opened.identity_keys(), slice_keys, None, slice_keys))
    finally:
        opened.close()


async def _publish_slices(
    config: ReplicationConfig, store: Path, at_ms: int, bounds: list[bytes]
) -> Compacted:
    starts: list[bytes] = [b"", *bounds]
    ends: list[bytes | None] = [*bounds, None]
    run = uuid.uuid4().hex
    nc = await objectstore.connect(config)
    sequences = []
    try:
        for number, (start, end) in enumerate(zip(starts, ends, strict=True)):
            payload = entries.encode(Compact(at_ms, start, end))
            sequence = await publisher.publish(
                nc.jetstream(), config, payload, f"compact:{run}:{number}"
            )
            began = time.monotonic()
            await publisher.applied(store, sequence)
            await asyncio.sleep(time.monotonic() - began)  # the appliers' other half
            sequences.append(sequence)
    finally:
        await nc.close()
    return Compacted(at_ms // 1000, len(sequences), sequences[0], sequences[-1])
