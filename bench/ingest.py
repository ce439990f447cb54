"""Ingestion benchmark: DMP micro-batches pushed while Index's traffic is served.

``enrich-server serve --workers N`` (``--workers``, 1 by default) with a DMP platform
configured, on a copy of the synthetic store. As in ``bench.load``, the processes serving
``/enrich`` run on CPU 0 (``--server-cpus``) and the load generators and pushing clients on
the other CPU; the ingestion process (SCHED_IDLE) is left to the scheduler. Each round, every
loop bounded in time:

1. ``/enrich`` saturated rate with ``wrk`` (no ingestion): the reference rate S;
2. ingestion alone: ``--clients`` connections POSTing 1,000-item micro-batches back to
   back (closed loop); acknowledged mutations per second;
3. ``/enrich`` open loop (``bench/openloop.c``) at 50 % of S, without ingestion: p99;
4. the same open loop with the ingestion clients pushing at full speed beside it: p99 of
   ``/enrich``, and mutations per second.

Reports the medians over rounds, steps 3 and 4 side by side. Writes
``bench/results/ingest-<profile>-<durability>.{json,md}``.

    python -m bench.ingest [--profile full|quick|smoke] [--durability fsync|os]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from base64 import b64encode
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import openloop, wrk
from bench.bodies import write_bodies
from bench.synth import cached_store
from tests.utils import ROOT, free_port, stop, wait_until_ready

RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / ".cache"
BATCH_ITEMS = 1000
#: The openloop field counting calls over 5 ms or lost (what Index's breaker counts).
OVER = "over_5ms_or_lost_share"
SEGMENTS = 50
CREDENTIALS = "bench:bench-secret"
CONFIG = f"""
[[platform]]
id = 1
name = "bench"
basic = "{CREDENTIALS}"
sync_hosts = ["sync.bench.example"]
ttl = 2592000
"""


@dataclass(frozen=True)
class Profile:
    """``full`` for the numbers, ``quick`` for a check, ``smoke`` for CI."""

    identities: int
    rounds: int
    seconds: float
    clients: int


PROFILES = {
    "full": Profile(1_000_000, 3, 10.0, 8),
    "quick": Profile(100_000, 2, 4.0, 8),
    "smoke": Profile(2_000, 1, 1.0, 2),
}


@contextlib.contextmanager
def serving(
    store: Path,
    config: Path,
    workers: int,
    log: Path,
    cpus: set[int] | None,
    *,
    port: int | None = None,
    timeout: float = 60.0,
    started: Callable[[int], None] | None = None,
) -> Iterator[int]:
    """``enrich-server serve`` on ``port`` (a free one by default) until the block ends;
    yields the port once ``/readyz`` answers 200 (within ``timeout`` seconds); ``started``
    is called with the server's pid as soon as it runs.

    With ``cpus``, the processes serving ``/enrich`` (the workers, and the main process) are
    pinned to those CPUs once they run; the ingestion process (SCHED_IDLE, background)
    is left free to run wherever a CPU is idle.
    """
    port = port or free_port()
    command = [
        sys.executable, "-m", "enrich_server", "serve", "--store", str(store),
        "--config", str(config), "--port", str(port), "--workers", str(workers),
        "--log-level", "warning",
    ]  # fmt: skip
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=out, cwd=ROOT)
    try:
        if started is not None:
            started(process.pid)
        wait_until_ready(f"http://127.0.0.1:{port}", process, log, timeout)
        if cpus is not None:
            for pid in [process.pid, *_children(process.pid)]:
                if _serving(pid):
                    for thread in os.listdir(f"/proc/{pid}/task"):
                        os.sched_setaffinity(int(thread), cpus)
        yield port
    finally:
        stop(process)


def _serving(pid: int) -> bool:
    """Not the ingestion process (that one is SCHED_IDLE, or niced)."""
    idle = os.sched_getscheduler(pid) == os.SCHED_IDLE
    return not idle and os.getpriority(os.PRIO_PROCESS, pid) == 0


def ingestion_pid(server: int) -> int | None:
    """The ingestion process of the server ``server`` (``None`` until it runs)."""
    for pid in _children(server):
        with contextlib.suppress(OSError):
            if not _serving(pid):
                return pid
    return None


def cpu_seconds(pid: int) -> float:
    """User and system CPU time process ``pid`` used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for thread in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{thread}/children").read_text()
        found += [int(child) for child in text.split()]
    return found


def auth_headers() -> dict[str, str]:
    """The benchmark platform's HTTP Basic header (DMP calls)."""
    return {"Authorization": "Basic " + b64encode(CREDENTIALS.encode()).decode()}


