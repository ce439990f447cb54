"""Reading a segment store (the layout is ``layout``'s): what workers serve from.

Readers (``SegmentStore``) open the environment read-only in each worker, after fork; all
keys of a request are read in one read transaction.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import lmdb
import msgspec

from enrich_server.errors import StoreError
from enrich_server.store.layout import (
    DATA_FILE,
    DEFAULT_MAP_SIZE,
    FORMAT,
    MAX_SEGMENT_ID,
    Meta,
    Tables,
    check_store_dir,
    decode_dmp_segment,
    decode_memberships,
    decode_value,
    open_environment,
    pack_segment_id,
    store_dir,
    unpack_segment_id,
)
from enrich_server.store.writer import StoreWriter

_UID_PREFIX: Final = b"uid:"
_EID_PREFIX: Final = b"eid:"
_JSON_ENCODER: Final = msgspec.json.Encoder()


def _live(flat: list[int], now: int, min_expires: int) -> tuple[list[int], int]:
    """The segment ids of a decoded value whose memberships are live at ``now``, and
    ``min_expires`` lowered to their earliest expiry.

    An expiry counts even when its segments turn out to be duplicates: a max-age can only
    come out shorter, never longer, than it should.
    """
    live: list[int] = []
    i = 0
    size = len(flat)
    while i < size:
        expires = flat[i]
        start = i + 2
        i = start + flat[i + 1]
        if expires:
            if expires <= now:
                continue
            if not min_expires or expires < min_expires:
                min_expires = expires
        live += flat[start:i]
    return live, min_expires


@dataclass(frozen=True, slots=True)
class DmpSegment:
    """A segment a DMP created through the API."""

    segment_id: int
    platform: int
    title: str
    key: str
    """The name served to Index."""
    created: int


def _dmp_segment(sid: int, raw: bytes, name: bytes | None) -> DmpSegment:
    platform, title, created = decode_dmp_segment(raw)
    return DmpSegment(sid, platform, title, (name or b"?").decode(), created)


def _alias_id(key: bytes) -> bytes | None:
    """The id part of a ``uid:`` or ``eid:<source>:`` key, the form ``aliases`` is keyed by."""
    if key.startswith(_UID_PREFIX):
        return key[4:]
    if key.startswith(_EID_PREFIX):
        parts = key.split(b":", 2)
        return parts[2] if len(parts) == 3 else None
    return None


@dataclass(frozen=True, slots=True)
class Resolved:
    """What the identity keys of one request resolve to."""

    segments_json: list[bytes]
    """JSON-encoded segment names (``b'"sports_news"'``), distinct, in key order."""
    min_expires: int
    """Earliest expiry (unix seconds) among the returned memberships; 0 when none expires."""
    hits: int
    """How many of the keys were found in the store."""


class StoreView:
    """One read transaction on a store (``SegmentStore.view``): whatever is read through it
    is one committed state, whatever writers commit meanwhile. Use as a context manager; its
    iterators yield in key order and must be consumed inside the block."""

    def __init__(
        self,
        txn: lmdb.Transaction[bytes],
        meta: Any,
        names: Any,
        members: Any,
        optional: dict[bytes, Any],
    ) -> None:
        self._txn = txn
        self._meta = meta
        self._names = names
        self._members = members
        self._optional = optional

    def __enter__(self) -> StoreView:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._txn.abort()

    def applied_sequence(self) -> int:
        """The last replication log entry applied (0: none, or single node)."""
        return int(self._txn.get(Meta.APPLIED_SEQUENCE, b"0", db=self._meta))

    def segments(self) -> Iterator[tuple[int, str]]:
        """Every segment as ``(id, name)``, operators' and DMPs' alike, by id."""
        for packed, name in self._txn.cursor(db=self._names):
            yield unpack_segment_id(packed), bytes(name).decode()

    def memberships(self) -> Iterator[tuple[bytes, dict[str, int]]]:
        """Every identity key with its memberships as ``{segment: expires}``, expired ones
        included."""
        names = dict(self.segments())
        for key, raw in self._txn.cursor(db=self._members):
            yield bytes(key), {names[s]: e for s, e in decode_memberships(raw).items()}

    def membership_groups(self) -> Iterator[tuple[bytes, list[tuple[int, list[str]]]]]:
        """Every identity key with its memberships grouped by expiry, ``[(expires, [segment,
        ...]), ...]`` with expiries ascending and names sorted: a form that does not depend on
        the order the memberships were written in (expired ones included), and cheaper to
        scan than ``memberships``: no dict per key."""
        name = dict(self.segments()).__getitem__
        decode = decode_value
        for key, raw in self._txn.cursor(db=self._members):
            flat = decode(raw)
            if flat[1] + 2 == len(flat):  # one group: the common shape
                yield bytes(key), [(flat[0], sorted(map(name, flat[2:])))]
                continue
            groups: dict[int, list[str]] = {}
            i = 0
            while i < len(flat):
                start = i + 2
                i = start + flat[i + 1]
                groups.setdefault(flat[start - 2], []).extend(map(name, flat[start:i]))
            yield bytes(key), [(expires, sorted(groups[expires])) for expires in sorted(groups)]

    def dmp_segments(self) -> Iterator[DmpSegment]:
        """The segments DMPs created, by id."""
        db = self._optional[Tables.DMP_SEGMENTS]
        if db is None:
            return
        for packed, raw in self._txn.cursor(db=db):
            sid = unpack_segment_id(packed)
            yield _dmp_segment(sid, raw, self._txn.get(packed, db=self._names))

    def aliases(self) -> Iterator[tuple[bytes, bytes]]:
        """Every synced id as ``(their id, our user id)``, by their id."""
        db = self._optional[Tables.ALIASES]
        if db is not None:
            for their, ours in self._txn.cursor(db=db):
                yield bytes(their), bytes(ours)

    def applied_files(self) -> Iterator[tuple[str, bytes]]:
        """Every drop file applied, as ``(name, JSON record)``, by name."""
        db = self._optional[Tables.APPLIED_FILES]
        if db is not None:
            for name, record in self._txn.cursor(db=db):
                yield bytes(name).decode(), bytes(record)


class SegmentStore:
    """A process's view of a store: reads, and with ``writable`` (the ingestion process) the
    environment its writes go through (py-lmdb opens an environment once per process)."""

    def __init__(self, path: Path, writable: bool = False, sync: bool = True) -> None:
        self.path = path
        #: Where the environment is: ``path``, or the generation ``path/current`` names.
        self.directory = store_dir(path)
        check_store_dir(self.directory)
        self.writable = writable
        try:
            self._env = open_environment(
                self.directory,
                map_size=DEFAULT_MAP_SIZE if writable else 0,
                readonly=not writable,
                sync=sync,
                serving=True,
            )
            # Handles opened outside any transaction stay valid for the life of the env.
            self._meta = self._env.open_db(Tables.META, create=False)
            self._members = self._env.open_db(Tables.MEMBERS, create=False)
            self._names_db = self._env.open_db(Tables.SEGMENT_NAMES, create=False)
            with self._env.begin() as txn:
                found = txn.get(Meta.FORMAT, db=self._meta)
            if found == FORMAT and writable:
                with self._env.begin(write=True) as txn:
                    for name in Tables.DMP:
                        self._env.open_db(name, txn=txn)
            #: Handles on the DMP tables; ``None`` until one exists (``_opened``).
            self._tables = {name: self._optional_db(name) for name in Tables.READ_DMP}
        except lmdb.Error as exc:
            raise StoreError(f"cannot open segment store {path}: {exc}") from exc
        if found != FORMAT:
            self._env.close()
            raise StoreError(f"{path} is not an enrich-server store of format {FORMAT.decode()}")
        # Whether ``resolve`` must look ids up in ``aliases`` (free until one exists), and
        # else the snapshot (LMDB transaction id) it last found the table empty in: any commit
        # since may hold the first synced id, so the next request looks again.
        self._has_aliases = False
        self._no_aliases_in = -1
        # Index = segment id; entry 0 is never a real id.
        self._json_names: list[bytes] = [b""]

    def _optional_db(self, name: bytes) -> Any:
        try:
            return self._env.open_db(name, create=False)
        except lmdb.NotFoundError:
            return None

    def _opened(self, name: bytes) -> Any:
        """The handle on DMP table ``name``, opened now if another process created it since
        this one opened the store; ``None`` while there is no such table. Call it outside
        any transaction: a handle serves only transactions begun after it was opened. (A
        writable store made its tables when it opened: this never opens a write txn.)"""
        db = self._tables[name]
        if db is None:
            db = self._tables[name] = self._optional_db(name)
        return db

    def flush(self) -> None:
        """Force what was committed to disk (for a store opened with ``sync=False``)."""
        self._env.sync(True)

    def writer(self) -> StoreWriter:
        """A write session on this process's environment (``writable`` stores only)."""
        if not self.writable:
            raise StoreError(f"segment store {self.path} was opened read-only")
        return StoreWriter(self.path, env=self._env)

    def close(self) -> None:
        """Release the memory map; the store must not be used afterwards."""
        self._env.close()

    def built_at(self) -> int:
        """When the store's current snapshot was built (unix seconds; 0 if unknown)."""
        with self._env.begin() as txn:
            return int(txn.get(Meta.BUILT_AT, b"0", db=self._meta))

    def generation(self) -> int:
        """How many writes (loads, deltas) have been committed to the store."""
        with self._env.begin() as txn:
            return int(txn.get(Meta.GENERATION, b"0", db=self._meta))

    def applied_sequence(self) -> int:
        """The last replication log entry applied to the store (0: none, or single node)."""
        with self._env.begin() as txn:
            return int(txn.get(Meta.APPLIED_SEQUENCE, b"0", db=self._meta))

    def snapshot(self) -> str:
        """The replicated snapshot this store was last replaced with ('' if none)."""
        with self._env.begin() as txn:
            return bytes(txn.get(Meta.SNAPSHOT, b"", db=self._meta)).decode()

    def identity_count(self) -> int:
        """How many identity keys the store holds (O(1): LMDB keeps the count)."""
        with self._env.begin() as txn:
            return int(txn.stat(self._members)["entries"])

    def _begin(self) -> lmdb.Transaction[bytes]:
        # Bound to ``members`` so the per-key ``get`` needs no ``db=`` keyword, and without
        # ``buffers=True``: copying a few dozen bytes is cheaper than a buffer object per get.
        try:
            return self._env.begin(self._members)
        except lmdb.MapResizedError:
            return self._remapped()

    def _remapped(self) -> lmdb.Transaction[bytes]:
        """``_begin`` after a writer grew the map beyond what this process mapped: adopt
        the new size."""
        self._env.set_mapsize(0)
        return self._env.begin(self._members)

    def warm(self) -> None:
        """Read every segment name now, so that no request pays for it (a store swapped in
        while serving)."""
        with self._env.begin() as txn:
            self._load_names(txn, txn.stat(self._names_db)["entries"])

    def _load_names(self, txn: lmdb.Transaction[bytes], up_to: int) -> None:
        names = self._json_names
        get = txn.get
        db = self._names_db
        for sid in range(len(names), up_to + 1):
            raw = get(pack_segment_id(sid), db=db)
            names.append(_JSON_ENCODER.encode(raw.decode()) if raw is not None else b"")

    def resolve(self, keys: Sequence[bytes], now: int, limit: int) -> Resolved:
        """Resolve ``keys`` (in priority order) to at most ``limit`` distinct live segments.

        Memberships that expired at or before ``now`` are skipped. One read transaction.
        The per-segment work (dedupe, cap, name lookup) runs in C (``dict.fromkeys``,
        ``map``), and is skipped when it cannot matter: one value never repeats a segment,
        so a request whose segments all come from one key needs no dedupe.
        """
        sids: list[int] | None = None
        several = False
        min_expires = 0
        hits = 0
        try:  # ``_begin``, inline: one call less per request
            txn = self._env.begin(self._members)
        except lmdb.MapResizedError:
            txn = self._remapped()
        try:
            if self._has_aliases:
                keys = self._with_aliases(txn, keys)
            elif txn.id() != self._no_aliases_in:  # a commit since: the first synced id?
                txn = self._look_for_aliases(txn)
                if self._has_aliases:
                    keys = self._with_aliases(txn, keys)
            get = txn.get
            decode = decode_value
            for key in keys:
                raw = get(key)
                if raw is None:
                    continue
                hits += 1
                flat = decode(raw)
                if flat[1] + 2 == len(flat) and not flat[0]:
                    del flat[:2]  # one group that never expires: the common shape
                    live = flat
                else:
                    live, min_expires = _live(flat, now, min_expires)
                if sids is None:
                    sids = live
                elif live:
                    sids += live
                    several = True
            if not sids:
                return Resolved([], min_expires, hits)
            if several:
                sids = list(dict.fromkeys(sids))
            if len(sids) > limit:
                del sids[limit:]
            try:
                named = list(map(self._json_names.__getitem__, sids))
            except IndexError:  # a segment created since this worker last looked
                self._load_names(txn, max(sids))
                named = list(map(self._json_names.__getitem__, sids))
        finally:
            txn.abort()
        return Resolved(named, min_expires, hits)

    def _look_for_aliases(self, txn: lmdb.Transaction[bytes]) -> lmdb.Transaction[bytes]:
        """Find whether ``aliases`` has entries in ``txn``'s snapshot (``_has_aliases``), or
        remember the snapshot it has none in. Returns the transaction to read on: a new one
        when the table was first opened (once per store, a commit after it was created)."""
        if self._tables[Tables.ALIASES] is None:
            txn.abort()
            self._opened(Tables.ALIASES)
            txn = self._begin()
        aliases = self._tables[Tables.ALIASES]
        if aliases is not None and txn.stat(aliases)["entries"]:
            self._has_aliases = True
        else:
            self._no_aliases_in = txn.id()
        return txn

    def _with_aliases(self, txn: lmdb.Transaction[bytes], keys: Sequence[bytes]) -> Sequence[bytes]:
        """``keys`` with our ``uid:`` key inserted after each key whose id a platform synced."""
        out: list[bytes] | None = None
        aliases = self._tables[Tables.ALIASES]
        for i, key in enumerate(keys):
            their = _alias_id(key)
            ours = txn.get(their, db=aliases) if their else None
            if ours is not None:
                if out is None:
                    out = list(keys[:i])
                out.append(key)
                ours_key = _UID_PREFIX + ours
                if ours_key not in keys and ours_key not in out:
                    out.append(ours_key)
            elif out is not None:
                out.append(key)
        return keys if out is None else out

    def alias_of(self, key: bytes) -> bytes | None:
        """Our ``uid:`` key that a ``uid:``/``eid:`` key's id was synced to (``/uid``), if any."""
        their = _alias_id(key)
        if their is None:
            return None
        aliases = self._opened(Tables.ALIASES)
        if aliases is None:
            return None
        with self._env.begin() as txn:
            ours = txn.get(their, db=aliases)
        return None if ours is None else _UID_PREFIX + ours

    def dmp_segments(self, platform: int | None = None) -> list[DmpSegment]:
        """The segments DMPs created (one platform's when given), by id."""
        with self.view() as view:
            return [s for s in view.dmp_segments() if platform is None or s.platform == platform]

    def dmp_segment(self, sid: int) -> DmpSegment | None:
        """One DMP-created segment by id."""
        segments = self._opened(Tables.DMP_SEGMENTS) if 0 < sid <= MAX_SEGMENT_ID else None
        if segments is None:
            return None
        packed = pack_segment_id(sid)
        with self._env.begin() as txn:
            raw = txn.get(packed, db=segments)
            if raw is None:
                return None
            return _dmp_segment(sid, raw, txn.get(packed, db=self._names_db))

    def applied_file(self, name: str) -> bytes | None:
        """The record of a drop file already applied, or ``None``."""
        applied = self._opened(Tables.APPLIED_FILES)
        if applied is None:
            return None
        with self._env.begin() as txn:
            return txn.get(name.encode(), db=applied)

    def memberships(self, key: bytes) -> dict[str, int] | None:
        """All memberships of ``key`` (expired ones included) as ``{segment: expires}``."""
        with self._env.begin() as txn:
            raw = txn.get(key, db=self._members)
            if raw is None:
                return None
            return {
                bytes(txn.get(pack_segment_id(sid), db=self._names_db) or b"?").decode(): exp
                for sid, exp in decode_memberships(raw).items()
            }

    def items(self) -> Iterator[tuple[bytes, dict[str, int]]]:
        """Every key with its memberships as ``{segment: expires}``, in key order."""
        with self.view() as view:
            yield from view.memberships()

    def identity_keys(self) -> Iterator[bytes]:
        """Every identity key (``uid:…``, ``domain:…``), in key order; values not read."""
        with self._env.begin() as txn:
            for key in txn.cursor(db=self._members).iternext(values=False):
                yield bytes(key)

    def alias_ids(self) -> Iterator[bytes]:
        """Every platform user id synced to one of ours (``/uid``), in id order."""
        aliases = self._opened(Tables.ALIASES)
        if aliases is None:
            return
        with self._env.begin() as txn:
            for their in txn.cursor(db=aliases).iternext(values=False):
                yield bytes(their)

    def view(self) -> StoreView:
        """One read transaction over every table (close it: ``with store.view() as view``),
        for readers that need the tables at one state, such as a replica's digest."""
        optional = {name: self._opened(name) for name in Tables.READ_DMP}
        return StoreView(self._begin(), self._meta, self._names_db, self._members, optional)

    def copy_to(self, directory: Path) -> int:
        """Write a compacted copy of the store into ``directory`` (empty) from one read
        transaction; returns the applied sequence the copy holds (a checkpoint's)."""
        try:
            with self._env.begin() as txn:
                self._env.copy(str(directory), compact=True, txn=txn)
                return int(txn.get(Meta.APPLIED_SEQUENCE, b"0", db=self._meta))
        except lmdb.Error as exc:
            raise StoreError(f"cannot copy segment store {self.path}: {exc}") from exc

    def stats(self) -> StoreStats:
        """Scan the store: identities per namespace, members per segment, sizes, age."""
        by_namespace: Counter[str] = Counter()
        per_segment: Counter[int] = Counter()
        memberships = 0
        with self._env.begin() as txn:
            for key, raw in txn.cursor(db=self._members):
                by_namespace[bytes(key).split(b":", 1)[0].decode()] += 1
                members = decode_memberships(raw)
                memberships += len(members)
                per_segment.update(members.keys())
            names = {
                unpack_segment_id(bytes(k)): bytes(v).decode()
                for k, v in txn.cursor(db=self._names_db)
            }
            built_at = int(txn.get(Meta.BUILT_AT, b"0", db=self._meta))
            updated_at = int(txn.get(Meta.UPDATED_AT, b"0", db=self._meta))
            generation = int(txn.get(Meta.GENERATION, b"0", db=self._meta))
        info = self._env.info()
        return StoreStats(
            path=str(self.path),
            identities=sum(by_namespace.values()),
            memberships=memberships,
            segments=len(names),
            by_namespace=dict(sorted(by_namespace.items())),
            segment_members={
                **{names.get(sid, "?"): n for sid, n in per_segment.most_common()},
                **{name: 0 for sid, name in names.items() if sid not in per_segment},
            },
            file_bytes=os.path.getsize(self.directory / DATA_FILE),
            data_bytes=(info["last_pgno"] + 1) * self._env.stat()["psize"],
            built_at=built_at,
            updated_at=updated_at,
            generation=generation,
        )


@dataclass(slots=True)
class StoreStats:
    """What ``enrich-server stats`` reports."""

    path: str
    identities: int
    memberships: int
    segments: int
    by_namespace: dict[str, int]
    segment_members: dict[str, int]
    file_bytes: int
    data_bytes: int
    built_at: int
    updated_at: int
    generation: int
