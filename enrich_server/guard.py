"""The partner-side 5 ms guard: shed load while requests queue in the event loop.

Index throttles a partner once more than 5 % of its calls take over 5 ms. When offered more
work than a worker can do, an open-loop client (Index) keeps sending, the backlog grows and
every answer gets late. Answering "nothing known yet" (the precomputed empty ``no-cache``
body) at once costs a fraction of the full work, so a request that has already waited too
long is better shed: the backlog drains and latency stays bounded; Index asks again later.

How long has a request waited before we start on it? Two parts:

* **before its batch**: the loop reads all ready sockets, then runs the requests it found
  one after another. A 1 ms timer measures how late the loop comes round (``lag``): that is
  how long the requests of this batch sat in socket buffers. A single late tick is a hiccup
  (a GC pass, the CPU taken away from the VM), not a backlog, so the smaller of the last two
  lags counts.
* **within its batch**: the time since the batch's first request started.

A request whose estimated wait exceeds ``budget`` is shed. The hot-path cost is one clock
read and a comparison.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

_clock: Final = time.monotonic


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

    def should_shed(self) -> bool:
        """Whether the request about to be served has waited longer than the budget."""
        loop = self._loop
        if loop is None:
            return False
        now = _clock()
        start = self._batch_start
        if not start:
            # First request of this batch: note when it began; the callback runs once the
            # requests queued before it are done, closing the batch.
            self._batch_start = start = now
            loop.call_soon(self._end_batch)
        return self.lag + (now - start) > self.budget

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
