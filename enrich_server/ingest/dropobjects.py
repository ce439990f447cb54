"""Drop files too large for one log entry travel through the object store (DESIGN §8).

The node a file is dropped on validates it as for an inline entry, uploads the original
``.tsv.gz`` to ``[replication] bucket`` as ``dropfile-<at_ms>-<sha256 prefix>`` and publishes
a small ``DropFileObject`` entry naming it. The original bytes, not a re-encoding of the
users: they are the smallest form (gzip, about a tenth of the users' msgpack), their SHA-256
is the one the file's ``applied_files`` record already holds, so one digest names the content
everywhere, and re-reading them (``dropfiles.read_users``) is the validation that accepted
them, so every node gets the same users in the same order.

Each applier streams the object to a directory inside its store root (``objectstore``),
checked against the entry's size and SHA-256, reads it and applies it whole, with its record
and the entry's sequence, in one write transaction, through the same code as an inline entry
(``entries.apply``). A missing object, or another one under its name, halts the applier:
the entry is never skipped.

Only the ``KEEP`` newest drop-file objects stay in the bucket (the publisher deletes older
ones): a node more than ``KEEP`` large files behind, or restoring a checkpoint older than
them, halts on the first missing one and, while halted, restores the newest checkpoint when
it was taken after that node's sequence (a periodic checkpoint of a caught-up node is).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Final

from nats.js.object_store import ObjectStore

from enrich_server.errors import StoreError
from enrich_server.ingest import entries, objectstore
from enrich_server.ingest.dropfiles import DropFileError, read_users
from enrich_server.ingest.entries import DropFile, DropFileObject
from enrich_server.store import StoreWriter

log = logging.getLogger(__name__)

PREFIX: Final = "dropfile-"
#: Drop-file objects kept in the bucket (a day of a large file every hour, and more).
KEEP: Final = 32


async def upload(bucket: ObjectStore, path: Path, prepared: DropFile) -> DropFileObject:
    """Upload the validated drop file at ``path`` (``prepared``); the entry naming it. Then
    deletes the drop-file objects but the ``KEEP`` newest. ``StoreError`` when the upload
    failed, or the file is not the one validated (it changed meanwhile)."""
    name = f"{PREFIX}{prepared.at_ms:013d}-{prepared.sha256[:16]}"
    info = await objectstore.upload_file(bucket, name, path, prepared.name)
    if info.digest != objectstore.sha256_digest(prepared.sha256):
        await bucket.delete(name)
        raise StoreError(f"{path} changed while it was uploaded: drop it again")
    await objectstore.keep_newest(bucket, PREFIX, KEEP)
    return DropFileObject(
        prepared.name,
        prepared.sha256,
        prepared.segment,
        prepared.lines,
        prepared.at_ms,
        prepared.expires,
        name,
        info.size or 0,
    )


async def apply(
    bucket: ObjectStore, entry: DropFileObject, sequence: int, root: Path, run: entries.Run
) -> str | None:
    """Apply log entry ``sequence``, ``entry``, to the store at ``root`` through the
    applier's writer (``run``); returns ``None`` once applied (or applied before), else why
    every node refuses it. ``FileNotFoundError`` when the bucket no longer holds the object,
    ``objectstore.CorruptObjectError`` when it holds another under its name."""

    def skipped(writer: StoreWriter) -> bool:
        if writer.applied_sequence() >= sequence:
            return True  # applied by an earlier run of this node
        with contextlib.suppress(*entries.CLEAN_ERRORS):  # refused by the apply below
            if entries.applied_before(writer, entry.name, entry.sha256):
                writer.set_applied_sequence(sequence)
                return True
        return False

    # A file published again later (after the duplicate window) is skipped without fetching
    # its object, which may be gone by then.
    if await run(skipped):
        return None
    with objectstore.working_dir(root, "dropfile") as directory:
        path = directory / entry.name
        digest = objectstore.sha256_digest(entry.sha256)
        await objectstore.fetch(bucket, entry.object, entry.size, digest, path)
        try:  # off the event loop: a million lines take seconds to read
            dropfile = entry.with_users(await asyncio.to_thread(read_users, path))
        except DropFileError as exc:  # validated by its publisher: another version's rules
            raise objectstore.CorruptObjectError(f"{entry.object} is refused here: {exc}") from None

    def job(writer: StoreWriter) -> str | None:
        if writer.applied_sequence() >= sequence:
            return None  # applied by an earlier run of this node
        try:
            entries.apply(writer, dropfile)
            refused = None
        except entries.CLEAN_ERRORS as exc:  # refused alike everywhere, having written nothing
            refused = str(exc)
        writer.set_applied_sequence(sequence)
        return refused

    refused: str | None = await run(job)
    if refused:
        log.warning("drop file refused", extra={"file": entry.name, "why": refused})
    return refused
