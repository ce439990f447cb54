"""The server side of the hostile benchmark: ``enrich-server serve`` on loopback, sent the
hostile bodies, fuzzed bodies and slowloris connections, every loop bounded in time and count.

A request that times out means a worker is stuck (today: for minutes on some bodies), and
every request behind it would time out too; the server is then restarted (its process group
killed) and the stall counted, so one bad body costs seconds, not the run. Its temporary
files go to a ``TMPDIR`` of its own, removed with the work directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Final

from bench import openloop
from bench.hostile_bodies import Body, is_json
from enrich_server.config import SAMPLES_DIR
from tests.utils import ROOT, free_port, wait_until_ready

CLIENT_TIMEOUT_S: Final = 2.0
#: A keep-alive connection idle longer than this is replaced before use (the server may have
#: closed it: uvicorn's keep-alive timeout is 5 s).
_IDLE_S: Final = 1.0
#: Examples of each kind of bad answer kept for reproduction.
_EXAMPLES: Final = 5


class ServerRefusedError(RuntimeError):
    """``serve`` exited at start-up with a configuration error (the message is its log)."""


class Server:
    """``enrich-server serve`` on a free loopback port, in its own process group, restartable.

    ``TMPDIR`` points into ``workdir``, so what a killed server leaves there is removed with it.
    """

    def __init__(self, store: Path, workdir: Path, env: dict[str, str] | None = None) -> None:
        self.store = store
        self.workdir = workdir
        self.log_path = workdir / "server.log"
        self.env = {
            **os.environ, "ENRICH_ENRICH_GUARD_LAG_MS": "0", "TMPDIR": str(workdir / "tmp"),
            **(env or {}),
        }  # fmt: skip
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        """Start and wait until ready; ``ServerRefusedError`` on a configuration error."""
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        command = [
            sys.executable, "-m", "enrich_server", "serve", "--store", str(self.store),
            "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
        ]  # fmt: skip
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=log, env=self.env, cwd=ROOT, start_new_session=True
            )
        try:
            wait_until_ready(f"http://127.0.0.1:{self.port}", self.process, self.log_path, 60.0)
        except RuntimeError:
            self.stop()
            text = self.log_path.read_bytes()[offset:].decode(errors="replace")
            if "configuration error" in text:
                raise ServerRefusedError(text.strip()) from None
            raise

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group; SIGKILL it if the server is still there after ``grace``."""
        process, self.process = self.process, None
        if process is None:
            return
        if grace > 0:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the group: serve and any child of it
        process.wait()

    def restart(self) -> None:
        """Replace a stuck server by a fresh one (a stuck worker handles no SIGTERM: killed)."""
        self.stop(grace=0)
        self.restarts += 1
        self.start()

    def logged_failures(self) -> int:
        """Requests answered empty after an exception in the app ("enrich failed")."""
        return self.log_path.read_bytes().count(b"enrich failed")


