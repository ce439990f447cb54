from __future__ import annotations

import asyncio
import time

import pytest
import uvloop
from starlette.testclient import TestClient

from enrich_server.app import create_app
from enrich_server.config import load_config
from enrich_server.guard import LoadGuard
from tests.conftest import StoreFactory


def test_guard_sheds_only_on_a_persisting_lag() -> None:
    async def scenario() -> list[bool]:
        guard = LoadGuard(budget=0.005, interval=0.001)
        guard.start(asyncio.get_running_loop())
        seen = []
        await asyncio.sleep(0.02)
        seen.append(guard.should_shed())  # idle
        time.sleep(0.03)  # one 30 ms stall: a hiccup, not a backlog
        # The next loop iteration runs the late timer before resuming us, just as it runs
        # before the requests that queued up during the stall.
        await asyncio.sleep(0)
        seen.append(guard.should_shed())
        time.sleep(0.03)  # still behind on the next tick: a backlog
        await asyncio.sleep(0)
        seen.append(guard.should_shed())
        await asyncio.sleep(0.02)
        seen.append(guard.should_shed())  # caught up again
        guard.stop()
        return seen

    assert uvloop.run(scenario()) == [False, False, True, False]


def test_guard_sheds_the_tail_of_a_long_batch() -> None:
    async def scenario() -> list[bool]:
        guard = LoadGuard(budget=0.005, interval=0.001)
        guard.start(asyncio.get_running_loop())
        await asyncio.sleep(0.01)
        seen = [guard.should_shed()]  # first request of a batch
        time.sleep(0.006)  # the requests before took 6 ms in this same iteration
        seen.append(guard.should_shed())
        await asyncio.sleep(0)  # the batch is over
        await asyncio.sleep(0.003)
        seen.append(guard.should_shed())
        guard.stop()
        return seen

    assert uvloop.run(scenario()) == [False, True, False]


def test_guard_off_with_zero_budget_or_stopped() -> None:
    async def scenario() -> list[bool]:
        off = LoadGuard(budget=0.0)
        off.start(asyncio.get_running_loop())
        stopped = LoadGuard(budget=0.001)
        stopped.start(asyncio.get_running_loop())
        stopped.stop()
        time.sleep(0.01)
        await asyncio.sleep(0.003)
        time.sleep(0.01)
        return [off.enabled, off.should_shed(), stopped.should_shed()]

    assert uvloop.run(scenario()) == [False, False, False]


def test_enrich_sheds_with_empty_no_cache_and_counts(
    make_store: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = make_store("uid:u\tx\n")
    # The guard's own decision is forced below; its lag estimate stays out of the way.
    app = create_app(load_config(flags={"server.store": str(store), "enrich.guard_lag_ms": 0.0}))
    with TestClient(app) as client:
        body = b'{"user":{"id":"u"}}'
        assert client.post("/enrich", content=body).json() == {"segment_ids": ["x"]}
        monkeypatch.setattr(app.enrich.guard, "should_shed", lambda: True)
        response = client.post("/enrich", content=body)
        assert response.status_code == 200
        assert response.json() == {"segment_ids": []}
        assert response.headers["cache-control"] == "no-cache"
        assert app.enrich.tally.shed == 1
        monkeypatch.undo()
        assert client.post("/enrich", content=body).json() == {"segment_ids": ["x"]}
        assert app.enrich.tally.shed == 1
