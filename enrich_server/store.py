"""The segment store: memberships of identity keys in segments, on LMDB.

Layout (one LMDB environment, a directory holding ``data.mdb``; four named databases):

``meta``           ``format`` → ``1``; ``built_at`` / ``updated_at`` → unix seconds,
                   ``generation`` → commits so far, and (replicated nodes) ``applied_sequence``
                   → the last log entry applied (ASCII), ``snapshot`` → the object name of
                   the replicated snapshot the store was last replaced with
``segment_ids``    segment name (UTF-8) → segment id (4 bytes, big-endian)
``segment_names``  segment id → segment name; ids are dense from 1 and never reused, so a
                   name cached by a reader stays right for the life of the store
``members``        identity key (``uid:…``) → memberships, a msgpack array of integers made of
                   groups ``[expires, count, id, id, …]`` (``expires`` 0 = never). Grouping by
                   expiry keeps a snapshot line (one expiry for all its segments) at one group.
``aliases``        a synced platform's user id (their id, UTF-8) → our user id (``/uid``)
``dmp_segments``   segment id → msgpack ``[platform id, title, created unix seconds]``: the
                   segments DMPs created (``POST /v1/segment?title=``)
``dmp_titles``     platform id (4 bytes) + title → segment id: what makes creation idempotent
``applied_files``  drop-file name → JSON record of when and what was applied (exactly once)

The last four exist once a store has been written with DMP platforms configured; readers
treat them as empty before that, and open them on first use after another process made them.

Readers (``SegmentStore``) open the environment read-only in each worker, after fork; all
keys of a request are read in one read transaction. Writers (``StoreWriter``) are the CLI
and the ingestion paths; LMDB serialises them across processes.
"""

from __future__ import annotations

import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import lmdb
import msgspec

from enrich_server.errors import SegmentConflictError, StoreError

FORMAT: Final = b"1"
DATA_FILE: Final = "data.mdb"
#: In a store with generations, the symlink naming the generation served (``generations``).
CURRENT_LINK: Final = "current"

_META: Final = b"meta"
_SEGMENT_IDS: Final = b"segment_ids"
_SEGMENT_NAMES: Final = b"segment_names"
_MEMBERS: Final = b"members"
_ALIASES: Final = b"aliases"
_DMP_SEGMENTS: Final = b"dmp_segments"
_DMP_TITLES: Final = b"dmp_titles"
_APPLIED_FILES: Final = b"applied_files"
_DMP_DBS: Final = (_ALIASES, _DMP_SEGMENTS, _DMP_TITLES, _APPLIED_FILES)
#: The DMP tables ``SegmentStore`` reads.
_READ_DMP_DBS: Final = (_ALIASES, _DMP_SEGMENTS, _APPLIED_FILES)
_MAX_DBS: Final = 8
_APPLIED_SEQUENCE: Final = b"applied_sequence"
_SNAPSHOT: Final = b"snapshot"
_UID_PREFIX: Final = b"uid:"
_EID_PREFIX: Final = b"eid:"

#: Virtual address space reserved by a writer; the file only grows as pages are used.
DEFAULT_MAP_SIZE: Final = 1 << 36

_SEGMENT_ID: Final = struct.Struct(">I")
#: Segment ids are stored as 4 bytes.
MAX_SEGMENT_ID: Final = 2**32 - 1
_DMP_SEGMENT_DECODER: Final = msgspec.msgpack.Decoder(tuple[int, str, int])
_VALUE_ENCODER: Final = msgspec.msgpack.Encoder()
_VALUE_DECODER: Final = msgspec.msgpack.Decoder(list[int])
_JSON_ENCODER: Final = msgspec.json.Encoder()


class Tables:
    """The named databases of a store (the layout above), for code that writes whole stores
    (``bulk``); everything else goes through ``SegmentStore`` and ``StoreWriter``."""

    META: Final = _META
    SEGMENT_IDS: Final = _SEGMENT_IDS
    SEGMENT_NAMES: Final = _SEGMENT_NAMES
    MEMBERS: Final = _MEMBERS


