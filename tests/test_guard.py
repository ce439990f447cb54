from __future__ import annotations

import asyncio
import time

import uvloop
from starlette.testclient import TestClient

from enrich_server.app import create_app
from enrich_server.config import load_config
from enrich_server.guard import LoadGuard
from tests.conftest import StoreFactory


def test_guard_sheds_while_the_loop_stays_behind_then_recovers() -> None:
    async def scenario() -> list[bool]:
        guard = LoadGuard(budget=0.005, interval=0.001)
        guard.start(asyncio.get_running_loop())
        seen = []
        await asyncio.sleep(0.02)
        seen.append(guard.shedding)  # idle: no lag
        time.sleep(0.03)  # one 30 ms stall: a hiccup, not a backlog
        # The next loop iteration runs the late timer before resuming us, just as it runs
        # before the requests that queued up during the stall.
        await asyncio.sleep(0)
        seen.append(guard.shedding)
        time.sleep(0.03)  # still behind on the next tick: a backlog
        await asyncio.sleep(0)
        seen.append(guard.shedding)
        await asyncio.sleep(0.02)
        seen.append(guard.shedding)  # caught up again
        guard.stop()
        return seen

    assert uvloop.run(scenario()) == [False, False, True, False]


def test_guard_disabled_with_zero_budget() -> None:
    async def scenario() -> bool:
        guard = LoadGuard(budget=0.0)
        guard.start(asyncio.get_running_loop())
        time.sleep(0.01)
        await asyncio.sleep(0.005)
        return guard.shedding

    assert uvloop.run(scenario()) is False


def test_enrich_sheds_with_empty_no_cache_and_counts(make_store: StoreFactory) -> None:
    store = make_store("uid:u\tx\n")
    app = create_app(load_config(flags={"server.store": str(store)}))
    with TestClient(app) as client:
        body = b'{"user":{"id":"u"}}'
        assert client.post("/enrich", content=body).json() == {"segment_ids": ["x"]}
        app.enrich.guard.stop()  # freeze the flag: set by hand below
        app.enrich.guard.shedding = True
        response = client.post("/enrich", content=body)
        assert response.status_code == 200
        assert response.json() == {"segment_ids": []}
        assert response.headers["cache-control"] == "no-cache"
        assert app.enrich.shed_total == 1
        app.enrich.guard.shedding = False
        assert client.post("/enrich", content=body).json() == {"segment_ids": ["x"]}
        assert app.enrich.shed_total == 1
