"""Metrics: the tally-and-flush path matches prometheus_client's own, in one worker and many."""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from enrich_server.app import create_app
from enrich_server.config import load_config
from enrich_server.ingest.api import STATUS_TIMEOUT_SECONDS
from enrich_server.ingest.jetstream import Status
from enrich_server.metrics import (
    ENTRY_KINDS,
    LATENCY_BUCKETS,
    Metrics,
    Tally,
    replication_exposition,
)
from tests.conftest import StoreFactory
from tests.utils import run_server

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str | bytes) -> Samples:
    """Every sample of an exposition, keyed by name and sorted labels."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_flushed_histogram_equals_observe() -> None:
    tally = Tally()
    metrics = Metrics(tally)
    reference = Histogram("ref", "reference", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())
    durations = [0.00001, 0.00005, 0.00007, 0.0003, 0.002, 0.0049, 0.0051, 0.3, 2.0]
    for i, seconds in enumerate(durations):
        tally.request(200, seconds)
        reference.observe(seconds)
        if i == 4:
            metrics.flush()  # flushing in several steps adds up the same
    exposed = samples(metrics.exposition())
    for bound in LATENCY_BUCKETS:
        le = "+Inf" if bound == float("inf") else repr(bound)
        ours = exposed[("enrich_request_duration_seconds_bucket", (("le", le),))]
        theirs = reference._buckets
        assert ours == sum(
            v.get() for v, b in zip(theirs, LATENCY_BUCKETS, strict=True) if b <= bound
        )
    assert exposed[("enrich_request_duration_seconds_count", ())] == len(durations)
    assert exposed[("enrich_request_duration_seconds_sum", ())] == pytest.approx(sum(durations))
    assert exposed[("enrich_requests_total", (("status", "200"),))] == len(durations)


def test_app_metrics_count_what_was_sent(make_store: StoreFactory) -> None:
    store = make_store("uid:u\ta,b\ndomain:d.com\tctx\n")
    flags = {"server.store": str(store), "enrich.guard_lag_ms": 0.0}  # no shedding on a busy VM
    with TestClient(create_app(load_config(flags=flags))) as client:
        client.post("/enrich", content=b'{"user":{"id":"u"},"site":{"domain":"d.com"}}')
        client.post("/enrich", content=b'{"user":{"id":"nobody"}}')
        client.post("/enrich", content=b'{"user":{"id":"u"},"regs":{"coppa":1}}')
        client.post("/enrich", content=b"not json")
        client.get("/enrich")
        client.get("/healthz")  # not an enrichment call: not counted
        response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    exposed = samples(response.text)
    assert exposed[("enrich_requests_total", (("status", "200"),))] == 3
    assert exposed[("enrich_requests_total", (("status", "400"),))] == 1
    assert exposed[("enrich_requests_total", (("status", "405"),))] == 1
    assert exposed[("enrich_requests_total", (("status", "413"),))] == 0
    assert exposed[("enrich_request_duration_seconds_count", ())] == 5
    # keys: uid:u + domain (2 hits), uid:nobody (miss); coppa drops the uid key entirely
    assert exposed[("enrich_lookups_total", (("result", "hit"),))] == 2
    assert exposed[("enrich_lookups_total", (("result", "miss"),))] == 1
    assert exposed[("enrich_privacy_suppressions_total", (("reason", "coppa"),))] == 1
    assert exposed[("enrich_segments_per_response_count", ())] == 1
    assert exposed[("enrich_segments_per_response_sum", ())] == 3
    assert exposed[("enrich_shed_total", ())] == 0
    assert exposed[("enrich_store_identities", ())] == 2
    assert exposed[("enrich_store_built_timestamp_seconds", ())] > 1_700_000_000
    assert exposed[("enrich_store_generation", ())] == 1
    assert ("enrich_build_info", (("version", "0.1.0"),)) in exposed
    # a single node has no stream: no replication series at all
    assert not [name for name, _ in exposed if name.startswith("enrich_replication_")]


def _status(**changes: Any) -> dict[str, Any]:
    """An ``IngestClient.status`` answer of a replicated node: the applier's ``Status``."""
    status = Status(
        connected=True, applied=40, last=47, lag_seconds=1.25, caught_up=True,
        applied_by_kind={"mutations": 30, "create": 10}, publish_failures=3,
    )  # fmt: skip
    return {"replicated": True, "ready": True, **dataclasses.asdict(status), **changes}


