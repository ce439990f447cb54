"""The usual alternative: FastAPI + a pydantic model of the request + Redis (redis-py asyncio).

What a straightforward team would write for the same contract as enrich-server's
``POST /enrich``: pydantic validates the OpenRTB fragment, identity keys are built the same
way, one ``MGET`` fetches every key, and the JSON values written by ``redis_load`` are merged
in key order. Idiomatic rather than tuned: normal FastAPI routing, models and responses.

    BASELINE_REDIS_URL=redis://127.0.0.1:6379/0 \\
        uvicorn bench.baselines.fastapi_redis:app --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Final

import redis.asyncio as redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

#: Index accepts at most this many segment ids in one answer.
MAX_SEGMENTS: Final = 500
MAX_AGE: Final = 86400
DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"


class Model(BaseModel):
    """Base of the request models: OpenRTB carries many fields we do not read."""

    model_config = ConfigDict(extra="ignore")


class Uid(Model):
    id: str | None = None


class Eid(Model):
    source: str | None = None
    uids: list[Uid] | None = None


class UserExt(Model):
    consent: str | None = None
    eids: list[Eid] | None = None


class User(Model):
    id: str | None = None
    eids: list[Eid] | None = None
    consent: str | None = None
    ext: UserExt | None = None


class Device(Model):
    ifa: str | None = None
    lmt: int | None = None


class Site(Model):
    domain: str | None = None


class App(Model):
    bundle: str | None = None


class RegsExt(Model):
    gdpr: int | None = None
    us_privacy: str | None = None


class Regs(Model):
    coppa: int | None = None
    gdpr: int | None = None
    us_privacy: str | None = None
    ext: RegsExt | None = None


class ImpExt(Model):
    gpid: str | None = None


class Imp(Model):
    gpid: str | None = None
    ext: ImpExt | None = None


class BidRequest(Model):
    """The parts of an OpenRTB 2.x request the enrichment reads."""

    user: User | None = None
    device: Device | None = None
    site: Site | None = None
    app: App | None = None
    regs: Regs | None = None
    imp: list[Imp] | None = None


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """One Redis client (and connection pool) per worker process."""
    app.state.redis = redis.Redis.from_url(os.environ.get("BASELINE_REDIS_URL", DEFAULT_REDIS_URL))
    try:
        yield
    finally:
        await app.state.redis.aclose()


# strict_content_type=False: parse a body sent without Content-Type as JSON, as enrich-server
# does (a server-to-server API: the browser CSRF this check guards against does not apply).
app = FastAPI(
    title="enrich baseline: FastAPI + Redis", lifespan=lifespan, strict_content_type=False
)


def user_keys(bid: BidRequest) -> list[str]:
    """``uid:``, each ``eid:<source>:<id>``, then ``ifa:`` (unless LMT or an all-zero ifa)."""
    keys: list[str] = []
    user = bid.user
    if user is not None:
        if user.id:
            keys.append(f"uid:{user.id}")
        ext_eids = user.ext.eids if user.ext is not None else None
        for eids in (user.eids, ext_eids):
            for eid in eids or []:
                if eid.source:
                    keys.extend(f"eid:{eid.source.lower()}:{u.id}" for u in eid.uids or [] if u.id)
    device = bid.device
    if device is not None and device.ifa and device.lmt != 1 and device.ifa.strip("0-"):
        keys.append(f"ifa:{device.ifa.lower()}")
    return keys


def context_keys(bid: BidRequest) -> list[str]:
    """``domain:``, ``bundle:``, then ``gpid:`` for each distinct placement."""
    keys: list[str] = []
    if bid.site is not None and bid.site.domain:
        keys.append(f"domain:{bid.site.domain.lower()}")
    if bid.app is not None and bid.app.bundle:
        keys.append(f"bundle:{bid.app.bundle}")
    for imp in bid.imp or []:
        gpid = imp.gpid if imp.gpid is not None else imp.ext.gpid if imp.ext else None
        if gpid:
            keys.append(f"gpid:{gpid}")
    return keys


def user_level_suppressed(bid: BidRequest) -> bool:
    """COPPA, a US Privacy opt-out of sale, or GDPR without consent."""
    regs = bid.regs
    if regs is None:
        return False
    if regs.coppa == 1:
        return True
    us_privacy = regs.us_privacy
    if us_privacy is None and regs.ext is not None:
        us_privacy = regs.ext.us_privacy
    if us_privacy is not None and len(us_privacy) > 2 and us_privacy[2] in "Yy":
        return True
    gdpr = regs.gdpr
    if gdpr is None and regs.ext is not None:
        gdpr = regs.ext.gdpr
    consent = None
    if bid.user is not None:
        consent = bid.user.consent
        if consent is None and bid.user.ext is not None:
            consent = bid.user.ext.consent
    return gdpr == 1 and not consent


@app.post("/enrich")
async def enrich(bid: BidRequest, request: Request) -> JSONResponse:
    """Answer the segments of the request's identities (user-level first, then contextual)."""
    suppressed = user_level_suppressed(bid)
    keys = context_keys(bid) if suppressed else user_keys(bid) + context_keys(bid)
    keys = list(dict.fromkeys(keys))  # the same id sent twice is fetched once
    if not keys:
        return JSONResponse({"segment_ids": []}, headers={"Cache-Control": "no-cache"})
    client: redis.Redis = request.app.state.redis
    values = await client.mget(keys)
    now = int(time.time())
    segments, min_expires = merge(values, now)
    if not segments or suppressed:
        cache = "no-cache"
    elif min_expires:
        cache = f"max-age={min(MAX_AGE, min_expires - now)}"
    else:
        cache = f"max-age={MAX_AGE}"
    return JSONResponse({"segment_ids": segments}, headers={"Cache-Control": cache})


def merge(values: list[bytes | str | None], now: int) -> tuple[list[str], int]:
    """Live, distinct segments of the Redis values in key order (at most ``MAX_SEGMENTS``),
    and the earliest expiry among them (0 when none expires)."""
    segments: list[str] = []
    seen: set[str] = set()
    min_expires = 0
    for value in values:
        if value is None:
            continue
        for name, expires in json.loads(value):
            if (expires and expires <= now) or name in seen:
                continue
            seen.add(name)
            segments.append(name)
            if expires and (not min_expires or expires < min_expires):
                min_expires = expires
            if len(segments) == MAX_SEGMENTS:
                return segments, min_expires
    return segments, min_expires
