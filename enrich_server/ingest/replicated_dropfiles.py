"""Drop files on a replicated node: validated here, applied by every node (DESIGN §8).

``enrich-server ingest --config`` with ``[replication]`` validates a file against the node's
own store exactly as a single node does (a bad file is refused with its bad lines, and
nothing is published), then publishes it as ONE entry: every node applies it whole or not
at all, in one transaction that records its name, with nothing to reassemble. A file whose
``DropFile`` entry (its users inline) fits ``jetstream.MAX_ENTRY_BYTES`` (about 35,000 lines
of 22-character user ids) goes inline: one message, no upload. A larger one, of any size,
goes through the object store (``dropobjects``), its entry naming the object.

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
from typing import Final

import nats.errors

from enrich_server.config import PlatformConfig, ReplicationConfig
from enrich_server.errors import StoreError
from enrich_server.ingest import dropobjects, entries, objectstore, publisher
from enrich_server.ingest.dropfiles import DropFileError, FileResult, prepare
from enrich_server.ingest.entries import DropFile
from enrich_server.ingest.jetstream import MAX_ENTRY_BYTES
from enrich_server.store import SegmentStore

#: The slowest a node is assumed to apply a drop file's lines (1,000,000 lines took 6.4 to
#: 9.0 s from ingest to applied, on a loaded 2-core VM): the wait grows with the file.
APPLIED_LINES_PER_SECOND: Final = 25_000


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
    ``wait`` and a second per ``APPLIED_LINES_PER_SECOND`` lines: it will be, and publishing
    it again applies nothing twice)."""
    prepared = _validate(store, path, platforms)
    if isinstance(prepared, FileResult):
        return prepared
    # A large file takes its node seconds to download, read and apply: waited for as long.
    wait += prepared.lines / APPLIED_LINES_PER_SECOND
    sequence = asyncio.run(_publish_and_wait(config, store, path, prepared, wait))
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
    config: ReplicationConfig, store: Path, path: Path, prepared: DropFile, wait: float
) -> int:
    payload = entries.encode(prepared)
    nc = await objectstore.connect(config)
    try:
        if len(payload) > MAX_ENTRY_BYTES:  # the users travel as the file, in the bucket
            try:
                bucket = await objectstore.bucket(nc.jetstream(), config)
                payload = entries.encode(await dropobjects.upload(bucket, path, prepared))
            except (TimeoutError, nats.errors.Error) as exc:
                raise StoreError(f"the drop file was not uploaded: {exc!r}") from None
        msg_id = f"dropfile:{prepared.name}:{prepared.sha256}"
        sequence = await publisher.publish(nc.jetstream(), config, payload, msg_id)
    finally:
        await nc.close()
    await publisher.applied(store, sequence, wait)
    return sequence
