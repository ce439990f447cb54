"""Shared fixtures: real LMDB stores built by the project's own loader, seed requests."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from enrich_server.config import SAMPLES_DIR
from enrich_server.snapshot import load_snapshots
from tests.utils import ROOT

StoreFactory = Callable[[str], Path]

#: The shared OpenRTB corpus; CI and developers have ../shared beside the repository. (Not an
#: ENRICH_* variable: the servers the tests start refuse unknown ones.)
CORPUS = Path(os.environ.get("OPENRTB_CORPUS", ROOT.parent / "shared" / "corpus" / "openrtb"))


@pytest.fixture
def make_store(tmp_path: Path) -> StoreFactory:
    """Factory: build a real store from snapshot text; returns its directory."""
    counter = iter(range(1_000_000))

    def build(snapshot: str) -> Path:
        n = next(counter)
        source = tmp_path / f"snapshot-{n}.tsv"
        source.write_text(snapshot)
        store = tmp_path / f"store-{n}"
        load_snapshots([source], store, progress=False)
        return store

    return build


@pytest.fixture(scope="session")
def seed_bodies() -> dict[str, bytes]:
    """The seed's three sample requests (app, web, ctv) as raw bodies."""
    return {path.stem: path.read_bytes() for path in sorted(SAMPLES_DIR.glob("*.json"))}


@pytest.fixture(scope="session")
def corpus() -> Path:
    """The OpenRTB corpus directory; its absence is a failure, not a skip."""
    if not (CORPUS / "valid").is_dir():
        pytest.fail(f"OpenRTB corpus not found at {CORPUS} (set OPENRTB_CORPUS)")
    return CORPUS
