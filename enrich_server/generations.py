"""Store generations: a replaced store is published beside the live one and swapped in.

A store directory ``PATH`` has one of two layouts:

* plain: ``PATH/data.mdb`` (a fresh ``load``, and the bundled example store);
* generational: ``PATH/current`` is a symlink to ``gen-NNNNNN``, a sibling directory holding
  the LMDB environment; ``load --replace`` builds ``PATH/.build-*`` and publishes it as the
  next ``gen-NNNNNN`` by renaming a temporary symlink over ``current`` (rename(2) is atomic:
  a reader resolves either the old or the new generation, never neither).

Serving workers hold a shared ``flock`` on the directory they serve from (``Lease``) and
check ``current`` once a second (``StoreFollower.refresh``, from the metrics flusher: one
``readlink``, never per request). When it moved they open the new generation, swap it in,
close the old one, and remove every generation nobody holds any more: the last worker to let
go of an old generation deletes it. A builder holds an exclusive ``flock`` on its ``.build-*``
directory, so a build killed midway is recognised (its lock is free) and removed by the next
clean-up. py-lmdb opens one environment per directory per process, so a swap always opens a
different directory than the one open.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Final

from enrich_server.errors import StoreError
from enrich_server.store import CURRENT_LINK, DATA_FILE, SegmentStore, store_dir

log = logging.getLogger(__name__)

GENERATION_PREFIX: Final = "gen-"
BUILD_PREFIX: Final = ".build-"
_FIRST_BUILD_INFIX: Final = ".building-"
_GENERATION: Final = re.compile(r"gen-(\d{6,})")
_LEGACY_FILES: Final = (DATA_FILE, "lock.mdb")


class Lease:
    """A ``flock`` on a directory: shared while serving from it, exclusive while building it."""

    def __init__(self, directory: Path, exclusive: bool = False, wait: bool = True) -> None:
        self.directory = directory
        self._fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(self._fd, flags if wait else flags | fcntl.LOCK_NB)
        except OSError:
            os.close(self._fd)
            raise

    def release(self) -> None:
        """Drop the lock (closing the descriptor releases it)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def current_target(root: Path) -> str | None:
    """Where ``root/current`` points (``gen-NNNNNN``), or ``None`` for a plain store."""
    try:
        return os.readlink(root / CURRENT_LINK)
    except OSError:
        return None


def _number(name: str) -> int | None:
    match = _GENERATION.fullmatch(name)
    return int(match.group(1)) if match else None


def publish(root: Path, built: Path) -> Path:
    """Make the finished environment in ``built`` (a directory inside ``root``) the store's
    current generation; returns its final directory. Atomic for readers."""
    numbers = [n for n in map(_number, os.listdir(root)) if n is not None]
    final = root / f"{GENERATION_PREFIX}{max(numbers, default=0) + 1:06d}"
    built.rename(final)
    temporary = root / f".{CURRENT_LINK}-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    os.symlink(final.name, temporary)
    temporary.rename(root / CURRENT_LINK)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)  # the flip survives a power cut
    finally:
        os.close(fd)
    return final


def _unused(directory: Path) -> bool:
    try:
        lease = Lease(directory, exclusive=True, wait=False)
    except BlockingIOError:
        return False
    except FileNotFoundError:
        return False  # someone else removed it meanwhile
    lease.release()
    return True


def first_build_dir(root: Path) -> Path:
    """Where the first load of a store at ``root`` builds (beside it: ``root`` appears only
    once the build is complete)."""
    return root.with_name(f".{root.name}{_FIRST_BUILD_INFIX}{os.getpid()}")


