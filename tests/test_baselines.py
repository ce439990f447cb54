"""The benchmark's baselines: the bare ASGI ceiling, the Redis loader, and FastAPI + Redis.

The FastAPI + Redis baseline must answer exactly what enrich-server answers (same segments,
same order, same Cache-Control) for the same snapshot, or the benchmark compares unequal
work; it runs here under real uvicorn against a real ``redis-server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
import redis
from starlette.testclient import TestClient
from starlette.types import Message

from bench.baselines import bare
from bench.baselines.redis_load import BATCH, load
from bench.redis_server import redis_server
from enrich_server.app import create_app
from enrich_server.config import load_config
from tests.conftest import StoreFactory
from tests.tcf_strings import CONSENTED
from tests.utils import ROOT, free_port, stop, wait_until_ready

JSON_HEADERS = {"content-type": "application/json"}
FAR_FUTURE = 4102444800  # 2100-01-01: never expires within a test, max-age stays at 86400

# (segment_ids, Cache-Control) of one answer.
Answer = tuple[list[str], str]


@contextlib.contextmanager
def _uvicorn(app: str, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Serve ``app`` with real uvicorn on a free loopback port; yield its base URL.

    Ready once ``POST /enrich {}`` answers 200 (both baselines answer it without Redis).
    """
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
        "--loop", "uvloop", "--http", "httptools", "--no-access-log", *args,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="baseline-log-") as folder:
        log_path = Path(folder) / "uvicorn.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=log, cwd=ROOT, env={**os.environ, **(env or {})}
            )
        try:
            wait_until_ready(f"{url}/enrich", process, log_path, 20.0, post_body=b"{}")
            yield url
        finally:
            stop(process)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """One throwaway redis-server for the module; each test reloads it (FLUSHDB first)."""
    with redis_server() as url:
        yield url


@pytest.fixture(scope="module")
def fastapi_url(redis_url: str) -> Iterator[str]:
    """The FastAPI + Redis baseline under real uvicorn, reading ``redis_url``."""
    env = {"BASELINE_REDIS_URL": redis_url}
    with _uvicorn("bench.baselines.fastapi_redis:app", env=env) as url:
        yield url


def _redis_contents(url: str) -> dict[str, list[list[str | int]]]:
    with redis.Redis.from_url(url, decode_responses=True) as client:
        return {key: json.loads(client.get(key) or "null") for key in client.keys("*")}


def _enrich_server_answers(store: Path, bodies: list[bytes]) -> list[Answer]:
    app = create_app(load_config(flags={"server.store": str(store), "enrich.guard_lag_ms": 0.0}))
    answers: list[Answer] = []
    with TestClient(app) as client:
        for body in bodies:
            response = client.post("/enrich", content=body, headers=JSON_HEADERS)
            assert response.status_code == 200, response.text
            answers.append((response.json()["segment_ids"], response.headers["cache-control"]))
    return answers


def _baseline_answers(url: str, bodies: list[bytes]) -> list[Answer]:
    answers: list[Answer] = []
    with httpx.Client(base_url=url, timeout=10.0) as client:
        for body in bodies:
            response = client.post("/enrich", content=body, headers=JSON_HEADERS)
            assert response.status_code == 200, response.text
            answers.append((response.json()["segment_ids"], response.headers["cache-control"]))
    return answers


Compare = Callable[[str, list[bytes]], tuple[list[Answer], list[Answer]]]


@pytest.fixture
def compare(make_store: StoreFactory, tmp_path: Path, redis_url: str, fastapi_url: str) -> Compare:
    """``compare(snapshot, bodies)``: load ``snapshot`` into both servers (an LMDB store and
    Redis); returns the answers of (enrich-server, the baseline) to ``bodies``."""

    def run(snapshot: str, bodies: list[bytes]) -> tuple[list[Answer], list[Answer]]:
        source = tmp_path / "redis-snapshot.tsv"
        source.write_text(snapshot)
        load(source, redis_url)
        store = make_store(snapshot)
        return _enrich_server_answers(store, bodies), _baseline_answers(fastapi_url, bodies)

    return run


def _body(request: object) -> bytes:
    return json.dumps(request).encode()


# --- bare ---------------------------------------------------------------------------------


