"""Open-loop load from Python: builds and runs ``bench/openloop.c``.

``openloop`` sends request i at t0 + i/rate whatever the server does and measures each latency
from that intended send time, so a stalled server shows up in every request that waited
behind the stall (no coordinated omission). See the C file for the details and the JSON it
prints; this module only compiles it (once, into ``bench/.cache``) and runs it.

    python -m bench.openloop --url http://127.0.0.1:8080/enrich --rate 2000 --duration 10 \
        --bodies /tmp/bodies.txt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

HERE: Final = Path(__file__).resolve().parent
SOURCE: Final = HERE / "openloop.c"
CACHE: Final = HERE / ".cache"
CFLAGS: Final = ("-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror")
#: The only hosts the tool accepts (it refuses the rest itself, too).
LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "::1", "localhost"})


def build(cache: Path = CACHE) -> Path:
    """Compile ``openloop.c`` into ``cache/openloop`` unless an up-to-date binary is there.

    Returns the binary's path. Raises ``RuntimeError`` with gcc's output when compiling fails.
    """
    binary = cache / "openloop"
    if binary.exists() and binary.stat().st_mtime >= SOURCE.stat().st_mtime:
        return binary
    cache.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename, so a concurrent run never executes half a file.
    partial = cache / f"openloop.{os.getpid()}.tmp"
    command = ["gcc", *CFLAGS, "-o", str(partial), str(SOURCE), "-lm"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError as exc:
        raise RuntimeError("gcc not found: install it to build bench/openloop.c") from exc
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE} failed:\n{result.stdout}{result.stderr}")
    partial.replace(binary)
    return binary


def command_line(
    binary: Path,
    *,
    host: str,
    port: int,
    path: str,
    rate: float,
    duration: float,
    bodies: Path,
    connections: int,
    timeout_ms: int,
    warmup: float,
    cpu: int | None,
) -> list[str]:
    """The argument vector that runs ``binary`` with these settings (under taskset for cpu)."""
    command = [
        str(binary), "--host", host, "--port", str(port), "--path", path,
        "--rate", repr(float(rate)), "--duration", repr(float(duration)),
        "--connections", str(connections), "--bodies", str(bodies),
        "--timeout-ms", str(timeout_ms), "--warmup", repr(float(warmup)),
    ]  # fmt: skip
    if cpu is not None:
        taskset = shutil.which("taskset")
        if taskset is None:
            raise RuntimeError("taskset not found (util-linux); run without cpu=")
        command = [taskset, "-c", str(cpu), *command]
    return command


def run(  # noqa: PLR0917 - the benchmark's callers pass the target positionally
    host: str,
    port: int,
    path: str,
    rate: float,
    duration: float,
    bodies: Path,
    connections: int = 64,
    timeout_ms: int = 2000,
    warmup: float = 0.0,
    cpu: int | None = None,
) -> dict[str, Any]:
    """Offer ``rate`` requests/s for ``duration`` s to ``host:port`` ``path``; return the JSON.

    ``bodies`` holds one JSON request body per line. ``warmup`` seconds of load come first and
    are not recorded. With ``cpu`` the generator is pinned to that CPU (``taskset -c``).
    Raises ``RuntimeError`` with the tool's stderr when it exits non-zero (exit 2: bad usage,
    including a non-loopback host, which it refuses).
    """
    command = command_line(
        build(), host=host, port=port, path=path, rate=rate, duration=duration, bodies=bodies,
        connections=connections, timeout_ms=timeout_ms, warmup=warmup, cpu=cpu,
    )  # fmt: skip
    # The tool bounds itself (warmup + duration + timeout + 0.5 s of connecting); the margin
    # here only catches a wedged process.
    limit = warmup + duration + timeout_ms / 1000 + 10
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=math.ceil(limit), check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openloop exited with {result.returncode}:\n{result.stderr}")
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def split_url(url: str) -> tuple[str, int, str]:
    """``(host, port, path)`` of an ``http://`` loopback URL; ``ValueError`` otherwise."""
    parts = urlsplit(url)
    if parts.scheme != "http":
        raise ValueError(f"only http:// URLs are supported: {url}")
    host = parts.hostname or ""
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"refusing {url}: only 127.0.0.1, ::1 or localhost may be loaded")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return host, parts.port or 80, path


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.openloop``: run once and print the JSON result."""
    parser = argparse.ArgumentParser(prog="python -m bench.openloop", description=__doc__)
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT/PATH (loopback)")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds of load")
    parser.add_argument("--bodies", type=Path, required=True, help="one JSON body per line")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--timeout-ms", type=int, default=2000)
    parser.add_argument("--warmup", type=float, default=0.0, help="unrecorded seconds first")
    parser.add_argument("--cpu", type=int, default=None, help="pin the generator to this CPU")
    args = parser.parse_args(argv)
    try:
        host, port, path = split_url(args.url)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        result = run(
            host, port, path, args.rate, args.duration, args.bodies,
            connections=args.connections, timeout_ms=args.timeout_ms,
            warmup=args.warmup, cpu=args.cpu,
        )  # fmt: skip
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
