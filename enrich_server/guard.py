"""The partner-side 5 ms guard: shed load while the event loop lags.

Index throttles a partner once more than 5 % of its calls take over 5 ms. When offered more
work than a worker can do, an open-loop client (Index) keeps sending, the backlog grows and
every answer gets late. While the loop lags past a budget, answering "nothing known yet"
(the precomputed empty ``no-cache`` body) at once costs a fraction of the full work, so the
backlog drains and latency stays bounded; Index simply asks again for that user later.

Lag is measured by a timer that should fire every ``interval`` seconds: how late it fires is
how long a request arriving now waits behind the work already queued in the loop. Shedding
starts only when two ticks in a row are late: a single stall (a GC pass, a noisy neighbour
stealing the CPU) delays the requests of that moment whatever we do, and answering them
properly costs little more than shedding them; a backlog shows up as lag that persists.
The check on the hot path is one attribute read.
"""

from __future__ import annotations

import asyncio


class LoadGuard:
    """Watches event-loop lag; ``shedding`` is true while it exceeds ``budget`` seconds."""

    def __init__(self, budget: float, interval: float = 0.001) -> None:
        self.budget = budget
        self.interval = interval
        self.shedding = False
        self.lag = 0.0
        self._previous_lag = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0

    @property
    def enabled(self) -> bool:
        """Whether the guard watches at all (a budget of 0 turns it off)."""
        return self.budget > 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start watching ``loop`` (call from inside it, once the worker is up)."""
        if not self.enabled:
            return
        self._loop = loop
        self._due = loop.time() + self.interval
        self._timer = loop.call_at(self._due, self._tick)

    def stop(self) -> None:
        """Stop watching; the guard stops shedding."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.shedding = False

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._previous_lag, self.lag = self.lag, now - self._due
        self.shedding = self.lag > self.budget and self._previous_lag > self.budget
        self._due = now + self.interval
        self._timer = self._loop.call_at(self._due, self._tick)
