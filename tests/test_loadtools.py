"""The benchmark's load tools against real servers: bench/openloop (open loop, C) and bench/wrk.

These check that the tools measure what they claim (counts, refusals, bounds, and above all
that openloop does not omit the waiting a slow server causes); they never assert speed.
"""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bench import openloop
from bench.wrk import check_loopback, run_wrk
from enrich_server.config import EXAMPLE_STORE
from tests.utils import RunningServer, free_port, run_server


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """The real server on the bundled example store, shared by this module's tests."""
    with run_server(EXAMPLE_STORE) as running:
        yield running


@pytest.fixture(scope="module")
def binary() -> Path:
    """The compiled openloop (built once; later runs reuse it)."""
    return openloop.build()


@pytest.fixture
def bodies(tmp_path: Path, seed_bodies: dict[str, bytes]) -> Path:
    """The three seed requests, one compact JSON body per line."""
    path = tmp_path / "bodies.txt"
    lines = [json.dumps(json.loads(body), separators=(",", ":")) for body in seed_bodies.values()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def test_openloop_counts_every_request(server: RunningServer, binary: Path, bodies: Path) -> None:
    result = openloop.run("127.0.0.1", _port(server.url), "/enrich", 300, 2.0, bodies)
    assert result["target_rate"] == 300
    assert result["connections"] == 64
    assert result["sent"] == 600
    assert result["completed"] == 600
    assert result["status"] == {"200": 600}
    assert result["errors"] == 0
    assert result["timeouts"] == 0
    assert result["achieved_rate"] == pytest.approx(300)
    latency = result["latency_us"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"]
    assert latency["p99.9"] <= latency["max"]
    assert 0 <= result["over_5ms_share"] <= 1
    assert 0 <= result["over_1ms_share"] <= 1
    assert result["over_5ms"] <= result["completed"]


def test_openloop_refuses_other_hosts(binary: Path, bodies: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1 (never routed); the tool must refuse before any socket.
    for host in ("192.0.2.1", "example.com", "0.0.0.0"):
        result = subprocess.run(
            [str(binary), "--host", host, "--port", "80", "--path", "/enrich",
             "--rate", "100", "--duration", "1", "--bodies", str(bodies)],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        assert "refusing" in result.stderr
    with pytest.raises(RuntimeError, match="refusing"):
        openloop.run("192.0.2.1", 80, "/enrich", 100, 1.0, bodies)
    with pytest.raises(ValueError, match="refusing"):
        openloop.split_url("http://192.0.2.1:80/enrich")
    with pytest.raises(ValueError, match="refusing"):
        check_loopback("http://192.0.2.1:80/enrich")


def test_openloop_without_a_listener_ends_on_time(binary: Path, bodies: Path) -> None:
    started = time.monotonic()
    result = openloop.run("127.0.0.1", free_port(), "/enrich", 100, 1.0, bodies, timeout_ms=500)
    elapsed = time.monotonic() - started
    # The bound: duration + timeout + 2 s (process start-up included here).
    assert elapsed < 1.0 + 0.5 + 2.0
    assert result["completed"] == 0
    assert result["sent"] == 0
    assert result["errors"] > 0
    assert result["error_kinds"]["connect"] > 0
    assert result["timeouts"] == 100  # every due request was lost, none silently dropped
    assert result["over_5ms_or_lost_share"] == 1


#: Answers a request on the socket; returns False when the connection is to be closed.
Answer = Callable[[socket.socket], bool]
EMPTY = b'{"segment_ids":[]}'
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
    len(EMPTY),
    EMPTY,
)


class TinyServer:
    """HTTP/1.1 on 127.0.0.1, one connection at a time, answering each request with ``answer``.

    Records how long each request took on the server side (``service_times``).
    """

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.service_times: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> TinyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.listener.close()

    def _serve(self) -> None:
        # Every wait is a 0.1 s timeout re-checking `stop`, so the thread ends with the test.
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(0.1)
                self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        buffer = b""
        while not self.stop.is_set():
            head, sep, rest = buffer.partition(b"\r\n\r\n")
            if sep:
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(rest) >= length:
                    received = time.monotonic()
                    buffer = rest[length:]
                    try:
                        keep = self.answer(conn)
                    except OSError:
                        return
                    self.service_times.append(time.monotonic() - received)
                    if not keep:
                        return
                    continue
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buffer += chunk


def slow(conn: socket.socket) -> bool:
    """Answer 50 ms after the request arrived."""
    time.sleep(0.05)
    conn.sendall(OK)
    return True


def trickle(conn: socket.socket) -> bool:
    """Answer one byte per send: the client must reassemble partial reads."""
    for i in range(len(OK)):
        conn.sendall(OK[i : i + 1])
        time.sleep(0.0002)
    return True


def close_after(conn: socket.socket) -> bool:
    """Answer with ``Connection: close`` and close: the client must reconnect, no error."""
    conn.sendall(OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
    return False


def chunked(conn: socket.socket) -> bool:
    """A chunked answer, which openloop does not decode: it must count errors, not hang."""
    conn.sendall(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (len(EMPTY), EMPTY)
    )
    return True


@pytest.mark.parametrize("answer", [trickle, close_after, chunked])
def test_openloop_response_framing(binary: Path, bodies: Path, answer: Answer) -> None:
    with TinyServer(answer) as server:
        result = openloop.run(
            "127.0.0.1", server.port, "/enrich", 40, 0.5, bodies, connections=1, timeout_ms=1000
        )
    assert result["sent"] == 20
    assert result["timeouts"] == 0
    if answer is chunked:
        assert result["completed"] == 0
        assert result["failed"] == 20
        assert result["error_kinds"]["parse"] == 20
    else:
        assert result["completed"] == 20
        assert result["status"] == {"200": 20}
        assert result["errors"] == 0


def test_openloop_counts_the_queueing_a_slow_server_causes(binary: Path, bodies: Path) -> None:
    # 100 requests due over 1 s, one connection, 50 ms each: the server needs 5 s, so request
    # i waits behind i others and is answered ~50 + 40 * i ms after it was due.
    with TinyServer(slow) as server:
        result = openloop.run(
            "127.0.0.1", server.port, "/enrich", 100, 1.0, bodies, connections=1, timeout_ms=5000
        )
    assert result["completed"] == 100, result
    assert result["errors"] == 0
    latency = result["latency_us"]
    # What a closed-loop tool would report: the server's own ~50 ms per request.
    closed_loop = statistics.median(server.service_times)
    assert 0.045 < closed_loop < 0.2
    # What the caller saw: queueing included, seconds rather than 50 ms.
    assert latency["min"] >= 45_000
    assert latency["p50"] > 1_000_000
    assert latency["p99"] > 3_000_000
    assert latency["p99"] > 20 * closed_loop * 1e6
    assert result["send_delay_us"]["max"] > 2_000_000  # the wait happened in the queue


def test_wrk_posts_the_bodies(server: RunningServer, bodies: Path) -> None:
    result = run_wrk(f"{server.url}/enrich", bodies, 2.0, connections=8, check_segments=True)
    assert result["rps"] > 0
    assert result["requests"] > 0
    assert result["errors_status"] == 0  # an empty or non-JSON body would be a 400
    assert result["errors_connect"] == 0
    # Answers listing segments prove the server read the seed bodies (the example store
    # knows their identities); a few may be load-shed empty answers.
    assert result["segment_responses"] > result["requests"] // 2
    assert 0 < result["p50_us"] <= result["p99_us"] <= result["max_us"]
