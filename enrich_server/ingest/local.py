"""The ingestion process: the one writer of DMP mutations, beside the serving workers.

``serve`` starts it when ``[[platform]]`` tables are configured. The workers answer the
DMP API over HTTP but hand every write to this process over a Unix socket, so the hot
path shares neither a GIL nor CPU priority with ingestion: this process runs as
``SCHED_IDLE`` (``[dmp] writer_idle``; else niced), its decoding, validation and LMDB work
preempted by any worker that has a request to answer. One process also means one LMDB
writer: no lock ping-pong between workers, and the group commit of ``writes.WriteQueue``
gathers every worker's batches into shared fsyncs. A reply is sent only after the commit.

Protocol: frames of a 4-byte big-endian length and a msgpack body. A request is
``[op, args...]``; the reply ``["ok", result]`` or ``["error", kind, message, problems]``.
The process exits when ``serve`` does, even killed (it watches its parent).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import multiprocessing
import multiprocessing.process
import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any, Final

import msgspec
import uvloop

from enrich_server import config as config_module
from enrich_server.config import Config
from enrich_server.errors import StoreError, UnconfirmedWriteError
from enrich_server.generations import StoreFollower
from enrich_server.ingest import entries, refusals
from enrich_server.ingest.batches import Mutation
from enrich_server.ingest.entries import (
    CLEAN_ERRORS,
    CreateSegment,
    DeleteSegment,
    Entry,
    Mutations,
    SyncAlias,
    mutations,
)
from enrich_server.ingest.jetstream import JetStreamLog
from enrich_server.ingest.sync import ReplayError, ReplayGuard
from enrich_server.ingest.write_queue import WriteQueue
from enrich_server.log import setup_logging
from enrich_server.store import SegmentStore, store_dir

log = logging.getLogger(__name__)

_LENGTH: Final = struct.Struct(">I")
_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder()
#: How often the process checks that ``serve`` is still its parent.
PARENT_CHECK_SECONDS: Final = 0.5
#: With ``[dmp] durability = "os"``, how often committed writes are forced to disk.
FLUSH_SECONDS: Final = 1.0
#: How long a dead ingestion process stays dead before ``Supervisor`` starts another.
RESTART_SECONDS: Final = 1.0
#: Frames above this are refused: the largest ingestion body plus room for the envelope.
_FRAME_SLACK: Final = 4096
#: The op asking where the node stands in its log (``IngestClient.status``).
STATUS_OP: Final = "status"


async def read_frame(reader: asyncio.StreamReader, limit: int) -> Any:
    """One decoded frame; raises ``asyncio.IncompleteReadError`` at end of stream."""
    size = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))[0]
    if size > limit:
        raise ValueError(f"frame of {size} bytes is over the {limit} limit")
    return _DECODER.decode(await reader.readexactly(size))


def frame(message: Any) -> bytes:
    """``message`` encoded as one frame."""
    body = _ENCODER.encode(message)
    return _LENGTH.pack(len(body)) + body


class IngestClient:
    """A worker's side: ``await client.call(op, *args)``, over a small connection pool.

    Raises the refusal the writer raised (``refusals``), and ``StoreError`` when the
    ingestion process cannot be reached.
    """

    def __init__(self, socket_path: str, max_body: int) -> None:
        self._path = socket_path
        self._limit = max_body + _FRAME_SLACK
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def call(self, op: str, *args: Any) -> Any:
        """Run ``op`` in the ingestion process; returns its result after the commit."""
        try:
            if self._idle:
                reader, writer = self._idle.pop()
            else:
                reader, writer = await asyncio.open_unix_connection(self._path, limit=self._limit)
        except OSError as exc:
            raise StoreError(f"the ingestion process is not reachable: {exc}") from None
        try:
            writer.write(frame([op, *args]))
            reply = await read_frame(reader, self._limit)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            writer.close()  # sent, unanswered: the process may have committed it
            raise UnconfirmedWriteError(
                f"the ingestion process is not reachable ({exc}): it may still be applied,"
                " and repeating it is safe"
            ) from None
        except BaseException:  # cancelled mid-call: the connection's state is unknown
            writer.close()
            raise
        self._idle.append((reader, writer))
        if reply[0] == "ok":
            return reply[1]
        raise refusals.error_of(*reply[1:])

    async def status(self) -> dict[str, Any]:
        """Where the node stands in its log: ``ready``, ``applied``, and when replicated the
        stream's ``last`` sequence, ``lag_seconds``, ``connected``, ``halted``, counts."""
        result: dict[str, Any] = await self.call(STATUS_OP)
        return result

    def close(self) -> None:
        """Close the pooled connections."""
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class _Ops:
    """The ops the workers may ask for, each turned into a log entry (``entries``)."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._ttl = {p.id: p.ttl for p in config.platforms}
        self._replays = ReplayGuard(config.dmp.signature_window)

    def entry(self, op: str, args: list[Any]) -> Entry:
        now = int(time.time())
        if op == "batch":
            platform, body = args
            return mutations(platform, self._ttl[platform], body, self._config.dmp.max_batch, now)
        if op == "single":
            platform, fields = args
            return Mutations(
                platform, self._ttl[platform], now, [msgspec.convert(fields, Mutation)]
            )
        if op == "create":
            platform, title, key = args
            return CreateSegment(platform, title, key, now)
        if op == "delete":
            platform, sid = args
            return DeleteSegment(platform, sid)
        if op == "alias":
            their, ours, signature = args
            if signature and not self._replays.first_use(signature):
                raise ReplayError("signature already used")
            return SyncAlias(their, ours)
        raise ValueError(f"unknown op {op!r}")


def _error_reply(exc: Exception) -> list[Any]:
    refusal = refusals.refusal_of(exc)
    if refusal is None:
        log.exception("ingestion request failed")
    elif refusal.status >= 500:
        log.error("store write failed", extra={"error": str(exc)})
    return refusals.reply(exc)


async def _serve(config: Config, socket_path: str, parent: int, ready: Event) -> None:
    root = Path(config.server.store)
    # The store follows replaces like the workers' does: checked before each transaction,
    # and again once it holds the write lock (a replace published meanwhile retries it).
    # A replicated node does not fsync its commits: the stream is the durable record.
    fsync = config.dmp.durability == "fsync" and not config.replicated
    follower = StoreFollower(root, writable=True, sync=fsync)

    # A swap closes the old store: never while the flush thread syncs it.
    swap = threading.Lock()

    def current() -> SegmentStore:
        with swap:
            follower.refresh()
            return follower.store

    def is_current(store: SegmentStore) -> bool:
        return store_dir(root) == store.directory

    queue = WriteQueue(current, clean_errors=CLEAN_ERRORS, is_current=is_current)
    replicated = JetStreamLog(config, current, queue.run) if config.replicated else None

    async def submit(entry: Entry) -> Any:
        if replicated is not None:
            return await replicated.submit(entry)
        return await queue.run(lambda writer: entries.apply(writer, entry))

    ops = _Ops(config)
    limit = config.dmp.max_body + _FRAME_SLACK

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.closing(writer):
            while True:
                try:
                    request = await read_frame(reader, limit)
                except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                    return
                try:
                    if request[0] == STATUS_OP:
                        result = _status(config, replicated, follower.store)
                    else:
                        result = await submit(ops.entry(request[0], request[1:]))
                    reply: list[Any] = ["ok", result]
                except Exception as exc:  # every failure goes back to the worker that asked
                    reply = _error_reply(exc)
                writer.write(frame(reply))

    if replicated is not None:
        await replicated.start()
    server = await asyncio.start_unix_server(handle, socket_path, limit=limit)
    os.chmod(socket_path, 0o600)
    # Logged before the parent is told: tests (and operators) read the pid from this line.
    log.info(
        "ingestion process ready",
        extra={"pid": os.getpid(), "store": str(root), "socket": socket_path},
    )
    ready.set()
    try:
        await _until_stopped(parent, None if fsync else functools.partial(_flush, follower, swap))
    finally:
        server.close()
        if replicated is not None:
            await replicated.close()
        queue.close()  # finishes what was queued: those writes commit
        if not fsync:
            _flush(follower, swap)
        follower.close()
        _remove_if_orphaned(socket_path, parent)
        log.info("ingestion process stopped", extra={"pid": os.getpid()})


async def _until_stopped(parent: int, flush: Callable[[], None] | None) -> None:
    """Until SIGTERM/SIGINT, or ``serve`` is gone; ``flush`` (commits not fsynced) runs every
    ``FLUSH_SECONDS`` meanwhile."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    flushed = loop.time()
    while not stopping.is_set() and os.getppid() == parent:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), PARENT_CHECK_SECONDS)
        if flush is not None and loop.time() - flushed >= FLUSH_SECONDS:
            flushed = loop.time()
            await asyncio.to_thread(flush)


