"""Fuzzed request bodies: the OpenRTB corpus and the seed samples, mutated by a seeded RNG.

Mutations: byte flips, truncation, splicing two bodies, type swaps (a value anywhere replaced
by one of another type, hostile ones included), huge repeats of a span, and random JSON
built from the field names we read. The same seed gives the same bodies.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from enrich_server.config import SAMPLES_DIR
from tests.conftest import CORPUS

#: Field names the request path reads: random JSON uses them so it reaches the readers.
READ_NAMES: Final = (
    "user", "id", "eids", "source", "uids", "consent", "ext", "device", "ifa", "lmt", "site",
    "domain", "app", "bundle", "regs", "coppa", "gdpr", "us_privacy", "gpp", "gpp_sid", "imp",
    "gpid",
)  # fmt: skip
_SENTINEL: Final = "\x01raw\x01"
#: Raw JSON values a type swap may put anywhere (json.dumps cannot write most of them).
_RAW_VALUES: Final = (
    b"9" * 4301, b"-" + b"9" * 5000, b"1e400", b"-1e400", b"1e-400", b"18446744073709551616",
    b'"\\ud800"', b'"U1\\udc00x"', b"[" * 300 + b"]" * 300, b'"' + b"A" * 20_000 + b'"',
)  # fmt: skip


def seed_bodies() -> list[bytes]:
    """Every body of the OpenRTB corpus (valid and invalid) and the seed samples."""
    files = [
        *sorted((CORPUS / "valid").glob("*.json")),
        *sorted((CORPUS / "invalid").glob("*")),
        *sorted(SAMPLES_DIR.glob("*.json")),
    ]
    bodies = [path.read_bytes() for path in files if path.is_file()]
    if not bodies:
        raise FileNotFoundError(f"no seed bodies under {CORPUS} or {SAMPLES_DIR}")
    return bodies


def _flip(rng: random.Random, body: bytes, seeds: list[bytes], max_body: int) -> bytes:
    data = bytearray(body or b"{}")
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= rng.randint(1, 255)
    return bytes(data)


def _truncate(rng: random.Random, body: bytes, seeds: list[bytes], max_body: int) -> bytes:
    return body[: rng.randrange(len(body) + 1)]


def _splice(rng: random.Random, body: bytes, seeds: list[bytes], max_body: int) -> bytes:
    other = rng.choice(seeds)
    return body[: rng.randrange(len(body) + 1)] + other[rng.randrange(len(other) + 1) :]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    draw = rng.random()
    if draw < 0.15:
        return _SENTINEL  # replaced by a raw hostile value
    if draw < 0.3 and depth < 6:
        return {
            rng.choice(READ_NAMES): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))
        }
    if draw < 0.4 and depth < 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    scalars: tuple[Any, ...] = (
        None,
        True,
        False,
        0,
        1,
        -1,
        2**63,
        0.5,
        "",
        "1YYN",
        "x" * rng.randint(1, 64),
    )
    return rng.choice(scalars)


def _encode(value: Any, rng: random.Random) -> bytes:
    """Compact JSON with every sentinel replaced by a raw hostile value."""
    encoded = json.dumps(value, separators=(",", ":")).encode()
    sentinel = json.dumps(_SENTINEL).encode()
    parts = encoded.split(sentinel)
    out = parts[0]
    for part in parts[1:]:
        out += rng.choice(_RAW_VALUES) + part
    return out


def _nodes(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _nodes(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _nodes(item, (*path, index))


def _type_swap(rng: random.Random, body: bytes, seeds: list[bytes], max_body: int) -> bytes:
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return _flip(rng, body, seeds, max_body)
    paths = [p for p in _nodes(request) if p]
    if not paths:
        return _encode(_random_value(rng), rng)
    for _ in range(rng.randint(1, 3)):
        *parents, last = rng.choice(paths)
        node = request
        try:
            for key in parents:
                node = node[key]
            original = node[last]
            replacement = _random_value(rng)
            while type(replacement) is type(original) and replacement != _SENTINEL:
                replacement = _random_value(rng)
            node[last] = replacement
        except (KeyError, IndexError, TypeError):
            continue  # an earlier swap in this body removed the path
    return _encode(request, rng)


def _repeat(rng: random.Random, body: bytes, seeds: list[bytes], max_body: int) -> bytes:
    if not body:
        return body
    start = rng.randrange(len(body))
    span = body[start : start + rng.randint(1, 64)]
    # log-uniform growth: mostly kilobytes, now and then up to max_body
    room = max(1, (max_body - len(body)) // len(span))
    times = int(room ** rng.random())
    return body[:start] + span * times + body[start:]


def _random_json(rng: random.Random, body: bytes, seeds: list[bytes], max_body: int) -> bytes:
    return _encode({name: _random_value(rng) for name in rng.sample(READ_NAMES, 4)}, rng)


MUTATIONS: Final[dict[str, Callable[[random.Random, bytes, list[bytes], int], bytes]]] = {
    "flip": _flip,
    "truncate": _truncate,
    "splice": _splice,
    "type_swap": _type_swap,
    "repeat": _repeat,
    "random_json": _random_json,
}


def fuzzed_bodies(
    seeds: list[bytes], count: int, max_body: int, seed: int = 12
) -> Iterator[tuple[str, bytes]]:
    """``count`` bodies as ``(mutation, body)``, each at most ``max_body`` bytes."""
    rng = random.Random(seed)
    kinds = list(MUTATIONS)
    for _ in range(count):
        kind = rng.choice(kinds)
        body = MUTATIONS[kind](rng, rng.choice(seeds), seeds, max_body)
        yield kind, body[:max_body]


def write_examples(directory: Path, bodies: list[tuple[str, bytes]]) -> list[str]:
    """Save bodies worth a look under ``directory`` (one file each); returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, body in bodies:
        path = directory / f"{name}.json"
        path.write_bytes(body)
        paths.append(str(path))
    return paths
