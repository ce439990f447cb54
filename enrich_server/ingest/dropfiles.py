"""DMP drop files (the seed's deprecated "semi real-time" path, supported as an exception).

A file ``Mapp_dmp_<segmentId>_<year>_<month>_<day>_<hour>_<minute>.tsv.gz`` holds one user
id a line (our ``uid:`` namespace), optionally a tab and an op, ``add`` (default) or
``remove``. The segment must be a DMP segment created through the API; added users get
its platform's default TTL.

Each file is applied exactly once, whole, in one write transaction that also records its
name in the store (``applied_files``): a crash before the commit leaves nothing applied and
no record, so the next run applies it; after it, the record makes a re-run skip it. A bad
file (name, gzip, any bad line) is refused with every bad line's number and, in a watched
directory, moved to ``rejected/`` with the reasons beside it.

A file is validated into one log entry (``entries.DropFile``: its users, the expiry resolved
from the platform's ttl, the time it was made), which a single node applies at once in the
same transaction, and a replicated node publishes for every node to apply alike
(``replicated_dropfiles``).
"""

from __future__ import annotations

import datetime
import functools
import gzip
import hashlib
import logging
import re
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Final

from enrich_server.config import PlatformConfig
from enrich_server.errors import EnrichError, StoreError
from enrich_server.ingest import entries
from enrich_server.ingest.batches import ADD, MAX_LISTED_PROBLEMS, OPS, user_key
from enrich_server.ingest.entries import DropFile
from enrich_server.keys import UID
from enrich_server.store import StoreWriter

log = logging.getLogger(__name__)

FILE_NAME: Final = re.compile(
    r"Mapp_dmp_(?P<segment>[1-9][0-9]{0,9})_(?P<y>[0-9]{4})_(?P<m>[0-9]{1,2})_(?P<d>[0-9]{1,2})"
    r"_(?P<h>[0-9]{1,2})_(?P<min>[0-9]{1,2})\.tsv\.gz"
)
APPLIED_DIR: Final = "applied"
REJECTED_DIR: Final = "rejected"
#: A file younger than this may still be being written by the uploader: left for later.
DEFAULT_SETTLE_SECONDS: Final = 2.0


class DropFileError(EnrichError):
    """A drop file was refused, nothing of it applied; ``problems`` says why (with lines)."""

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        super().__init__(f"{path.name} refused, nothing applied:\n" + "\n".join(problems))


@dataclass(frozen=True, slots=True)
class FileResult:
    """What applying one drop file did."""

    name: str
    segment: int
    added: int
    removed: int
    skipped: bool
    """Already applied earlier: nothing done this time."""
    sequence: int = 0
    """The replication log entry it was published as (0: applied locally). Then ``added``
    and ``removed`` count its add and remove lines."""


def segment_of(name: str) -> int:
    """The segment id a drop file's name carries; raises ``ValueError`` for a bad name."""
    match = FILE_NAME.fullmatch(name)
    if match is None:
        raise ValueError(
            f"name {name!r} is not Mapp_dmp_<segmentId>_<year>_<month>_<day>_<hour>_<minute>.tsv.gz"
        )
    try:
        y, m, d, h, minute = (int(match[part]) for part in ("y", "m", "d", "h", "min"))
        datetime.datetime(y, m, d, h, minute)
    except ValueError as exc:
        raise ValueError(f"name {name!r} has an impossible date: {exc}") from None
    return int(match["segment"])


def read_mutations(path: Path) -> list[tuple[bytes, bool]]:
    """``(key, add)`` for each line of a drop file; raises ``DropFileError`` with every bad
    line's number (up to a bound) when anything is wrong."""
    problems: list[str] = []
    out: list[tuple[bytes, bool]] = []
    number = 0
    try:
        with gzip.open(path, "rb") as lines:
            for number, raw in enumerate(lines, start=1):
                text = raw.rstrip(b"\r\n")
                if not text:
                    continue
                try:
                    out.append(_parse(text))
                except ValueError as exc:
                    problems.append(f"{path.name}:{number}: {exc}")
    except (OSError, EOFError, zlib.error) as exc:
        problems.append(f"{path.name}:{number + 1}: not a readable gzip file: {exc}")
    if problems:
        more = len(problems) - MAX_LISTED_PROBLEMS
        listed = problems[:MAX_LISTED_PROBLEMS] + ([f"... and {more} more"] if more > 0 else [])
        raise DropFileError(path, listed)
    return out


def read_users(path: Path) -> list[tuple[bytes, bool]]:
    """A drop file's ``(key, add)`` in the order they are applied (by key; a user's lines in
    file order): the same on the node that validates it and on every node that re-reads it
    from the object store. Raises ``DropFileError``."""
    users = read_mutations(path)
    users.sort(key=itemgetter(0))  # in place, stable: a million lines are not held twice
    return users


def _parse(line: bytes) -> tuple[bytes, bool]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 ({exc.reason})") from None
    fields = text.split("\t")
    if len(fields) > 2:
        raise ValueError(f"expected a user id and an optional op, found {len(fields)} fields")
    op = fields[1] if len(fields) == 2 else ADD
    if op not in OPS:
        raise ValueError(f"op {op!r} is not {' or '.join(OPS)}")
    return user_key(fields[0], UID), op == ADD


