"""Why a request got the answer it got: ``POST /enrich?explain=1`` and ``enrich-server explain``.

The answer is the one the endpoint gives (``EnrichEndpoint.answer``); the explanation beside
it re-derives each step with the same functions and the store's operator views: the identity
keys taken (and the fields that gave none, with why), the aliases synced ids resolve to, what
each key holds (segment, remaining TTL, expired or not), the privacy rule that withheld
user-level data and the field that decided it, the holdout, and the Cache-Control value with
its reason. Only operator calls pay for this: the hot path never looks here.
"""

from __future__ import annotations

import hmac
import time
from typing import Any, Final

import msgspec
from starlette.types import Receive, Scope, Send

from enrich_server import keys as keys_module
from enrich_server.enrich import MAX_SEGMENTS, EnrichEndpoint, read_body
from enrich_server.guard import clock
from enrich_server.keys import is_zero_ifa, request_keys
from enrich_server.openrtb import BidRequest, decode, eids, gpids
from enrich_server.privacy import COPPA, GDPR_DENIED, GDPR_NO_CONSENT, US_PRIVACY

#: Where each key namespace comes from in a request.
KEY_SOURCES: Final = {
    keys_module.UID: "user.id",
    keys_module.EID: "user.eids / user.ext.eids",
    keys_module.IFA: "device.ifa",
    keys_module.DOMAIN: "site.domain",
    keys_module.BUNDLE: "app.bundle",
    keys_module.GPID: "imp.gpid / imp.ext.gpid",
}
_JSON: Final = msgspec.json.Decoder()
_ENCODER: Final = msgspec.json.Encoder()


def explain_call(
    endpoint: EnrichEndpoint, body: bytes, stamp: float
) -> tuple[bytes, dict[str, Any]]:
    """The Cache-Control value and the answer object (``segment_ids`` and ``explain``) for
    ``body``, as ``/enrich`` answers a call stamped ``stamp`` (``guard.clock()`` when it
    began). Raises ``msgspec.DecodeError`` for a body that is not JSON."""
    if endpoint.guard.should_shed(stamp):
        return b"no-cache", {"segment_ids": [], "explain": {"shed": True}}
    cache, out = endpoint.answer(body)
    answer: dict[str, Any] = _JSON.decode(out)
    answer["explain"] = explain_request(endpoint, decode(body), cache, answer["segment_ids"])
    return cache, answer


def explain_request(
    endpoint: EnrichEndpoint, request: BidRequest, cache: bytes, answered: list[str]
) -> dict[str, Any]:
    """The ``explain`` object for a decoded request whose answer was ``answered`` with
    Cache-Control ``cache``."""
    store = endpoint.store
    now = int(time.time())
    user, context = request_keys(request)
    held_out = bool(user) and endpoint.holdout is not None and endpoint.holdout.held_out(user[0])
    reason = None if held_out else endpoint.privacy.suppression_reason(request)
    looked_up = [] if held_out else (user if reason is None else []) + context
    order: list[bytes] = []
    aliases = []
    for key in looked_up:
        order.append(key)
        ours = store.alias_of(key) if store is not None else None
        if ours is not None:
            aliases.append({"key": key.decode(), "resolves_to": ours.decode()})
            if ours not in looked_up and ours not in order:
                order.append(ours)
    lookups, sources = _lookups(store, order, now)
    return {
        "shed": False,
        "keys": [_key(k, "user") for k in user] + [_key(k, "context") for k in context],
        "skipped": _skipped(request, user),
        "aliases": aliases,
        "lookups": lookups,
        "segments": [sources.get(name, {"segment": name}) for name in answered[:MAX_SEGMENTS]],
        "holdout": held_out,
        "privacy": {"withheld": reason, "field": _deciding_field(request, reason)},
        "cache_control": {"value": cache.decode(), "why": _cache_reason(
            endpoint, cache, held_out, reason, looked_up, answered)},
    }  # fmt: skip


def _key(key: bytes, kind: str) -> dict[str, str]:
    namespace = key.split(b":", 1)[0].decode()
    return {"key": key.decode(), "kind": kind, "from": KEY_SOURCES[namespace]}


