"""The partner-side 5 ms guard: shed a request that has already waited too long.

Index throttles a partner once more than 5 % of its calls take over 5 ms. When offered more
work than a worker can do, an open-loop client (Index) keeps sending, the backlog grows and
every answer gets late. Answering "nothing known yet" (the precomputed empty ``no-cache``
body) at once costs a fraction of the full work, so a request that has already waited too
long is better shed: the backlog drains and latency stays bounded; Index asks again later.
Shedding by deadline, not by concurrency: uvicorn's ``limit_concurrency`` answers 503, which
trips the breaker, and counts connections, not how late a request is.

How long has a request waited when we are about to start on it? Two parts:

* **before this loop iteration**: bytes sit in the socket buffer while the loop is busy. A
  1 ms timer measures how late the loop comes round (``lag``). A single late tick is a hiccup
  (a GC pass, the CPU taken away from the VM), not a backlog, so the smaller of the last two
  lags counts.
* **within it**: the loop reads the ready sockets one after another, each read followed by
  the work on what it brought, so a connection's bytes wait in its socket while the requests
  of the connections read before it are served. That is the time since the iteration's first
  request started (its ``batch``). A request whose first bytes came in an earlier read (a
  body in several reads, one the loop paused for flow control, an ASGI call) is older than
  that: the HTTP protocol stamps each request with ``clock()`` when its first bytes arrive
  (one clock read per ``data_received``, shared by the requests pipelined in it), and the
  earlier of the stamp and the batch's start counts.

A request whose wait exceeds ``budget`` is shed. The hot-path cost is one clock read and two
comparisons per request and one ``call_soon`` per loop iteration, plus the stamp.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

#: The clock request stamps are read from (seconds; only differences mean anything).
clock: Final = time.perf_counter


class LoadGuard:
    """Decides, per request, whether it has queued too long to be worth the full work."""

    def __init__(self, budget: float, interval: float = 0.001) -> None:
        self.budget = budget
        self.interval = interval
        self.lag = 0.0
        """Event-loop lag that persisted over the last two ticks, seconds."""
        self._last_tick_lag = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._batch_start = 0.0

    @property
    def enabled(self) -> bool:
        """Whether the guard watches at all (a budget of 0 turns it off)."""
        return self.budget > 0 and self._loop is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching ``loop`` (call from inside it, once the worker is up)."""
        if self.budget <= 0:
            return
        self._loop = loop
        self._due = loop.time() + self.interval
        self._timer = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        """Stop watching; nothing is shed afterwards."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None
        self.lag = 0.0

    def should_shed(self, stamp: float) -> bool:
        """Whether a request stamped ``stamp`` (``clock()`` when its first bytes arrived) has
        waited longer than the budget, counting the time its bytes may have sat unread."""
        loop = self._loop
        if loop is None:
            return False
        now = clock()
        start = self._batch_start
        if not start:
            # First request of this iteration: note when it began; the callback runs once
            # the requests queued before it are done, closing the batch.
            self._batch_start = start = now
            loop.call_soon(self._end_batch)
        # The earlier of the two (a comparison: min() costs a call on the hot path).
        return self.lag + (now - (stamp if stamp < start else start)) > self.budget

    def _end_batch(self) -> None:
        self._batch_start = 0.0

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        tick_lag = now - self._due
        self.lag = min(tick_lag, self._last_tick_lag)
        self._last_tick_lag = tick_lag
        self._due = now + self.interval
        self._timer = self._loop.call_at(self._due, self._tick)
