"""The CLI, run in-process through ``main(argv)`` and once as a real subprocess."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.synth import snapshot_lines
from enrich_server.cli import main
from enrich_server.store import SegmentStore
from tests.conftest import StoreFactory
from tests.gpp_strings import gpp_string, us_section
from tests.test_privacy import BITFIELD


def test_load_then_lookup(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    snapshot = tmp_path / "s.tsv.gz"
    snapshot.write_bytes(gzip.compress(b"uid:u\ta,b\nifa:AA\tc\t4102444800\n"))
    store = tmp_path / "store"
    assert main(["load", str(snapshot), "--store", str(store), "--quiet"]) == 0
    assert "loaded 2 lines" in capsys.readouterr().out
    assert main(["lookup", "--store", str(store), "uid:u", "ifa:aa", "uid:none"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        {
            "key": "uid:u",
            "found": True,
            "segments": {
                "a": {"expires": None, "expired": False},
                "b": {"expires": None, "expired": False},
            },
        },
        {
            "key": "ifa:aa",
            "found": True,
            "segments": {"c": {"expires": 4102444800, "expired": False}},
        },
        {"key": "uid:none", "found": False, "segments": {}},
    ]


def test_load_bad_line_exit_1_with_file_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    snapshot = tmp_path / "s.tsv"
    snapshot.write_text("uid:u\ta\nuid:v\ta\tlater\n")
    assert main(["load", str(snapshot), "--store", str(tmp_path / "store"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "nothing was applied" in err
    assert f"{snapshot}:2: expires 'later' is not a unix time" in err
    assert not (tmp_path / "store").exists()


def test_lookup_bad_key_exit_2(
    make_store: StoreFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store("uid:u\ta\n")
    assert main(["lookup", "--store", str(store), "user:u"]) == 2
    assert "unknown namespace 'user'" in capsys.readouterr().err


def test_stats_json(make_store: StoreFactory, capsys: pytest.CaptureFixture[str]) -> None:
    store = make_store("uid:u\ta,b\nuid:v\ta\ndomain:d\tc\n")
    assert main(["stats", "--store", str(store), "--json", "--top", "2"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["identities"] == 3
    assert stats["by_namespace"] == {"domain": 1, "uid": 2}
    assert next(iter(stats["segment_members"].items())) == ("a", 2)
    assert len(stats["segment_members"]) == 2


def test_stats_text(make_store: StoreFactory, capsys: pytest.CaptureFixture[str]) -> None:
    store = make_store("uid:u\ta\n")
    assert main(["stats", "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "identities   1" in out
    assert "  uid:       1" in out


def test_missing_store_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", "--store", str(tmp_path / "nope")]) == 1
    assert "no segment store at" in capsys.readouterr().err


def test_serve_bad_config_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[server]\nporty = 1\n")
    assert main(["serve", "--config", str(config)]) == 2
    assert "unknown key 'porty' in [server]" in capsys.readouterr().err


def test_serve_missing_store_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--store", str(tmp_path / "nope")]) == 1
    assert "no segment store at" in capsys.readouterr().err


def test_serve_help_lists_every_environment_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "enrich_server", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for variable in ("ENRICH_SERVER_PORT", "ENRICH_ENRICH_MAX_BODY", "ENRICH_SERVER_STORE"):
        assert variable in result.stdout


def test_load_progress_on_stderr_when_not_a_tty(tmp_path: Path) -> None:
    snapshot = tmp_path / "s.tsv"
    snapshot.write_text("uid:u\ta\n")
    result = subprocess.run(
        [sys.executable, "-m", "enrich_server", "load", str(snapshot), "--store",
         str(tmp_path / "store")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "load [########################] 100.0% 1 lines" in result.stderr
    assert "write [########################] 100.0% 1 lines" in result.stderr  # the bulk build
    assert "\r" not in result.stderr
    assert result.stdout.startswith("loaded 1 lines")


def test_load_logs_a_json_event(tmp_path: Path) -> None:
    snapshot = tmp_path / "s.tsv"
    snapshot.write_text("uid:u\ta\nuid:v\tb\n")
    result = subprocess.run(
        [sys.executable, "-m", "enrich_server", "load", str(snapshot), "--store",
         str(tmp_path / "store"), "--quiet"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    loaded = next(event for event in events if event["msg"] == "snapshot loaded")
    assert (loaded["lines"], loaded["identities"], loaded["replace"]) == (2, 2, False)


def test_export_round_trip_is_exact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "source.tsv"
    source.write_text(
        "".join(snapshot_lines(300))
        + "uid:u\ta,b\t4102444800\nuid:u\tc\nuid:u\t-b\nifa:AA\tx\t1000\n"
    )
    assert main(["load", str(source), "--store", str(tmp_path / "one"), "--quiet"]) == 0
    exported = tmp_path / "exported.tsv"
    assert main(["export", "--store", str(tmp_path / "one"), "--out", str(exported)]) == 0
    assert main(["load", str(exported), "--store", str(tmp_path / "two"), "--quiet"]) == 0
    capsys.readouterr()
    one, two = SegmentStore(tmp_path / "one"), SegmentStore(tmp_path / "two")
    assert list(one.items()) == list(two.items())
    assert len(list(one.items())) == 302
    assert one.memberships(b"uid:u") == {"a": 4102444800, "c": 0}
    assert "ifa:aa\tx\t1000\n" in exported.read_text()  # expired memberships are kept


def test_segments_lists_member_counts(
    make_store: StoreFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store("uid:u\ta,b\nuid:v\ta\nuid:w\tc\nuid:w\t-c\n")
    assert main(["segments", "--store", str(store)]) == 0
    assert capsys.readouterr().out.splitlines() == ["a\t2", "b\t1", "c\t0"]


def test_compact_drops_expired_memberships(
    make_store: StoreFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    store = make_store(
        "uid:a\told\t1000\nuid:a\tkept\nuid:b\tgone\t2000\nuid:c\tlater\t4102444800\n"
    )
    assert main(["compact", "--store", str(store)]) == 0
    assert "removed 2 expired memberships; 1 identities left with none" in capsys.readouterr().out
    reader = SegmentStore(store)
    assert reader.memberships(b"uid:a") == {"kept": 0}
    assert reader.memberships(b"uid:b") is None
    assert reader.memberships(b"uid:c") == {"later": 4102444800}
    assert reader.generation() == 2
    reader.close()
    assert main(["compact", "--store", str(store)]) == 0
    assert "removed 0 expired memberships" in capsys.readouterr().out


def test_compact_missing_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compact", "--store", str(tmp_path / "nope")]) == 1
    assert "no segment store at" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()


def test_consent_explains_a_tcf_string(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["consent", BITFIELD]) == 0
    out = capsys.readouterr().out
    assert "purposes with consent: 1, 3, 9, 10" in out
    assert "purpose 4: by legitimate interest" in out
    assert out.endswith("user-level segments: allowed\n")
    monkeypatch.setenv("ENRICH_PRIVACY_GDPR_VENDOR_ID", "2")  # consent, but no LI for purpose 4
    assert main(["consent", BITFIELD]) == 1
    out = capsys.readouterr().out
    assert "our vendor 2: consent yes, legitimate interest no" in out
    assert "purpose 4: no legal basis" in out
    assert out.endswith("user-level segments: withheld (gdpr_denied)\n")
    assert main(["consent", "not-a-tc-string"]) == 1
    out = capsys.readouterr().out
    assert "TCF v2 string: unreadable" in out
    assert out.endswith("withheld (gdpr_no_consent)\n")


def test_consent_explains_a_gpp_string_field_by_field(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    opted_out = gpp_string({7: us_section({18: 1})})  # usnat: SaleOptOut = 1
    assert main(["consent", opted_out, "--gpp-sid", "7"]) == 1
    out = capsys.readouterr().out
    assert "section 7 (usnat), applies; fields as sent:" in out
    assert "  SaleOptOut = 1: withholds (gpp_sale_opt_out)" in out
    assert "  Gpc = absent: ok" in out
    assert out.endswith("user-level segments: withheld (gpp_sale_opt_out)\n")
    assert main(["consent", opted_out, "--gpp-sid", "8"]) == 1  # 8 is not carried
    assert "section 8: listed in gpp_sid but not carried: unreadable" in capsys.readouterr().out
    monkeypatch.setenv("ENRICH_PRIVACY_US_RULES", "opt_outs")
    gpc = gpp_string({7: us_section({}) + ".YA"})  # GPC sub-section: Gpc = true
    assert main(["consent", gpc]) == 0
    out = capsys.readouterr().out
    assert "  Gpc = true: not checked (us_rules = opt_outs)" in out
    assert out.endswith("user-level segments: allowed\n")
    with pytest.raises(SystemExit):
        main(["consent", gpc, "--gpp-sid", "7,x"])
    assert "not a comma-separated list of ids" in capsys.readouterr().err
