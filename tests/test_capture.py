"""Capture: sanitising, rotating files, the hot path's switch, configuration, a real server."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from enrich_server.app import enrich_endpoint
from enrich_server.capture import (
    HASH_HEX,
    HASH_PREFIX,
    Capture,
    CaptureFiles,
    hash_id,
    key_id,
    read_capture,
    sanitise,
)
from enrich_server.config import CaptureConfig, load_config
from enrich_server.enrich import EMPTY_BODY, EnrichEndpoint
from enrich_server.errors import ConfigError
from enrich_server.guard import LoadGuard
from enrich_server.metrics import Tally
from enrich_server.privacy import Privacy
from enrich_server.store import SegmentStore
from tests.conftest import StoreFactory
from tests.utils import run_server

KEY = "capture-test-key-0123456789"
RAW_KEY = KEY.encode()
IFA = "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE"


def hashed(ident: str) -> str:
    return hash_id(RAW_KEY, ident.encode())


def full_request() -> dict[str, Any]:
    return {
        "id": "req-1",
        "user": {
            "id": "user-raw-1",
            "buyeruid": "buyer-raw-1",
            "eids": [{"source": "liveramp.com", "uids": [{"id": "eid-raw-1", "atype": 3}]}],
            "ext": {
                "consent": "CPxyz",
                "eids": [{"source": "id5-sync.com", "uids": [{"id": "eid-raw-2"}]}],
            },
            "geo": {"lat": 48.85, "lon": 2.35, "country": "FRA"},
        },
        "device": {
            "ifa": IFA,
            "ip": "203.0.113.7",
            "ipv6": "2001:db8::7",
            "didsha1": "device-raw-sha1",
            "geo": {"lat": 48.85, "lon": 2.35, "city": "Paris"},
            "ua": "Mozilla/5.0",
        },
        "site": {"domain": "news.example"},
        "imp": [{"id": "1", "ext": {"gpid": "/1/home"}}],
    }


def test_sanitise_hashes_every_user_id_and_drops_ips_and_position() -> None:
    body = json.dumps(full_request()).encode()
    out = sanitise(body, RAW_KEY)
    assert out is not None
    user, device = out["user"], out["device"]
    assert user["id"] == hashed("user-raw-1")
    assert user["buyeruid"] == hashed("buyer-raw-1")
    assert user["eids"][0] == {
        "source": "liveramp.com",
        "uids": [{"id": hashed("eid-raw-1"), "atype": 3}],
    }
    assert user["ext"]["eids"][0]["uids"][0]["id"] == hashed("eid-raw-2")
    assert user["ext"]["consent"] == "CPxyz"  # consent is policy, not identity: kept
    assert user["geo"] == {"country": "FRA"}
    assert device["ifa"] == hashed(IFA.lower())  # the form its ifa: key takes
    assert device["didsha1"] == hashed("device-raw-sha1")
    assert "ip" not in device
    assert "ipv6" not in device
    assert device["geo"] == {"city": "Paris"}
    assert out["site"] == {"domain": "news.example"}
    assert out["imp"] == [{"id": "1", "ext": {"gpid": "/1/home"}}]
    text = json.dumps(out)
    for raw in ("user-raw-1", "buyer-raw-1", "eid-raw-1", "eid-raw-2", IFA, IFA.lower(),
                "203.0.113.7", "2001:db8::7", "device-raw-sha1", "48.85"):  # fmt: skip
        assert raw not in text


def test_hash_is_keyed_prefixed_and_stable() -> None:
    one = hashed("user-raw-1")
    assert one.startswith(HASH_PREFIX)
    assert len(one) == len(HASH_PREFIX) + HASH_HEX
    assert one == hashed("user-raw-1")
    assert one != hash_id(b"another-key-0123456789", b"user-raw-1")
    assert key_id(RAW_KEY) != key_id(b"another-key-0123456789")


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # a non-string id could still be an id: dropped (the server reads no key from it)
        ({"user": {"id": 12345, "buyeruid": {"x": 1}}}, {"user": {}}),
        ({"user": "raw-user-in-a-string"}, {}),
        ({"device": ["raw"]}, {}),
        ({"user": {"eids": "raw"}}, {"user": {}}),
        (
            {"user": {"eids": ["raw", {"source": "s", "uids": ["raw", {"id": 7}]}]}},
            {"user": {"eids": [{"source": "s", "uids": [{}]}]}},
        ),
        # nobody: an all-zero ifa and empty ids stay, so they still make no key
        (
            {"device": {"ifa": "00000000-0000-0000-0000-000000000000"}},
            {"device": {"ifa": "00000000-0000-0000-0000-000000000000"}},
        ),
        ({"user": {"id": ""}}, {"user": {"id": ""}}),
        ({"device": {"geo": "raw place"}}, {"device": {}}),
    ],
)
def test_sanitise_odd_shapes(body: dict[str, Any], expected: dict[str, Any]) -> None:
    assert sanitise(json.dumps(body).encode(), RAW_KEY) == expected


@pytest.mark.parametrize("body", [b"not json", b'["a", "list"]', b'"user-raw-1"', b"[" * 5000])
def test_what_is_not_a_json_object_is_not_captured(body: bytes) -> None:
    assert sanitise(body, RAW_KEY) is None


def test_files_rotate_and_keep_the_newest(tmp_path: Path) -> None:
    files = CaptureFiles(tmp_path, max_bytes=100, keep=3)
    for n in range(20):
        files.write(b'{"n": %d, "pad": "%s"}\n' % (n, b"x" * 40))
    files.close()
    kept = sorted(tmp_path.glob("capture-*.jsonl"), key=lambda p: int(p.stem.split("-")[2]))
    assert len(kept) == 3
    lines = [json.loads(line) for path in kept for line in path.read_text().splitlines()]
    assert [line["n"] for line in lines] == list(range(14, 20))  # two lines a file
    assert all(path.stat().st_size <= 200 for path in kept)


def test_rotation_removes_dead_workers_files_not_live_ones(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_file = tmp_path / f"capture-{int(dead.stdout)}-1.jsonl"
    live_file = tmp_path / "capture-1-1.jsonl"  # pid 1 runs as long as the machine does
    for path in (dead_file, live_file):
        path.write_text("{}\n")
    files = CaptureFiles(tmp_path, max_bytes=10, keep=1)
    files.write(b'{"a": 1}\n')
    files.close()
    assert not dead_file.exists()
    assert live_file.exists()
    assert files.current().read_text() == '{"a": 1}\n'


def endpoint_with(capture: Capture | None, store_path: Path | None = None) -> EnrichEndpoint:
    endpoint = EnrichEndpoint(load_config().enrich, Privacy(), LoadGuard(0), Tally())
    endpoint.capture = capture
    if store_path is not None:
        endpoint.store = SegmentStore(store_path)
    return endpoint


def call(endpoint: EnrichEndpoint, body: bytes) -> tuple[int, bytes, bytes, object]:
    return endpoint.respond(body, 0.0, endpoint.answer, EMPTY_BODY)


def test_sampled_out_writes_nothing(tmp_path: Path, make_store: StoreFactory) -> None:
    config = CaptureConfig(path=str(tmp_path / "cap"), sample=0.0, key=KEY)
    endpoint = endpoint_with(Capture(config, Privacy()), make_store("uid:u1\ts1\n"))
    for _ in range(1000):
        assert call(endpoint, b'{"user": {"id": "u1"}}')[2] == b'{"segment_ids":["s1"]}'
    assert not (tmp_path / "cap").exists()


def test_a_line_records_answer_suppression_and_holdout(
    tmp_path: Path, make_store: StoreFactory
) -> None:
    config = CaptureConfig(path=str(tmp_path / "cap"), sample=1.0, key=KEY)
    held = {b"uid:held"}
    capture = Capture(config, Privacy(), held_out=held.__contains__)
    endpoint = endpoint_with(capture, make_store("uid:u1\ts1,s2\ndomain:d.example\tctx\n"))
    bodies = [
        {"user": {"id": "u1"}},
        {"user": {"id": "u1"}, "site": {"domain": "d.example"}, "regs": {"coppa": 1}},
        {"user": {"id": "held"}},
    ]
    for body in bodies:
        call(endpoint, json.dumps(body).encode())
    call(endpoint, b"not json")
    lines = list(read_capture([tmp_path / "cap"]))
    assert [(line.segments, line.suppressed, line.holdout) for line in lines] == [
        (2, None, False),
        (1, "coppa", False),
        (0, None, True),
    ]
    assert {line.key_id for line in lines} == {key_id(RAW_KEY)}
    assert lines[0].body == {"user": {"id": hashed("u1")}}


def test_a_write_error_turns_capture_off_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    capture = Capture(CaptureConfig(path=str(blocker / "cap"), sample=1.0, key=KEY), Privacy())
    endpoint = endpoint_with(capture)
    with caplog.at_level(logging.ERROR, logger="enrich_server.capture"):
        for _ in range(3):
            assert call(endpoint, b'{"user": {"id": "u1"}}')[0] == 200
    assert capture.sample < 0
    assert [r.message for r in caplog.records] == ["capture failed; capture is off until restart"]


def test_config_inline_table_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[enrich]\ncapture = { path = "/var/cap", sample = 0.5 }\n')
    config = load_config(path, {"ENRICH_ENRICH_CAPTURE_KEY": KEY})
    assert config.capture == CaptureConfig(path="/var/cap", sample=0.5, key=KEY)
    path.write_text("[enrich.capture]\nmax_bytes = 1000\nkeep = 2\n")
    assert load_config(path).capture == CaptureConfig(max_bytes=1000, keep=2)


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('path = "/var/cap"', "[enrich.capture] path is set but key is not"),
        ('path = "/var/cap"\nkey = "short"', "[enrich.capture] key: shorter than 16 characters"),
        ("sample = 1.5", "[enrich.capture] sample: 1.5 must be between 0 and 1"),
        ("keep = 0", "[enrich.capture] keep: 0 must be at least 1"),
        ('sample = "all"', "[enrich.capture] sample: expected float, got str"),
        ("paths = 1", "unknown key 'paths' in [enrich.capture]"),
    ],
)
def test_config_errors(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[enrich.capture]\n{toml}\n")
    with pytest.raises(ConfigError) as failure:
        load_config(path)
    assert message in str(failure.value)


RAW_IDS = ("user-raw-1", "buyer-raw-1", "eid-raw-1", "eid-raw-2", IFA, IFA.lower(),
           "203.0.113.7", "2001:db8::7", "device-raw-sha1")  # fmt: skip


def test_a_real_server_captures_no_raw_id(tmp_path: Path, make_store: StoreFactory) -> None:
    store = make_store("uid:user-raw-1\tsports\ndomain:news.example\tctx\n")
    folder = tmp_path / "cap"
    config = tmp_path / "c.toml"
    config.write_text(f'[enrich.capture]\npath = "{folder}"\nsample = 1.0\nkey = "{KEY}"\n')
    body = json.dumps(full_request()).encode()
    with run_server(store, "--config", str(config)) as server:
        answers = [httpx.post(f"{server.url}/enrich", content=body) for _ in range(5)]
        httpx.post(f"{server.url}/enrich", content=b"not json")
    assert [a.json() for a in answers] == [{"segment_ids": ["sports", "ctx"]}] * 5
    files = list(folder.glob("capture-*-1.jsonl"))
    assert len(files) == 1
    text = files[0].read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 5
    assert all(line["segments"] == 2 and line["status"] == 200 for line in lines)
    for raw in RAW_IDS:
        assert raw not in text
    for ident in ("user-raw-1", "buyer-raw-1", "eid-raw-1", "eid-raw-2", IFA.lower()):
        assert text.count(hashed(ident)) == 5


def test_held_out_users_are_flagged(tmp_path: Path, make_store: StoreFactory) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[enrich]\nholdout = 1.0\n[enrich.capture]\npath = "{tmp_path / "cap"}"\n'
        f'sample = 1.0\nkey = "{KEY}"\n'
    )
    endpoint = enrich_endpoint(load_config(path))
    endpoint.store = SegmentStore(make_store("uid:u1\ts1\n"))
    assert call(endpoint, b'{"user": {"id": "u1"}}')[2] == EMPTY_BODY
    call(endpoint, b'{"site": {"domain": "d.example"}}')  # no user: never held out
    assert [line.holdout for line in read_capture([tmp_path / "cap"])] == [True, False]
