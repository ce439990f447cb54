"""The worker side of the bulk build (``bulk``): each pool process parses chunks of the
snapshots into records spilled by key range, then sorts and merges key ranges.

A chunk is parsed column by column (``columnar``), the lines that cannot be taken as they
are one by one with ``snapshot.parse_line``. A record is a key and either a ``members``
value (a line that only adds, encoded at once) or, starting with ``LINE_RECORD``, the line
itself (``[expires, [added], [removed]]`` by name), merged when its key range is sorted, once
every segment of the build is interned. Records travel as Arrow IPC messages in files of the
build directory: a chunk's file holds one per key range, a sorted range's file one.
"""

from __future__ import annotations

import gc
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

import lmdb
import msgspec
import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc

from enrich_server.snapshot import MAX_REPORTED_PROBLEMS, parse_line, segment_name_problem
from enrich_server.store import (
    Tables,
    decode_memberships,
    encode_memberships,
    open_environment,
    pack_segment_id,
    unpack_segment_id,
)

#: msgpack's never-used byte: starts a record that is a line with removals, not a value.
LINE_RECORD: Final = b"\xc1"
#: The schema of every record batch of the build.
RECORDS: Final = pa.schema([("key", pa.large_binary()), ("value", pa.large_binary())])
_EMPTY: Final = pa.array([], pa.large_binary())
_ENCODER: Final = msgspec.msgpack.Encoder()
_LINE: Final = msgspec.msgpack.Decoder(tuple[int, list[str], list[str]])

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of one snapshot, cut at a line end."""

    index: int
    file: int
    path: str
    start: int
    length: int
    done: int
    data: bytes | None = None
    """The chunk itself when it comes from a gzip file; otherwise read from ``path``."""


@dataclass(slots=True)
class Parsed:
    """What a worker made of a chunk."""

    index: int
    file: int
    done: int
    """Input bytes read once this chunk is done (for progress)."""
    lines: int
    """Lines in the chunk, blank and comments included (for line numbers)."""
    counted: int = 0
    """Lines that are neither blank nor comments."""
    added: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)
    more: int = 0
    rows: list[int] = field(default_factory=list)
    """Records spilled of each key range."""
    spans: list[tuple[int, int]] = field(default_factory=list)
    """Where each key range's records are in the chunk's file (offset, length)."""
    line_records: set[int] = field(default_factory=set)
    """Key ranges holding records of lines with removals."""
    records: int = 0


@dataclass(frozen=True, slots=True)
class Sorted:
    """A key range sorted and merged, in its file."""

    path: str
    identities: int
    removed: int


class Worker:
    """Per-process state of a pool worker (set once by ``start``)."""

    def __init__(self, build: Path, bounds: list[bytes], spill: Path, map_size: int) -> None:
        gc.disable()  # parsing allocates millions of short-lived containers, never a cycle
        # Imported here, in the forked worker: polars must not be forked once started, and
        # one thread each is what the pool's one worker per core wants.
        os.environ["POLARS_MAX_THREADS"] = "1"
        from enrich_server import columnar  # noqa: PLC0415

        pa.set_cpu_count(1)
        self.columnar = columnar
        self.bounds = columnar.Bounds(bounds)
        self.ranges = len(bounds) + 1
        self.spill = spill
        # No sync per commit: the builder syncs the whole file once before publishing.
        self.env = open_environment(build, map_size=map_size, sync=False)
        self.ids_db = self.env.open_db(Tables.SEGMENT_IDS, create=False)
        self.names_db = self.env.open_db(Tables.SEGMENT_NAMES, create=False)
        self.segments = columnar.Segments()
        self.interned: dict[str, int] = {}
        """Segment name -> id, for the line parser (valid names only)."""
        with self.env.begin() as txn:
            for name, packed in txn.cursor(db=self.ids_db):
                text = bytes(name).decode()
                if segment_name_problem(text) is None:  # not interned by laxer rules
                    self.interned[text] = unpack_segment_id(packed)
        self.segments.add(list(self.interned), list(self.interned.values()))

    def intern(self, names: list[str]) -> list[int]:
        """The ids of segments ``names``, the new ones interned in the build (in one
        transaction: each commit leaves pages behind)."""
        new = [name for name in dict.fromkeys(names) if name not in self.interned]
        if new:
            sids = write_txn(
                self.env,
                lambda txn: [intern_segment(txn, self.ids_db, self.names_db, n) for n in new],
            )
            self.interned.update(zip(new, sids, strict=True))
        return [self.interned[name] for name in names]

    def segment_ids(self, names: list[str]) -> list[int | None]:
        """Ids of ``names`` as interned in the build (``None`` for unknown names)."""
        try:
            txn = self.env.begin(db=self.ids_db)
        except lmdb.MapResizedError:  # the builder grew the map: adopt it
            self.env.set_mapsize(0)
            txn = self.env.begin(db=self.ids_db)
        with txn:
            found = [txn.get(name.encode()) for name in names]
        return [unpack_segment_id(raw) if raw is not None else None for raw in found]

    def parse(self, chunk: Chunk) -> Parsed:
        """Parse a chunk and spill its records by key range."""
        data = chunk.data if chunk.data is not None else _read_span(chunk)
        columns = self.columnar.parse(data, self.segments, self._learn)
        if columns is None:  # the whole chunk line by line
            lines = _lines_of(data)
            parsed = Parsed(chunk.index, chunk.file, chunk.done, len(lines))
            numbers = list(range(len(lines)))
            keys: pa.LargeBinaryArray = _EMPTY
            values: pa.LargeBinaryArray = keys
            rows = np.zeros(0, np.int64)
        else:
            lines = _lines_of(data) if len(columns.declined) else []
            parsed = Parsed(chunk.index, chunk.file, chunk.done, columns.lines)
            parsed.counted = parsed.added = len(columns.keys)
            numbers = columns.declined.tolist()
            keys, values, rows = columns.keys, columns.values, columns.rows
        slow_keys: list[bytes] = []
        slow_values: list[bytes] = []
        slow_rows: list[int] = []
        for number in numbers:
            record = self._slow(number + 1, lines[number], parsed)
            if record is not None:
                slow_keys.append(record[0])
                slow_values.append(record[1])
                slow_rows.append(number)
        if parsed.problems:
            return parsed
        if slow_keys:  # back in input order: the sort keeps it for lines of one key
            keys = pa.concat_arrays([keys, pa.array(slow_keys, pa.large_binary())])
            values = pa.concat_arrays([values, pa.array(slow_values, pa.large_binary())])
            order = pa.array(np.argsort(np.append(rows, slow_rows), kind="stable"))
            keys, values = keys.take(order), values.take(order)
        where = self.bounds.ranges(keys)
        if any(value[:1] == LINE_RECORD for value in slow_values):
            parsed.line_records = {int(r) for r in np.unique(where[_line_records(values)])}
        order = pc.sort_indices(pa.array(where))  # stable; 10x numpy's on int64
        parsed.rows = np.bincount(where, minlength=self.ranges).tolist()
        parsed.records = len(keys)
        parsed.spans = write_spill(
            self.spill / f"chunk-{chunk.index}",
            _batches(keys.take(order), values.take(order), parsed.rows),
        )
        return parsed

    def _learn(self, names: list[str]) -> list[int]:
        """``intern`` for the columnar parse, which also learns the names."""
        return self.intern(names)

    def _slow(
        self, number: int, line: str | ValueError, parsed: Parsed
    ) -> tuple[bytes, bytes] | None:
        """Any line the columnar parse declined: exactly what the transactional loader does."""
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
        ids = self.intern(snapshot_line.add)
        if snapshot_line.remove:
            record = (snapshot_line.expires, snapshot_line.add, snapshot_line.remove)
            return snapshot_line.key, LINE_RECORD + _ENCODER.encode(record)
        return snapshot_line.key, encode_memberships(dict.fromkeys(ids, snapshot_line.expires))

    def sort(self, key_range: int, spans: list[tuple[str, int, int]], lines: bool) -> Sorted:
        """Sort one key range of every chunk (in input order) and merge each key's lines."""
        batches = [read_spill(*span) for span in spans]
        keys = pa.concat_arrays([_EMPTY, *(batch.column(0) for batch in batches)])
        values = pa.concat_arrays([_EMPTY, *(batch.column(1) for batch in batches)])
        order = pc.sort_indices(keys)  # stable: input order for lines of one key
        keys, values = keys.take(order), values.take(order)
        merging = np.zeros(len(keys), np.bool_)
        if len(keys) > 1:
            same = pc.equal(keys[1:], keys[:-1]).to_numpy(zero_copy_only=False)
            merging[1:] |= same
            merging[:-1] |= same
        if lines:
            merging |= _line_records(values)
        removed = 0
        if merging.any():
            group = pa.array(merging)
            pairs = list(
                zip(keys.filter(group).to_pylist(), values.filter(group).to_pylist(), strict=True)
            )
            merged, removed = self._merge(pairs)
            kept = pa.array(~merging)
            keys = pa.concat_arrays(
                [keys.filter(kept), pa.array([k for k, _ in merged], pa.large_binary())]
            )
            values = pa.concat_arrays(
                [values.filter(kept), pa.array([v for _, v in merged], pa.large_binary())]
            )
            order = pc.sort_indices(keys)
            keys, values = keys.take(order), values.take(order)
        path = self.spill / f"range-{key_range}"
        write_spill(path, [pa.record_batch([keys, values], RECORDS)])
        return Sorted(str(path), len(keys), removed)

    def _merge(self, pairs: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], int]:
        merged: list[tuple[bytes, bytes]] = []
        removed = 0
        for key, group in itertools.groupby(pairs, key=lambda pair: pair[0]):
            memberships: dict[int, int] = {}
            for _, value in group:
                if value[:1] != LINE_RECORD:
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


