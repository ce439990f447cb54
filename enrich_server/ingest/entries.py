"""The entries of the write log: what a DMP call becomes once validated, and how one is
applied to a store.

Every DMP state change is one entry, whichever log carries it (the local ingestion process,
or a JetStream stream shared by several nodes, DESIGN §8). An entry carries everything its
application needs (the platform's TTL, the clock reading), so applying the same entries in
the same order gives the same store on every node: nothing is read from the configuration or
the clock at apply time. ``apply`` refuses an entry only with one of ``CLEAN_ERRORS``, raised
before it wrote anything, so a refused entry does not spoil the others of its transaction.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Sequence
from operator import itemgetter
from typing import Any, Final

import msgspec

from enrich_server.errors import SegmentConflictError
from enrich_server.ingest.batches import (
    Applied,
    BatchError,
    Mutation,
    Planned,
    applied,
    apply_batch,
    decode_batch,
    plan_batch,
    plan_in,
)
from enrich_server.store import SegmentStore, StoreWriter

#: How a replicated node runs a job on its one writer (in its thread), awaited.
Run = Callable[[Callable[[StoreWriter], Any]], Awaitable[Any]]


class Mutations(msgspec.Struct, tag="mutations", array_like=True, frozen=True):
    """Adds and removes of one platform (a micro-batch, or a single ``?id=&userid=``), as
    the API received them; the replicated log carries them as ``Changes``."""

    platform: int
    ttl: int  # the platform's default TTL when the entry was made
    now: int  # unix seconds the expiries count from
    items: list[Mutation | str]  # a string: why that item is malformed (refused on apply)


class Changes(msgspec.Struct, tag="mutations", array_like=True, frozen=True):
    """``Mutations`` validated before publishing (``checked``): the ``(key, segment, add,
    expires)`` they plan, in key order. Every node applies them as they are, so none
    repeats the items' validation; it checks again only that each segment is still the
    platform's (a delete may have come first)."""

    platform: int
    changes: Planned


class CreateSegment(msgspec.Struct, tag="create", array_like=True, frozen=True):
    """``POST /v1/segment?title=[&key=]``: idempotent per platform and title."""

    platform: int
    title: str
    key: str | None
    now: int


class DeleteSegment(msgspec.Struct, tag="delete", array_like=True, frozen=True):
    """``DELETE /v1/segment/{id}``: a platform's own segment, with its memberships."""

    platform: int
    segment: int


class SyncAlias(msgspec.Struct, tag="alias", array_like=True, frozen=True):
    """``/uid``: a platform's user id (``their``) is our user ``ours``."""

    their: bytes
    ours: bytes


class DropFile(msgspec.Struct, tag="dropfile", array_like=True, frozen=True):
    """A drop file validated on the node it was dropped on (``dropfiles``): applied whole
    and once, in one transaction that records its name, or refused having written nothing."""

    name: str
    sha256: str  # of the file: the same name with other content is refused
    segment: int
    lines: int
    at_ms: int  # the publishing node's clock (ms since epoch): the record's applied_at
    expires: int  # of every add (0 = never): resolved from the platform's ttl when made
    users: list[tuple[bytes, bool]]  # (key, add), in the order they are applied


class DropFileObject(msgspec.Struct, tag="dropobject", array_like=True, frozen=True):
    """A drop file too large for one entry (``dropobjects``): its ``DropFile`` but for the
    users, which every node reads from the file itself, object ``object`` of ``[replication]
    bucket`` (``size`` bytes, SHA-256 ``sha256``)."""

    name: str
    sha256: str
    segment: int
    lines: int
    at_ms: int
    expires: int
    object: str
    size: int

    def with_users(self, users: list[tuple[bytes, bool]]) -> DropFile:
        """The entry applied, once the file's users were read."""
        return DropFile(
            self.name, self.sha256, self.segment, self.lines, self.at_ms, self.expires, users
        )


class Compact(msgspec.Struct, tag="compact", array_like=True, frozen=True):
    """``compact`` on a replicated node, one slice of the keys at a time: the memberships
    expired at ``at_ms`` go from the keys ``start`` up to ``end`` (excluded; ``None``: to the
    last), on every node alike whenever it applies the entry."""

    at_ms: int  # the publishing node's clock (ms since epoch)
    start: bytes
    end: bytes | None


