"""The JetStream object store bucket of a replicated cluster: whole stores travel through it.

Checkpoints (``checkpoints``) and replicated snapshots (``snapshots``) are single LMDB files
(``data.mdb``) stored as objects of ``[replication] bucket``; drop files too large for one
log entry (``dropobjects``) are stored there as they were dropped. Transfers stream from and to a
directory inside the store's root (``working_dir``), never through memory or ``/tmp`` (a pod's
``/tmp`` may be a small in-memory volume); JetStream checks the SHA-256 of what it hands back.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext, api
from nats.js.object_store import ObjectStore

from enrich_server.config import ReplicationConfig
from enrich_server.errors import StoreError
from enrich_server.generations import BUILD_PREFIX, Lease
from enrich_server.store import DATA_FILE

#: Slowest transfer assumed before a download or upload is given up (bytes per second).
_MIN_RATE: Final = 2 << 20
_MIN_TRANSFER_SECONDS: Final = 60.0
_CONNECT_SECONDS: Final = 5.0


async def connect(config: ReplicationConfig) -> Client:
    """A NATS connection for a one-off job (the CLI); ``StoreError`` when unreachable."""

    async def quiet(_: Exception) -> None:
        pass  # the failure is raised below; nats-py would print each attempt's traceback

    try:
        # One attempt per server (0 attempts means: retry forever).
        connecting = nats.connect(
            servers=list(config.nats),
            name="enrich-server-cli",
            connect_timeout=_CONNECT_SECONDS,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            error_cb=quiet,
        )
        return await asyncio.wait_for(connecting, 2 * _CONNECT_SECONDS * len(config.nats))
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise StoreError(f"NATS at {', '.join(config.nats)} is not reachable: {exc!r}") from None


async def bucket(js: JetStreamContext, config: ReplicationConfig) -> ObjectStore:
    """The bucket, created (file storage, ``replicas`` copies) when missing."""
    try:
        return await js.object_store(config.bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_object_store(
            config.bucket,
            config=api.ObjectStoreConfig(
                description="enrich-server checkpoints, snapshots and large drop files",
                storage=api.StorageType.FILE,
                replicas=config.replicas,
            ),
        )


async def names(store: ObjectStore, prefix: str) -> list[api.ObjectInfo]:
    """The live objects whose name starts with ``prefix``, sorted by name."""
    try:
        infos = await store.list(ignore_deletes=True)
    except nats.js.errors.NotFoundError:
        return []
    found = [i for i in infos if not i.deleted and (i.name or "").startswith(prefix)]
    return sorted(found, key=lambda i: i.name or "")


async def keep_newest(store: ObjectStore, prefix: str, keep: int) -> None:
    """Delete the objects named ``prefix...`` but the ``keep`` last by name."""
    for old in (await names(store, prefix))[:-keep]:
        await store.delete(old.name or "")


def _timeout(size: int) -> float:
    return max(_MIN_TRANSFER_SECONDS, size / _MIN_RATE)


@contextmanager
def working_dir(root: Path, purpose: str) -> Iterator[Path]:
    """A directory inside the store's root, held exclusively while the block runs (a killed
    process's is removed by the next clean-up, as a killed build's is), removed after (a
    no-op once it was published as a generation)."""
    directory = root / f"{BUILD_PREFIX}{purpose}-{os.getpid()}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    lease = Lease(directory, exclusive=True)
    try:
        yield directory
    finally:
        lease.release()
        shutil.rmtree(directory, ignore_errors=True)


async def upload(
    store: ObjectStore, name: str, directory: Path, description: str
) -> api.ObjectInfo:
    """Store ``directory``'s LMDB file as object ``name``."""
    return await upload_file(store, name, directory / DATA_FILE, description)


async def upload_file(
    store: ObjectStore, name: str, path: Path, description: str
) -> api.ObjectInfo:
    """Store the file at ``path`` as object ``name``, streamed from disk."""
    meta = api.ObjectMeta(name=name, description=description)
    try:
        with path.open("rb") as data:
            return await asyncio.wait_for(
                store.put(name, data, meta=meta), _timeout(path.stat().st_size)
            )
    except (TimeoutError, nats.errors.Error) as exc:
        raise StoreError(f"cannot upload {name}: {exc!r}") from None


async def download(store: ObjectStore, name: str, size: int, directory: Path) -> api.ObjectInfo:
    """Write object ``name`` (``size`` bytes, for the time allowed) as ``directory``'s LMDB
    file; see ``download_file``."""
    return await download_file(store, name, size, directory / DATA_FILE)


async def download_file(store: ObjectStore, name: str, size: int, path: Path) -> api.ObjectInfo:
    """Stream object ``name`` (``size`` bytes, for the time allowed) to ``path``; its info.
    ``FileNotFoundError`` when the bucket no longer holds it, ``CorruptObjectError`` when
    its bytes do not have the SHA-256 the bucket holds for them, ``StoreError`` when it
    cannot be fetched whole."""
    try:
        with path.open("wb") as data:
            got = await asyncio.wait_for(store.get(name, writeinto=data), _timeout(size))
    except nats.js.errors.NotFoundError:
        raise FileNotFoundError(f"{name} is not in the bucket") from None
    except nats.js.errors.DigestMismatchError:
        raise CorruptObjectError(f"{name} in the bucket does not match its SHA-256") from None
    except (TimeoutError, nats.errors.Error) as exc:
        raise StoreError(f"cannot download {name}: {exc!r}") from None
    return got.info


async def fetch(store: ObjectStore, name: str, size: int, digest: str, path: Path) -> None:
    """Download object ``name`` to ``path`` and check it is the one a log entry names (its
    ``size`` and JetStream ``digest``, checked on what was downloaded: the name may have been
    written again meanwhile). Raises as ``download_file``, ``CorruptObjectError`` when the
    object is another."""
    info = await download_file(store, name, size, path)
    if (info.size, info.digest) != (size, digest):
        raise CorruptObjectError(
            f"{name} in the bucket ({info.size} bytes, {info.digest}) is not the object the"
            f" log names ({size} bytes, {digest})"
        )


def sha256_digest(hexdigest: str) -> str:
    """JetStream's form of a SHA-256 (``SHA-256=`` and URL-safe base64), from its hex form."""
    return "SHA-256=" + base64.urlsafe_b64encode(bytes.fromhex(hexdigest)).decode()


class CorruptObjectError(Exception):
    """An object of the bucket is not the one the log entry naming it says: never applied in
    its place (the applier halts on it, as on a missing one)."""
