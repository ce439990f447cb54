"""The bundled demo store: built from its committed source, hit by the seed samples."""

from __future__ import annotations

import time
from pathlib import Path

from enrich_server.config import EXAMPLE_STORE
from enrich_server.keys import request_keys
from enrich_server.openrtb import decode
from enrich_server.snapshot import load_snapshots
from enrich_server.store import SegmentStore
from tests.utils import ROOT


def _contents(path: Path) -> list[tuple[bytes, dict[str, int]]]:
    store = SegmentStore(path)
    try:
        return list(store.items())
    finally:
        store.close()


def test_example_store_is_its_source_rebuilt(tmp_path: Path) -> None:
    rebuilt = tmp_path / "rebuilt"
    load_snapshots([ROOT / "segments.example.tsv"], rebuilt, progress=False)
    assert EXAMPLE_STORE == ROOT / "segments.lmdb.example"
    committed = _contents(EXAMPLE_STORE)
    assert committed, "segments.lmdb.example is empty"
    assert committed == _contents(rebuilt), "run `make example-store` and commit the result"


def test_example_store_answers_every_seed_identity(seed_bodies: dict[str, bytes]) -> None:
    store = SegmentStore(EXAMPLE_STORE)
    try:
        for name, body in seed_bodies.items():
            user, context = request_keys(decode(body))
            for key in user + context:
                resolved = store.resolve([key], int(time.time()), 500)
                assert resolved.hits == 1, f"{name}: {key!r} not in the example store"
                assert resolved.segments_json, f"{name}: {key!r} has no live segment"
    finally:
        store.close()