def _status(config: Config, replicated: JetStreamLog | None, store: SegmentStore) -> Any:
    """What ``IngestClient.status`` returns: the node's place in its log."""
    if replicated is None:
        return {"replicated": False, "ready": True, "applied": store.applied_sequence()}
    status = replicated.status
    return {
        "replicated": True,
        "ready": status.ready(config.replication.max_lag),
        **dataclasses.asdict(status),
    }


def _remove_if_orphaned(socket_path: str, parent: int) -> None:
    """Remove the socket and its directory when ``serve`` was killed (else it does that)."""
    if os.getppid() != parent:
        with contextlib.suppress(OSError):
            Path(socket_path).unlink()
            Path(socket_path).parent.rmdir()


def _flush(follower: StoreFollower, swap: threading.Lock) -> None:
    """``durability = "os"``: put the commits of the last second on disk."""
    with swap:
        follower.store.flush()


def run(config_json: bytes, socket_path: str, parent: int, ready: Event) -> None:
    """Entry point of the ingestion process (``multiprocessing``, spawn)."""
    config = config_module.from_json(config_json)
    setup_logging(config.server.log_level)
    if config.dmp.writer_idle:
        # Any runnable worker preempts a SCHED_IDLE task at once (nice only lowers weight).
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:
        os.nice(config.dmp.writer_nice)
    try:
        uvloop.run(_serve(config, socket_path, parent, ready))
    except StoreError as exc:
        log.error("ingestion process cannot start", extra={"error": str(exc)})
        sys.exit(1)


