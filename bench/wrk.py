"""Saturated throughput with wrk: POST the benchmark bodies as fast as the server answers.

wrk is closed-loop: each connection sends its next request when the previous answer arrives,
so its requests/s is the server's ceiling at that concurrency, while its latency percentiles
are only indicative (they omit the requests a stalled server kept from being sent; see
``bench.openloop`` for latencies under a fixed offered rate). ``bench/wrk_bodies.lua`` rotates
through the bodies file and prints one ``WRK_JSON {...}`` line, parsed here.

    python -m bench.wrk --url http://127.0.0.1:8080/enrich --bodies /tmp/bodies.txt --duration 10
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

SCRIPT: Final = Path(__file__).resolve().parent / "wrk_bodies.lua"
LOOPBACK_HOSTS: Final = frozenset({"127.0.0.1", "::1", "localhost"})
MARKER: Final = "WRK_JSON "


def check_loopback(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` is ``http://`` to 127.0.0.1, ::1 or localhost."""
    parts = urlsplit(url)
    if parts.scheme != "http" or (parts.hostname or "") not in LOOPBACK_HOSTS:
        raise ValueError(f"refusing {url}: only http:// to 127.0.0.1, ::1 or localhost")


def _whole_seconds(value: float, what: str) -> int:
    # wrk reads durations as whole numbers of a unit ("2s"); round up so a run is never shorter.
    if not value > 0:
        raise ValueError(f"{what} must be positive, got {value}")
    return max(1, math.ceil(value))


def parse_output(output: str) -> dict[str, Any]:
    """The ``WRK_JSON`` object of wrk's output plus ``rps``; ``RuntimeError`` if absent."""
    for line in output.splitlines():
        if line.startswith(MARKER):
            result: dict[str, Any] = json.loads(line[len(MARKER) :])
            seconds = result["duration_us"] / 1e6
            result["rps"] = result["requests"] / seconds if seconds > 0 else 0.0
            return result
    raise RuntimeError(f"wrk printed no {MARKER.strip()} line:\n{output}")


def run_wrk(  # noqa: PLR0917 - the benchmark's callers pass url, bodies, duration positionally
    url: str,
    bodies: Path,
    duration: float,
    connections: int = 64,
    threads: int = 1,
    cpu: int | None = None,
    timeout_s: float = 2.0,
    check_segments: bool = False,
) -> dict[str, Any]:
    """Run wrk against ``url`` for ``duration`` seconds, POSTing the lines of ``bodies``.

    Returns the script's summary (``requests``, ``duration_us``, ``errors_*``, ``p50_us``,
    ``p99_us``, ``p999_us``, ``max_us``, ...) plus ``rps``. ``duration`` and ``timeout_s`` are
    rounded up to whole seconds (wrk's units). ``cpu`` pins wrk with ``taskset -c``.
    ``check_segments`` also counts 200 answers with a non-empty ``segment_ids`` list as
    ``segment_responses`` (a Lua call per response: slower, for checks only).

    Raises ``ValueError`` for a non-loopback URL, ``RuntimeError`` when wrk is missing or
    fails (with its output).
    """
    check_loopback(url)
    if threads < 1 or connections < threads:
        raise ValueError("need threads >= 1 and connections >= threads")
    if not bodies.is_file():
        raise ValueError(f"bodies file not found: {bodies}")
    wrk = shutil.which("wrk")
    if wrk is None:
        raise RuntimeError("wrk not found: install Debian's wrk (`make bench-deps`)")
    seconds = _whole_seconds(duration, "duration")
    timeout = _whole_seconds(timeout_s, "timeout_s")
    command = [
        wrk, "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
        "--timeout", f"{timeout}s", "-s", str(SCRIPT), url,
    ]  # fmt: skip
    if cpu is not None:
        taskset = shutil.which("taskset")
        if taskset is None:
            raise RuntimeError("taskset not found (util-linux); run without cpu=")
        command = [taskset, "-c", str(cpu), *command]
    env = {**os.environ, "WRK_BODIES": str(bodies.resolve())}
    env.pop("WRK_CHECK_SEGMENTS", None)
    if check_segments:
        env["WRK_CHECK_SEGMENTS"] = "1"
    # wrk stops by itself after the duration; the margin only catches a wedged process.
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        env=env,
        timeout=seconds + timeout + 30,
        check=False,
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"wrk exited with {result.returncode}:\n{output}")
    return parse_output(output)


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.wrk``: one wrk run, its summary printed as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.wrk", description=__doc__)
    parser.add_argument("--url", required=True, help="http://127.0.0.1:PORT/PATH (loopback)")
    parser.add_argument("--bodies", type=Path, required=True, help="one JSON body per line")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (whole)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cpu", type=int, default=None, help="pin wrk to this CPU")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (whole)")
    args = parser.parse_args(argv)
    try:
        result = run_wrk(
            args.url, args.bodies, args.duration, connections=args.connections,
            threads=args.threads, cpu=args.cpu, timeout_s=args.timeout,
        )  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
