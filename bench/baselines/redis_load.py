"""Load an enrich-server snapshot into Redis for the FastAPI + Redis baseline.

Each identity key (normalised exactly as enrich-server does, so request keys match) becomes
one Redis string: a JSON array of ``[segment_name, expires_unix_seconds]`` pairs, ``expires``
0 meaning never. The database is rebuilt from scratch (``FLUSHDB`` first) from full
snapshots, not patched with deltas: a ``-name`` removal is skipped, so a snapshot that removes
a membership it added earlier loads differently here than into enrich-server.

Pairs are stored in the order enrich-server serves them: memberships grouped by expiry, in
first-seen order of the expiries, regrouped after every line that adds to a known key (what
``StoreWriter.add`` + ``encode_memberships`` do). Both servers then answer the same
``segment_ids`` in the same order, so the benchmark compares equal work.

    python -m bench.baselines.redis_load SNAPSHOT --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Final

import msgspec
import redis

from enrich_server.keys import parse_key
from enrich_server.snapshot import read_lines

#: Distinct keys per batch: one MGET and one MSET of this many keys each.
BATCH: Final = 10_000
DEFAULT_URL: Final = "redis://127.0.0.1:6379/0"

_ENCODER: Final = msgspec.json.Encoder()
_DECODER: Final = msgspec.json.Decoder(list[tuple[str, int]])

# One snapshot line's additions: (segment names, expires).
_Update = tuple[list[str], int]


def load(snapshot: Path, redis_url: str, *, batch_size: int = BATCH) -> int:
    """Replace the contents of the Redis database at ``redis_url`` with ``snapshot``.

    Returns how many identities were written. Raises ``ValueError`` naming ``file:line`` on
    the first bad line; unlike ``enrich-server load`` this is not atomic (a bench tool).

    Memory stays bounded by one batch: lines are streamed, and only the keys of the current
    batch are held. A key that repeats across batches is merged with what an earlier batch
    wrote (one ``MGET`` per batch reads it back), since the database held nothing else.
    """
    written = 0
    with redis.Redis.from_url(redis_url) as client:
        client.flushdb()
        batch: dict[bytes, list[_Update]] = {}
        for number, text, _ in read_lines(snapshot):
            try:
                if isinstance(text, ValueError):
                    raise text
                key, names, expires = _parse(text)
            except ValueError as exc:
                raise ValueError(f"{snapshot}:{number}: {exc}") from None
            if not names:
                continue  # removals only
            updates = batch.get(key)
            if updates is None:
                if len(batch) >= batch_size:
                    written += _flush(client, batch)
                    batch = {}
                batch[key] = [(names, expires)]
            else:
                updates.append((names, expires))
        if batch:
            written += _flush(client, batch)
    return written


def _parse(text: str) -> tuple[bytes, list[str], int]:
    """``(key, added segment names, expires)`` of one snapshot line.

    Leaner than ``enrich_server.snapshot.parse_line`` (which checks every segment name and
    would double the load time): the key goes through the same ``parse_key``, the structure
    and the expiry are checked, and ``-name`` removals are dropped.
    """
    fields = text.split("\t")
    if len(fields) not in (2, 3):
        raise ValueError(f"expected 2 or 3 tab-separated fields, found {len(fields)}")
    names = fields[1].split(",")
    if fields[1].startswith("-") or ",-" in fields[1]:  # rare: only deltas carry removals
        names = [name for name in names if not name.startswith("-")]
    if not all(names):
        raise ValueError("empty segment name")
    expires = 0
    if len(fields) == 3:
        if not fields[2].isascii() or not fields[2].isdigit():
            raise ValueError(f"expires {fields[2]!r} is not a unix time in whole seconds")
        expires = int(fields[2])
    return parse_key(fields[0]), names, expires


def _flush(client: redis.Redis, batch: dict[bytes, list[_Update]]) -> int:
    """Write one batch; returns how many of its keys were new to the database."""
    keys = list(batch)
    existing = client.mget(keys)
    new = 0
    values: dict[bytes, bytes] = {}
    for key, raw in zip(keys, existing, strict=True):
        memberships: dict[str, int] = {}
        if raw is None:
            new += 1
        else:
            memberships = dict(_DECODER.decode(raw))
        for names, expires in batch[key]:
            if memberships:
                memberships.update(dict.fromkeys(names, expires))
                memberships = _grouped(memberships)
            else:
                # One line has one expiry: already grouped (the common, cheap case).
                memberships = dict.fromkeys(names, expires)
        values[key] = _ENCODER.encode(list(memberships.items()))
    # One MSET per batch rather than a pipeline of SETs: redis-py packs and parses every
    # pipelined command in Python (~27 us a SET here, ~4 us a key in one MSET), which made
    # a 1,000,000-line load take ~50 s instead of ~25 s. Same round trips, same result.
    client.mset(values)
    return new


def _grouped(memberships: dict[str, int]) -> dict[str, int]:
    """Reorder ``{segment: expires}`` by expiry group, groups in first-seen order."""
    groups: dict[int, list[str]] = {}
    for name, expires in memberships.items():
        groups.setdefault(expires, []).append(name)
    return {name: expires for expires, names in groups.items() for name in names}


def main(argv: list[str] | None = None) -> int:
    """Command line: load one snapshot into Redis; exit 1 on a bad snapshot."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.baselines.redis_load",
        description="Load an enrich-server snapshot into Redis (FLUSHDB first).",
    )
    parser.add_argument("snapshot", type=Path, help="snapshot file (plain or gzip)")
    parser.add_argument("--redis-url", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        count = load(args.snapshot, args.redis_url)
    except (ValueError, OSError, EOFError, redis.RedisError) as exc:
        print(f"redis_load: {exc}", file=sys.stderr)
        return 1
    print(
        f"loaded {count:,} identities from {args.snapshot} into {args.redis_url} "
        f"in {time.monotonic() - started:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
