"""Checkpoints: a replicated node's store, compacted, in the JetStream object store (DESIGN §8).

A checkpoint is one LMDB file (``data.mdb``, written by a compacting copy inside one read
transaction, so its data and its ``applied_sequence`` agree) stored as the object
``checkpoint-<sequence>`` of ``[replication] bucket``. Names carry the sequence, so an upload
never overwrites a checkpoint another node is downloading; the newest ``KEEP`` are kept.
JetStream's object store checks the SHA-256 of what it hands back; the restorer also opens
the file as a store and checks its sequence against the object's name.

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
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.object_store import ObjectStore

from enrich_server import config as config_module
from enrich_server.config import Config, ReplicationConfig
from enrich_server.errors import StoreError
from enrich_server.generations import (
    BUILD_PREFIX,
    Lease,
    open_current,
    publish,
    remove_unused,
)
from enrich_server.log import setup_logging
from enrich_server.store import DATA_FILE, SegmentStore

log = logging.getLogger(__name__)

#: Checkpoints kept in the bucket: the newest, and the one before (a node may be fetching it).
KEEP: Final = 2
_NAME: Final = re.compile(r"checkpoint-(\d{12})")
#: Slowest transfer assumed before a download or upload is given up (bytes per second).
_MIN_RATE: Final = 2 << 20
_MIN_TRANSFER_SECONDS: Final = 60.0
_CONNECT_SECONDS: Final = 5.0


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A checkpoint in the bucket."""

    name: str
    sequence: int
    size: int


def object_name(sequence: int) -> str:
    """The object a checkpoint of ``sequence`` is stored as."""
    return f"checkpoint-{sequence:012d}"


async def connect(config: ReplicationConfig) -> Client:
    """A NATS connection for a one-off job (the CLI); ``StoreError`` when unreachable."""

    async def quiet(_: Exception) -> None:
        pass  # the failure is raised below; nats-py would print each attempt's traceback

    try:
        # One attempt per server (0 attempts means: retry forever).
        connecting = nats.connect(
            servers=list(config.nats),
            name="enrich-server-checkpoint",
            connect_timeout=_CONNECT_SECONDS,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            error_cb=quiet,
        )
        return await asyncio.wait_for(connecting, 2 * _CONNECT_SECONDS * len(config.nats))
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise StoreError(f"NATS at {', '.join(config.nats)} is not reachable: {exc!r}") from None


async def bucket(js: JetStreamContext, config: ReplicationConfig) -> ObjectStore:
    """The object store bucket, created (file storage, ``replicas`` copies) when missing."""
    try:
        return await js.object_store(config.bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_object_store(
            config.bucket,
            config=api.ObjectStoreConfig(
                description="enrich-server checkpoints and snapshots",
                storage=api.StorageType.FILE,
                replicas=config.replicas,
            ),
        )


async def stored(store: ObjectStore) -> list[Checkpoint]:
    """The checkpoints in the bucket, oldest first."""
    try:
        infos = await store.list(ignore_deletes=True)
    except nats.js.errors.NotFoundError:
        return []
    found = []
    for info in infos:
        match = _NAME.fullmatch(info.name or "")
        if match and not info.deleted:
            found.append(Checkpoint(info.name or "", int(match.group(1)), info.size or 0))
    return sorted(found, key=lambda c: c.sequence)


async def latest(store: ObjectStore) -> Checkpoint | None:
    """The newest checkpoint in the bucket, if any."""
    found = await stored(store)
    return found[-1] if found else None


def _timeout(size: int) -> float:
    return max(_MIN_TRANSFER_SECONDS, size / _MIN_RATE)


@contextmanager
def _building(root: Path, purpose: str) -> Iterator[Path]:
    """A directory inside the store's root, held exclusively while the block runs (a killed
    process's is removed by the next clean-up, as a killed build's is), removed after."""
    directory = root / f"{BUILD_PREFIX}{purpose}-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    lease = Lease(directory, exclusive=True)
    try:
        yield directory
    finally:
        lease.release()
        shutil.rmtree(directory, ignore_errors=True)


async def take(config: Config, only_if_newer: bool = True) -> Checkpoint | None:
    """Copy the store at ``[server] store`` and upload it; returns what was stored, or
    ``None`` when the bucket already holds a checkpoint at or past the store's sequence
    (and ``only_if_newer``). Older checkpoints beyond ``KEEP`` are deleted."""
    root = Path(config.server.store)
    nc = await connect(config.replication)
    try:
        store = await bucket(nc.jetstream(), config.replication)
        newest = await latest(store)
        with _building(root, "checkpoint") as directory:
            sequence = await asyncio.to_thread(_copy, root, directory)
            if only_if_newer and newest is not None and newest.sequence >= sequence:
                return None
            path = directory / DATA_FILE
            size = path.stat().st_size
            name = object_name(sequence)
            meta = api.ObjectMeta(
                name=name,
                description=json.dumps({"sequence": sequence, "node": socket.gethostname()}),
            )
            with path.open("rb") as data:
                await asyncio.wait_for(store.put(name, data, meta=meta), _timeout(size))
        for old in (await stored(store))[:-KEEP]:
            await store.delete(old.name)
        return Checkpoint(name, sequence, size)
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
    with _building(root, "restore") as directory:
        path = directory / DATA_FILE
        try:
            with path.open("wb") as data:
                await asyncio.wait_for(
                    store.get(checkpoint.name, writeinto=data), _timeout(checkpoint.size)
                )
        except (TimeoutError, nats.errors.Error) as exc:
            raise StoreError(f"cannot download {checkpoint.name}: {exc!r}") from None
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
    """Run ``take`` in a new process (``python -m enrich_server.checkpoints``, the config on
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
