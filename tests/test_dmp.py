"""DMP mutations, segments and aliases at the store level, and the writer thread."""

from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path

import pytest

from enrich_server import bulk
from enrich_server.errors import SegmentConflictError
from enrich_server.ingest.batches import BatchError, Mutation, apply_batch, decode_batch, user_key
from enrich_server.ingest.write_queue import WriteQueue
from enrich_server.snapshot import load_snapshots
from enrich_server.store import SegmentStore, StoreWriter, store_dir
from tests.conftest import StoreFactory


@pytest.fixture
def store(make_store: StoreFactory) -> Path:
    return make_store("uid:op\toperator_seg\n")


def test_create_is_idempotent_and_keys_are_checked(store: Path) -> None:
    with StoreWriter(store) as writer:
        first = writer.create_dmp_segment(1, "Title", None)
        assert writer.create_dmp_segment(1, "Title", None) == (first[0], False)
        assert first[1] is True
        other_platform = writer.create_dmp_segment(2, "Title", None)
        assert other_platform[0] != first[0]
        keyed = writer.create_dmp_segment(1, "Keyed", "mapp_keyed")
        # A platform never takes over a segment it did not create, nor another platform's.
        with pytest.raises(SegmentConflictError, match="an operator's segment"):
            writer.create_dmp_segment(1, "Steal", "operator_seg")
        with pytest.raises(SegmentConflictError, match="another platform's segment"):
            writer.create_dmp_segment(2, "Steal", "mapp_keyed")
        with pytest.raises(SegmentConflictError, match="this platform's segment 'Keyed'"):
            writer.create_dmp_segment(1, "Twice", "mapp_keyed")
    opened = SegmentStore(store)
    try:
        assert [s.title for s in opened.dmp_segments(1)] == ["Title", "Keyed"]  # by id
        assert opened.dmp_segment(keyed[0]).key == "mapp_keyed"  # type: ignore[union-attr]
        assert opened.dmp_segment(first[0]).key == str(first[0])  # type: ignore[union-attr]
        assert opened.dmp_segment(999) is None
        assert opened.dmp_segment(0) is None
    finally:
        opened.close()


def test_default_name_taken_by_an_operator_segment(make_store: StoreFactory) -> None:
    store = make_store("uid:op\toperator_seg,3\n")  # ids 1 and 2; the next id is 3
    with pytest.raises(SegmentConflictError, match="pass a key"), StoreWriter(store) as writer:
        writer.create_dmp_segment(1, "Default name taken", None)


def test_batch_order_is_kept_per_user(store: Path) -> None:
    with StoreWriter(store) as writer:
        sid, _ = writer.create_dmp_segment(1, "T", None)
        items = [
            Mutation(segment=sid, userid="b"),
            Mutation(segment=sid, userid="a"),
            Mutation(segment=sid, userid="a", op="remove"),
            Mutation(segment=sid, userid="c", op="remove"),
            Mutation(segment=sid, userid="c"),
            Mutation(segment=sid, userid="ifa-user", idtype="ifa", ttl=10),
        ]
        applied = apply_batch(writer, 1, 0, items, now=100)
    assert applied.count == 6
    assert applied.ops == {"add": 4, "remove": 2}
    opened = SegmentStore(store)
    try:
        assert opened.memberships(b"uid:a") is None  # added, then removed
        assert opened.memberships(b"uid:c") == {str(sid): 0}  # removed, then added
        assert opened.memberships(b"ifa:ifa-user") == {str(sid): 110}
    finally:
        opened.close()


def test_bad_batch_writes_nothing(store: Path) -> None:
    with StoreWriter(store) as writer:
        sid, _ = writer.create_dmp_segment(1, "T", None)
    with pytest.raises(BatchError) as caught, StoreWriter(store) as writer:
        apply_batch(
            writer, 1, 0, [Mutation(segment=sid, userid="ok"), Mutation(segment=sid, userid="")]
        )
    assert caught.value.problems == [
        "item 1: userid '' is empty or has spaces or control characters"
    ]
    opened = SegmentStore(store)
    try:
        assert opened.memberships(b"uid:ok") is None
    finally:
        opened.close()


def test_decode_batch() -> None:
    assert decode_batch(b'[{"segment": 1, "userid": "a", "op": "remove"}]', 10) == [
        Mutation(segment=1, userid="a", op="remove")
    ]
    with pytest.raises(BatchError, match="more than 1"):
        decode_batch(b'[{"segment": 1, "userid": "a"}, {"segment": 1, "userid": "b"}]', 1)
    good, missing, wrong = decode_batch(b'[{"segment": 1, "userid": "a"}, {"segment": 1}, 5]', 10)
    assert good == Mutation(segment=1, userid="a")
    assert missing == "Object missing required field `userid`"
    assert wrong == "Expected `object`, got `int`"
    for body, message in ((b"[]", "empty"), (b"{}", "JSON array"), (b"[{", "not JSON")):
        with pytest.raises(BatchError, match=message):
            decode_batch(body, 10)