def open_environment(
    directory: Path, map_size: int = DEFAULT_MAP_SIZE, readonly: bool = False, sync: bool = True
) -> lmdb.Environment:
    """The LMDB environment of the store in ``directory`` (not a generational root), opened
    as every writer of the store opens it."""
    return lmdb.open(
        str(directory), map_size=map_size, readonly=readonly, sync=sync, max_dbs=_MAX_DBS
    )


def pack_segment_id(sid: int) -> bytes:
    """A segment id as ``segment_ids`` values and ``segment_names`` keys hold it."""
    return _SEGMENT_ID.pack(sid)


def unpack_segment_id(raw: bytes) -> int:
    """The segment id of ``pack_segment_id``'s bytes."""
    sid: int = _SEGMENT_ID.unpack(raw)[0]
    return sid


def value_int(number: int) -> bytes:
    """How a non-negative integer (expiry, count, segment id) is written in a ``members``
    value: the pieces a vectorised encoder assembles values from (``bulk_worker``)."""
    return _VALUE_ENCODER.encode(number)


def value_header(items: int) -> bytes:
    """What starts a ``members`` value of ``items`` integers, before the first of them."""
    return _VALUE_ENCODER.encode([0] * items)[: -items or None]


def encode_memberships(memberships: dict[int, int]) -> bytes:
    """Pack ``{segment_id: expires}`` into a ``members`` value (groups in first-seen order)."""
    groups: dict[int, list[int]] = {}
    for sid, expires in memberships.items():
        groups.setdefault(expires, []).append(sid)
    flat: list[int] = []
    for expires, sids in groups.items():
        flat.append(expires)
        flat.append(len(sids))
        flat.extend(sids)
    return _VALUE_ENCODER.encode(flat)


def decode_memberships(raw: bytes | memoryview) -> dict[int, int]:
    """Unpack a ``members`` value into ``{segment_id: expires}``."""
    flat = _VALUE_DECODER.decode(raw)
    out: dict[int, int] = {}
    i = 0
    while i < len(flat):
        expires, count = flat[i], flat[i + 1]
        start = i + 2
        i = start + count
        for sid in flat[start:i]:
            out[sid] = expires
    return out


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


def store_dir(path: Path) -> Path:
    """The directory holding the environment of the store at ``path``: the generation that
    ``path/current`` names, or ``path`` itself (a plain store)."""
    try:
        return path / os.readlink(path / CURRENT_LINK)
    except OSError:
        return path


def _map_size(directory: Path, least: int) -> int:
    """A writer's map: ``least``, or twice the file when bigger, so that one transaction can
    at least double the store before LMDB's map is full (readers adopt the grown map)."""
    try:
        size = os.path.getsize(directory / DATA_FILE)
    except OSError:
        return least
    return max(least, 2 * size)


