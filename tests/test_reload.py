"""Loads while serving: a replace under load fails no request and is served within 2 s by
every worker, which then let go of the old generation (removed); a killed load changes
nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx2 as httpx

from bench.synth import write_snapshot
from enrich_server.store import SegmentStore
from tests.conftest import StoreFactory
from tests.utils import run_server


def _load(snapshot: Path, store: Path, *flags: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "enrich_server", "load", str(snapshot), "--store", str(store),
         "--quiet", *flags],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip


def test_replace_under_load_fails_no_request(make_store: StoreFactory, tmp_path: Path) -> None:
    store = make_store("uid:u\told_segment\n")
    replacement = tmp_path / "new.tsv"
    write_snapshot(replacement, 20_000)  # big enough that the load takes a while
    with replacement.open("a") as out:
        out.write("uid:u\tnew_segment\n")
    newer = tmp_path / "newer.tsv"
    newer.write_text("uid:u\tnewer_segment\n")
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def client(url: str) -> None:
        with httpx.Client(base_url=url, timeout=5) as http:
            while not stop.is_set() and len(answers) < 200_000:
                response = http.post("/enrich", content=b'{"user":{"id":"u"}}')
                answers.append((response.status_code, response.text))

    def served_within(segment: str) -> float:
        loaded = time.monotonic()
        while time.monotonic() - loaded < 3 and segment not in answers[-1][1]:
            time.sleep(0.01)
        return time.monotonic() - loaded

    with run_server(store) as server:
        thread = threading.Thread(target=client, args=(server.url,))
        thread.start()
        try:
            time.sleep(0.3)
            _load(replacement, store, "--replace")
            seen_new = served_within("new_segment")
            time.sleep(0.2)
            _load(newer, store, "--replace")
            seen_newer = served_within("newer_segment")
            time.sleep(0.2)
        finally:
            stop.set()
            thread.join(10)
        log = server.log()
    assert len(answers) > 50  # the client kept calling while the load ran
    assert {status for status, _ in answers} == {200}
    bodies = [body for _, body in answers]
    assert bodies[0] == '{"segment_ids":["old_segment"]}'
    assert bodies[-1] == '{"segment_ids":["newer_segment"]}'
    assert seen_new < 2
    assert seen_newer < 2
    # never half a snapshot: every answer is one of the three stores, in order
    assert list(dict.fromkeys(bodies)) == [
        '{"segment_ids":["old_segment"]}',
        '{"segment_ids":["new_segment"]}',
        bodies[-1],
    ]
    assert log.count("store generation swapped in") == 2
    # the worker let go of each old generation, and the last holder removed its files
    assert sorted(os.listdir(store)) == ["current", "gen-000002"]


def test_every_worker_swaps_to_a_replaced_store(make_store: StoreFactory, tmp_path: Path) -> None:
    store = make_store("uid:u\told_segment\n")
    replacement = tmp_path / "new.tsv"
    replacement.write_text("uid:u\tnew_segment\n")
    with run_server(store, "--workers", "2") as server:
        _load(replacement, store, "--replace")
        time.sleep(2)
        # a new connection each time: the kernel spreads them over both workers
        answers = [
            httpx.post(f"{server.url}/enrich", content=b'{"user":{"id":"u"}}', timeout=5).text
            for _ in range(40)
        ]
        log = server.log()
    assert set(answers) == {'{"segment_ids":["new_segment"]}'}
    swaps = [line for line in log.splitlines() if "store generation swapped in" in line]
    assert len({json.loads(line)["pid"] for line in swaps}) == 2
    assert sorted(os.listdir(store)) == ["current", "gen-000001"]


def test_killed_load_leaves_the_store_as_it_was(make_store: StoreFactory, tmp_path: Path) -> None:
    store = make_store("uid:u\tkept\n")
    reader = SegmentStore(store)
    before = list(reader.items())
    reader.close()  # py-lmdb allows one Environment per path in a process
    big = tmp_path / "big.tsv"
    write_snapshot(big, 200_000)
    load = subprocess.Popen(
        [sys.executable, "-m", "enrich_server", "load", str(big), "--store", str(store),
         "--replace", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not list(store.glob(".build-*/spill/chunk-*")):  # midway: parsed chunks spilled
        assert load.poll() is None, "the load finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(load.pid, signal.SIGKILL)
    load.wait()
    after = SegmentStore(store)
    assert list(after.items()) == before
    assert after.memberships(b"uid:u") == {"kept": 0}
    after.close()
    # the next build removes the dead one's directory
    _load(tmp_path / "big.tsv", store, "--replace")
    assert sorted(os.listdir(store)) == ["current", "gen-000001"]
