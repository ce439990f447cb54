"""``enrich-server check``: open-loop measurement and the breaker verdict."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from enrich_server.check import CheckResult, parse_target, read_bodies, run_check
from enrich_server.config import EXAMPLE_STORE, SAMPLES_DIR
from tests.utils import free_port, run_server


def _check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enrich_server", "check", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_healthy_server_ok() -> None:
    with run_server(EXAMPLE_STORE) as server:
        result = _check(f"{server.url}/enrich", "--rate", "200", "--duration", "1")
    assert "sent 200, answered 200, errors 0, timeouts 0" in result.stdout
    assert "status   200 x 200" in result.stdout
    assert "shed     0 of 200 (0.00%) answered empty by the server's" in result.stdout
    # Nothing the server answered trips the breaker. Latency can, on a shared machine under
    # load: that verdict is a benchmark's business (bench/), its logic tested in-process.
    verdict = result.stdout.split("verdict: ", 1)[1]
    if result.returncode == 0:
        assert verdict.startswith("OK")
    else:
        assert "of calls over 5 ms" in verdict
        assert "4xx/5xx" not in verdict


def test_check_json_output() -> None:
    with run_server(EXAMPLE_STORE) as server:
        result = _check(f"{server.url}/enrich", "--rate", "100", "--duration", "1", "--json")
    summary = json.loads(result.stdout)
    assert summary["completed"] == 100
    assert summary["status"] == {"200": 100}
    latency = summary["latency_ms"]
    assert 0 < latency["p50"] <= latency["p99"] <= latency["p99.9"] <= latency["max"]
    assert all("of calls over 5 ms" in trip for trip in summary["breaker_trips"])
    assert (summary["shed"], summary["shed_share"]) == (0, 0.0)


def test_check_reports_the_answers_the_server_shed() -> None:
    # A budget of 1 us: every request is older than that when its work would start.
    with run_server(EXAMPLE_STORE, env={"ENRICH_ENRICH_GUARD_LAG_MS": "0.001"}) as server:
        report = _check(f"{server.url}/enrich", "--rate", "100", "--duration", "1")
        summary = json.loads(
            _check(f"{server.url}/enrich", "--rate", "50", "--duration", "1", "--json").stdout
        )
    assert "status   200 x 100" in report.stdout
    assert "shed     100 of 100 (100.00%) answered empty" in report.stdout
    assert (summary["completed"], summary["shed"], summary["shed_share"]) == (50, 50, 1.0)


def test_check_4xx_trips_the_breaker() -> None:
    with run_server(EXAMPLE_STORE) as server:
        result = _check(f"{server.url}/wrong-path", "--rate", "50", "--duration", "1")
    assert result.returncode == 1
    assert "WOULD TRIP: 50 responses with 4xx/5xx status [404]" in result.stdout


def test_check_nothing_listening_trips_with_errors() -> None:
    result = _check(f"http://127.0.0.1:{free_port()}/enrich", "--rate", "20", "--duration", "1")
    assert result.returncode == 1
    assert "20 connection errors" in result.stdout
    assert "shed     unknown (no enrich_shed_total on the server's /metrics)" in result.stdout


@pytest.fixture
def slow_server() -> Iterator[int]:
    """An HTTP server on loopback that answers every request after 8 ms."""
    port = free_port()
    started = threading.Event()
    loop = asyncio.new_event_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                await asyncio.sleep(0.008)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def serve() -> asyncio.Server:
        return await asyncio.start_server(handle, "127.0.0.1", port)

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(serve())
        started.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(5)
    yield port
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def test_check_slow_server_trips_on_latency(slow_server: int) -> None:
    target = parse_target(f"http://127.0.0.1:{slow_server}/enrich", [])
    result = uvloop.run(run_check(target, [b"{}"], rate=100, duration=1, connections=4))
    assert result.completed == 100
    assert result.percentile(0.5) > 0.008
    assert result.over_budget_share == 1.0
    assert result.trips_breaker() == ["100.0% of calls over 5 ms (limit 5%)"]


def test_check_counts_waiting_for_a_busy_connection(slow_server: int) -> None:
    # One connection, 8 ms per answer, 200 requests/s offered: the queue grows by 0.6
    # requests per answer, so latency measured from each due time climbs far above 8 ms.
    target = parse_target(f"http://127.0.0.1:{slow_server}/enrich", [])
    result = uvloop.run(run_check(target, [b"{}"], rate=200, duration=1, connections=1))
    assert result.percentile(0.99) > 0.1


def test_result_share_counts_failures_as_slow() -> None:
    result = CheckResult(10, 1, errors=1, timeouts=1, latencies=[0.001, 0.001])
    assert result.over_budget_share == 0.5


@pytest.mark.parametrize(
    ("url", "headers", "why"),
    [
        ("ftp://x/enrich", [], "is not an http"),
        ("http:///enrich", [], "is not an http"),
        ("http://127.0.0.1/enrich", ["NoColon"], "is not 'Name: value'"),
    ],
)
def test_parse_target_rejects(url: str, headers: list[str], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_target(url, headers)


def test_parse_target_headers_and_query() -> None:
    target = parse_target("https://user@h.example:8443/e?token=t", ["X-Api-Key: k"])
    assert (target.host, target.port, target.path, target.tls) == (
        "h.example",
        8443,
        "/e?token=t",
        True,
    )
    assert target.headers == b"Host: h.example:8443\r\nX-Api-Key: k\r\n"


def test_read_bodies_files_dirs_and_lines(tmp_path: Path) -> None:
    lines = tmp_path / "bodies.jsonl"
    lines.write_text('{"a":1}\n\n{"b":2}\n')
    assert read_bodies([lines]) == [b'{"a":1}', b'{"b":2}']
    assert len(read_bodies([SAMPLES_DIR])) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no request bodies"):
        read_bodies([empty])