def test_bare_answers_constant_body_over_uvicorn() -> None:
    with _uvicorn("bench.baselines.bare:app", "--lifespan", "on") as url:
        posted = httpx.post(f"{url}/enrich", content=b"x" * 300_000, timeout=10.0)
        got = httpx.get(f"{url}/anything?q=1", timeout=10.0)
    for response in (posted, got):
        assert response.status_code == 200
        assert response.content == b'{"segment_ids":[]}'
        assert response.headers["content-type"] == "application/json"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["content-length"] == str(len(b'{"segment_ids":[]}'))


def test_bare_acknowledges_lifespan_events() -> None:
    incoming: asyncio.Queue[Message] = asyncio.Queue()
    sent: list[Message] = []

    async def receive() -> Message:
        return await incoming.get()

    async def send(message: Message) -> None:
        sent.append(message)

    async def run() -> None:
        incoming.put_nowait({"type": "lifespan.startup"})
        incoming.put_nowait({"type": "lifespan.shutdown"})
        await asyncio.wait_for(bare.app({"type": "lifespan"}, receive, send), timeout=5)

    asyncio.run(run())
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


# --- redis_load ---------------------------------------------------------------------------

LOADER_SNAPSHOT = (
    "# a comment, then a blank line\n"
    "\n"
    "uid:A\ts1,s2\n"
    "ifa:AAAA-BBBB\ts3\t4102444800\n"
    "eid:Source.COM:XyZ\ts4\n"
    "uid:A\ts2,s5\t100\n"  # repeated key: s2 takes the new expiry, s5 joins its group
    "uid:B\ta\n"
    "uid:B\tb\t100\n"
    "uid:B\tc\n"  # regrouped by expiry like enrich-server: a, c, then b
    "domain:Example.COM\t-gone,ctx\n"  # the removal is skipped
    "uid:onlyremoval\t-x\n"  # nothing to add: not written
)
LOADER_EXPECTED: dict[str, list[list[str | int]]] = {
    "uid:A": [["s1", 0], ["s2", 100], ["s5", 100]],
    "ifa:aaaa-bbbb": [["s3", 4102444800]],
    "eid:source.com:XyZ": [["s4", 0]],
    "uid:B": [["a", 0], ["c", 0], ["b", 100]],
    "domain:example.com": [["ctx", 0]],
}


@pytest.mark.parametrize("batch_size", [BATCH, 2])
@pytest.mark.parametrize("compressed", [False, True])
def test_redis_load_writes_merged_json_pairs(
    tmp_path: Path, redis_url: str, compressed: bool, batch_size: int
) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.set("stale", "left from before")  # FLUSHDB drops it
    path = tmp_path / ("snapshot.tsv.gz" if compressed else "snapshot.tsv")
    data = LOADER_SNAPSHOT.encode()
    path.write_bytes(gzip.compress(data) if compressed else data)
    # batch_size=2 makes uid:A and uid:B repeat across batches: merged through Redis.
    assert load(path, redis_url, batch_size=batch_size) == len(LOADER_EXPECTED)
    assert _redis_contents(redis_url) == LOADER_EXPECTED


def test_redis_load_rejects_bad_line_with_location(tmp_path: Path, redis_url: str) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text("uid:A\ts1\nnonamespace\ts2\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:2: .*no namespace"):
        load(path, redis_url)


def test_redis_load_cli_loads_example_snapshot(redis_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.baselines.redis_load", str(ROOT / "segments.example.tsv"),
         "--redis-url", redis_url],
        capture_output=True, text=True, cwd=ROOT, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("loaded 13 identities")
    contents = _redis_contents(redis_url)
    assert contents["uid:AbcdEfgHijklmnoP"] == [["sports_news", 0], ["football_players", 0]]
    assert contents["ifa:aaaaaaaa-ebad-aaaa-aaaa-aaaaaaa"] == [["cat_owners", 4102444800]]


# --- redis_server -------------------------------------------------------------------------


def test_redis_server_reports_missing_binary() -> None:
    with (
        pytest.raises(RuntimeError, match="make bench-deps"),
        redis_server(binary="no-such-redis-server-binary"),
    ):
        pass  # pragma: no cover


# --- fastapi_redis vs enrich-server -------------------------------------------------------


