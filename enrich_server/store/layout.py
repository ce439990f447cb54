"""The segment store's layout on LMDB: its tables, how values are encoded, how it is opened.

One LMDB environment, a directory holding ``data.mdb``; these named databases:

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
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any, Final

import lmdb
import msgspec

from enrich_server.errors import StoreError

FORMAT: Final = b"1"
DATA_FILE: Final = "data.mdb"
#: In a store with generations, the symlink naming the generation served (``generations``).
CURRENT_LINK: Final = "current"
MAX_DBS: Final = 8
#: Virtual address space reserved by a writer; the file only grows as pages are used.
DEFAULT_MAP_SIZE: Final = 1 << 36
#: Segment ids are stored as 4 bytes.
MAX_SEGMENT_ID: Final = 2**32 - 1

_SEGMENT_ID: Final = struct.Struct(">I")
_VALUE_ENCODER: Final = msgspec.msgpack.Encoder()
_VALUE_DECODER: Final = msgspec.msgpack.Decoder(list[int])
_DMP_SEGMENT_DECODER: Final = msgspec.msgpack.Decoder(tuple[int, str, int])

#: A ``members`` value as its flat list of integers, and back (``decode_memberships`` for a
#: dict); also the encoding of a ``dmp_segments`` record.
decode_value: Final = _VALUE_DECODER.decode
encode_value: Final = _VALUE_ENCODER.encode


class Tables:
    """The named databases of a store (the layout above)."""

    META: Final = b"meta"
    SEGMENT_IDS: Final = b"segment_ids"
    SEGMENT_NAMES: Final = b"segment_names"
    MEMBERS: Final = b"members"
    ALIASES: Final = b"aliases"
    DMP_SEGMENTS: Final = b"dmp_segments"
    DMP_TITLES: Final = b"dmp_titles"
    APPLIED_FILES: Final = b"applied_files"
    #: The tables a store has once written with DMP platforms configured.
    DMP: Final = (ALIASES, DMP_SEGMENTS, DMP_TITLES, APPLIED_FILES)
    #: The DMP tables ``SegmentStore`` reads.
    READ_DMP: Final = (ALIASES, DMP_SEGMENTS, APPLIED_FILES)


class Meta:
    """The keys of the ``meta`` table."""

    FORMAT: Final = b"format"
    BUILT_AT: Final = b"built_at"
    UPDATED_AT: Final = b"updated_at"
    GENERATION: Final = b"generation"
    APPLIED_SEQUENCE: Final = b"applied_sequence"
    SNAPSHOT: Final = b"snapshot"


def open_environment(
    directory: Path,
    map_size: int = DEFAULT_MAP_SIZE,
    readonly: bool = False,
    sync: bool = True,
    serving: bool = False,
) -> lmdb.Environment:
    """The LMDB environment of the store in ``directory`` (not a generational root): the one
    place a store is opened. ``serving``: a worker's, keeping one spare read transaction and
    no readahead (lookups are random reads)."""
    extra: dict[str, Any] = {"max_spare_txns": 1, "readahead": False} if serving else {}
    return lmdb.open(
        str(directory), map_size=map_size, readonly=readonly, sync=sync, max_dbs=MAX_DBS, **extra
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
    return _VALUE_ENCODER.encode(_grouped(memberships))


def decode_memberships(raw: bytes | memoryview) -> dict[int, int]:
    """Unpack a ``members`` value into ``{segment_id: expires}``."""
    return _by_segment(_VALUE_DECODER.decode(raw))


def _grouped(memberships: dict[int, int]) -> list[int]:
    groups: dict[int, list[int]] = {}
    for sid, expires in memberships.items():
        groups.setdefault(expires, []).append(sid)
    flat: list[int] = []
    for expires, sids in groups.items():
        flat.append(expires)
        flat.append(len(sids))
        flat.extend(sids)
    return flat


def _by_segment(flat: list[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    i = 0
    while i < len(flat):
        expires, count = flat[i], flat[i + 1]
        start = i + 2
        i = start + count
        for sid in flat[start:i]:
            out[sid] = expires
    return out


def add_to_value(flat: list[int], sid: int, expires: int) -> bool:
    """Make a decoded ``members`` value (``decode_value``) hold ``sid`` until ``expires``, in
    place; ``False`` when it already did (nothing to write). A new membership joins the group
    of its expiry, or a new group at the end; one that changes expiry goes through the dict
    (``encode_memberships``'s order), as ``StoreWriter.add`` would."""
    same_group = -1
    i = 0
    while i < len(flat):
        count = flat[i + 1]
        if sid in flat[i + 2 : i + 2 + count]:
            if flat[i] == expires:
                return False
            memberships = _by_segment(flat)
            memberships[sid] = expires
            flat[:] = _grouped(memberships)
            return True
        if flat[i] == expires:
            same_group = i
        i += 2 + count
    if same_group < 0:
        flat += (expires, 1, sid)
    else:
        end = same_group + 2 + flat[same_group + 1]
        flat.insert(end, sid)
        flat[same_group + 1] += 1
    return True


def remove_from_value(flat: list[int], sid: int) -> bool:
    """Take ``sid`` out of a decoded ``members`` value, in place (an empty one means the key
    goes); ``False`` when it was not a member."""
    memberships = _by_segment(flat)
    if memberships.pop(sid, None) is None:
        return False
    flat[:] = _grouped(memberships)
    return True


def store_dir(path: Path) -> Path:
    """The directory holding the environment of the store at ``path``: the generation that
    ``path/current`` names, or ``path`` itself (a plain store)."""
    try:
        return path / os.readlink(path / CURRENT_LINK)
    except OSError:
        return path


def map_size_for(directory: Path, least: int) -> int:
    """A writer's map: ``least``, or twice the file when bigger, so that one transaction can
    at least double the store before LMDB's map is full (readers adopt the grown map)."""
    try:
        size = os.path.getsize(directory / DATA_FILE)
    except OSError:
        return least
    return max(least, 2 * size)


def check_store_dir(path: Path) -> None:
    """Raise ``StoreError`` unless ``path`` holds a store's environment."""
    if not (path / DATA_FILE).is_file():
        raise StoreError(
            f"no segment store at {path} "
            f"(build one with: enrich-server load SNAPSHOT --store {path})"
        )


def decode_dmp_segment(raw: bytes) -> tuple[int, str, int]:
    """A ``dmp_segments`` record: ``(platform id, title, created unix seconds)``."""
    return _DMP_SEGMENT_DECODER.decode(raw)