class Snapshot(msgspec.Struct, tag="snapshot", array_like=True, frozen=True):
    """``load --replace`` on a replicated node: a built store in the object store, which
    every node downloads, checks, carries its DMP state into and swaps in (``jetstream``)."""

    object: str  # its name in ``[replication] bucket``
    size: int
    digest: str  # the object store's SHA-256 of it


#: The DMP entries, which ``apply`` applies inside a write transaction.
Entry = Mutations | Changes | CreateSegment | DeleteSegment | SyncAlias | DropFile | Compact
#: Everything a replicated log carries (micro-batches as ``Changes``), and the entries whose
#: content is an object of the bucket.
LogEntry = (
    Changes | CreateSegment | DeleteSegment | SyncAlias | DropFile | Compact | Snapshot
    | DropFileObject
)  # fmt: skip
#: What ``apply`` may refuse an entry with, having written nothing of it.
CLEAN_ERRORS: Final = (BatchError, SegmentConflictError)
#: One outcome per entry: its result, or the clean error that refused it.
Outcome = tuple[Any, BatchError | SegmentConflictError | None]

_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final = msgspec.msgpack.Decoder(LogEntry)
_RECORD: Final = msgspec.json.Encoder()
_RECORD_DECODER: Final = msgspec.json.Decoder(dict[str, object])


def kind(entry: Entry | LogEntry) -> str:
    """The entry's kind, as its encoding tags it (``mutations``, ``create``, ...)."""
    tag: str = entry.__struct_config__.tag  # type: ignore[assignment]
    return tag


def encode(entry: LogEntry) -> bytes:
    """The entry as the log carries it (msgpack)."""
    return _ENCODER.encode(entry)


def decode(data: bytes) -> LogEntry:
    """Inverse of ``encode``; raises ``msgspec.DecodeError`` for anything else."""
    return _DECODER.decode(data)


def mutations(platform: int, ttl: int, body: bytes, max_items: int, now: int) -> Mutations:
    """A micro-batch body as an entry; raises ``BatchError`` when the body itself is wrong
    (its items are checked by ``check`` or on apply)."""
    return Mutations(platform, ttl, now, decode_batch(body, max_items))


def file_record(raw: bytes) -> dict[str, object]:
    """A drop file's record in ``applied_files`` (``applied_at``, ``sha256``, ``lines``)."""
    return _RECORD_DECODER.decode(raw)


def file_conflict(name: str, record: dict[str, object]) -> str:
    """Why a drop file named like one applied earlier, with other content, is refused."""
    return (
        f"a different file named {name} was applied at {record.get('applied_at')}: "
        "a correction needs a new name (the next minute's)"
    )


def checked(view: SegmentStore, entry: Entry) -> LogEntry:
    """The entry as the replicated log carries it, once refused (``BatchError``) if the
    store as ``view`` sees it would refuse it: a bad batch gets its 400 and never reaches the
    log. Applying re-checks the segments inside the write transaction, since the view may be
    a moment old."""
    if not isinstance(entry, Mutations):
        return entry

    def owner_of(sid: int) -> int | None:
        segment = view.dmp_segment(sid)
        return None if segment is None else segment.platform

    return changes_of(owner_of, entry)


def changes_of(owner_of: Callable[[int], int | None], entry: Mutations) -> Changes:
    """``entry`` validated into its ``Changes`` (``plan_batch``; ``owner_of(segment)`` is the
    platform owning a segment); raises ``BatchError`` listing every bad item."""
    planned = plan_batch(owner_of, entry.platform, entry.ttl, entry.items, entry.now)
    return Changes(entry.platform, planned)


