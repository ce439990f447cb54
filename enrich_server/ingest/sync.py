"""User sync: our user id cookie, redirect targets that cannot be turned into an open
redirect, and the HMAC-SHA1 signatures of signed ``/sync`` and ``/uid`` calls.

Pure functions and small classes, no HTTP: ``dmp_api`` wires them to requests.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final

#: The macro a sync target carries where our user id goes, raw or percent-encoded.
USERID_MACRO: Final = re.compile(r"\[\[USERID\]\]|%5B%5BUSERID%5D%5D", re.IGNORECASE)
#: Our user ids: ``secrets.token_urlsafe(16)``; a cookie of another shape is not ours.
_OUR_ID: Final = re.compile(r"[A-Za-z0-9_-]{16,64}")
_ID_BYTES: Final = 16
#: A synced platform's user id: printable, no spaces, bounded (LMDB keys are at most 511 B).
MAX_THEIR_ID_BYTES: Final = 256
#: Signatures remembered to refuse a replayed signed call (per process).
_SEEN_SIGNATURES: Final = 100_000
_UNRESERVED: Final = "-._~"
_MAX_TS: Final = 2**32 - 1


def whole_number(text: str, most: int) -> int | None:
    """``text`` as an integer in 0..``most`` when it is plain ASCII digits, else ``None``
    (``"²".isdigit()`` is true, and a 5000-digit string is too slow to convert)."""
    if not text or len(text) > len(str(most)) or not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value <= most else None


def our_user_id(cookie: str | None) -> tuple[str, bool]:
    """Our user id from the cookie's value, or a new one: ``(id, new)``."""
    if cookie and _OUR_ID.fullmatch(cookie):
        return cookie, False
    return secrets.token_urlsafe(_ID_BYTES), True


def user_cookie(name: str, user_id: str, max_age: int) -> str:
    """The ``Set-Cookie`` value carrying our user id to third-party contexts (sync pixels
    load cross-site, so ``SameSite=None``, which browsers accept only with ``Secure``)."""
    return f"{name}={user_id}; Max-Age={max_age}; Path=/; Secure; HttpOnly; SameSite=None"


def their_id_problem(userid: str) -> str | None:
    """What is wrong with a platform's user id (``/uid?userid=``), if anything."""
    if not userid:
        return "userid is missing"
    if not userid.isprintable() or any(c.isspace() for c in userid):
        return "userid has spaces or control characters"
    if len(userid.encode()) > MAX_THEIR_ID_BYTES:
        return f"userid is longer than {MAX_THEIR_ID_BYTES} bytes"
    return None


def raw_sync_target(raw_query: str) -> str | None:
    """The ``out`` of an unsigned ``/sync``, read the way sync templates are written.

    The seed's template puts the target unencoded at the end of the query
    (``/sync?out=https://host/uid?userid=[[USERID]]&pl=1&plsec=x``), so its own ``&``-joined
    parameters belong to it: ``out`` is everything after ``out=``. A target that was
    percent-encoded as a whole (no literal ``://``) is decoded once.
    """
    if not raw_query.startswith("out="):
        return None
    out = raw_query[4:]
    return out if "://" in out else urllib.parse.unquote(out)


def redirect_problem(out: str, hosts: Iterable[str]) -> str | None:
    """Why ``out`` is not a safe redirect to one of ``hosts``; ``None`` when it is.

    Only ``http(s)://host[:port]/…`` with the host exactly on the allow-list passes: no
    user info (``https://allowed@evil``), no percent-encoded or backslashed host, no
    scheme-relative (``//evil``) or single-slash forms, no control characters or spaces
    (browsers strip some of them and would read another URL than we checked).
    """
    if not out:
        return "out is missing"
    if not out.isascii() or any(not c.isprintable() or c.isspace() or c == "\\" for c in out):
        return "out has spaces, control, backslash or non-ASCII characters"
    scheme, sep, rest = out.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return "out must start with http:// or https://"
    netloc = rest.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    if "@" in netloc or "%" in netloc:
        return "out must not carry user info or an encoded host"
    netloc = netloc.lower()
    host, colon, port = netloc.rpartition(":") if ":" in netloc else (netloc, "", "")
    if colon and not whole_number(port, 65535):
        return "out has a bad port"
    if host not in set(hosts):
        return f"host {host!r} is not an allowed sync host"
    return None


def with_user_id(out: str, user_id: str) -> str:
    """``out`` with the ``[[USERID]]`` macro replaced (our ids need no URL encoding)."""
    return USERID_MACRO.sub(user_id, out)


def canonical_query(params: Iterable[tuple[str, str]]) -> bytes:
    """What a signature covers: every parameter but ``sig``, sorted, RFC 3986-encoded,
    ``name=value`` joined by ``&``. Both sides compute it from decoded values, so how a
    client happened to encode its URL does not matter."""
    pairs = sorted((k, v) for k, v in params if k != "sig")
    return "&".join(
        f"{urllib.parse.quote(k, safe=_UNRESERVED)}={urllib.parse.quote(v, safe=_UNRESERVED)}"
        for k, v in pairs
    ).encode()


def sign(secret: str, params: Iterable[tuple[str, str]]) -> str:
    """The HMAC-SHA1 signature (lower-case hex) of ``params`` with ``secret``."""
    return hmac.new(secret.encode(), canonical_query(params), hashlib.sha1).hexdigest()


class SignatureChecker:
    """Checks signed calls: the HMAC (constant time) and the timestamp within the window.
    (Replays of a state-changing call are refused by ``ReplayGuard``, in the one process
    that writes.)"""

    def __init__(self, window: int) -> None:
        self.window = window

    def problem(
        self, secret: str, params: list[tuple[str, str]], now: float | None = None
    ) -> str | None:
        """Why the signed ``params`` are refused, or ``None`` when they are good."""
        given = dict(params)
        ts = whole_number(given.get("ts", ""), _MAX_TS)
        if ts is None:
            return "signed calls need ts (unix seconds)"
        now = time.time() if now is None else now
        if abs(now - ts) > self.window:
            return f"ts is more than {self.window} s away from our clock"
        sig = given.get("sig", "").lower()
        if not hmac.compare_digest(sig.encode(), sign(secret, params).encode()):
            return "bad signature"
        return None


class ReplayError(Exception):
    """A signed call came a second time."""


class ReplayGuard:
    """Remembers the signatures used within the window: a signed ``/uid`` is applied once."""

    def __init__(self, window: int) -> None:
        self.window = window
        self._seen: OrderedDict[str, float] = OrderedDict()

    def first_use(self, signature: str, now: float | None = None) -> bool:
        """``True`` the first time ``signature`` is seen within the window."""
        now = time.time() if now is None else now
        seen = self._seen
        while seen and next(iter(seen.values())) < now - 2 * self.window:
            seen.popitem(last=False)  # older than any ts still inside the window
        if signature in seen:
            return False
        seen[signature] = now
        if len(seen) > _SEEN_SIGNATURES:
            seen.popitem(last=False)
        return True
