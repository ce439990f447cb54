"""One writer thread per serving process, with group commit.

LMDB allows one write transaction at a time (across processes), and a commit waits for the
disk. Running writes on the event loop would stall ``/enrich`` behind every fsync; so they
run on this thread, and the loop only awaits their result. Jobs queued while a commit is
in flight are applied together in the next transaction: under load, many batches share
one fsync. A job's future resolves only after its commit, so an acknowledged write is on
disk. A job refused with one of the ``clean_errors`` (raised before it wrote anything) fails
alone; any other exception aborts its group, whose jobs are then retried one by one, so a
failing job never takes the others down. With ``is_current``, a group whose store was
superseded while it waited for LMDB's write lock (a replace was published) is aborted and run
again on the store ``store()`` now returns, so no acknowledged write lands in a dead store.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, Final, TypeVar

from enrich_server.errors import StoreError
from enrich_server.store import SegmentStore, StoreWriter

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[StoreWriter], Any]
_STOP: Final = None
#: Most jobs sharing one transaction: bounds how long one commit holds LMDB's write lock.
MAX_GROUP: Final = 64
_SUPERSEDED_RETRIES: Final = 5


class _SupersededError(Exception):
    """The store was replaced while this group waited for the write lock."""


class _Pending:
    __slots__ = ("future", "job", "loop")

    def __init__(self, job: Job, future: asyncio.Future[Any], loop: asyncio.AbstractEventLoop):
        self.job = job
        self.future = future
        self.loop = loop

    def settle(self, result: Any = None, error: BaseException | None = None) -> None:
        self.loop.call_soon_threadsafe(_settle, self.future, result, error)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the client went away; the write itself stands
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class WriteQueue:
    """Runs store writes on a dedicated thread; ``await queue.run(job)`` from the loop."""

    def __init__(
        self,
        store: Callable[[], SegmentStore | None],
        clean_errors: tuple[type[Exception], ...] = (),
        is_current: Callable[[SegmentStore], bool] | None = None,
    ) -> None:
        self._store = store
        self._clean_errors = clean_errors
        self._is_current = is_current
        self._jobs: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="store-writer", daemon=True)
        self._thread.start()

    async def run(self, job: Callable[[StoreWriter], T]) -> T:
        """Apply ``job`` in a write transaction; returns its result once committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Pending(job, future, loop))
        return await future

    def close(self) -> None:
        """Finish the queued jobs, then stop the thread."""
        self._jobs.put(_STOP)
        self._thread.join()

    def _work(self) -> None:
        while True:
            first = self._jobs.get()
            if first is _STOP:
                return
            group = [first]
            stop = False
            while len(group) < MAX_GROUP:
                try:
                    more = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stop = True
                    break
                group.append(more)
            self._apply(group)
            if stop:
                return

    def _apply(self, group: list[_Pending]) -> None:
        if len(group) > 1 and self._apply_together(group):
            return
        for pending in group:
            self._apply_alone(pending)

    def _begin(self) -> StoreWriter:
        """A write session on the current store; raises ``_SupersededError`` when a replace
        was published while it waited for LMDB's write lock."""
        store = self._store()
        if store is None:
            raise StoreError("the store is closed")
        writer = store.writer()  # waits for the write lock
        if self._is_current is not None and not self._is_current(store):
            writer.abort()
            raise _SupersededError
        return writer

    def _apply_together(self, group: list[_Pending]) -> bool:
        """One transaction for the whole group; ``False`` (nothing settled, nothing written)
        when a job failed midway and each must run alone."""
        for _ in range(_SUPERSEDED_RETRIES):
            outcomes: list[tuple[Any, BaseException | None]] = []
            try:
                with self._begin() as writer:
                    for pending in group:
                        try:
                            outcomes.append((pending.job(writer), None))
                        except self._clean_errors as refused:
                            outcomes.append((None, refused))
            except _SupersededError:
                continue
            except Exception:  # isolated below, by running each job alone
                return False
            for pending, (result, error) in zip(group, outcomes, strict=True):
                pending.settle(result, error)
            return True
        return False

    def _apply_alone(self, pending: _Pending) -> None:
        for _ in range(_SUPERSEDED_RETRIES):
            try:
                with self._begin() as writer:
                    result = pending.job(writer)
            except _SupersededError:
                continue
            except Exception as exc:  # handed to the awaiting request
                pending.settle(error=exc)
            else:
                pending.settle(result)
            return
        pending.settle(error=StoreError("the store keeps being replaced; nothing applied"))
