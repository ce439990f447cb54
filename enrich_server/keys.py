"""Identity keys: the namespaced names under which memberships are stored.

One source of truth for the key format, shared by the request path (``request_keys``) and the
snapshot loader (``parse_key``), so a key written by an operator and a key read from a bid
request normalise the same way.
"""

from __future__ import annotations

from enrich_server.openrtb import RequestView

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


def _is_zero_ifa(ifa: str) -> bool:
    return not ifa.strip(_ZERO_IFA_CHARS)


def _encode(key: str) -> bytes | None:
    raw = key.encode("utf-8", "surrogatepass")
    return raw if len(raw) <= MAX_KEY_BYTES else None


def request_keys(view: RequestView) -> tuple[list[bytes], list[bytes]]:
    """Return the user-level and contextual keys of a request, each in lookup order.

    User-level: ``uid:``, then each ``eid:<source>:<id>``, then ``ifa:`` (unless limit-ad-tracking
    is set or the id is all zeros). Contextual: ``domain:``, ``bundle:``, then each ``gpid:``.
    Empty ids and keys LMDB could not hold are skipped; duplicates are kept out.
    """
    user: list[bytes] = []
    if view.user_id:
        _add(user, f"uid:{view.user_id}")
    for source, uid in view.eids:
        if source and uid:
            _add(user, f"eid:{source.lower()}:{uid}")
    ifa = view.ifa
    if ifa and view.lmt != 1 and not _is_zero_ifa(ifa):
        _add(user, f"ifa:{ifa.lower()}")
    context: list[bytes] = []
    if view.domain:
        _add(context, f"domain:{view.domain.lower()}")
    if view.bundle:
        _add(context, f"bundle:{view.bundle}")
    for gpid in view.gpids:
        if gpid:
            _add(context, f"gpid:{gpid}")
    return user, context


def _add(keys: list[bytes], key: str) -> None:
    raw = _encode(key)
    if raw is not None and raw not in keys:
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
    raw = _encode(f"{namespace}:{ident}")
    if raw is None:
        raise ValueError(f"key is longer than {MAX_KEY_BYTES} bytes")
    return raw