def _lookups(
    store: Any, order: list[bytes], now: int
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """What each key holds, and for each live segment the first key (in lookup order)
    that holds it, with its remaining TTL."""
    lookups: list[dict[str, Any]] = []
    sources: dict[str, dict[str, Any]] = {}
    for key in order:
        held = store.memberships(key) if store is not None else None
        rows = []
        for name, expires in (held or {}).items():
            live = not expires or expires > now
            ttl = expires - now if expires else None
            rows.append({"segment": name, "ttl": ttl, "expired": not live})
            if live and name not in sources:
                sources[name] = {"segment": name, "source": key.decode(), "ttl": ttl}
        lookups.append({"key": key.decode(), "hit": held is not None, "segments": rows})
    return lookups, sources


def _skipped(request: BidRequest, user_keys: list[bytes]) -> list[dict[str, str]]:
    """Fields that were present but gave no key, and why."""
    out = []
    user, device = request.user, request.device
    if user is not None and user.id is not None and not user.id:
        out.append({"field": "user.id", "why": "empty"})
    elif user is not None and user.id and not any(k.startswith(b"uid:") for k in user_keys):
        out.append({"field": "user.id", "why": _unusable(user.id)})
    if user is not None and len(eids(user)) < _uid_count(user):
        out.append({"field": "user.eids", "why": "uids without a source or an id were skipped"})
    if device is not None and device.ifa is not None:
        ifa = device.ifa
        if not ifa:
            out.append({"field": "device.ifa", "why": "empty"})
        elif device.lmt == 1:
            out.append({"field": "device.ifa", "why": "device.lmt is 1 (limit ad tracking)"})
        elif is_zero_ifa(ifa):
            out.append({"field": "device.ifa", "why": "all zeros (no ad id)"})
        elif not any(k.startswith(b"ifa:") for k in user_keys):
            out.append({"field": "device.ifa", "why": _unusable(ifa)})
    if request.site is not None and request.site.domain == "":
        out.append({"field": "site.domain", "why": "empty"})
    if request.app is not None and request.app.bundle == "":
        out.append({"field": "app.bundle", "why": "empty"})
    if request.imp and not gpids(request.imp):
        out.append({"field": "imp.gpid", "why": "no imp carries a gpid"})
    return out


def _uid_count(user: Any) -> int:
    groups = [user.eids, user.ext.eids if user.ext is not None else None]
    return sum(len(eid.uids or ()) for group in groups if group for eid in group)


def _unusable(ident: str) -> str:
    try:
        size = len(ident.encode())
    except UnicodeEncodeError:
        return "holds a lone surrogate: no stored key can match it"
    return f"{size} bytes: longer than any key LMDB holds ({keys_module.MAX_KEY_BYTES})"


def _deciding_field(request: BidRequest, reason: str | None) -> str | None:
    """The request field whose value made ``reason`` fire."""
    if reason is None:
        return None
    regs, user = request.regs, request.user
    if reason == COPPA:
        return "regs.coppa"
    if reason == US_PRIVACY and regs is not None:
        if regs.us_privacy:
            return "regs.us_privacy"
        if regs.ext is not None and regs.ext.us_privacy:
            return "regs.ext.us_privacy"
        return "regs.gpp (US Privacy section 6)"
    if reason in (GDPR_NO_CONSENT, GDPR_DENIED):
        if user is not None and user.consent:
            return "user.consent"
        if user is not None and user.ext is not None and user.ext.consent:
            return "user.ext.consent"
        gdpr_field = "regs.gdpr" if regs is not None and regs.gdpr is not None else "regs.ext.gdpr"
        return f"{gdpr_field} is 1 and no consent string" if reason == GDPR_NO_CONSENT else (
            "regs.gpp (TCF EU section 2)")  # fmt: skip
    return "regs.gpp" + (" with regs.gpp_sid" if regs is not None and regs.gpp_sid else "")


def _cache_reason(  # noqa: PLR0917 - one call, every input of the decision
    endpoint: EnrichEndpoint,
    cache: bytes,
    held_out: bool,
    reason: str | None,
    looked_up: list[bytes],
    answered: list[str],
) -> str:
    if endpoint.store is None:
        return "no store open yet"
    if held_out:
        return "user held out ([enrich] holdout): answered empty"
    if not looked_up:
        return "no identity key to look up" + (" (user-level keys withheld)" if reason else "")
    if not answered:
        return "no segment found for any key: nothing known yet"
    if reason is not None:
        return f"user-level segments withheld ({reason}): the answer is preliminary"
    if cache == endpoint.full_cache:
        return "user known: max_age"
    return "user known: the shortest remaining membership TTL, below max_age"


class ExplainRoute:
    """``POST <enrich path>?explain=1`` as an ASGI app: an operator call, authorised by a
    token of ``[enrich.auth] explain_tokens`` (``Authorization: Bearer``), never open."""

    def __init__(self, endpoint: EnrichEndpoint, tokens: tuple[str, ...]) -> None:
        self.endpoint = endpoint
        self._tokens = [token.encode() for token in tokens]

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        if not self._tokens:
            return 403, "explain is off: set [enrich.auth] explain_tokens"
        presented = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                presented = value[7:].strip()
        matched = False
        for token in self._tokens:  # every token compared, each in constant time
            matched |= hmac.compare_digest(presented, token)
        if not matched:
            return 401, "explain needs an operator token (Authorization: Bearer)"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one explain call."""
        stamp = clock()
        status, headers, payload = 200, [(b"cache-control", b"no-store")], b""
        refusal = self._refusal(scope)
        if scope["method"] != "POST":
            status, payload = 405, _ENCODER.encode({"error": "use POST"})
        elif refusal is not None:
            status, payload = refusal[0], _ENCODER.encode({"error": refusal[1]})
            if status == 401:
                headers.append((b"www-authenticate", b"Bearer"))
        else:
            body = await read_body(receive, self.endpoint.max_body)
            if body is None:
                status, payload = 413, _ENCODER.encode({"error": "body too large"})
            else:
                try:
                    _, answer = explain_call(self.endpoint, body, stamp)
                except msgspec.DecodeError as exc:
                    status, payload = 400, _ENCODER.encode({"error": f"body is not JSON: {exc}"})
                except RecursionError:
                    status, payload = 400, _ENCODER.encode({"error": "body nests too deep"})
                else:
                    payload = _ENCODER.encode(answer)
        headers += [(b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(payload))]  # fmt: skip
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