def test_replication_series_come_from_the_status() -> None:
    exposed = samples(replication_exposition(_status(), max_lag=5.0))
    assert exposed[("enrich_replication_connected", ())] == 1
    assert exposed[("enrich_replication_max_lag_seconds", ())] == 5.0
    assert exposed[("enrich_replication_applied_sequence", ())] == 40
    assert exposed[("enrich_replication_last_sequence", ())] == 47
    assert exposed[("enrich_replication_lag_entries", ())] == 7
    assert exposed[("enrich_replication_lag_seconds", ())] == 1.25
    assert exposed[("enrich_replication_halted", ())] == 0
    assert exposed[("enrich_replication_publish_failures_total", ())] == 3
    by_kind = {
        labels[0][1]: value
        for (name, labels), value in exposed.items()
        if name == "enrich_replication_entries_applied_total"
    }
    # kinds not applied yet are there from 0, so rate() counts their first entry
    kinds = {
        "mutations", "create", "delete", "alias", "dropfile", "compact", "snapshot", "dropobject"
    }  # fmt: skip
    assert set(ENTRY_KINDS) == kinds
    assert by_kind == {"mutations": 30, "create": 10} | dict.fromkeys(
        kinds - {"mutations", "create"}, 0
    )
    text = replication_exposition(_status(), max_lag=5.0).decode()
    types = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert types["enrich_replication_entries_applied"] == "counter"
    assert types["enrich_replication_publish_failures"] == "counter"
    assert types["enrich_replication_lag_seconds"] == "gauge"


def test_replication_series_of_a_halted_or_disconnected_applier() -> None:
    halted = samples(
        replication_exposition(_status(halted="entry 9 arrived after 7", connected=False), 5.0)
    )
    assert halted[("enrich_replication_halted", ())] == 1
    assert halted[("enrich_replication_connected", ())] == 0
    # the stream's last sequence is read once a second: an apply since then passes it
    ahead = samples(replication_exposition(_status(applied=48), 5.0))
    assert ahead[("enrich_replication_lag_entries", ())] == 0
    # no status (ingestion process down): connected 0 and the threshold, no stale numbers
    missing = samples(replication_exposition(None, 2.5))
    assert missing == {
        ("enrich_replication_connected", ()): 0,
        ("enrich_replication_max_lag_seconds", ()): 2.5,
    }


def test_a_replicated_scrape_answers_at_once_when_the_ingestion_process_is_down(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    store = make_store("uid:u\tx\n")
    flags = {"server.store": str(store), "replication.nats": ("nats://127.0.0.1:4222",)}
    config = load_config(flags=flags)
    with TestClient(create_app(config, str(tmp_path / "nobody-listens.sock"))) as client:
        started = time.monotonic()
        response = client.get("/metrics")
        took = time.monotonic() - started
    assert response.status_code == 200
    assert took < STATUS_TIMEOUT_SECONDS
    exposed = samples(response.text)
    assert exposed[("enrich_replication_connected", ())] == 0
    assert ("enrich_replication_applied_sequence", ()) not in exposed
    assert exposed[("enrich_requests_total", (("status", "200"),))] == 0  # the rest as ever


def test_a_replicated_scrape_gives_up_on_a_hung_ingestion_process(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    store = make_store("uid:u\tx\n")
    flags = {"server.store": str(store), "replication.nats": ("nats://127.0.0.1:4222",)}
    path = tmp_path / "hung.sock"
    with (
        socket.socket(socket.AF_UNIX) as hung,  # accepts connections (backlog), never answers
        TestClient(create_app(load_config(flags=flags), str(path))) as client,
    ):
        hung.bind(str(path))
        hung.listen(8)
        started = time.monotonic()
        metrics, ready = client.get("/metrics"), client.get("/readyz")
        took = time.monotonic() - started
    assert STATUS_TIMEOUT_SECONDS * 2 <= took < STATUS_TIMEOUT_SECONDS * 2 + 1.0
    assert metrics.status_code == 200
    assert samples(metrics.text)[("enrich_replication_connected", ())] == 0
    assert ready.status_code == 503
    assert "not reachable" in ready.json()["why"]


def test_metrics_aggregate_across_workers(make_store: StoreFactory) -> None:
    store = make_store("uid:u\tx\n")
    sent = 60
    with run_server(store, "--workers", "2") as server:
        deadline = time.monotonic() + 20
        while server.log().count('"store opened"') < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        for _ in range(sent):  # a new connection each: the kernel spreads them over workers
            assert (
                httpx.post(f"{server.url}/enrich", content=b'{"user":{"id":"u"}}').status_code
                == 200
            )
        time.sleep(1.5)  # every worker flushes its tally within a second
        scrapes = [samples(httpx.get(f"{server.url}/metrics").text) for _ in range(6)]
        server.process.terminate()
        server.process.wait(timeout=15)
        stopping = [
            json.loads(line) for line in server.log().splitlines() if '"worker stopping"' in line
        ]
    # both workers served some of the requests, so the totals below really are aggregated
    assert sorted(event["requests"] > 0 for event in stopping) == [True, True]
    assert sum(event["requests"] for event in stopping) == sent
    for exposed in scrapes:  # whichever worker answers, it reports every worker's counts
        assert exposed[("enrich_requests_total", (("status", "200"),))] == sent
        assert exposed[("enrich_lookups_total", (("result", "hit"),))] == sent
        assert exposed[("enrich_request_duration_seconds_count", ())] == sent
        assert exposed[("enrich_store_identities", ())] == 1
