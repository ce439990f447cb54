"""``enrich-server check URL``: would Index's circuit breaker trip on this endpoint?

Sends a bounded, open-loop stream of real request bodies at a fixed rate and reports what
Index would see. Open loop: request ``i`` is due at ``t0 + i / rate`` whatever happened to
the ones before, and its latency is measured from that due time, so a slow server cannot
hide its backlog by slowing the client down (no coordinated omission).

Index throttles a partner on any 4xx/5xx, on timeouts, or when more than 5 % of calls take
over 5 ms (seed 003, "Circuit breaker logic").

A shed answer (the overload guard's empty ``200 no-cache``) passes the breaker but carries no
segments, so the check also reports how many answers were shed: the server's
``enrich_shed_total`` read from its ``/metrics`` before and after the run. Reading the metrics
costs the hot path nothing, where marking each shed answer with a header would cost bytes on
every one of them.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from enrich_server.metrics import METRICS_FLUSH_SECONDS

BREAKER_LATENCY_S: Final = 0.005
BREAKER_SHARE: Final = 0.05
#: Upper bounds that keep a check a check, not a load test.
MAX_REQUESTS: Final = 1_000_000
MAX_DURATION_S: Final = 600.0
#: The counter of answers the server's overload guard shed, as ``/metrics`` exposes it.
SHED_SERIES: Final = b"enrich_shed_total"


def percentile(values: Sequence[float], q: float) -> float:
    """The value at quantile ``q`` in [0, 1] of ``values`` (nearest rank; 0 when empty)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


#: Called with each answer: the index of its body, its status and its body.
AnswerHook = Callable[[int, int, bytes], None]


