"""Helpers for tests that run the real server: a free port and a ``serve`` subprocess."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx

from enrich_server.store import Tables, open_environment

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Stop a child process: SIGTERM, then SIGKILL if it is still there after ``timeout``."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class RunningServer:
    """A ``serve`` subprocess: its base URL, process and JSON-lines log file."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        """Everything the server logged so far."""
        return self.log_path.read_text()


def wait_until_ready(
    url: str,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout: float,
    post_body: bytes | None = None,
    *,
    path: str = "/readyz",
) -> None:
    """Poll ``url`` + ``path`` (or POST ``post_body`` to ``url`` itself, for servers without
    one) until it answers 200; fail with the server's log if it dies or hangs."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if post_body is None:
                response = httpx.get(f"{url}{path}", timeout=1.0)
            else:
                response = httpx.post(url, content=post_body, timeout=1.0)
            if response.status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready on {url} after {timeout}s:\n{log.read_text()}")
        time.sleep(0.05)


@contextlib.contextmanager
def run_server(
    store: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 20.0,
    wait_for: str = "/readyz",
) -> Iterator[RunningServer]:
    """Run ``enrich-server serve`` on a free loopback port until the block ends.

    Waits until ``wait_for`` (``/readyz``; ``/healthz`` for a node expected not ready)
    answers 200, and stops the server (SIGTERM, then SIGKILL) after.
    The overload guard is off unless ``env`` sets it: these tests assert exact answers, and
    on a shared VM the CPU can be taken away long enough to look like overload.
    """
    port = free_port()
    command = [
        sys.executable, "-m", "enrich_server", "serve",
        "--store", str(store), "--host", "127.0.0.1", "--port", str(port), *args,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="enrich-server-log-") as folder:
        log_path = Path(folder) / "server.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                stdout=log,
                stderr=log,
                env={**os.environ, "ENRICH_ENRICH_GUARD_LAG_MS": "0", **(env or {})},
                cwd=ROOT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_ready(url, process, log_path, timeout, path=wait_for)
            yield RunningServer(url, process, log_path)
        finally:
            stop(process)


def raw_members(store: Path) -> dict[bytes, bytes]:
    """The ``members`` table of the store in directory ``store``, key -> value bytes as
    stored (for tests comparing two ways of writing the same data byte for byte)."""
    env = open_environment(store, map_size=0, readonly=True)
    try:
        with env.begin() as txn:
            members = env.open_db(Tables.MEMBERS, txn=txn, create=False)
            return {bytes(k): bytes(v) for k, v in txn.cursor(db=members)}
    finally:
        env.close()
