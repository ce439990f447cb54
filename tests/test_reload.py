"""Loads while serving: a replace under load fails no request, and a killed load changes
nothing (LMDB commits whole transactions or nothing)."""

from __future__ import annotations

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


def test_replace_under_load_fails_no_request(make_store: StoreFactory, tmp_path: Path) -> None:
    store = make_store("uid:u\told_segment\n")
    replacement = tmp_path / "new.tsv"
    write_snapshot(replacement, 20_000)  # big enough that the load takes a while
    with replacement.open("a") as out:
        out.write("uid:u\tnew_segment\n")
    answers: list[tuple[int, str]] = []
    stop = threading.Event()

    def client(url: str) -> None:
        with httpx.Client(base_url=url, timeout=5) as http:
            while not stop.is_set() and len(answers) < 100_000:
                response = http.post("/enrich", content=b'{"user":{"id":"u"}}')
                answers.append((response.status_code, response.text))

    with run_server(store) as server:
        thread = threading.Thread(target=client, args=(server.url,))
        thread.start()
        try:
            time.sleep(0.3)
            subprocess.run(
                [sys.executable, "-m", "enrich_server", "load", str(replacement), "--store",
                 str(store), "--replace", "--quiet"],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            loaded = time.monotonic()
            while time.monotonic() - loaded < 2 and "new_segment" not in answers[-1][1]:
                time.sleep(0.01)
            seen_new = time.monotonic() - loaded
            time.sleep(0.2)
        finally:
            stop.set()
            thread.join(10)
    assert len(answers) > 50  # the client kept calling while the load ran
    assert {status for status, _ in answers} == {200}
    bodies = [body for _, body in answers]
    assert bodies[0] == '{"segment_ids":["old_segment"]}'
    assert bodies[-1] == '{"segment_ids":["new_segment"]}'
    assert seen_new < 2
    # never half a snapshot: every answer is the old one or the new one
    assert set(bodies) == {bodies[0], bodies[-1]}


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
    time.sleep(1.5)  # well into the load (it needs several seconds)
    assert load.poll() is None, "the load finished before it could be killed"
    os.kill(load.pid, signal.SIGKILL)
    load.wait()
    after = SegmentStore(store)
    assert list(after.items()) == before
    assert after.memberships(b"uid:u") == {"kept": 0}