def _check_store_dir(path: Path) -> None:
    if not (path / DATA_FILE).is_file():
        raise StoreError(
            f"no segment store at {path} "
            f"(build one with: enrich-server load SNAPSHOT --store {path})"
        )


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
    platform, title, created = _DMP_SEGMENT_DECODER.decode(raw)
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
        return int(self._txn.get(_APPLIED_SEQUENCE, b"0", db=self._meta))

    def segments(self) -> Iterator[tuple[int, str]]:
        """Every segment as ``(id, name)``, operators' and DMPs' alike, by id."""
        for packed, name in self._txn.cursor(db=self._names):
            yield _SEGMENT_ID.unpack(packed)[0], bytes(name).decode()

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
        decode = _VALUE_DECODER.decode
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
        db = self._optional[_DMP_SEGMENTS]
        if db is None:
            return
        for packed, raw in self._txn.cursor(db=db):
            sid = _SEGMENT_ID.unpack(packed)[0]
            yield _dmp_segment(sid, raw, self._txn.get(packed, db=self._names))

    def aliases(self) -> Iterator[tuple[bytes, bytes]]:
        """Every synced id as ``(their id, our user id)``, by their id."""
        db = self._optional[_ALIASES]
        if db is not None:
            for their, ours in self._txn.cursor(db=db):
                yield bytes(their), bytes(ours)

    def applied_files(self) -> Iterator[tuple[str, bytes]]:
        """Every drop file applied, as ``(name, JSON record)``, by name."""
        db = self._optional[_APPLIED_FILES]
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
        _check_store_dir(self.directory)
        self.writable = writable
        try:
            self._env = lmdb.open(
                str(self.directory),
                readonly=not writable,
                sync=sync,
                map_size=DEFAULT_MAP_SIZE if writable else 0,
                max_dbs=_MAX_DBS,
                max_spare_txns=1,
                readahead=False,
            )
            # Handles opened outside any transaction stay valid for the life of the env.
            self._meta = self._env.open_db(_META, create=False)
            self._members = self._env.open_db(_MEMBERS, create=False)
            self._names_db = self._env.open_db(_SEGMENT_NAMES, create=False)
            with self._env.begin() as txn:
                found = txn.get(b"format", db=self._meta)
            if found == FORMAT and writable:
                with self._env.begin(write=True) as txn:
                    for name in _DMP_DBS:
                        self._env.open_db(name, txn=txn)
            #: Handles on the DMP tables; ``None`` until one exists (``_opened``).
            self._tables = {name: self._optional_db(name) for name in _READ_DMP_DBS}
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
            return int(txn.get(b"built_at", b"0", db=self._meta))

    def generation(self) -> int:
        """How many writes (loads, deltas) have been committed to the store."""
        with self._env.begin() as txn:
            return int(txn.get(b"generation", b"0", db=self._meta))

    def applied_sequence(self) -> int:
        """The last replication log entry applied to the store (0: none, or single node)."""
        with self._env.begin() as txn:
            return int(txn.get(_APPLIED_SEQUENCE, b"0", db=self._meta))

    def snapshot(self) -> str:
        """The replicated snapshot this store was last replaced with ('' if none)."""
        with self._env.begin() as txn:
            return bytes(txn.get(_SNAPSHOT, b"", db=self._meta)).decode()

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
            raw = get(_SEGMENT_ID.pack(sid), db=db)
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
            decode = _VALUE_DECODER.decode
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
        if self._tables[_ALIASES] is None:
            txn.abort()
            self._opened(_ALIASES)
            txn = self._begin()
        aliases = self._tables[_ALIASES]
        if aliases is not None and txn.stat(aliases)["entries"]:
            self._has_aliases = True
        else:
            self._no_aliases_in = txn.id()
        return txn

    def _with_aliases(self, txn: lmdb.Transaction[bytes], keys: Sequence[bytes]) -> Sequence[bytes]:
        """``keys`` with our ``uid:`` key inserted after each key whose id a platform synced."""
        out: list[bytes] | None = None
        aliases = self._tables[_ALIASES]
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
        aliases = self._opened(_ALIASES)
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
        segments = self._opened(_DMP_SEGMENTS) if 0 < sid <= MAX_SEGMENT_ID else None
        if segments is None:
            return None
        packed = _SEGMENT_ID.pack(sid)
        with self._env.begin() as txn:
            raw = txn.get(packed, db=segments)
            if raw is None:
                return None
            return _dmp_segment(sid, raw, txn.get(packed, db=self._names_db))

    def applied_file(self, name: str) -> bytes | None:
        """The record of a drop file already applied, or ``None``."""
        applied = self._opened(_APPLIED_FILES)
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
                bytes(txn.get(_SEGMENT_ID.pack(sid), db=self._names_db) or b"?").decode(): exp
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
        aliases = self._opened(_ALIASES)
        if aliases is None:
            return
        with self._env.begin() as txn:
            for their in txn.cursor(db=aliases).iternext(values=False):
                yield bytes(their)

    def view(self) -> StoreView:
        """One read transaction over every table (close it: ``with store.view() as view``),
        for readers that need the tables at one state, such as a replica's digest."""
        optional = {name: self._opened(name) for name in _READ_DMP_DBS}
        return StoreView(self._begin(), self._meta, self._names_db, self._members, optional)

    def copy_to(self, directory: Path) -> int:
        """Write a compacted copy of the store into ``directory`` (empty) from one read
        transaction; returns the applied sequence the copy holds (a checkpoint's)."""
        try:
            with self._env.begin() as txn:
                self._env.copy(str(directory), compact=True, txn=txn)
                return int(txn.get(_APPLIED_SEQUENCE, b"0", db=self._meta))
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
                _SEGMENT_ID.unpack(bytes(k))[0]: bytes(v).decode()
                for k, v in txn.cursor(db=self._names_db)
            }
            built_at = int(txn.get(b"built_at", b"0", db=self._meta))
            updated_at = int(txn.get(b"updated_at", b"0", db=self._meta))
            generation = int(txn.get(b"generation", b"0", db=self._meta))
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
                env = lmdb.open(
                    str(directory), map_size=_map_size(directory, map_size), max_dbs=_MAX_DBS
                )
            self._env = env
            self._txn = self._env.begin(write=True)
            self._meta = self._env.open_db(_META, txn=self._txn)
            self._ids = self._env.open_db(_SEGMENT_IDS, txn=self._txn)
            self._names = self._env.open_db(_SEGMENT_NAMES, txn=self._txn)
            self._members = self._env.open_db(_MEMBERS, txn=self._txn)
            self._aliases = self._env.open_db(_ALIASES, txn=self._txn)
            self._dmp_segments = self._env.open_db(_DMP_SEGMENTS, txn=self._txn)
            self._dmp_titles = self._env.open_db(_DMP_TITLES, txn=self._txn)
            self._applied_files = self._env.open_db(_APPLIED_FILES, txn=self._txn)
            found = self._txn.get(b"format", db=self._meta)
            if found is None:
                self._txn.put(b"format", FORMAT, db=self._meta)
                self._txn.put(b"built_at", str(int(time.time())).encode(), db=self._meta)
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
                self._txn.put(b"updated_at", str(int(time.time())).encode(), db=self._meta)
                generation = int(self._txn.get(b"generation", b"0", db=self._meta)) + 1
                self._txn.put(b"generation", str(generation).encode(), db=self._meta)
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
            sid = self._interned[name] = _SEGMENT_ID.unpack(raw)[0]
        return sid

    def intern(self, name: str) -> int:
        """Return the id of segment ``name``, creating it when new."""
        sid = self.segment_id(name)
        if sid is None:
            sid = self._next_id
            self._next_id += 1
            packed = _SEGMENT_ID.pack(sid)
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
        if raw is None:
            self._put_flat(key, [expires, 1, sid])
            return
        flat = _VALUE_DECODER.decode(raw)
        same_group = -1
        i = 0
        while i < len(flat):
            count = flat[i + 1]
            if sid in flat[i + 2 : i + 2 + count]:
                if flat[i] == expires:
                    return
                self.add(key, (sid,), expires)  # moves between expiry groups: the general path
                return
            if flat[i] == expires:
                same_group = i
            i += 2 + count
        if same_group < 0:
            flat += (expires, 1, sid)
        else:
            end = same_group + 2 + flat[same_group + 1]
            flat.insert(end, sid)
            flat[same_group + 1] += 1
        self._put_flat(key, flat)

    def _put_flat(self, key: bytes, flat: list[int]) -> None:
        try:
            self._txn.put(key, _VALUE_ENCODER.encode(flat), db=self._members)
        except lmdb.MapFullError as exc:
            raise StoreError(
                f"segment store {self.path} is full (map size {self._env.info()['map_size']} bytes)"
            ) from exc

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
        try:
            self._txn.put(key, encode_memberships(memberships), db=self._members)
        except lmdb.MapFullError as exc:
            raise StoreError(
                f"segment store {self.path} is full (map size {self._env.info()['map_size']} bytes)"
            ) from exc

    def drop_expired(self, now: int) -> tuple[int, int]:
        """Remove memberships that expired at or before ``now``, and keys left empty.

        Returns (memberships removed, keys deleted). Readers are not blocked: they keep their
        snapshot until this transaction commits.
        """
        changes: list[tuple[bytes, dict[int, int]]] = []
        removed = 0
        for key, raw in self._txn.cursor(db=self._members):
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
        return int(self._txn.get(_APPLIED_SEQUENCE, b"0", db=self._meta))

    def set_applied_sequence(self, sequence: int) -> None:
        """Record, in this transaction, that log entries up to ``sequence`` are applied."""
        self._txn.put(_APPLIED_SEQUENCE, str(sequence).encode(), db=self._meta)

    def replace_with(
        self, build: Path, sequence: int, snapshot: str, publish: Callable[[], object]
    ) -> None:
        """A replicated snapshot: carry this store's DMP state into ``build`` (as
        ``publish_with_dmp_state`` does, from this session, which holds the write lock), record
        ``sequence`` and ``snapshot`` in it, then ``publish`` it. The same entries in the
        same order give the same result on every node. Raises ``SegmentConflictError``
        having changed nothing served."""
        target = open_environment(build, map_size=_map_size(build, DEFAULT_MAP_SIZE))
        try:
            with target.begin(write=True) as write:
                _carry_dmp_state(self._env, self._txn, target, write)
                meta = target.open_db(_META, txn=write)
                write.put(_APPLIED_SEQUENCE, str(sequence).encode(), db=meta)
                write.put(_SNAPSHOT, snapshot.encode(), db=meta)
        finally:
            target.close()
        publish()
        self.set_applied_sequence(sequence)  # the superseded store, for whoever still reads it

    def segment_name(self, sid: int) -> str | None:
        """The name (served string) of segment ``sid``."""
        raw = self._txn.get(_SEGMENT_ID.pack(sid), db=self._names)
        return None if raw is None else raw.decode()

    def dmp_segment(self, sid: int) -> tuple[int, str] | None:
        """``(platform, title)`` of a DMP-created segment, or ``None``."""
        if not 0 < sid <= MAX_SEGMENT_ID:
            return None
        raw = self._txn.get(_SEGMENT_ID.pack(sid), db=self._dmp_segments)
        if raw is None:
            return None
        platform, title, _ = _DMP_SEGMENT_DECODER.decode(raw)
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
        title_key = _SEGMENT_ID.pack(platform) + title.encode()
        raw = self._txn.get(title_key, db=self._dmp_titles)
        if raw is not None:
            return _SEGMENT_ID.unpack(raw)[0], False
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
        packed = _SEGMENT_ID.pack(sid)
        record = _VALUE_ENCODER.encode((platform, title, now or int(time.time())))
        self._txn.put(packed, record, db=self._dmp_segments)
        self._txn.put(title_key, packed, db=self._dmp_titles)
        return sid, True

    def delete_dmp_segment(self, sid: int) -> int:
        """Delete a DMP-created segment and every membership in it; returns how many
        memberships went. Its id is never reused; its name stays interned."""
        owner = self.dmp_segment(sid)
        if owner is None:
            return 0
        packed = _SEGMENT_ID.pack(sid)
        self._txn.delete(packed, db=self._dmp_segments)
        self._txn.delete(_SEGMENT_ID.pack(owner[0]) + owner[1].encode(), db=self._dmp_titles)
        holders = [
            bytes(key)
            for key, raw in self._txn.cursor(db=self._members)
            if sid in _VALUE_DECODER.decode(raw)[2:]  # cheap pre-filter, confirmed below
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
    source = lmdb.open(str(live), map_size=max(DEFAULT_MAP_SIZE, 2 * size), max_dbs=_MAX_DBS)
    try:
        hold = source.begin(write=True)  # the write lock; aborted, never committed
        try:
            target = lmdb.open(str(build), map_size=map_size, max_dbs=_MAX_DBS)
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

    for name in (_ALIASES, _APPLIED_FILES):  # plain maps, no ids: the live ones win
        db = opened(name)
        if db is not None:
            write.cursor(db=target.open_db(name, txn=write)).putmulti(hold.cursor(db=db))
    segments = opened(_DMP_SEGMENTS)
    if segments is None:
        return
    names = source.open_db(_SEGMENT_NAMES, txn=hold, create=False)
    built_names = target.open_db(_SEGMENT_NAMES, txn=write)
    built_ids = target.open_db(_SEGMENT_IDS, txn=write)
    for packed, _ in hold.cursor(db=segments):  # in id order
        name = bytes(hold.get(packed, db=names) or b"")
        have = write.get(packed, db=built_names)
        sid = _SEGMENT_ID.unpack(packed)[0]
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
    for name in (_DMP_SEGMENTS, _DMP_TITLES):  # mirrored: created and deleted ones alike
        db = opened(name)
        built = target.open_db(name, txn=write)
        write.drop(built, delete=False)
        if db is not None:
            write.cursor(db=built).putmulti(hold.cursor(db=db))
