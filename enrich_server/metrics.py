"""Prometheus metrics, declared once, fed from plain counters the hot path keeps.

A ``prometheus_client`` observation costs 2.5 us (counter) to 5 us (histogram) here, and
``serve --workers N`` needs multiprocess mode, where each one also writes a memory-mapped
file. Four of them per request would cost about 10 % of a worker's throughput. So the hot
path only adds to plain ints in a per-worker ``Tally`` (about 0.1 us each), and ``Metrics``
moves the deltas into the Prometheus metrics once a second and before every scrape.

With several workers, ``serve`` points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory
before they start, and ``/metrics`` aggregates every worker's files.

| metric | type | labels |
|---|---|---|
| ``enrich_requests_total`` | counter | ``status`` (200, 400, 401, 403, 405, 413) |
| ``enrich_auth_rejections_total`` | counter | ``reason`` |
| ``enrich_request_duration_seconds`` | histogram | |
| ``enrich_lookups_total`` | counter | ``result`` (hit, miss) |
| ``enrich_segments_per_response`` | histogram | |
| ``enrich_privacy_suppressions_total`` | counter | ``reason`` |
| ``enrich_shed_total`` | counter | |
| ``enrich_holdout_total`` | counter | |
| ``enrich_store_identities`` | gauge | |
| ``enrich_store_built_timestamp_seconds`` | gauge | |
| ``enrich_store_generation`` | gauge | |
| ``enrich_ready`` | gauge | (1 while the worker's store is open) |
| ``enrich_build_info`` | gauge | ``version`` |
| ``enrich_ingest_mutations_total`` | counter | ``platform`` (configured), ``op`` (add, remove) |
| ``enrich_dmp_requests_total`` | counter | ``endpoint`` (sync, uid, segment), ``status`` |

The DMP side (sync, ingestion) is not the hot path: it counts straight into Prometheus.

A replicated node adds the ``enrich_replication_*`` series of ``ReplicationCollector``: its
applier's numbers, owned by the ingestion process and asked for at scrape time.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator, Mapping
from typing import Any, Final, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from enrich_server import __version__
from enrich_server.auth import REASONS as AUTH_REASONS
from enrich_server.ingest.entries import LogEntry
from enrich_server.privacy import REASONS
from enrich_server.store import SegmentStore

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
#: Resolve Index's 5 ms budget: from 50 us up, and beyond it.
LATENCY_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.1, float("inf"),
)  # fmt: skip
SEGMENT_BUCKETS: Final = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, float("inf"))
STATUSES: Final = (200, 400, 401, 403, 405, 413)
#: Every kind of log entry, tagged as ``entries.kind`` names them: each is exposed from 0, so
#: ``rate()`` counts the first entry of a kind too.
ENTRY_KINDS: Final = tuple(str(cls.__struct_config__.tag) for cls in get_args(LogEntry))


class Tally:
    """What one worker counted since it started: plain numbers, written by the hot path."""

    __slots__ = ("auth_rejected", "fast_lane", "hits", "holdout", "latency", "latency_sum",
                 "misses", "segments", "segments_sum", "shed", "status", "suppressed")  # fmt: skip

    def __init__(self) -> None:
        self.status = dict.fromkeys(STATUSES, 0)
        self.latency = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.segments = [0] * len(SEGMENT_BUCKETS)
        self.segments_sum = 0
        self.hits = 0
        self.misses = 0
        self.suppressed = dict.fromkeys(REASONS, 0)
        self.auth_rejected = dict.fromkeys(AUTH_REASONS, 0)
        self.shed = 0
        self.holdout = 0  # users answered empty to measure lift ([enrich] holdout)
        self.fast_lane = 0  # calls answered inside the HTTP protocol (logged at worker stop)

    def request(self, status: int, seconds: float) -> None:
        """Count one answered request and its handling time."""
        self.status[status] += 1
        self.latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.latency_sum += seconds

    def answer(self, segments: int) -> None:
        """Count the segments of one 200 answer."""
        self.segments[bisect.bisect_left(SEGMENT_BUCKETS, segments)] += 1
        self.segments_sum += segments


class Metrics:
    """The Prometheus side: metric objects, the flush from a ``Tally``, and exposition."""

    def __init__(self, tally: Tally, registry: CollectorRegistry | None = None) -> None:
        self.tally = tally
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self._requests = Counter(
            "enrich_requests", "Enrichment calls answered, by HTTP status.", ["status"],
            registry=reg,
        )  # fmt: skip
        self._request_children = {code: self._requests.labels(str(code)) for code in STATUSES}
        self._latency = Histogram(
            "enrich_request_duration_seconds",
            "Time spent handling an enrichment call in the worker (decode to last byte sent).",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._lookups = Counter(
            "enrich_lookups", "Identity keys looked up, by result.", ["result"], registry=reg
        )
        self._hits = self._lookups.labels("hit")
        self._misses = self._lookups.labels("miss")
        self._segments = Histogram(
            "enrich_segments_per_response",
            "Segment ids in each 200 answer.",
            buckets=SEGMENT_BUCKETS,
            registry=reg,
        )
        self._suppressed = Counter(
            "enrich_privacy_suppressions",
            "Requests whose user-level segments were withheld, by privacy signal.",
            ["reason"],
            registry=reg,
        )
        self._suppressed_children = {r: self._suppressed.labels(r) for r in REASONS}
        self._rejected = Counter(
            "enrich_auth_rejections",
            "Enrichment calls refused by authentication, by reason.",
            ["reason"],
            registry=reg,
        )
        self._rejected_children = {r: self._rejected.labels(r) for r in AUTH_REASONS}
        self._holdout = Counter(
            "enrich_holdout", "Requests answered empty because their user is held out.",
            registry=reg,
        )  # fmt: skip
        self._shed = Counter(
            "enrich_shed", "Requests answered empty at once by the overload guard.", registry=reg
        )
        self.store_identities = Gauge(
            "enrich_store_identities", "Identity keys in the segment store.",
            registry=reg, multiprocess_mode="mostrecent",
        )  # fmt: skip
        self.store_built = Gauge(
            "enrich_store_built_timestamp_seconds",
            "When the serving store's snapshot was built (unix seconds).",
            registry=reg,
            multiprocess_mode="mostrecent",
        )
        self.ready = Gauge(
            "enrich_ready", "1 while this worker has its store open and serves.",
            registry=reg, multiprocess_mode="livemin",
        )  # fmt: skip
        self.store_generation = Gauge(
            "enrich_store_generation", "Writes committed to the serving store so far.",
            registry=reg, multiprocess_mode="mostrecent",
        )  # fmt: skip
        build = Gauge(
            "enrich_build_info", "The running version.", ["version"],
            registry=reg, multiprocess_mode="max",
        )  # fmt: skip
        build.labels(__version__).set(1)
        self._ingested = Counter(
            "enrich_ingest_mutations",
            "Audience mutations applied from DMP pushes and drop files, by platform and op.",
            ["platform", "op"],
            registry=reg,
        )
        self._dmp_requests = Counter(
            "enrich_dmp_requests",
            "DMP API calls (user sync and ingestion) answered, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=reg,
        )
        self._flushed = Tally()

    def ingested(self, platform: str, op: str, count: int) -> None:
        """Count ``count`` applied mutations of ``platform`` (a configured name)."""
        self._ingested.labels(platform, op).inc(count)

    def dmp_request(self, endpoint: str, status: int) -> None:
        """Count one answered DMP API call."""
        self._dmp_requests.labels(endpoint, str(status)).inc()

    def flush(self) -> None:
        """Move what the tally counted since the last flush into the Prometheus metrics."""
        now, then = self.tally, self._flushed
        for code, child in self._request_children.items():
            _add(child, now.status[code] - then.status[code])
            then.status[code] = now.status[code]
        for reason, child in self._suppressed_children.items():
            _add(child, now.suppressed[reason] - then.suppressed[reason])
            then.suppressed[reason] = now.suppressed[reason]
        for reason, child in self._rejected_children.items():
            _add(child, now.auth_rejected[reason] - then.auth_rejected[reason])
            then.auth_rejected[reason] = now.auth_rejected[reason]
        _add(self._hits, now.hits - then.hits)
        _add(self._misses, now.misses - then.misses)
        _add(self._shed, now.shed - then.shed)
        _add(self._holdout, now.holdout - then.holdout)
        then.hits, then.misses, then.shed = now.hits, now.misses, now.shed
        then.holdout = now.holdout
        _flush_histogram(
            self._latency, now.latency, then.latency, now.latency_sum - then.latency_sum
        )
        then.latency_sum = now.latency_sum
        _flush_histogram(
            self._segments, now.segments, then.segments, now.segments_sum - then.segments_sum
        )
        then.segments_sum = now.segments_sum

    def observe_store(self, store: SegmentStore) -> None:
        """Refresh the store gauges (cheap: LMDB keeps the counts)."""
        self.store_identities.set(store.identity_count())
        self.store_built.set(store.built_at())
        self.store_generation.set(store.generation())

    def close(self) -> None:
        """Final flush when the worker stops; its live gauges (``enrich_ready``) leave the
        aggregate, while its counters stay counted (totals never go backwards)."""
        self.ready.set(0)
        self.flush()
        if self.multiprocess:
            mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]  # untyped upstream

    def exposition(self) -> bytes:
        """The Prometheus text format: this worker's registry, or every worker's files."""
        self.flush()
        if self.multiprocess:
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
            return generate_latest(registry)
        return generate_latest(self.registry)


class ReplicationCollector:
    """The ``enrich_replication_*`` series of one scrape of a replicated node.

    ``status`` is the ingestion process's answer to ``IngestClient.status`` (``None``: it did
    not answer). One process owns these numbers for the whole node, so every worker exposes
    the same ones, and nothing is kept between scrapes: they cost the hot path nothing. The
    running totals are counters; they restart from 0 with the ingestion process, a reset
    ``rate()`` handles. Without a status only ``connected`` (0) and ``max_lag`` are exposed:
    stale numbers would look current.

    | metric | type | labels |
    |---|---|---|
    | ``enrich_replication_connected`` | gauge | (0 also when the status is missing) |
    | ``enrich_replication_max_lag_seconds`` | gauge | (``[replication] max_lag``) |
    | ``enrich_replication_applied_sequence`` | gauge | |
    | ``enrich_replication_last_sequence`` | gauge | |
    | ``enrich_replication_lag_entries`` | gauge | |
    | ``enrich_replication_lag_seconds`` | gauge | |
    | ``enrich_replication_halted`` | gauge | |
    | ``enrich_replication_entries_applied_total`` | counter | ``kind`` (``ENTRY_KINDS``) |
    | ``enrich_replication_publish_failures_total`` | counter | |
    """

    def __init__(self, status: Mapping[str, Any] | None, max_lag: float) -> None:
        self._status = status
        self._max_lag = max_lag

    def collect(self) -> Iterator[Metric]:
        """The families (``prometheus_client``'s ``Collector`` protocol)."""
        status = self._status
        yield GaugeMetricFamily(
            "enrich_replication_connected",
            "1 while the replication applier is connected to NATS (0: not, or the ingestion"
            " process did not answer).",
            value=int(status is not None and status["connected"]),
        )
        yield GaugeMetricFamily(
            "enrich_replication_max_lag_seconds",
            "[replication] max_lag: how far behind the stream the node may be and stay ready.",
            value=self._max_lag,
        )
        if status is None:
            return
        applied, last = status["applied"], status["last"]
        yield GaugeMetricFamily(
            "enrich_replication_applied_sequence",
            "Last stream sequence applied to this node's store.",
            value=applied,
        )
        yield GaugeMetricFamily(
            "enrich_replication_last_sequence",
            "The stream's last sequence, as this node last saw it (once a second).",
            value=last,
        )
        yield GaugeMetricFamily(
            "enrich_replication_lag_entries",
            "Entries in the stream not yet applied here.",
            value=max(0, last - applied),  # ``last`` is a second old: applied may pass it
        )
        yield GaugeMetricFamily(
            "enrich_replication_lag_seconds",
            "How long this node has been behind the stream (0 when caught up).",
            value=status["lag_seconds"],
        )
        yield GaugeMetricFamily(
            "enrich_replication_halted",
            "1 when the applier stopped at a gap in the stream (until an operator acts).",
            value=int(bool(status["halted"])),
        )
        by_kind = CounterMetricFamily(
            "enrich_replication_entries_applied",
            "Log entries applied to this node's store since its ingestion process started,"
            " by kind.",
            labels=["kind"],
        )
        counts: Mapping[str, int] = status["applied_by_kind"] or {}
        for kind in sorted({*ENTRY_KINDS, *counts}):
            by_kind.add_metric([kind], counts.get(kind, 0))
        yield by_kind
        yield CounterMetricFamily(
            "enrich_replication_publish_failures",
            "DMP writes this node could not publish (NATS unreachable or no acknowledgement).",
            value=status["publish_failures"],
        )


def replication_exposition(status: Mapping[str, Any] | None, max_lag: float) -> bytes:
    """The text format of ``ReplicationCollector``, to append to ``Metrics.exposition``."""
    return generate_latest(ReplicationCollector(status, max_lag))


def _add(counter: Counter, delta: float) -> None:
    if delta:
        counter.inc(delta)


def _flush_histogram(
    histogram: Histogram, counts: list[int], flushed: list[int], sum_delta: float
) -> None:
    # prometheus_client keeps one value per bucket (non-cumulative) and the sum; adding
    # deltas to them is what ``observe()`` would have done one observation at a time.
    for i, count in enumerate(counts):
        if count != flushed[i]:
            histogram._buckets[i].inc(count - flushed[i])
            flushed[i] = count
    if sum_delta:
        histogram._sum.inc(sum_delta)
