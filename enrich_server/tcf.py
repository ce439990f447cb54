"""A decoder for the core segment of IAB TCF v2 consent strings (the part we act on).

No maintained TCF v2 decoder exists on PyPI, so this reads the core segment as the IAB spec
("Consent string and vendor list formats v2", "The core string") lays it out: fixed-width
fields, then the vendor consent and vendor legitimate-interest sections, each a bit field or
a list of ranges, then the publisher restrictions (per purpose: not allowed, require consent,
require legitimate interest, for vendor ranges). The other segments (disclosed vendors,
publisher purposes) do not bear on whether we may use a user's data, and are not read.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Final

# Core segment offsets, in bits.
_VERSION: Final = (0, 6)
_POLICY_VERSION: Final = (132, 6)
_SPECIAL_FEATURES: Final = (140, 12)
_PURPOSES_CONSENT: Final = (152, 24)
_PURPOSES_LI: Final = (176, 24)
_PURPOSE_ONE_TREATMENT: Final = (200, 1)
_VENDOR_SECTION: Final = 213


#: Publisher restriction types (``RestrictionType`` in the TCF core string).
NOT_ALLOWED: Final = 0
REQUIRE_CONSENT: Final = 1
REQUIRE_LI: Final = 2


class ConsentError(ValueError):
    """The string is not a TCF v2 consent string we can read."""


@dataclass(frozen=True, slots=True)
class TCString:
    """The decoded core segment: purposes, vendors, and the policy version that governs them."""

    version: int
    policy_version: int
    purpose_one_treatment: bool
    purposes_consent: frozenset[int]
    purposes_legitimate_interest: frozenset[int]
    special_features: frozenset[int]
    vendors_consent: frozenset[int]
    vendors_legitimate_interest: frozenset[int]


#: The longest TCF string we read, in characters. The standard sets none; real strings
#: (core segment with a bit field of every vendor, publisher restrictions, disclosed vendors)
#: stay under 4 KB. A longer one is unreadable, refused before any decoding.
MAX_CONSENT_CHARS: Final = 32_768

# base64url -> standard base64, and the standard-only characters made invalid, so that
# ``binascii`` (strict mode) accepts exactly the base64url alphabet.
_TO_STANDARD: Final = str.maketrans({"-": "+", "_": "/", "+": "!", "/": "!", "=": "!"})
_PADDING: Final = ("", "AAA", "AA", "A")


class Bits:
    """The bits of a base64url string, six a character, read at any bit offset.

    IAB strings are cut at any character (a length that standard base64 would call invalid),
    so the text is padded with zero sextets before decoding to bytes; ``size`` counts only the
    bits of the text. Decoding and each read are linear in their length (no big integer is
    built from the whole string).
    """

    __slots__ = ("_data", "size")

    def __init__(self, text: str, limit: int = MAX_CONSENT_CHARS) -> None:
        if len(text) > limit:
            raise ConsentError(f"longer than {limit} characters")
        try:
            self._data = binascii.a2b_base64(
                (text + _PADDING[len(text) % 4]).translate(_TO_STANDARD), strict_mode=True
            )
        except (binascii.Error, ValueError):
            raise ConsentError("not base64url") from None
        self.size = len(text) * 6

    def read(self, offset: int, width: int) -> int:
        """The ``width``-bit unsigned integer at bit ``offset``; raises if past the end."""
        end = offset + width
        if end > self.size:
            raise ConsentError("consent string is truncated")
        first, last = offset >> 3, (end + 7) >> 3
        chunk = int.from_bytes(self._data[first:last], "big")
        return (chunk >> ((last << 3) - end)) & ((1 << width) - 1)

    def head(self, width: int) -> int:
        """The first ``width`` bits as one unsigned integer; raises if there are fewer."""
        return self.read(0, width)

    def set_of(self, offset: int, width: int) -> frozenset[int]:
        """The 1-based positions of the bits set in the ``width`` bits at ``offset``."""
        field = self.read(offset, width)
        return frozenset(i + 1 for i in range(width) if field >> (width - 1 - i) & 1)


def _core(consent: str) -> str:
    """The core segment of a TC string; the length limit is checked before any copy."""
    if len(consent) > MAX_CONSENT_CHARS:
        raise ConsentError(f"longer than {MAX_CONSENT_CHARS} characters")
    return consent.split(".", 1)[0].strip()


def _vendor_ranges(bits: Bits, offset: int) -> tuple[int, list[tuple[int, int]] | None, int]:
    """Read a vendor section's header: (max vendor id, ranges or ``None`` for a bit field,
    offset of its bit field or of the next section)."""
    max_vendor = bits.read(offset, 16)
    offset += 16
    if not bits.read(offset, 1):
        return max_vendor, None, offset + 1
    entries = bits.read(offset + 1, 12)
    offset += 13
    ranges: list[tuple[int, int]] = []
    for _ in range(entries):
        is_range = bits.read(offset, 1)
        start = bits.read(offset + 1, 16)
        offset += 17
        end = start
        if is_range:
            end = bits.read(offset, 16)
            offset += 16
        if end < start or end > max_vendor:
            raise ConsentError("vendor range out of order or past the maximum vendor id")
        ranges.append((start, end))
    return max_vendor, ranges, offset


def _vendor_has(bits: Bits, offset: int, vendor: int) -> tuple[bool, int]:
    """Whether the vendor section at ``offset`` lists ``vendor``; and the next offset."""
    max_vendor, ranges, offset = _vendor_ranges(bits, offset)
    if ranges is None:  # a bit field, one bit per vendor id
        found = 1 <= vendor <= max_vendor and bool(bits.read(offset + vendor - 1, 1))
        return found, offset + max_vendor
    return any(start <= vendor <= end for start, end in ranges), offset


class CoreView:
    """The fields of a core segment the privacy policy reads, decoded on demand.

    A full decode builds every vendor set (50-70 us); a policy needs two purpose bit masks
    and at most one vendor's bits, which this reads straight from the bit string.
    """

    __slots__ = ("_bits", "policy_version", "purposes_consent", "purposes_li")

    def __init__(self, consent: str) -> None:
        self._bits = Bits(_core(consent))
        version = self._bits.read(*_VERSION)
        if version != 2:
            raise ConsentError(f"TCF version {version}, not 2")
        self.policy_version = self._bits.read(*_POLICY_VERSION)
        self.purposes_consent = self._bits.read(*_PURPOSES_CONSENT)
        self.purposes_li = self._bits.read(*_PURPOSES_LI)

    def purpose_consent(self, purpose: int) -> bool:
        """Whether purpose ``purpose`` (1-24) has the user's consent."""
        return bool(self.purposes_consent >> (24 - purpose) & 1)

    def purpose_li(self, purpose: int) -> bool:
        """Whether purpose ``purpose`` (1-24) is established by legitimate interest."""
        return bool(self.purposes_li >> (24 - purpose) & 1)

    def vendor(self, vendor: int) -> tuple[bool, bool]:
        """(consent, legitimate interest) of ``vendor``; raises ``ConsentError`` if truncated."""
        consented, offset = _vendor_has(self._bits, _VENDOR_SECTION, vendor)
        li, _ = _vendor_has(self._bits, offset, vendor)
        return consented, li

    def restrictions(self, vendor: int) -> dict[int, int]:
        """The publisher's restrictions on ``vendor``: purpose -> restriction type.

        Raises ``ConsentError`` if the string is truncated.
        """
        _, offset = _vendor_has(self._bits, _VENDOR_SECTION, vendor)
        _, offset = _vendor_has(self._bits, offset, vendor)
        bits = self._bits
        found: dict[int, int] = {}
        count = bits.read(offset, 12)
        offset += 12
        for _ in range(count):
            purpose, kind, entries = (
                bits.read(offset, 6),
                bits.read(offset + 6, 2),
                bits.read(offset + 8, 12),
            )
            offset += 20
            for _ in range(entries):
                is_range, start = bits.read(offset, 1), bits.read(offset + 1, 16)
                offset += 17
                end = start
                if is_range:
                    end = bits.read(offset, 16)
                    offset += 16
                if start <= vendor <= end:
                    found[purpose] = kind
        return found


