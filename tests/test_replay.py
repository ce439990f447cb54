"""Replay: traffic captured by a real server, replayed against a known store in process and
against a live server, with exact match rates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from enrich_server.capture import read_capture
from enrich_server.cli import main
from enrich_server.config import load_config
from enrich_server.replay import format_report, replay
from enrich_server.store import StoreWriter
from tests.conftest import StoreFactory
from tests.utils import run_server

KEY = "replay-test-key-0123456789"
IFA_HIT = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"

SNAPSHOT = f"""uid:u-hit-1\tseg_a
uid:u-hit-2\tseg_b,seg_c
eid:liveramp.com:E-HIT\tseg_e
ifa:{IFA_HIT}\tseg_i
domain:news.example\tctx
"""

#: Each request, and the key types it carries -> whether one of them hit.
REQUESTS: list[dict[str, Any]] = [
    {"user": {"id": "u-hit-1"}, "site": {"domain": "news.example"}},
    {"user": {"id": "u-hit-2"}},
    {"user": {"id": "u-miss-1"}},
    {"user": {"id": "u-miss-2", "eids": [{"source": "liveramp.com", "uids": [{"id": "E-HIT"}]}]}},
    {"user": {"ext": {"eids": [{"source": "liveramp.com", "uids": [{"id": "E-MISS"}]}]}}},
    {"device": {"ifa": IFA_HIT.upper(), "ip": "198.51.100.1"}},
    {"device": {"ifa": "11111111-2222-3333-4444-555555555555"}},
    {"user": {"id": "u-hit-1"}, "regs": {"coppa": 1}},  # suppressed; the store still knows it
    {"site": {"domain": "other.example"}},
    {"app": {"bundle": "com.example.game"}},
    # synced by /uid: their id PLATFORM-ID is our u-hit-2
    {"user": {"eids": [{"source": "partner.example", "uids": [{"id": "PLATFORM-ID"}]}]}},
]
#: uid: 1, 2, 3, 4, 8 carry it, 1, 2, 8 hit; eid: 4, 5, 11 carry, 4 and 11 hit; ifa: 6, 7, 6
#: hits; domain: 1 and 9, 1 hits; bundle: 10, a miss.
EXPECTED_MATCHES = {
    "uid": {"carried": 5, "hit": 3, "rate": 0.6},
    "eid": {"carried": 3, "hit": 2, "rate": 0.6667},
    "ifa": {"carried": 2, "hit": 1, "rate": 0.5},
    "domain": {"carried": 2, "hit": 1, "rate": 0.5},
    "bundle": {"carried": 1, "hit": 0, "rate": 0.0},
    "gpid": {"carried": 0, "hit": 0, "rate": 0.0},
}
#: Segments each request is answered (request 8: contextual only, and it has none).
EXPECTED_SEGMENTS = [2, 2, 0, 1, 0, 1, 0, 0, 0, 0, 2]


@pytest.fixture
def store(make_store: StoreFactory) -> Path:
    path = make_store(SNAPSHOT)
    with StoreWriter(path) as writer:
        writer.map_alias(b"PLATFORM-ID", b"u-hit-2")
    return path


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f'[enrich.capture]\npath = "{tmp_path / "cap"}"\nsample = 1.0\nkey = "{KEY}"\n')
    return path


@pytest.fixture
def captured(store: Path, config_file: Path, tmp_path: Path) -> Path:
    """The capture directory of a real server that answered ``REQUESTS`` in order."""
    with run_server(store, "--config", str(config_file)) as server:
        for body in REQUESTS:
            assert httpx.post(f"{server.url}/enrich", json=body).status_code == 200
    return tmp_path / "cap"


def test_replay_in_process_reports_exact_match_rates(
    captured: Path, store: Path, config_file: Path
) -> None:
    requests = list(read_capture([captured]))
    assert [r.segments for r in requests] == EXPECTED_SEGMENTS
    report = replay(load_config(config_file), requests, store, KEY.encode())
    data = report.to_dict()
    assert data["requests"] == len(REQUESTS)
    assert data["status"] == {"200": len(REQUESTS)}
    assert data["match_rate"] == EXPECTED_MATCHES
    # u-hit-1, u-hit-2, E-HIT, the ifa, PLATFORM-ID: the misses stay hashed
    assert data["unhashed_ids"] == 5
    assert report.segments == EXPECTED_SEGMENTS
    assert data["segments_per_answer"] == data["captured_segments_per_answer"]
    assert data["segments_per_answer"]["mean"] == round(8 / 11, 3)
    assert data["suppressed"] == data["captured_suppressed"] == {"coppa": 1}
    assert data["holdout"] == 0
    assert data["differing_answers"] is None
    assert 0 < data["latency_ms"]["p50"] <= data["latency_ms"]["p99.9"]
    text = format_report(report, store)
    assert "    uid       60.0% of 5" in text
    assert "    eid       66.7% of 3" in text


def test_replay_against_a_live_server(
    captured: Path, store: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with run_server(store) as server:
        code = main(["replay", str(captured), "--store", str(store), "--config",
                     str(config_file), "--url", f"{server.url}/enrich", "--rate", "100",
                     "--json"])  # fmt: skip
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == f"{server.url}/enrich"
    assert data["status"] == {"200": len(REQUESTS)}
    assert data["errors"] == 0
    assert data["match_rate"] == EXPECTED_MATCHES
    assert data["differing_answers"] == 0
    assert data["segments_per_answer"]["mean"] == round(8 / 11, 3)
    assert data["latency_ms"]["p50"] > 0


def test_replay_against_another_snapshot(
    captured: Path, make_store: StoreFactory, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    newer = make_store("uid:u-miss-1\tseg_n\n")  # knows one user the old one missed
    code = main(["replay", str(captured), "--store", str(newer), "--key", KEY, "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["match_rate"]["uid"] == {"carried": 5, "hit": 1, "rate": 0.2}
    assert data["match_rate"]["eid"]["hit"] == 0
    assert data["unhashed_ids"] == 1


def test_replay_with_the_wrong_key_says_so(
    captured: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["replay", str(captured), "--store", str(store), "--key", "x" * 20])
    assert code == 2
    assert "the capture was made with another key" in capsys.readouterr().err


def test_replay_needs_a_key(
    captured: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", str(captured), "--store", str(store)]) == 2
    assert "replay needs the capture key" in capsys.readouterr().err


def test_replay_refuses_a_run_past_the_bounds(
    captured: Path, store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["replay", str(captured), "--store", str(store), "--key", KEY,
                 "--url", "http://127.0.0.1:9/enrich", "--rate", "0.01"])  # fmt: skip
    assert code == 2
    assert "a replay sends at most" in capsys.readouterr().err
