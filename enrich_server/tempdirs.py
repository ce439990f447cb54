"""Temporary directories a ``serve`` process owns, and the clean-up of those a killed one left.

``serve`` keeps the ingestion socket and, with several workers, the Prometheus multiprocess
files in directories under the system's temporary directory. A ``kill -9`` skips the clean-up
that removes them, so each directory carries an exclusive ``flock`` held by its owner for as
long as it lives: a directory whose lock can be taken has no owner any more, and the next
``serve`` removes it at start-up. The lock is taken before the directory gets its final name,
so no starting process ever sees an owned directory without its lock.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from enrich_server.generations import Lease

INGEST_PREFIX: Final = "enrich-server-ingest-"
METRICS_PREFIX: Final = "enrich-server-metrics-"
_PREFIXES: Final = (INGEST_PREFIX, METRICS_PREFIX)
_STAGING_PREFIX: Final = ".enrich-server-staging-"


@contextlib.contextmanager
def owned(prefix: str) -> Iterator[Path]:
    """A new directory named ``prefix...``, locked by this process, removed when the block
    ends (and by the next ``serve`` if this process is killed first)."""
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX))
    lease = Lease(staging, exclusive=True)
    folder = staging.with_name(prefix + staging.name.removeprefix(_STAGING_PREFIX))
    try:
        staging.rename(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        lease.release()


def remove_abandoned(root: Path | None = None) -> list[Path]:
    """Remove the directories (under ``root``, default the system's temporary directory)
    that a ``serve`` killed before its clean-up left; returns them."""
    base = root if root is not None else Path(tempfile.gettempdir())
    removed: list[Path] = []
    for prefix in _PREFIXES:
        for path in sorted(base.glob(prefix + "*")):
            try:
                lease = Lease(path, exclusive=True, wait=False)
            except OSError:  # held by its owner, gone meanwhile, or not ours to take
                continue
            try:
                if path.stat().st_uid == os.getuid():
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
            finally:
                lease.release()
    return removed
