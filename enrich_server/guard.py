"""The partner-side 5 ms guard: shed a request that has already waited too long.

Index throttles a partner once more than 5 % of its calls take over 5 ms. When offered more
work than a worker can do, an open-loop client (Index) keeps sending, the backlog grows and
every answer gets late. Answering "nothing known yet" (the precomputed empty ``no-cache``
body) at once costs a fraction of the full work, so a request that has already waited too
long is better shed: the backlog drains and latency stays bounded; Index asks again later.
Shedding by deadline, not by concurrency: uvicorn's ``limit_concurrency`` answers 503, which
trips the breaker, and counts connections, not how late a request is.

How long has a request waited when we are about to start on it? Two parts:

* **since the loop read its bytes**: the HTTP protocol stamps each request with ``clock()``
  when its first bytes arrive (one clock read per ``data_received``, shared by the requests
  pipelined in it). Its age when the work would start covers every request served before it
  in this loop iteration, on its own connection and on the others read in the same batch.
* **before the loop read them**: bytes sit in the socket buffer while the loop is busy
  elsewhere. A 1 ms timer measures how late the loop comes round (``lag``). A single late
  tick is a hiccup (a GC pass, the CPU taken away from the VM), not a backlog, so the smaller
  of the last two lags counts.

A request whose wait (lag plus age) exceeds ``budget`` is shed. The hot-path cost is one
clock read and a comparison, plus the stamp's clock read per socket read.
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
        """Whether a request stamped ``stamp`` (``clock()`` when its first bytes arrived) has,
        with the time its bytes sat unread (the loop's lag), waited longer than the budget."""
        return self._loop is not None and self.lag + (clock() - stamp) > self.budget

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        tick_lag = now - self._due
        self.lag = min(tick_lag, self._last_tick_lag)
        self._last_tick_lag = tick_lag
        self._due = now + self.interval
        self._timer = self._loop.call_at(self._due, self._tick)
