"""Atheris (libFuzzer, coverage-guided) target for the request path: ``EnrichEndpoint.answer``
on fuzzer input, against a small synthetic store.

Each input must get an answer, or ``msgspec.DecodeError`` for a body that is not JSON, or
``RecursionError`` for one nested deeper than the decoder follows
(``bench.hostile_bodies.answer_failure``); anything else is a failure, counted by kind with
the first few inputs of each kind saved. The run ends after ``--seconds`` (or when libFuzzer
stops it: an input running over 5 s is a timeout); ``OUT/summary.json`` then holds the
inputs tried, the failures and the slowest input, and is printed. The corpus starts from the
OpenRTB corpus (valid and invalid) and the samples; new inputs go to ``OUT/corpus``.

    python -m bench.fuzz_enrich [--seconds 60] [--store DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Final

import atheris  # type: ignore[import-untyped]  # no type information published

with atheris.instrument_imports(include=["enrich_server"]):
    from bench.hostile_bodies import answer_failure, cap_memory
    from bench.synth import cached_store
    from enrich_server.config import SAMPLES_DIR, load_config
    from enrich_server.enrich import EnrichEndpoint
    from enrich_server.guard import LoadGuard
    from enrich_server.metrics import Tally
    from enrich_server.privacy import Privacy
    from enrich_server.store import SegmentStore
    from tests.conftest import CORPUS

CACHE: Final = Path(__file__).resolve().parent / ".cache"
#: Inputs kept per failure kind.
_KEPT: Final = 3
#: Longest input libFuzzer builds: room for 4,301-digit numbers and long strings.
_MAX_LEN: Final = 65536


class Fuzzing:
    """The state of one run: the endpoint, the clock and what went wrong."""

    def __init__(self, endpoint: EnrichEndpoint, seconds: float, out: Path) -> None:
        self.endpoint = endpoint
        self.out = out
        self.started = time.monotonic()
        self.ends = self.started + seconds
        self.inputs = 0
        self.failures: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = {}
        self.slowest_us = 0.0
        self._saved_at = 0.0

    def test_one_input(self, data: bytes) -> None:
        """libFuzzer's callback: one input through the request path."""
        started = time.perf_counter_ns()
        try:
            self.endpoint.answer(data)
        except Exception as exc:  # judged below; only the contract's exceptions are allowed
            error: BaseException | None = exc
        else:
            error = None
        self.slowest_us = max(self.slowest_us, (time.perf_counter_ns() - started) / 1000)
        self.inputs += 1
        failure = answer_failure(data, error)
        if failure is not None:
            self.failures[failure] += 1
            kept = self.examples.setdefault(failure, [])
            if len(kept) < _KEPT:
                path = self.out / f"failure-{len(self.examples)}-{len(kept)}.bin"
                path.write_bytes(data)
                kept.append(str(path))
        now = time.monotonic()
        if now >= self.ends:
            self.save()
            print(json.dumps(self.summary()), flush=True)
            os._exit(0)  # libFuzzer never returns; its own exit skips nothing we need
        if failure is not None or now - self._saved_at > 2.0:
            self.save()  # if libFuzzer stops the run (a hang), the summary is recent
            self._saved_at = now

    def summary(self) -> dict[str, Any]:
        """Inputs tried, failures by kind with example files, the slowest input."""
        return {
            "inputs": self.inputs,
            "seconds": round(time.monotonic() - self.started, 1),
            "failures": dict(self.failures),
            "examples": self.examples,
            "slowest_us": round(self.slowest_us, 1),
        }

    def save(self) -> None:
        """Write ``summary.json`` (replaced atomically)."""
        partial = self.out / "summary.json.tmp"
        partial.write_text(json.dumps(self.summary(), indent=2) + "\n")
        partial.replace(self.out / "summary.json")


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.fuzz_enrich``: fuzz for ``--seconds``, then print the summary."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.fuzz_enrich", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--store", type=Path, help="segment store (default: a synthetic one)")
    parser.add_argument("--out", type=Path, default=CACHE / "fuzz-enrich")
    args = parser.parse_args(argv)
    store_path = args.store or cached_store(2000, CACHE, progress=False)
    cap_memory()
    args.out.mkdir(parents=True, exist_ok=True)
    corpus = args.out / "corpus"
    corpus.mkdir(exist_ok=True)
    endpoint = EnrichEndpoint(load_config().enrich, Privacy(), LoadGuard(0), Tally())
    endpoint.store = SegmentStore(store_path)
    fuzzing = Fuzzing(endpoint, args.seconds, args.out)
    fuzzing.save()
    libfuzzer_args = [
        sys.argv[0], f"-max_total_time={int(args.seconds) + 10}", "-timeout=5",
        f"-max_len={_MAX_LEN}", "-print_final_stats=1", f"-artifact_prefix={args.out}/",
        # no libFuzzer memory limit: the data cap makes an unbounded allocation a MemoryError,
        # a failure counted like any other while the run goes on
        "-rss_limit_mb=0",
        str(corpus), str(CORPUS / "valid"), str(CORPUS / "invalid"), str(SAMPLES_DIR),
    ]  # fmt: skip
    atheris.Setup(libfuzzer_args, fuzzing.test_one_input)
    atheris.Fuzz()
    return 0  # not reached: the run ends in test_one_input or in libFuzzer


if __name__ == "__main__":
    sys.exit(main())