@pytest.mark.parametrize(
    ("userid", "idtype", "key"),
    [
        ("abc", "uid", b"uid:abc"),
        ("AAAA-BBBB", "ifa", b"ifa:aaaa-bbbb"),
        ("x1", "eid:ID5-Sync.com", b"eid:id5-sync.com:x1"),
    ],
)
def test_user_keys(userid: str, idtype: str, key: bytes) -> None:
    assert user_key(userid, idtype) == key


@pytest.mark.parametrize(
    ("userid", "idtype"),
    [
        ("a", "domain"),
        ("a", "eid:"),
        ("", "uid"),
        ("a\tb", "uid"),
        ("x" * 600, "uid"),
        ("\ud800", "uid"),
    ],
)
def test_bad_user_keys(userid: str, idtype: str) -> None:
    with pytest.raises(ValueError, match=r"idtype|userid|eid key|longer|encode"):
        user_key(userid, idtype)


def test_the_first_alias_resolves_on_the_next_call(store: Path) -> None:
    with StoreWriter(store) as writer:
        writer.add(b"uid:ours", (writer.intern("synced"),), 0)
    opened = SegmentStore(store, writable=True)
    try:
        keys = [b"uid:theirs", b"eid:src:theirs2"]
        assert opened.resolve(keys, 0, 10).segments_json == []
        with opened.writer() as writer:  # a commit without aliases: still none
            writer.add(b"uid:other", (writer.intern("synced"),), 0)
        assert opened.resolve(keys, 0, 10).segments_json == []
        with opened.writer() as writer:
            writer.map_alias(b"theirs2", b"ours")
        assert opened.resolve(keys, 0, 10).segments_json == [b'"synced"']
        with opened.writer() as writer:
            writer.map_alias(b"theirs", b"other")
        assert opened.resolve([b"uid:theirs"], 0, 10).segments_json == [b'"synced"']
        assert opened.alias_of(b"eid:src:theirs2") == b"uid:ours"
        assert opened.alias_of(b"uid:theirs2") == b"uid:ours"
        assert opened.alias_of(b"uid:nobody") is None
        assert opened.alias_of(b"domain:theirs2") is None
    finally:
        opened.close()


def test_read_only_store_has_no_writer(store: Path) -> None:
    opened = SegmentStore(store)
    try:
        assert opened.dmp_segments() == []
        assert opened.alias_of(b"uid:x") is None
        with pytest.raises(Exception, match="read-only"):
            opened.writer()
    finally:
        opened.close()


def test_write_queue_groups_and_isolates_failures(store: Path) -> None:
    opened = SegmentStore(store, writable=True)
    queue = WriteQueue(lambda: opened)
    gate = threading.Event()
    seen_groups: list[int] = []

    def slow(writer: StoreWriter) -> str:
        gate.wait(5)
        return "slow"

    def add(n: int):  # type: ignore[no-untyped-def]
        def job(writer: StoreWriter) -> int:
            seen_groups.append(id(writer))
            writer.add(f"uid:q{n}".encode(), (writer.intern("queued"),), 0)
            return n

        return job

    def broken(writer: StoreWriter) -> None:
        raise ValueError("bad job")

    async def main() -> list[object]:
        first = asyncio.ensure_future(queue.run(slow))
        await asyncio.sleep(0.05)  # the writer thread now waits inside "slow"
        rest = [asyncio.ensure_future(queue.run(add(n))) for n in range(5)]
        failing = asyncio.ensure_future(queue.run(broken))
        gate.set()
        results: list[object] = [await first]
        results += [await r for r in rest]
        with pytest.raises(ValueError, match="bad job"):
            await failing
        return results

    try:
        assert asyncio.run(main()) == ["slow", 0, 1, 2, 3, 4]
        # The five adds were queued together: one group (run twice: once with the broken
        # job, aborted, then alone each); all of them committed.
        assert all(opened.memberships(f"uid:q{n}".encode()) for n in range(5))
    finally:
        queue.close()
        opened.close()


