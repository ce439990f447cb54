"""Smoke tests: each benchmark script runs briefly and prints well-formed results.

The numbers are never asserted here (benchmarks, not timed tests); only that the scripts
keep working and measure what they claim to.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from bench import replication
from bench.hostile_bodies import hostile_bodies
from bench.ingest import BATCH_ITEMS
from bench.synth import sample_keys, snapshot_lines
from enrich_server.config import EXAMPLE_STORE
from tests.utils import ROOT, run_server


def _smoke(module: str, tmp_path: Path, *args: str, profile: str = "smoke") -> Path:
    """Run a bench module's smoke (or other short) profile; returns its results' directory."""
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", module, "--profile", profile, "--out", str(out), *args],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_synth_snapshot_is_deterministic_and_loadable(tmp_path: Path) -> None:
    lines = list(snapshot_lines(200))
    assert lines == list(snapshot_lines(200))
    assert {line.split(":", 1)[0] for line in lines} >= {"uid", "ifa", "eid"}
    for line in lines:
        segments = line.rstrip("\n").split("\t")[1]
        assert 1 <= len(segments.split(",")) <= 30
    assert sample_keys(200, 3) == [line.split("\t")[0] for line in lines[:3]]


def test_micro_bench_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.micro", "--identities", "2000", "--runs", "2",
         "--iterations", "50", "--cache", str(tmp_path)],
        capture_output=True, text=True, check=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    *rows, rotating = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["case"] for row in rows] == [
        "seed_app", "seed_ctv", "seed_web", "seed_app_gdpr", "seed_app_gpp", "synthetic_hit",
        "miss",
    ]  # fmt: skip
    assert rotating["case"] == "rotating"
    assert rotating["bodies"] > 700  # the corpus and the synthetic requests
    assert 0.2 < rotating["hit_share"] < 0.9
    assert 0 < rotating["total_us_min"] <= rotating["total_us_median"]
    for row in rows:
        assert row["store_identities"] > 2000
        for part in ("total", "decode", "keys", "lookup", "metrics", "auth", "privacy"):
            assert 0 < row[f"{part}_us_min"] <= row[f"{part}_us_median"]
        assert (row["segments"] > 0) == (row["case"] != "miss")


def test_load_bench_smoke_profile_writes_results(tmp_path: Path) -> None:
    out = _smoke("bench.load", tmp_path, "--cache", str(tmp_path / "cache"))
    report = json.loads((out / "load-smoke.json").read_text())
    throughput = report["throughput"]
    assert set(throughput["median_rps"]) == {"ceiling", "enrich", "alternative"}
    assert all(rps > 0 for rps in throughput["median_rps"].values())
    assert throughput["enrich_over_ceiling"] > 0
    enrich_points = [p for p in report["latency"] if p["server"] == "enrich"]
    assert enrich_points
    assert enrich_points[0]["status"] == {"200": enrich_points[0]["completed"]}
    assert {(p["fraction"], p["guard_lag_ms"]) for p in report["overload"]} == {
        (1.2, 2.0),
        (1.2, 0.5),
        (1.2, 0.0),
    }
    assert "| enrich |" in (out / "load-smoke.md").read_text()
    assert (out / "load-smoke.png").read_bytes().startswith(b"\x89PNG")


def test_locust_scenario_runs_headless(tmp_path: Path) -> None:
    with run_server(EXAMPLE_STORE) as server:
        result = subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"),
             "--headless", "--host", server.url, "--csv", str(tmp_path / "run"),
             "--run-time", "4s", "--only-summary"],
            capture_output=True, text=True, check=False, cwd=ROOT, timeout=120,
            env={**os.environ, "ENRICH_LOCUST_STEP_S": "1"},
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    rows = list(csv.DictReader((tmp_path / "run_stats.csv").read_text().splitlines()))
    enrich = next(row for row in rows if row["Name"] == "/enrich")
    assert int(enrich["Request Count"]) > 50
    assert int(enrich["Failure Count"]) == 0


def test_store_bench_smoke_profile_writes_results(tmp_path: Path) -> None:
    out = _smoke("bench.store", tmp_path, "--cache", str(tmp_path / "cache"))
    report = json.loads((out / "store-smoke.json").read_text())
    assert set(report["sizes"]) == {"2000", "20000"}
    for row in report["sizes"].values():
        assert row["build_identities_per_s"] > 0
        assert row["build_gz_identities_per_s"] > 0
        assert row["bytes_per_membership"] > 0
        assert 0 < row["lookup_p50_us"] <= row["lookup_p99_us"]
        assert row["enrich_rps"] > 0
        assert row["worker_rss_anon_bytes"] > 0
        assert row["worker_rss_file_bytes"] > 0
    assert report["enrich_rps_largest_over_smallest"] > 0
    assert "| 20,000 |" in (out / "store-smoke.md").read_text()


def test_ingest_bench_smoke_profile_writes_results(tmp_path: Path) -> None:
    out = _smoke("bench.ingest", tmp_path)
    report = json.loads((out / "ingest-smoke-fsync.json").read_text())
    median = report["median"]
    assert median["ingest_alone_mps"] > 0
    assert median["ingest_beside_mps"] > 0
    assert median["ingest_failures"] == 0
    assert median["enrich_errors_with_ingest"] == 0
    assert median["p99_ms_without_ingest"] > 0
    assert median["p99_ms_with_ingest"] > 0
    assert "ingest_beside_mps" in (out / "ingest-smoke-fsync.md").read_text()


def test_hostile_bench_smoke_profile_writes_results(tmp_path: Path) -> None:
    out = _smoke("bench.hostile", tmp_path, "--cache", str(tmp_path / "cache"))
    report = json.loads((out / "hostile-smoke.json").read_text())
    names = [body.name for body in hostile_bodies(report["max_body"])]
    inprocess = report["inprocess"]
    assert [row["case"] for row in inprocess["cases"]] == names
    assert [row["case"] for row in report["server_hostile"]["cases"]] == names
    assert inprocess["slowest"]["case"] in names
    assert inprocess["largest_memory"]["case"] in names
    assert inprocess["largest_memory"]["bytes"] > 0
    fuzz = report["server_fuzz"]
    assert fuzz["sent"] == fuzz["planned"] == sum(fuzz["status_counts"].values())
    assert report["atheris"]["inputs"] > 0
    assert set(report["verdict"]) >= {"app_work_under_2ms", "no_5xx", "no_timeouts"}
    assert "hostile bodies" in (out / "hostile-smoke.md").read_text()


def test_replication_bench_quick_profile_measures_every_line(tmp_path: Path) -> None:
    out = _smoke("bench.replication", tmp_path, profile="quick")
    report = json.loads((out / "replication-quick.json").read_text())
    profile = replication.PROFILES["quick"]
    assert len(report["rounds"]) == profile.rounds
    median = report["median"]
    assert set(median) >= set(replication.TARGETS)
    # Every batch due within the run was pushed and acknowledged; every probe was timed on
    # both followers.
    batches = math.ceil(profile.rate * profile.seconds / BATCH_ITEMS)
    assert median["propagation_push_failures"] == median["beside_push_failures"] == 0
    assert median["propagation_missed"] == 0
    assert median["propagation_samples"] == 2 * math.ceil(batches / replication.PROBE_EVERY)
    timeout_ms = replication.PROBE_TIMEOUT_SECONDS * 1000
    assert 0 < median["propagation_p50_ms"] <= median["propagation_p99_ms"]
    assert median["propagation_p99_ms"] <= median["propagation_max_ms"] < timeout_ms
    assert median["propagation_pushed_mps"] > 0
    assert median["beside_pushed_mps"] > 0
    assert median["beside_applied_on_b_mps"] > 0
    assert 0 < median["applier_timed_entries"] <= profile.applier_entries
    assert median["applier_mps"] > 0
    assert median["enrich_errors"] == 0
    assert 0 < median["enrich_rate"] == median["enrich_saturated_rps"] / 2
    for run in ("baseline", "beside"):
        assert 0 < median[f"{run}_p50_ms"] <= median[f"{run}_p99_ms"] <= median[f"{run}_max_ms"]
        assert median[f"{run}_over_5ms"] >= 0
    # The table: one row per measure, a verdict exactly where the issue sets a target.
    rows = {
        cells[0]: cells
        for line in (out / "replication-quick.md").read_text().splitlines()
        if line.startswith("| ") and len(cells := [c.strip() for c in line[1:-1].split("|")]) == 6
    }
    for key, (_, target) in replication.TARGETS.items():
        expected = replication.verdict(key, median[key], report)[1]
        assert rows[key][5] == expected
        assert (expected in {"pass", "FAIL"}) == (target is not None)
    assert rows["propagation_p99_ms"][5] == (
        "pass" if median["propagation_p99_ms"] < 100 else "FAIL"
    )
