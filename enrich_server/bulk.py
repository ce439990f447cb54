"""Bulk build: ``load --replace`` and a first load write a new store with sorted appends.

The pipeline runs in worker processes forked once (one per usable core):

1. parse: the snapshots are cut into chunks at line ends (gzip files are inflated here and
   handed over). A worker parses its chunk with a fast path for the common line (known
   segments, additions only) and ``snapshot.parse_line`` for anything else, so errors and
   semantics are the transactional loader's; new segment names are interned in the build
   environment itself (LMDB serialises the workers, ids stay dense). Records are bucketed by
   key range (bounds sampled from the input) and spilled to one file per chunk.
2. sort: a worker gathers one key range from every chunk's spill, in input order, sorts it
   stably and merges the lines of one key as the loader would (a later expiry replaces an
   earlier one, ``-segment`` removes).
3. write: this process appends each sorted range to ``members`` (``putmulti(append=True)``)
   while the workers sort the next ones, committing once per range: the environment is
   private until published, and a full map is grown between commits.

Memory is bounded by the chunk and range sizes, never by the input; temporary files live in
the build directory, on the store's disk, and go with it whatever happens. A replace
publishes the result as the store's next generation (``generations``); a first build is
renamed into place as a plain store.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import errno
import functools
import gc
import gzip
import itertools
import multiprocessing
import multiprocessing.pool
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Final, TypeVar

import lmdb
import msgspec

from enrich_server.errors import SnapshotError, StoreError
from enrich_server.generations import BUILD_PREFIX, Lease, publish, remove_unused
from enrich_server.keys import MAX_KEY_BYTES
from enrich_server.progress import Progress
from enrich_server.snapshot import MAX_REPORTED_PROBLEMS, LoadReport, parse_line
from enrich_server.store import (
    _MAX_DBS,
    _MEMBERS,
    _META,
    _SEGMENT_ID,
    _SEGMENT_IDS,
    _SEGMENT_NAMES,
    _VALUE_ENCODER,
    DATA_FILE,
    DEFAULT_MAP_SIZE,
    StoreWriter,
    decode_memberships,
    encode_memberships,
    store_dir,
)

#: Input bytes a worker parses at a time.
CHUNK_BYTES: Final = 16 << 20
#: Input bytes per key range, the unit sorted in memory by one worker.
RANGE_BYTES: Final = 32 << 20
_SAMPLES_PER_RANGE: Final = 64
_GZIP_MAGIC: Final = b"\x1f\x8b"
_MAX_EXPIRES: Final = 2**32 - 1
#: Keys already in normal form (``keys.parse_key`` would return them as they are); anything
#: else (upper case, non-ASCII, odd eid sources) takes the exact slow path.
_PLAIN_KEY: Final = re.compile(
    r"(?:uid|bundle|gpid):.+|(?:ifa|domain):[\x00-\x40\x5b-\x7f]+|eid:[a-z0-9._-]+:.+", re.DOTALL
)
#: msgpack's never-used byte: starts a record that is not a ``members`` value but a line
#: with removals, ``[expires, [added names], [removed names]]``, resolved when sorting.
_LINE_RECORD: Final = b"\xc1"
_RECORDS: Final = msgspec.msgpack.Decoder(tuple[list[bytes], list[bytes]])
_PAIRS: Final = msgspec.msgpack.Decoder(list[tuple[bytes, bytes]])
_LINE: Final = msgspec.msgpack.Decoder(tuple[int, list[str], list[str]])

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Chunk:
    index: int
    file: int
    path: str
    start: int
    length: int
    done: int
    data: bytes | None = None
    """The chunk itself when it comes from a gzip file; otherwise read from ``path``."""


@dataclass(frozen=True, slots=True)
class _Unreadable:
    file: int
    error: str


@dataclass(slots=True)
class _Parsed:
    index: int
    file: int
    done: int
    """Input bytes read once this chunk is done (for progress)."""
    lines: int
    """Lines in the chunk, blank and comments included (for line numbers)."""
    counted: int
    """Lines that are neither blank nor comments."""
    added: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)
    more: int = 0
    spans: list[tuple[int, int]] = field(default_factory=list)
    line_records: set[int] = field(default_factory=set)
    """Key ranges holding records of lines with removals."""
    records: int = 0


@dataclass(frozen=True, slots=True)
class _Sorted:
    path: str
    identities: int
    removed: int


class _Worker:
    """Per-process state of a pool worker (set once by ``_start_worker``)."""

    def __init__(self, build: Path, bounds: list[bytes], spill: Path, map_size: int) -> None:
        gc.disable()  # parsing allocates millions of short-lived containers, never a cycle
        self.bounds = bounds
        self.spill = spill
        # No sync per commit: the builder syncs the whole file once before publishing.
        self.env = lmdb.open(str(build), map_size=map_size, max_dbs=_MAX_DBS, sync=False)
        self.ids_db = self.env.open_db(_SEGMENT_IDS, create=False)
        self.names_db = self.env.open_db(_SEGMENT_NAMES, create=False)
        self.encoded: dict[str, bytes] = {}
        """Segment name -> its id as msgpack, for the fast path (valid names only)."""
        self.prefixes: dict[tuple[int, str], bytes] = {}
        with self.env.begin() as txn:
            for name, packed in txn.cursor(db=self.ids_db):
                text = bytes(name).decode()
                with contextlib.suppress(ValueError):  # interned by older, laxer rules
                    parse_line(f"uid:x\t{text}")
                    self.encoded[text] = _VALUE_ENCODER.encode(_SEGMENT_ID.unpack(packed)[0])

    def intern(self, name: str) -> bytes:
        """The msgpack id of segment ``name``, interned in the build when new."""
        found = self.encoded.get(name)
        if found is None:
            sid = _write(self.env, lambda txn: _intern(txn, self.ids_db, self.names_db, name))
            found = self.encoded[name] = _VALUE_ENCODER.encode(sid)
        return found

    def segment_ids(self, names: list[str]) -> list[int | None]:
        """Ids of ``names`` as interned in the build (``None`` for unknown names)."""
        try:
            txn = self.env.begin(db=self.ids_db)
        except lmdb.MapResizedError:  # the builder grew the map: adopt it
            self.env.set_mapsize(0)
            txn = self.env.begin(db=self.ids_db)
        with txn:
            found = [txn.get(name.encode()) for name in names]
        return [_SEGMENT_ID.unpack(raw)[0] if raw is not None else None for raw in found]

    def value(self, ids: list[bytes], expires: str) -> bytes:
        """A ``members`` value for segments ``ids`` (msgpack ids), byte for byte what
        ``store.encode_memberships`` makes of one line."""
        if len(ids) > 1 and len(set(ids)) != len(ids):
            ids = list(dict.fromkeys(ids))
        prefix = self.prefixes.get((len(ids), expires))
        if prefix is None:
            count = len(ids)
            # Header of an array of count + 2 items, then expires and count; ids follow.
            whole = _VALUE_ENCODER.encode([int(expires or 0), count, *([0] * count)])
            prefix = self.prefixes[count, expires] = whole[: len(whole) - count]
        return prefix + b"".join(ids)

    def parse(self, chunk: _Chunk) -> _Parsed:
        """Parse a chunk and spill its records by key range."""
        data = chunk.data if chunk.data is not None else _read_span(chunk)
        try:
            lines: list[str] | list[str | ValueError] = _split(data.decode())
        except UnicodeDecodeError:
            lines = _split_slowly(data)
        ranges = len(self.bounds) + 1
        keys: list[list[bytes]] = [[] for _ in range(ranges)]
        values: list[list[bytes]] = [[] for _ in range(ranges)]
        parsed = _Parsed(chunk.index, chunk.file, chunk.done, len(lines), 0)
        encoded = self.encoded
        plain_key = _PLAIN_KEY.fullmatch
        where = bisect.bisect_right
        bounds = self.bounds
        for number, line in enumerate(lines, start=1):
            if isinstance(line, str):
                if not line or line[0] == "#":
                    continue
                key, _, rest = line.partition("\t")
                segments, _, expires = rest.partition("\t")
                if (
                    plain_key(key) is not None
                    and (not expires or (expires.isdigit() and int(expires) <= _MAX_EXPIRES))
                    and not parsed.problems
                ):
                    try:
                        ids = list(map(encoded.__getitem__, segments.split(",")))
                    except KeyError:
                        pass  # a new segment, a removal or a bad name: the slow path says
                    else:
                        raw_key = key.encode()
                        if len(raw_key) <= MAX_KEY_BYTES:
                            where_to = where(bounds, raw_key)
                            keys[where_to].append(raw_key)
                            values[where_to].append(self.value(ids, expires))
                            parsed.counted += 1
                            parsed.added += 1
                            continue
            record = self._slow(number, line, parsed)
            if record is not None:
                where_to = where(bounds, record[0])
                keys[where_to].append(record[0])
                values[where_to].append(record[1])
                if record[1][:1] == _LINE_RECORD:
                    parsed.line_records.add(where_to)
        if not parsed.problems:
            parsed.records = sum(map(len, keys))
            blobs = [_VALUE_ENCODER.encode(pair) for pair in zip(keys, values, strict=True)]
            offsets = itertools.accumulate(map(len, blobs), initial=0)
            parsed.spans = [(start, len(blob)) for start, blob in zip(offsets, blobs, strict=False)]
            write_spill(self.spill / f"chunk-{chunk.index}", blobs)
        return parsed

    def _slow(
        self, number: int, line: str | ValueError, parsed: _Parsed
    ) -> tuple[bytes, bytes] | None:
        """Any line the fast path declined: exactly what the transactional loader does."""
        if isinstance(line, str) and (not line or line[0] == "#"):
            return None
        parsed.counted += 1
        try:
            if isinstance(line, ValueError):
                raise line
            snapshot_line = parse_line(line)
        except ValueError as exc:
            if len(parsed.problems) < MAX_REPORTED_PROBLEMS:
                parsed.problems.append((number, str(exc)))
            else:
                parsed.more += 1
            return None
        if parsed.problems:
            return None  # keep validating, stop building: nothing will be published
        if snapshot_line.add:
            parsed.added += 1
        ids = [self.intern(name) for name in snapshot_line.add]
        if snapshot_line.remove:
            record = (snapshot_line.expires, snapshot_line.add, snapshot_line.remove)
            return snapshot_line.key, _LINE_RECORD + _VALUE_ENCODER.encode(record)
        return snapshot_line.key, self.value(ids, str(snapshot_line.expires or ""))

    def sort(self, key_range: int, spans: list[tuple[str, int, int]], lines: bool) -> _Sorted:
        """Sort one key range of every chunk (in input order) and merge each key's lines."""
        keys: list[bytes] = []
        values: list[bytes] = []
        for spilled, start, length in spans:
            with open(spilled, "rb") as spill:
                spill.seek(start)
                more_keys, more_values = _RECORDS.decode(spill.read(length))
            keys += more_keys
            values += more_values
        pairs = sorted(zip(keys, values, strict=True), key=itemgetter(0))  # stable: input order
        removed = 0
        if lines or len(set(keys)) != len(keys):
            pairs, removed = self._merge(pairs)
        path = self.spill / f"range-{key_range}"
        write_spill(path, [_VALUE_ENCODER.encode(pairs)])
        return _Sorted(str(path), len(pairs), removed)

    def _merge(self, pairs: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], int]:
        merged: list[tuple[bytes, bytes]] = []
        removed = 0
        for key, group in itertools.groupby(pairs, key=itemgetter(0)):
            values = [value for _, value in group]
            if len(values) == 1 and values[0][:1] != _LINE_RECORD:
                merged.append((key, values[0]))
                continue
            memberships: dict[int, int] = {}
            for value in values:
                if value[:1] != _LINE_RECORD:
                    memberships.update(decode_memberships(value))
                    continue
                expires, added, gone = _LINE.decode(value[1:])
                for sid in self.segment_ids(added):
                    if sid is not None:
                        memberships[sid] = expires
                for sid in self.segment_ids(gone):
                    if sid is not None and memberships.pop(sid, None) is not None:
                        removed += 1
            if memberships:
                merged.append((key, encode_memberships(memberships)))
        return merged, removed


