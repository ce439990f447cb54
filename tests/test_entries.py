from __future__ import annotations

from pathlib import Path

import pytest

from enrich_server.ingest import entries
from enrich_server.ingest.batches import BatchError, Mutation
from enrich_server.ingest.entries import Changes, CreateSegment, DeleteSegment, Entry, Mutations
from enrich_server.store import StoreWriter, decode_memberships
from tests.utils import raw_members

TTL = 1000
NOW = 1_900_000_000


def _entries(first: int, second: int) -> list[Entry]:
    """Micro-batches pushing the same users, a refused one among them, and a segment deleted
    between two of them (the next push to it must be refused, the ones before it stand)."""
    return [
        Mutations(1, TTL, NOW, [Mutation(first, "u"), Mutation(second, "v", ttl=5)]),
        Mutations(1, TTL, NOW, [Mutation(first, "u", op="remove"), Mutation(second, "u")]),
        Mutations(1, TTL, NOW, [Mutation(first, "v"), "not an item"]),  # refused whole
        Mutations(1, TTL, NOW, [Mutation(first, "u"), Mutation(first, "v", op="remove")]),
        # As the replicated log carries micro-batches: planned before publishing.
        Changes(1, [(b"uid:u", second, False, 0), (b"uid:x", second, True, NOW + 3)]),
        DeleteSegment(1, second),
        Mutations(1, TTL, NOW, [Mutation(second, "w")]),  # refused: deleted just before
        Changes(1, [(b"uid:w", first, True, 0), (b"uid:y", second, True, 0)]),  # refused too
        Mutations(1, TTL, NOW, [Mutation(first, "w", ttl=7), Mutation(first, "u", ttl=9)]),
        CreateSegment(1, "third", None, NOW),
    ]


def _store(path: Path) -> tuple[int, int]:
    with StoreWriter(path) as writer:
        first, _ = writer.create_dmp_segment(1, "first", None, NOW)
        second, _ = writer.create_dmp_segment(1, "second", None, NOW)
    return first, second


def _answers(outcomes: list[entries.Outcome]) -> list[object]:
    return [type(refused).__name__ if refused else result for result, refused in outcomes]


def test_apply_all_in_one_transaction_writes_what_each_entry_alone_writes(tmp_path: Path) -> None:
    alone, together = tmp_path / "alone", tmp_path / "together"
    first, second = _store(alone)
    assert _store(together) == (first, second)
    batch = _entries(first, second)
    one_by_one: list[entries.Outcome] = []
    for entry in batch:
        with StoreWriter(alone) as writer:
            one_by_one += entries.apply_all(writer, [entry])
    with StoreWriter(together) as writer:
        merged = entries.apply_all(writer, batch)
    assert _answers(merged) == _answers(one_by_one)
    assert _answers(merged) == [
        [2, {"add": 2, "remove": 0}],
        [2, {"add": 1, "remove": 1}],
        "BatchError",
        [2, {"add": 1, "remove": 1}],
        [2, {"add": 1, "remove": 1}],
        2,  # memberships of the deleted segment: v's and x's (u's was removed)
        "BatchError",
        "BatchError",
        [2, {"add": 2, "remove": 0}],
        [3, True],
    ]
    assert raw_members(together) == raw_members(alone)
    assert {k: decode_memberships(v) for k, v in raw_members(together).items()} == {
        b"uid:u": {first: NOW + 9},
        b"uid:w": {first: NOW + 7},
    }
    problems = [r.problems for _, r in merged if isinstance(r, BatchError)]
    assert problems[1:] == [
        [f"item 0: segment {second} is not a segment of this platform"],
        [f"segment {second} is not a segment of this platform"],
    ]
    with StoreWriter(together) as writer:
        assert writer.dmp_segment(second) is None


def test_a_micro_batch_goes_to_the_log_as_its_planned_changes_in_key_order() -> None:
    batch = Mutations(1, TTL, NOW, [Mutation(4, "b"), Mutation(4, "a", op="remove", ttl=0)])
    changes = entries.changes_of(lambda sid: 1 if sid == 4 else None, batch)
    assert changes == Changes(1, [(b"uid:a", 4, False, 0), (b"uid:b", 4, True, NOW + TTL)])
    assert entries.decode(entries.encode(changes)) == changes
    assert entries.kind(changes) == entries.kind(batch) == "mutations"
    with pytest.raises(BatchError) as refused:
        entries.changes_of(lambda sid: None, batch)
    assert refused.value.problems == [
        "item 0: segment 4 is not a segment of this platform",
        "item 1: segment 4 is not a segment of this platform",
    ]
