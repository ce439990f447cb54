"""``POST /ortb``: the answer in OpenRTB's own shape, for Prebid Server modules.

The same request, keys, privacy and store as ``/enrich``; the segments come back as
``user.data`` entries (OpenRTB 2.6 section 3.2.21 ``Data`` and 3.2.22 ``Segment``), one entry
per segment taxonomy: ``[ortb] segtax`` maps a segment-name prefix to its IAB ``segtax``
(longest prefix wins), and segments matching no prefix share one entry without it.
"""

from __future__ import annotations

from typing import Final

import msgspec

from enrich_server.config import OrtbConfig
from enrich_server.enrich import Answer, EnrichEndpoint
from enrich_server.openrtb import decode

_HEAD: Final = b'{"user":{"data":['
_TAIL: Final = b"]}}"
EMPTY_ORTB: Final = _HEAD + _TAIL


class UserData:
    """Builds the ``user.data`` answer from the JSON-encoded segment names of a lookup."""

    def __init__(self, config: OrtbConfig) -> None:
        # Prefixes are compared, JSON-encoded, with the JSON-encoded name after its opening
        # quote: an escaped character matches its escape.
        encoded = [(msgspec.json.encode(p)[1:-1], tax) for p, tax in config.segtax.items()]
        self._prefixes = sorted(encoded, key=lambda item: -len(item[0]))
        encode = msgspec.json.encode
        self._entry_heads = {
            segtax: b'{"id":' + encode(config.data_name) + b',"name":' + encode(config.data_name)
            + (b',"ext":{"segtax":%d}' % segtax if segtax else b"") + b',"segment":['
            for segtax in {0, *config.segtax.values()}
        }  # fmt: skip

    def segtax(self, segment_json: bytes) -> int:
        """The segtax of one JSON-encoded segment name (0: none configured for it)."""
        for prefix, segtax in self._prefixes:
            if segment_json.startswith(prefix, 1):
                return segtax
        return 0

    def body(self, segments_json: list[bytes]) -> bytes:
        """The whole answer for ``segments_json`` (``b'"name"'`` each), in their order."""
        if not segments_json:
            return EMPTY_ORTB
        groups: dict[int, list[bytes]] = {}
        for segment in segments_json:
            groups.setdefault(self.segtax(segment), []).append(b'{"id":' + segment + b"}")
        entries = [self._entry_heads[segtax] + b",".join(items) + b"]}"
                   for segtax, items in groups.items()]  # fmt: skip
        return _HEAD + b",".join(entries) + _TAIL


def ortb_answer(endpoint: EnrichEndpoint, config: OrtbConfig) -> Answer:
    """The ``/ortb`` answer: a body decoded and looked up as ``/enrich`` does, as user.data."""
    user_data = UserData(config)
    lookup = endpoint.lookup

    def answer(body: bytes) -> tuple[bytes, bytes]:
        cache, segments = lookup(decode(body))
        return cache, user_data.body(segments)

    return answer
