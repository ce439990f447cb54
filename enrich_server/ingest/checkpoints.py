"""Checkpoints: a replicated node's store, compacted, in the JetStream object store (DESIGN §8).

A checkpoint is one LMDB file (``data.mdb``, written by a compacting copy inside one read
transaction, so its data and its ``applied_sequence`` agree) stored as the object
``checkpoint-<sequence>`` of ``[replication] bucket`` (``objectstore``). Names carry the
sequence, so an upload never overwrites a checkpoint another node is downloading; the newest
``KEEP`` are kept. The restorer opens the file as a store and checks its sequence against the
object's name.

Taken by ``enrich-server checkpoint`` and, every ``checkpoint_every`` seconds, by a process
the applier starts (a copy of a large store takes seconds: the applier never waits for it;
and the ingestion process, a daemon, may not fork ``multiprocessing`` children).
Restored by the applier (``jetstream``) when its store is empty or the stream no longer
holds the entries after its sequence.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nats.errors
from nats.js.object_store import ObjectStore

from enrich_server import config as config_module
from enrich_server.config import Config
from enrich_server.errors import StoreError
from enrich_server.generations import open_current, publish, remove_unused
from enrich_server.ingest import objectstore
from enrich_server.log import setup_logging
from enrich_server.store import SegmentStore

log = logging.getLogger(__name__)

#: Checkpoints kept in the bucket: the newest, and the one before (a node may be fetching it).
KEEP: Final = 2
PREFIX: Final = "checkpoint-"
_NAME: Final = re.compile(PREFIX + r"(\d{12})")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint in the bucket."""

    name: str
    sequence: int
    size: int


def object_name(sequence: int) -> str:
    """The object a checkpoint of ``sequence`` is stored as."""
    return f"{PREFIX}{sequence:012d}"


async def stored(store: ObjectStore) -> list[Checkpoint]:
    """The checkpoints in the bucket, oldest first."""
    found = []
    for info in await objectstore.names(store, PREFIX):
        match = _NAME.fullmatch(info.name or "")
        if match:
            found.append(Checkpoint(info.name or "", int(match.group(1)), info.size or 0))
    return sorted(found, key=lambda c: c.sequence)


async def latest(store: ObjectStore) -> Checkpoint | None:
    """The newest checkpoint in the bucket, if any."""
    found = await stored(store)
    return found[-1] if found else None


async def take(config: Config, only_if_newer: bool = True) -> Checkpoint | None:
    """Copy the store at ``[server] store`` and upload it; returns what was stored, or
    ``None`` when the bucket already holds a checkpoint at or past the store's sequence
    (and ``only_if_newer``). Older checkpoints beyond ``KEEP`` are deleted."""
    root = Path(config.server.store)
    nc = await objectstore.connect(config.replication)
    try:
        store = await objectstore.bucket(nc.jetstream(), config.replication)
        newest = await latest(store)
        with objectstore.working_dir(root, "checkpoint") as directory:
            sequence = await asyncio.to_thread(_copy, root, directory)
            if only_if_newer and newest is not None and newest.sequence >= sequence:
                return None
            name = object_name(sequence)
            description = json.dumps({"sequence": sequence, "node": socket.gethostname()})
            info = await objectstore.upload(store, name, directory, description)
        await objectstore.keep_newest(store, PREFIX, KEEP)
        return Checkpoint(name, sequence, info.size or 0)
    except (TimeoutError, nats.errors.Error) as exc:
        raise StoreError(f"checkpoint upload failed: {exc!r}") from None
    finally:
        await nc.close()


def _copy(root: Path, directory: Path) -> int:
    """Compact the store's current generation into ``directory``; returns its sequence."""
    store, lease = open_current(root)
    try:
        return store.copy_to(directory)
    finally:
        store.close()
        lease.release()


async def restore(store: ObjectStore, checkpoint: Checkpoint, root: Path) -> None:
    """Download ``checkpoint`` and make it the current generation of the store at ``root``
    (readers follow ``current`` as after a replace). Raises ``StoreError`` when it cannot be
    fetched or is not the store it claims to be; the live store is then untouched."""
    with objectstore.working_dir(root, "restore") as directory:
        try:
            await objectstore.download(store, checkpoint.name, checkpoint.size, directory)
        except FileNotFoundError as exc:
            raise StoreError(str(exc)) from None
        found = await asyncio.to_thread(_sequence_of, directory)
        if found != checkpoint.sequence:
            raise StoreError(
                f"{checkpoint.name} holds a store at sequence {found}, not {checkpoint.sequence}"
            )
        publish(root, directory)  # renamed to gen-NNNNNN: nothing left to remove
    removed = remove_unused(root)
    log.info(
        "checkpoint restored",
        extra={"checkpoint": checkpoint.name, "sequence": found, "removed": removed},
    )


def _sequence_of(directory: Path) -> int:
    try:
        downloaded = SegmentStore(directory)
    except StoreError as exc:
        raise StoreError(f"the downloaded checkpoint is not a store: {exc}") from None
    try:
        return downloaded.applied_sequence()
    finally:
        downloaded.close()


async def take_in_process(config_json: bytes) -> int:
    """Run ``take`` in a new process (``python -m enrich_server.ingest.checkpoints``, the config on
    its stdin), so that copying the store holds neither this process's loop nor its GIL;
    returns its exit code. Cancelled: the process is killed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", __name__, stdin=asyncio.subprocess.PIPE
    )
    try:
        await process.communicate(config_json)
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise
    return process.returncode or 0


def run(config_json: bytes) -> None:
    """Entry point of the checkpoint process (``take_in_process``)."""
    config = config_module.from_json(config_json)
    setup_logging(config.server.log_level)
    try:
        taken = asyncio.run(take(config))
    except StoreError as exc:
        log.error("periodic checkpoint failed", extra={"error": str(exc)})
        raise SystemExit(1) from None
    if taken is not None:
        log.info(
            "checkpoint uploaded",
            extra={"checkpoint": taken.name, "sequence": taken.sequence, "bytes": taken.size},
        )


if __name__ == "__main__":
    run(sys.stdin.buffer.read())
