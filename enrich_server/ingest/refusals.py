"""The one table of how a DMP write is refused: the error, its name between processes, and
the HTTP answer ``api`` gives for it.

A write is refused whole (nothing of it applied). The ingestion process (``local``) sends a
refusal to the worker as ``["error", kind, message, details]``; the worker raises the same
error again (``error_of``) and ``api`` answers it (``answer``). Each fact is here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from enrich_server.errors import SegmentConflictError, StoreError, UnconfirmedWriteError
from enrich_server.ingest.batches import BatchError
from enrich_server.ingest.sync import ReplayError


@dataclass(frozen=True, slots=True)
class Refusal:
    """How one error class is told between processes and answered over HTTP."""

    error: type[Exception]
    kind: str
    status: int
    #: What the HTTP answer says before the error's own message ('' = the message alone).
    prefix: str = ""


#: Most specific first: ``SegmentConflictError`` and ``UnconfirmedWriteError`` are
#: ``StoreError``s.
REFUSALS: Final = (
    Refusal(ReplayError, "replay", 403),
    Refusal(BatchError, "batch", 400),
    Refusal(SegmentConflictError, "conflict", 409),
    Refusal(UnconfirmedWriteError, "unconfirmed", 503, "write not confirmed: "),
    Refusal(StoreError, "store", 503, "store write failed, nothing applied: "),
)
#: The errors a write may be refused with, for ``except``.
REFUSED: Final = tuple(r.error for r in REFUSALS)
_BY_KIND: Final = {r.kind: r for r in REFUSALS}


def refusal_of(exc: BaseException) -> Refusal | None:
    """The table's row for ``exc`` (``None``: not a refusal, a bug)."""
    for refusal in REFUSALS:
        if isinstance(exc, refusal.error):
            return refusal
    return None


def reply(exc: Exception) -> list[Any]:
    """``exc`` as the ingestion process's error reply; an error outside the table is
    ``internal`` (told to the worker as a store failure: nothing was applied)."""
    refusal = refusal_of(exc)
    details = [exc.problems, exc.more] if isinstance(exc, BatchError) else None
    kind = refusal.kind if refusal is not None else "internal"
    message = str(exc) if refusal is not None else f"{type(exc).__name__}: {exc}"
    return ["error", kind, message, details]


def error_of(kind: str, message: str, details: Any) -> Exception:
    """The error an ingestion process's reply names, for the worker to raise again."""
    refusal = _BY_KIND.get(kind)
    if refusal is None or refusal.error is StoreError:
        return StoreError(message)
    if refusal.error is BatchError:
        return BatchError(details[0], details[1])
    return refusal.error(message)


def answer(exc: Exception) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON fields of a refused write."""
    refusal = refusal_of(exc)
    if refusal is None:
        raise TypeError(f"{type(exc).__name__} is not a refusal") from exc
    if isinstance(exc, BatchError):
        more = {"more": exc.more} if exc.more else {}
        return refusal.status, {
            "error": "batch refused, nothing applied",
            "problems": exc.problems,
            **more,
        }
    return refusal.status, {"error": refusal.prefix + str(exc)}
