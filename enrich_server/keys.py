"""Identity keys: the namespaced names under which memberships are stored.

One source of truth for the key format, shared by the request path (``request_keys``) and the
snapshot loader (``parse_key``), so a key written by an operator and a key read from a bid
request normalise the same way.
"""

from __future__ import annotations

from enrich_server.openrtb import BidRequest, eids, gpids

UID = "uid"
EID = "eid"
IFA = "ifa"
DOMAIN = "domain"
BUNDLE = "bundle"
GPID = "gpid"

USER_NAMESPACES = (UID, EID, IFA)
CONTEXT_NAMESPACES = (DOMAIN, BUNDLE, GPID)
NAMESPACES = USER_NAMESPACES + CONTEXT_NAMESPACES

#: LMDB's compiled-in key limit; a longer key can never be stored, so it is never looked up.
MAX_KEY_BYTES = 511

_ZERO_IFA_CHARS = "0-"


def is_zero_ifa(ifa: str) -> bool:
    """Whether an advertising id is all zeros (and dashes): no ad id, never a key."""
    return not ifa.strip(_ZERO_IFA_CHARS)


def request_keys(request: BidRequest) -> tuple[list[bytes], list[bytes]]:
    """Return the user-level and contextual keys of a request, each in lookup order.

    User-level: ``uid:``, then each ``eid:<source>:<id>``, then ``ifa:`` (unless limit-ad-tracking
    is set or the id is all zeros). Contextual: ``domain:``, ``bundle:``, then each ``gpid:``.
    Empty ids and keys LMDB could not hold are skipped; duplicates are kept out.
    """
    user_keys: list[bytes] = []
    user = request.user
    if user is not None:
        if user.id:
            _add(user_keys, "uid:" + user.id)
        for source, uid in eids(user):
            _add(user_keys, f"eid:{source.lower()}:{uid}")
    device = request.device
    if device is not None:
        ifa = device.ifa
        if ifa and device.lmt != 1 and ifa.strip(_ZERO_IFA_CHARS):
            _add(user_keys, "ifa:" + ifa.lower())
    context: list[bytes] = []
    site = request.site
    if site is not None and site.domain:
        _add(context, "domain:" + site.domain.lower())
    app = request.app
    if app is not None and app.bundle:
        _add(context, "bundle:" + app.bundle)
    for gpid in gpids(request.imp):
        _add(context, "gpid:" + gpid)
    return user_keys, context


def _add(keys: list[bytes], key: str) -> None:
    try:
        raw = key.encode()
    except UnicodeEncodeError:  # a lone surrogate: no stored key can match it
        return
    if len(raw) <= MAX_KEY_BYTES and raw not in keys:
        keys.append(raw)


def parse_key(text: str) -> bytes:
    """Validate and normalise a key as written in a snapshot or on the command line.

    Raises ``ValueError`` saying what is wrong.
    """
    namespace, sep, ident = text.partition(":")
    if not sep:
        raise ValueError(f"key {text!r} has no namespace (expected one of {', '.join(NAMESPACES)})")
    if namespace not in NAMESPACES:
        raise ValueError(
            f"unknown namespace {namespace!r} (expected one of {', '.join(NAMESPACES)})"
        )
    if not ident:
        raise ValueError(f"key {text!r} has an empty id")
    if namespace == EID:
        source, sep, uid = ident.partition(":")
        if not sep or not source or not uid:
            raise ValueError(f"eid key {text!r} must be eid:<source>:<id>")
        ident = f"{source.lower()}:{uid}"
    elif namespace in (IFA, DOMAIN):
        ident = ident.lower()
    raw = f"{namespace}:{ident}".encode()
    if len(raw) > MAX_KEY_BYTES:
        raise ValueError(f"key is longer than {MAX_KEY_BYTES} bytes")
    return raw
