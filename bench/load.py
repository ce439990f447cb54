"""Load benchmark: enrich-server against the ceiling and the usual alternative, side by side.

Three servers, one uvicorn worker each (uvloop, httptools, no access log, no server header),
pinned to CPU 0 while the load generators run on CPU 1:

* ``ceiling``: a bare ASGI app returning a fixed body (``bench/baselines/bare.py``);
* ``enrich``: ``enrich-server serve`` on a synthetic store (1,000,000 identities);
* ``alternative``: FastAPI + pydantic + redis-py asyncio (``bench/baselines/fastapi_redis.py``)
  against a local ``redis-server`` (also on CPU 0) holding the same data.

Steps, every loop bounded in time:

1. saturated throughput with ``wrk`` (64 connections, bodies rotated from the shared corpus and
   synthetic requests, about half of them hits), servers alternating A B C A B C ... for
   ``rounds`` rounds; medians, spread, and the ratios of the medians;
2. latency at fixed offered rates with the open-loop generator (``bench/openloop.c``: latency
   from each request's due time), one sweep of rates per server;
3. the overload guard: ``enrich`` at 105/110/120/125 % of its own saturated rate, guard at
   2 ms, at 0.5 ms and off: calls not answered 200, share of calls over 5 ms and share shed
   (issue 13's target at 120 %: every call answered 200 and < 1 % over 5 ms).

Writes ``bench/results/load-<profile>.json``, ``.md`` (tables) and ``.png`` (latency
percentiles against offered load, one line per server).

    python -m bench.load [--profile full|quick|smoke]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import openloop, wrk
from bench.baselines.redis_load import load as load_redis
from bench.bodies import write_bodies
from bench.redis_server import redis_server
from bench.synth import cached_snapshot, cached_store
from tests.utils import ROOT, free_port, stop, wait_until_ready

RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / ".cache"
SERVER_CPU = 0
CLIENT_CPU = 1
SERVERS = ("ceiling", "enrich", "alternative")
#: Share of due requests answered after 5 ms or not at all: what Index's breaker counts.
OVER = "over_5ms_or_lost_share"
#: Guard budgets compared past saturation (ms; 0 = off): the default, and a tighter one. The
#: open-loop client keeps one request in flight per connection, so its backlog waits in its
#: own queue, where no server-side deadline sees it: what the server sees of each request's
#: wait is bounded by the in-flight requests, and a 2 ms budget may not be reached.
OVERLOAD_GUARDS_MS = (2.0, 0.5, 0.0)
UVICORN_FLAGS = [
    "--host", "127.0.0.1", "--loop", "uvloop", "--http", "httptools", "--workers", "1",
    "--no-access-log", "--no-server-header", "--no-proxy-headers", "--log-level", "warning",
]  # fmt: skip


@dataclass(frozen=True)
class Profile:
    """How long and how much: ``full`` for the numbers, ``quick`` for a check, ``smoke`` for CI."""

    identities: int
    rounds: int
    wrk_seconds: float
    sweep: tuple[float, ...]
    """Offered rates as fractions of enrich's saturated rate."""
    sweep_seconds: float
    overload: tuple[float, ...]
    overload_seconds: float


PROFILES = {
    "full": Profile(
        1_000_000, 3, 10.0, (0.25, 0.5, 0.75, 0.9, 1.0), 10.0, (1.05, 1.1, 1.2, 1.25), 10.0
    ),
    "quick": Profile(100_000, 3, 3.0, (0.5, 0.9), 3.0, (1.2,), 4.0),
    "smoke": Profile(2_000, 1, 1.0, (0.5,), 1.0, (1.2,), 1.0),
}


def _pinned(cpu: int, command: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *command] if shutil.which("taskset") else command