@dataclass
class CheckResult:
    """What one check observed."""

    target_rate: float
    duration: float
    sent: int = 0
    errors: int = 0
    timeouts: int = 0
    status: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    """Seconds from each answered request's due time to its complete response."""
    late_sends: int = 0
    """Requests the client itself sent over 1 ms after their due time (client too slow)."""
    shed: int | None = None
    """Answers the server's guard shed while the check ran (``enrich_shed_total`` before and
    after; other callers' too), ``None`` when the server exposes no such metric."""

    @property
    def completed(self) -> int:
        """Requests answered with a complete HTTP response."""
        return len(self.latencies)

    def percentile(self, q: float) -> float:
        """Latency (seconds) at quantile ``q`` in [0, 1] of answered requests."""
        return percentile(self.latencies, q)

    @property
    def over_budget_share(self) -> float:
        """Share of calls (answered or not) over 5 ms; failures count as over."""
        calls = self.completed + self.errors + self.timeouts
        if not calls:
            return 0.0
        slow = sum(1 for latency in self.latencies if latency > BREAKER_LATENCY_S)
        return (slow + self.errors + self.timeouts) / calls

    @property
    def shed_share(self) -> float | None:
        """Share of answered calls the server shed (``None`` when unknown)."""
        if self.shed is None:
            return None
        return self.shed / self.completed if self.completed else 0.0

    def trips_breaker(self) -> list[str]:
        """Why Index's breaker would trip (empty when it would not)."""
        why = []
        bad = {code: n for code, n in self.status.items() if code >= 400}
        if bad:
            why.append(f"{sum(bad.values())} responses with 4xx/5xx status {sorted(bad)}")
        if self.errors or self.timeouts:
            why.append(f"{self.errors} connection errors and {self.timeouts} timeouts")
        if self.over_budget_share > BREAKER_SHARE:
            why.append(f"{self.over_budget_share:.1%} of calls over 5 ms (limit 5%)")
        return why

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready summary."""
        return {
            "target_rate": self.target_rate,
            "duration_s": self.duration,
            "sent": self.sent,
            "completed": self.completed,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "status": {str(code): n for code, n in sorted(self.status.items())},
            "latency_ms": {
                name: round(self.percentile(q) * 1000, 3)
                for name, q in (("p50", 0.5), ("p99", 0.99), ("p99.9", 0.999), ("max", 1.0))
            },
            "over_5ms_share": round(self.over_budget_share, 5),
            "late_sends": self.late_sends,
            "shed": self.shed,
            "shed_share": None if self.shed_share is None else round(self.shed_share, 5),
            "breaker_trips": self.trips_breaker(),
        }


@dataclass(frozen=True)
class Target:
    """Where and how to send."""

    host: str
    port: int
    path: str
    tls: bool
    headers: bytes


def parse_target(url: str, headers: Sequence[str]) -> Target:
    """Validate ``url`` (http or https) and ``Name: value`` headers; raises ``ValueError``."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    extra = b""
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"header {header!r} is not 'Name: value'")
        extra += f"{name.strip()}: {value.strip()}\r\n".encode()
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host_header = parts.netloc.rsplit("@", 1)[-1]
    extra = f"Host: {host_header}\r\n".encode() + extra
    return Target(parts.hostname, port, path, parts.scheme == "https", extra)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """Read one response; returns (status, connection kept alive, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    keep_alive = True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            keep_alive = False
        elif name == b"transfer-encoding":
            raise ValueError("chunked responses are not supported by check")
    body = await reader.readexactly(length) if length else b""
    return status, keep_alive, body


class _Checker:
    """One check run: a scheduler feeding due times to a pool of connection workers."""

    def __init__(
        self,
        target: Target,
        bodies: Sequence[bytes],
        timeout: float,
        on_answer: AnswerHook | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        self.on_answer = on_answer
        self.requests = [
            b"POST %s HTTP/1.1\r\n%sContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (target.path.encode(), target.headers, len(body), body)
            for body in bodies
        ]
        self.context = ssl.create_default_context() if target.tls else None
        self.queue: asyncio.Queue[float] = asyncio.Queue()
        self.counter = itertools.count()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection(self.target.host, self.target.port, ssl=self.context),
            self.timeout,
        )

    async def worker(self, result: CheckResult) -> None:
        """Send each due request on this worker's connection; reconnect after failures."""
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                conn = await self._send_one(result, conn)
        finally:  # cancelled when the run ends
            if conn is not None:
                conn[1].close()

    async def _send_one(
        self, result: CheckResult, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Send the next due request; returns the connection to reuse (None after a failure)."""
        due = await self.queue.get()
        try:
            if conn is None:
                conn = await self._connect()
            reader, writer = conn
            index = next(self.counter) % len(self.requests)
            writer.write(self.requests[index])
            status, keep_alive, body = await asyncio.wait_for(_read_response(reader), self.timeout)
            result.latencies.append(time.monotonic() - due)
            result.status[status] += 1
            if self.on_answer is not None:
                self.on_answer(index, status, body)
            if keep_alive:
                return conn
        except (TimeoutError, OSError, ValueError, IndexError, asyncio.IncompleteReadError) as e:
            if isinstance(e, TimeoutError):
                result.timeouts += 1
            else:
                result.errors += 1
        finally:
            self.queue.task_done()
        if conn is not None:
            conn[1].close()
        return None


async def read_shed_total(target: Target, timeout: float) -> int | None:
    """``enrich_shed_total`` from ``/metrics`` on ``target``'s server (``None`` when it
    cannot be read: not enrich-server, or not reachable)."""
    request = b"GET /metrics HTTP/1.1\r\n%sConnection: close\r\n\r\n" % target.headers
    context = ssl.create_default_context() if target.tls else None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(target.host, target.port, ssl=context), timeout
        )
    except (TimeoutError, OSError):
        return None
    try:
        writer.write(request)
        status, _, body = await asyncio.wait_for(_read_response(reader), timeout)
    except (TimeoutError, OSError, ValueError, IndexError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()
    if status != 200:
        return None
    for line in body.splitlines():
        name, _, value = line.partition(b" ")
        if name == SHED_SERIES:
            return int(float(value))
    return None


async def run_check(
    target: Target,
    bodies: Sequence[bytes],
    *,
    rate: float,
    duration: float,
    connections: int = 32,
    timeout: float = 1.0,
    on_answer: AnswerHook | None = None,
    count_shed: bool = False,
) -> CheckResult:
    """Offer ``rate`` requests/s for ``duration`` s over at most ``connections`` connections;
    ``on_answer`` sees each answer (``replay`` reads their segments). With ``count_shed``,
    the result says how many answers the server shed (from its ``/metrics``)."""
    total = round(rate * duration)
    if not 0 < total <= MAX_REQUESTS or duration > MAX_DURATION_S:
        raise ValueError(
            f"a check sends 1 to {MAX_REQUESTS:,} requests over at most {MAX_DURATION_S:.0f} s"
        )
    result = CheckResult(rate, duration)
    shed_before = await read_shed_total(target, timeout) if count_shed else None
    checker = _Checker(target, bodies, timeout, on_answer)
    workers = [asyncio.create_task(checker.worker(result)) for _ in range(connections)]
    start = time.monotonic()
    for i in range(total):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.001:
            result.late_sends += 1
        checker.queue.put_nowait(due)
        result.sent += 1
    try:
        await asyncio.wait_for(checker.queue.join(), timeout + 1.0)
    except TimeoutError:
        result.timeouts += checker.queue.qsize()
    for task in workers:
        task.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    if shed_before is not None:
        # With several workers, another worker's counts reach /metrics at its next flush.
        await asyncio.sleep(METRICS_FLUSH_SECONDS)
        shed_after = await read_shed_total(target, timeout)
        if shed_after is not None:
            result.shed = shed_after - shed_before
    return result


def read_bodies(paths: Sequence[Path]) -> list[bytes]:
    """Request bodies from files and directories: a ``.json`` file is one body, a directory
    gives each of its ``*.json`` files, any other file one body per non-empty line."""
    bodies: list[bytes] = []
    for path in paths:
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for file in files:
            data = file.read_bytes()
            if file.suffix == ".json":
                bodies.append(data.strip())
            else:
                bodies.extend(line for line in data.splitlines() if line.strip())
    if not bodies:
        raise ValueError("no request bodies found in " + ", ".join(map(str, paths)))
    return bodies


def format_report(result: CheckResult, url: str) -> str:
    """The human-readable report ``check`` prints."""
    summary = result.to_dict()
    latency = summary["latency_ms"]
    assert isinstance(latency, dict)
    status = ", ".join(f"{code} x {n:,}" for code, n in sorted(result.status.items())) or "none"
    lines = [
        f"check {url}: {result.target_rate:g} req/s for {result.duration:g} s, open loop",
        f"  sent {result.sent:,}, answered {result.completed:,}, "
        f"errors {result.errors:,}, timeouts {result.timeouts:,}",
        f"  status   {status}",
        f"  latency  p50 {latency['p50']} ms, p99 {latency['p99']} ms, "
        f"p99.9 {latency['p99.9']} ms, max {latency['max']} ms",
        f"  over 5 ms: {result.over_budget_share:.2%} of calls (Index throttles above 5%)",
        f"  shed     {result.shed:,} of {result.completed:,} ({result.shed_share:.2%}) answered"
        " empty by the server's overload guard"
        if result.shed is not None and result.shed_share is not None
        else "  shed     unknown (no enrich_shed_total on the server's /metrics)",
    ]
    if result.late_sends > result.sent * 0.01:
        lines.append(
            f"  note: the client sent {result.late_sends:,} requests late; it could not keep "
            "up with this rate, so the latencies above include client delay"
        )
    why = result.trips_breaker()
    if why:
        lines.append("verdict: Index's circuit breaker WOULD TRIP: " + "; ".join(why))
    else:
        lines.append("verdict: OK, Index's circuit breaker would not trip")
    return "\n".join(lines)