def prepare(
    path: Path,
    applied: Callable[[str], bytes | None],
    owner: Callable[[int], int | None],
    platforms: Mapping[int, PlatformConfig],
    at_ms: int,
) -> DropFile | FileResult:
    """Validate drop file ``path`` against a store (``applied``: a name's record in
    ``applied_files``; ``owner``: the platform that created a DMP segment) into the log entry
    that applies it, made at ``at_ms`` (ms since epoch, which the expiries count from); a
    skipped ``FileResult`` when it was applied before. Raises ``DropFileError``."""
    name = path.name
    try:
        sid = segment_of(name)
    except ValueError as exc:
        raise DropFileError(path, [str(exc)]) from None
    with path.open("rb") as data:
        digest = hashlib.file_digest(data, "sha256").hexdigest()
    earlier = applied(name)
    if earlier is not None:
        record = entries.file_record(earlier)
        if record.get("sha256") == digest:
            return FileResult(name, sid, 0, 0, skipped=True)
        raise DropFileError(path, [entries.file_conflict(name, record)])
    platform = owner(sid)
    if platform is None:
        raise DropFileError(
            path, [f"segment {sid} is not a segment a DMP created (POST /v1/segment)"]
        )
    users = read_users(path)
    settings = platforms.get(platform)
    ttl = settings.ttl if settings is not None else 0
    expires = at_ms // 1000 + ttl if ttl else 0
    return DropFile(name, digest, sid, len(users), at_ms, expires, users)


def apply_file(
    path: Path,
    writer: StoreWriter,
    platforms: Mapping[int, PlatformConfig],
    now: int | None = None,
) -> FileResult:
    """Apply one drop file in ``writer``'s transaction, once; raises ``DropFileError``."""
    at_ms = time.time_ns() // 1_000_000 if now is None else now * 1000

    def owner(sid: int) -> int | None:
        segment = writer.dmp_segment(sid)
        return None if segment is None else segment[0]

    prepared = prepare(path, writer.applied_file, owner, platforms, at_ms)
    if isinstance(prepared, FileResult):
        return prepared
    added, removed = entries.apply(writer, prepared)  # checked above, in this transaction
    return FileResult(prepared.name, prepared.segment, added, removed, skipped=False)


def pending_files(directory: Path, settle: float, now: float | None = None) -> list[Path]:
    """Files of a drop directory ready to apply, oldest name-time first: regular files,
    not hidden, not ``.tmp``/``.part`` uploads, unmodified for ``settle`` seconds."""
    now = time.time() if now is None else now
    ready = []
    for path in directory.iterdir():
        name = path.name
        if name.startswith(".") or name.endswith((".tmp", ".part")) or not path.is_file():
            continue
        if now - path.stat().st_mtime < settle:
            continue
        ready.append(path)
    return sorted(ready, key=_name_time)


def _name_time(path: Path) -> tuple[int, ...]:
    match = FILE_NAME.fullmatch(path.name)
    if match is None:
        return (0,)
    return tuple(int(match[part]) for part in ("y", "m", "d", "h", "min", "segment"))


def process_directory(
    directory: Path,
    write: Callable[[Callable[[StoreWriter], FileResult]], FileResult],
    platforms: Mapping[int, PlatformConfig],
    settle: float = DEFAULT_SETTLE_SECONDS,
) -> list[FileResult | DropFileError | StoreError]:
    """Apply every ready file of a watched directory, each in its own transaction (through
    ``write``); see ``process_ready``."""
    return process_ready(
        directory,
        lambda path: write(functools.partial(apply_file, path, platforms=platforms)),
        settle,
    )


def process_ready(
    directory: Path, apply: Callable[[Path], FileResult], settle: float = DEFAULT_SETTLE_SECONDS
) -> list[FileResult | DropFileError | StoreError]:
    """Apply every ready file of a watched directory with ``apply``; move applied ones to
    ``applied/`` and refused ones to ``rejected/`` with a ``.why`` file beside them. A file
    ``apply`` could not get through (``StoreError``: a replicated node's log unreachable, or
    its applier behind) stays where it is, for the next scan."""
    outcomes: list[FileResult | DropFileError | StoreError] = []
    for path in pending_files(directory, settle):
        try:
            result = apply(path)
        except DropFileError as exc:
            rejected = directory / REJECTED_DIR
            rejected.mkdir(exist_ok=True)
            path.rename(rejected / path.name)
            (rejected / f"{path.name}.why").write_text("\n".join(exc.problems) + "\n")
            log.warning("drop file refused", extra={"file": path.name, "problems": exc.problems})
            outcomes.append(exc)
            continue
        except StoreError as exc:
            log.warning("drop file not applied yet", extra={"file": path.name, "error": str(exc)})
            outcomes.append(exc)
            continue
        applied = directory / APPLIED_DIR
        applied.mkdir(exist_ok=True)
        path.rename(applied / path.name)
        log.info(
            "drop file applied",
            extra={
                "file": result.name,
                "segment_id": result.segment,
                "added": result.added,
                "removed": result.removed,
                "skipped": result.skipped,
            },
        )
        outcomes.append(result)
    return outcomes
