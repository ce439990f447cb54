from __future__ import annotations

from pathlib import Path

import lmdb

from enrich_server.ingest import entries
from enrich_server.ingest.batches import BatchError, Mutation
from enrich_server.ingest.entries import CreateSegment, DeleteSegment, Entry, Mutations
from enrich_server.store import StoreWriter, decode_memberships

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
        DeleteSegment(1, second),
        Mutations(1, TTL, NOW, [Mutation(second, "w")]),  # refused: deleted just before
        Mutations(1, TTL, NOW, [Mutation(first, "w", ttl=7), Mutation(first, "u", ttl=9)]),
        CreateSegment(1, "third", None, NOW),
    ]


def _store(path: Path) -> tuple[int, int]:
    with StoreWriter(path) as writer:
        first, _ = writer.create_dmp_segment(1, "first", None, NOW)
        second, _ = writer.create_dmp_segment(1, "second", None, NOW)
    return first, second


def _members(store: Path) -> dict[bytes, bytes]:
    env = lmdb.open(str(store), max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor(db=env.open_db(b"members", txn=txn))}
    finally:
        env.close()


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
        2,  # memberships of the deleted segment: v's and u's
        "BatchError",
        [2, {"add": 2, "remove": 0}],
        [3, True],
    ]
    assert _members(together) == _members(alone)
    assert {k: decode_memberships(v) for k, v in _members(together).items()} == {
        b"uid:u": {first: NOW + 9},
        b"uid:w": {first: NOW + 7},
    }
    refused = merged[5][1]
    assert isinstance(refused, BatchError)
    assert refused.problems == [f"item 0: segment {second} is not a segment of this platform"]
    with StoreWriter(together) as writer:
        assert writer.dmp_segment(second) is None
