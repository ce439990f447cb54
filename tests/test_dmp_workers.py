"""DMP writes under ``serve --workers 2``: every worker serves a write on its next request,
not on its next once-a-second tick."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.conftest import StoreFactory
from tests.utils import RunningServer, run_server

CONFIG = """
[[platform]]
id = 99999
name = "mapp"
basic = "foo:bar"
plsec = "verysecure"
ttl = 0
"""
MAPP = ("foo", "bar")
#: Our user id (the shape the ``enrich_uid`` cookie carries), in the store from the start.
OURS = "A" * 22
WORKERS = 2
#: Calls per check, each on a new connection: the kernel spreads them over the workers.
CALLS = 40


@pytest.fixture
def server(make_store: StoreFactory, tmp_path: Path) -> Iterator[RunningServer]:
    store = make_store(f"uid:{OURS}\toperator_segment\n")
    config = tmp_path / "enrich.toml"
    config.write_text(CONFIG)
    with run_server(store, "--config", str(config), "--workers", str(WORKERS)) as running:
        deadline = time.monotonic() + 20
        while running.log().count('"store opened"') < WORKERS:
            assert time.monotonic() < deadline, running.log()
            time.sleep(0.05)
        yield running


def _enrich_on_new_connections(server: RunningServer, user_id: str) -> list[list[str]]:
    body = json.dumps({"user": {"id": user_id}}).encode()
    answers = []
    for _ in range(CALLS):
        answer = httpx.post(f"{server.url}/enrich", content=body)
        assert answer.status_code == 200
        answers.append(answer.json()["segment_ids"])
    return answers


def _calls_per_worker(server: RunningServer) -> list[int]:
    """Stop the server; the endpoint calls each worker answered (its last log line)."""
    server.process.terminate()
    server.process.wait(timeout=15)
    return [
        json.loads(line)["requests"]
        for line in server.log().splitlines()
        if '"worker stopping"' in line
    ]


def test_the_first_synced_id_is_served_by_every_worker_at_once(server: RunningServer) -> None:
    synced = httpx.get(
        f"{server.url}/uid",
        params={"userid": "IDX-1", "pl": 99999, "plsec": "verysecure"},
        headers={"cookie": f"enrich_uid={OURS}"},
    )
    assert synced.status_code == 200, synced.text
    answers = _enrich_on_new_connections(server, "IDX-1")  # no pause after the write
    per_worker = _calls_per_worker(server)
    assert answers == [["operator_segment"]] * CALLS
    assert len(per_worker) == WORKERS
    assert min(per_worker) > 0  # every worker answered some, right after the sync
    assert sum(per_worker) == CALLS


def test_a_new_dmp_segment_is_served_by_name_on_every_worker_at_once(
    server: RunningServer,
) -> None:
    # Calls spread over the workers, which read the segment names there are before the new one.
    assert _enrich_on_new_connections(server, OURS) == [["operator_segment"]] * CALLS
    with httpx.Client(base_url=server.url, auth=MAPP) as client:
        created = client.post("/v1/segment", params={"title": "Fans", "key": "mapp_fans"})
        assert created.status_code == 200, created.text
        sid = created.json()["segment_id"]
        pushed = client.post("/v1/segment", params={"id": sid, "userid": OURS})
        assert pushed.status_code == 200, pushed.text
    answers = _enrich_on_new_connections(server, OURS)  # no pause after the write
    keys = [
        httpx.get(f"{server.url}/v1/segment/{sid}", auth=MAPP).json()["segment"]["key"]
        for _ in range(CALLS)
    ]
    per_worker = _calls_per_worker(server)
    assert answers == [["operator_segment", "mapp_fans"]] * CALLS
    assert keys == ["mapp_fans"] * CALLS
    assert len(per_worker) == WORKERS
    assert min(per_worker) > 0
    assert sum(per_worker) == 2 * CALLS
