"""Request bodies for load runs: the shared OpenRTB corpus plus Index-shaped synthetic requests
carrying identities of the synthetic store, one compact JSON body a line.

About half of the bodies find segments: the corpus' requests mostly miss (their identities are
not in the store), the synthetic ones mostly hit.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from bench.synth import sample_keys
from enrich_server.config import SAMPLES_DIR
from tests.conftest import CORPUS


def _synthetic(key: str, rng: random.Random, templates: dict[str, Any]) -> dict[str, Any]:
    namespace, _, ident = key.partition(":")
    request: dict[str, Any] = json.loads(
        json.dumps(templates["app" if rng.random() < 0.5 else "web"])
    )
    # Page, app and placement differ per request and are not in the store: only the
    # identity decides whether the request hits.
    request["user"] = {"id": f"miss-{rng.getrandbits(48):x}"}
    if "device" in request:
        request["device"].pop("ifa", None)
    if "app" in request:
        request["app"]["bundle"] = f"com.nowhere.app{rng.getrandbits(32)}"
    if "site" in request:
        request["site"]["domain"] = f"news{rng.getrandbits(32)}.nowhere"
    for imp in request.get("imp", []):
        imp.pop("gpid", None)
        imp.pop("ext", None)
    if namespace == "uid":
        request["user"]["id"] = ident
    elif namespace == "ifa":
        request.setdefault("device", {})["ifa"] = ident
    elif namespace == "eid":
        source, _, uid = ident.partition(":")
        request["user"]["eids"] = [{"source": source, "uids": [{"id": uid}]}]
    elif namespace == "domain":
        request.pop("app", None)
        request["site"] = {"domain": ident, "page": f"https://{ident}/"}
    return request


def synthetic_bodies(keys: list[str], count: int, rng: random.Random) -> list[str]:
    """``count`` Index-shaped request bodies (compact JSON), about 80 % of them carrying one of
    ``keys`` (in turn) and the rest an identity no store holds."""
    templates = {
        name: json.loads((SAMPLES_DIR / f"{name}.json").read_text()) for name in ("app", "web")
    }
    return [
        json.dumps(
            _synthetic(
                keys[n % len(keys)] if rng.random() < 0.8 else f"uid:absent-{n}", rng, templates
            ),
            separators=(",", ":"),
        )
        for n in range(count)
    ]


def write_bodies(path: Path, identities: int, synthetic: int = 700, seed: int = 7) -> int:
    """Write the bodies file: every valid corpus request, then ``synthetic`` Index-shaped ones
    (about 80 % carrying a store identity). Returns how many bodies were written."""
    rng = random.Random(seed)
    lines = [
        json.dumps(json.loads(file.read_bytes()), separators=(",", ":"))
        for file in sorted((CORPUS / "valid").glob("*.json"))
    ]
    keys = sample_keys(identities, min(identities, synthetic))
    lines += synthetic_bodies(keys, synthetic, rng)
    rng.shuffle(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return len(lines)
