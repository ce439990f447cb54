"""The DMP-facing HTTP API (seed 000, DESIGN §4): user sync and audience ingestion.

| call | does |
|---|---|
| ``GET /sync?out=URL`` | 302 to ``URL`` with ``[[USERID]]`` = our user id (cookie) |
| ``GET /uid?userid=&pl=&plsec=`` | remember a platform's user id as ours (or signed) |
| ``POST /v1/segment?title=[&key=]`` | create a segment (idempotent per platform and title) |
| ``POST /v1/segment?id=&userid=`` | add one user; ``DELETE`` the same removes one |
| ``POST /v1/segment`` + JSON array | micro-batch of mutations, validated whole |
| ``GET /v1/segment``, ``GET``/``DELETE /v1/segment/{id}`` | list, get, delete segments |
| ``GET /openapi.json`` | the OpenAPI description of all of the above |

Ingestion calls authenticate a platform (HTTP Basic or bearer, ``PlatformCredentials``);
writes are handed to the ingestion process (``ingestd``) and answered after its commit.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from enrich_server.auth import PlatformCredentials
from enrich_server.config import MAX_PLATFORM_ID, Config, PlatformConfig
from enrich_server.errors import StoreError
from enrich_server.ingest import refusals
from enrich_server.ingest.batches import MAX_TTL
from enrich_server.ingest.local import IngestClient
from enrich_server.ingest.sync import (
    SignatureChecker,
    our_user_id,
    raw_sync_target,
    redirect_problem,
    their_id_problem,
    user_cookie,
    whole_number,
    with_user_id,
)
from enrich_server.metrics import Metrics
from enrich_server.openapi import openapi_document
from enrich_server.snapshot import segment_name_problem
from enrich_server.store import MAX_SEGMENT_ID, DmpSegment, SegmentStore

log = logging.getLogger(__name__)

#: A title is part of an LMDB key (at most 511 bytes, 4 of them the platform id).
MAX_TITLE_BYTES: Final = 500
_NO_STORE: Final = {"cache-control": "no-store"}
_CHALLENGE: Final = {"www-authenticate": 'Basic realm="enrich-server ingestion"'}
#: How long ``/readyz`` and a scrape wait for the ingestion process's status: under the
#: readiness probe's 1 s timeout (deploy/k8s), so a hung process gets a 503 that says so.
STATUS_TIMEOUT_SECONDS: Final = 0.5
Handler = Callable[[Request], Awaitable[Response]]


def _error(status: int, error: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"status": "error", "error": error, **extra}, status, _NO_STORE)


def _ok(**fields: Any) -> JSONResponse:
    return JSONResponse({"status": "OK", **fields}, headers=_NO_STORE)


def _unencoded_target(query: str) -> bool:
    """Whether the query starts with the seed's unencoded ``out=https://...`` template."""
    return query.startswith("out=") and "://" in query[4:].split("&", 1)[0]


def _segment_json(segment: DmpSegment) -> dict[str, Any]:
    return {
        "segment_id": segment.segment_id,
        "title": segment.title,
        "key": segment.key,
        "created": segment.created,
    }


class _RefusedError(Exception):
    """Ends a request early with an error response."""

    def __init__(self, response: Response) -> None:
        self.response = response


