"""The store digest: order-independent, sensitive to every served table, blind to node meta."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from enrich_server.cli import main
from enrich_server.digest import Digest, store_digest
from enrich_server.store import SegmentStore, StoreWriter, Tables, open_environment
from tests.conftest import StoreFactory

DROP_FILE = "Mapp_dmp_4_2026_1_1_0_0.tsv.gz"
#: What ``build`` writes unless told otherwise (one value of each served table).
CONTENT: dict[str, Any] = {
    "expires": 2_000_000_000,
    "name": "autos",
    "alias": b"ours",
    "title": "In market",
    "record": b'{"applied_at":1000,"sha256":"ab","lines":2}',
}


def build(path: Path, reverse: bool = False, **changes: Any) -> Path:
    """A store of ``CONTENT`` (with ``changes``). Segments are created in one order, since
    their ids are content; everything else goes in forward, or reversed and over several
    transactions, so the two layouts differ in key order of writes and in each value's
    grouping of memberships."""
    content = {**CONTENT, **changes}
    with StoreWriter(path) as writer:
        sports, news, other = (writer.intern(n) for n in ("sports", "news", content["name"]))
        dmp, _ = writer.create_dmp_segment(4, content["title"], "mapp_in_market", now=1000)
    writes: list[tuple[str, tuple[Any, ...]]] = [
        ("add", (b"uid:a", (sports,), 0)),
        ("add", (b"uid:a", (news,), content["expires"])),
        ("add", (b"uid:b", (other,), 0)),
        ("add", (b"uid:b", (dmp,), 1_500_000_000)),
        ("add", (b"uid:b", (news,), 0)),
        ("add", (b"domain:d.example", (news,), 0)),
        ("map_alias", (b"their-1", content["alias"])),
        ("map_alias", (b"their-2", b"other")),
        ("record_applied_file", (DROP_FILE, content["record"])),
        ("record_applied_file", ("Mapp_dmp_4_2026_1_1_0_1.tsv.gz", b"{}")),
    ]
    batches = [writes] if not reverse else [[write] for write in reversed(writes)]
    for batch in batches:
        with StoreWriter(path) as writer:
            for method, args in batch:
                getattr(writer, method)(*args)
    return path


def digest_of(path: Path) -> Digest:
    store = SegmentStore(path)
    try:
        return store_digest(store)
    finally:
        store.close()


def generation(path: Path) -> int:
    store = SegmentStore(path)
    try:
        return store.generation()
    finally:
        store.close()


def raw_members(path: Path) -> dict[bytes, bytes]:
    env = open_environment(path, readonly=True)
    try:
        with env.begin(db=env.open_db(Tables.MEMBERS, create=False)) as txn:
            return {bytes(k): bytes(v) for k, v in txn.cursor()}
    finally:
        env.close()


def set_meta(path: Path, **fields: int) -> None:
    env = open_environment(path)
    try:
        with env.begin(write=True, db=env.open_db(Tables.META)) as txn:
            for name, value in fields.items():
                txn.put(name.encode(), str(value).encode())
    finally:
        env.close()


def test_digest_same_content_in_any_order_is_the_same(tmp_path: Path) -> None:
    forward = build(tmp_path / "forward")
    reverse = build(tmp_path / "reverse", reverse=True)
    # The layouts really differ: uid:a's groups ([0, sports] then [expiry, news]) are stored
    # the other way round, and uid:b's too.
    raw_forward, raw_reverse = raw_members(forward), raw_members(reverse)
    assert raw_forward.keys() == raw_reverse.keys()
    assert raw_forward[b"uid:a"] != raw_reverse[b"uid:a"]
    assert raw_forward[b"uid:b"] != raw_reverse[b"uid:b"]
    assert generation(reverse) != generation(forward)
    assert digest_of(forward) == digest_of(reverse)


def test_digest_counts_every_record_of_every_part(tmp_path: Path) -> None:
    counts = {name: part.count for name, part in digest_of(build(tmp_path / "s")).parts.items()}
    assert counts == {
        "memberships": 3,  # identity keys
        "segments": 4,
        "dmp_segments": 1,
        "aliases": 2,
        "applied_files": 2,
    }


@pytest.mark.parametrize(
    ("change", "parts"),
    [
        pytest.param({"expires": 2_000_000_001}, {"memberships"}, id="one-expiry"),
        # A member's segment renamed: the segment and the memberships served by name.
        pytest.param({"name": "cars"}, {"segments", "memberships"}, id="one-segment-name"),
        pytest.param({"alias": b"someone-else"}, {"aliases"}, id="one-alias"),
        pytest.param({"title": "In-market"}, {"dmp_segments"}, id="one-dmp-title"),
        pytest.param({"record": b"{}"}, {"applied_files"}, id="one-applied-file"),
    ],
)
def test_digest_any_one_change_shows_in_its_part(
    tmp_path: Path, change: dict[str, Any], parts: set[str]
) -> None:
    base = digest_of(build(tmp_path / "base"))
    changed = digest_of(build(tmp_path / "changed", **change))
    assert changed.digest != base.digest
    differing = {name for name in base.parts if base.parts[name] != changed.parts[name]}
    assert differing == parts


def test_digest_ignores_node_meta_and_reports_the_sequence(tmp_path: Path) -> None:
    one, other = build(tmp_path / "one"), build(tmp_path / "other")
    set_meta(one, built_at=1, updated_at=2, generation=3, applied_sequence=42)
    set_meta(other, built_at=100, updated_at=200, generation=300, applied_sequence=42)
    assert digest_of(one) == digest_of(other)
    assert digest_of(one).sequence == 42
    set_meta(other, applied_sequence=43)
    assert digest_of(other).sequence == 43
    assert digest_of(other).digest == digest_of(one).digest  # the sequence is beside it


def test_digest_sequence_is_0_without_replication(tmp_path: Path) -> None:
    assert digest_of(build(tmp_path / "s")).sequence == 0


def test_digest_memberships_by_name_whatever_the_ids(make_store: StoreFactory) -> None:
    # The same memberships with the segments' ids swapped: they serve the same, only the
    # segments part (ids are content: DMPs see them) tells the stores apart.
    one = digest_of(make_store("uid:a\tx,y\nuid:b\ty\n"))
    other = digest_of(make_store("uid:b\ty\nuid:a\tx,y\n"))
    assert one.parts["memberships"] == other.parts["memberships"]
    assert one.parts["segments"] != other.parts["segments"]
    assert one.digest != other.digest


def test_view_reads_one_state_while_a_writer_commits(tmp_path: Path) -> None:
    path = build(tmp_path / "s")
    store = SegmentStore(path, writable=True)
    try:
        with store.view() as view:
            with store.writer() as writer:  # on the same environment: LMDB's rule
                writer.map_alias(b"their-3", b"late")
                writer.set_applied_sequence(7)
            assert view.applied_sequence() == 0
            assert [their for their, _ in view.aliases()] == [b"their-1", b"their-2"]
        after = store_digest(store)
        assert after.sequence == 7
        assert after.parts["aliases"].count == 3
    finally:
        store.close()


def test_cli_digest_prints_one_json_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = build(tmp_path / "s")
    set_meta(path, applied_sequence=12)
    assert main(["digest", "--store", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    printed = json.loads(lines[0])
    assert list(printed) == ["sequence", "digest"]
    assert printed["sequence"] == 12
    assert re.fullmatch("[0-9a-f]{64}", printed["digest"])
    assert printed["digest"] == digest_of(path).digest


def test_cli_digest_parts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = build(tmp_path / "s")
    assert main(["digest", "--store", str(path), "--parts"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = {name: dataclasses.asdict(p) for name, p in digest_of(path).parts.items()}
    assert printed["parts"] == expected


def test_cli_digest_missing_store_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["digest", "--store", str(tmp_path / "nope")]) == 1
    captured = capsys.readouterr()
    assert "no segment store at" in captured.err
    assert captured.out == ""
