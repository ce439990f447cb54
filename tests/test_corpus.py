"""Every request of the shared OpenRTB corpus, through the real server and in-process."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2 as httpx
import msgspec
import pytest

from enrich_server import openrtb
from enrich_server.keys import request_keys
from enrich_server.openrtb import BidRequest, decode, decode_lenient
from enrich_server.privacy import PrivacyPolicy, suppression_reason
from enrich_server.snapshot import load_snapshots
from tests.utils import run_server


def _files(corpus: Path, kind: str) -> list[Path]:
    files = sorted((corpus / kind).glob("*.json"))
    assert files, f"no {kind} requests in {corpus}"
    return files


@pytest.mark.parametrize(
    "retry_bytes",
    [
        pytest.param(openrtb.MAX_RETRY_BYTES, id="small-values-whole"),
        pytest.param(0, id="field-by-field"),
    ],
)
def test_corpus_typed_and_lenient_decoding_agree(
    corpus: Path, retry_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(openrtb, "MAX_RETRY_BYTES", retry_bytes)
    for path in _files(corpus, "valid"):
        body = path.read_bytes()
        try:
            typed = msgspec.json.decode(body, type=BidRequest)
        except msgspec.ValidationError:
            continue  # a real request with an odd field: only the lenient path applies
        lenient = decode_lenient(body)
        assert lenient == typed, path.name


def test_corpus_through_real_server(corpus: Path, tmp_path: Path) -> None:
    valid = _files(corpus, "valid")
    # A store where every identity of every valid request belongs to a segment of its own
    # file, so the server's answers can be checked against the in-process pipeline.
    expected: dict[str, list[str]] = {}
    suppressed: set[str] = set()
    lines: list[str] = []
    for path in valid:
        request = decode(path.read_bytes())
        user, context = request_keys(request)
        reason = suppression_reason(request, PrivacyPolicy())
        if reason is not None:
            suppressed.add(path.name)
        allowed = context if reason is not None else user + context
        for key in user + context:
            lines.append(f"{key.decode()}\tf_{path.stem[:3]}")
        expected[path.name] = [f"f_{path.stem[:3]}"] if allowed else []
    snapshot = tmp_path / "corpus.tsv"
    snapshot.write_text("\n".join(lines) + "\n")
    store = tmp_path / "store"
    load_snapshots([snapshot], store, progress=False)

    with run_server(store) as server, httpx.Client(base_url=server.url) as client:
        hits = 0
        for path in valid:
            response = client.post("/enrich", content=path.read_bytes())
            assert response.status_code == 200, path.name
            answer = response.json()
            assert list(answer) == ["segment_ids"], path.name
            ids = answer["segment_ids"]
            assert all(isinstance(i, str) for i in ids), path.name
            assert len(ids) == len(set(ids)) <= 500, path.name
            # shared identities (same domain in many files) may add other files' segments
            assert set(expected[path.name]) <= set(ids), path.name
            hits += bool(ids)
            fresh = ids and path.name not in suppressed
            cache = "max-age=86400" if fresh else "no-cache"
            assert response.headers["cache-control"] == cache, path.name
        assert hits >= sum(bool(segments) for segments in expected.values()) > 100

        invalid = _files(corpus, "invalid")
        statuses = {}
        for path in invalid:
            response = client.post("/enrich", content=path.read_bytes())
            statuses[path.name] = response.status_code
            assert response.status_code < 500, path.name
            assert "error" in response.json() or "segment_ids" in response.json()
            try:
                json.loads(path.read_bytes())
                assert response.status_code == 200, path.name  # JSON, however wrong: 200
            except ValueError:
                assert response.status_code == 400, path.name
        assert client.get("/healthz").status_code == 200
        assert server.process.poll() is None
    assert sorted(set(statuses.values())) == [200, 400]


@pytest.mark.parametrize("kind", ["valid", "invalid"])
def test_corpus_files_are_all_present(corpus: Path, kind: str) -> None:
    manifest = corpus / ("MANIFEST.tsv" if kind == "valid" else "MANIFEST-invalid.tsv")
    listed = {line.split("\t")[0] for line in manifest.read_text().splitlines()[1:] if line}
    assert listed == {f"{kind}/{p.name}" for p in _files(corpus, kind)}
