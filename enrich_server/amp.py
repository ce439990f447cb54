"""``GET /rtc``: AMP Real-Time Config (amp.dev, "AMP RTC": the page's amp-ad calls up to five
vendor URLs with its macros substituted, and merges each answer's ``targeting`` into the ad
request).

The query string is read into the same ``BidRequest`` an ``/enrich`` body decodes to, so keys,
privacy and store are the ones ``/enrich`` uses. Parameters (each optional; name them in the
vendor URL template with the AMP macro that fills them):

| parameter | AMP macro (example) | read as |
|---|---|---|
| ``uid`` | ``CLIENT_ID(_enrich_uid)`` or a publisher id | ``user.id`` |
| ``ifa`` / ``lmt`` | | ``device.ifa`` / ``device.lmt`` |
| ``domain`` / ``url`` | ``CANONICAL_URL`` (its host is the domain) | ``site.domain`` |
| ``gdpr`` | ``CONSENT_METADATA(gdprApplies)`` | ``regs.gdpr`` |
| ``consent`` | ``CONSENT_STRING`` | ``user.consent`` |
| ``us_privacy``, ``gpp``, ``gpp_sid``, ``coppa`` | as the CMP and page set them | ``regs.*`` |

AMP calls RTC vendors over HTTPS only: terminate TLS in front of the server (an ingress or
load balancer), as for any caller beyond loopback. At most ``MAX_PARAMETERS`` parameters are
read; a value that does not convert (``gdpr=x``) is ignored like a wrong type in a body.
"""

from __future__ import annotations

from typing import Final
from urllib.parse import unquote_plus, urlsplit

from enrich_server.config import RtcConfig
from enrich_server.enrich import Answer, EnrichEndpoint
from enrich_server.openrtb import BidRequest, Device, Regs, Site, User

#: Parameters read from one query string; the rest are ignored (an RTC URL has a handful).
MAX_PARAMETERS: Final = 32

EMPTY_TARGETING: Final = b'{"targeting":{}}'


def request_from_query(query: bytes) -> BidRequest:
    """The ``BidRequest`` an RTC call's query string stands for."""
    values: dict[str, str] = {}
    for pair in query.split(b"&", MAX_PARAMETERS)[:MAX_PARAMETERS]:  # the rest never split
        name, _, value = pair.partition(b"=")
        if value:
            values.setdefault(_text(name), _text(value))
    get = values.get
    uid, consent = get("uid"), get("consent")
    user = User(id=uid, consent=consent) if uid or consent else None
    ifa = get("ifa")
    device = Device(ifa=ifa, lmt=_int(get("lmt"))) if ifa else None
    domain = get("domain") or _host(get("url"))
    site = Site(domain=domain) if domain else None
    regs = Regs(
        coppa=_int(get("coppa")), gdpr=_int(get("gdpr")), us_privacy=get("us_privacy"),
        gpp=get("gpp"), gpp_sid=_ints(get("gpp_sid")),
    )  # fmt: skip
    return BidRequest(user=user, device=device, site=site, regs=regs)


class Targeting:
    """Builds the RTC answer, ``{"targeting": {<key>: [segments]}}``."""

    def __init__(self, key: str) -> None:
        self._head = b'{"targeting":{"' + key.encode() + b'":['

    def body(self, segments_json: list[bytes]) -> bytes:
        """The whole answer for ``segments_json`` (``b'"name"'`` each)."""
        if not segments_json:
            return EMPTY_TARGETING
        return self._head + b",".join(segments_json) + b"]}}"


def _text(raw: bytes) -> str:
    """A query-string name or value, percent-decoded as UTF-8 (bad bytes replaced)."""
    return unquote_plus(raw.decode("latin-1"), errors="replace")


def _int(value: str | None) -> int | None:
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 9:
        return None
    return int(value)


def _ints(value: str | None) -> list[int] | None:
    if not value:
        return None
    numbers = [_int(part) for part in value.split(",", MAX_PARAMETERS)[:MAX_PARAMETERS]]
    return [n for n in numbers if n is not None]


def _host(url: str | None) -> str | None:
    if not url:
        return None
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def rtc_answer(endpoint: EnrichEndpoint, config: RtcConfig) -> Answer:
    """The ``/rtc`` answer: a query string read and looked up as ``/enrich`` does."""
    targeting = Targeting(config.targeting_key)
    lookup = endpoint.lookup

    def answer(query: bytes) -> tuple[bytes, bytes]:
        cache, segments = lookup(request_from_query(query))
        return cache, targeting.body(segments)

    return answer