def _batches(
    keys: pa.LargeBinaryArray, values: pa.LargeBinaryArray, rows: list[int]
) -> list[pa.RecordBatch]:
    """Records sorted by key range cut into one record batch per range (slices, no copy)."""
    out: list[pa.RecordBatch] = []
    start = 0
    for count in rows:
        # An empty slice would be written with the whole offsets buffer: a fresh one is not.
        part = [keys.slice(start, count), values.slice(start, count)] if count else [_EMPTY] * 2
        out.append(pa.record_batch(part, RECORDS))
        start += count
    return out


def _line_records(values: pa.LargeBinaryArray) -> npt.NDArray[np.bool_]:
    """Which of ``values`` are line records (``LINE_RECORD`` first; a value is never empty)."""
    if not len(values):
        return np.zeros(0, np.bool_)
    _, offsets, data = values.buffers()
    starts = np.frombuffer(offsets, np.int64, len(values), values.offset * 8)
    first: npt.NDArray[np.bool_] = np.frombuffer(data, np.uint8)[starts] == LINE_RECORD[0]
    return first


def write_txn(env: lmdb.Environment, work: Callable[[lmdb.Transaction[bytes]], T]) -> T:
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


def intern_segment(
    txn: lmdb.Transaction[bytes], ids_db: lmdb._Database, names_db: lmdb._Database, name: str
) -> int:
    """Segment ``name``'s id, made the next one when new (as ``StoreWriter.intern`` does;
    the workers' write transactions are serialised by LMDB)."""
    raw_name = name.encode()
    packed = txn.get(raw_name, db=ids_db)
    if packed is None:
        packed = pack_segment_id(txn.stat(names_db)["entries"] + 1)
        txn.put(raw_name, packed, db=ids_db)
        txn.put(packed, raw_name, db=names_db)
    return unpack_segment_id(packed)


