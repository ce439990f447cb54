"""The exception tree of enrich-server.

Every error we raise on purpose derives from ``EnrichError``; the CLI prints its message
and exits non-zero, the HTTP layer never lets one become a 5xx for client input::

    EnrichError
     ├── ConfigError        a bad option, file, environment variable or flag
     ├── StoreError         the LMDB store is missing, unreadable or of another format
     │    ├── SegmentConflictError  a DMP segment's key is another segment's
     │    └── UnconfirmedWriteError  a DMP write that may or may not have been applied
     └── SnapshotError      a snapshot could not be loaded (carries every bad line)

``lmdb.Error`` never escapes the ``store`` package or ``snapshot.py``: it is wrapped in
``StoreError``.
"""

from __future__ import annotations


class EnrichError(Exception):
    """Base of every error enrich-server raises on purpose."""


class ConfigError(EnrichError):
    """A configuration value (file, environment or flag) is invalid."""


class StoreError(EnrichError):
    """The segment store cannot be opened, read or written."""


class SegmentConflictError(StoreError):
    """A DMP segment cannot take the name asked for: another segment has it."""


class UnconfirmedWriteError(StoreError):
    """A DMP write this node cannot confirm: it was sent to the log (the ingestion process,
    or JetStream) but no acknowledgement came back, so it may still be applied. Every DMP
    write is idempotent: the caller may repeat it."""


class SnapshotError(EnrichError):
    """A snapshot failed to load; nothing of it was applied.

    ``problems`` holds one ``file:line: why`` string per bad line (at most a bounded number).
    """

    def __init__(self, problems: list[str], more: int = 0) -> None:
        self.problems = problems
        self.more = more
        text = "\n".join(problems)
        if more:
            text += f"\n... and {more} more bad line(s)"
        super().__init__(text)
