"""The bulk build (``load --replace``, first loads): the transactional loader's semantics,
exact round trips, a full map, a full disk, bad lines in any chunk."""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.synth import snapshot_lines
from enrich_server import bulk, bulk_worker
from enrich_server.cli import main
from enrich_server.errors import SnapshotError, StoreError
from enrich_server.snapshot import export_lines, load_snapshots, parse_line
from enrich_server.store import SegmentStore
from tests.utils import ROOT

#: Lines that exercise every merge rule: repeated keys across lines and files, a later expiry
#: replacing an earlier one, removals (of known, unknown and just-added segments), a segment
#: twice in one line, keys normalised by the slow path, comments, CRLF.
TRICKY_A = (
    "# header\r\n"
    "uid:a\tx,y\t2000000000\r\n"
    "uid:b\tz\n"
    "\n"
    "ifa:AA-BB\tq,q,r\n"
    "eid:Src.COM:id1\ts\n"
    "uid:a\tx\t3000000000\n"
    "uid:c\tgone,-gone\n"
    "uid:d\t-unknown\n"
)
TRICKY_B = "uid:a\t-y,w\nuid:b\t-z\ndomain:Example.COM\tctx\nuid:e\tx,y,z\t4000000000\n"


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks and key ranges of a few KiB, so that small inputs cross many of both."""
    monkeypatch.setattr(bulk, "CHUNK_BYTES", 2048)
    monkeypatch.setattr(bulk, "RANGE_BYTES", 4096)


def _items(store: Path) -> dict[bytes, dict[str, int]]:
    reader = SegmentStore(store)
    try:
        return dict(reader.items())
    finally:
        reader.close()


def _leftovers(store: Path) -> list[str]:
    """What a plain store's directory holds besides its environment: no partial build, no
    temporary file, no generation should be there after a failed replace."""
    return sorted(set(os.listdir(store)) - {"data.mdb", "lock.mdb"})


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize(
    "newline",
    [
        pytest.param("\r\n", id="crlf"),  # a chunk with a lone CR goes line by line
        pytest.param("\n", id="lf"),  # parsed by column, the tricky lines declined to the parser
    ],
)
def test_bulk_build_merges_lines_as_the_transactional_loader(tmp_path: Path, newline: str) -> None:
    filler = "".join(snapshot_lines(300, seed=7))  # many chunks and ranges around the rest
    first = _write(tmp_path / "a.tsv", filler + TRICKY_A.replace("\r\n", newline))
    second = tmp_path / "b.tsv.gz"
    second.write_bytes(gzip.compress(TRICKY_B.encode()))
    # The transactional loader: a delta into a store holding one unrelated key.
    delta = tmp_path / "delta"
    load_snapshots([_write(tmp_path / "seed.tsv", "uid:seed\tseed\n")], delta, progress=False)
    load_snapshots([first, second], delta, progress=False)
    expected = _items(delta)
    del expected[b"uid:seed"]

    report = bulk.build([first, second], tmp_path / "bulk", progress=False, workers=2)
    got = _items(tmp_path / "bulk")
    assert got == expected
    assert got[b"uid:a"] == {"x": 3000000000, "w": 0}
    assert got[b"ifa:aa-bb"] == {"q": 0, "r": 0}
    assert got[b"eid:src.com:id1"] == {"s": 0}
    assert b"uid:b" not in got
    assert b"uid:c" not in got
    assert b"uid:d" not in got
    assert report.memberships_removed == 3  # y of uid:a, z of uid:b, gone of uid:c
    assert report.lines == 300 + 7 + 4


@pytest.mark.usefixtures("small_pieces")
def test_bulk_build_reports_bad_lines_of_every_chunk_with_their_numbers(tmp_path: Path) -> None:
    lines = list(snapshot_lines(200, seed=3))
    lines[5] = "uid:a\n"
    lines[150] = "nope:x\ty\n"
    snapshot = _write(tmp_path / "s.tsv", "".join(lines))
    store = tmp_path / "store"
    load_snapshots([_write(tmp_path / "live.tsv", "uid:live\tkept\n")], store, progress=False)
    with pytest.raises(SnapshotError) as info:
        load_snapshots([snapshot], store, replace=True, progress=False)
    assert [p.split(": ", 1)[0] for p in info.value.problems] == [
        f"{snapshot}:6",
        f"{snapshot}:151",
    ]
    assert _items(store) == {b"uid:live": {"kept": 0}}
    assert _leftovers(store) == []


#: Lines the columnar parse must not take as they are, each with the loader's complaint.
BAD_LINES = [
    pytest.param("uid:a\tx\t\n", "expires '' is not", id="empty-expires"),
    pytest.param("uid:a\tx,\n", "empty segment name", id="trailing-comma"),
    pytest.param("uid:a\tx,,y\n", "empty segment name", id="empty-name"),
    pytest.param("uid:a\t,x\n", "empty segment name", id="leading-comma"),
    pytest.param("uid:a\t\n", "empty segment name", id="empty-segments"),
    pytest.param("uid:a\n", "expected 2 or 3", id="one-field"),
    pytest.param("uid:a\tx\t1\t2\n", "expected 2 or 3", id="four-fields"),
    pytest.param("\tx\n", "has no namespace", id="empty-key"),
    pytest.param("uid:\tx\n", "has an empty id", id="empty-id"),
    pytest.param("uid:a\tx\t12a\n", "is not a unix time", id="letters-in-expires"),
    pytest.param("uid:a\tx\t+12\n", "is not a unix time", id="signed-expires"),
    pytest.param("uid:a\tx\t4294967296\n", "is past", id="expires-past-32-bits"),
    pytest.param("uid:a\tx\t99999999999\n", "is past", id="eleven-digit-expires"),
    pytest.param(f"uid:{'a' * 510}\tx\n", "longer than 511", id="long-key"),
    pytest.param("uid:a\tx y \n", "surrounding whitespace", id="space-in-name"),
    pytest.param("uid:a\tx\x01\n", "control characters", id="control-in-name"),
    pytest.param("uid:a\t\xff\n", "not valid UTF-8", id="bad-utf8"),
    pytest.param("uid:a\tx\ry\n", "control characters", id="lone-cr"),
    pytest.param("\t\n", "has no namespace", id="tab-only"),
]


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize(("bad", "why"), BAD_LINES)
def test_bulk_build_reports_a_bad_line_among_good_ones(tmp_path: Path, bad: str, why: str) -> None:
    lines = list(snapshot_lines(60, seed=9))
    lines[40] = bad.replace("\xff", "\udcff")
    snapshot = tmp_path / "s.tsv"
    snapshot.write_bytes("".join(lines).encode("utf-8", "surrogateescape"))
    with pytest.raises(SnapshotError) as info:
        bulk.build([snapshot], tmp_path / "store", progress=False, workers=2)
    transactional = tmp_path / "delta"
    load_snapshots([_write(tmp_path / "seed.tsv", "uid:seed\tseed\n")], transactional, False, False)
    with pytest.raises(SnapshotError) as loader:
        load_snapshots([snapshot], transactional, progress=False)
    assert info.value.problems == loader.value.problems
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(f"{snapshot}:41: ")
    assert why in info.value.problems[0]
    assert not (tmp_path / "store").exists()


def test_bulk_build_keeps_segments_in_line_order(tmp_path: Path) -> None:
    """Values list a line's segments as written (duplicates dropped), the order ``/enrich``
    serves them in; a key's later line with another expiry adds a group after the first."""
    text = "".join(snapshot_lines(3000, seed=13)) + "uid:twice\tb,a,b,c\nuid:twice\td\t4000000000\n"
    snapshot = _write(tmp_path / "s.tsv", text)
    bulk.build([snapshot], tmp_path / "store", progress=False, workers=2)
    reader = SegmentStore(tmp_path / "store")
    try:
        for line in text.splitlines()[:-2]:
            parsed = parse_line(line)
            served = reader.resolve([parsed.key], 0, 500).segments_json
            assert served == [f'"{name}"'.encode() for name in dict.fromkeys(parsed.add)]
        served = reader.resolve([b"uid:twice"], 0, 500).segments_json
        assert served == [b'"b"', b'"a"', b'"c"', b'"d"']
    finally:
        reader.close()