def test_add_one_matches_add(make_store: StoreFactory) -> None:
    """The DMP fast path writes exactly what the general path writes, value for value."""
    fast, general = make_store("uid:seed\ta\n"), make_store("uid:seed\ta\n")
    rng = random.Random(5)
    ops = [
        (f"uid:k{rng.randrange(30)}".encode(), rng.randrange(1, 8), rng.choice((0, 0, 50, 90)))
        for _ in range(3000)
    ]
    with StoreWriter(fast) as one, StoreWriter(general) as many:
        for name in "abcdefgh":
            one.intern(name)
            many.intern(name)
        for key, sid, expires in ops:
            one.add_one(key, sid, expires)
            many.add(key, (sid,), expires)
    a, b = SegmentStore(fast), SegmentStore(general)
    try:
        assert list(a.items()) == list(b.items())
        raw_a = [bytes(v) for _, v in a._env.begin().cursor(db=a._members)]
        raw_b = [bytes(v) for _, v in b._env.begin().cursor(db=b._members)]
        assert raw_a == raw_b
    finally:
        a.close()
        b.close()


def test_write_queue_moves_to_a_replacing_store(make_store: StoreFactory) -> None:
    """A group that got the write lock of a superseded store is run again on the new one."""
    old, new = (SegmentStore(make_store("uid:x\ta\n"), writable=True) for _ in range(2))
    published = threading.Event()
    checks: list[str] = []

    def current() -> SegmentStore:
        return new if published.is_set() else old

    def is_current(store: SegmentStore) -> bool:
        checks.append("old" if store is old else "new")
        published.set()  # the replace lands while the first group waits for the lock
        return store is new

    queue = WriteQueue(current, is_current=is_current)

    def job(writer: StoreWriter) -> str:
        writer.add(b"uid:moved", (writer.intern("m"),), 0)
        return "done"

    try:
        assert asyncio.run(queue.run(job)) == "done"
    finally:
        queue.close()
    try:
        assert checks == ["old", "new"]
        assert old.memberships(b"uid:moved") is None
        assert new.memberships(b"uid:moved") == {"m": 0}
    finally:
        old.close()
        new.close()


def test_dmp_writes_made_during_a_replace_are_carried_over(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a DMP wrote while the replacement was building (a synced id, an applied drop
    file, a segment created, one deleted) is in the published generation."""
    store = make_store("uid:a\toperator\n")
    with StoreWriter(store) as writer:
        gone, _ = writer.create_dmp_segment(1, "Deleted during the build", None)
    snapshot = tmp_path / "next.tsv"
    snapshot.write_text("uid:b\toperator\n")
    real_compact = bulk._compact

    def meanwhile(building: Path, map_size: int) -> None:
        real_compact(building, map_size)
        with StoreWriter(store) as writer:  # the ingestion process, while the build runs
            created.append(writer.create_dmp_segment(1, "Created during the build", None)[0])
            writer.delete_dmp_segment(gone)
            writer.map_alias(b"their-id", b"our-id")
            writer.record_applied_file("Mapp_dmp_9_2026_1_1_0_0.tsv.gz", b"{}")

    created: list[int] = []
    monkeypatch.setattr(bulk, "_compact", meanwhile)
    load_snapshots([snapshot], store, replace=True, progress=False)
    opened = SegmentStore(store_dir(store))
    try:
        assert [s.title for s in opened.dmp_segments()] == ["Created during the build"]
        assert opened.dmp_segment(created[0]).key == str(created[0])  # type: ignore[union-attr]
        assert opened.alias_of(b"uid:their-id") == b"uid:our-id"
        assert opened.memberships(b"uid:b") == {"operator": 0}
    finally:
        opened.close()
    with StoreWriter(store) as writer:
        assert writer.applied_file("Mapp_dmp_9_2026_1_1_0_0.tsv.gz") == b"{}"


def test_a_segment_id_given_twice_during_a_replace_fails_it(
    make_store: StoreFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store("uid:a\toperator\n")
    snapshot = tmp_path / "next.tsv"
    snapshot.write_text("uid:b\toperator,brand_new\n")  # the build gives id 2 to brand_new
    real_compact = bulk._compact

    def meanwhile(building: Path, map_size: int) -> None:
        real_compact(building, map_size)
        with StoreWriter(store) as writer:  # ... while a DMP gets id 2 for its segment
            writer.create_dmp_segment(1, "Mine", "mine")

    monkeypatch.setattr(bulk, "_compact", meanwhile)
    with pytest.raises(SegmentConflictError, match="load again"):
        load_snapshots([snapshot], store, replace=True, progress=False)
    opened = SegmentStore(store_dir(store))
    try:  # the live store is untouched, the DMP's segment in it
        assert opened.memberships(b"uid:a") == {"operator": 0}
        assert [s.key for s in opened.dmp_segments()] == ["mine"]
    finally:
        opened.close()