class DmpApi:
    """The DMP endpoints of one serving process.

    ``store`` returns the process's open store (``None`` before start-up or after
    shut-down); ``ingest_socket`` is where the ingestion process listens (``None``: it is
    not running, and writes answer 503).
    """

    def __init__(
        self,
        config: Config,
        store: Callable[[], SegmentStore | None],
        metrics: Metrics,
        ingest_socket: str | None,
    ) -> None:
        self._config = config
        self._store = store
        self._metrics = metrics
        self._credentials = PlatformCredentials(config.platforms)
        self._signatures = SignatureChecker(config.dmp.signature_window)
        # An unsigned /sync may go to the hosts of the platforms that do not sign.
        self._unsigned_hosts = frozenset(
            host for p in config.platforms if not p.hmac_secret for host in p.sync_hosts
        )
        self._ingest = IngestClient(ingest_socket, config.dmp.max_body) if ingest_socket else None
        self._openapi = openapi_document(config)

    async def log_status(self) -> dict[str, Any] | None:
        """Where the node stands in its write log (``IngestClient.status``); ``None`` when
        the ingestion process is not running, not reachable, or does not answer within
        ``STATUS_TIMEOUT_SECONDS``."""
        if self._ingest is None:
            return None
        try:
            return await asyncio.wait_for(self._ingest.status(), STATUS_TIMEOUT_SECONDS)
        except (StoreError, TimeoutError):
            return None

    def close(self) -> None:
        """Close the connections to the ingestion process."""
        if self._ingest is not None:
            self._ingest.close()

    def routes(self) -> list[Route]:
        """The Starlette routes of the API."""
        return [
            Route("/sync", self._counted("sync", self.sync), methods=["GET"]),
            Route("/uid", self._counted("uid", self.uid), methods=["GET"]),
            Route(
                "/v1/segment",
                self._counted("segment", self.segments),
                methods=["GET", "POST", "DELETE"],
            ),
            Route(
                "/v1/segment/{segment_id:int}",
                self._counted("segment", self.one_segment),
                methods=["GET", "DELETE"],
            ),
            Route("/openapi.json", self.openapi, methods=["GET"]),
        ]

    def _counted(self, endpoint: str, handler: Handler) -> Handler:
        async def counted(request: Request) -> Response:
            try:
                response = await handler(request)
            except _RefusedError as refused:
                response = refused.response
            self._metrics.dmp_request(endpoint, response.status_code)
            return response

        return counted

    async def openapi(self, _: Request) -> Response:
        """``GET /openapi.json``."""
        return JSONResponse(self._openapi)

    # -- user sync ------------------------------------------------------------------------

    async def sync(self, request: Request) -> Response:
        """``GET /sync?out=URL``: redirect to ``URL`` with our user id in it."""
        params = request.query_params.multi_items()
        raw = raw_sync_target(request.url.query)
        # The unsigned template leaves its target unencoded: a `sig` after it is the
        # target's own parameter. A signed call encodes `out`, as every other value.
        signed = any(name == "sig" for name, _ in params)
        if signed and not _unencoded_target(request.url.query):
            platform = self._signed_platform(params)
            out = dict(params).get("out", "")
            hosts: frozenset[str] | tuple[str, ...] = platform.sync_hosts
        elif raw is None:
            return _error(400, "out must be the first parameter: /sync?out=<url>")
        else:
            out, hosts = raw, self._unsigned_hosts
        problem = redirect_problem(out, hosts)
        if problem:
            return _error(400, problem)
        user_id, _ = our_user_id(request.cookies.get(self._config.dmp.cookie))
        return Response(
            status_code=302,
            headers={
                "location": with_user_id(out, user_id),
                "set-cookie": self._cookie(user_id),
                **_NO_STORE,
            },
        )

    async def uid(self, request: Request) -> Response:
        """``GET /uid?userid=THEIRS&pl=ID&plsec=TOKEN`` (or ``&ts=&sig=``): remember that
        the platform's user ``THEIRS`` is our user (from our cookie, or a new one)."""
        params = request.query_params.multi_items()
        given = dict(params)
        if "sig" in given:
            platform = self._signed_platform(params)
        else:
            platform = self._platform(given.get("pl", ""))
            plsec = given.get("plsec", "")
            if platform.hmac_secret:
                return _error(403, f"platform {platform.id} must sign its /uid calls")
            if not platform.plsec or not hmac.compare_digest(
                plsec.encode(), platform.plsec.encode()
            ):
                return _error(403, "bad plsec")
        their = given.get("userid", "")
        problem = their_id_problem(their)
        if problem:
            return _error(400, problem)
        ours, _ = our_user_id(request.cookies.get(self._config.dmp.cookie))
        await self._write("alias", their.encode(), ours.encode(), given.get("sig", "").lower())
        mapped = _ok()
        mapped.headers["set-cookie"] = self._cookie(ours)
        return mapped

    def _cookie(self, user_id: str) -> str:
        dmp = self._config.dmp
        return user_cookie(dmp.cookie, user_id, dmp.cookie_max_age)

    def _platform(self, pl: str) -> PlatformConfig:
        number = whole_number(pl, MAX_PLATFORM_ID)
        platform = self._config.platform(number) if number is not None else None
        if platform is None:
            raise _RefusedError(_error(403, f"unknown platform {pl!r}"))
        return platform

    def _signed_platform(self, params: list[tuple[str, str]]) -> PlatformConfig:
        platform = self._platform(dict(params).get("pl", ""))
        if not platform.hmac_secret:
            raise _RefusedError(_error(403, f"platform {platform.id} has no shared secret to sign"))
        problem = self._signatures.problem(platform.hmac_secret, params)
        if problem:
            raise _RefusedError(_error(403, problem))
        return platform

    # -- segments and population ----------------------------------------------------------

    def _authenticated(self, request: Request) -> PlatformConfig:
        platform = self._credentials.authenticate(request.headers.get("authorization", ""))
        if platform is None:
            refusal = _error(401, "missing or wrong ingestion credentials")
            refusal.headers.update(_CHALLENGE)
            raise _RefusedError(refusal)
        return platform

    async def segments(self, request: Request) -> Response:
        """``/v1/segment``: list (GET), create / add / micro-batch (POST), remove (DELETE)."""
        platform = self._authenticated(request)
        query = request.query_params
        if request.method == "GET":
            store = self._open_store()
            return _ok(segments=[_segment_json(s) for s in store.dmp_segments(platform.id)])
        if request.method == "DELETE":
            if "id" not in query or "userid" not in query:
                return _error(
                    400,
                    "DELETE /v1/segment needs id and userid "
                    "(DELETE /v1/segment/{id} deletes a whole segment)",
                )
            return await self._single(platform, request, "remove")
        if "title" in query:
            return await self._create(platform, query.get("title", ""), query.get("key"))
        if "id" in query or "userid" in query:
            return await self._single(platform, request, "add")
        return await self._apply(platform, "batch", await self._body(request))

    async def one_segment(self, request: Request) -> Response:
        """``/v1/segment/{id}``: get (GET) or delete with all its members (DELETE)."""
        platform = self._authenticated(request)
        sid: int = request.path_params["segment_id"]
        segment = self._open_store().dmp_segment(sid)
        if segment is None or segment.platform != platform.id:
            return _error(404, f"no segment {sid} of this platform")
        if request.method == "GET":
            return _ok(segment=_segment_json(segment))
        removed: int = await self._write("delete", platform.id, sid)
        log.info(
            "segment deleted",
            extra={"platform": platform.name, "segment_id": sid, "memberships_removed": removed},
        )
        return _ok(deleted=True, segment_id=sid, memberships_removed=removed)

    async def _create(self, platform: PlatformConfig, title: str, key: str | None) -> Response:
        if not title or len(title.encode()) > MAX_TITLE_BYTES or not title.isprintable():
            return _error(400, f"title must be printable, 1-{MAX_TITLE_BYTES} bytes of UTF-8")
        problem = segment_name_problem(key) if key is not None else None
        if key is not None and key.isdigit():
            problem = "all digits: numbers are the default keys of segments created without one"
        if problem:
            return _error(400, f"key: {problem}")
        sid, created = await self._write("create", platform.id, title, key)
        if created:
            log.info(
                "segment created",
                extra={"platform": platform.name, "segment_id": sid, "title": title},
            )
        return _ok(created=created, segment_id=sid)

    async def _single(self, platform: PlatformConfig, request: Request, op: str) -> Response:
        query = request.query_params
        sid = whole_number(query.get("id", ""), MAX_SEGMENT_ID)
        ttl_text = query.get("ttl")
        ttl = whole_number(ttl_text, MAX_TTL) if ttl_text is not None else None
        if sid is None or (ttl_text is not None and ttl is None):
            return _error(400, f"id must be a segment id, and ttl (when given) 0-{MAX_TTL} seconds")
        item: dict[str, str | int] = {
            "segment": sid,
            "userid": query.get("userid", ""),
            "op": op,
            "idtype": query.get("idtype", "uid"),
        }
        if ttl is not None:
            item["ttl"] = ttl
        return await self._apply(platform, "single", item)

    async def _apply(self, platform: PlatformConfig, op: str, payload: Any) -> Response:
        started = time.perf_counter()
        count, ops = await self._write(op, platform.id, payload)
        for name, applied in ops.items():
            self._metrics.ingested(platform.name, name, applied)
        log.info(
            "ingested",
            extra={
                "platform": platform.name,
                "mutations": count,
                "ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )
        return _ok(applied=count)

    async def _write(self, op: str, *args: Any) -> Any:
        """Run a write in the ingestion process; a refusal ends the request with the answer
        ``refusals`` gives it (nothing was applied)."""
        if self._ingest is None:
            raise _RefusedError(_error(503, "the ingestion process is not running"))
        try:
            return await self._ingest.call(op, *args)
        except refusals.REFUSED as exc:
            status, fields = refusals.answer(exc)
            if status >= 500:  # the disk, the map or the log, not the client
                log.error("store write failed", extra={"error": str(exc)})
            raise _RefusedError(_error(status, **fields)) from exc

    def _open_store(self) -> SegmentStore:
        store = self._store()
        if store is None:
            raise _RefusedError(_error(503, "the store is not open"))
        return store

    async def _body(self, request: Request) -> bytes:
        limit = self._config.dmp.max_body
        declared = request.headers.get("content-length", "")
        if declared and (whole_number(declared, limit) is None):
            raise _RefusedError(_error(413, f"body larger than {limit} bytes"))
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _RefusedError(_error(413, f"body larger than {limit} bytes"))
            chunks.append(chunk)
        return b"".join(chunks)
