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
from typing import Any, Final

import msgspec
from starlette.types import Message, Receive, Scope, Send

from enrich_server.auth import CallScope, EndpointAuth
from enrich_server.capture import Capture
from enrich_server.config import EnrichConfig
from enrich_server.guard import LoadGuard
from enrich_server.keys import request_keys
from enrich_server.metrics import Tally
from enrich_server.openrtb import decode
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
_USE_POST: Final = _ERROR_ENCODER.encode({"error": "use POST"})
_ALLOW_POST: Final = ((b"allow", b"POST"),)
_BEARER_CHALLENGE: Final = ((b"www-authenticate", b"Bearer"),)

#: An answer: HTTP status, Cache-Control value, JSON body, and any further headers.
Reply = tuple[int, bytes, bytes, tuple[tuple[bytes, bytes], ...] | None]

log = logging.getLogger(__name__)
_clock: Final = time.perf_counter
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
        *,
        capture: Capture | None = None,
    ) -> None:
        self.store: SegmentStore | None = None
        self.guard = guard
        self.tally = tally
        # None when nothing is configured: an open endpoint pays one `is None` per call.
        self._auth = auth if auth is not None and auth.enabled else None
        self.has_auth = self._auth is not None
        self._bearer_challenge = auth is not None and auth.signer is not None
        self._privacy = privacy
        self.capture = capture
        self.max_body = config.max_body
        self._max_age = config.max_age
        self._full_cache = b"max-age=%d" % config.max_age
        self._too_large = _ERROR_ENCODER.encode(
            {"error": f"body larger than {config.max_body} bytes"}
        )
        # Constant messages, built once: ASGI servers only read them.
        self._empty_start: Message = {
            "type": "http.response.start",
            "status": 200,
            "headers": _EMPTY_HEADERS,
        }
        self._empty_body: Message = {"type": "http.response.body", "body": EMPTY_BODY}

    def answer(self, body: bytes) -> tuple[bytes, bytes]:
        """Return ``(Cache-Control value, JSON body)`` for a request body.

        Raises ``msgspec.DecodeError`` when the body is not JSON.
        """
        request = decode(body)
        store = self.store
        if store is None:
            return NO_CACHE, EMPTY_BODY
        user, context = request_keys(request)
        reason = self._privacy.suppression_reason(request)
        tally = self.tally
        if reason is None:
            keys = user + context
        else:
            keys = context
            tally.suppressed[reason] += 1
        if not keys:
            return NO_CACHE, EMPTY_BODY
        now = int(time.time())
        resolved = store.resolve(keys, now, MAX_SEGMENTS)
        tally.hits += resolved.hits
        tally.misses += len(keys) - resolved.hits
        if not resolved.segments_json:
            return NO_CACHE, EMPTY_BODY
        tally.answer(len(resolved.segments_json))
        out = _BODY_HEAD + b",".join(resolved.segments_json) + _BODY_TAIL
        if reason is not None:
            return NO_CACHE, out
        if resolved.min_expires and resolved.min_expires - now < self._max_age:
            return b"max-age=%d" % (resolved.min_expires - now), out
        return self._full_cache, out

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

    def respond(self, body: bytes, start: float) -> Reply:
        """The answer to a POST of ``body`` (read whole, ``start`` when the call began): shed by
        the guard, too large, not JSON, or the enrichment. Never raises; counts the answer.

        Both lanes call this: the HTTP protocol's fast lane and the ASGI endpoint.
        """
        tally = self.tally
        if self.guard.should_shed():
            tally.shed += 1
            tally.request(200, _clock() - start)
            return 200, NO_CACHE, EMPTY_BODY, None
        if len(body) > self.max_body:
            return self.too_large(start)
        status = 200
        try:
            cache, out = self.answer(body)
        except msgspec.DecodeError as exc:
            status, cache = 400, NO_CACHE
            out = _ERROR_ENCODER.encode({"error": f"body is not JSON: {exc}"})
        except RecursionError:
            # JSON nested deeper than the decoder follows: well-formed, but nothing usable.
            cache, out = NO_CACHE, EMPTY_BODY
        except Exception:
            # A bug must not trip Index's breaker: answer "nothing known" and say so loudly.
            log.exception("enrich failed; answered empty")
            cache, out = NO_CACHE, EMPTY_BODY
        capture = self.capture
        if capture is not None and _random() < capture.sample:
            capture.record(body, status, out)
        tally.request(status, _clock() - start)
        return status, cache, out, None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI adapter (in-process tests, embedding, and calls the fast lane passes on)."""
        start = _clock()
        if scope["method"] != "POST":
            await _send(send, (405, NO_CACHE, _USE_POST, _ALLOW_POST))
            self.tally.request(405, _clock() - start)
            return
        refusal = self.refuse(scope)
        if refusal is not None:
            await _send(send, refusal)
            self.tally.request(refusal[0], _clock() - start)
            return
        message = await receive()
        body: bytes = message.get("body", b"")
        if message.get("more_body", False):
            chunks = [body]
            size = len(body)
            while message.get("more_body", False) and size <= self.max_body:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                chunks.append(chunk)
                size += len(chunk)
            if size > self.max_body:
                await _send(send, self.too_large(start))
                return
            body = b"".join(chunks)
        reply = self.respond(body, start)
        if reply[2] is EMPTY_BODY:
            await send(self._empty_start)
            await send(self._empty_body)
        else:
            await _send(send, reply)


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
