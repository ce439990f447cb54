"""The replicated log: DMP entries on a NATS JetStream stream, and this node's applier.

Runs in the ingestion process of a node with ``[replication] nats`` (DESIGN §8). A write is
published with a ``Nats-Msg-Id`` (JetStream drops a second copy within its duplicate window)
and answered once JetStream acknowledged it and this node's applier applied it. The applier
consumes the stream in order from the store's own ``applied_sequence`` + 1 (an ordered
consumer: ephemeral, flow-controlled, nothing to clean up on the server), applies what has
arrived in one write transaction and records the last sequence in that same transaction: an
entry is applied exactly once whatever crashes, and after one the node resumes where its
store says. Commits are not fsynced: the stream is the durable record.

Before it subscribes, the applier restores the latest checkpoint (``checkpoints``) when its
store is empty, or when the stream no longer holds the entries after the store's sequence (they
expired, or were purged). A gap no checkpoint covers, a sequence that does not follow the last
applied one, or a store ahead of the stream's end (the stream was recreated) stops the applier
rather than skip or mix entries: the node then reports itself not ready. It also starts a
checkpoint every ``checkpoint_every`` seconds. NATS unreachable: writes answer 503 at once; the
connection retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from enrich_server import config as config_module
from enrich_server.config import Config, ReplicationConfig
from enrich_server.errors import StoreError, UnconfirmedWriteError
from enrich_server.ingest import (
    checkpoints,
    dropobjects,
    entries,
    objectstore,
    publisher,
    replicated_snapshots,
)
from enrich_server.ingest.batches import BatchError
from enrich_server.ingest.entries import DropFileObject, Entry, LogEntry, Outcome, Snapshot
from enrich_server.store import SegmentStore, StoreWriter

log = logging.getLogger(__name__)

#: JetStream's deduplication window: a publish retried within it is stored once.
DUPLICATE_WINDOW_SECONDS: Final = 120.0
#: The stream's largest message: nats-server's default ``max_payload`` (1 MiB), which also
#: bounds every publish (headers included) unless the servers are configured higher.
MAX_MESSAGE_BYTES: Final = 1 << 20
#: The largest entry published: the message less room for its headers (``Nats-Msg-Id``).
MAX_ENTRY_BYTES: Final = MAX_MESSAGE_BYTES - 1024
#: Most entries applied in one transaction: bounds how long one commit holds the write lock.
MAX_GROUP: Final = 512
#: Received entries held before the subscription stops taking more (flow control then
#: holds the rest on the server).
MAX_BUFFERED: Final = 4 * MAX_GROUP
#: How long a write waits for this node's applier after JetStream's acknowledgement.
APPLY_WAIT_SECONDS: Final = 10.0
#: Between two looks at the stream's last sequence (the lag).
STATUS_SECONDS: Final = 1.0
#: Between two attempts of a halted applier (a checkpoint may have been uploaded).
HALTED_RETRY_SECONDS: Final = 5.0
_BACKOFF_SECONDS: Final = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0)
_MSG_ID: Final = api.Header.MSG_ID.value


@dataclass(slots=True)
class Status:
    """Where this node stands against the stream (``ingestd``'s ``status`` op)."""

    connected: bool = False
    applied: int = 0  # last stream sequence applied to the store
    last: int = 0  # the stream's last sequence, as last seen
    lag_seconds: float = 0.0
    caught_up: bool = False  # reached the stream's end once since it started
    halted: str = ""  # why the applier stopped (a gap): cleared once it can go on
    applied_by_kind: dict[str, int] | None = None
    publish_failures: int = 0

    def ready(self, max_lag: float) -> bool:
        """Whether the node may take traffic: caught up once, within ``max_lag`` while
        connected. A NATS outage leaves it ready: the store still serves, and no node can
        write meanwhile."""
        if self.halted or not self.caught_up:
            return False
        return not self.connected or self.lag_seconds <= max_lag


def stream_config(config: ReplicationConfig) -> api.StreamConfig:
    """The stream as a node creates it when missing (README, "Running several replicas").

    Limits retention with no limit: no age, count or size drops an entry, since a node
    whose next entry is gone can only restore a checkpoint, and halts if none covers it.
    Bounding the stream is the operator's act (a purge up to a checkpoint's sequence).
    """
    return api.StreamConfig(
        name=config.stream,
        subjects=[config.subject],
        retention=api.RetentionPolicy.LIMITS,
        max_age=0,  # seconds; 0 = entries never expire
        max_msgs=-1,
        max_bytes=-1,
        max_msg_size=MAX_MESSAGE_BYTES,
        storage=api.StorageType.FILE,
        num_replicas=config.replicas,
        duplicate_window=DUPLICATE_WINDOW_SECONDS,
    )


def too_large(entry: LogEntry, size: int) -> str:
    """Why an entry of ``size`` bytes is not published."""
    return (
        f"as a replication log entry it takes {size:,} bytes, over the {MAX_ENTRY_BYTES:,}"
        f" bytes one {entries.kind(entry)} entry may take: split it"
    )


class JetStreamLog:
    """Publishes entries and applies the stream to the store (``start``, then ``submit``)."""

    def __init__(self, config: Config, view: Callable[[], SegmentStore], run: entries.Run) -> None:
        """``view``: the store as it is now (following ``current`` across a restore);
        ``run``: runs a write job on the store's writer thread (``WriteQueue.run``),
        returning its result once committed."""
        self._config = config.replication
        self._root = Path(config.server.store)
        self._config_json = config_module.to_json(config)
        self._subject = self._config.subject
        self._view = view
        self._run = run
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._waiters: dict[str, asyncio.Future[Outcome]] = {}
        self._received: list[Msg] = []
        self._arrived = asyncio.Event()
        self._drained = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._behind_since = 0.0
        self._halted_on = 0  # the entry the applier halted on (``_HaltedError.sequence``)
        self._resubscribe = False
        self.status = Status(applied_by_kind={})

    async def start(self) -> None:
        """Connect (retrying in the background until NATS answers) and start applying."""
        self.status.applied = self._view().applied_sequence()
        self._tasks.append(asyncio.create_task(self._connect_and_apply()))
        if self._config.checkpoint_every:
            self._tasks.append(asyncio.create_task(self._checkpoint_forever()))

    async def close(self) -> None:
        """Stop applying and close the connection; waiting writes get a ``StoreError``."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for future in self._waiters.values():
            if not future.done():
                future.set_exception(StoreError("the node is shutting down"))
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def submit(self, entry: Entry) -> Any:
        """Validate, publish and wait until applied here; returns the entry's result or
        raises its clean error. ``StoreError`` when NATS did not acknowledge it."""
        if self.status.halted:  # it could not apply the write, nor validate it on fresh data
            raise StoreError(f"this node cannot apply writes: {self.status.halted}")
        published = entries.checked(self._view(), entry)
        payload = entries.encode(published)
        if len(payload) > MAX_ENTRY_BYTES:  # NATS would refuse it: a 400, not a 503
            raise BatchError([too_large(published, len(payload))])
        js = self._js
        if js is None or self._nc is None or not self._nc.is_connected:
            self.status.publish_failures += 1
            raise StoreError("the replication log (NATS) is not reachable: nothing acknowledged")
        msg_id = uuid.uuid4().hex
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiters[msg_id] = future
        try:
            await self._publish(js, payload, msg_id)
            try:
                result, refused = await asyncio.wait_for(future, APPLY_WAIT_SECONDS)
            except TimeoutError:
                raise UnconfirmedWriteError(
                    "it is in the replication log but this node has not applied it within"
                    f" {APPLY_WAIT_SECONDS:g} s; it will be, and repeating it is safe"
                ) from None
        finally:
            self._waiters.pop(msg_id, None)
        if refused is not None:
            raise refused
        return result

    async def _publish(self, js: JetStreamContext, payload: bytes, msg_id: str) -> None:
        """``publisher.publish``, counting the writes it gives up on (each answered 503)."""
        try:
            await publisher.publish(js, self._config, payload, msg_id)
        except StoreError:
            self.status.publish_failures += 1
            raise

    async def _connect_and_apply(self) -> None:
        attempt = 0
        while True:
            try:
                await self._connect()
                attempt = 0
                await self._apply_forever()
                continue  # reconnected: subscribe again from the store's sequence
            except asyncio.CancelledError:
                raise
            except _HaltedError as exc:
                if self.status.halted != str(exc):
                    log.error("replication applier halted", extra={"error": str(exc)})
                self.status.halted = str(exc)
                self._halted_on = exc.sequence
                # Looked at again now and then: a checkpoint uploaded meanwhile may cover it.
                await asyncio.sleep(HALTED_RETRY_SECONDS)
                continue
            except Exception as exc:  # NATS or the store: retried with backoff
                log.warning(
                    "replication log unavailable; retrying",
                    extra={"error": repr(exc), "attempt": attempt},
                )
            await asyncio.sleep(_BACKOFF_SECONDS[min(attempt, len(_BACKOFF_SECONDS) - 1)])
            attempt += 1

    async def _connect(self) -> None:
        if self._nc is None or self._nc.is_closed:
            self._nc = await nats.connect(
                servers=list(self._config.nats),
                name="enrich-server",
                connect_timeout=2,
                reconnect_time_wait=0.5,
                max_reconnect_attempts=-1,
                disconnected_cb=self._disconnected,
                reconnected_cb=self._reconnected,
                error_cb=self._error,
            )
            self._js = self._nc.jetstream()
        self.status.connected = self._nc.is_connected
        assert self._js is not None
        try:
            await self._js.stream_info(self._config.stream)
        except nats.js.errors.NotFoundError:
            await self._js.add_stream(stream_config(self._config))
            log.info("replication stream created", extra={"stream": self._config.stream})

    async def _disconnected(self) -> None:
        self.status.connected = False
        log.warning("replication log disconnected")

    async def _reconnected(self) -> None:
        # The server may have restarted and lost the ephemeral consumer: start afresh.
        self.status.connected = True
        self._resubscribe = True
        self._arrived.set()
        log.info("replication log reconnected")

    async def _error(self, exc: Exception) -> None:
        log.warning("replication log error", extra={"error": repr(exc)})

    async def _apply_forever(self) -> None:
        assert self._js is not None
        info = await self._js.stream_info(self._config.stream)
        first, last = info.state.first_seq, info.state.last_seq
        await self._restore_if_needed(first, last)
        start = self._view().applied_sequence() + 1
        self.status.applied = start - 1
        if first > start:  # after a purge of everything, first is last + 1
            raise _HaltedError(
                f"the stream's first entry is {first} but the store applied only up to"
                f" {start - 1}, and no checkpoint covers the entries in between: restore"
                " a checkpoint taken before they expired, or reload every node"
            )
        if start - 1 > last:
            raise _HaltedError(
                f"the store applied up to {start - 1} but the stream ends at {last}: the"
                " stream was recreated or lost entries; this store cannot follow it"
            )
        self._resolve_halt()  # a gap that stopped an earlier attempt is closed
        self._note_last(last)
        self._received.clear()
        self._resubscribe = False
        sub = await self._js.subscribe(
            self._subject,
            stream=self._config.stream,
            ordered_consumer=True,
            cb=self._take,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            config=api.ConsumerConfig(opt_start_seq=start),
        )
        status_task = asyncio.create_task(self._watch_stream())
        try:
            while not self._resubscribe:
                if not self._received:
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                group, self._received = (
                    self._received[:MAX_GROUP],
                    self._received[MAX_GROUP:],
                )
                self._drained.set()
                await self._apply_group(group)
        finally:
            status_task.cancel()
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _restore_if_needed(self, first: int, last: int) -> None:
        """Restore the latest checkpoint when the store is empty (faster than replaying, and
        the only way once early entries expired) or behind the stream's first entry, if the
        checkpoint can be followed by the stream (``first - 1 <= its sequence <= last``)."""
        assert self._js is not None
        store = self._view()
        applied = store.applied_sequence()
        empty = applied == 0 and store.identity_count() == 0
        if not empty and first <= applied + 1 and not self.status.halted:
            return
        bucket = await objectstore.bucket(self._js, self._config)
        newest = await checkpoints.latest(bucket)
        if newest is None or not applied < newest.sequence <= last or newest.sequence < first - 1:
            return  # nothing better to start from: replay, or halt on the gap
        log.info(
            "restoring a checkpoint",
            extra={"checkpoint": newest.name, "applied": applied, "stream_first": first},
        )
        await checkpoints.restore(bucket, newest, self._root)
        if self._view().applied_sequence() != newest.sequence:
            raise StoreError("the restored checkpoint is not the store being served yet")

    async def _checkpoint_forever(self) -> None:
        """Every ``checkpoint_every`` seconds (spread, so that nodes rarely coincide) while
        caught up: upload a checkpoint if the bucket has none as recent."""
        while True:
            await asyncio.sleep(self._config.checkpoint_every * random.uniform(0.9, 1.1))
            if self.status.caught_up and self.status.connected and not self.status.halted:
                code = await checkpoints.take_in_process(self._config_json)
                if code:
                    log.warning("periodic checkpoint failed", extra={"exitcode": code})

    async def _take(self, msg: Msg) -> None:
        """The subscription's callback: buffer, and hold it back when the applier lags."""
        while len(self._received) >= MAX_BUFFERED:
            self._drained.clear()
            await self._drained.wait()
        self._received.append(msg)
        self._arrived.set()

    async def _apply_group(self, group: list[Msg]) -> None:
        batch: list[tuple[int, str | None, Entry]] = []
        expected = self.status.applied + 1
        for msg in group:
            sequence = msg.metadata.sequence.stream
            if sequence < expected:  # a redelivery after a consumer reset: already applied
                continue
            if sequence != expected:
                raise _HaltedError(
                    f"entry {sequence} arrived after {expected - 1}: entries in between are"
                    " missing from the stream; restore a checkpoint",
                    expected,
                )
            try:
                entry = entries.decode(msg.data)
            except msgspec.DecodeError as exc:
                raise _HaltedError(
                    f"entry {sequence} is not an entry this version reads: {exc}", sequence
                ) from None
            expected += 1
            if isinstance(entry, Snapshot | DropFileObject):  # alone, after what came before
                await self._apply_entries(batch)
                batch = []
                await self._apply_object(sequence, entry)
                continue
            batch.append((sequence, (msg.headers or {}).get(_MSG_ID), entry))
        await self._apply_entries(batch)

    async def _apply_object(self, sequence: int, entry: Snapshot | DropFileObject) -> None:
        """Apply an entry whose content is an object of the bucket; halt, never skip it,
        when the bucket cannot give that object."""
        assert self._js is not None
        bucket = await objectstore.bucket(self._js, self._config)
        try:
            if isinstance(entry, Snapshot):
                await replicated_snapshots.swap_in(bucket, entry, sequence, self._root, self._run)
            else:
                await dropobjects.apply(bucket, entry, sequence, self._root, self._run)
        except (FileNotFoundError, objectstore.CorruptObjectError) as exc:
            raise _HaltedError(
                f"entry {sequence} ({entries.kind(entry)}) cannot be applied: {exc}; put the"
                " object back, or restore a checkpoint taken after it",
                sequence,
            ) from None
        self.status.applied = sequence
        self._resolve_halt()
        self._count(entries.kind(entry))
        self._update_lag()

    def _count(self, kind: str) -> None:
        kinds = self.status.applied_by_kind
        assert kinds is not None
        kinds[kind] = kinds.get(kind, 0) + 1

    async def _apply_entries(self, batch: list[tuple[int, str | None, Entry]]) -> None:
        """Apply consecutive DMP entries in one transaction, then answer their writers."""
        if not batch:
            return
        last = batch[-1][0]

        def job(writer: StoreWriter) -> list[Outcome] | None:
            if writer.applied_sequence() >= last:  # applied by an earlier run of this node
                return None
            done = writer.applied_sequence()
            outcomes = entries.apply_all(writer, [e for s, _, e in batch if s > done])
            writer.set_applied_sequence(last)
            return outcomes

        outcomes = await self._run(job)
        self.status.applied = last
        if outcomes is None:
            return
        applied = batch[len(batch) - len(outcomes) :]  # without what an earlier run applied
        for _, _, entry in applied:
            self._count(entries.kind(entry))
        for (sequence, msg_id, entry), outcome in zip(applied, outcomes, strict=True):
            if outcome[1] is not None:  # refused alike on every node: said once on each
                log.warning(
                    "replication entry refused",
                    extra={"sequence": sequence, "kind": entries.kind(entry),
                           "error": str(outcome[1])},
                )  # fmt: skip
            future = self._waiters.get(msg_id or "")
            if future is not None and not future.done():
                future.set_result(outcome)
        self._update_lag()

    async def _watch_stream(self) -> None:
        assert self._js is not None
        while True:
            await asyncio.sleep(STATUS_SECONDS)
            try:
                info = await self._js.stream_info(self._config.stream)
            except (TimeoutError, nats.errors.Error):
                continue
            self._note_last(info.state.last_seq)

    def _note_last(self, last: int) -> None:
        self.status.last = max(self.status.last, last)
        self._update_lag()

    def _resolve_halt(self) -> None:
        """Clear the halt once what caused it is behind the store: right away for a gap
        (checked before subscribing), once applied past it for an entry that could not be
        applied (so ``/readyz`` and writes stay refused while each retry tries it again)."""
        if self.status.halted and self.status.applied >= self._halted_on:
            self.status.halted = ""
            self._halted_on = 0

    def _update_lag(self) -> None:
        now = time.monotonic()
        # What this node applied is in the stream: the last look may be older than that.
        self.status.last = max(self.status.last, self.status.applied)
        if self.status.applied >= self.status.last:
            self._behind_since = 0.0
            self.status.lag_seconds = 0.0
            self.status.caught_up = True
            return
        if not self._behind_since:
            self._behind_since = now
        self.status.lag_seconds = now - self._behind_since


class _HaltedError(Exception):
    """The stream cannot be applied from here on without skipping entries; ``sequence``:
    the entry that could not be applied (0: the store and the stream do not join up)."""

    def __init__(self, message: str, sequence: int = 0) -> None:
        super().__init__(message)
        self.sequence = sequence
