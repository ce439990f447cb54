"""Store benchmark: bulk build, size, lookups, worker memory and /enrich throughput against
the number of identities (default 10 k, 1 M and 10 M), in one run.

For each size, on a synthetic snapshot (``bench/synth.py``: real id shapes, 1-30 segments per
identity, Zipf-popular segments), cached under ``bench/.cache``:

1. build: ``enrich-server load SNAPSHOT --store NEW`` in a child process, ``builds`` times
   from the plain TSV and ``builds`` times from it gzipped (``.tsv.gz``, level 6, cached);
   identities/s (median) and the peak memory of the build's process tree (sum of PSS,
   sampled every 50 ms: shared pages counted once);
2. bytes per membership: ``data.mdb`` over the memberships of the snapshot;
3. lookups: ``SegmentStore.resolve`` of one key drawn at random from the whole snapshot, each
   call timed; p50/p99 per round, rounds interleaved across sizes, medians of the rounds;
4. serving: ``enrich-server serve`` (one worker pinned to CPU 0, wrk on CPU 1, 64
   connections) on bodies whose identities are drawn from the whole store; requests/s
   alternating sizes each round (medians, and the ratio of the largest to the smallest), and
   the worker's resident memory after the run, split into private (anonymous) and file
   pages (the store's pages it touched).

With ``--baseline REF`` the largest snapshot is also built by the code of git revision
``REF`` (``git archive``, run from its own directory), and that store takes part in the
lookup and serving rounds, interleaved: the same run compares what each build serves.

Writes ``bench/results/store.json`` and ``store.md``; prints one JSON line per measurement.

    python -m bench.store [--profile full|build|smoke] [--baseline REF]
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import wrk
from bench.bodies import synthetic_bodies
from bench.load import CLIENT_CPU, SERVER_CPU, _pinned
from bench.synth import cached_snapshot
from enrich_server.keys import parse_key
from enrich_server.store import DATA_FILE, SegmentStore
from tests.utils import ROOT, free_port, stop, wait_until_ready

RESULTS = ROOT / "bench" / "results"
#: The store built by the ``--baseline`` revision, among the stores measured.
BASELINE = "baseline"
CACHE = ROOT / "bench" / ".cache"


@dataclass(frozen=True)
class Profile:
    """How big and how long."""

    sizes: tuple[int, ...]
    builds: int
    lookups: int
    rounds: int
    wrk_seconds: float
    body_keys: int


PROFILES = {
    "full": Profile((10_000, 1_000_000, 10_000_000), 3, 200_000, 5, 5.0, 20_000),
    #: for working on the build: the sizes that matter, once each, short rounds
    "build": Profile((1_000_000, 10_000_000), 1, 50_000, 2, 3.0, 20_000),
    "smoke": Profile((2_000, 20_000), 1, 2_000, 1, 1.0, 200),
}


def _emit(row: dict[str, Any]) -> None:
    print(json.dumps({"bench": "store", **row}), flush=True)


def _memberships(snapshot: Path) -> int:
    """Memberships of a synthetic snapshot: a segment per comma plus one per line (synthetic
    keys hold no comma), counted at C speed; cached beside the snapshot."""
    counted = snapshot.with_suffix(".memberships")
    if counted.exists():
        return int(counted.read_text())
    total = 0
    with snapshot.open("rb") as source:
        while block := source.read(1 << 24):
            total += block.count(b",") + block.count(b"\n")
    counted.write_text(str(total))
    return total


def _tree(pid: int) -> list[int]:
    pids = [pid]
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for text in child.read_text().split():
                pids += _tree(int(text))
    return pids


def _field(path: str, name: str) -> int:
    """A ``kB`` field of a /proc status-like file, in bytes (0 when gone)."""
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _tree_pss(pid: int) -> int:
    return sum(_field(f"/proc/{p}/smaps_rollup", "Pss") for p in _tree(pid))


def gzipped(snapshot: Path) -> Path:
    """``snapshot`` gzipped at the default level, written once beside it and kept."""
    packed = snapshot.with_name(snapshot.name + ".gz")
    if not packed.exists():
        partial = packed.with_suffix(".partial")
        with snapshot.open("rb") as source, gzip.open(partial, "wb", compresslevel=6) as out:
            shutil.copyfileobj(source, out, 1 << 24)
        partial.rename(packed)
    return packed


def baseline_code(ref: str, cache: Path) -> Path:
    """The package as of git revision ``ref``, extracted under ``cache`` (once)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout.strip()  # fmt: skip
    where = cache / f"code-{commit[:12]}"
    if not (where / "enrich_server").is_dir():
        where.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", commit, "enrich_server"], capture_output=True, check=True, cwd=ROOT
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def build(snapshot: Path, store: Path, log: Path, code: Path = ROOT) -> dict[str, float]:
    """One bulk build in a child process (of the package in ``code``): its wall time, the
    time the loader reports (without the interpreter's start-up) and the peak PSS of its
    process tree."""
    shutil.rmtree(store, ignore_errors=True)
    command = [sys.executable, "-m", "enrich_server", "load", str(snapshot), "--store", str(store)]
    started = time.monotonic()
    with log.open("w") as err:
        process = subprocess.Popen(
            [*command, "--quiet"], stdout=subprocess.DEVNULL, stderr=err, cwd=code
        )
        peak = 0
        while process.poll() is None:
            peak = max(peak, _tree_pss(process.pid))
            time.sleep(0.05)
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with {process.returncode}:\n{log.read_text()}"
        )
    loaded = next(
        json.loads(line) for line in log.read_text().splitlines() if '"snapshot loaded"' in line
    )
    return {"seconds": seconds, "load_seconds": loaded["seconds"], "peak_pss_bytes": peak}