@contextlib.contextmanager
def running(
    name: str, store: Path, redis_url: str, log: Path, guard_ms: float | None = None
) -> Iterator[str]:
    """Start server ``name`` pinned to the server CPU; yield its /enrich URL when it answers."""
    port = free_port()
    env = {**os.environ, "BASELINE_REDIS_URL": redis_url}
    python = sys.executable
    if name == "enrich":
        command = [
            python,
            "-m",
            "enrich_server",
            "serve",
            "--store",
            str(store),
            "--port",
            str(port),
            "--log-level",
            "info",
        ]
        if guard_ms is not None:
            env["ENRICH_ENRICH_GUARD_LAG_MS"] = str(guard_ms)
    else:
        module = (
            "bench.baselines.bare:app" if name == "ceiling" else "bench.baselines.fastapi_redis:app"
        )
        command = [python, "-m", "uvicorn", module, "--port", str(port), *UVICORN_FLAGS]
    url = f"http://127.0.0.1:{port}/enrich"
    with log.open("ab") as out:
        process = subprocess.Popen(
            _pinned(SERVER_CPU, command), stdout=out, stderr=out, env=env, cwd=ROOT
        )
    try:
        wait_until_ready(url, process, log, 30.0, post_body=b"{}")
        yield url
    finally:
        stop(process)


def _shed_count(log: Path, since: int) -> int:
    """Requests shed by the guard, from enrich-server's shutdown line logged after ``since``."""
    with log.open("rb") as f:
        f.seek(since)
        lines = f.read().decode(errors="replace").splitlines()
    total = 0
    for line in lines:
        if line.startswith("{") and '"worker stopping"' in line:
            total += int(json.loads(line).get("shed", 0))
    return total


def throughput(
    profile: Profile, store: Path, redis_url: str, bodies: Path, log: Path
) -> dict[str, Any]:
    """Saturated requests/s per server, alternating servers each round."""
    runs: dict[str, list[float]] = {name: [] for name in SERVERS}
    for round_number in range(profile.rounds):
        for name in SERVERS:
            # Guard off: shed answers are cheap, and would inflate the throughput measured.
            with running(name, store, redis_url, log, guard_ms=0.0) as url:
                wrk.run_wrk(url, bodies, duration=1.0, connections=64, cpu=CLIENT_CPU)  # warm-up
                result = wrk.run_wrk(
                    url, bodies, duration=profile.wrk_seconds, connections=64, cpu=CLIENT_CPU
                )
            errors = sum(v for k, v in result.items() if k.startswith("errors_"))
            runs[name].append(result["rps"])
            print(
                f"  round {round_number + 1} {name:<12} {result['rps']:>9,.0f} req/s"
                f"  errors {errors}",
                flush=True,
            )
    median = {name: statistics.median(values) for name, values in runs.items()}
    return {
        "runs_rps": runs,
        "median_rps": median,
        "spread_rps": {name: [min(v), max(v)] for name, v in runs.items()},
        "enrich_over_ceiling": median["enrich"] / median["ceiling"],
        "enrich_over_alternative": median["enrich"] / median["alternative"],
    }


def latency_sweep(
    profile: Profile, saturated: dict[str, float], where: tuple[Path, str, Path, Path]
) -> list[dict[str, Any]]:
    """Open-loop latency of every server at fractions of enrich's saturated rate (and of
    the alternative's own).

    ``where`` is (store, Redis URL, bodies file, server log).
    """
    store, redis_url, bodies, log = where
    # The alternative saturates far below enrich's rates: give it its own fractions too,
    # so every server has a curve.
    plan = [(name, f, f * saturated["enrich"]) for f in profile.sweep for name in SERVERS]
    plan += [("alternative", f, f * saturated["alternative"]) for f in profile.sweep]
    points = []
    for name, fraction, rate in plan:
        if rate > 1.3 * saturated[name]:
            # far past this server's own saturation the queue only grows: nothing to learn
            points.append(
                {"server": name, "fraction": fraction, "rate": rate, "skipped": "saturated"}
            )
            continue
        with running(name, store, redis_url, log, guard_ms=0.0) as url:
            result = _openloop(url, rate, profile.sweep_seconds, bodies)
        points.append({"server": name, "fraction": fraction, "rate": rate, **result})
        lat = result["latency_us"]
        print(
            f"  {name:<12} {rate:>8,.0f} req/s  p50 {_ms(lat['p50'])} ms"
            f"  p99 {_ms(lat['p99'])} ms  p99.9 {_ms(lat['p99.9'])} ms"
            f"  max {_ms(lat['max'])} ms  >5ms {result[OVER]:.2%}",
            flush=True,
        )
    return points