def _vendor_section(bits: Bits, offset: int) -> tuple[frozenset[int], int]:
    """One vendor section (bit field or ranges); returns the vendor ids and the next offset."""
    max_vendor, ranges, offset = _vendor_ranges(bits, offset)
    if ranges is None:
        return bits.set_of(offset, max_vendor), offset + max_vendor
    return frozenset(v for start, end in ranges for v in range(start, end + 1)), offset


def decode(consent: str) -> TCString:
    """Decode the core segment of a TCF v2 string; raises ``ConsentError`` if it is not one."""
    bits = Bits(_core(consent))
    version = bits.read(*_VERSION)
    if version != 2:
        raise ConsentError(f"TCF version {version}, not 2")
    vendors_consent, offset = _vendor_section(bits, _VENDOR_SECTION)
    vendors_li, _ = _vendor_section(bits, offset)
    return TCString(
        version=version,
        policy_version=bits.read(*_POLICY_VERSION),
        purpose_one_treatment=bool(bits.read(*_PURPOSE_ONE_TREATMENT)),
        purposes_consent=bits.set_of(*_PURPOSES_CONSENT),
        purposes_legitimate_interest=bits.set_of(*_PURPOSES_LI),
        special_features=bits.set_of(*_SPECIAL_FEATURES),
        vendors_consent=vendors_consent,
        vendors_legitimate_interest=vendors_li,
    )
