"""Progress reporting for long CLI jobs: a live bar on a terminal, periodic lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Reports ``done`` out of ``total`` bytes and a line count, throttled.

    On a terminal the line is redrawn in place at most every ``tty_interval`` seconds; in a
    log (pipe or file) a plain line is written every ``log_interval`` seconds.
    """

    def __init__(
        self,
        label: str,
        total_bytes: int,
        stream: TextIO | None = None,
        tty_interval: float = 0.2,
        log_interval: float = 5.0,
    ) -> None:
        self.label = label
        self.total = total_bytes
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval = tty_interval if self.tty else log_interval
        self.started = time.monotonic()
        self._next = self.started + self.interval

    def update(self, done_bytes: int, lines: int) -> None:
        """Record progress; prints only when the interval has passed."""
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval
        self._write(self._line(now, done_bytes, lines), final=False)

    def finish(self, lines: int) -> None:
        """Print the closing line."""
        now = time.monotonic()
        self._write(self._line(now, self.total, lines), final=True)

    def _line(self, now: float, done: int, lines: int) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = lines / elapsed
        share = done / self.total if self.total else 1.0
        eta = (elapsed / share - elapsed) if share > 0 else 0.0
        width = 24
        filled = int(width * min(share, 1.0))
        bar = "#" * filled + "-" * (width - filled)
        return (
            f"{self.label} [{bar}] {share:6.1%} {lines:,} lines "
            f"{rate:,.0f} lines/s elapsed {_clock(elapsed)} eta {_clock(eta)}"
        )

    def _write(self, line: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
