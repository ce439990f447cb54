"""The segment store: memberships of identity keys in segments, on LMDB.

Layout (one LMDB environment, a directory holding ``data.mdb``; four named databases):

``meta``           ``format`` → ``1``; ``built_at`` / ``updated_at`` → unix seconds, and
                   ``generation`` → commits so far (ASCII)
``segment_ids``    segment name (UTF-8) → segment id (4 bytes, big-endian)
``segment_names``  segment id → segment name; ids are dense from 1 and never reused, so a
                   name cached by a reader stays right for the life of the store
``members``        identity key (``uid:…``) → memberships, a msgpack array of integers made of
                   groups ``[expires, count, id, id, …]`` (``expires`` 0 = never). Grouping by
                   expiry keeps a snapshot line (one expiry for all its segments) at one group.

Readers (``SegmentStore``) open the environment read-only in each worker, after fork; all
keys of a request are read in one read transaction. Writers (``StoreWriter``) are the CLI
and the ingestion paths; LMDB serialises them across processes.
"""

from __future__ import annotations

import os
import struct
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

import lmdb
import msgspec

from enrich_server.errors import StoreError

FORMAT: Final = b"1"
DATA_FILE: Final = "data.mdb"

_META: Final = b"meta"
_SEGMENT_IDS: Final = b"segment_ids"
_SEGMENT_NAMES: Final = b"segment_names"
_MEMBERS: Final = b"members"
_MAX_DBS: Final = 4

#: Virtual address space reserved by a writer; the file only grows as pages are used.
DEFAULT_MAP_SIZE: Final = 1 << 36

_SEGMENT_ID: Final = struct.Struct(">I")
_VALUE_ENCODER: Final = msgspec.msgpack.Encoder()
_VALUE_DECODER: Final = msgspec.msgpack.Decoder(list[int])
_JSON_ENCODER: Final = msgspec.json.Encoder()


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


def _check_store_dir(path: Path) -> None:
    if not (path / DATA_FILE).is_file():
        raise StoreError(
            f"no segment store at {path} "
            f"(build one with: enrich-server load SNAPSHOT --store {path})"
        )


@dataclass(frozen=True, slots=True)
class Resolved:
    """What the identity keys of one request resolve to."""

    segments_json: list[bytes]
    """JSON-encoded segment names (``b'"sports_news"'``), distinct, in key order."""
    min_expires: int
    """Earliest expiry (unix seconds) among the returned memberships; 0 when none expires."""
    hits: int
    """How many of the keys were found in the store."""


class SegmentStore:
    """Read-only view of a store, one per serving process."""

    def __init__(self, path: Path) -> None:
        _check_store_dir(path)
        self.path = path
        try:
            self._env = lmdb.open(
                str(path), readonly=True, max_dbs=_MAX_DBS, max_spare_txns=1, readahead=False
            )
            # Handles opened outside any transaction stay valid for the life of the env.
            self._meta = self._env.open_db(_META, create=False)
            self._members = self._env.open_db(_MEMBERS, create=False)
            self._names_db = self._env.open_db(_SEGMENT_NAMES, create=False)
            with self._env.begin() as txn:
                found = txn.get(b"format", db=self._meta)
        except lmdb.Error as exc:
            raise StoreError(f"cannot open segment store {path}: {exc}") from exc
        if found != FORMAT:
            self._env.close()
            raise StoreError(f"{path} is not an enrich-server store of format {FORMAT.decode()}")
        # Index = segment id; entry 0 is never a real id.
        self._json_names: list[bytes] = [b""]

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
            # A writer grew the map beyond what this process mapped: adopt the new size.
            self._env.set_mapsize(0)
            return self._env.begin(self._members)

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
        txn = self._begin()
        try:
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
        with self._env.begin() as txn:
            names = {
                _SEGMENT_ID.unpack(bytes(k))[0]: bytes(v).decode()
                for k, v in txn.cursor(db=self._names_db)
            }
            for key, raw in txn.cursor(db=self._members):
                yield bytes(key), {names[s]: e for s, e in decode_memberships(raw).items()}

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
            file_bytes=os.path.getsize(self.path / DATA_FILE),
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
    """

    def __init__(self, path: Path, map_size: int = DEFAULT_MAP_SIZE) -> None:
        self.path = path
        try:
            path.mkdir(parents=True, exist_ok=True)
            self._env = lmdb.open(str(path), map_size=map_size, max_dbs=_MAX_DBS)
            self._txn = self._env.begin(write=True)
            self._meta = self._env.open_db(_META, txn=self._txn)
            self._ids = self._env.open_db(_SEGMENT_IDS, txn=self._txn)
            self._names = self._env.open_db(_SEGMENT_NAMES, txn=self._txn)
            self._members = self._env.open_db(_MEMBERS, txn=self._txn)
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

    def clear_members(self) -> None:
        """Drop every membership (segment ids stay interned, so cached names stay valid)."""
        self._txn.drop(self._members, delete=False)
        self._txn.put(b"built_at", str(int(time.time())).encode(), db=self._meta)