def write_spill(path: Path, batches: list[pa.RecordBatch]) -> list[tuple[int, int]]:
    """Write a temporary file of the build, one Arrow IPC message per batch (their schema
    is always ``RECORDS``: a stream per batch, schema and all, took twice as long for a
    chunk's hundreds of key ranges), and return where each is (offset, length): the one
    seam where the build's own files reach the disk (tests inject a full disk here when
    they cannot mount a small one)."""
    spans: list[tuple[int, int]] = []
    with pa.OSFile(str(path), "wb") as out:
        for batch in batches:
            start = out.tell()
            out.write(batch.serialize())
            spans.append((start, out.tell() - start))
    return spans


def read_spill(path: str, start: int, length: int) -> pa.RecordBatch:
    """The batch ``write_spill`` put at ``start`` (read, not mapped: a map would keep every
    page read in the process's memory)."""
    with pa.OSFile(path) as source:
        source.seek(start)
        data = source.read(length)
    return pa.ipc.read_record_batch(data, RECORDS)


_worker: Worker | None = None


def start(build: Path, bounds: list[bytes], spill: Path, map_size: int) -> None:
    """Pool initializer: the process's ``Worker``."""
    global _worker  # one per pool process, set once
    _worker = Worker(build, bounds, spill, map_size)


def parse(chunk: Chunk) -> Parsed:
    """Pool task: ``Worker.parse``."""
    assert _worker is not None
    return _worker.parse(chunk)


def sort(job: tuple[int, list[tuple[str, int, int]], bool]) -> Sorted:
    """Pool task: ``Worker.sort``."""
    assert _worker is not None
    return _worker.sort(*job)


def _lines_of(data: bytes) -> list[str] | list[str | ValueError]:
    try:
        return _split(data.decode())
    except UnicodeDecodeError:
        return _split_slowly(data)


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


def _read_span(chunk: Chunk) -> bytes:
    with open(chunk.path, "rb") as source:
        source.seek(chunk.start)
        return source.read(chunk.length)