def test_export_after_bulk_build_is_the_input(tmp_path: Path) -> None:
    text = "".join(snapshot_lines(5000, seed=11))
    snapshot = _write(tmp_path / "s.tsv", text)
    store = tmp_path / "store"
    load_snapshots([snapshot], store, progress=False)
    expected: dict[bytes, dict[str, int]] = {}
    for line in text.splitlines():
        parsed = parse_line(line)
        expected[parsed.key] = dict.fromkeys(parsed.add, parsed.expires)
    exported = "".join(export_lines(_items(store).items()))
    assert {
        parse_line(line).key: dict.fromkeys(parse_line(line).add, parse_line(line).expires)
        for line in exported.splitlines()
    } == expected
    # ... and building the export again gives the same store.
    again = tmp_path / "again"
    load_snapshots([_write(tmp_path / "export.tsv", exported)], again, progress=False)
    assert _items(again) == expected


def test_bulk_build_grows_a_full_map(tmp_path: Path) -> None:
    snapshot = _write(tmp_path / "s.tsv", "".join(snapshot_lines(20_000, seed=5)) + TRICKY_A)
    store = tmp_path / "store"
    bulk.build([snapshot], store, progress=False, workers=2, map_size=1 << 20)
    assert (store / "data.mdb").stat().st_size > 1 << 20  # past the first map
    assert _items(store)[b"uid:a"] == {"x": 3000000000, "y": 2000000000}


