"""The worker side of the bulk build (``bulk``): each pool process parses chunks of the
snapshots into records spilled by key range, then sorts and merges key ranges.

A record is a key and either a ``members`` value (a line that only adds, encoded at once) or,
starting with ``LINE_RECORD``, the line itself (``[expires, [added], [removed]]`` by name),
merged when its key range is sorted, once every segment of the build is interned.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Final, TypeVar

import lmdb
import msgspec

from enrich_server.keys import MAX_KEY_BYTES
from enrich_server.snapshot import MAX_REPORTED_PROBLEMS, parse_line
from enrich_server.store import (
    _MAX_DBS,
    _SEGMENT_ID,
    _SEGMENT_IDS,
    _SEGMENT_NAMES,
    decode_memberships,
    encode_memberships,
)
from enrich_server.store import _VALUE_ENCODER as VALUE_ENCODER

_MAX_EXPIRES: Final = 2**32 - 1
#: Keys already in normal form (``keys.parse_key`` would return them as they are); anything
#: else (upper case, non-ASCII, odd eid sources) takes the exact slow path.
_PLAIN_KEY: Final = re.compile(
    r"(?:uid|bundle|gpid):.+|(?:ifa|domain):[\x00-\x40\x5b-\x7f]+|eid:[a-z0-9._-]+:.+", re.DOTALL
)
#: msgpack's never-used byte: starts a record that is a line with removals, not a value.
LINE_RECORD: Final = b"\xc1"
_RECORDS: Final = msgspec.msgpack.Decoder(tuple[list[bytes], list[bytes]])
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
class Sorted:
    """A key range sorted and merged, in its file."""

    path: str
    identities: int
    removed: int


class Worker:
    """Per-process state of a pool worker (set once by ``start``)."""

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
        self.prefixes: dict[str, dict[int, bytes]] = {}
        """Value headers by expiry (as written) and segment count."""
        with self.env.begin() as txn:
            for name, packed in txn.cursor(db=self.ids_db):
                text = bytes(name).decode()
                with contextlib.suppress(ValueError):  # interned by older, laxer rules
                    parse_line(f"uid:x\t{text}")
                    self.encoded[text] = VALUE_ENCODER.encode(_SEGMENT_ID.unpack(packed)[0])

    def intern(self, names: list[str]) -> list[bytes]:
        """The msgpack ids of segments ``names``, the new ones interned in the build (in one
        transaction: each commit leaves pages behind)."""
        new = [name for name in dict.fromkeys(names) if name not in self.encoded]
        if new:
            sids = write_txn(
                self.env,
                lambda txn: [intern_segment(txn, self.ids_db, self.names_db, n) for n in new],
            )
            for name, sid in zip(new, sids, strict=True):
                self.encoded[name] = VALUE_ENCODER.encode(sid)
        return [self.encoded[name] for name in names]

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
        """A ``members`` value for segments ``ids`` (msgpack ids) with ``expires`` (digits,
        or empty for never): byte for byte what ``store.encode_memberships`` makes of a line."""
        if len(ids) > 1 and len(set(ids)) != len(ids):
            ids = list(dict.fromkeys(ids))
        by_count = self.prefixes.get(expires)
        if by_count is None:
            by_count = self.prefixes[expires] = {}
        prefix = by_count.get(len(ids))
        if prefix is None:
            count = len(ids)
            # Header of an array of count + 2 items, then expires and count; ids follow.
            whole = VALUE_ENCODER.encode([int(expires or 0), count, *([0] * count)])
            prefix = by_count[count] = whole[: len(whole) - count]
        return prefix + b"".join(ids)

    def parse(self, chunk: Chunk) -> Parsed:
        """Parse a chunk and spill its records by key range."""
        data = chunk.data if chunk.data is not None else _read_span(chunk)
        try:
            lines: list[str] | list[str | ValueError] = _split(data.decode())
        except UnicodeDecodeError:
            lines = _split_slowly(data)
        ranges = len(self.bounds) + 1
        keys: list[list[bytes]] = [[] for _ in range(ranges)]
        values: list[list[bytes]] = [[] for _ in range(ranges)]
        parsed = Parsed(chunk.index, chunk.file, chunk.done, len(lines), 0)
        # The loop below runs once per line of the input: locals only, no calls it can spare.
        encoded = self.encoded
        plain_key = _PLAIN_KEY.fullmatch
        where = bisect.bisect_right
        bounds = self.bounds
        value = self.value
        fast = 0
        for number, line in enumerate(lines, start=1):
            if isinstance(line, str) and not parsed.problems:
                if not line or line[0] == "#":
                    continue
                key, _, rest = line.partition("\t")
                segments, _, expires = rest.partition("\t")
                if ((key[:4] == "uid:" and len(key) > 4) or plain_key(key) is not None) and (
                    not expires or (expires.isdigit() and int(expires) <= _MAX_EXPIRES)
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
                            values[where_to].append(value(ids, expires))
                            fast += 1
                            continue
            record = self._slow(number, line, parsed)
            if record is not None:
                where_to = where(bounds, record[0])
                keys[where_to].append(record[0])
                values[where_to].append(record[1])
                if record[1][:1] == LINE_RECORD:
                    parsed.line_records.add(where_to)
        parsed.counted += fast
        parsed.added += fast
        if not parsed.problems:
            parsed.records = sum(map(len, keys))
            blobs = [VALUE_ENCODER.encode(pair) for pair in zip(keys, values, strict=True)]
            offsets = itertools.accumulate(map(len, blobs), initial=0)
            parsed.spans = [(start, len(blob)) for start, blob in zip(offsets, blobs, strict=False)]
            write_spill(self.spill / f"chunk-{chunk.index}", blobs)
        return parsed

    def _slow(
        self, number: int, line: str | ValueError, parsed: Parsed
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
        ids = self.intern(snapshot_line.add)
        if snapshot_line.remove:
            record = (snapshot_line.expires, snapshot_line.add, snapshot_line.remove)
            return snapshot_line.key, LINE_RECORD + VALUE_ENCODER.encode(record)
        return snapshot_line.key, self.value(ids, str(snapshot_line.expires or ""))

    def sort(self, key_range: int, spans: list[tuple[str, int, int]], lines: bool) -> Sorted:
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
        write_spill(path, [VALUE_ENCODER.encode(pairs)])
        return Sorted(str(path), len(pairs), removed)

    def _merge(self, pairs: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], int]:
        merged: list[tuple[bytes, bytes]] = []
        removed = 0
        for key, group in itertools.groupby(pairs, key=itemgetter(0)):
            values = [value for _, value in group]
            if len(values) == 1 and values[0][:1] != LINE_RECORD:
                merged.append((key, values[0]))
                continue
            memberships: dict[int, int] = {}
            for value in values:
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