class Supervisor:
    """``serve``'s side: starts the ingestion process, restarts it if it dies, stops it.

    ``start`` returns once the process serves its socket (or raises ``StoreError`` when it
    cannot start at all); a process that dies later is restarted after ``RESTART_SECONDS``,
    and meanwhile DMP writes answer 503.
    """

    def __init__(self, config: Config, socket_path: str) -> None:
        self._config_json = config_module.to_json(config)
        self.socket_path = socket_path
        self._context = multiprocessing.get_context("spawn")
        self._stopping = threading.Event()
        self._process: multiprocessing.process.BaseProcess | None = None
        self._watcher = threading.Thread(target=self._watch, name="ingest-supervisor", daemon=True)

    def start(self) -> None:
        """Start the process and wait until it is ready."""
        self._spawn()
        self._watcher.start()

    def _spawn(self) -> None:
        Path(self.socket_path).unlink(missing_ok=True)
        ready = self._context.Event()
        process = self._context.Process(
            target=run,
            args=(self._config_json, self.socket_path, os.getpid(), ready),
            name="enrich-ingest",
            daemon=True,
        )
        process.start()
        while not ready.wait(0.1):
            if not process.is_alive():
                raise StoreError("the ingestion process could not start (see its log line)")
        self._process = process

    def _watch(self) -> None:
        while not self._stopping.is_set():
            process = self._process
            if process is None:
                return
            process.join(0.5)
            if process.is_alive() or self._stopping.is_set():
                continue
            log.error(
                "ingestion process exited; restarting it",
                extra={"pid": process.pid, "exitcode": process.exitcode},
            )
            self._stopping.wait(RESTART_SECONDS)
            if self._stopping.is_set():
                return
            try:
                self._spawn()
            except StoreError as exc:
                log.error("ingestion process restart failed", extra={"error": str(exc)})

    def stop(self) -> None:
        """Stop the process (its queued writes commit first) and the watcher."""
        self._stopping.set()
        if self._process is not None:
            self._process.terminate()
            self._process.join(10)
        if self._watcher.is_alive():
            self._watcher.join(5)