def create_segments(port: int) -> list[int]:
    """Create the benchmark's DMP segments (idempotent) and return their ids."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    ids = []
    for n in range(SEGMENTS):
        connection.request("POST", f"/v1/segment?title=bench{n}", headers=auth_headers())
        response = connection.getresponse()
        body = json.loads(response.read())
        if response.status != 200:
            raise RuntimeError(f"segment creation failed: {response.status} {body}")
        ids.append(body["segment_id"])
    connection.close()
    return ids


def batch_bodies(segments: list[int], count: int, seed: int = 3) -> list[bytes]:
    """``count`` micro-batch bodies of ``BATCH_ITEMS`` items: users drawn from 2 M ids, a
    tenth of the items removals, a fifth with their own TTL."""
    rng = random.Random(seed)
    bodies = []
    for _ in range(count):
        items: list[dict[str, Any]] = []
        for _ in range(BATCH_ITEMS):
            item: dict[str, Any] = {
                "segment": rng.choice(segments),
                "userid": f"dmp-user-{rng.randrange(2_000_000):07d}",
            }
            if rng.random() < 0.1:
                item["op"] = "remove"
            elif rng.random() < 0.2:
                item["ttl"] = 86400
            items.append(item)
        bodies.append(json.dumps(items, separators=(",", ":")).encode())
    return bodies


class Pusher:
    """``clients`` threads POSTing batches back to back until ``stop``; counts what the
    server acknowledged (2xx with ``applied``)."""

    def __init__(self, port: int, bodies: list[bytes], clients: int) -> None:
        self._port = port
        self._bodies = bodies
        self._done = threading.Event()
        self.applied = 0
        self.failures = 0
        self.batches = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._push, args=(n,), daemon=True) for n in range(clients)
        ]

    def run_for(self, seconds: float) -> float:
        """Push for ``seconds``; returns the acknowledged mutations per second."""
        started = time.perf_counter()
        for thread in self._threads:
            thread.start()
        time.sleep(seconds)
        self._done.set()
        for thread in self._threads:
            thread.join(timeout=30)
        return self.applied / (time.perf_counter() - started)

    def _push(self, offset: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self._port, timeout=30)
        headers = {**auth_headers(), "Content-Type": "application/json"}
        n = offset
        while not self._done.is_set():
            body = self._bodies[n % len(self._bodies)]
            n += 1
            connection.request("POST", "/v1/segment", body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            with self._lock:
                self.batches += 1
                if response.status == 200:
                    self.applied += json.loads(answer)["applied"]
                else:
                    self.failures += 1
        connection.close()


def open_loop(port: int, rate: float, seconds: float, bodies: Path) -> dict[str, Any]:
    """The open-loop generator, at real-time priority when allowed: it shares a CPU with the
    pushing clients, and its clock must not wait behind them (it uses little CPU)."""
    command = openloop.command_line(
        openloop.build(), host="127.0.0.1", port=port, path="/enrich", rate=rate,
        duration=seconds, bodies=bodies, connections=64, timeout_ms=2000, warmup=1.0,
        cpu=None,
    )  # fmt: skip
    if os.geteuid() == 0 and shutil.which("chrt"):
        command = ["chrt", "--fifo", "1", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 15, check=True)
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def one_round(
    port: int, bodies: list[bytes], enrich_bodies: Path, profile: Profile
) -> dict[str, Any]:
    """Steps 1-4 against a running server."""
    url = f"http://127.0.0.1:{port}/enrich"
    wrk.run_wrk(url, enrich_bodies, duration=1.0, connections=64)  # warm-up
    saturated = wrk.run_wrk(url, enrich_bodies, duration=profile.seconds, connections=64)["rps"]
    alone = Pusher(port, bodies, profile.clients)
    alone_rate = alone.run_for(profile.seconds)
    rate = 0.5 * saturated
    quiet = open_loop(port, rate, profile.seconds, enrich_bodies)
    beside = Pusher(port, bodies, profile.clients)
    results: dict[str, Any] = {}

    def load() -> None:
        results["busy"] = open_loop(port, rate, profile.seconds, enrich_bodies)

    loader = threading.Thread(target=load)
    loader.start()
    busy_rate = beside.run_for(profile.seconds + 1.0)  # covers the generator's warm-up too
    loader.join()
    busy = results["busy"]
    return {
        "enrich_saturated_rps": saturated,
        "enrich_rate": rate,
        "ingest_alone_mps": alone_rate,
        "ingest_beside_mps": busy_rate,
        "ingest_failures": alone.failures + beside.failures,
        "p99_ms_without_ingest": quiet["latency_us"]["p99"] / 1000,
        "p99_ms_with_ingest": busy["latency_us"]["p99"] / 1000,
        "p999_ms_without_ingest": quiet["latency_us"]["p99.9"] / 1000,
        "p999_ms_with_ingest": busy["latency_us"]["p99.9"] / 1000,
        "over_5ms_without_ingest": quiet[OVER],
        "over_5ms_with_ingest": busy[OVER],
        "enrich_errors_with_ingest": busy.get("errors", 0),
    }


def _runs(report: dict[str, Any], key: str) -> str:
    return ", ".join(f"{r[key]:,.2f}" for r in report["rounds"])


def markdown(report: dict[str, Any]) -> str:
    """The medians as a Markdown table."""
    m = report["median"]
    return "\n".join(
        [
            f"#### Ingestion benchmark ({report['profile']}, {report['identities']:,} identities, "
            f"serving workers {report['workers']}, {report['clients']} pushing clients, "
            f"durability {report['durability']}, ingestion process {report['writer']}, "
            f"{report['date']})",
            "",
            "| measure | median | runs |",
            "|---|---:|---|",
            *(f"| {key} | {m[key]:,.2f} | {_runs(report, key)} |" for key in m),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--workers", type=int, default=1, help="serving workers (1)")
    parser.add_argument(
        "--durability", choices=("fsync", "os"), default="fsync", help="[dmp] durability"
    )
    parser.add_argument("--clients", type=int, help="pushing connections (profile's default)")
    parser.add_argument(
        "--writer-nice",
        type=int,
        help="run the ingestion process at this niceness instead of SCHED_IDLE",
    )
    parser.add_argument(
        "--server-cpus",
        default="0",
        help="CPUs of the processes serving /enrich (comma-separated); the load generators "
        "and pushing clients get the others, the ingestion process any "
        "(default 0; 'all' = no pinning)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.clients:
        profile = dataclasses.replace(profile, clients=args.clients)
    server_cpus = (
        None if args.server_cpus == "all" else {int(c) for c in args.server_cpus.split(",")}
    )
    if server_cpus is not None:
        # This process (the pushing clients) and its children (wrk, openloop) stay off the
        # serving workers' CPUs.
        others = os.sched_getaffinity(0) - server_cpus
        os.sched_setaffinity(0, others or os.sched_getaffinity(0))
    source = cached_store(profile.identities, CACHE)
    enrich_bodies = CACHE / f"bodies-{profile.identities}.jsonl"
    if not enrich_bodies.exists():
        write_bodies(enrich_bodies, profile.identities)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="enrich-bench-ingest-") as folder:
        work = Path(folder)
        config = work / "enrich.toml"
        priority = (
            ""
            if args.writer_nice is None
            else f"writer_idle = false\nwriter_nice = {args.writer_nice}\n"
        )
        config.write_text(f'[dmp]\ndurability = "{args.durability}"\n{priority}{CONFIG}')
        log = work / "server.log"
        for number in range(profile.rounds):
            store = work / f"store-{number}"
            shutil.copytree(source, store, symlinks=True)
            with serving(store, config, args.workers, log, server_cpus) as port:
                bodies = batch_bodies(create_segments(port), 64)
                result = one_round(port, bodies, enrich_bodies, profile)
            shutil.rmtree(store)
            rounds.append(result)
            print(
                f"  round {number + 1}: /enrich saturated {result['enrich_saturated_rps']:,.0f}"
                f" req/s; ingest alone {result['ingest_alone_mps']:,.0f} mut/s, beside"
                f" {result['ingest_beside_mps']:,.0f} mut/s; /enrich p99 at 50 %:"
                f" {result['p99_ms_without_ingest']:.2f} ms without,"
                f" {result['p99_ms_with_ingest']:.2f} ms with ingestion",
                flush=True,
            )
    report = {
        "profile": args.profile,
        "identities": profile.identities,
        "workers": args.workers,
        "clients": profile.clients,
        "server_cpus": args.server_cpus,
        "durability": args.durability,
        "writer": "SCHED_IDLE" if args.writer_nice is None else f"nice {args.writer_nice}",
        "batch_items": BATCH_ITEMS,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rounds": rounds,
        "median": {key: statistics.median(r[key] for r in rounds) for key in rounds[0]},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"ingest-{args.profile}-{args.durability}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (args.out / f"{name}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
