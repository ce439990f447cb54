"""Bulk build: ``load --replace`` and a first load write a new store with sorted appends.

The pipeline runs in worker processes forked once (one per usable core):

1. parse: the snapshots are cut into chunks at line ends (gzip files are inflated here, by
   ISA-L's igzip, and handed over). A worker (``bulk_worker``) parses its chunk by column
   (``columnar``: polars for the fields, one pyarrow ``index_in`` mapping every segment name
   to its id, values put together by Arrow kernels), and hands the few lines that cannot be
   taken as they are to ``snapshot.parse_line``, so errors and semantics are the
   transactional loader's. New segment names are interned in the build environment itself
   (LMDB serialises the workers, ids stay dense). Records are bucketed by key range (bounds
   sampled from the input) into one file per chunk, an Arrow IPC message per range.
2. sort: a worker gathers one key range from every chunk's file, in input order, sorts it
   stably (Arrow) and merges the lines of one key as the loader would (a later expiry
   replaces an earlier one, ``-segment`` removes): only the keys that need it, in Python.
3. write: this process appends each sorted range to ``members`` (``putmulti(append=True)``)
   while the workers sort the next ones, committing once per range: the environment is
   private until published, and a full map is grown between commits.

Memory is bounded by the chunk and range sizes, never by the input; temporary files live in
the build directory, on the store's disk, and go with it whatever happens. A replace
publishes the result as the store's next generation (``generations``); a first build is
renamed into place as a plain store.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import functools
import multiprocessing
import multiprocessing.pool
import os
import shutil
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, TypeVar, cast

import lmdb
from isal import igzip, isal_zlib

from enrich_server import bulk_worker
from enrich_server.bulk_worker import Chunk, Parsed, Sorted, intern_segment, read_spill, write_txn
from enrich_server.errors import SnapshotError, StoreError
from enrich_server.generations import (
    BUILD_PREFIX,
    Lease,
    first_build_dir,
    publish,
    remove_unused,
)
from enrich_server.progress import Progress
from enrich_server.snapshot import MAX_REPORTED_PROBLEMS, LoadReport, parse_line
from enrich_server.store import (
    DATA_FILE,
    DEFAULT_MAP_SIZE,
    Meta,
    StoreWriter,
    Tables,
    open_environment,
    publish_with_dmp_state,
    store_dir,
)

#: Input bytes a worker parses at a time, at most (fewer when that leaves a worker idle).
CHUNK_BYTES: Final = 16 << 20
#: Input bytes per key range, the unit sorted in memory by one worker, at most: small enough
#: that a range's keys sort in the CPU's caches (4x faster than ten times as many).
RANGE_BYTES: Final = 6 << 20
#: Chunks and key ranges per worker, at least: enough that none waits long for the last one.
_PIECES_PER_WORKER: Final = 8
#: Free bytes under which a failed write is put down to a full disk.
_NEARLY_FULL: Final = 1 << 20
#: A build whose file is bigger than its pages in use times this is compacted.
_MOSTLY_USED: Final = 1.25
_SAMPLES_PER_RANGE: Final = 64
_GZIP_MAGIC: Final = b"\x1f\x8b"
#: What reading a damaged or truncated gzip file raises.
_CORRUPT: Final[tuple[type[BaseException], ...]] = (
    OSError,
    EOFError,
    zlib.error,
    cast(type[BaseException], isal_zlib.error),
)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Unreadable:
    file: int
    error: str


def _gunzip(raw: BinaryIO) -> BinaryIO:
    """``raw`` inflated by ISA-L (3x zlib's speed: the parent inflates for both workers)."""
    return cast(BinaryIO, igzip.GzipFile(fileobj=raw))  # type: ignore[no-untyped-call]


def _is_gzip(path: Path) -> bool:
    with path.open("rb") as source:
        return source.read(2) == _GZIP_MAGIC


def _chunks(paths: Sequence[Path], chunk_bytes: int) -> Iterator[Chunk | _Unreadable]:
    """The snapshots cut at line ends into chunks of about ``chunk_bytes``."""
    index = before = 0
    for number, path in enumerate(paths):
        size = path.stat().st_size
        if _is_gzip(path):
            try:
                with path.open("rb") as raw, _gunzip(raw) as source:
                    while data := source.read(chunk_bytes):
                        data += source.readline()
                        yield Chunk(index, number, str(path), 0, 0, before + raw.tell(), data)
                        index += 1
            except _CORRUPT as exc:
                yield _Unreadable(number, str(exc))
        else:
            start = 0
            with path.open("rb") as source:
                while start < size:
                    source.seek(min(start + chunk_bytes, size))
                    source.readline()
                    end = min(source.tell(), size)
                    yield Chunk(index, number, str(path), start, end - start, before + end)
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
            with contextlib.suppress(*_CORRUPT), path.open("rb") as file, _gunzip(file) as gz:
                raw_lines = [gz.readline() for _ in range(per_file)]
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


def _append(
    db: lmdb._Database, keys: Sequence[bytes], values: Sequence[bytes], txn: lmdb.Transaction[bytes]
) -> None:
    """Append sorted ``keys`` with their ``values`` after the keys ``db`` holds (no search,
    pages filled up)."""
    txn.cursor(db=db).putmulti(zip(keys, values, strict=True), append=True)


def _sorted_range(item: Sorted) -> tuple[Sequence[bytes], Sequence[bytes]]:
    """A sorted range's keys and values as bytes: made by Arrow in C++, one object each,
    the least ``putmulti`` takes (lists: iterated faster than numpy's object arrays)."""
    batch = read_spill(item.path, 0, os.path.getsize(item.path))
    return batch.column(0).to_pylist(), batch.column(1).to_pylist()


def _disk_full(exc: BaseException, building: Path) -> bool:
    """Whether ``exc`` comes of a full disk: ENOSPC, or any write error while the disk
    has (almost) no space left (LMDB reports a short write as a plain I/O error)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    if not isinstance(exc, OSError | lmdb.Error):
        return False
    try:
        return shutil.disk_usage(building).free < _NEARLY_FULL
    except OSError:
        return False


def _copy_store(live: Path | None, build: Path, map_size: int) -> None:
    """Create the build's databases as ``StoreWriter`` does and carry over everything of the
    live store but its memberships: segment ids (so ids and cached names stay valid), meta,
    and any other database (DMP registries, aliases)."""
    with StoreWriter(build, map_size=map_size):
        pass
    if live is None:
        return
    source = open_environment(live, map_size=0, readonly=True)
    target = open_environment(build, map_size=map_size, sync=False)
    try:
        with source.begin() as read, target.begin(write=True) as write:
            for name in [bytes(name) for name, _ in read.cursor()]:
                if name == Tables.MEMBERS:
                    continue  # the one thing a replace replaces (DMP pushes included)
                from_db = source.open_db(name, txn=read, create=False)
                to_db = target.open_db(name, txn=write, **from_db.flags())
                write.cursor(db=to_db).putmulti(read.cursor(db=from_db), dupdata=True)
            meta = target.open_db(Tables.META, txn=write, create=False)
            generation = int(write.get(Meta.GENERATION, b"0", db=meta)) + 1
            write.put(Meta.GENERATION, str(generation).encode(), db=meta)
    finally:
        source.close()
        target.close()


def build(
    paths: Sequence[Path],
    root: Path,
    progress: bool = True,
    workers: int | None = None,
    map_size: int = DEFAULT_MAP_SIZE,
    *,
    handoff: Callable[[Path], None] | None = None,
) -> LoadReport:
    """Build a store from snapshots at ``root``: a new generation of an existing store (the
    live one is replaced as a whole once the build is complete), or a new plain store.
    With ``handoff``, the finished build (its directory, segment ids following the live
    store's) goes to ``handoff`` instead, and is removed after: a replicated node publishes
    it to every node rather than swapping it in here.

    Raises ``SnapshotError`` listing bad lines (nothing published) and ``StoreError`` (disk
    full, unwritable), leaving the live store as it was and no partial files behind.
    """
    live = store_dir(root) if (store_dir(root) / DATA_FILE).is_file() else None
    if live is None:
        building = first_build_dir(root)
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
        _compact(building, map_size)
        if handoff is not None:
            handoff(building)
            shutil.rmtree(building, ignore_errors=True)
        elif live is None:
            if root.exists():
                root.rmdir()  # an empty directory the operator made for us
            building.rename(root)
        else:
            publish_with_dmp_state(live, building, map_size, lambda: publish(root, building))
            remove_unused(root)
        return report
    except BaseException as exc:
        full = _disk_full(exc, building)  # before the clean-up frees the space again
        if job is not None:
            job.close(failed=True)
        shutil.rmtree(building, ignore_errors=True)
        if full:
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
        pieces = workers * _PIECES_PER_WORKER
        self.chunk_bytes = min(CHUNK_BYTES, max(self.total // pieces, 1 << 20))
        bounds, segments = _sample(paths, max(pieces, -(-self.total // RANGE_BYTES)))
        self.ranges = len(bounds) + 1
        # The sample's segments interned up front spare the workers most first sightings
        # (each one a slow-path line and a write transaction).
        env = open_environment(building, map_size=map_size)
        try:
            ids_db = env.open_db(Tables.SEGMENT_IDS, create=False)
            names_db = env.open_db(Tables.SEGMENT_NAMES, create=False)
            write_txn(env, lambda txn: [intern_segment(txn, ids_db, names_db, n) for n in segments])
        finally:
            env.close()
        # Forked after the build environment was closed here (an LMDB environment must not
        # cross a fork); forking also starts the workers in milliseconds.
        self.pool: multiprocessing.pool.Pool | None = multiprocessing.get_context("fork").Pool(
            workers, bulk_worker.start, (building, bounds, self.spill, map_size)
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
        spills, line_records, report, records = self._parse(self.pool, progress)
        bar = Progress("write", records) if progress else None
        jobs = ((n, spills[n], n in line_records) for n in range(self.ranges))
        written = removed = 0
        env = open_environment(self.building, map_size=self.map_size, sync=False)
        try:
            members = env.open_db(Tables.MEMBERS, create=False)
            for item in _ordered(self.pool, bulk_worker.sort, jobs, self.workers + 1):
                assert isinstance(item, Sorted)
                keys, values = _sorted_range(item)
                os.unlink(item.path)
                write_txn(env, functools.partial(_append, members, keys, values))
                written += item.identities
                removed += item.removed
                if bar is not None:
                    bar.update(written, written)
            with env.begin(write=True) as txn:
                meta = env.open_db(Tables.META, txn=txn, create=False)
                now = str(int(time.time())).encode()
                txn.put(Meta.BUILT_AT, now, db=meta)
                txn.put(Meta.UPDATED_AT, now, db=meta)
            env.sync(True)
        finally:
            env.close()
        if bar is not None:
            bar.finish(written)
        return dataclasses.replace(report, memberships_removed=removed)

    def _parse(
        self, pool: multiprocessing.pool.Pool, progress: bool
    ) -> tuple[list[list[tuple[str, int, int]]], set[int], LoadReport, int]:
        """Phase 1: where the records of each key range are in the spills (in input order),
        ranges with line records, the report so far, records spilled. Raises
        ``SnapshotError`` on any bad line."""
        bar = Progress("load", self.total) if progress else None
        problems: list[str] = []
        more = lines = added = records = 0
        line_of_file = [0] * len(self.paths)
        spills: list[list[tuple[str, int, int]]] = [[] for _ in range(self.ranges)]
        line_records: set[int] = set()
        for item in _ordered(
            pool, bulk_worker.parse, _chunks(self.paths, self.chunk_bytes), 2 * self.workers
        ):
            if isinstance(item, _Unreadable):
                at = line_of_file[item.file] + 1
                problems.append(f"{self.paths[item.file]}:{at}: unreadable: {item.error}")
                continue
            assert isinstance(item, Parsed)
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
            for key_range, (rows, (start, length)) in enumerate(
                zip(item.rows, item.spans, strict=True)
            ):
                if rows:
                    spills[key_range].append((chunk, start, length))
            if bar is not None:
                bar.update(item.done, lines)
        if problems:
            raise SnapshotError(problems, more)
        if bar is not None:
            bar.finish(lines)
        return spills, line_records, LoadReport(lines, added, 0), records


def _compact(building: Path, map_size: int) -> None:
    """Rewrite the build without its free pages when they are many: the workers' small
    commits interning segments can leave megabytes behind, which weigh on a small store.
    Only this process has the environment open by now."""
    env = open_environment(building, map_size=map_size)
    try:
        with env.begin() as txn:
            stats = [
                txn.stat(env.open_db(bytes(name), txn=txn, create=False))
                for name, _ in txn.cursor()
            ]
        stats.append(env.stat())  # the main database, naming the others
        used = 2 + sum(s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"] for s in stats)
        if env.info()["last_pgno"] + 1 < used * _MOSTLY_USED:
            return
        compacted = building / "compacted"
        compacted.mkdir()
        env.copy(str(compacted), compact=True)
    finally:
        env.close()
    (compacted / DATA_FILE).replace(building / DATA_FILE)
    (building / "lock.mdb").unlink(missing_ok=True)  # of the file just replaced
    compacted.rmdir()