@contextlib.contextmanager
def serving(store: Path, workdir: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """A started ``Server``, stopped when the block ends."""
    server = Server(store, workdir, env)
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Connection:
    """One keep-alive HTTP/1.1 connection to ``POST /enrich`` over a raw socket."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._sock: socket.socket | None = None
        self._used = 0.0
        self._deadline = 0.0

    def close(self) -> None:
        """Drop the connection (the next request opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def send(self, body: bytes, timeout: float = CLIENT_TIMEOUT_S) -> str | None:
        """Send one request; ``None``, or ``"timeout"``/``"connection_error"``."""
        self._deadline = time.monotonic() + timeout
        if self._sock is not None and time.monotonic() - self._used > _IDLE_S:
            self.close()
        try:
            if self._sock is None:
                self._sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
                self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.settimeout(timeout)
            self._sock.sendall(
                b"POST /enrich HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
            )
        except TimeoutError:
            self.close()
            return "timeout"
        except OSError:
            self.close()
            return "connection_error"
        return None

    def receive(self) -> int | str:
        """The status of the answer to the request sent, or ``"timeout"``/``"connection_error"``."""
        if self._sock is None:
            return "connection_error"
        try:
            status = self._read_response(self._sock)
        except TimeoutError:
            self.close()
            return "timeout"
        except (OSError, ValueError):
            self.close()
            return "connection_error"
        self._used = time.monotonic()
        return status

    def request(self, body: bytes, timeout: float = CLIENT_TIMEOUT_S) -> int | str:
        """Send and receive one request."""
        return self.send(body, timeout) or self.receive()

    def _recv(self, sock: socket.socket) -> bytes:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise ValueError("connection closed before the answer ended")
        return chunk

    def _read_response(self, sock: socket.socket) -> int:
        data = b""
        while b"\r\n\r\n" not in data:
            data += self._recv(sock)
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        fields = dict(line.lower().split(b":", 1) for line in lines[1:] if b":" in line)
        length = int(fields.get(b"content-length", b"0"))
        while len(rest) < length:
            rest += self._recv(sock)
        if fields.get(b"connection", b"").strip() == b"close":
            self.close()
        return status


def acceptable(status: int | str, json_body: bool) -> bool:
    """The contract: JSON gets 200; not JSON gets 400 (or 200: harmless, e.g. bad UTF-8 in a
    field the decoder skips); never a 5xx, a timeout or a dropped connection."""
    return status == 200 or (status == 400 and not json_body)


def send_hostile(server: Server, bodies: Iterable[Body]) -> list[dict[str, Any]]:
    """Each hostile body alone on one keep-alive connection: its status and latency."""
    rows = []
    connection = Connection(server.port)
    for case in bodies:
        started = time.monotonic()
        status = connection.request(case.body)
        rows.append(
            {
                "phase": "server",
                "case": case.name,
                "status": status,
                "acceptable": acceptable(status, case.json),
                "ms": round((time.monotonic() - started) * 1000, 3),
            }
        )
        if status == "timeout":
            server.restart()
            connection = Connection(server.port)
    connection.close()
    return rows


@dataclass
class FuzzTally:
    """What the fuzzed bodies got."""

    sent: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    json_not_200: int = 0
    stalls: int = 0
    stopped: str | None = None


def send_fuzzed(  # noqa: PLR0917 - internal, called once by bench.hostile
    server: Server,
    bodies: Iterator[tuple[str, bytes]],
    connections: int,
    max_stalls: int,
    time_cap: float,
    examples: dict[str, list[tuple[str, bytes]]],
) -> FuzzTally:
    """Fuzzed bodies over ``connections`` keep-alive connections, one request in flight on
    each; a timeout restarts the server. Stops after ``max_stalls`` restarts or ``time_cap``
    seconds. Bodies answered 5xx, timed out, or JSON answered other than 200 go to
    ``examples`` (a few of each)."""
    tally = FuzzTally()
    pool = [Connection(server.port) for _ in range(connections)]
    give_up = time.monotonic() + time_cap
    number = 0
    while batch := list(islice(bodies, connections)):
        sent = [c.send(body) for c, (_, body) in zip(pool, batch, strict=False)]
        results = [s or c.receive() for c, s in zip(pool, sent, strict=False)]
        for (kind, body), result in zip(batch, results, strict=True):
            number += 1
            tally.sent += 1
            tally.statuses[str(result)] += 1
            bad = None
            if not isinstance(result, int) or result >= 500:
                bad = str(result)
            elif result != 200 and not acceptable(result, is_json(body)):
                tally.json_not_200 += 1
                bad = f"json_answered_{result}"
            if bad is not None:
                kept = examples.setdefault(bad, [])
                if len(kept) < _EXAMPLES:
                    kept.append((f"fuzz-{number}-{kind}-{bad}", body))
        if "timeout" in results:
            tally.stalls += 1
            if tally.stalls > max_stalls:
                tally.stopped = f"stopped after {max_stalls} stalls"
                break
            server.restart()
            pool = [Connection(server.port) for _ in range(connections)]
        if time.monotonic() > give_up:
            tally.stopped = f"stopped at the {time_cap:.0f} s time cap"
            break
    for connection in pool:
        connection.close()
    return tally


# --- slowloris ------------------------------------------------------------------------------

_SLOW_HEAD: Final = b"POST /enrich HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def _drip(port: int, count: int, interval: float, seconds: float, ready: threading.Event,  # noqa: PLR0917 - internal, called once by bench.hostile
          out: list[float | None]) -> None:  # fmt: skip
    """Open ``count`` connections, send each one header byte every ``interval`` s, and record
    in ``out`` how long the server took to close each (``None``: still open after
    ``seconds``)."""
    selector = selectors.DefaultSelector()
    opened: dict[socket.socket, float] = {}
    sent: dict[socket.socket, int] = {}
    index: dict[socket.socket, int] = {}
    out[:] = [None] * count
    try:
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=2.0)
            sock.setblocking(False)
            opened[sock], sent[sock], index[sock] = time.monotonic(), 0, i
            selector.register(sock, selectors.EVENT_READ)
        ready.set()
        give_up = time.monotonic() + seconds
        tick = time.monotonic()

        def closed(sock: socket.socket) -> None:
            out[index[sock]] = time.monotonic() - opened.pop(sock)
            selector.unregister(sock)
            sock.close()

        while opened and time.monotonic() < give_up:
            if time.monotonic() >= tick:
                for sock in list(opened):
                    byte = _SLOW_HEAD[sent[sock] : sent[sock] + 1] or b"a"
                    try:
                        sent[sock] += sock.send(byte)
                    except BlockingIOError:
                        pass
                    except OSError:
                        closed(sock)
                tick += interval
            for key, _ in selector.select(max(0.0, min(tick, give_up) - time.monotonic())):
                sock = key.fileobj  # type: ignore[assignment]  # registered sockets only
                try:
                    data = sock.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:  # the server closed it (an answer first, e.g. 408, is fine)
                    closed(sock)
    finally:
        ready.set()
        for sock in opened:
            sock.close()
        selector.close()