def remove_dead_builds(root: Path) -> list[str]:
    """Delete the builds of the store at ``root`` whose builder died (their lock is free):
    ``root/.build-*``, and a first load's build beside ``root``; returns what was removed."""
    candidates = sorted(root.parent.glob(f".{glob.escape(root.name)}{_FIRST_BUILD_INFIX}*"))
    if root.is_dir():
        candidates += sorted(root.glob(f"{BUILD_PREFIX}*"))
    removed: list[str] = []
    for path in candidates:
        if _unused(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def remove_unused(root: Path) -> list[str]:
    """Delete the generations, dead builds and plain-layout files that no process holds;
    returns what was removed. The current generation is never removed."""
    removed = remove_dead_builds(root)
    current = current_target(root)
    if current is None:
        return removed  # a plain store: nothing was ever superseded
    for entry in sorted(os.listdir(root)):
        superseded = _number(entry) is not None and entry != current
        if superseded and _unused(root / entry):
            # A lease taken right after this check is harmless: that reader re-resolves
            # ``current`` once it holds its lease (see ``open_current``).
            shutil.rmtree(root / entry, ignore_errors=True)
            removed.append(entry)
    legacy = [name for name in _LEGACY_FILES if (root / name).exists()]
    if legacy and _unused(root):
        for name in legacy:
            (root / name).unlink(missing_ok=True)
        removed += legacy
    return removed


def open_current(
    root: Path, writable: bool = False, sync: bool = True
) -> tuple[SegmentStore, Lease]:
    """Open the store's current environment with a shared lease on its directory."""
    for _ in range(10):
        directory = store_dir(root)
        try:
            lease = Lease(directory)
        except FileNotFoundError:
            continue  # superseded and removed between readlink and open: resolve again
        if store_dir(root) != directory or not (directory / DATA_FILE).is_file():
            lease.release()
            continue
        try:
            return SegmentStore(directory, writable=writable, sync=sync), lease
        except BaseException:
            lease.release()
            raise
    raise StoreError(f"the store at {root} keeps changing; cannot open its current generation")


class StoreFollower:
    """A serving worker's store: follows ``current`` across replaces.

    ``changed`` costs one ``readlink``; ``open_next`` and ``Retired.close`` block (opening,
    reading every segment name, unmapping, deleting files), so the app runs them in a thread
    and only ``swap`` on the event loop, between requests.
    """

    def __init__(self, root: Path, writable: bool = False, sync: bool = True) -> None:
        self.root = root
        self.writable = writable
        self.sync = sync
        self.store, self._lease = open_current(root, writable, sync)

    def changed(self) -> bool:
        """Whether ``current`` names another generation than the one served."""
        return store_dir(self.root) != self.store.directory

    def open_next(self) -> tuple[SegmentStore, Lease] | None:
        """The current generation, opened and warmed; ``None`` if it cannot be yet."""
        try:
            store, lease = open_current(self.root, self.writable, self.sync)
        except StoreError as exc:
            log.warning("new store generation not opened yet", extra={"error": str(exc)})
            return None
        store.warm()
        return store, lease

    def swap(self, store: SegmentStore, lease: Lease) -> Retired:
        """Serve ``store`` from now on; returns the old one, to be closed."""
        retired = Retired(self.root, self.store, self._lease)
        self.store, self._lease = store, lease
        log.info(
            "store generation swapped in",
            extra={
                "store": str(self.root),
                "directory": store.directory.name,
                "identities": store.identity_count(),
                "pid": os.getpid(),
            },
        )
        return retired

    def refresh(self) -> SegmentStore | None:
        """``changed``, ``open_next``, ``swap`` and close the old one, all at once; returns
        the new store, or ``None`` when nothing changed."""
        if not self.changed():
            return None
        opened = self.open_next()
        if opened is None:
            return None
        self.swap(*opened).close()
        return self.store

    def close(self) -> None:
        """Close the store and drop the lease."""
        self.store.close()
        self._lease.release()


class Retired:
    """A generation no longer served by this process."""

    def __init__(self, root: Path, store: SegmentStore, lease: Lease) -> None:
        self.root = root
        self.store = store
        self.lease = lease

    def close(self) -> None:
        """Close it, let go of it, and remove every generation nobody holds any more."""
        self.store.close()
        self.lease.release()
        removed = remove_unused(self.root)
        if removed:
            log.info("old store generations removed", extra={"removed": removed})
