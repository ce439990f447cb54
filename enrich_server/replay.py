"""``enrich-server replay CAPTURE --store PATH [--url URL]``: real traffic against a store.

Reads capture files (``capture``), turns the hashed ids the store knows back into real ids
(hashing each id of the store under the capture key: the hashes cannot be reversed, only
matched), and answers every request with the production endpoint built from the
configuration, in process, against ``--store``. With ``--url`` the same bodies also go to a
live server, open loop at a bounded rate (``check``'s sender), and its answers and latencies
are the ones reported.

Reported: match rate per key type (of the requests carrying a key of that type, the share
where one resolved to a live segment in the store), segments per answer, suppressions by
reason, captured holdout users, and latency percentiles; with the figures the capture
recorded beside them, so a new snapshot or release is checked on real traffic before it
ships.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgspec
import uvloop

from enrich_server.app import enrich_endpoint
from enrich_server.capture import HASH_PREFIX, CapturedRequest, hash_id, key_id, map_ids
from enrich_server.check import (
    MAX_DURATION_S,
    MAX_REQUESTS,
    Target,
    parse_target,
    percentile,
    run_check,
)
from enrich_server.config import CaptureConfig, Config
from enrich_server.enrich import EMPTY_BODY, EnrichEndpoint
from enrich_server.keys import EID, IFA, NAMESPACES, UID, request_keys
from enrich_server.openrtb import decode
from enrich_server.store import SegmentStore

DEFAULT_RATE: Final = 200.0
_ENCODER: Final = msgspec.json.Encoder()
_ANSWER: Final = msgspec.json.Decoder(dict[str, list[str]])
_ID_NAMESPACES: Final = (UID.encode() + b":", EID.encode() + b":", IFA.encode() + b":")


@dataclass
class KeyMatches:
    """Requests carrying a key type, and those where one such key hit."""

    carried: int = 0
    hit: int = 0

    @property
    def rate(self) -> float:
        """Share of the requests carrying the key type whose key hit."""
        return self.hit / self.carried if self.carried else 0.0


@dataclass
class ReplayReport:
    """What one replay observed."""

    mode: str
    """``in process`` or the URL replayed against."""
    requests: int = 0
    status: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    """Requests a live server did not answer (connection errors and timeouts)."""
    matches: dict[str, KeyMatches] = field(
        default_factory=lambda: {namespace: KeyMatches() for namespace in NAMESPACES}
    )
    segments: list[int] = field(default_factory=list)
    captured_segments: list[int] = field(default_factory=list)
    suppressed: Counter[str] = field(default_factory=Counter)
    captured_suppressed: Counter[str] = field(default_factory=Counter)
    holdout: int = 0
    """Captured requests whose user was held out when they were captured."""
    latencies: list[float] = field(default_factory=list)
    """Seconds per answer: app work in process, due time to response over HTTP."""
    unhashed: int = 0
    """Distinct hashed ids turned back into real ids (the store knows them)."""
    differing: int | None = None
    """With ``--url``: answers whose segments differ from the in-process answer."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "mode": self.mode,
            "requests": self.requests,
            "status": {str(code): n for code, n in sorted(self.status.items())},
            "errors": self.errors,
            "match_rate": {
                ns: {"carried": m.carried, "hit": m.hit, "rate": round(m.rate, 4)}
                for ns, m in self.matches.items()
            },
            "segments_per_answer": _summary(self.segments),
            "captured_segments_per_answer": _summary(self.captured_segments),
            "suppressed": dict(sorted(self.suppressed.items())),
            "captured_suppressed": dict(sorted(self.captured_suppressed.items())),
            "holdout": self.holdout,
            "latency_ms": {
                name: round(percentile(self.latencies, q) * 1000, 3)
                for name, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999))
            },
            "unhashed_ids": self.unhashed,
            "differing_answers": self.differing,
        }


