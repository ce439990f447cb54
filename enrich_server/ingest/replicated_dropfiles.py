"""Drop files on a replicated node: validated here, applied by every node (DESIGN §8).

``enrich-server ingest --config`` with ``[replication]`` validates a file against the node's
own store exactly as a single node does (a bad file is refused with its bad lines, and
nothing is published), then publishes it as ONE ``DropFile`` entry: every node applies it
whole or not at all, in one transaction that records its name. One entry, not parts: a file
is then all-or-nothing on every node with nothing to reassemble, at the price of a bound,
``jetstream.MAX_ENTRY_BYTES`` (about 35,000 lines of 22-character user ids), past which the
file is refused with the advice to split it.

Its ``Nats-Msg-Id`` is made of its name and SHA-256, so publishing the same file again
within JetStream's duplicate window stores nothing new; later, every applier skips it by
its record. The command returns once this node's applier has applied the entry (it polls the
store, which is this node's), so the file can be moved to ``applied/``. A file that every
applier refused on apply (its segment deleted, or a file of the same name applied meanwhile)
is validated again for the reason.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path

from enrich_server.config import PlatformConfig, ReplicationConfig
from enrich_server.ingest import entries, objectstore, publisher
from enrich_server.ingest.dropfiles import DropFileError, FileResult, prepare
from enrich_server.ingest.entries import DropFile
from enrich_server.ingest.jetstream import MAX_ENTRY_BYTES, too_large
from enrich_server.store import SegmentStore


def apply_published(
    config: ReplicationConfig,
    store: Path,
    path: Path,
    platforms: Mapping[int, PlatformConfig],
    wait: float = publisher.APPLY_WAIT_SECONDS,
) -> FileResult:
    """Validate drop file ``path`` against the node's store at ``store``, publish it and wait
    until the node applied it. Raises ``DropFileError`` (refused: nothing published, or
    refused by every applier) and ``StoreError`` (not published, or not applied here within
    ``wait``: it will be, and publishing it again applies nothing twice)."""
    prepared = _validate(store, path, platforms)
    if isinstance(prepared, FileResult):
        return prepared
    payload = entries.encode(prepared)
    if len(payload) > MAX_ENTRY_BYTES:
        raise DropFileError(
            path, [f"{prepared.lines:,} lines: {too_large(prepared, len(payload))}"]
        )
    msg_id = f"dropfile:{prepared.name}:{prepared.sha256}"
    sequence = asyncio.run(_publish_and_wait(config, store, payload, msg_id, wait))
    opened = SegmentStore(store)
    try:
        record = opened.applied_file(prepared.name)
    finally:
        opened.close()
    if record is None or entries.file_record(record).get("sha256") != prepared.sha256:
        # Refused by every applier alike (before it wrote anything):
        _validate(store, path, platforms)  # raises why: the store changed since it was checked
        raise DropFileError(path, [f"log entry {sequence} was refused on apply (see the log)"])
    adds = sum(add for _, add in prepared.users)
    return FileResult(
        prepared.name, prepared.segment, adds, len(prepared.users) - adds, False, sequence
    )


def _validate(
    store: Path, path: Path, platforms: Mapping[int, PlatformConfig]
) -> DropFile | FileResult:
    opened = SegmentStore(store)
    try:

        def owner(sid: int) -> int | None:
            segment = opened.dmp_segment(sid)
            return None if segment is None else segment.platform

        # The time is this node's, once: every applier records and expires with it.
        return prepare(path, opened.applied_file, owner, platforms, time.time_ns() // 1_000_000)
    finally:
        opened.close()


async def _publish_and_wait(
    config: ReplicationConfig, store: Path, payload: bytes, msg_id: str, wait: float
) -> int:
    nc = await objectstore.connect(config)
    try:
        sequence = await publisher.publish(nc, config, payload, msg_id)
    finally:
        await nc.close()
    await publisher.applied(store, sequence, wait)
    return sequence
