"""Synthetic snapshots shaped like production: namespaces' real id shapes, 1-30 segments per
identity, Zipf-popular segments. Deterministic for a given seed.

    python -m bench.synth --identities 1000000 --out /tmp/snap.tsv
"""

from __future__ import annotations

import argparse
import base64
import itertools
import random
import uuid
from collections.abc import Iterator
from pathlib import Path

from enrich_server.snapshot import load_snapshots
from tests.utils import ROOT

EID_SOURCES = ("id5-sync.com", "liveramp.com", "uidapi.com", "criteo.com", "pubcid.org")


def _zipf_table(segments: int, size: int, rng: random.Random, exponent: float = 1.1) -> list[int]:
    """``size`` segment indices drawn with Zipf popularity; windows of it make memberships."""
    weights = [1.0 / (rank**exponent) for rank in range(1, segments + 1)]
    return rng.choices(range(segments), weights=weights, k=size)


def identity_key(rng: random.Random, n: int) -> str:
    """A key of a namespace drawn with production-like shares."""
    draw = rng.random()
    if draw < 0.45:
        return "uid:" + base64.urlsafe_b64encode(rng.randbytes(12)).decode()
    if draw < 0.70:
        return f"ifa:{uuid.UUID(int=rng.getrandbits(128), version=4)}"
    if draw < 0.95:
        source = EID_SOURCES[n % len(EID_SOURCES)]
        return f"eid:{source}:" + base64.urlsafe_b64encode(rng.randbytes(24)).decode()
    if draw < 0.975:
        return f"domain:site{n}.example"
    return f"bundle:com.example.app{n}"


def snapshot_lines(identities: int, segments: int = 5000, seed: int = 1) -> Iterator[str]:
    """Lines of a synthetic snapshot (a tenth of identities carry an expiry)."""
    rng = random.Random(seed)
    table = _zipf_table(segments, 1 << 20, rng)
    for n in range(identities):
        count = rng.randint(1, 30)
        start = rng.randrange(len(table) - count)
        names = ",".join(f"seg{s}" for s in dict.fromkeys(table[start : start + count]))
        expires = "\t4102444800" if n % 10 == 0 else ""
        yield f"{identity_key(rng, n)}\t{names}{expires}\n"


def write_snapshot(path: Path, identities: int, seed: int = 1) -> None:
    """Write a synthetic snapshot plus the example store's lines (the seed identities)."""
    with path.open("w") as out:
        out.writelines(snapshot_lines(identities, seed=seed))
        out.write((ROOT / "segments.example.tsv").read_text())


def cached_snapshot(identities: int, cache: Path) -> Path:
    """The synthetic snapshot of ``identities`` identities, written once and kept."""
    snapshot = cache / f"snapshot-{identities}.tsv"
    if not snapshot.exists():
        cache.mkdir(parents=True, exist_ok=True)
        partial = snapshot.with_suffix(".partial")
        write_snapshot(partial, identities)
        partial.rename(snapshot)
    return snapshot


def cached_store(identities: int, cache: Path, progress: bool = True) -> Path:
    """A store of ``identities`` synthetic identities (plus the seed's), built once and kept."""
    store = cache / f"store-{identities}"
    if not (store / "data.mdb").exists():
        load_snapshots([cached_snapshot(identities, cache)], store, progress=progress)
    return store


def sample_keys(identities: int, count: int, seed: int = 1) -> list[str]:
    """The first ``count`` keys of the synthetic snapshot (they are in the store)."""
    lines = itertools.islice(snapshot_lines(identities, seed=seed), count)
    return [line.split("\t", 1)[0] for line in lines]


def main() -> None:
    """Write a synthetic snapshot file."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--identities", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    write_snapshot(args.out, args.identities, args.seed)


if __name__ == "__main__":
    main()
