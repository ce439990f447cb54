"""Locust scenario: Index Exchange traffic against ``POST /enrich``.

Realistic mix, headless, CSV output (loopback only)::

    locust -f bench/locustfile.py --headless --host http://127.0.0.1:8080 \\
        --csv bench/results/locust --run-time 30s

``IndexRamp`` (a ``LoadTestShape``) ramps users up in steps so the CSV shows where latency
bends. The DMP ingestion calls join the mix once the DMP API exists. Bodies come from
``ENRICH_LOCUST_BODIES`` (one JSON body a line; ``python -m bench.load`` writes them under
bench/.cache) or, by default, the seed's sample requests.

Locust is closed-loop (each user waits for its answer before the next request) and runs in
Python, so it measures what a population of clients experiences, not the server's ceiling:
the headline numbers come from wrk and the open-loop generator (see README).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from locust import FastHttpUser, LoadTestShape, constant_throughput, task

from enrich_server.check import read_bodies
from enrich_server.config import SAMPLES_DIR

_BODIES = [
    b.decode() for b in read_bodies([Path(os.environ.get("ENRICH_LOCUST_BODIES", SAMPLES_DIR))])
]
_NEXT = itertools.cycle(range(len(_BODIES)))
_HEADERS = {"Content-Type": "application/json"}


class IndexExchange(FastHttpUser):
    """One Index connection: an enrichment call per impression, 100 per second at most."""

    wait_time = constant_throughput(100)

    @task
    def enrich(self) -> None:
        """POST one bid-request fragment; anything but a 200 JSON answer is a failure."""
        with self.client.post(
            "/enrich", data=_BODIES[next(_NEXT)], headers=_HEADERS, catch_response=True
        ) as response:
            if response.status_code != 200 or not (response.text or "").startswith(
                '{"segment_ids":'
            ):
                response.failure(f"unexpected answer {response.status_code}")


class IndexRamp(LoadTestShape):
    """Steps of 5 users every ``ENRICH_LOCUST_STEP_S`` seconds (default 5), up to 40 users."""

    step_seconds = float(os.environ.get("ENRICH_LOCUST_STEP_S", "5"))
    step_users = 5
    max_users = 40

    def tick(self) -> tuple[int, float] | None:
        """Users and spawn rate for the current moment; ``None`` ends the run."""
        elapsed: float = self.get_run_time()  # type: ignore[no-untyped-call]
        step = int(elapsed // self.step_seconds) + 1
        users = step * self.step_users
        if users > self.max_users:
            return None
        return users, float(self.step_users)
