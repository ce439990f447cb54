"""HTTP conformance of the fast lane: the same raw bytes sent to ``serve`` (POST /enrich
answered inside the HTTP protocol) and to plain uvicorn (httptools, every call through ASGI)
running the same app on the same store get the same answers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from enrich_server.app import CONFIG_HANDOFF_VARIABLE
from enrich_server.config import EXAMPLE_STORE, SAMPLES_DIR, load_config, to_json
from tests.utils import ROOT, RunningServer, free_port, run_server, stop, wait_until_ready

CONFIG = """
[enrich]
max_body = 4096

[enrich.auth]
header = "X-Api-Key"
query = "token"
tokens = ["t0ken"]
"""
APP = (SAMPLES_DIR / "app.json").read_bytes()
KEY = b"x-api-key: t0ken"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: tuple[tuple[str, str], ...]  # without Date (checked present, then dropped)
    body: bytes


@dataclass(frozen=True)
class Exchange:
    answers: tuple[Answer, ...]
    closed: bool  # the server closed the connection after them


def _post(
    body: bytes, *headers: bytes, target: bytes = b"/enrich", version: bytes = b"1.1"
) -> bytes:
    head = b"POST " + target + b" HTTP/" + version + b"\r\nhost: t\r\n"
    head += b"".join(h + b"\r\n" for h in headers)
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


def _get(target: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nhost: t\r\n\r\n"


def _parse(data: bytes) -> tuple[list[Answer], bytes]:
    """Complete responses at the start of ``data`` (interim 100s included), and the rest."""
    answers: list[Answer] = []
    while (end := data.find(b"\r\n\r\n")) >= 0:
        lines = data[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        fields = [tuple(x.strip() for x in line.split(":", 1)) for line in lines[1:]]
        headers = {name.lower(): value for name, value in fields}
        length = int(headers.get("content-length", "0"))
        if len(data) < end + 4 + length:
            break
        if status != 100:
            assert "date" in headers, lines
        kept = tuple(sorted((k, v) for k, v in headers.items() if k != "date"))
        answers.append(Answer(status, kept, data[end + 4 : end + 4 + length]))
        data = data[end + 4 + length :]
    return answers, data


def exchange(port: int, *sends: bytes, expect: int, pause: float = 0.0) -> Exchange:
    """Send each of ``sends`` (``pause`` between them) on one connection; read ``expect``
    answers, then whether the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for i, data in enumerate(sends):
            if i and pause:
                time.sleep(pause)
            sock.sendall(data)
        received = b""
        answers: list[Answer] = []
        closed = False
        while len(answers) < expect:
            chunk = sock.recv(1 << 16)
            if not chunk:
                closed = True
                break
            received += chunk
            answers, _ = _parse(received)
        if not closed:
            sock.settimeout(0.3)
            try:
                closed = sock.recv(1) == b""
            except TimeoutError:
                closed = False
        return Exchange(tuple(answers), closed)


@dataclass(frozen=True)
class Servers:
    fast: int
    plain: int


@pytest.fixture(scope="module")
def config_file() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "enrich.toml"
        path.write_text(CONFIG)
        yield path


@contextlib.contextmanager
def plain_uvicorn(config_file: Path) -> Iterator[RunningServer]:
    """The same app on plain uvicorn (httptools protocol, every call through ASGI)."""
    # The guard off, as run_server has it: the answers are compared exactly.
    flags = {"server.store": str(EXAMPLE_STORE), "enrich.guard_lag_ms": 0.0}
    config = load_config(config_file, {}, flags)
    port = free_port()
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "uvicorn.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "enrich_server.app:create_app_from_handoff",
                 "--factory", "--http", "httptools", "--loop", "uvloop", "--port", str(port),
                 "--no-access-log", "--no-server-header"],
                stdout=out, stderr=out, cwd=ROOT,
                env={**os.environ, CONFIG_HANDOFF_VARIABLE: to_json(config).decode()},
            )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_ready(url, process, log, 20)
            yield RunningServer(url, process, log)
        finally:
            stop(process)


@pytest.fixture(scope="module")
def servers(config_file: Path) -> Iterator[Servers]:
    env = {"ENRICH_ENRICH_GUARD_LAG_MS": "0"}
    with (
        run_server(EXAMPLE_STORE, "--config", str(config_file), env=env) as fast,
        plain_uvicorn(config_file) as plain,
    ):
        yield Servers(_port(fast), _port(plain))


def _port(server: RunningServer) -> int:
    return int(server.url.rsplit(":", 1)[1])


CHUNKED = (
    b"POST /enrich HTTP/1.1\r\nhost: t\r\nx-api-key: t0ken\r\ntransfer-encoding: chunked\r\n\r\n"
    + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (APP[:7], APP[7:100], APP[100:]))
    + b"0\r\n\r\n"
)