def _summary(counts: Sequence[int]) -> dict[str, float]:
    if not counts:
        return {"mean": 0.0, "p50": 0, "p99": 0, "non_empty_share": 0.0}
    return {
        "mean": round(statistics.fmean(counts), 3),
        "p50": percentile(counts, 0.5),
        "p99": percentile(counts, 0.99),
        "non_empty_share": round(sum(1 for c in counts if c) / len(counts), 4),
    }


def unhash_table(store: SegmentStore, key: bytes, wanted: set[str]) -> dict[str, str]:
    """Hashed id -> real id, for the ``wanted`` hashes whose id the store knows: the id part
    of each ``uid:``/``eid:``/``ifa:`` key, and each platform id synced by ``/uid``."""
    table: dict[str, str] = {}

    def consider(ident: bytes) -> None:
        hashed = hash_id(key, ident)
        if hashed in wanted:
            table[hashed] = ident.decode("utf-8", "surrogatepass")

    for identity in store.identity_keys():
        if identity.startswith(_ID_NAMESPACES):
            rest = identity.split(b":", 1)[1]
            consider(rest.split(b":", 1)[1] if identity.startswith(b"eid:") else rest)
    for their in store.alias_ids():
        consider(their)
    return table


def hashed_ids(requests: Iterable[CapturedRequest]) -> set[str]:
    """Every hashed id of the captured bodies."""
    found: set[str] = set()

    def collect(ident: str) -> str:
        if ident.startswith(HASH_PREFIX):
            found.add(ident)
        return ident

    for request in requests:
        map_ids(request.body, collect)
    return found


def _check_key(requests: Sequence[CapturedRequest], key: bytes) -> None:
    expected = key_id(key)
    for request in requests:
        if request.key_id != expected:
            raise ValueError(
                f"the capture was made with another key (key id {request.key_id}; this key's"
                f" is {expected}): its hashed ids cannot be matched"
            )


def replay(
    config: Config,
    requests: Sequence[CapturedRequest],
    store_path: Path,
    key: bytes,
    *,
    url: str | None = None,
    rate: float = DEFAULT_RATE,
    headers: Sequence[str] = (),
) -> ReplayReport:
    """Replay ``requests`` against the store at ``store_path`` (and the live server at
    ``url``), with the endpoint ``config`` builds. Raises ``ValueError`` for a wrong key, a
    bad URL or a replay past ``check``'s bounds."""
    if not requests:
        raise ValueError("no captured requests to replay")
    _check_key(requests, key)
    if url is not None:
        target = parse_target(url, headers)
        duration = len(requests) / rate if rate > 0 else float("inf")
        if len(requests) > MAX_REQUESTS or duration > MAX_DURATION_S:
            raise ValueError(
                f"{len(requests):,} requests at {rate:g}/s take {duration:,.0f} s; a replay sends"
                f" at most {MAX_REQUESTS:,} in at most {MAX_DURATION_S:.0f} s (--rate, --limit)"
            )
    report = ReplayReport("in process" if url is None else url)
    store = SegmentStore(store_path)
    try:
        table = unhash_table(store, key, hashed_ids(requests))
        report.unhashed = len(table)
        bodies = [_unhashed_body(request, table) for request in requests]
        endpoint = _endpoint(config, store)
        local = [_answer_in_process(endpoint, body, report) for body in bodies]
        report.suppressed.update({r: n for r, n in endpoint.tally.suppressed.items() if n})
        now = int(time.time())
        for body in bodies:
            _count_matches(store, body, now, report)
    finally:
        store.close()
    for request in requests:
        report.captured_segments.append(request.segments)
        report.holdout += request.holdout
        if request.suppressed is not None:
            report.captured_suppressed[request.suppressed] += 1
    report.requests = len(requests)
    if url is not None:
        _replay_live(target, bodies, rate, local, report)
    return report


def _unhashed_body(request: CapturedRequest, table: dict[str, str]) -> bytes:
    map_ids(request.body, lambda ident: table.get(ident, ident))
    return _ENCODER.encode(request.body)


