"""Snapshots: the operators' TSV files (plain or gzip), read line by line and loaded atomically.

Format, one identity a line (``#`` comments and blank lines are skipped)::

    <key>\\t<segment>[,<segment>...][\\t<expires_unix_seconds>]

A segment written ``-name`` removes that membership (deltas). ``expires`` 0 or absent means
the membership never expires. A delta load runs in one LMDB write transaction on the live
store: it completes, or (on any bad line, reported as ``file:line: why``) nothing of it is
applied. A replace, or a first load, is a bulk build of a new store beside the live one
(``bulk``), published only once complete; a failed one leaves nothing behind.
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from enrich_server.errors import SnapshotError
from enrich_server.keys import parse_key
from enrich_server.progress import Progress
from enrich_server.store import DATA_FILE, StoreWriter, store_dir

#: How many bad lines a failed load lists before summarising the rest.
MAX_REPORTED_PROBLEMS: Final = 20
#: Segment names are served to Index as JSON strings; keep them short and printable.
MAX_SEGMENT_BYTES: Final = 255
_MAX_EXPIRES: Final = 2**32 - 1
_GZIP_MAGIC: Final = b"\x1f\x8b"


@dataclass(frozen=True, slots=True)
class SnapshotLine:
    """One parsed snapshot line."""

    key: bytes
    add: list[str]
    remove: list[str]
    expires: int


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a successful load did."""

    lines: int
    identities_added: int
    memberships_removed: int


def segment_name_problem(name: str) -> str | None:
    """What keeps ``name`` from being a segment name (served to Index, written in
    snapshots), if anything: empty, too long, whitespace around it, control characters, a
    comma (the snapshot separator) or a leading ``-`` (a removal in snapshots)."""
    if not name:
        return "empty segment name"
    if name != name.strip():
        return f"segment name {name!r} has surrounding whitespace"
    if len(name.encode()) > MAX_SEGMENT_BYTES:
        return f"segment name longer than {MAX_SEGMENT_BYTES} bytes"
    if not name.isprintable():
        return f"segment name {name!r} has control characters"
    if "," in name or name.startswith("-"):
        return f"segment name {name!r} has a comma or starts with -"
    return None


def parse_line(line: str) -> SnapshotLine:
    """Parse one snapshot line; raises ``ValueError`` saying what is wrong."""
    fields = line.split("\t")
    if len(fields) not in (2, 3):
        raise ValueError(
            f"expected 2 or 3 tab-separated fields (key, segments[, expires]), found {len(fields)}"
        )
    key = parse_key(fields[0])
    add: list[str] = []
    remove: list[str] = []
    for written in fields[1].split(","):
        target, name = (remove, written[1:]) if written.startswith("-") else (add, written)
        problem = segment_name_problem(name)
        if problem:
            raise ValueError(problem)
        target.append(name)
    expires = 0
    if len(fields) == 3:
        text = fields[2]
        if not text.isascii() or not text.isdigit():
            raise ValueError(f"expires {text!r} is not a unix time in whole seconds")
        expires = int(text)
        if expires > _MAX_EXPIRES:
            raise ValueError(f"expires {text} is past {_MAX_EXPIRES}")
    return SnapshotLine(key, add, remove, expires)


def _open(path: Path) -> tuple[io.BufferedIOBase, io.BufferedReader]:
    """Open a snapshot; returns (line source, raw file for byte progress)."""
    raw = path.open("rb")
    if raw.read(2) == _GZIP_MAGIC:
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw), raw
    raw.seek(0)
    return raw, raw


def read_lines(path: Path) -> Iterator[tuple[int, str | ValueError, int]]:
    """Yield ``(line number, text or the decoding error, bytes read so far)`` of a snapshot.

    Comments and blank lines are skipped. Raises ``OSError``/``EOFError`` on an unreadable
    or truncated file (the caller knows the last line number).
    """
    source, raw = _open(path)
    with raw, source:
        for number, data in enumerate(source, start=1):
            try:
                text = data.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                yield number, ValueError(f"not valid UTF-8 ({exc.reason} at byte {exc.start})"), 0
                continue
            if text and not text.startswith("#"):
                yield number, text, raw.tell()


def load_snapshots(
    paths: Sequence[Path],
    store_path: Path,
    replace: bool = False,
    progress: bool = True,
    handoff: Callable[[Path], None] | None = None,
) -> LoadReport:
    """Apply snapshots to the store at ``store_path`` (created when missing), all or nothing.

    With ``replace``, or when there is no store yet, the snapshots are bulk-built into a new
    store that replaces the live one whole (``bulk.build``); otherwise they are a delta merged
    into the live store in one write transaction. Raises ``SnapshotError`` listing bad lines
    (nothing applied) and ``StoreError``. ``handoff``: see ``bulk.build`` (with ``replace``).
    """
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SnapshotError([f"{p}: no such file" for p in missing])
    if replace or not (store_dir(store_path) / DATA_FILE).exists():
        from enrich_server import bulk  # noqa: PLC0415  # bulk builds on this module's parser

        return bulk.build(paths, store_path, progress=progress, handoff=handoff)
    return _load(paths, store_path, progress)


def export_lines(items: Iterable[tuple[bytes, dict[str, int]]]) -> Iterator[str]:
    """Snapshot lines for a store's ``items()``: one line per key and expiry, so that
    loading them into an empty store rebuilds exactly the same memberships."""
    for key, memberships in items:
        groups: dict[int, list[str]] = {}
        for name, expires in memberships.items():
            groups.setdefault(expires, []).append(name)
        for expires, names in groups.items():
            tail = f"\t{expires}" if expires else ""
            yield f"{key.decode()}\t{','.join(names)}{tail}\n"


def _load(paths: Sequence[Path], store_path: Path, progress: bool) -> LoadReport:
    problems: list[str] = []
    more = 0
    lines = added = removed = 0
    done_before = 0
    total = sum(p.stat().st_size for p in paths)
    bar = Progress("load", total) if progress else None
    with StoreWriter(store_path) as writer:
        for path in paths:
            number = 0
            try:
                for number, text, done in read_lines(path):
                    lines += 1
                    try:
                        if isinstance(text, ValueError):
                            raise text
                        line = parse_line(text)
                    except ValueError as exc:
                        if len(problems) < MAX_REPORTED_PROBLEMS:
                            problems.append(f"{path}:{number}: {exc}")
                        else:
                            more += 1
                        continue
                    if problems:
                        continue  # keep validating, stop writing: nothing will be committed
                    if line.add:
                        writer.add(line.key, [writer.intern(n) for n in line.add], line.expires)
                        added += 1
                    if line.remove:
                        known = [writer.segment_id(n) for n in line.remove]
                        removed += writer.remove(line.key, [sid for sid in known if sid])
                    if bar is not None and done:
                        bar.update(done_before + done, lines)
            except (OSError, EOFError) as exc:
                problems.append(f"{path}:{number + 1}: unreadable: {exc}")
            done_before += path.stat().st_size
        if problems:
            raise SnapshotError(problems, more)
        if bar is not None:
            bar.finish(lines)
    return LoadReport(lines=lines, identities_added=added, memberships_removed=removed)