def _normal_client(port: int, workdir: Path, rate: float, seconds: float) -> dict[str, Any]:
    bodies = workdir / "normal-bodies.txt"
    samples = sorted(SAMPLES_DIR.glob("*.json"))
    bodies.write_text("".join(json.dumps(json.loads(p.read_text())) + "\n" for p in samples))
    result = openloop.run(
        "127.0.0.1", port, "/enrich", rate, seconds, bodies, connections=2, warmup=0.5
    )
    latency = result["latency_us"]
    return {
        "rate": rate,
        "completed": result["completed"],
        "timeouts": result["timeouts"],
        "errors": result["errors"],
        "status": result["status"],
        "p50_us": latency["p50"],
        "p99_us": latency["p99"],
        "max_us": latency["max"],
    }


def slowloris(  # noqa: PLR0917 - internal, called once by bench.hostile
    store: Path, workdir: Path, connections: int, header_timeout: float, tolerance: float,
    rate: float,
) -> dict[str, Any]:  # fmt: skip
    """Slow connections against a server started with ``ENRICH_SERVER_HEADER_TIMEOUT``, while
    a normal client sends ``rate`` requests/s (open loop) before and during them."""
    env = {"ENRICH_SERVER_HEADER_TIMEOUT": f"{header_timeout:g}"}
    server = Server(store, workdir, env)
    try:
        server.start()
    except ServerRefusedError as exc:
        return {
            "supported": False,
            "message": "slowloris: not supported by this server (no header_timeout)",
            "server_said": str(exc).splitlines()[-1],
        }
    seconds = header_timeout + tolerance + 2.0
    try:
        alone = _normal_client(server.port, workdir, rate, seconds)
        closes: list[float | None] = []
        ready = threading.Event()
        dripper = threading.Thread(
            target=_drip, args=(server.port, connections, 0.5, seconds + 1.0, ready, closes)
        )
        dripper.start()
        ready.wait(30.0)
        beside = _normal_client(server.port, workdir, rate, seconds)
        dripper.join()
    finally:
        server.stop()
    done = [c for c in closes if c is not None]
    limit = header_timeout + tolerance
    return {
        "supported": True,
        "connections": connections,
        "header_timeout_s": header_timeout,
        "closed": len(done),
        "still_open": len(closes) - len(done),
        "closed_within_limit": sum(1 for c in done if c <= limit),
        "close_max_s": round(max(done), 3) if done else None,
        "close_median_s": round(statistics.median(done), 3) if done else None,
        "normal_alone": alone,
        "normal_beside": beside,
    }
