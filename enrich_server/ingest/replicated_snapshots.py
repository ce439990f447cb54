"""Replicated snapshots: ``load --replace`` on a replicated node reaches every node (DESIGN §8).

The publishing side (the CLI, on a node) builds the new store as a local replace does (from
the node's own store, so segment ids follow the cluster's), uploads it to the bucket as
``snapshot-<time>-<id>`` and publishes a ``Snapshot`` entry naming it. Each node's applier,
on reaching that entry, downloads it (JetStream checks its SHA-256; the entry's size and
digest must match the object's), carries its DMP state into it and swaps it in, recording the
entry's sequence in the new generation: the same entry on the same state gives the same store
everywhere. A segment-id conflict with a DMP segment created during the build refuses the
snapshot on every node alike; the store stays as it was.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nats.errors
from nats.js import api
from nats.js.object_store import ObjectStore

from enrich_server.config import Config
from enrich_server.errors import SegmentConflictError, StoreError
from enrich_server.generations import publish, remove_unused
from enrich_server.ingest import entries, objectstore
from enrich_server.ingest.entries import Snapshot
from enrich_server.snapshot import LoadReport, load_snapshots
from enrich_server.store import DATA_FILE, StoreWriter, store_dir

log = logging.getLogger(__name__)

PREFIX: Final = "snapshot-"
#: Snapshots kept in the bucket: a node replaying from an older checkpoint still finds them.
KEEP: Final = 3
_PUBLISH_TIMEOUT: Final = 10.0


@dataclass(frozen=True, slots=True)
class Published:
    """A snapshot in the log."""

    report: LoadReport
    object: str
    size: int
    sequence: int


def publish_snapshot(
    config: Config, paths: Sequence[Path], store_path: Path, progress: bool
) -> Published:
    """Build ``paths`` as a replace of the store at ``store_path`` (a node's store), upload
    it and publish its entry; raises ``SnapshotError`` (bad lines: nothing published) and
    ``StoreError`` (no store there, NATS unreachable, upload failed)."""
    if not (store_dir(store_path) / DATA_FILE).is_file():
        raise StoreError(
            f"no store at {store_path}: a replicated load --replace builds on a node's own"
            " store, so that segment ids stay those of the cluster"
        )
    asyncio.run(_reachable(config))  # before a build that may take minutes
    with objectstore.working_dir(store_path, "snapshot") as directory:

        def handoff(built: Path) -> None:
            (built / DATA_FILE).rename(directory / DATA_FILE)

        report = load_snapshots(paths, store_path, replace=True, progress=progress, handoff=handoff)
        name = f"{PREFIX}{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}"
        size, sequence = asyncio.run(_upload_and_publish(config, name, directory, report))
    return Published(report, name, size, sequence)


async def _reachable(config: Config) -> None:
    nc = await objectstore.connect(config.replication)
    await nc.close()


async def _upload_and_publish(
    config: Config, name: str, directory: Path, report: LoadReport
) -> tuple[int, int]:
    replication = config.replication
    nc = await objectstore.connect(replication)
    try:
        js = nc.jetstream()
        bucket = await objectstore.bucket(js, replication)
        description = json.dumps({"lines": report.lines, "identities": report.identities_added})
        info = await objectstore.upload(bucket, name, directory, description)
        entry = Snapshot(name, info.size or 0, info.digest or "")
        ack = await js.publish(
            replication.subject,
            entries.encode(entry),
            timeout=_PUBLISH_TIMEOUT,
            stream=replication.stream,
            headers={api.Header.MSG_ID.value: uuid.uuid4().hex},
        )
        await objectstore.keep_newest(bucket, PREFIX, KEEP)
        return entry.size, ack.seq
    except (TimeoutError, nats.errors.Error) as exc:
        raise StoreError(f"the snapshot was built but not published: {exc!r}") from None
    finally:
        await nc.close()


async def swap_in(
    bucket: ObjectStore, entry: Snapshot, sequence: int, root: Path, run: entries.Run
) -> str | None:
    """Apply log entry ``sequence``, ``entry``, to the store at ``root`` through the
    applier's writer (``run``); returns ``None`` once swapped in (or applied before), else
    why every node refuses it. ``FileNotFoundError`` when the bucket no longer holds it,
    ``objectstore.CorruptObjectError`` when it holds another object under its name."""
    with objectstore.working_dir(root, "snapshot") as directory:
        await objectstore.fetch(
            bucket, entry.object, entry.size, entry.digest, directory / DATA_FILE
        )

        def job(writer: StoreWriter) -> str | None:
            if writer.applied_sequence() >= sequence:
                return None  # applied by an earlier run of this node
            try:
                writer.replace_with(
                    directory, sequence, entry.object, lambda: publish(root, directory)
                )
            except SegmentConflictError as exc:
                writer.set_applied_sequence(sequence)  # refused alike everywhere: go on
                return str(exc)
            return None

        refused: str | None = await run(job)
    removed = remove_unused(root)
    if refused:
        log.error("replicated snapshot refused", extra={"snapshot": entry.object, "why": refused})
    else:
        log.info(
            "replicated snapshot swapped in",
            extra={"snapshot": entry.object, "sequence": sequence, "removed": removed},
        )
    return refused
