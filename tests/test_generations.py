"""Store generations: publishing a replaced store, following it, removing what nobody holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from enrich_server.generations import Lease, StoreFollower, remove_unused
from tests.conftest import StoreFactory
from tests.utils import ROOT


def _replace(store: Path, snapshot: Path, text: str) -> None:
    """``load --replace`` in its own process, as operators run it (py-lmdb opens an
    environment once per process, and this test process follows the store)."""
    snapshot.write_text(text)
    subprocess.run(
        [sys.executable, "-m", "enrich_server", "load", str(snapshot), "--store", str(store),
         "--replace", "--quiet"],
        check=True, capture_output=True, cwd=ROOT, timeout=60,
    )  # fmt: skip


def test_follower_swaps_generations_and_the_last_holder_removes_the_old(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    store = make_store("uid:a\told\n")
    follower = StoreFollower(store)
    assert follower.refresh() is None  # nothing published yet

    _replace(store, tmp_path / "1.tsv", "uid:a\tnew\n")
    assert os.readlink(store / "current") == "gen-000001"
    assert (store / "data.mdb").exists()  # the plain store is still held by the follower
    assert follower.store.memberships(b"uid:a") == {"old": 0}
    swapped = follower.refresh()
    assert swapped is not None
    assert swapped is follower.store
    assert swapped.memberships(b"uid:a") == {"new": 0}
    assert sorted(os.listdir(store)) == ["current", "gen-000001"]  # let go: removed

    _replace(store, tmp_path / "2.tsv", "uid:a\tnewer\n")
    assert sorted(os.listdir(store)) == ["current", "gen-000001", "gen-000002"]
    swapped = follower.refresh()
    assert swapped is not None
    assert swapped.memberships(b"uid:a") == {"newer": 0}
    assert sorted(os.listdir(store)) == ["current", "gen-000002"]
    follower.close()


def test_remove_unused_spares_live_builds_and_removes_dead_ones(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    store = make_store("uid:a\tx\n")
    _replace(store, tmp_path / "1.tsv", "uid:a\ty\n")
    dead = store / ".build-999999"
    dead.mkdir()
    running = store / ".build-1"
    running.mkdir()
    builder = Lease(running, exclusive=True)
    with pytest.raises(BlockingIOError):
        Lease(running, wait=False)  # a reader could not take it either
    assert remove_unused(store) == [".build-999999"]
    assert running.exists()
    builder.release()
    assert remove_unused(store) == [".build-1"]
    assert sorted(os.listdir(store)) == ["current", "gen-000001"]
