"""Run a throwaway ``redis-server`` for the FastAPI + Redis baseline (benchmarks and tests).

Loopback only, no persistence, in a temporary directory; stopped when the block ends::

    with redis_server() as url:  # "redis://127.0.0.1:PORT/0"
        ...
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import redis

from tests.utils import free_port

#: How long ``redis-server`` may take to answer its first PING.
START_TIMEOUT: Final = 10.0
_STOP_TIMEOUT: Final = 10.0


@contextlib.contextmanager
def redis_server(port: int | None = None, binary: str = "redis-server") -> Iterator[str]:
    """Start ``redis-server`` on 127.0.0.1 (``port`` or a free one); yield its URL.

    Raises ``RuntimeError`` when the binary is missing, or when the server exits or does not
    answer PING within ``START_TIMEOUT`` seconds (with what it printed).
    """
    executable = shutil.which(binary)
    if executable is None:
        raise RuntimeError(
            f"{binary!r} not found: install Debian's redis-server package (make bench-deps)"
        )
    port = free_port() if port is None else port
    url = f"redis://127.0.0.1:{port}/0"
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as folder:
        log_path = Path(folder) / "redis.log"
        command = [
            executable,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",  # no RDB snapshots
            "--appendonly", "no",
            "--dir", folder,
            "--daemonize", "no",
            "--logfile", "",  # to stdout, i.e. log_path
        ]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        try:
            _wait_for_ping(url, process, log_path)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_for_ping(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"redis-server exited with {process.returncode}:\n{log_path.read_text()}"
            )
        try:
            with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1) as client:
                if client.ping():
                    return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"redis-server not answering on {url} after {START_TIMEOUT}s:\n"
                f"{log_path.read_text()}"
            )
        time.sleep(0.05)
