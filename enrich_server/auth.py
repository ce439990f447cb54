"""Who may call ``/enrich`` (tokens, OAuth2 client credentials, client-IP allow-lists), and
which DMP platform pushes to the ingestion API (``PlatformCredentials``).

Seed 003 ("Authentication"): Index supports OAuth, a token in the query string, a token in a
request header, and IP ranges for allow-listing. Built once from ``AuthConfig``:

* a **token** in the configured header or query parameter, or an **OAuth2 bearer token**
  issued by ``POST /oauth/token`` (client credentials, HTTP Basic): any one valid credential
  is enough (401 otherwise);
* a **client-IP allow-list** of IPv4/IPv6 networks on top (403 otherwise).
  ``X-Forwarded-For`` is read only when the direct peer is a configured trusted proxy, and
  then the right-most address that is not a trusted proxy is the client.

Access tokens are ``v1.<payload>.<signature>``: base64url JSON ``{"sub", "exp"}`` signed with
HMAC-SHA256 by the first of ``oauth_keys``; every key verifies, so keys rotate without a
failed call. Verification needs no I/O, and a verified token is remembered until it expires.
Every comparison of a secret is constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final

import msgspec

from enrich_server.config import AuthConfig, PlatformConfig

#: What a check reads of a call: ``headers``, ``query_string`` and ``client`` (an ASGI HTTP
#: scope has them; so does the mapping the HTTP protocol's fast lane builds).
CallScope = Mapping[str, Any]

NO_CREDENTIALS: Final = "no_credentials"
BAD_CREDENTIALS: Final = "bad_credentials"
IP_NOT_ALLOWED: Final = "ip_not_allowed"
#: Every rejection reason, for metrics labels (a bounded set).
REASONS: Final = (NO_CREDENTIALS, BAD_CREDENTIALS, IP_NOT_ALLOWED)

_TOKEN_PREFIX: Final = b"v1."
_MAX_REMEMBERED: Final = 10_000
_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Rejection(msgspec.Struct, frozen=True):
    """Why a call was refused: HTTP status, metrics reason, message for the client."""

    status: int
    reason: str
    message: str


class _Claims(msgspec.Struct):
    sub: str
    exp: int


_CLAIMS_DECODER: Final = msgspec.json.Decoder(_Claims)


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def _unb64(data: bytes) -> bytes:
    return base64.urlsafe_b64decode(data + b"=" * (-len(data) % 4))


class TokenSigner:
    """Issues and verifies OAuth access tokens with rotating HMAC keys."""

    def __init__(self, keys: Sequence[str], ttl: int) -> None:
        self._keys = [key.encode() for key in keys]
        self.ttl = ttl
        self._verified: dict[bytes, int] = {}

    def issue(self, client_id: str, now: float | None = None) -> str:
        """A signed access token for ``client_id``, valid for ``ttl`` seconds."""
        issued = int(time.time() if now is None else now)
        payload = _b64(msgspec.json.encode(_Claims(sub=client_id, exp=issued + self.ttl)))
        signed = _TOKEN_PREFIX + payload
        signature = _b64(hmac.new(self._keys[0], signed, hashlib.sha256).digest())
        return (signed + b"." + signature).decode()

    def verify(self, token: bytes, now: float) -> bool:
        """Whether ``token`` was signed by one of the keys and has not expired."""
        expires = self._verified.get(token)
        if expires is not None:
            return now < expires
        signed, _, signature = token.rpartition(b".")
        if not signed.startswith(_TOKEN_PREFIX):
            return False
        valid = False
        for key in self._keys:  # no early exit: the time taken says nothing about the keys
            expected = _b64(hmac.new(key, signed, hashlib.sha256).digest())
            valid |= hmac.compare_digest(expected, signature)
        if not valid:
            return False
        try:
            claims = _CLAIMS_DECODER.decode(_unb64(signed[len(_TOKEN_PREFIX) :]))
        except (binascii.Error, ValueError, msgspec.DecodeError):
            return False
        if len(self._verified) >= _MAX_REMEMBERED:
            self._verified.clear()
        self._verified[token] = claims.exp
        return now < claims.exp


class EndpointAuth:
    """The checks configured for ``/enrich``; ``check`` returns ``None`` when a call may pass."""

    def __init__(self, config: AuthConfig) -> None:
        self._tokens = [token.encode() for token in config.tokens]
        self._header = config.header.lower().encode() if config.header and self._tokens else b""
        self._query = config.query.encode() + b"=" if config.query and self._tokens else b""
        self.signer = (
            TokenSigner(config.oauth_keys, config.oauth_ttl) if config.oauth_keys else None
        )
        self._needs_credentials = bool(self._header or self._query or self.signer)
        self._networks = [ipaddress.ip_network(c, strict=False) for c in config.allow_cidrs]
        self._proxies = [ipaddress.ip_network(c, strict=False) for c in config.trusted_proxies]
        self._allowed_addresses: dict[str, bool] = {}

    @property
    def enabled(self) -> bool:
        """Whether any check is configured (an open endpoint skips ``check`` entirely)."""
        return self._needs_credentials or bool(self._networks)

    def check(self, scope: CallScope) -> Rejection | None:
        """Check one call; ``None`` means it may pass."""
        presented = b""
        bearer = b""
        forwarded = b""
        for name, value in scope["headers"]:
            if name == self._header:
                presented = value
            elif name == b"authorization" and value[:7].lower() == b"bearer ":
                bearer = value[7:].strip()
            elif name == b"x-forwarded-for":
                forwarded = value
        if self._networks and not self._address_allowed(scope, forwarded):
            return Rejection(403, IP_NOT_ALLOWED, "client address not allowed")
        if not self._needs_credentials:
            return None
        if not presented and self._query:
            presented = self._from_query(scope["query_string"])
        if presented and self._token_valid(presented):
            return None
        if bearer and self.signer is not None and self.signer.verify(bearer, time.time()):
            return None
        if presented or bearer:
            return Rejection(401, BAD_CREDENTIALS, "invalid or expired credentials")
        return Rejection(401, NO_CREDENTIALS, "credentials required")

    def _token_valid(self, presented: bytes) -> bool:
        valid = False
        for token in self._tokens:  # no early exit: timing reveals nothing about the tokens
            valid |= hmac.compare_digest(presented, token)
        return valid

    def _from_query(self, query: bytes) -> bytes:
        for part in query.split(b"&"):
            if part.startswith(self._query):
                return urllib.parse.unquote_to_bytes(part[len(self._query) :])
        return b""

    def client_address(self, scope: CallScope, forwarded: bytes) -> str | None:
        """The caller's address: the peer, or from ``X-Forwarded-For`` behind a trusted proxy."""
        client = scope.get("client")
        if not client:
            return None
        address: str = client[0]
        if not forwarded or not self._trusted(address):
            return address
        for entry in reversed(forwarded.decode("latin-1").split(",")):
            hop = entry.strip()
            if not self._trusted(hop):
                return hop
            address = hop
        return address

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._proxies)

    def _address_allowed(self, scope: CallScope, forwarded: bytes) -> bool:
        address = self.client_address(scope, forwarded)
        if address is None:
            return False
        allowed = self._allowed_addresses.get(address)
        if allowed is None:
            try:
                ip = ipaddress.ip_address(address)
                allowed = any(ip in network for network in self._networks)
            except ValueError:
                allowed = False  # a garbled X-Forwarded-For entry: not an allowed client
            if len(self._allowed_addresses) >= _MAX_REMEMBERED:
                self._allowed_addresses.clear()
            self._allowed_addresses[address] = allowed
        return allowed


