"""The hardened HTTP protocol over raw sockets against the real server: Upgrade headers
ignored, read deadlines, the idle-connection cap, and keep-alive callers never cut."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from enrich_server.config import EXAMPLE_STORE, SAMPLES_DIR
from enrich_server.protocol import SWEEP_SECONDS
from tests.utils import RunningServer, run_server

APP = (SAMPLES_DIR / "app.json").read_bytes()
APP_ANSWER = b'"segment_ids":["sports_news","football_players"'
EMPTY = b'{"segment_ids":[]}'
TIMEOUTS = {
    "ENRICH_SERVER_HEADER_TIMEOUT": "1",
    "ENRICH_SERVER_BODY_TIMEOUT": "1",
    "ENRICH_SERVER_KEEPALIVE_TIMEOUT": "1",
    "ENRICH_SERVER_MAX_IDLE_CONNECTIONS": "3",
}
#: How late the server may close past a deadline: one sweep, plus a loaded VM's slack.
LATE = SWEEP_SECONDS + 1.0


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    with run_server(EXAMPLE_STORE, env=TIMEOUTS) as running:
        yield running


def _connect(server: RunningServer) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _post(body: bytes, *headers: bytes) -> bytes:
    head = b"POST /enrich HTTP/1.1\r\nHost: t\r\n" + b"".join(h + b"\r\n" for h in headers)
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


def _read_answers(sock: socket.socket, count: int) -> list[bytes]:
    """Read ``count`` complete responses (content-length framed); returns their bodies."""
    data = b""
    bodies: list[bytes] = []
    while len(bodies) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            head = data[:head_end].lower()
            length = int(head.split(b"content-length: ")[1].split(b"\r\n")[0])
            end = head_end + 4 + length
            if len(data) >= end:
                assert head.startswith(b"http/1.1 200"), head
                bodies.append(data[head_end + 4 : end])
                data = data[end:]
                continue
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {len(bodies)} of {count} answers"
        data += chunk
    return bodies


def _closed_after(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes ``sock`` (reading and discarding), at most ``limit``."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        pytest.fail(f"still open after {limit} s")
    except ConnectionResetError:
        pass
    return time.monotonic() - started


@pytest.mark.parametrize(
    "upgrade",
    [
        pytest.param((b"connection: Upgrade, HTTP2-Settings", b"upgrade: h2c",
                      b"http2-settings: AAMAAABkAARAAAAAAAIAAAAA"), id="h2c"),
        pytest.param((b"connection: upgrade", b"upgrade: websocket"), id="websocket"),
    ],
)  # fmt: skip
def test_upgrade_is_ignored_and_body_and_pipeline_answered(
    server: RunningServer, upgrade: tuple[bytes, ...]
) -> None:
    with _connect(server) as sock:
        sock.sendall(_post(APP, *upgrade) + _post(b"{}") + _post(APP))
        first, second, third = _read_answers(sock, 3)
    assert APP_ANSWER in first
    assert second == EMPTY
    assert APP_ANSWER in third


def test_upgrade_with_chunked_body_is_read_as_http11(server: RunningServer) -> None:
    chunked = (
        b"POST /enrich HTTP/1.1\r\nHost: t\r\nconnection: upgrade\r\nupgrade: h2c\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
        + b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (APP[:10], APP[10:]))
        + b"0\r\n\r\n"
    )
    with _connect(server) as sock:
        sock.sendall(chunked + _post(b"{}"))
        first, second = _read_answers(sock, 2)
    assert APP_ANSWER in first
    assert second == EMPTY


def test_upgrade_split_across_packets(server: RunningServer) -> None:
    request = _post(APP, b"connection: upgrade", b"upgrade: h2c")
    with _connect(server) as sock:
        for cut in (30, len(request) - len(APP) + 5):  # inside the headers, inside the body
            sock.sendall(request[:cut])
            time.sleep(0.05)
            sock.sendall(request[cut:])
            (answer,) = _read_answers(sock, 1)
            assert APP_ANSWER in answer


def test_slow_headers_are_cut_at_the_header_timeout(server: RunningServer) -> None:
    with _connect(server) as slow, _connect(server) as normal:
        slow.sendall(b"POST /enrich HTTP/1.1\r\n")
        started = time.monotonic()
        cut = False
        for _ in range(40):  # one header byte every 0.1 s: 4 s if never cut
            try:
                slow.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            # Meanwhile a normal caller on its own connection is answered as usual.
            normal.sendall(_post(APP))
            assert APP_ANSWER in _read_answers(normal, 1)[0]
            time.sleep(0.1)
        elapsed = time.monotonic() - started
        if not cut:
            elapsed = _closed_after(slow, 0.1)
    assert cut
    assert 0.9 <= elapsed <= 1 + LATE


def test_slow_body_is_cut_at_the_body_timeout(server: RunningServer) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /enrich HTTP/1.1\r\nHost: t\r\ncontent-length: 100\r\n\r\n{")
        assert 0.9 <= _closed_after(sock, 5) <= 1 + LATE


def test_connection_that_sends_nothing_is_closed_at_the_keepalive_timeout(
    server: RunningServer,
) -> None:
    with _connect(server) as sock:
        assert 0.9 <= _closed_after(sock, 5) <= 1 + LATE


def test_connection_idle_after_a_fast_answer_is_closed_at_the_keepalive_timeout(
    server: RunningServer,
) -> None:
    with _connect(server) as sock:
        sock.sendall(_post(APP))
        assert APP_ANSWER in _read_answers(sock, 1)[0]
        assert 0.9 <= _closed_after(sock, 5) <= 1 + LATE


def test_busy_keepalive_caller_is_never_cut(server: RunningServer) -> None:
    # Three times every timeout, on one connection: each request resets the deadlines.
    with _connect(server) as sock:
        deadline = time.monotonic() + 3.0
        answered = 0
        while time.monotonic() < deadline:
            sock.sendall(_post(APP))
            assert APP_ANSWER in _read_answers(sock, 1)[0]
            answered += 1
            time.sleep(0.2)
    assert answered >= 10


def test_idle_connections_past_the_cap_close_the_longest_idle(server: RunningServer) -> None:
    socks: list[socket.socket] = []
    try:
        for _ in range(5):
            sock = _connect(server)
            socks.append(sock)
            sock.sendall(_post(APP))
            assert APP_ANSWER in _read_answers(sock, 1)[0]  # each idle in turn, in order
            time.sleep(0.02)
        for sock in socks[:2]:  # the two that have been idle longest are closed at once...
            assert _closed_after(sock, 0.8) < 0.8
        for sock in socks[2:]:  # ... and the three newest still serve
            sock.sendall(_post(b"{}"))
            assert _read_answers(sock, 1) == [EMPTY]
    finally:
        for sock in socks:
            sock.close()
