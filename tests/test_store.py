from __future__ import annotations

import subprocess
import sys
from operator import itemgetter
from pathlib import Path

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enrich_server.errors import StoreError
from enrich_server.store import (
    SegmentStore,
    StoreWriter,
    decode_memberships,
    encode_memberships,
    pack_segment_id,
)
from enrich_server.store.layout import FORMAT
from tests.conftest import StoreFactory
from tests.utils import ROOT, raw_members

#: Another process's first DMP writes: a keyed segment, a member, a synced id. Prints the id.
FIRST_DMP_WRITES = """
import sys
from pathlib import Path
from enrich_server.store import StoreWriter
with StoreWriter(Path(sys.argv[1])) as writer:
    sid, _ = writer.create_dmp_segment(7, "Fans", "fans", now=1)
    writer.add_one(b"uid:ours", sid, 0)
    writer.map_alias(b"theirs", b"ours")
print(sid)
"""


def test_memberships_codec_round_trip_groups_by_expiry() -> None:
    members = {3: 0, 1: 0, 200: 1800000000, 70000: 0, 5: 1800000000}
    raw = encode_memberships(members)
    assert decode_memberships(raw) == members
    # two groups: [0, 3, 3, 1, 70000] and [1800000000, 2, 200, 5]
    assert len(raw) < 24


def test_resolve_reads_all_keys_in_order_deduplicated(make_store: StoreFactory) -> None:
    store = SegmentStore(make_store("uid:u1\ta,b\ndomain:d.com\tb,c\n"))
    resolved = store.resolve([b"uid:u1", b"uid:missing", b"domain:d.com"], now=1, limit=500)
    assert resolved.segments_json == [b'"a"', b'"b"', b'"c"']
    assert resolved.hits == 2
    assert resolved.min_expires == 0


def test_resolve_never_serves_expired(make_store: StoreFactory) -> None:
    store = SegmentStore(make_store("uid:u1\told\t1000\nuid:u1\tlive\t3000\nuid:u1\tforever\n"))
    at_999 = store.resolve([b"uid:u1"], now=999, limit=500)
    assert sorted(at_999.segments_json) == [b'"forever"', b'"live"', b'"old"']
    assert at_999.min_expires == 1000
    at_1000 = store.resolve([b"uid:u1"], now=1000, limit=500)
    assert sorted(at_1000.segments_json) == [b'"forever"', b'"live"']
    assert at_1000.min_expires == 3000
    assert store.resolve([b"uid:u1"], now=5000, limit=500).segments_json == [b'"forever"']


def test_resolve_caps_at_limit(make_store: StoreFactory) -> None:
    names = ",".join(f"s{i}" for i in range(20))
    store = SegmentStore(make_store(f"uid:u\t{names}\n"))
    assert len(store.resolve([b"uid:u"], now=0, limit=7).segments_json) == 7


def test_resolve_escapes_segment_names_as_json(make_store: StoreFactory) -> None:
    store = SegmentStore(make_store('uid:u\tsay "hi",back\\slash,é\n'))
    assert store.resolve([b"uid:u"], 0, 500).segments_json == [
        b'"say \\"hi\\""',
        b'"back\\\\slash"',
        '"é"'.encode(),
    ]


def test_reader_sees_segments_created_after_it_opened(make_store: StoreFactory) -> None:
    path = make_store("uid:a\tfirst\n")
    store = SegmentStore(path)
    assert store.resolve([b"uid:a"], 0, 500).segments_json == [b'"first"']
    store.close()  # py-lmdb allows one Environment per path per process
    with StoreWriter(path) as writer:
        writer.add(b"uid:b", [writer.intern("second")], 0)
    store = SegmentStore(path)
    assert store.resolve([b"uid:b", b"uid:a"], 0, 500).segments_json == [b'"second"', b'"first"']


def test_reader_sees_dmp_tables_another_process_created(tmp_path: Path) -> None:
    # A store as written before the DMP tables existed (this version's writers make them all).
    path = tmp_path / "store"
    env = lmdb.open(str(path), max_dbs=4)
    with env.begin(write=True) as txn:
        txn.put(b"format", FORMAT, db=env.open_db(b"meta", txn=txn))
        txn.put(b"operator_seg", pack_segment_id(1), db=env.open_db(b"segment_ids", txn=txn))
        txn.put(pack_segment_id(1), b"operator_seg", db=env.open_db(b"segment_names", txn=txn))
        txn.put(b"uid:op", encode_memberships({1: 0}), db=env.open_db(b"members", txn=txn))
    env.close()
    reader = SegmentStore(path)
    try:
        keys = [b"uid:theirs", b"uid:op"]
        assert reader.resolve(keys, 0, 500).segments_json == [b'"operator_seg"']
        assert reader.dmp_segments() == []
        written = subprocess.run(
            [sys.executable, "-c", FIRST_DMP_WRITES, str(path)],
            cwd=ROOT, check=True, capture_output=True, text=True,
        )  # fmt: skip
        sid = int(written.stdout)
        # The very next calls see them: no refresh, no reopening.
        assert reader.resolve(keys, 0, 500).segments_json == [b'"fans"', b'"operator_seg"']
        segment = reader.dmp_segment(sid)
        assert segment is not None
        assert (segment.key, segment.platform, segment.title) == ("fans", 7, "Fans")
        assert [s.segment_id for s in reader.dmp_segments(7)] == [sid]
        assert reader.alias_of(b"eid:src:theirs") == b"uid:ours"
        assert list(reader.alias_ids()) == [b"theirs"]
        with reader.view() as view:
            assert list(view.aliases()) == [(b"theirs", b"ours")]
    finally:
        reader.close()


