from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import uvloop
from starlette.testclient import TestClient

from enrich_server.app import create_app
from enrich_server.check import parse_target, read_shed_total
from enrich_server.config import load_config
from enrich_server.enrich import EMPTY_BODY
from enrich_server.guard import LoadGuard, clock
from tests.conftest import StoreFactory
from tests.utils import run_server


def test_guard_sheds_a_request_older_than_the_budget() -> None:
    async def scenario() -> list[bool]:
        guard = LoadGuard(budget=0.005, interval=0.001)
        guard.start(asyncio.get_running_loop())
        await asyncio.sleep(0.01)
        stamp = clock()  # a request's first bytes arrive; the rest comes in later reads
        seen = [guard.should_shed(clock())]  # meanwhile, a young one
        await asyncio.sleep(0.006)
        seen.append(guard.should_shed(stamp))  # the first one, complete at last
        seen.append(guard.should_shed(clock()))  # one read just now, in the same iteration
        guard.stop()
        return seen

    assert uvloop.run(scenario()) == [False, True, False]


def test_guard_sheds_the_tail_of_a_long_batch() -> None:
    async def scenario() -> list[bool]:
        guard = LoadGuard(budget=0.005, interval=0.001)
        guard.start(asyncio.get_running_loop())
        await asyncio.sleep(0.01)
        seen = [guard.should_shed(clock())]  # first request of a batch
        time.sleep(0.006)  # the requests after it took 6 ms in this same iteration
        # The next socket's bytes are read only now: its stamp is young, it waited anyway.
        seen.append(guard.should_shed(clock()))
        await asyncio.sleep(0)  # the batch is over
        await asyncio.sleep(0.003)
        seen.append(guard.should_shed(clock()))
        guard.stop()
        return seen

    assert uvloop.run(scenario()) == [False, True, False]


def test_guard_adds_the_lag_of_bytes_that_sat_unread() -> None:
    async def scenario() -> list[bool]:
        # A budget far above the lags this shared machine adds by itself, far below 30 ms.
        guard = LoadGuard(budget=0.015, interval=0.001)
        guard.start(asyncio.get_running_loop())
        seen = []
        await asyncio.sleep(0.02)
        seen.append(guard.should_shed(clock()))  # idle
        time.sleep(0.03)  # one 30 ms stall: a hiccup, not a backlog
        # The next loop iteration runs the late timer before resuming us, just as it runs
        # before the requests that queued up during the stall.
        await asyncio.sleep(0)
        seen.append(guard.should_shed(clock()))
        time.sleep(0.03)  # still behind on the next tick: a backlog
        await asyncio.sleep(0)
        # Read just now, but its bytes waited in the socket while the loop was busy.
        seen.append(guard.should_shed(clock()))
        seen.append(guard.lag >= 0.025)
        await asyncio.sleep(0.02)
        seen.append(guard.should_shed(clock()))  # caught up again
        guard.stop()
        return seen

    assert uvloop.run(scenario()) == [False, False, True, True, False]


def test_guard_off_with_zero_budget_or_stopped() -> None:
    async def scenario() -> list[bool]:
        off = LoadGuard(budget=0.0)
        off.start(asyncio.get_running_loop())
        stopped = LoadGuard(budget=0.001)
        stopped.start(asyncio.get_running_loop())
        stopped.stop()
        stamp = clock()
        time.sleep(0.01)
        await asyncio.sleep(0.003)
        time.sleep(0.01)
        return [off.enabled, off.should_shed(stamp), stopped.should_shed(stamp)]

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
        monkeypatch.setattr(app.enrich.guard, "should_shed", lambda stamp: True)
        response = client.post("/enrich", content=body)
        assert response.status_code == 200
        assert response.json() == {"segment_ids": []}
        assert response.headers["cache-control"] == "no-cache"
        assert app.enrich.tally.shed == 1
        monkeypatch.undo()
        assert client.post("/enrich", content=body).json() == {"segment_ids": ["x"]}
        assert app.enrich.tally.shed == 1


def _answers(sock: socket.socket, count: int) -> list[tuple[int, bytes, bytes]]:
    """``count`` responses read off ``sock``: status, Cache-Control value and body each."""
    data = b""
    answers: list[tuple[int, bytes, bytes]] = []
    while len(answers) < count:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            head = data[:end].split(b"\r\n")
            headers = dict(line.lower().split(b": ", 1) for line in head[1:])
            stop = end + 4 + int(headers[b"content-length"])
        if end < 0 or len(data) < stop:
            chunk = sock.recv(1 << 16)
            assert chunk, f"closed after {len(answers)} answers"
            data += chunk
            continue
        answers.append((int(head[0].split()[1]), headers[b"cache-control"], data[end + 4 : stop]))
        data = data[stop:]
    return answers


def test_serve_sheds_the_late_requests_of_a_pipelined_burst(make_store: StoreFactory) -> None:
    # 3,000 requests sent at once on one connection: the worker serves them one after the
    # other, so those behind age past the 5 ms budget while the ones before are served.
    store = make_store("uid:u\tx\n")
    body = b'{"user":{"id":"u"}}'
    request = b"POST /enrich HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    count = 3000
    with run_server(store, env={"ENRICH_ENRICH_GUARD_LAG_MS": "5"}) as server:
        target = parse_target(f"{server.url}/enrich", [])
        before = uvloop.run(read_shed_total(target, 5.0))
        with socket.create_connection((target.host, target.port), timeout=30) as sock:
            # Sent from a thread while this one reads: neither side's buffers fill up.
            sender = threading.Thread(target=sock.sendall, args=(request * count,))
            sender.start()
            answers = _answers(sock, count)
            sender.join()
        after = uvloop.run(read_shed_total(target, 5.0))
    shed = (200, b"no-cache", EMPTY_BODY)
    status, cache, first = full = answers[0]
    assert (status, first) == (200, b'{"segment_ids":["x"]}')
    assert cache.startswith(b"max-age=")
    assert set(answers) == {full, shed}
    assert before is not None
    assert after is not None
    assert after - before == answers.count(shed) > 0
