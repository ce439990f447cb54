"""End to end: the real ``enrich-server serve`` (uvicorn, uvloop, httptools) on a free port."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

from enrich_server.config import EXAMPLE_STORE
from tests.conftest import StoreFactory
from tests.utils import run_server


def _events(log: str, msg: str) -> list[dict[str, object]]:
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    return [event for event in events if event["msg"] == msg]


def test_server_answers_seed_samples_from_example_store(seed_bodies: dict[str, bytes]) -> None:
    with run_server(EXAMPLE_STORE) as server, httpx.Client(base_url=server.url) as client:
        app = client.post("/enrich", content=seed_bodies["app"])
        assert app.status_code == 200
        assert app.headers["content-type"] == "application/json"
        assert app.headers["cache-control"] == "max-age=86400"
        assert app.json()["segment_ids"][:2] == ["sports_news", "football_players"]
        web = client.post("/enrich", content=seed_bodies["web"])
        assert "ctx_news" in web.json()["segment_ids"]
        ctv = client.post("/enrich", content=seed_bodies["ctv"])
        assert ctv.json()["segment_ids"] == [
            "streaming_fans",
            "auto_intenders",
            "cord_cutters",
            "cat_owners",
            "ctx_ctv_entertainment",
        ]


def test_server_errors_are_json_and_connection_survives(seed_bodies: dict[str, bytes]) -> None:
    with run_server(EXAMPLE_STORE) as server, httpx.Client(base_url=server.url) as client:
        bad = client.post("/enrich", content=b"{oops")
        assert bad.status_code == 400
        assert bad.json()["error"].startswith("body is not JSON")
        big = client.post("/enrich", content=b"{" + b" " * (1 << 20) + b"}")
        assert big.status_code == 413
        assert big.json() == {"error": "body larger than 65536 bytes"}
        assert client.post("/enrich", content=seed_bodies["app"]).status_code == 200
        assert client.get("/nope").status_code == 404


def test_server_logs_json_without_access_lines(seed_bodies: dict[str, bytes]) -> None:
    with run_server(EXAMPLE_STORE) as server, httpx.Client(base_url=server.url) as client:
        for _ in range(5):
            client.post("/enrich", content=seed_bodies["app"])
        log = server.log()
    lines = [json.loads(line) for line in log.splitlines()]  # every line is JSON
    assert _events(log, "store opened")
    assert not [line for line in lines if "POST /enrich" in str(line["msg"])]
    assert "AbcdEfgHijklmnoP" not in log


def test_server_sees_loads_made_while_running(make_store: StoreFactory, tmp_path: Path) -> None:
    store = make_store("uid:u\tbefore\n")
    with run_server(store) as server, httpx.Client(base_url=server.url) as client:
        body = b'{"user":{"id":"u"}}'
        assert client.post("/enrich", content=body).json() == {"segment_ids": ["before"]}
        delta = tmp_path / "delta.tsv"
        delta.write_text("uid:u\tafter,-before\n")
        subprocess.run(
            [sys.executable, "-m", "enrich_server", "load", str(delta), "--store", str(store),
             "--quiet"],
            check=True, capture_output=True,
        )  # fmt: skip
        assert client.post("/enrich", content=body).json() == {"segment_ids": ["after"]}
        compacted = subprocess.run(
            [sys.executable, "-m", "enrich_server", "compact", "--store", str(store)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        assert "removed 0 expired memberships" in compacted.stdout
        assert client.post("/enrich", content=body).json() == {"segment_ids": ["after"]}


def test_server_two_workers_share_port_and_store(make_store: StoreFactory) -> None:
    store = make_store("uid:u\tx\n")
    with run_server(store, "--workers", "2") as server:
        deadline = time.monotonic() + 20
        while len(_events(server.log(), "store opened")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        opened = _events(server.log(), "store opened")
        assert len({event["pid"] for event in opened}) == 2
        assert server.process.pid not in {event["pid"] for event in opened}
        for _ in range(20):  # new connections, spread by the kernel over the workers
            response = httpx.post(f"{server.url}/enrich", content=b'{"user":{"id":"u"}}')
            assert response.json() == {"segment_ids": ["x"]}


def test_server_stops_cleanly_on_sigterm(make_store: StoreFactory) -> None:
    with run_server(make_store("uid:u\tx\n")) as server:
        server.process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once shut down, so the exit status says "terminated"
        assert server.process.wait(timeout=10) == -signal.SIGTERM
        log = server.log()
    assert _events(log, "Application shutdown complete.")
    assert "Traceback" not in log