def test_delta_and_compact_after_replace_go_to_the_current_generation(tmp_path: Path) -> None:
    store = tmp_path / "store"
    load_snapshots([_write(tmp_path / "0.tsv", "uid:old\tx\n")], store, progress=False)
    load_snapshots([_write(tmp_path / "1.tsv", "uid:a\tx,y\n")], store, True, False)
    delta = "uid:a\t-y,z\nuid:b\tx\nuid:c\tgone\t1000\n"  # uid:c expired long ago
    load_snapshots([_write(tmp_path / "2.tsv", delta)], store, False, False)
    assert os.readlink(store / "current") == "gen-000001"
    assert _items(store)[b"uid:a"] == {"x": 0, "z": 0}
    assert main(["compact", "--store", str(store)]) == 0
    assert _items(store) == {b"uid:a": {"x": 0, "z": 0}, b"uid:b": {"x": 0}}
    reader = SegmentStore(store)
    assert reader.generation() == 4  # first load, replace, delta, compact
    reader.close()


@contextlib.contextmanager
def _small_disk(where: Path, size: str) -> Iterator[bool]:
    """A tmpfs of ``size`` at ``where`` (True), or False when this process cannot mount."""
    where.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(where)], check=True)


def test_disk_full_during_build_leaves_the_live_store_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = _write(tmp_path / "big.tsv", "".join(snapshot_lines(40_000, seed=2)))
    with _small_disk(tmp_path / "disk", "2m") as mounted:
        store = tmp_path / "disk" / "store"
        load_snapshots([_write(tmp_path / "live.tsv", "uid:live\tkept\n")], store, False, False)
        if mounted:
            result = subprocess.run(
                [sys.executable, "-m", "enrich_server", "load", str(big), "--store", str(store),
                 "--replace", "--quiet"],
                capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
            )  # fmt: skip
            assert result.returncode == 1
            message = result.stderr
        else:  # no tmpfs without root: the disk fills at the seam where the build writes

            def full(path: Path, batches: object) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

            monkeypatch.setattr(bulk_worker, "write_spill", full)
            with pytest.raises(StoreError) as info:
                load_snapshots([big], store, replace=True, progress=False)
            message = str(info.value)
        assert f"no space left on the disk holding {store}" in message
        assert "the store was not changed" in message
        assert _leftovers(store) == []
        assert _items(store) == {b"uid:live": {"kept": 0}}
        reader = SegmentStore(store)
        assert reader.resolve([b"uid:live"], 0, 10).segments_json == [b'"kept"']
        reader.close()


def test_bulk_build_reports_a_corrupt_gzip_file_as_unreadable(tmp_path: Path) -> None:
    packed = bytearray(gzip.compress("".join(snapshot_lines(2000, seed=4)).encode()))
    packed[len(packed) // 2 : len(packed) // 2 + 64] = bytes(64)  # deflate data destroyed
    snapshot = tmp_path / "s.tsv.gz"
    snapshot.write_bytes(bytes(packed))
    store = tmp_path / "store"
    load_snapshots([_write(tmp_path / "live.tsv", "uid:live\tkept\n")], store, progress=False)
    with pytest.raises(SnapshotError) as info:
        load_snapshots([snapshot], store, replace=True, progress=False)
    assert info.value.problems[-1].startswith(f"{snapshot}:")
    assert "unreadable" in info.value.problems[-1]
    assert _items(store) == {b"uid:live": {"kept": 0}}
    assert _leftovers(store) == []
