"""``POST /enrich``: the hot path Index Exchange calls once per impression.

A plain ASGI callable (no Starlette ``Request``/``Response``): read the body, decode the
fields we use, derive identity keys, apply the privacy policy, resolve the keys in one LMDB
read transaction, and join pre-encoded segment names into the answer. Every well-formed
request gets ``200``; only a body that is not JSON (400) or too large (413) gets a 4xx, and
nothing a client sends can produce a 5xx (Index's circuit breaker trips on either).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Final

import msgspec
from starlette.types import Message, Receive, Scope, Send

from enrich_server.auth import EndpointAuth
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

log = logging.getLogger(__name__)
_clock: Final = time.perf_counter


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
        self._bearer_challenge = auth is not None and auth.signer is not None
        self._privacy = privacy
        self._max_body = config.max_body
        self._max_age = config.max_age
        self._full_cache = b"max-age=%d" % config.max_age
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = _clock()
        tally = self.tally
        if scope["method"] != "POST":
            await _send_error(send, 405, "use POST", [(b"allow", b"POST")])
            tally.request(405, _clock() - start)
            return
        if self._auth is not None:
            rejection = self._auth.check(scope)
            if rejection is not None:
                extra = (
                    [(b"www-authenticate", b"Bearer")]
                    if rejection.status == 401 and (self._bearer_challenge)
                    else None
                )
                await _send_error(send, rejection.status, rejection.message, extra)
                tally.auth_rejected[rejection.reason] += 1
                tally.request(rejection.status, _clock() - start)
                return
        message = await receive()
        if not message.get("more_body", False) and self.guard.should_shed():
            tally.shed += 1
            await send(self._empty_start)
            await send(self._empty_body)
            tally.request(200, _clock() - start)
            return
        body: bytes = message.get("body", b"")
        if message.get("more_body", False):
            chunks = [body]
            size = len(body)
            while message.get("more_body", False) and size <= self._max_body:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                chunks.append(chunk)
                size += len(chunk)
            body = b"".join(chunks)
        if len(body) > self._max_body:
            await _send_error(send, 413, f"body larger than {self._max_body} bytes")
            tally.request(413, _clock() - start)
            return
        try:
            cache, out = self.answer(body)
        except msgspec.DecodeError as exc:
            await _send_error(send, 400, f"body is not JSON: {exc}")
            tally.request(400, _clock() - start)
            return
        except RecursionError:
            # JSON nested deeper than the decoder follows: well-formed, but nothing usable.
            cache, out = NO_CACHE, EMPTY_BODY
        except Exception:
            # A bug must not trip Index's breaker: answer "nothing known" and say so loudly.
            log.exception("enrich failed; answered empty")
            cache, out = NO_CACHE, EMPTY_BODY
        if out is EMPTY_BODY:
            await send(self._empty_start)
            await send(self._empty_body)
            tally.request(200, _clock() - start)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    _CONTENT_TYPE,
                    (b"cache-control", cache),
                    (b"content-length", b"%d" % len(out)),
                ],
            }
        )
        await send({"type": "http.response.body", "body": out})
        tally.request(200, _clock() - start)


async def _send_error(
    send: Send, status: int, error: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = _ERROR_ENCODER.encode({"error": error})
    headers: list[Any] = [
        _CONTENT_TYPE,
        (b"cache-control", NO_CACHE),
        (b"content-length", b"%d" % len(body)),
        *(extra or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