class ClientCredentials:
    """``POST /oauth/token`` clients: id -> secret, compared in constant time."""

    def __init__(self, clients: dict[str, str]) -> None:
        self._clients = {cid.encode(): secret.encode() for cid, secret in clients.items()}

    def authenticate(self, authorization: str) -> str | None:
        """The client id of a valid ``Basic`` authorization header, else ``None``."""
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        client_id, sep, secret = decoded.partition(b":")
        expected = self._clients.get(urllib.parse.unquote_to_bytes(client_id))
        # compare even when the id is unknown, so timing does not reveal which ids exist
        valid = hmac.compare_digest(
            urllib.parse.unquote_to_bytes(secret), expected if expected is not None else b"\0" * 32
        )
        if not sep or expected is None or not valid:
            return None
        return urllib.parse.unquote_to_bytes(client_id).decode("utf-8", "replace")


class PlatformCredentials:
    """DMP ingestion credentials: HTTP Basic ``user:password`` or bearer tokens, each naming
    one platform. Separate from the ``/enrich`` credentials: a DMP's key cannot query us.

    Credentials are looked up by their SHA-256: a dict probe on a digest tells an attacker
    nothing about how close a guess came (the role ``compare_digest`` plays elsewhere).
    """

    def __init__(self, platforms: Iterable[PlatformConfig]) -> None:
        self._by_digest: dict[bytes, PlatformConfig] = {}
        for platform in platforms:
            if platform.basic:
                self._by_digest[_digest(b"basic", platform.basic.encode())] = platform
            for token in platform.tokens:
                self._by_digest[_digest(b"bearer", token.encode())] = platform

    def authenticate(self, authorization: str) -> PlatformConfig | None:
        """The platform of a valid ``Authorization`` header, else ``None``."""
        scheme, _, credential = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            try:
                raw = base64.b64decode(credential.strip(), validate=True)
            except (binascii.Error, ValueError):
                return None
            return self._by_digest.get(_digest(b"basic", raw))
        if scheme == "bearer":
            return self._by_digest.get(_digest(b"bearer", credential.strip().encode()))
        return None


def _digest(kind: bytes, credential: bytes) -> bytes:
    return hashlib.sha256(kind + b"\0" + credential).digest()
