"""``POST /enrich``: the hot path Index Exchange calls once per impression.

A plain ASGI callable (no Starlette ``Request``/``Response``): read the body, decode the
fields we use, derive identity keys, apply the privacy policy, resolve the keys in one LMDB
read transaction, and join pre-encoded segment names into the answer. Every well-formed
request gets ``200``; only a body that is not JSON (400) or too large (413) gets a 4xx, and
nothing a client sends can produce a 5xx (Index's circuit breaker trips on either).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any, Final

import msgspec
from starlette.types import Message, Receive, Scope, Send

from enrich_server.auth import CallScope, EndpointAuth
from enrich_server.capture import Capture
from enrich_server.config import EnrichConfig
from enrich_server.guard import LoadGuard, clock
from enrich_server.holdout import Holdout
from enrich_server.keys import request_keys
from enrich_server.metrics import Tally
from enrich_server.openrtb import BidRequest, decode
from enrich_server.privacy import Privacy
from enrich_server.store import SegmentStore

#: Index accepts at most this many segment ids in one answer.
MAX_SEGMENTS: Final = 500

NO_CACHE: Final = b"no-cache"
EMPTY_BODY: Final = b'{"segment_ids":[]}'
_BODY_HEAD: Final = b'{"segment_ids":['
_BODY_TAIL: Final = b"]}"
_CONTENT_TYPE: Final = (b"content-type", b"application/json")
_EMPTY_HEADERS: Final = [
    _CONTENT_TYPE,
    (b"cache-control", NO_CACHE),
    (b"content-length", b"%d" % len(EMPTY_BODY)),
]
_ERROR_ENCODER: Final = msgspec.json.Encoder()
_BEARER_CHALLENGE: Final = ((b"www-authenticate", b"Bearer"),)

#: An answer: HTTP status, Cache-Control value, JSON body, and any further headers.
Reply = tuple[int, bytes, bytes, tuple[tuple[bytes, bytes], ...] | None]
#: What a call's bytes (a body, or a query string for GET callers) answer: Cache-Control
#: value and JSON body; raises ``msgspec.DecodeError`` for bytes it cannot read.
Answer = Callable[[bytes], tuple[bytes, bytes]]
#: A lookup's outcome: Cache-Control value and the JSON-encoded segment names.
Lookup = tuple[bytes, list[bytes]]
_NOTHING: Final[Lookup] = (NO_CACHE, [])

log = logging.getLogger(__name__)
_clock: Final = clock
_random: Final = random.random


class EnrichEndpoint:
    """The enrichment endpoint; ``store`` is attached per worker once it is open."""

    def __init__(
        self,
        config: EnrichConfig,
        privacy: Privacy,
        guard: LoadGuard,
        tally: Tally,
        auth: EndpointAuth | None = None,
    ) -> None:
        self.store: SegmentStore | None = None
        self.guard = guard
        self.tally = tally
        # None when nothing is configured: an open endpoint pays one `is None` per call.
        self._auth = auth if auth is not None and auth.enabled else None
        self.has_auth = self._auth is not None
        self._bearer_challenge = auth is not None and auth.signer is not None
        self.privacy = privacy
        # None when off: the hot path pays one `is None` per call.
        self.holdout = Holdout(config.holdout) if config.holdout else None
        self.capture: Capture | None = None
        self.max_body = config.max_body
        self._max_age = config.max_age
        self.full_cache = b"max-age=%d" % config.max_age
        self._too_large = _ERROR_ENCODER.encode(
            {"error": f"body larger than {config.max_body} bytes"}
        )
        # Constant messages, built once: ASGI servers only read them.
        self.empty_start: Message = {
            "type": "http.response.start",
            "status": 200,
            "headers": _EMPTY_HEADERS,
        }
        self.empty_body: Message = {"type": "http.response.body", "body": EMPTY_BODY}

    def answer(self, body: bytes) -> tuple[bytes, bytes]:
        """Return ``(Cache-Control value, JSON body)`` for an ``/enrich`` request body.

        Raises ``msgspec.DecodeError`` when the body is not JSON.
        """
        cache, segments = self.lookup(decode(body))
        if not segments:
            return cache, EMPTY_BODY
        return cache, _BODY_HEAD + b",".join(segments) + _BODY_TAIL

    def lookup(self, request: BidRequest) -> Lookup:
        """The segments a request may receive, and the Cache-Control value of the answer.

        Every caller's answer (``/enrich``, ``/ortb``, ``/rtc``) is this, in its own shape.
        """
        store = self.store
        if store is None:
            return _NOTHING
        user, context = request_keys(request)
        if self.holdout is not None and user and self.holdout.held_out(user[0]):
            self.tally.holdout += 1
            return _NOTHING
        reason = self.privacy.suppression_reason(request)
        tally = self.tally
        if reason is None:
            keys = user + context
        else:
            keys = context
            tally.suppressed[reason] += 1
        if not keys:
            return _NOTHING
        now = int(time.time())
        resolved = store.resolve(keys, now, MAX_SEGMENTS)
        tally.hits += resolved.hits
        tally.misses += len(keys) - resolved.hits
        segments = resolved.segments_json
        if not segments:
            return _NOTHING
        tally.answer(len(segments))
        if reason is not None:
            return NO_CACHE, segments
        if resolved.min_expires and resolved.min_expires - now < self._max_age:
            return b"max-age=%d" % (resolved.min_expires - now), segments
        return self.full_cache, segments

    def refuse(self, scope: CallScope) -> Reply | None:
        """The 401/403 answer when auth is configured and the call fails it, else ``None``.

        ``scope`` needs ``headers``, ``query_string`` and ``client`` (an ASGI HTTP scope, or
        the same three keys from the HTTP protocol's fast lane).
        """
        if self._auth is None:
            return None
        rejection = self._auth.check(scope)
        if rejection is None:
            return None
        self.tally.auth_rejected[rejection.reason] += 1
        challenge = rejection.status == 401 and self._bearer_challenge
        return (
            rejection.status,
            NO_CACHE,
            _ERROR_ENCODER.encode({"error": rejection.message}),
            _BEARER_CHALLENGE if challenge else None,
        )

    def too_large(self, start: float) -> Reply:
        """The 413 answer for a body past ``max_body`` (counted, as every answer)."""
        self.tally.request(413, _clock() - start)
        return 413, NO_CACHE, self._too_large, None

    def respond(self, body: bytes, start: float, answer: Answer, empty: bytes) -> Reply:
        """The answer to a call carrying ``body`` (read whole; a GET caller's query string),
        ``start`` the call's stamp (``guard.clock()`` when its first bytes arrived, or when the
        ASGI lane began on it): shed by the guard, too large, not readable, or what ``answer``
        makes of it. ``empty`` is the caller's answer without segments (a shed
        call's, or one a bug cut short). Never raises; counts the answer.

        Both lanes call this: the HTTP protocol's fast lane and the ASGI ``EndpointRoute``.
        """
        tally = self.tally
        if self.guard.should_shed(start):
            tally.shed += 1
            tally.request(200, _clock() - start)
            return 200, NO_CACHE, empty, None
        if len(body) > self.max_body:
            return self.too_large(start)
        status = 200
        try:
            cache, out = answer(body)
        except msgspec.DecodeError as exc:
            status, cache = 400, NO_CACHE
            out = _ERROR_ENCODER.encode({"error": f"body is not JSON: {exc}"})
        except RecursionError:
            # JSON nested deeper than the decoder follows: well-formed, but nothing usable.
            cache, out = NO_CACHE, empty
        except Exception:
            # A bug must not trip Index's breaker: answer "nothing known" and say so loudly.
            log.exception("enrich failed; answered empty")
            cache, out = NO_CACHE, empty
        capture = self.capture
        # Only /enrich's answers (the callers whose empty answer is EMPTY_BODY) are captured.
        if capture is not None and empty is EMPTY_BODY and _random() < capture.sample:
            capture.record(body, status, out)
        tally.request(status, _clock() - start)
        return status, cache, out, None


class EndpointRoute:
    """One of the endpoint's paths as an ASGI app (in-process tests, embedding, and calls the
    fast lane passes on): ``POST`` callers send a body, ``GET`` callers a query string."""

    def __init__(self, endpoint: EnrichEndpoint, method: str, answer: Answer, empty: bytes) -> None:
        self.endpoint = endpoint
        self.method = method
        self.answer = answer
        self.empty = empty
        self._wrong_method: Reply = (
            405, NO_CACHE, _ERROR_ENCODER.encode({"error": f"use {method}"}),
            ((b"allow", method.encode()),),
        )  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one HTTP call."""
        endpoint = self.endpoint
        start = _clock()
        if scope["method"] != self.method:
            await _send(send, self._wrong_method)
            endpoint.tally.request(405, _clock() - start)
            return
        refusal = endpoint.refuse(scope)
        if refusal is not None:
            await _send(send, refusal)
            endpoint.tally.request(refusal[0], _clock() - start)
            return
        if self.method == "GET":
            data: bytes | None = scope["query_string"]
        else:
            data = await read_body(receive, endpoint.max_body)
            if data is None:
                await _send(send, endpoint.too_large(start))
                return
        reply = endpoint.respond(data or b"", start, self.answer, self.empty)
        if reply[2] is EMPTY_BODY:
            await send(endpoint.empty_start)
            await send(endpoint.empty_body)
        else:
            await _send(send, reply)


async def read_body(receive: Receive, max_body: int) -> bytes | None:
    """The whole body of an ASGI HTTP call; ``None`` once it passes ``max_body`` (or the
    client left: nothing to answer either way)."""
    message = await receive()
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body", False) and size <= max_body:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
    return None if size > max_body else b"".join(chunks)


async def _send(send: Send, reply: Reply) -> None:
    status, cache, body, extra = reply
    headers: list[Any] = [
        _CONTENT_TYPE,
        (b"cache-control", cache),
        (b"content-length", b"%d" % len(body)),
        *(extra or ()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