def _intern(
    txn: lmdb.Transaction[bytes], ids_db: lmdb._Database, names_db: lmdb._Database, name: str
) -> int:
    """Segment ``name``'s id, made the next one when new (as ``StoreWriter.intern`` does;
    the workers' write transactions are serialised by LMDB)."""
    raw_name = name.encode()
    packed = txn.get(raw_name, db=ids_db)
    if packed is None:
        packed = _SEGMENT_ID.pack(txn.stat(names_db)["entries"] + 1)
        txn.put(raw_name, packed, db=ids_db)
        txn.put(packed, raw_name, db=names_db)
    sid: int = _SEGMENT_ID.unpack(packed)[0]
    return sid


def write_spill(path: Path, blobs: list[bytes]) -> None:
    """Write a temporary file of the build: the one seam where the build's own files reach
    the disk (tests inject a full disk here when they cannot mount a small one)."""
    with path.open("wb") as out:
        out.writelines(blobs)


_worker: _Worker | None = None


def _start_worker(build: Path, bounds: list[bytes], spill: Path, map_size: int) -> None:
    global _worker  # one per pool process, set once
    _worker = _Worker(build, bounds, spill, map_size)


def _parse(chunk: _Chunk) -> _Parsed:
    assert _worker is not None
    return _worker.parse(chunk)


