"""The bulk build's columnar parse (``bulk_worker``): a chunk of a snapshot into identity keys
and their ``members`` values with no Python run per line or per membership.

polars splits the chunk into fields (key, segments, expires); the segment lists are cut into
one array of names by their commas (numpy, on the column's own buffer: no copy) and
dictionary-encoded against the interned names in one ``index_in`` (pyarrow); values are laid
end to end by one ``take`` from per-id and per-head encodings, as ``store.value_int`` and
``store.value_header`` write them (the layout stays the store's). Lines this cannot take as
they are (a removal, a key to normalise, a segment twice, anything wrong) are handed back
by index to the line-by-line parser, which applies the loader's own rules and errors; a chunk
polars refuses (a line of four fields, invalid UTF-8, an empty field) goes to it whole.

Imported by the pool workers only, after the fork: polars must not be forked once started.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from enrich_server.keys import MAX_KEY_BYTES
from enrich_server.snapshot import segment_name_problem
from enrich_server.store import value_header, value_int

_MAX_EXPIRES: Final = 2**32 - 1
_SCHEMA: Final = {"key": pl.String, "segments": pl.String, "expires": pl.String}
#: Keys already in normal form (``keys.parse_key`` returns them as they are); anything else
#: (upper case, non-ASCII, odd eid sources) is left to the line parser.
_PLAIN_KEY: Final = (
    r"^(?s:(?:uid|bundle|gpid):.+|(?:ifa|domain):[\x00-\x40\x5b-\x7f]+|eid:[a-z0-9._-]+:.+)$"
)
_COMMA: Final = ord(",")
_TAB: Final = ord("\t")
_NEWLINE: Final = ord("\n")
_NOTHING: Final = pa.scalar(b"", pa.large_binary())
_OLDEST: Final = pl.CompatLevel.oldest()  # plain large_string arrays: offsets and one buffer

Indices = npt.NDArray[np.int64]


class Segments:
    """The interned segments as the parse looks them up: each name twice in ``lookup``, as
    the last name of a list and followed by its comma (a name's slice of the list keeps the
    comma after it), ``ids`` giving the id of each entry; ``encoded`` the value bytes of
    each id."""

    def __init__(self) -> None:
        self._names: dict[str, int] = {}
        self.lookup = pa.array([], pa.large_binary())
        self.ids: npt.NDArray[np.uint32] = np.zeros(0, np.uint32)
        self.encoded = pa.array([value_int(0)], pa.large_binary())

    def add(self, names: list[str], ids: list[int]) -> None:
        """Learn interned segments (valid names only)."""
        self._names.update(zip(names, ids, strict=True))
        # As bytes: ``index_in`` hashes binary a third faster than strings.
        self.lookup = pa.array(
            [n.encode() for n in self._names] + [f"{n},".encode() for n in self._names],
            pa.large_binary(),
        )
        self.ids = np.array([*self._names.values()] * 2, np.uint32)
        top = max(self._names.values(), default=0)
        if top >= len(self.encoded):
            self.encoded = pa.array([value_int(sid) for sid in range(top + 1)], pa.large_binary())

    def __contains__(self, name: str) -> bool:
        return name in self._names


@dataclass(frozen=True, slots=True)
class Columns:
    """What the parse made of a chunk."""

    keys: pa.LargeBinaryArray
    values: pa.LargeBinaryArray
    rows: Indices
    """Line (0-based, within the chunk) of each key, increasing."""
    declined: Indices
    """Lines for the line parser, increasing."""
    lines: int
    skipped: int
    """Blank lines and comments."""


def parse(
    data: bytes, segments: Segments, intern: Callable[[list[str]], list[int]]
) -> Columns | None:
    """Parse ``data`` (whole lines); ``None`` when the chunk is for the line parser whole.
    New valid segment names are interned through ``intern`` (names -> ids)."""
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n")
        if b"\r" in data:
            return None
    raw = np.frombuffer(data, np.uint8)
    tabs = np.flatnonzero(raw == _TAB)
    if len(tabs) and (
        tabs[-1] == len(raw) - 1 or (raw[tabs[tabs < len(raw) - 1] + 1] == _NEWLINE).any()
    ):
        return None  # an empty last field, which polars reads as a missing one
    try:
        frame = pl.read_csv(
            data,
            separator="\t",
            has_header=False,
            quote_char=None,
            schema=_SCHEMA,
            missing_columns="insert",
        )
    except pl.exceptions.PolarsError:
        return None
    lines = int(np.count_nonzero(raw == _NEWLINE)) + (bool(data) and not data.endswith(b"\n"))
    if frame.height != lines:
        return None
    key, names, expires = pl.col("key"), pl.col("segments"), pl.col("expires")
    flags = frame.select(
        skip=(key.is_null() & names.is_null()) | key.str.starts_with("#").fill_null(False),
        take=(
            key.str.contains(_PLAIN_KEY)
            & (key.str.len_bytes() <= MAX_KEY_BYTES)
            & ~names.str.ends_with(",")
            & (names.str.len_bytes() > 0)  # never read as "" (null), but _tokens needs it
            & (
                expires.is_null()
                | (
                    expires.str.contains(r"^[0-9]{1,10}$")
                    & (expires.cast(pl.UInt64, strict=False) <= _MAX_EXPIRES)
                )
            )
        ).fill_null(False),
    )
    skip = flags["skip"].to_numpy()
    take = flags["take"].to_numpy() & ~skip
    rows = np.flatnonzero(take)
    chosen = frame.filter(pl.Series(take))
    lists = chosen["segments"].to_arrow(compat_level=_OLDEST)
    starts, tokens = _tokens(lists)
    counts = np.diff(starts)
    found = pc.index_in(tokens, value_set=segments.lookup)
    if found.null_count:
        _learn(tokens.filter(found.is_null()), segments, intern)
        found = pc.index_in(tokens, value_set=segments.lookup)
    line_of = np.repeat(np.arange(len(rows), dtype=np.int64), counts)
    unknown = found.is_null().to_numpy(zero_copy_only=False)
    # Unknown names get id 0 (never a real one): their lines are refused below.
    ids = np.append(segments.ids, np.uint32(0))[found.fill_null(len(segments.ids)).to_numpy()]
    # A line naming a segment twice (rare) is left to the line parser, which keeps the first.
    twice = _repeated(line_of, ids, len(rows))
    refused = np.zeros(len(rows), np.bool_)
    refused[line_of[unknown]] = True
    refused[twice] = True
    when = chosen["expires"].cast(pl.UInt32).fill_null(0).to_numpy()
    values = _values(starts, counts, ids, when, segments)
    kept = ~refused
    keys = pc.cast(chosen["key"].to_arrow(compat_level=_OLDEST), pa.large_binary())
    declined = np.sort(np.concatenate([np.flatnonzero(~take & ~skip), rows[refused]]))
    if refused.any():
        mask = pa.array(kept)
        keys, values = keys.filter(mask), values.filter(mask)
    return Columns(keys, values, rows[kept], declined, lines, int(skip.sum()))


def _repeated(line_of: Indices, ids: npt.NDArray[np.uint32], lines: int) -> Indices:
    """Lines naming a segment twice: (line, id) pairs sorted, equal neighbours (in 32 bits
    when they fit: sorting them is twice as fast as 64)."""
    id_bits = max(int(ids.max(initial=0)).bit_length(), 1)
    twice: Indices
    if id_bits + max(lines.bit_length(), 1) <= 32:
        small = np.sort((line_of.astype(np.uint32) << np.uint32(id_bits)) | ids)
        twice = (small[1:][small[1:] == small[:-1]] >> np.uint32(id_bits)).astype(np.int64)
    else:
        pairs = np.sort((line_of.astype(np.uint64) << np.uint64(32)) | ids)
        twice = (pairs[1:][pairs[1:] == pairs[:-1]] >> np.uint64(32)).astype(np.int64)
    return twice


def _tokens(lists: pa.LargeStringArray) -> tuple[Indices, pa.LargeBinaryArray]:
    """Where each line's names start in ``tokens`` (and where the last ends), and the names:
    each one the slice of the column's buffer up to the next name, its comma included."""
    _, offsets_buffer, data_buffer = lists.buffers()
    count = len(lists)
    offsets = np.frombuffer(offsets_buffer, np.int64, count + 1, lists.offset * 8)
    base = int(offsets[0])
    text = np.frombuffer(data_buffer, np.uint8, int(offsets[-1]) - base, base)
    # A name starts after each comma and at each line's start (never right after a comma:
    # the parse took no list ending with one), and the last ends where the text does.
    cut = np.empty(len(text) + 1, np.bool_)
    np.equal(text, _COMMA, out=cut[1:])
    cut[offsets - base] = True
    bounds = np.flatnonzero(cut)
    bounds += base
    tokens = pa.Array.from_buffers(
        pa.large_binary(), len(bounds) - 1, [None, pa.py_buffer(bounds), data_buffer]
    )
    return np.searchsorted(bounds, offsets), tokens