def test_writer_aborts_everything_on_exception(make_store: StoreFactory) -> None:
    path = make_store("uid:a\tkept\n")

    def write_then_fail() -> None:
        with StoreWriter(path) as writer:
            writer.add(b"uid:b", [writer.intern("lost")], 0)
            writer.remove(b"uid:a", [writer.intern("kept")])
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_then_fail()
    store = SegmentStore(path)
    assert store.memberships(b"uid:a") == {"kept": 0}
    assert store.memberships(b"uid:b") is None


def test_writer_remove_deletes_empty_keys(make_store: StoreFactory) -> None:
    path = make_store("uid:a\tx,y\n")
    with StoreWriter(path) as writer:
        x, y = writer.intern("x"), writer.intern("y")
        assert writer.remove(b"uid:a", [x]) == 1
        assert writer.remove(b"uid:a", [x]) == 0
        assert writer.remove(b"uid:a", [y]) == 1
        assert writer.remove(b"uid:zzz", [y]) == 0
    assert SegmentStore(path).memberships(b"uid:a") is None


def test_open_missing_store_says_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="enrich-server load"):
        SegmentStore(tmp_path / "nope")


def test_open_foreign_lmdb_is_refused(tmp_path: Path) -> None:
    env = lmdb.open(str(tmp_path / "other"), max_dbs=4)
    env.open_db(b"meta")
    env.open_db(b"members")
    env.open_db(b"segment_names")
    env.close()
    with pytest.raises(StoreError, match="not an enrich-server store"):
        SegmentStore(tmp_path / "other")


def test_stats_counts_namespaces_and_segments(make_store: StoreFactory) -> None:
    stats = SegmentStore(make_store("uid:a\tx,y\nuid:b\tx\ndomain:d\tz\n")).stats()
    assert stats.identities == 3
    assert stats.memberships == 4
    assert stats.segments == 3
    assert stats.by_namespace == {"domain": 1, "uid": 2}
    assert stats.segment_members == {"x": 2, "y": 1, "z": 1}
    assert stats.file_bytes >= stats.data_bytes > 0
    assert stats.built_at > 0
    assert stats.generation == 1


def test_drop_expired_in_slices_covers_every_key_once(make_store: StoreFactory) -> None:
    store = make_store("".join(f"uid:k{i:03d}\tseg\n" for i in range(250)))
    with StoreWriter(store) as writer:
        sid = writer.segment_id("seg")
        assert sid is not None
        for i in range(250):
            writer.add(f"uid:k{i:03d}".encode(), (sid,), 100)  # expired at 100
    bounds = [b"uid:k050", b"uid:k100", b"uid:k200"]
    removed = []
    for start, end in zip([b"", *bounds], [*bounds, None], strict=True):
        with StoreWriter(store) as writer:
            removed.append(writer.drop_expired(100, start, end))
    assert removed == [(50, 50), (50, 50), (100, 100), (50, 50)]


_CHANGE = st.tuples(
    st.sampled_from([b"uid:a", b"uid:b", b"uid:c"]),
    st.integers(1, 4),
    st.booleans(),
    st.sampled_from([0, 100, 200]),
)


@settings(max_examples=150, deadline=None)
@given(before=st.lists(_CHANGE, max_size=12), changes=st.lists(_CHANGE, max_size=30))
def test_apply_changes_writes_what_add_one_and_remove_in_turn_write(
    tmp_path_factory: pytest.TempPathFactory,
    before: list[tuple[bytes, int, bool, int]],
    changes: list[tuple[bytes, int, bool, int]],
) -> None:
    # Same starting values (some keys with several expiry groups), then the same changes:
    # one at a time on one store, sorted by key (stable) through apply_changes on the other.
    folder = tmp_path_factory.mktemp("changes")
    stores = folder / "one-by-one", folder / "batched"
    for store in stores:
        with StoreWriter(store) as writer:
            for key, sid, _, expires in before:
                writer.add(key, (sid,), expires)
    with StoreWriter(stores[0]) as writer:
        for key, sid, add, expires in changes:
            if add:
                writer.add_one(key, sid, expires)
            else:
                writer.remove(key, (sid,))
    with StoreWriter(stores[1]) as writer:
        writer.apply_changes(sorted(changes, key=itemgetter(0)))
    assert raw_members(stores[1]) == raw_members(stores[0])
