from __future__ import annotations

import gzip
import io
from pathlib import Path

import pytest

from enrich_server.errors import SnapshotError
from enrich_server.progress import Progress
from enrich_server.snapshot import MAX_REPORTED_PROBLEMS, load_snapshots, parse_line
from enrich_server.store import SegmentStore


def test_parse_line_full() -> None:
    line = parse_line("ifa:AA-BB\tcat_owners,-dogs\t1798761600")
    assert (line.key, line.add, line.remove, line.expires) == (
        b"ifa:aa-bb",
        ["cat_owners"],
        ["dogs"],
        1798761600,
    )


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("uid:a", "expected 2 or 3 tab-separated fields"),
        ("uid:a\tx\t1\textra", "found 4"),
        ("zzz:a\tx", "unknown namespace"),
        ("uid:a\t", "empty segment name"),
        ("uid:a\tx,,y", "empty segment name"),
        ("uid:a\tx\tsoon", "not a unix time"),
        ("uid:a\tx\t-5", "not a unix time"),
        ("uid:a\tx\t99999999999", "past 4294967295"),
        ("uid:a\t x", "surrounding whitespace"),
        ("uid:a\tx\x07", "control characters"),
        ("uid:a\t" + "s" * 256, "longer than 255 bytes"),
    ],
)
def test_parse_line_errors_say_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_line(text)


def test_load_plain_and_gzip_with_comments_and_crlf(tmp_path: Path) -> None:
    plain = tmp_path / "a.tsv"
    plain.write_bytes(b"# comment\r\n\r\nuid:a\tx,y\r\n")
    packed = tmp_path / "b.tsv.gz"
    packed.write_bytes(gzip.compress(b"domain:d.com\tctx\t4102444800\n"))
    report = load_snapshots([plain, packed], tmp_path / "store", progress=False)
    assert report.lines == 2
    store = SegmentStore(tmp_path / "store")
    assert store.memberships(b"uid:a") == {"x": 0, "y": 0}
    assert store.memberships(b"domain:d.com") == {"ctx": 4102444800}


def test_load_bad_lines_reported_with_file_and_line_nothing_applied(tmp_path: Path) -> None:
    good = tmp_path / "good.tsv"
    good.write_text("uid:a\tx\n")
    load_snapshots([good], tmp_path / "store", progress=False)
    bad = tmp_path / "bad.tsv"
    bad.write_text("uid:b\ty\n# fine\nuid:c\n\nnope:c\tz\nuid:d\tw\n")
    with pytest.raises(SnapshotError) as info:
        load_snapshots([bad], tmp_path / "store", replace=True, progress=False)
    assert info.value.problems == [
        f"{bad}:3: expected 2 or 3 tab-separated fields (key, segments[, expires]), found 1",
        f"{bad}:5: unknown namespace 'nope' (expected one of uid, eid, ifa, domain, bundle, gpid)",
    ]
    store = SegmentStore(tmp_path / "store")
    assert store.memberships(b"uid:a") == {"x": 0}  # replace was rolled back too
    assert store.memberships(b"uid:b") is None


def test_load_reports_bounded_number_of_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("junk\n" * (MAX_REPORTED_PROBLEMS + 5))
    with pytest.raises(SnapshotError) as info:
        load_snapshots([bad], tmp_path / "store", progress=False)
    assert len(info.value.problems) == MAX_REPORTED_PROBLEMS
    assert info.value.more == 5
    assert "and 5 more bad line(s)" in str(info.value)


def test_load_failed_first_build_leaves_nothing_behind(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_text("uid:a\tx\nbad line\n")
    with pytest.raises(SnapshotError):
        load_snapshots([bad], tmp_path / "store", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv"]


def test_load_invalid_utf8_and_truncated_gzip(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tsv"
    bad.write_bytes(b"uid:a\tx\nuid:\xff\ty\n")
    truncated = tmp_path / "cut.tsv.gz"
    truncated.write_bytes(gzip.compress(b"uid:b\ty\n" * 5000)[:-40])
    with pytest.raises(SnapshotError) as info:
        load_snapshots([bad, truncated], tmp_path / "store", progress=False)
    assert info.value.problems[0].startswith(f"{bad}:2: not valid UTF-8")
    assert info.value.problems[1].startswith(f"{truncated}:")
    assert "unreadable" in info.value.problems[1]


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="no such file"):
        load_snapshots([tmp_path / "absent.tsv"], tmp_path / "store", progress=False)


def test_load_delta_merges_updates_expiry_and_removes(tmp_path: Path) -> None:
    base = tmp_path / "base.tsv"
    base.write_text("uid:a\tx,y\t2000000000\nuid:b\tz\n")
    load_snapshots([base], tmp_path / "store", progress=False)
    delta = tmp_path / "delta.tsv"
    delta.write_text("uid:a\tx\t3000000000\nuid:a\t-y,w\nuid:b\t-z\nuid:c\t-unknown\n")
    report = load_snapshots([delta], tmp_path / "store", progress=False)
    assert report.memberships_removed == 2
    store = SegmentStore(tmp_path / "store")
    assert store.generation() == 2
    assert store.memberships(b"uid:a") == {"x": 3000000000, "w": 0}
    assert store.memberships(b"uid:b") is None


def test_load_replace_drops_old_memberships(tmp_path: Path) -> None:
    first = tmp_path / "1.tsv"
    first.write_text("uid:a\tx\n")
    second = tmp_path / "2.tsv"
    second.write_text("uid:b\ty\n")
    load_snapshots([first], tmp_path / "store", progress=False)
    load_snapshots([second], tmp_path / "store", replace=True, progress=False)
    store = SegmentStore(tmp_path / "store")
    assert store.memberships(b"uid:a") is None
    assert store.memberships(b"uid:b") == {"y": 0}


def test_progress_plain_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    progress = Progress("load", 1000, stream=out, log_interval=0.0)
    progress.update(500, 10)
    progress.finish(20)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "50.0%" in lines[0]
    assert "10 lines" in lines[0]
    assert "100.0%" in lines[1]
    assert "\r" not in out.getvalue()