def apply(writer: StoreWriter, entry: Entry) -> Any:
    """Apply one entry in ``writer``'s transaction; returns what its caller is answered
    (msgpack-able), or raises one of ``CLEAN_ERRORS`` having written nothing."""
    if isinstance(entry, Mutations):
        return _answer(apply_batch(writer, entry.platform, entry.ttl, entry.items, entry.now))
    if isinstance(entry, Changes):
        planned = _still_owned(writer, entry, {})
        writer.apply_changes(planned)
        return _answer(applied(planned))
    if isinstance(entry, CreateSegment):
        return list(writer.create_dmp_segment(entry.platform, entry.title, entry.key, entry.now))
    if isinstance(entry, DeleteSegment):
        # Ownership checked again inside the transaction: the caller checked it on a view.
        owner = writer.dmp_segment(entry.segment)
        if owner is None or owner[0] != entry.platform:
            return 0
        return writer.delete_dmp_segment(entry.segment)
    if isinstance(entry, DropFile):
        return _apply_drop_file(writer, entry)
    if isinstance(entry, Compact):
        return list(writer.drop_expired(entry.at_ms // 1000, entry.start, entry.end))
    writer.map_alias(entry.their, entry.ours)
    return None


def applied_before(writer: StoreWriter, name: str, sha256: str) -> bool:
    """Whether drop file ``name`` with this content is recorded as applied; ``BatchError``
    when a file of that name with other content is."""
    earlier = writer.applied_file(name)
    if earlier is None:
        return False
    record = file_record(earlier)
    if record.get("sha256") == sha256:
        return True
    raise BatchError([file_conflict(name, record)])


def _apply_drop_file(writer: StoreWriter, entry: DropFile) -> list[int] | None:
    """``[added, removed]``, or ``None`` when this file was applied before (by its name and
    content, however many times it was published). Checked again inside the transaction,
    since the node that made the entry saw the store a moment earlier."""
    if applied_before(writer, entry.name, entry.sha256):
        return None
    if writer.dmp_segment(entry.segment) is None:
        raise BatchError([f"segment {entry.segment} was deleted before {entry.name} was applied"])
    added = removed = 0
    for key, add in entry.users:
        if add:
            writer.add_one(key, entry.segment, entry.expires)
            added += 1
        else:
            removed += writer.remove(key, (entry.segment,))
    record = {"applied_at": entry.at_ms // 1000, "sha256": entry.sha256, "lines": entry.lines}
    writer.record_applied_file(entry.name, _RECORD.encode(record))
    return [added, removed]


def apply_all(writer: StoreWriter, entries: Sequence[Entry]) -> list[Outcome]:
    """Apply ``entries`` in order in one transaction; a refused one is skipped, not fatal.

    Consecutive micro-batches are validated one by one, then written together, merged in key
    order (stable: a user's mutations keep the order of their entries), so that a user pushed
    by several of them is read and written once. Their validation reads only the segments,
    which no micro-batch changes (``owners`` remembers them meanwhile); any other entry is
    applied after the micro-batches before it were written."""
    outcomes: list[Outcome] = []
    run: list[Planned] = []
    owners: dict[int, int | None] = {}
    for entry in entries:
        if isinstance(entry, Mutations | Changes):
            try:
                if isinstance(entry, Changes):
                    planned = _still_owned(writer, entry, owners)
                else:
                    planned = plan_in(writer, entry.platform, entry.ttl, entry.items, entry.now)
            except BatchError as refused:
                outcomes.append((None, refused))
                continue
            run.append(planned)
            outcomes.append((_answer(applied(planned)), None))
            continue
        _write(writer, run)
        owners.clear()
        try:
            outcomes.append((apply(writer, entry), None))
        except CLEAN_ERRORS as refused:
            outcomes.append((None, refused))
    _write(writer, run)
    return outcomes


def _still_owned(writer: StoreWriter, entry: Changes, owners: dict[int, int | None]) -> Planned:
    """``entry``'s changes, if each segment is still the platform's; else ``BatchError``."""
    for sid in {sid for _, sid, _, _ in entry.changes}:
        if sid not in owners:
            owner = writer.dmp_segment(sid)
            owners[sid] = None if owner is None else owner[0]
        if owners[sid] != entry.platform:
            raise BatchError([f"segment {sid} is not a segment of this platform"])
    return entry.changes


def _answer(done: Applied) -> list[Any]:
    return [done.count, dict(done.ops)]


def _write(writer: StoreWriter, run: list[Planned]) -> None:
    """Write the planned micro-batches of ``run`` (each in key order already), and empty it."""
    if len(run) == 1:
        writer.apply_changes(run[0])
    elif run:
        writer.apply_changes(sorted(itertools.chain.from_iterable(run), key=itemgetter(0)))
    run.clear()
