"""Writing a segment store (the layout is ``layout``'s): one LMDB write transaction a session.

Writers (``StoreWriter``) are the CLI and the ingestion paths; LMDB serialises them across
processes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import lmdb

from enrich_server.errors import SegmentConflictError, StoreError
from enrich_server.store.layout import (
    DATA_FILE,
    DEFAULT_MAP_SIZE,
    FORMAT,
    MAX_SEGMENT_ID,
    Meta,
    Tables,
    add_to_value,
    decode_dmp_segment,
    decode_memberships,
    decode_value,
    encode_memberships,
    encode_value,
    map_size_for,
    open_environment,
    pack_segment_id,
    remove_from_value,
    store_dir,
    unpack_segment_id,
)


class StoreWriter:
    """A write session on a store (created when missing): one LMDB write transaction.

    Use as a context manager: leaving the block normally commits, an exception aborts, so a
    writer either applies everything or nothing. LMDB serialises writers across processes.
    With ``env`` (a serving process's own environment) the session borrows it instead of
    opening the store.
    """

    def __init__(
        self, path: Path, map_size: int = DEFAULT_MAP_SIZE, env: lmdb.Environment | None = None
    ) -> None:
        self.path = path
        self._owns_env = env is None
        try:
            if env is None:
                directory = store_dir(path)
                directory.mkdir(parents=True, exist_ok=True)
                env = open_environment(directory, map_size=map_size_for(directory, map_size))
            self._env = env
            self._txn = self._env.begin(write=True)
            self._meta = self._env.open_db(Tables.META, txn=self._txn)
            self._ids = self._env.open_db(Tables.SEGMENT_IDS, txn=self._txn)
            self._names = self._env.open_db(Tables.SEGMENT_NAMES, txn=self._txn)
            self._members = self._env.open_db(Tables.MEMBERS, txn=self._txn)
            self._aliases = self._env.open_db(Tables.ALIASES, txn=self._txn)
            self._dmp_segments = self._env.open_db(Tables.DMP_SEGMENTS, txn=self._txn)
            self._dmp_titles = self._env.open_db(Tables.DMP_TITLES, txn=self._txn)
            self._applied_files = self._env.open_db(Tables.APPLIED_FILES, txn=self._txn)
            found = self._txn.get(Meta.FORMAT, db=self._meta)
            if found is None:
                self._txn.put(Meta.FORMAT, FORMAT, db=self._meta)
                self._txn.put(Meta.BUILT_AT, str(int(time.time())).encode(), db=self._meta)
            elif found != FORMAT:
                raise StoreError(
                    f"{path} is not an enrich-server store of format {FORMAT.decode()}"
                )
            self._next_id = self._txn.stat(self._names)["entries"] + 1
        except lmdb.Error as exc:
            raise StoreError(f"cannot open segment store {path} for writing: {exc}") from exc
        self._interned: dict[str, int] = {}

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc_type is None:
                self._txn.put(Meta.UPDATED_AT, str(int(time.time())).encode(), db=self._meta)
                generation = int(self._txn.get(Meta.GENERATION, b"0", db=self._meta)) + 1
                self._txn.put(Meta.GENERATION, str(generation).encode(), db=self._meta)
                self._txn.commit()
            else:
                self._txn.abort()
        except lmdb.Error as err:
            self._txn.abort()
            raise StoreError(f"cannot commit to segment store {self.path}: {err}") from err
        finally:
            if self._owns_env:
                self._env.close()

    def segment_id(self, name: str) -> int | None:
        """Return the id of segment ``name``, or ``None`` when there is no such segment."""
        sid = self._interned.get(name)
        if sid is None:
            raw = self._txn.get(name.encode(), db=self._ids)
            if raw is None:
                return None
            sid = self._interned[name] = unpack_segment_id(raw)
        return sid

    def intern(self, name: str) -> int:
        """Return the id of segment ``name``, creating it when new."""
        sid = self.segment_id(name)
        if sid is None:
            sid = self._next_id
            self._next_id += 1
            packed = pack_segment_id(sid)
            self._txn.put(name.encode(), packed, db=self._ids)
            self._txn.put(packed, name.encode(), db=self._names)
            self._interned[name] = sid
        return sid

    def add(self, key: bytes, segment_ids: Iterable[int], expires: int) -> None:
        """Make ``key`` a member of each segment, with ``expires`` (0 = never) replacing any
        earlier expiry of the same membership."""
        raw = self._txn.get(key, db=self._members)
        memberships = decode_memberships(raw) if raw is not None else {}
        for sid in segment_ids:
            memberships[sid] = expires
        self._put(key, memberships)

    def abort(self) -> None:
        """Give the session up without writing (instead of leaving the ``with`` block)."""
        self._txn.abort()
        if self._owns_env:
            self._env.close()

    def add_one(self, key: bytes, sid: int, expires: int) -> None:
        """``add(key, (sid,), expires)`` without the dict round trip: the DMP path, one
        membership per mutation. A membership already there with the same expiry is left
        alone, so a repeated push dirties no page."""
        raw = self._txn.get(key, db=self._members)
        flat = [] if raw is None else decode_value(raw)
        if add_to_value(flat, sid, expires):
            self._put_flat(key, flat)

    def apply_changes(self, changes: Iterable[tuple[bytes, int, bool, int]]) -> None:
        """Apply membership changes ``(key, segment, add, expires)`` given in key order (a
        key's own changes in the order they were made: a stable sort keeps it), to the same
        effect as ``add_one`` or ``remove`` for each in turn. Each key is read and written
        once, through one cursor: LMDB looks for the next key on the page the cursor is on
        before it descends from the root, so sorted keys mostly skip the descent."""
        cursor = self._txn.cursor(db=self._members)
        key = b""
        flat: list[int] | None = None
        found = changed = False
        for next_key, sid, add, expires in changes:
            if next_key != key:
                if changed or (found and not flat):
                    self._store_value(cursor, key, flat, found)
                key = next_key
                found = cursor.set_key(key)
                flat = decode_value(cursor.value()) if found else None
                changed = False
            if add:
                if flat is None:
                    flat = [expires, 1, sid]
                    changed = True
                elif add_to_value(flat, sid, expires):
                    changed = True
            elif flat is not None and remove_from_value(flat, sid):
                changed = True
        if changed or (found and not flat):
            self._store_value(cursor, key, flat, found)

    def _store_value(
        self, cursor: lmdb.Cursor[bytes], key: bytes, flat: list[int] | None, found: bool
    ) -> None:
        """Write ``key``'s value, ``cursor`` still on it when ``found``; an empty one deletes
        the key."""
        try:
            if flat:
                cursor.put(key, encode_value(flat))
            elif found:
                cursor.delete()
        except lmdb.MapFullError as exc:
            raise self._full() from exc

    def _put_flat(self, key: bytes, flat: list[int]) -> None:
        self._put_value(key, encode_value(flat))

    def _put_value(self, key: bytes, value: bytes) -> None:
        try:
            self._txn.put(key, value, db=self._members)
        except lmdb.MapFullError as exc:
            raise self._full() from exc

    def remove(self, key: bytes, segment_ids: Iterable[int]) -> int:
        """Remove ``key`` from each segment; returns how many memberships were removed."""
        raw = self._txn.get(key, db=self._members)
        if raw is None:
            return 0
        memberships = decode_memberships(raw)
        removed = sum(memberships.pop(sid, None) is not None for sid in segment_ids)
        if not memberships:
            self._txn.delete(key, db=self._members)
        elif removed:
            self._put(key, memberships)
        return removed

    def _put(self, key: bytes, memberships: dict[int, int]) -> None:
        self._put_value(key, encode_memberships(memberships))

    def _full(self) -> StoreError:
        """The error of a write that found LMDB's map full."""
        return StoreError(
            f"segment store {self.path} is full (map size {self._env.info()['map_size']} bytes)"
        )

    def drop_expired(
        self, now: int, start: bytes = b"", end: bytes | None = None
    ) -> tuple[int, int]:
        """Remove memberships that expired at or before ``now``, and keys left empty, among
        the keys from ``start`` up to ``end`` (excluded; ``None``: to the last).

        Returns (memberships removed, keys deleted). Readers are not blocked: they keep their
        snapshot until this transaction commits.
        """
        changes: list[tuple[bytes, dict[int, int]]] = []
        removed = 0
        cursor = self._txn.cursor(db=self._members)
        if not cursor.set_range(start):
            return 0, 0
        for key, raw in cursor:
            if end is not None and bytes(key) >= end:
                break
            memberships = decode_memberships(raw)
            live = {sid: exp for sid, exp in memberships.items() if not exp or exp > now}
            if len(live) != len(memberships):
                removed += len(memberships) - len(live)
                changes.append((bytes(key), live))
        deleted = 0
        for key, live in changes:  # applied after the scan: the cursor stays valid
            if live:
                self._put(key, live)
            else:
                self._txn.delete(key, db=self._members)
                deleted += 1
        return removed, deleted

    def applied_sequence(self) -> int:
        """The last replication log entry applied (0: none), as this transaction sees it."""
        return int(self._txn.get(Meta.APPLIED_SEQUENCE, b"0", db=self._meta))

    def set_applied_sequence(self, sequence: int) -> None:
        """Record, in this transaction, that log entries up to ``sequence`` are applied."""
        self._txn.put(Meta.APPLIED_SEQUENCE, str(sequence).encode(), db=self._meta)

    def replace_with(
        self, build: Path, sequence: int, snapshot: str, publish: Callable[[], object]
    ) -> None:
        """A replicated snapshot: carry this store's DMP state into ``build`` (as
        ``publish_with_dmp_state`` does, from this session, which holds the write lock), record
        ``sequence`` and ``snapshot`` in it, then ``publish`` it. The same entries in the
        same order give the same result on every node. Raises ``SegmentConflictError``
        having changed nothing served."""
        target = open_environment(build, map_size=map_size_for(build, DEFAULT_MAP_SIZE))
        try:
            with target.begin(write=True) as write:
                _carry_dmp_state(self._env, self._txn, target, write)
                meta = target.open_db(Tables.META, txn=write)
                write.put(Meta.APPLIED_SEQUENCE, str(sequence).encode(), db=meta)
                write.put(Meta.SNAPSHOT, snapshot.encode(), db=meta)
        finally:
            target.close()
        publish()
        self.set_applied_sequence(sequence)  # the superseded store, for whoever still reads it

    def segment_name(self, sid: int) -> str | None:
        """The name (served string) of segment ``sid``."""
        raw = self._txn.get(pack_segment_id(sid), db=self._names)
        return None if raw is None else raw.decode()

    def dmp_segment(self, sid: int) -> tuple[int, str] | None:
        """``(platform, title)`` of a DMP-created segment, or ``None``."""
        if not 0 < sid <= MAX_SEGMENT_ID:
            return None
        raw = self._txn.get(pack_segment_id(sid), db=self._dmp_segments)
        if raw is None:
            return None
        platform, title, _ = decode_dmp_segment(raw)
        return platform, title

    def create_dmp_segment(
        self, platform: int, title: str, key: str | None, now: int = 0
    ) -> tuple[int, bool]:
        """Create the segment ``title`` of ``platform`` (or find it): ``(segment id, created)``,
        recording ``now`` (default: the clock) as its creation time.

        Its served name is ``key``, by default the new id in decimal. Raises
        ``SegmentConflictError`` when that name is already a segment's (an operator's or
        another DMP's): a platform never takes over memberships it did not push.
        """
        title_key = pack_segment_id(platform) + title.encode()
        raw = self._txn.get(title_key, db=self._dmp_titles)
        if raw is not None:
            return unpack_segment_id(raw), False
        name = key if key is not None else str(self._next_id)
        taken = self.segment_id(name)
        if taken is not None:
            owner = self.dmp_segment(taken)
            whose = "an operator's segment" if owner is None else "another platform's segment"
            if owner is not None and owner[0] == platform:
                whose = f"this platform's segment {owner[1]!r}"
            hint = ": pass a key" if key is None else ""
            raise SegmentConflictError(f"segment name {name!r} is {whose} ({taken}){hint}")
        sid = self.intern(name)
        packed = pack_segment_id(sid)
        record = encode_value((platform, title, now or int(time.time())))
        self._txn.put(packed, record, db=self._dmp_segments)
        self._txn.put(title_key, packed, db=self._dmp_titles)
        return sid, True

    def delete_dmp_segment(self, sid: int) -> int:
        """Delete a DMP-created segment and every membership in it; returns how many
        memberships went. Its id is never reused; its name stays interned."""
        owner = self.dmp_segment(sid)
        if owner is None:
            return 0
        packed = pack_segment_id(sid)
        self._txn.delete(packed, db=self._dmp_segments)
        self._txn.delete(pack_segment_id(owner[0]) + owner[1].encode(), db=self._dmp_titles)
        holders = [
            bytes(key)
            for key, raw in self._txn.cursor(db=self._members)
            if sid in decode_value(raw)[2:]  # cheap pre-filter, confirmed below
        ]
        return sum(self.remove(key, (sid,)) for key in holders)

    def map_alias(self, their: bytes, ours: bytes) -> None:
        """Record that a platform's user id ``their`` is our user ``ours``."""
        self._txn.put(their, ours, db=self._aliases)

    def applied_file(self, name: str) -> bytes | None:
        """The record of a drop file already applied, or ``None``."""
        return self._txn.get(name.encode(), db=self._applied_files)

    def record_applied_file(self, name: str, record: bytes) -> None:
        """Remember that drop file ``name`` was applied (in the same transaction)."""
        self._txn.put(name.encode(), record, db=self._applied_files)


def publish_with_dmp_state(
    live: Path, build: Path, map_size: int, publish: Callable[[], object]
) -> None:
    """Carry into ``build`` what DMPs wrote to the ``live`` store while it was being built
    (synced ids, applied drop files, DMP segments created or deleted), then ``publish`` it,
    all under the live store's write lock: no DMP write lands between the copy and the swap
    (the ingestion process waits, then finds the new generation). Memberships are not
    carried: a replace replaces them. Raises ``SegmentConflictError`` when a segment id was
    given both to a new snapshot segment and, meanwhile, to a DMP segment.
    """
    size = os.path.getsize(live / DATA_FILE)
    source = open_environment(live, map_size=max(DEFAULT_MAP_SIZE, 2 * size))
    try:
        hold = source.begin(write=True)  # the write lock; aborted, never committed
        try:
            target = open_environment(build, map_size=map_size)
            try:
                with target.begin(write=True) as write:
                    _carry_dmp_state(source, hold, target, write)
            finally:
                target.close()
            publish()
        finally:
            hold.abort()
    finally:
        source.close()


def _carry_dmp_state(
    source: lmdb.Environment,
    hold: lmdb.Transaction[bytes],
    target: lmdb.Environment,
    write: lmdb.Transaction[bytes],
) -> None:
    def opened(name: bytes) -> Any:
        try:
            return source.open_db(name, txn=hold, create=False)
        except lmdb.NotFoundError:
            return None

    for name in (Tables.ALIASES, Tables.APPLIED_FILES):  # plain maps, no ids: the live ones win
        db = opened(name)
        if db is not None:
            write.cursor(db=target.open_db(name, txn=write)).putmulti(hold.cursor(db=db))
    segments = opened(Tables.DMP_SEGMENTS)
    if segments is None:
        return
    names = source.open_db(Tables.SEGMENT_NAMES, txn=hold, create=False)
    built_names = target.open_db(Tables.SEGMENT_NAMES, txn=write)
    built_ids = target.open_db(Tables.SEGMENT_IDS, txn=write)
    for packed, _ in hold.cursor(db=segments):  # in id order
        name = bytes(hold.get(packed, db=names) or b"")
        have = write.get(packed, db=built_names)
        sid = unpack_segment_id(packed)
        next_id = write.stat(built_names)["entries"] + 1
        if have is None and sid == next_id and write.get(name, db=built_ids) is None:
            write.put(packed, name, db=built_names)  # created during the build: the next id
            write.put(name, packed, db=built_ids)
            continue
        if have is None or bytes(have) != name:
            raise SegmentConflictError(
                f"segment {sid} was created by a DMP ({name.decode()!r})"
                " while the snapshot gave the id to another segment: load again"
            )
    # Mirrored: created and deleted ones alike.
    for name in (Tables.DMP_SEGMENTS, Tables.DMP_TITLES):
        db = opened(name)
        built = target.open_db(name, txn=write)
        write.drop(built, delete=False)
        if db is not None:
            write.cursor(db=built).putmulti(hold.cursor(db=db))
