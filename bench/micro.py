"""Micro benchmark: app work per request, in-process, no HTTP.

Measures ``EnrichEndpoint.answer(body)`` (decode + keys + privacy + LMDB lookups + encode),
and its parts, for the seed's sample requests and synthetic ones (hits and misses) against a
synthetic store (default 1,000,000 identities, built once under bench/.cache). Prints one
JSON line per case: microseconds per request, median and minimum of ``--runs`` runs of
``--iterations`` calls. The parts are timed interleaved (total, decode, keys, lookup, total,
...), so a noisy neighbour slows all of them alike rather than skewing one.

    python -m bench.micro [--identities N] [--runs R] [--iterations I]
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.bodies import write_bodies
from bench.synth import cached_store, sample_keys
from enrich_server.auth import EndpointAuth
from enrich_server.config import SAMPLES_DIR, AuthConfig, load_config
from enrich_server.enrich import EMPTY_BODY, EnrichEndpoint
from enrich_server.guard import LoadGuard
from enrich_server.keys import request_keys
from enrich_server.metrics import Tally
from enrich_server.openrtb import decode
from enrich_server.privacy import Privacy
from enrich_server.store import SegmentStore
from tests.tcf_strings import CONSENTED

CACHE = Path(__file__).resolve().parent / ".cache"
#: A GPP string seen in a real bid request: US national section, notices given, no opt-out.
REAL_USNAT_GPP = "DBABLA~BVQqAAAAAAJY.QA"


def _body_for(key: str) -> bytes:
    namespace, _, ident = key.partition(":")
    if namespace == "uid":
        return json.dumps({"user": {"id": ident}, "site": {"domain": "example.com"}}).encode()
    if namespace == "ifa":
        return json.dumps({"device": {"ifa": ident, "lmt": 0}, "app": {"bundle": "x"}}).encode()
    if namespace == "eid":
        source, _, uid = ident.partition(":")
        return json.dumps({"user": {"eids": [{"source": source, "uids": [{"id": uid}]}]}}).encode()
    return json.dumps({"site": {"domain": ident}}).encode()


def cases(identities: int) -> dict[str, bytes]:
    """Request bodies by case name: the seed samples, a synthetic hit and a miss."""
    bodies = {f"seed_{p.stem}": p.read_bytes() for p in sorted(SAMPLES_DIR.glob("*.json"))}
    app = json.loads((SAMPLES_DIR / "app.json").read_bytes())
    app["regs"] = {"gdpr": 1}
    app["user"]["ext"] = {"consent": CONSENTED}
    bodies["seed_app_gdpr"] = json.dumps(app).encode()  # a TCF v2 string to decide
    app["regs"] = {"gpp": REAL_USNAT_GPP, "gpp_sid": [7]}
    bodies["seed_app_gpp"] = json.dumps(app).encode()  # a GPP US national section to decide
    bodies["synthetic_hit"] = _body_for(sample_keys(identities, 3)[1])
    bodies["miss"] = json.dumps({"user": {"id": "not-in-the-store"}}).encode()
    return bodies


AUTH_SCOPE = {
    "headers": [(b"host", b"enrich.example"), (b"content-type", b"application/json"),
                (b"x-api-key", b"bench-token"), (b"content-length", b"1700")],
    "query_string": b"",
    "client": ("203.0.113.9", 40000),
}  # fmt: skip


def _record(tally: Tally) -> None:
    """What the hot path adds to the metrics tally for one answered request."""
    tally.hits += 2
    tally.misses += 1
    tally.answer(9)
    tally.request(200, 0.00012)


def time_per_call(fn: Callable[[], object], iterations: int) -> float:
    """Microseconds per call of ``fn`` over ``iterations`` calls (GC paused)."""
    gc.disable()
    try:
        start = time.perf_counter_ns()
        for _ in range(iterations):
            fn()
        return (time.perf_counter_ns() - start) / iterations / 1000
    finally:
        gc.enable()


def main(argv: list[str] | None = None) -> int:
    """Run the micro benchmark; prints JSON lines."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--identities", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--iterations", type=int, default=2_000)
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args(argv)

    store_path = cached_store(args.identities, args.cache, progress=sys.stderr.isatty())
    endpoint = EnrichEndpoint(load_config().enrich, Privacy(), LoadGuard(0), Tally())
    auth = EndpointAuth(
        AuthConfig(header="X-Api-Key", tokens=("bench-token",), allow_cidrs=("203.0.113.0/24",))
    )
    assert auth.check(AUTH_SCOPE) is None
    store = SegmentStore(store_path)
    endpoint.store = store
    identities = store.identity_count()
    for name, body in cases(args.identities).items():
        answer = endpoint.answer(body)
        if name != "miss" and answer[1] is EMPTY_BODY:
            raise SystemExit(f"case {name} found nothing in the store: the bench is broken")
        request = decode(body)
        user, context = request_keys(request)
        parts: dict[str, Callable[[], object]] = {
            "total": functools.partial(endpoint.answer, body),
            "decode": functools.partial(decode, body),
            "keys": functools.partial(request_keys, request),
            "lookup": functools.partial(store.resolve, user + context, int(time.time()), 500),
            "metrics": functools.partial(_record, endpoint.tally),
            # the call checks an endpoint with a header token and an IP allow-list does,
            # and the privacy decision (consent strings decided once each, then cached)
            "auth": functools.partial(auth.check, AUTH_SCOPE),
            "privacy": functools.partial(endpoint.privacy.suppression_reason, request),
        }
        result: dict[str, object] = {
            "bench": "micro",
            "case": name,
            "store_identities": identities,
            "segments": answer[1].count(b",") + 1 if answer[1] is not EMPTY_BODY else 0,
            "runs": args.runs,
            "iterations": args.iterations,
        }
        samples: dict[str, list[float]] = {part: [] for part in parts}
        for _ in range(args.runs):
            for part, fn in parts.items():
                samples[part].append(time_per_call(fn, args.iterations))
        for part, times in samples.items():
            result[f"{part}_us_median"] = round(statistics.median(times), 3)
            result[f"{part}_us_min"] = round(min(times), 3)
        print(json.dumps(result), flush=True)
    print(json.dumps(_rotating(endpoint, args)), flush=True)
    store.close()
    return 0


def _rotating(endpoint: EnrichEndpoint, args: argparse.Namespace) -> dict[str, object]:
    """App work per request over the load benchmark's rotating body set (the corpus and the
    Index-shaped synthetic requests, about half of them hits): each call a different body, so
    no body is warm in the caches the way one repeated sample is."""
    path = args.cache / f"bodies-{args.identities}.jsonl"
    write_bodies(path, args.identities)
    bodies = [line.encode() for line in path.read_text().splitlines()]
    answer = endpoint.answer

    def one_pass() -> None:
        for body in bodies:
            answer(body)

    passes = max(1, args.iterations // len(bodies))
    times = [time_per_call(one_pass, passes) / len(bodies) for _ in range(args.runs)]
    hits = sum(answer(body)[1] is not EMPTY_BODY for body in bodies)
    return {
        "bench": "micro",
        "case": "rotating",
        "bodies": len(bodies),
        "hit_share": round(hits / len(bodies), 3),
        "runs": args.runs,
        "total_us_median": round(statistics.median(times), 3),
        "total_us_min": round(min(times), 3),
    }


if __name__ == "__main__":
    raise SystemExit(main())