def _endpoint(config: Config, store: SegmentStore) -> EnrichEndpoint:
    """The production endpoint as ``serve`` builds it (capture off), on ``store``."""
    quiet = dataclasses.replace(config, capture=CaptureConfig())
    endpoint = enrich_endpoint(quiet)
    endpoint.store = store
    return endpoint


def _answer_in_process(endpoint: EnrichEndpoint, body: bytes, report: ReplayReport) -> list[str]:
    clock = time.perf_counter
    start = clock()
    status, _, out, _ = endpoint.respond(body, start, endpoint.answer, EMPTY_BODY)
    report.latencies.append(clock() - start)
    report.status[status] += 1
    segments = _segments(out) if status == 200 else []
    report.segments.append(len(segments))
    return segments


def _segments(answer: bytes) -> list[str]:
    return _ANSWER.decode(answer).get("segment_ids", [])


def _count_matches(store: SegmentStore, body: bytes, now: int, report: ReplayReport) -> None:
    user, context = request_keys(decode(body))
    carried: set[str] = set()
    hit: set[str] = set()
    for key in user + context:
        namespace = key.split(b":", 1)[0].decode()
        carried.add(namespace)
        if namespace not in hit and store.resolve([key], now, 1).segments_json:
            hit.add(namespace)
    for namespace in carried:
        report.matches[namespace].carried += 1
        report.matches[namespace].hit += namespace in hit


def _replay_live(
    target: Target,
    bodies: Sequence[bytes],
    rate: float,
    local: Sequence[list[str]],
    report: ReplayReport,
) -> None:
    answers: dict[int, list[str]] = {}

    def on_answer(index: int, status: int, body: bytes) -> None:
        answers[index] = _segments(body) if status == 200 else []

    result = uvloop.run(
        run_check(target, bodies, rate=rate, duration=len(bodies) / rate, on_answer=on_answer)
    )
    report.status = result.status
    report.errors = result.errors + result.timeouts
    report.latencies = result.latencies
    report.segments = [len(answers[i]) for i in sorted(answers)]
    report.differing = sum(1 for i, segments in answers.items() if segments != local[i])


def format_report(report: ReplayReport, store: Path) -> str:
    """The human-readable report ``replay`` prints."""
    data = report.to_dict()
    status = ", ".join(f"{code} x {n:,}" for code, n in sorted(report.status.items())) or "none"
    matches = "\n".join(
        f"    {ns:<7} {m.rate:7.1%} of {m.carried:,}"
        for ns, m in report.matches.items()
        if m.carried
    )
    seg, captured = data["segments_per_answer"], data["captured_segments_per_answer"]
    latency = data["latency_ms"]

    def reasons(counts: Counter[str]) -> str:
        return ", ".join(f"{r} {n:,}" for r, n in sorted(counts.items())) or "none"

    lines = [
        f"replay of {report.requests:,} captured requests against {store}, {report.mode}",
        f"  answered    {status}" + (f"; {report.errors:,} unanswered" if report.errors else ""),
        f"  ids         {report.unhashed:,} hashed ids known to the store, made real again",
        "  match rate  (requests carrying the key type whose key found a live segment)",
        matches or "    no request carried a key",
        f"  segments    per answer: mean {seg['mean']}, p50 {seg['p50']}, p99 {seg['p99']},"
        f" {seg['non_empty_share']:.1%} non-empty (captured: mean {captured['mean']},"
        f" {captured['non_empty_share']:.1%} non-empty)",
        f"  suppressed  {reasons(report.suppressed)}"
        f" (captured: {reasons(report.captured_suppressed)})",
        f"  holdout     {report.holdout:,} captured requests were held out",
        f"  latency     p50 {latency['p50']} ms, p99 {latency['p99']} ms,"
        f" p99.9 {latency['p99.9']} ms"
        + (" (app work in process)" if report.differing is None else " (open loop, from due time)"),
    ]
    if report.differing is not None:
        lines.append(
            f"  differing   {report.differing:,} answers differ from the in-process answer"
            f" against {store}"
        )
    return "\n".join(lines)