def overload(
    profile: Profile, saturated: float, store: Path, bodies: Path, log: Path
) -> list[dict[str, Any]]:
    """enrich-server past its saturated rate, open loop, with each of ``OVERLOAD_GUARDS_MS``."""
    points = []
    for fraction in profile.overload:
        for guard_ms in OVERLOAD_GUARDS_MS:
            since = log.stat().st_size if log.exists() else 0
            with running("enrich", store, "", log, guard_ms=guard_ms) as url:
                result = _openloop(url, fraction * saturated, profile.overload_seconds, bodies)
            shed = _shed_count(log, since)
            # the shutdown count includes the warm-up's requests
            sent = max(result["sent"] + result.get("warmup_sent", 0), 1)
            point = {
                "fraction": fraction,
                "guard_lag_ms": guard_ms,
                "shed": shed,
                "shed_share": shed / sent,
                "not_200": _not_200(result),
                **result,
            }
            points.append(point)
            print(
                f"  {fraction:.0%} guard {_guard(guard_ms):<6}  {_answered(point)}"
                f"  >5ms {result[OVER]:.2%}  "
                f"shed {point['shed_share']:.2%}  p99 {_ms(result['latency_us']['p99'])} ms",
                flush=True,
            )
    return points


def _guard(budget_ms: float) -> str:
    """The guard's setting for a table: its budget, or off."""
    return f"{budget_ms:g} ms" if budget_ms else "off"


def _not_200(result: dict[str, Any]) -> int:
    """Due calls not answered 200: other statuses, failures, timeouts, never answered."""
    return int(result["due"]) - int(result["status"].get("200", 0))


def _answered(point: dict[str, Any]) -> str:
    """How many due calls were answered 200, in words."""
    if not point["not_200"]:
        return "every call answered 200"
    return f"{point['not_200']:,} of {point['due']:,} calls not answered 200"


def _ms(microseconds: float | None) -> str:
    """Milliseconds for a table; openloop reports ``None`` when nothing was answered."""
    return "n/a" if microseconds is None else f"{microseconds / 1000:.2f}"


def _openloop(url: str, rate: float, seconds: float, bodies: Path) -> dict[str, Any]:
    port = int(url.rsplit(":", 1)[1].split("/", 1)[0])
    return openloop.run(
        "127.0.0.1",
        port,
        "/enrich",
        rate,
        seconds,
        bodies,
        connections=128,
        warmup=1.0,
        cpu=CLIENT_CPU,
    )


