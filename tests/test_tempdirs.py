"""What a killed ``serve`` or ``load`` leaves is removed by the next one, never what a live
process still owns."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from enrich_server.generations import BUILD_PREFIX, Lease, first_build_dir, remove_dead_builds
from enrich_server.tempdirs import INGEST_PREFIX, METRICS_PREFIX, owned, remove_abandoned
from tests.conftest import StoreFactory
from tests.utils import ROOT, free_port, stop, wait_until_ready

CONFIG = """
[[platform]]
id = 99999
name = "mapp"
basic = "foo:bar"
"""


def _ours(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith("enrich-server-")}


def test_owned_directory_is_locked_while_alive_and_removed_after(tmp_path: Path) -> None:
    with owned(METRICS_PREFIX) as folder:
        assert folder.name.startswith(METRICS_PREFIX)
        (folder / "file").write_text("x")
        assert remove_abandoned(folder.parent) == []  # its owner is alive: kept
        assert folder.is_dir()
    assert not folder.exists()


def test_abandoned_directories_are_removed(tmp_path: Path) -> None:
    dead = [tmp_path / f"{INGEST_PREFIX}dead", tmp_path / f"{METRICS_PREFIX}dead"]
    for folder in dead:
        folder.mkdir()
        (folder / "left").write_text("x")
    held = tmp_path / f"{METRICS_PREFIX}held"
    held.mkdir()
    unrelated = tmp_path / "someone-else"
    unrelated.mkdir()
    lease = Lease(held, exclusive=True)  # a live owner
    try:
        assert sorted(remove_abandoned(tmp_path)) == sorted(dead)
    finally:
        lease.release()
    assert held.is_dir()
    assert unrelated.is_dir()
    assert not any(folder.exists() for folder in dead)


def _serve(store: Path, config: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    port = free_port()
    log = tmp.parent / f"serve-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "enrich_server", "serve", "--store", str(store),
             "--config", str(config), "--port", str(port), "--workers", "2"],
            stdout=out, stderr=out, cwd=ROOT, start_new_session=True,
            env={**os.environ, "TMPDIR": str(tmp), "ENRICH_ENRICH_GUARD_LAG_MS": "0"},
        )  # fmt: skip
    wait_until_ready(f"http://127.0.0.1:{port}", process, log, 30)
    return process, log


def test_serve_removes_what_a_killed_serve_left(make_store: StoreFactory, tmp_path: Path) -> None:
    store = make_store("uid:u\tx\n")
    config = tmp_path / "enrich.toml"
    config.write_text(CONFIG)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    crashed, _ = _serve(store, config, tmp)
    left = _ours(tmp)
    # The ingestion socket's directory and (two workers) the metrics directory.
    assert {name.rsplit("-", 1)[0] + "-" for name in left} == {INGEST_PREFIX, METRICS_PREFIX}
    os.killpg(crashed.pid, signal.SIGKILL)  # serve, its workers and its ingestion process
    crashed.wait()
    assert _ours(tmp) == left  # nobody cleaned up
    second, log = _serve(store, config, tmp)
    try:
        now = _ours(tmp)
        assert len(now) == 2
        assert not now & left
        assert "removed what a killed process left" in log.read_text()
    finally:
        stop(second)
    assert _ours(tmp) == set()  # a clean stop leaves nothing


def test_load_removes_dead_builds_and_keeps_live_ones(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    store = make_store("uid:u\tx\n")
    dead = store / f"{BUILD_PREFIX}12345"
    live = store / f"{BUILD_PREFIX}67890"
    first = first_build_dir(tmp_path / "fresh")
    for folder in (dead, live, first):
        folder.mkdir()
        (folder / "data.mdb").write_bytes(b"half a build")
    lease = Lease(live, exclusive=True)  # a builder still at work
    try:
        snapshot = tmp_path / "more.tsv"
        snapshot.write_text("uid:v\ty\n")
        done = subprocess.run(
            [sys.executable, "-m", "enrich_server", "load", str(snapshot), "--store",
             str(store), "--quiet"],
            cwd=ROOT, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert not dead.exists()
        assert live.is_dir()
        assert remove_dead_builds(tmp_path / "fresh") == [first.name]
    finally:
        lease.release()
    assert remove_dead_builds(store) == [live.name]