def _sort(job: tuple[int, list[tuple[str, int, int]], bool]) -> _Sorted:
    assert _worker is not None
    return _worker.sort(*job)


def _split(text: str) -> list[str]:
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the text ended with a newline (or was empty)
    if "\r" in text:
        lines = [line.rstrip("\r") for line in lines]
    return lines


def _split_slowly(data: bytes) -> list[str | ValueError]:
    """Lines of a chunk that is not all valid UTF-8, the bad ones as the error to report."""
    out: list[str | ValueError] = []
    raw_lines = data.split(b"\n")
    if raw_lines[-1] == b"":
        raw_lines.pop()
    for raw in raw_lines:
        try:
            out.append(raw.decode().rstrip("\r"))
        except UnicodeDecodeError as exc:
            out.append(ValueError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})"))
    return out


def _read_span(chunk: _Chunk) -> bytes:
    with open(chunk.path, "rb") as source:
        source.seek(chunk.start)
        return source.read(chunk.length)


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as source:
        return source.read(2) == _GZIP_MAGIC


def _chunks(paths: Sequence[Path]) -> Iterator[_Chunk | _Unreadable]:
    """The snapshots cut at line ends into chunks of about ``CHUNK_BYTES``."""
    index = before = 0
    for number, path in enumerate(paths):
        size = path.stat().st_size
        if _is_gzip(path):
            try:
                with path.open("rb") as raw, gzip.GzipFile(fileobj=raw) as source:
                    while data := source.read(CHUNK_BYTES):
                        data += source.readline()
                        yield _Chunk(index, number, str(path), 0, 0, before + raw.tell(), data)
                        index += 1
            except (OSError, EOFError) as exc:
                yield _Unreadable(number, str(exc))
        else:
            start = 0
            with path.open("rb") as source:
                while start < size:
                    source.seek(min(start + CHUNK_BYTES, size))
                    source.readline()
                    end = min(source.tell(), size)
                    yield _Chunk(index, number, str(path), start, end - start, before + end)
                    index += 1
                    start = end
        before += size


