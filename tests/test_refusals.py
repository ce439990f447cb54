"""The one table of write refusals: between processes and over HTTP (``ingest.refusals``)."""

from __future__ import annotations

import pytest

from enrich_server.errors import SegmentConflictError, StoreError
from enrich_server.ingest import refusals
from enrich_server.ingest.batches import BatchError
from enrich_server.ingest.sync import ReplayError

CASES = [
    (ReplayError("signature already used"), 403, {"error": "signature already used"}),
    (
        BatchError(["item 3: bad userid"], more=2),
        400,
        {"error": "batch refused, nothing applied", "problems": ["item 3: bad userid"], "more": 2},
    ),
    (
        SegmentConflictError("segment name 'x' is taken"),
        409,
        {"error": "segment name 'x' is taken"},
    ),
    (StoreError("disk full"), 503, {"error": "store write failed, nothing applied: disk full"}),
]


@pytest.mark.parametrize(("error", "status", "fields"), CASES, ids=lambda c: type(c).__name__)
def test_a_refusal_crosses_the_process_boundary_and_gets_its_answer(
    error: Exception, status: int, fields: dict[str, object]
) -> None:
    told = refusals.reply(error)
    assert told[0] == "error"
    again = refusals.error_of(*told[1:])
    assert type(again) is type(error)
    assert str(again) == str(error)
    assert refusals.answer(again) == (status, fields)


def test_a_conflict_is_not_taken_for_its_base_store_error() -> None:
    refusal = refusals.refusal_of(SegmentConflictError("taken"))
    assert refusal is not None
    assert refusal.status == 409


def test_an_error_outside_the_table_reaches_the_worker_as_a_store_failure() -> None:
    told = refusals.reply(KeyError("boom"))
    assert told[1] == "internal"
    assert "KeyError" in told[2]
    again = refusals.error_of(*told[1:])
    assert type(again) is StoreError
    assert refusals.answer(again)[0] == 503
    with pytest.raises(TypeError, match="not a refusal"):
        refusals.answer(KeyError("boom"))


def test_every_row_has_a_distinct_kind_and_a_client_or_server_status() -> None:
    kinds = [r.kind for r in refusals.REFUSALS]
    assert len(set(kinds)) == len(kinds)
    assert "internal" not in kinds
    assert all(400 <= r.status < 600 for r in refusals.REFUSALS)