def _learn(
    unknown: pa.LargeBinaryArray, segments: Segments, intern: Callable[[list[str]], list[int]]
) -> None:
    """Intern the new valid names among ``unknown`` names (removals and bad names stay
    unknown: their lines go to the line parser)."""
    names = dict.fromkeys(
        name.decode().removesuffix(",") for name in pc.unique(unknown).to_pylist()
    )
    new = [n for n in names if n not in segments and segment_name_problem(n) is None]
    if new:
        segments.add(new, intern(new))


def _values(
    starts: Indices,
    counts: Indices,
    ids: npt.NDArray[np.uint32],
    expires: npt.NDArray[np.uint32],
    segments: Segments,
) -> pa.LargeBinaryArray:
    """``members`` values of lines of one expiry each: a head (header of count + 2 items,
    expires, count), then the ids. One ``take`` lays every line's pieces end to end from a
    table of encodings (the ids', then each (count, expiry) pair's head), so that each
    value is already a contiguous slice of its data: the values are made of its offsets."""
    # The (count, expiry) pairs: few, found by one hash pass (a sort is 5x slower).
    pairs = pc.dictionary_encode(pa.array((counts.astype(np.uint64) << 32) | expires))
    heads = [
        value_header((pair >> 32) + 2) + value_int(pair & _MAX_EXPIRES) + value_int(pair >> 32)
        for pair in pairs.dictionary.to_pylist()
    ]
    table = pa.concat_arrays([segments.encoded, pa.array(heads, pa.large_binary())])
    lines = len(counts)
    # Line i's head goes before its ids: at starts[i] + i, its ids shifted by i + 1.
    head_at = starts[:-1] + np.arange(lines)
    pieces = np.empty(len(ids) + lines, np.int64)
    pieces[head_at] = pairs.indices.to_numpy() + len(segments.encoded)
    is_id = np.ones(len(pieces), np.bool_)
    is_id[head_at] = False
    pieces[is_id] = ids
    laid = table.take(pa.array(pieces))
    _, offsets, data = laid.buffers()
    bounds = np.frombuffer(offsets, np.int64, len(pieces) + 1, laid.offset * 8)
    ends = np.append(head_at, len(pieces))
    values = pa.Array.from_buffers(
        pa.large_binary(), lines, [None, pa.py_buffer(np.ascontiguousarray(bounds[ends])), data]
    )
    assert isinstance(values, pa.LargeBinaryArray)
    return values


class Bounds:
    """Keys cutting the build into key ranges (sorted)."""

    def __init__(self, bounds: list[bytes]) -> None:
        self._bounds = pl.Series(bounds, dtype=pl.Binary)

    def ranges(self, keys: pa.LargeBinaryArray) -> npt.NDArray[np.int64]:
        """The key range of each key: how many bounds are at or below it."""
        found = self._bounds.search_sorted(pl.Series(keys), side="right")
        assert isinstance(found, pl.Series)
        where: npt.NDArray[np.int64] = found.to_numpy().astype(np.int64)
        return where