def _sample(paths: Sequence[Path], ranges: int) -> tuple[list[bytes], list[str]]:
    """Keys cutting the input into ``ranges`` ranges of about equal size, and the segments
    seen, from lines sampled evenly through each file (the first lines of a gzip file)."""
    per_file = max(ranges * _SAMPLES_PER_RANGE // len(paths), 16)
    keys: list[bytes] = []
    segments: dict[str, None] = {}
    for path in paths:
        raw_lines: list[bytes] = []
        if _is_gzip(path):
            with contextlib.suppress(OSError, EOFError), gzip.open(path, "rb") as source:
                raw_lines = [source.readline() for _ in range(per_file)]
        else:
            size = path.stat().st_size
            with path.open("rb") as source:
                for n in range(per_file):
                    source.seek(size * n // per_file)
                    if n:
                        source.readline()  # the rest of a line cut in the middle
                    raw_lines.append(source.readline())
        for raw in raw_lines:
            with contextlib.suppress(ValueError):
                line = parse_line(raw.decode().rstrip("\r\n"))
                keys.append(line.key)
                segments.update(dict.fromkeys(line.add))
    keys.sort()
    bounds = {keys[len(keys) * n // ranges] for n in range(1, ranges)} if keys else set()
    return sorted(bounds), list(segments)


def _ordered(
    pool: multiprocessing.pool.Pool,
    function: Callable[[T], object],
    jobs: Iterator[T | _Unreadable],
    window: int,
) -> Iterator[object]:
    """Results of ``function`` over ``jobs`` in order, at most ``window`` in flight (so that
    inflated gzip chunks and sorted ranges never pile up); ``_Unreadable`` passes through."""
    pending: collections.deque[multiprocessing.pool.AsyncResult[object] | _Unreadable] = (
        collections.deque()
    )
    for job in jobs:
        pending.append(job if isinstance(job, _Unreadable) else pool.apply_async(function, (job,)))
        while len(pending) >= window:
            yield _result(pending.popleft())
    while pending:
        yield _result(pending.popleft())


def _result(item: multiprocessing.pool.AsyncResult[object] | _Unreadable) -> object:
    return item if isinstance(item, _Unreadable) else item.get()


def _write(env: lmdb.Environment, work: Callable[[lmdb.Transaction[bytes]], T]) -> T:
    """Run ``work`` in a write transaction and commit, growing the map when it is full (the
    build is private until published, so one commit or several makes no difference)."""
    while True:
        try:
            with env.begin(write=True) as txn:
                return work(txn)
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)
        except lmdb.MapResizedError:  # another process of the build grew it: adopt that
            env.set_mapsize(0)


def _append(
    db: lmdb._Database, pairs: list[tuple[bytes, bytes]], txn: lmdb.Transaction[bytes]
) -> None:
    """Append sorted ``pairs`` after the keys ``db`` holds (no search, pages filled up)."""
    txn.cursor(db=db).putmulti(pairs, append=True)


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return isinstance(exc, lmdb.Error) and os.strerror(errno.ENOSPC) in str(exc)


def _copy_store(live: Path | None, build: Path, map_size: int) -> None:
    """Create the build's databases as ``StoreWriter`` does and carry over everything of the
    live store but its memberships: segment ids (so ids and cached names stay valid), meta,
    and any other database (DMP registries, aliases)."""
    with StoreWriter(build, map_size=map_size):
        pass
    if live is None:
        return
    source = lmdb.open(str(live), readonly=True, max_dbs=_MAX_DBS)
    target = lmdb.open(str(build), map_size=map_size, max_dbs=_MAX_DBS, sync=False)
    try:
        with source.begin() as read, target.begin(write=True) as write:
            for name in [bytes(name) for name, _ in read.cursor()]:
                if name == _MEMBERS:
                    continue  # the one thing a replace replaces (DMP pushes included)
                from_db = source.open_db(name, txn=read, create=False)
                to_db = target.open_db(name, txn=write, **from_db.flags())
                write.cursor(db=to_db).putmulti(read.cursor(db=from_db), dupdata=True)
            meta = target.open_db(_META, txn=write, create=False)
            generation = int(write.get(b"generation", b"0", db=meta)) + 1
            write.put(b"generation", str(generation).encode(), db=meta)
    finally:
        source.close()
        target.close()


def build(
    paths: Sequence[Path],
    root: Path,
    progress: bool = True,
    workers: int | None = None,
    map_size: int = DEFAULT_MAP_SIZE,
) -> LoadReport:
    """Build a store from snapshots at ``root``: a new generation of an existing store (the
    live one is replaced as a whole once the build is complete), or a new plain store.

    Raises ``SnapshotError`` listing bad lines (nothing published) and ``StoreError`` (disk
    full, unwritable), leaving the live store as it was and no partial files behind.
    """
    live = store_dir(root) if (store_dir(root) / DATA_FILE).is_file() else None
    if live is None:
        building = root.with_name(f".{root.name}.building-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
    else:
        building = root / f"{BUILD_PREFIX}{os.getpid()}"
    job: _Build | None = None
    try:
        building.mkdir(parents=True)
        _copy_store(live, building, map_size)
        job = _Build(paths, building, workers or len(os.sched_getaffinity(0)), map_size)
        report = job.run(progress)
        job.close()
        if live is None:
            if root.exists():
                root.rmdir()  # an empty directory the operator made for us
            building.rename(root)
        else:
            publish(root, building)
            remove_unused(root)
        return report
    except BaseException as exc:
        if job is not None:
            job.close(failed=True)
        shutil.rmtree(building, ignore_errors=True)
        if _disk_full(exc):
            raise StoreError(
                f"no space left on the disk holding {root} while building; the store was not "
                f"changed and the partial build was removed ({exc})"
            ) from exc
        if isinstance(exc, lmdb.Error):
            raise StoreError(f"cannot build segment store {root}: {exc}") from exc
        raise


class _Build:
    """The worker pool and what the phases hand each other."""

    def __init__(self, paths: Sequence[Path], building: Path, workers: int, map_size: int):
        self.paths = paths
        self.building = building
        self.workers = workers
        self.map_size = map_size
        self.spill = building / "spill"
        self.spill.mkdir()
        self.total = sum(p.stat().st_size for p in paths)
        bounds, segments = _sample(paths, max(1, -(-self.total // RANGE_BYTES)))
        self.ranges = len(bounds) + 1
        # The sample's segments interned up front spare the workers most first sightings
        # (each one a slow-path line and a write transaction).
        env = lmdb.open(str(building), map_size=map_size, max_dbs=_MAX_DBS)
        try:
            ids_db = env.open_db(_SEGMENT_IDS, create=False)
            names_db = env.open_db(_SEGMENT_NAMES, create=False)
            _write(env, lambda txn: [_intern(txn, ids_db, names_db, name) for name in segments])
        finally:
            env.close()
        # Forked after the build environment was closed here (an LMDB environment must not
        # cross a fork); forking also starts the workers in milliseconds.
        self.pool: multiprocessing.pool.Pool | None = multiprocessing.get_context("fork").Pool(
            workers, _start_worker, (building, bounds, self.spill, map_size)
        )
        # Taken after the fork, so that only this process holds it: a build killed midway
        # leaves its directory unlocked, for the next clean-up to remove.
        self.lease = Lease(building, exclusive=True)

    def close(self, failed: bool = False) -> None:
        """Stop the workers (at once when ``failed``), drop the spill and the lease."""
        if self.pool is not None:
            if failed:
                self.pool.terminate()
            else:
                self.pool.close()
            self.pool.join()
            self.pool = None
        shutil.rmtree(self.spill, ignore_errors=True)
        self.lease.release()

    def run(self, progress: bool) -> LoadReport:
        """Parse, then sort and write."""
        assert self.pool is not None
        spans, line_records, report, records = self._parse(self.pool, progress)
        bar = Progress("write", records) if progress else None
        jobs = ((n, spans[n], n in line_records) for n in range(self.ranges))
        written = removed = 0
        env = lmdb.open(str(self.building), map_size=self.map_size, max_dbs=_MAX_DBS, sync=False)
        try:
            members = env.open_db(_MEMBERS, create=False)
            for item in _ordered(self.pool, _sort, jobs, self.workers + 1):
                assert isinstance(item, _Sorted)
                pairs = _PAIRS.decode(Path(item.path).read_bytes())
                os.unlink(item.path)
                _write(env, functools.partial(_append, members, pairs))
                written += item.identities
                removed += item.removed
                if bar is not None:
                    bar.update(written, written)
            with env.begin(write=True) as txn:
                meta = env.open_db(_META, txn=txn, create=False)
                now = str(int(time.time())).encode()
                txn.put(b"built_at", now, db=meta)
                txn.put(b"updated_at", now, db=meta)
            env.sync(True)
        finally:
            env.close()
        if bar is not None:
            bar.finish(written)
        return dataclasses.replace(report, memberships_removed=removed)

    def _parse(
        self, pool: multiprocessing.pool.Pool, progress: bool
    ) -> tuple[list[list[tuple[str, int, int]]], set[int], LoadReport, int]:
        """Phase 1: spans of each key range in the spills, ranges with line records, the
        report so far, records spilled. Raises ``SnapshotError`` on any bad line."""
        bar = Progress("load", self.total) if progress else None
        problems: list[str] = []
        more = lines = added = records = 0
        line_of_file = [0] * len(self.paths)
        spans: list[list[tuple[str, int, int]]] = [[] for _ in range(self.ranges)]
        line_records: set[int] = set()
        for item in _ordered(pool, _parse, _chunks(self.paths), 2 * self.workers):
            if isinstance(item, _Unreadable):
                at = line_of_file[item.file] + 1
                problems.append(f"{self.paths[item.file]}:{at}: unreadable: {item.error}")
                continue
            assert isinstance(item, _Parsed)
            for number, why in item.problems:
                if len(problems) < MAX_REPORTED_PROBLEMS:
                    at = line_of_file[item.file] + number
                    problems.append(f"{self.paths[item.file]}:{at}: {why}")
                else:
                    more += 1
            more += item.more
            line_of_file[item.file] += item.lines
            lines += item.counted
            added += item.added
            records += item.records
            line_records |= item.line_records
            chunk = str(self.spill / f"chunk-{item.index}")
            for key_range, (start, length) in enumerate(item.spans):
                spans[key_range].append((chunk, start, length))
            if bar is not None:
                bar.update(item.done, lines)
        if problems:
            raise SnapshotError(problems, more)
        if bar is not None:
            bar.finish(lines)
        return spans, line_records, LoadReport(lines, added, 0), records