def test_fastapi_redis_matches_enrich_server_on_example_snapshot(
    compare: Compare, seed_bodies: dict[str, bytes]
) -> None:
    user = {"id": "AbcdEfgHijklmnoP", "ext": {"consent": CONSENTED}}
    site = {"domain": "Example.COM"}
    device = {"ifa": "AAAAAAAA-EBAD-aaaa-aaaa-aaaaaaa"}
    gpid = "/1234567/home/mpu/atf"
    bodies = [
        *seed_bodies.values(),
        _body({"user": {"id": "AbcdEfgHijklmnoP"}, "regs": {"coppa": 1}, "site": site}),
        _body({"user": user, "device": device, "regs": {"ext": {"us_privacy": "1YYN"}}}),
        _body({"user": {"id": "AbcdEfgHijklmnoP"}, "regs": {"gdpr": 1}, "site": site}),
        _body({"user": user, "regs": {"ext": {"gdpr": 1}}, "site": site}),  # consented
        _body({"device": {**device, "lmt": 1}, "site": site}),
        _body({"device": {"ifa": "00000000-0000-0000-0000-000000000000"}}),
        _body({"imp": [{"gpid": gpid}, {"ext": {"gpid": gpid}}, {"gpid": "/other"}]}),
        _body({"user": {"id": "nobody"}}),
        b"{}",
    ]
    snapshot = (ROOT / "segments.example.tsv").read_text()
    expected, got = compare(snapshot, bodies)
    assert got == expected
    assert expected[0] == (
        ["sports_news", "football_players", "target_shoppers", "gender_female", "arsenal",
         "english_sports", "cat_owners", "ctx_mobile_games", "ctx_homepage_atf"],
        "max-age=86400",
    )  # fmt: skip
    context = ["ctx_news", "sports_news"]
    assert expected[3:] == [
        (context, "no-cache"),  # COPPA: contextual only
        ([], "no-cache"),  # US Privacy opt-out, no contextual key
        (context, "no-cache"),  # GDPR without consent
        (["sports_news", "football_players", "ctx_news"], "max-age=86400"),  # consented
        (context, "max-age=86400"),  # LMT: the ifa key alone is skipped
        ([], "no-cache"),  # all-zero ifa
        (["ctx_homepage_atf"], "max-age=86400"),
        ([], "no-cache"),
        ([], "no-cache"),
    ]


def test_fastapi_redis_matches_enrich_server_on_expiry_merge_and_cap(compare: Compare) -> None:
    many = ",".join(f"seg{n}" for n in range(600))
    snapshot = (
        "uid:exp\told_news\t1000000000\n"  # expired long ago: never served
        f"uid:exp\tlive_news\t{FAR_FUTURE}\n"
        "uid:B\ta\n"
        "uid:B\tb\t4102444800\n"
        "uid:B\tc\n"  # regrouped by expiry on load: a, c, then b
        f"uid:big\t{many}\n"
        "domain:big.example\tctx_first,seg3\n"
    )
    bodies = [
        _body({"user": {"id": "exp"}}),
        _body({"user": {"id": "B"}}),
        _body({"user": {"id": "big"}, "site": {"domain": "big.example"}}),
        _body({"site": {"domain": "big.example"}}),
    ]
    expected, got = compare(snapshot, bodies)
    assert got == expected
    assert expected[0] == (["live_news"], "max-age=86400")
    assert expected[1] == (["a", "c", "b"], "max-age=86400")
    assert expected[2][0] == [f"seg{n}" for n in range(500)]  # capped, user-level first
    assert expected[3] == (["ctx_first", "seg3"], "max-age=86400")


def test_fastapi_redis_max_age_follows_shortest_ttl(compare: Compare) -> None:
    expires = int(time.time()) + 3600
    snapshot = f"uid:soon\tshort_lived\t{expires}\nuid:soon\tforever\n"
    body = _body({"user": {"id": "soon"}})
    [(expected_ids, expected_cache)], [(ids, cache)] = compare(snapshot, [body])
    assert ids == expected_ids == ["short_lived", "forever"]
    # Each server reads its own clock: allow the seconds that pass between the two answers.
    expected_age = int(expected_cache.removeprefix("max-age="))
    age = int(cache.removeprefix("max-age="))
    assert 3500 < age <= 3600
    assert abs(age - expected_age) <= 5