def random_keys(snapshot: Path, count: int, seed: int = 3) -> list[bytes]:
    """``count`` keys of lines drawn at random offsets through the whole snapshot."""
    rng = random.Random(seed)
    size = snapshot.stat().st_size
    keys: list[bytes] = []
    with snapshot.open("rb") as source:
        while len(keys) < count:
            source.seek(rng.randrange(size))
            source.readline()
            line = source.readline()
            if line.strip() and not line.startswith(b"#"):
                keys.append(parse_key(line.split(b"\t", 1)[0].decode()))
    return keys


def lookup_round(store: SegmentStore, keys: list[bytes]) -> dict[str, float]:
    """Time ``resolve`` of each key alone; p50 and p99 in microseconds."""
    now = int(time.time())
    timings: list[int] = []
    clock = time.perf_counter_ns
    for key in keys:
        started = clock()
        resolved = store.resolve([key], now, 500)
        timings.append(clock() - started)
        if not resolved.hits:
            raise RuntimeError(f"{key!r} is not in the store")
    timings.sort()
    return {
        "p50_us": timings[len(timings) // 2] / 1000,
        "p99_us": timings[len(timings) * 99 // 100] / 1000,
    }


@contextlib.contextmanager
def serving(store: Path, log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``enrich-server serve`` on ``store`` pinned to the server CPU, guard off."""
    port = free_port()
    command = [
        sys.executable, "-m", "enrich_server", "serve", "--store", str(store),
        "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}/enrich"
    env = {**os.environ, "ENRICH_ENRICH_GUARD_LAG_MS": "0"}
    with log.open("ab") as out:
        process = subprocess.Popen(
            _pinned(SERVER_CPU, command), stdout=out, stderr=out, env=env, cwd=ROOT
        )
    try:
        wait_until_ready(url, process, log, 60.0, post_body=b"{}")
        yield url, process
    finally:
        stop(process)


def serve_round(store: Path, bodies: Path, seconds: float, log: Path) -> dict[str, float]:
    """Saturated requests/s on ``store``, and the worker's memory after the run."""
    with serving(store, log) as (url, process):
        wrk.run_wrk(url, bodies, duration=1.0, connections=64, cpu=CLIENT_CPU)  # warm-up
        result = wrk.run_wrk(url, bodies, duration=seconds, connections=64, cpu=CLIENT_CPU)
        pids = _tree(process.pid)
        anon = sum(_field(f"/proc/{p}/status", "RssAnon") for p in pids)
        file = sum(_field(f"/proc/{p}/status", "RssFile") for p in pids)
    errors = sum(v for k, v in result.items() if k.startswith("errors_"))
    if errors:
        raise RuntimeError(f"wrk saw {errors} errors on {store}")
    return {"rps": result["rps"], "rss_anon_bytes": anon, "rss_file_bytes": file}


def _median(rows: list[dict[str, float]], name: str) -> float:
    return statistics.median(row[name] for row in rows)


def run(profile: Profile, cache: Path, baseline: str | None = None) -> dict[str, Any]:
    """Every measurement of ``profile`` (and of the ``baseline`` revision's build of the
    largest snapshot); returns the report."""
    sizes: dict[int, dict[str, Any]] = {}
    stores: dict[int | str, Path] = {}
    log = cache / "bench-store-build.log"
    for identities in profile.sizes:
        snapshot = cached_snapshot(identities, cache)
        memberships = _memberships(snapshot)
        packed = gzipped(snapshot)
        stores[identities] = store = cache / f"bulk-store-{identities}"
        builds, gz_builds = [], []
        for _ in range(profile.builds):
            gz_builds.append(build(packed, store, log))
            _emit({"case": "build_gz", "identities": identities, **gz_builds[-1]})
            builds.append(build(snapshot, store, log))
            _emit({"case": "build", "identities": identities, **builds[-1]})
        lines = identities + sum(1 for _ in (ROOT / "segments.example.tsv").open())
        sizes[identities] = {
            "snapshot_bytes": snapshot.stat().st_size,
            "memberships": memberships,
            "build_seconds": [b["seconds"] for b in builds],
            "build_load_seconds": [b["load_seconds"] for b in builds],
            "build_identities_per_s": lines / _median(builds, "load_seconds"),
            "build_identities_per_s_wall": lines / _median(builds, "seconds"),
            "build_peak_pss_bytes": max(b["peak_pss_bytes"] for b in builds),
            "build_gz_load_seconds": [b["load_seconds"] for b in gz_builds],
            "build_gz_identities_per_s": lines / _median(gz_builds, "load_seconds"),
            "build_gz_peak_pss_bytes": max(b["peak_pss_bytes"] for b in gz_builds),
            "store_bytes": (store / DATA_FILE).stat().st_size,
            "bytes_per_membership": (store / DATA_FILE).stat().st_size / memberships,
        }
    largest = max(profile.sizes)
    cases: list[int | str] = [*profile.sizes]
    if baseline is not None:
        code = baseline_code(baseline, cache)
        stores[BASELINE] = cache / f"baseline-store-{largest}"
        built = build(cache / f"snapshot-{largest}.tsv", stores[BASELINE], log, code)
        _emit({"case": "build", "identities": largest, "code": baseline, **built})
        cases.append(BASELINE)
    size_of = {case: case if isinstance(case, int) else largest for case in cases}
    lookups: dict[int | str, list[dict[str, float]]] = {c: [] for c in cases}
    keys = {n: random_keys(cache / f"snapshot-{n}.tsv", profile.lookups) for n in profile.sizes}
    readers = {c: SegmentStore(stores[c]) for c in cases}
    try:
        for _ in range(profile.rounds):
            for c in cases:
                lookups[c].append(lookup_round(readers[c], keys[size_of[c]]))
                _emit({"case": "lookup", "identities": size_of[c], "store": c, **lookups[c][-1]})
    finally:
        for reader in readers.values():
            reader.close()
    serves: dict[int | str, list[dict[str, float]]] = {c: [] for c in cases}
    log = cache / "bench-store-serve.log"
    for n in profile.sizes:
        rng = random.Random(5)
        body_keys = [key.decode() for key in keys[n][: profile.body_keys]]
        bodies = synthetic_bodies(body_keys, len(body_keys), rng)
        (cache / f"store-bodies-{n}.jsonl").write_text("\n".join(bodies) + "\n")
    for _ in range(profile.rounds):
        for c in cases:
            bodies_file = cache / f"store-bodies-{size_of[c]}.jsonl"
            serves[c].append(serve_round(stores[c], bodies_file, profile.wrk_seconds, log))
            _emit({"case": "serve", "identities": size_of[c], "store": c, **serves[c][-1]})
    compared: dict[str, Any] = {}
    if baseline is not None:
        compared = {
            "baseline": {
                "ref": baseline,
                "identities": largest,
                "lookup_p50_us": _median(lookups[BASELINE], "p50_us"),
                "lookup_p99_us": _median(lookups[BASELINE], "p99_us"),
                "enrich_rps": _median(serves[BASELINE], "rps"),
                "enrich_rps_runs": [row["rps"] for row in serves[BASELINE]],
                "lookup_p99_over_baseline": (
                    _median(lookups[largest], "p99_us") / _median(lookups[BASELINE], "p99_us")
                ),
                "enrich_rps_over_baseline": (
                    _median(serves[largest], "rps") / _median(serves[BASELINE], "rps")
                ),
            }
        }
    for n in profile.sizes:
        sizes[n].update(
            lookup_p50_us=_median(lookups[n], "p50_us"),
            lookup_p99_us=_median(lookups[n], "p99_us"),
            enrich_rps=_median(serves[n], "rps"),
            enrich_rps_runs=[row["rps"] for row in serves[n]],
            worker_rss_anon_bytes=_median(serves[n], "rss_anon_bytes"),
            worker_rss_file_bytes=_median(serves[n], "rss_file_bytes"),
        )
    smallest, biggest = sizes[min(sizes)], sizes[max(sizes)]
    return {
        "profile": profile.__dict__,
        "cpus": os.cpu_count(),
        "sizes": {str(n): row for n, row in sizes.items()},
        "enrich_rps_largest_over_smallest": biggest["enrich_rps"] / smallest["enrich_rps"],
        "lookup_p99_largest_over_previous": (
            biggest["lookup_p99_us"] / sizes[sorted(sizes)[-2]]["lookup_p99_us"]
        ),
        **compared,
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    mib = 1 << 20
    lines = [
        "| identities | build (identities/s) | build .gz (identities/s) | build peak PSS "
        "| store | bytes/membership "
        "| lookup p50 | lookup p99 | /enrich req/s | worker RSS private + store pages |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, row in report["sizes"].items():
        peak = max(row["build_peak_pss_bytes"], row["build_gz_peak_pss_bytes"])
        lines.append(
            f"| {int(n):,} | {row['build_identities_per_s']:,.0f} "
            f"| {row['build_gz_identities_per_s']:,.0f} "
            f"| {peak / mib:,.0f} MiB | {row['store_bytes'] / mib:,.1f} MiB "
            f"| {row['bytes_per_membership']:.2f} | {row['lookup_p50_us']:.1f} µs "
            f"| {row['lookup_p99_us']:.1f} µs | {row['enrich_rps']:,.0f} "
            f"| {row['worker_rss_anon_bytes'] / mib:,.0f} + "
            f"{row['worker_rss_file_bytes'] / mib:,.0f} MiB |"
        )
    lines.append("")
    lines.append(
        f"/enrich throughput, largest store over smallest: "
        f"{report['enrich_rps_largest_over_smallest']:.2f}; lookup p99, largest over the next: "
        f"{report['lookup_p99_largest_over_previous']:.2f}"
    )
    if "baseline" in report:
        base = report["baseline"]
        lines.append("")
        lines.append(
            f"Same run, the {base['identities']:,}-identity store built by {base['ref']}: "
            f"lookup p50 {base['lookup_p50_us']:.1f} µs, p99 {base['lookup_p99_us']:.1f} µs, "
            f"/enrich {base['enrich_rps']:,.0f} req/s; this build over it: lookup p99 "
            f"{base['lookup_p99_over_baseline']:.2f}, "
            f"/enrich {base['enrich_rps_over_baseline']:.2f}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.store``: run a profile, write the results."""
    parser = argparse.ArgumentParser(prog="python -m bench.store", description=__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--baseline", metavar="REF", help="also serve REF's build of the largest")
    args = parser.parse_args(argv)
    free = shutil.disk_usage(args.cache.parent if not args.cache.exists() else args.cache).free
    need = sum(n * 250 for n in PROFILES[args.profile].sizes)  # snapshots + store, generously
    if free < need:
        print(f"needs about {need / 1e9:.1f} GB free beside {args.cache}", file=sys.stderr)
        return 1
    report = run(PROFILES[args.profile], args.cache, args.baseline)
    args.out.mkdir(parents=True, exist_ok=True)
    name = "store" if args.profile == "full" else f"store-{args.profile}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
