"""DMP drop files: names, lines, exactly-once application, the watched directory."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from enrich_server.config import PlatformConfig
from enrich_server.ingest.dropfiles import (
    DropFileError,
    apply_file,
    pending_files,
    process_directory,
    read_mutations,
    segment_of,
)
from enrich_server.store import SegmentStore, StoreWriter
from tests.conftest import StoreFactory
from tests.utils import ROOT

PLATFORMS = {99999: PlatformConfig(id=99999, name="mapp", ttl=3600)}


@pytest.fixture
def dmp_store(make_store: StoreFactory) -> tuple[Path, int]:
    """A store with one DMP segment of platform 99999 and an existing member."""
    store = make_store("uid:old\tother\n")
    with StoreWriter(store) as writer:
        sid, _ = writer.create_dmp_segment(99999, "Drop", None)
        writer.add(b"uid:kept", (sid,), 0)
    return store, sid


def _drop(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_bytes(gzip.compress(text.encode()))
    old = time.time() - 60  # settled
    os.utime(path, (old, old))
    return path


def _members(store: Path, *users: str) -> list[dict[str, int] | None]:
    opened = SegmentStore(store)
    try:
        return [opened.memberships(f"uid:{u}".encode()) for u in users]
    finally:
        opened.close()


@pytest.mark.parametrize(
    "name",
    [
        "Mapp_dmp_12_2026_11_26_3_5.tsv",  # not gzip-named
        "Mapp_dmp_x_2026_11_26_03_05.tsv.gz",
        "Mapp_dmp_12_2026_13_26_03_05.tsv.gz",  # month 13
        "Mapp_dmp_12_2026_02_30_03_05.tsv.gz",  # 30 February
        "Mapp_dmp_12_2026_11_26_24_05.tsv.gz",
        "Mapp_dmp_0_2026_11_26_03_05.tsv.gz",
        "mapp_dmp_12_2026_11_26_03_05.tsv.gz",
        "Mapp_dmp_12_2026_11_26_03_05.tsv.gz.bak",
        "../Mapp_dmp_12_2026_11_26_03_05.tsv.gz",
    ],
)
def test_bad_names(name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        segment_of(name)


def test_good_name() -> None:
    assert segment_of("Mapp_dmp_12345_2026_1_2_3_4.tsv.gz") == 12345


def test_lines_and_their_errors(tmp_path: Path) -> None:
    good = _drop(tmp_path, "a.gz", "u1\nu2\tadd\n\nu3\tremove\r\n")
    assert read_mutations(good) == [(b"uid:u1", True), (b"uid:u2", True), (b"uid:u3", False)]
    bad = _drop(tmp_path, "b.gz", "u1\nu 2\nu3\tdelete\nu4\ta\tb\n\xff\n")
    with pytest.raises(DropFileError) as caught:
        read_mutations(bad)
    assert [p.split(": ")[0] for p in caught.value.problems] == [
        "b.gz:2",
        "b.gz:3",
        "b.gz:4",
    ]
    (tmp_path / "c.gz").write_bytes(gzip.compress(b"u1\n")[:-6])  # truncated
    with pytest.raises(DropFileError, match="not a readable gzip"):
        read_mutations(tmp_path / "c.gz")
    (tmp_path / "d.gz").write_bytes(b"plain text\n")
    with pytest.raises(DropFileError, match="not a readable gzip"):
        read_mutations(tmp_path / "d.gz")


def test_invalid_utf8_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "e.gz"
    path.write_bytes(gzip.compress(b"u1\n\xff\xfe\n"))
    with pytest.raises(DropFileError, match=r"e\.gz:2: not valid UTF-8"):
        read_mutations(path)


def test_applied_exactly_once_with_platform_ttl(
    dmp_store: tuple[Path, int], tmp_path: Path
) -> None:
    store, sid = dmp_store
    path = _drop(tmp_path, f"Mapp_dmp_{sid}_2026_11_26_03_05.tsv.gz", "new1\nkept\tremove\n")
    with StoreWriter(store) as writer:
        result = apply_file(path, writer, PLATFORMS, now=1_000_000)
    assert (result.added, result.removed, result.skipped) == (1, 1, False)
    assert _members(store, "new1", "kept") == [{str(sid): 1_003_600}, None]
    with StoreWriter(store) as writer:
        again = apply_file(path, writer, PLATFORMS, now=2_000_000)
    assert again.skipped
    assert _members(store, "new1") == [{str(sid): 1_003_600}]  # not re-applied
    path.write_bytes(gzip.compress(b"new1\nother\n"))  # same name, other content
    with pytest.raises(DropFileError, match="a different file named"), StoreWriter(store) as writer:
        apply_file(path, writer, PLATFORMS, now=2_000_000)
    assert _members(store, "other") == [None]


def test_file_for_an_unknown_segment_is_refused(
    dmp_store: tuple[Path, int], tmp_path: Path
) -> None:
    store, _ = dmp_store
    path = _drop(tmp_path, "Mapp_dmp_1_2026_11_26_03_05.tsv.gz", "u1\n")  # "other", not DMP
    with (
        pytest.raises(DropFileError, match="not a segment a DMP created"),
        StoreWriter(store) as writer,
    ):
        apply_file(path, writer, PLATFORMS)


def test_watched_directory(dmp_store: tuple[Path, int], tmp_path: Path) -> None:
    store, sid = dmp_store
    drop = tmp_path / "drop"
    drop.mkdir()
    good = _drop(drop, f"Mapp_dmp_{sid}_2026_11_26_03_05.tsv.gz", "w1\nw2\n")
    bad = _drop(drop, f"Mapp_dmp_{sid}_2026_11_26_03_06.tsv.gz", "w3\nw 4\n")
    misnamed = _drop(drop, "users.tsv.gz", "w5\n")
    _drop(drop, ".hidden", "w6\n")
    uploading = drop / f"Mapp_dmp_{sid}_2026_11_26_03_07.tsv.gz"
    uploading.write_bytes(gzip.compress(b"w7\n"))  # fresh mtime: not settled yet
    assert [p.name for p in pending_files(drop, settle=2.0)] == [
        misnamed.name,
        good.name,
        bad.name,
    ]

    def write(job):  # type: ignore[no-untyped-def]
        with StoreWriter(store) as writer:
            return job(writer)

    outcomes = process_directory(drop, write, PLATFORMS, settle=2.0)
    assert [type(o).__name__ for o in outcomes] == ["DropFileError", "FileResult", "DropFileError"]
    assert (drop / "applied" / good.name).is_file()
    assert (drop / "rejected" / bad.name).is_file()
    assert "2: userid" in (drop / "rejected" / f"{bad.name}.why").read_text()
    assert (drop / "rejected" / misnamed.name).is_file()
    assert uploading.is_file()  # left for a later scan
    w1, w3 = _members(store, "w1", "w3")
    assert w1 is not None
    assert set(w1) == {str(sid)}
    assert w3 is None


def test_cli_ingest_files_and_watch(dmp_store: tuple[Path, int], tmp_path: Path) -> None:
    store, sid = dmp_store
    good = _drop(tmp_path, f"Mapp_dmp_{sid}_2026_11_26_03_05.tsv.gz", "c1\nc2\n")
    bad = _drop(tmp_path, f"Mapp_dmp_{sid}_2026_11_26_03_06.tsv.gz", "c3\nc4\tzap\n")
    command = [sys.executable, "-m", "enrich_server", "ingest", "--store", str(store)]
    run = subprocess.run(
        [*command, str(good), str(bad)], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert run.returncode == 1
    assert "2 added" in run.stdout
    assert f"{bad.name}:2: op 'zap' is not add or remove" in run.stderr
    again = subprocess.run(
        [*command, str(good)], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert again.returncode == 0
    assert "already applied" in again.stdout
    assert _members(store, "c1", "c3") == [{str(sid): 0}, None]  # no --config: no ttl
    drop = tmp_path / "drop"
    drop.mkdir()
    _drop(drop, f"Mapp_dmp_{sid}_2026_11_26_04_00.tsv.gz", "c9\n")
    watched = subprocess.run(
        [*command, "--watch", str(drop), "--once"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert watched.returncode == 0, watched.stderr
    assert _members(store, "c9") == [{str(sid): 0}]
    assert list((drop / "applied").iterdir())
    usage = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    assert usage.returncode == 2
    assert "needs FILE" in usage.stderr