def markdown(report: dict[str, Any]) -> str:
    """The results as Markdown tables."""
    tp = report["throughput"]
    lines = [
        f"### Load benchmark ({report['profile']}, {report['store_identities']:,} identities,"
        f" {report['date']})",
        "",
        "| server | median req/s | min-max req/s | vs ceiling |",
        "|---|---:|---:|---:|",
    ]
    for name in SERVERS:
        low, high = tp["spread_rps"][name]
        ratio = tp["median_rps"][name] / tp["median_rps"]["ceiling"]
        lines.append(
            f"| {name} | {tp['median_rps'][name]:,.0f} | {low:,.0f}-{high:,.0f} | {ratio:.2f}x |"
        )
    lines += [
        "",
        f"enrich / ceiling = **{tp['enrich_over_ceiling']:.2f}x**, "
        f"enrich / alternative = **{tp['enrich_over_alternative']:.1f}x**"
        f" (medians of {report['rounds']} alternating rounds)",
        "",
        "| server | offered req/s | p50 ms | p99 ms | p99.9 ms | max ms | over 5 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for point in report["latency"]:
        if "skipped" in point:
            lines.append(
                f"| {point['server']} | {point['rate']:,.0f} | past its saturation | | | | |"
            )
            continue
        lat = point["latency_us"]
        lines.append(
            f"| {point['server']} | {point['rate']:,.0f}"
            f" | {_ms(lat['p50'])} | {_ms(lat['p99'])} | {_ms(lat['p99.9'])}"
            f" | {_ms(lat['max'])} | {point[OVER]:.2%} |"
        )
    lines += [
        "",
        "| enrich offered | guard | not 200 | over 5 ms | shed | p99 ms |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for point in report["overload"]:
        lines.append(
            f"| {point['fraction']:.0%} of saturation | {_guard(point['guard_lag_ms'])}"
            f" | {point['not_200']:,} | {point[OVER]:.2%} | {point['shed_share']:.2%}"
            f" | {_ms(point['latency_us']['p99'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Latency percentiles against offered load, one line per server."""
    import matplotlib  # noqa: PLC0415 - the plot is optional output, loaded only here

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), sharey=True)
    for axis, quantile in zip(axes, ("p50", "p99", "p99.9"), strict=True):
        for name in SERVERS:
            points = sorted(
                (p for p in report["latency"] if p["server"] == name and "skipped" not in p),
                key=lambda p: p["rate"],
            )
            if points:
                axis.plot(
                    [p["rate"] for p in points],
                    [(p["latency_us"][quantile] or 0) / 1000 for p in points],
                    marker="o",
                    label=name,
                )
        axis.axhline(5, color="red", linestyle="--", linewidth=1, label="Index budget 5 ms")
        axis.set_title(f"{quantile} latency (open loop)")
        axis.set_xlabel("offered load (req/s)")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("ms")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the load benchmark and write its results."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    started = time.monotonic()
    for tool in ("wrk", "redis-server", "gcc", "taskset"):
        if shutil.which(tool) is None:
            raise SystemExit(
                f"{tool} is missing: run `make bench-deps` (Debian packages wrk, redis-server)"
            )
    openloop.build()
    print(f"preparing a {profile.identities:,}-identity store, bodies and Redis ...", flush=True)
    store = cached_store(profile.identities, args.cache, progress=sys.stderr.isatty())
    bodies = args.cache / f"bodies-{profile.identities}.jsonl"
    write_bodies(bodies, profile.identities)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-load-") as folder, redis_server() as redis_url:
        log = Path(folder) / "servers.log"
        _pin_redis(redis_url)
        load_redis(cached_snapshot(profile.identities, args.cache), redis_url)
        print("throughput (wrk, saturated):", flush=True)
        tp = throughput(profile, store, redis_url, bodies, log)
        print("latency (open loop):", flush=True)
        sweep = latency_sweep(profile, tp["median_rps"], (store, redis_url, bodies, log))
        print("overload guard (open loop):", flush=True)
        guard = overload(profile, tp["median_rps"]["enrich"], store, bodies, log)
    report = {
        "bench": "load",
        "profile": args.profile,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "store_identities": profile.identities,
        "rounds": profile.rounds,
        "bodies": sum(1 for _ in bodies.open()),
        "cpus": {"servers": SERVER_CPU, "load_generators": CLIENT_CPU},
        "throughput": tp,
        "latency": sweep,
        "overload": guard,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    stem = args.out / f"load-{args.profile}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    plot(report, stem.with_suffix(".png"))
    print(markdown(report))
    print(
        json.dumps(
            {
                "bench": "load",
                "profile": args.profile,
                **{k: round(v, 3) for k, v in tp.items() if k.startswith("enrich_over")},
                "elapsed_s": report["elapsed_s"],
            }
        )
    )
    return 0


def _pin_redis(url: str) -> None:
    """Move redis-server onto the server CPU (it is part of the alternative's server side)."""
    port = url.rsplit(":", 1)[1].split("/", 1)[0]
    pids = subprocess.run(
        ["pgrep", "-f", f"redis-server 127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    for pid in pids:
        subprocess.run(["taskset", "-pc", str(SERVER_CPU), pid], capture_output=True, check=False)


if __name__ == "__main__":
    raise SystemExit(main())