CASES = [
    pytest.param([_post(APP, target=b"/enrich?token=t0ken")], 1, id="query-token"),
    pytest.param([_post(APP, target=b"/enrich?a=1&token=t0ken&b=2")], 1, id="query-token-among"),
    pytest.param([_post(APP)], 1, id="no-credentials-401"),
    pytest.param([_post(APP, b"x-api-key: wrong")], 1, id="bad-credentials-401"),
    pytest.param([_post(APP, KEY) * 3], 3, id="pipelined-keep-alive"),
    pytest.param([_post(APP, KEY, version=b"1.0")], 1, id="http-1.0-closes"),
    pytest.param([_post(APP, KEY, b"connection: keep-alive", version=b"1.0")], 1,
                 id="http-1.0-keep-alive"),
    pytest.param([_post(APP, KEY, b"connection: close") + _post(APP, KEY)], 1,
                 id="connection-close"),
    pytest.param([CHUNKED + _post(b"{}", KEY)], 2, id="chunked-body"),
    pytest.param([_post(b"", KEY)], 1, id="empty-body-400"),
    pytest.param([_post(b"{oops", KEY) + _post(APP, KEY)], 2, id="not-json-400-then-more"),
    pytest.param([_post(b"[" * 4000 + b"]" * 96, KEY)], 1, id="over-max-body-413"),
    pytest.param([_post(b" " * 5000, KEY) + _post(APP, KEY)], 2, id="413-then-next-request"),
    pytest.param([_get(b"/enrich")], 1, id="get-405"),
    pytest.param([_get(b"/healthz") + _post(APP, KEY) + _get(b"/readyz") + _post(b"{}", KEY)],
                 4, id="pipelined-across-lanes"),
    pytest.param([b"POST /enrich HTTP/1.1\r\nhost: t\r\ncontent-length: zz\r\n\r\n"], 1,
                 id="malformed-400"),
    pytest.param([b"GARBAGE\r\n\r\n"], 1, id="garbage-400"),
    pytest.param([_post(APP, KEY, target=b"/enrich/other")], 1, id="other-path-404"),
]  # fmt: skip


@pytest.mark.parametrize(("sends", "expect"), CASES)
def test_same_answers_on_both_lanes(servers: Servers, sends: list[bytes], expect: int) -> None:
    fast = exchange(servers.fast, *sends, expect=expect)
    plain = exchange(servers.plain, *sends, expect=expect)
    assert len(fast.answers) == expect
    assert fast == plain


def test_upgrade_keeps_reading_on_the_fast_lane(servers: Servers) -> None:
    # Plain uvicorn loses the body of an upgrade request and what follows it; we do not.
    sends = _post(APP, KEY, b"connection: upgrade", b"upgrade: h2c") + _post(b"{}", KEY)
    fast = exchange(servers.fast, sends, expect=2)
    assert [a.status for a in fast.answers] == [200, 200]
    assert b"sports_news" in fast.answers[0].body


def test_expect_100_continue(servers: Servers) -> None:
    head, body = _post(APP, KEY, b"expect: 100-continue").split(b"\r\n\r\n", 1)
    results = [
        exchange(port, head + b"\r\n\r\n", body, expect=2, pause=0.2)
        for port in (servers.fast, servers.plain)
    ]
    assert results[0] == results[1]
    assert [a.status for a in results[0].answers] == [100, 200]


def test_split_packets(servers: Servers) -> None:
    request = _post(APP, KEY)
    cuts = [request[:5], request[5:40], request[40:-10], request[-10:]]
    results = [
        exchange(port, *cuts, expect=1, pause=0.05) for port in (servers.fast, servers.plain)
    ]
    assert results[0] == results[1]
    assert results[0].answers[0].status == 200


def test_client_that_stops_reading_gets_every_answer_in_order(servers: Servers) -> None:
    # 3,000 pipelined calls sent before reading anything: the server must stop reading while
    # the client does not read (flow control), then answer every one, in order.
    bodies = [b'{"user":{"id":"u%d"}}' % i if i % 7 else APP for i in range(3000)]
    results = [
        exchange(port, b"".join(_post(b, KEY) for b in bodies), expect=len(bodies))
        for port in (servers.fast, servers.plain)
    ]
    assert len(results[0].answers) == len(bodies)
    assert results[0] == results[1]


def test_graceful_shutdown_answers_what_was_received(config_file: Path) -> None:
    request = _post(APP, KEY)
    for lane in ("fast", "plain"):
        manager = (
            run_server(EXAMPLE_STORE, "--config", str(config_file))
            if lane == "fast"
            else plain_uvicorn(config_file)
        )
        with manager as running:
            with socket.create_connection(("127.0.0.1", _port(running)), timeout=10) as sock:
                sock.sendall(request[:-20])  # half received when the server is told to stop
                time.sleep(0.2)
                os.kill(running.process.pid, signal.SIGTERM)
                time.sleep(0.2)
                sock.sendall(request[-20:])
                received = b""
                while chunk := sock.recv(1 << 16):
                    received += chunk
            answers, _ = _parse(received)
            assert [a.status for a in answers] == [200], lane
            assert ("connection", "close") in answers[0].headers, lane
            if lane == "fast":  # and it was the fast lane that answered
                running.process.wait(10)
                stopping = [
                    line for line in running.log().splitlines() if "worker stopping" in line
                ]
                assert '"fast_lane":1' in stopping[0].replace(" ", ""), stopping
