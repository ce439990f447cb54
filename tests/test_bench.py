"""Smoke tests: each benchmark script runs briefly and prints well-formed results.

The numbers are never asserted here (benchmarks, not timed tests); only that the scripts
keep working and measure what they claim to.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.synth import sample_keys, snapshot_lines
from tests.utils import ROOT


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
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["case"] for row in rows] == [
        "seed_app", "seed_ctv", "seed_web", "synthetic_hit", "miss",
    ]  # fmt: skip
    for row in rows:
        assert row["store_identities"] > 2000
        for part in ("total", "decode", "keys", "lookup"):
            assert 0 < row[f"{part}_us_min"] <= row[f"{part}_us_median"]
        assert (row["segments"] > 0) == (row["case"] != "miss")
