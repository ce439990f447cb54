"""IAB Global Privacy Platform strings (``regs.gpp`` with ``regs.gpp_sid``), as far as we act.

A GPP string is ``header~section~section...``. The header (base64url bits) holds a type (3),
a version, and the ids of the sections that follow, as a Fibonacci-coded range list. We read
the opt-outs of the US sections (the 2-bit fields ``SaleOptOut``, ``SharingOptOut`` and
``TargetedAdvertisingOptOut``: 1 = opted out), hand the EU TCF section (id 2) to the TCF
policy and the US Privacy section (id 6) to the US Privacy rule.

Limits the standard does not set (a string past one is unreadable, refused before decoding):
``MAX_GPP_CHARS`` for the whole string, ``MAX_SECTION_ID`` for an id in the header (a
Fibonacci range could otherwise name 10^9 sections in 12 characters); the header may list no
more ids than the string carries sections, which is checked before a range is expanded.
"""

from __future__ import annotations

from typing import Final

from enrich_server.tcf import Bits, ConsentError

TCF_EU: Final = 2
US_PRIVACY: Final = 6

#: The longest GPP string we read, in characters: every section the IAB has published, with
#: a full TCF EU section, stays well under 16 KB.
MAX_GPP_CHARS: Final = 65_536
#: The largest section id we accept in a header (ids published so far end at 27).
MAX_SECTION_ID: Final = 4_095

#: Section id -> bit offsets of its opt-out fields (sale, sharing, targeted advertising),
#: from the IAB section specifications (each field Int(2), after a 6-bit version).
US_OPT_OUT_OFFSETS: Final[dict[int, tuple[int, ...]]] = {
    7: (18, 20, 22),  # usnat: 6 notices, then SaleOptOut, SharingOptOut, TargetedAdvertising
    8: (12, 14),  # usca: 3 notices, then SaleOptOut, SharingOptOut
    9: (12, 14),  # usva: 3 notices, then SaleOptOut, TargetedAdvertisingOptOut
    10: (12, 14),  # usco: same shape as Virginia
    11: (14, 16),  # usut: 4 notices, then SaleOptOut, TargetedAdvertisingOptOut
    12: (12, 14),  # usct: same shape as Virginia
}
_OPTED_OUT: Final = 1
_HEADER_TYPE: Final = 3


class GppError(ValueError):
    """The string is not a GPP string we can read."""


def _bits(encoded: str) -> Bits:
    try:
        return Bits(encoded.split(".", 1)[0], MAX_GPP_CHARS)
    except ConsentError as exc:
        raise GppError(str(exc)) from None


def _fibonacci(bits: Bits, at: int) -> tuple[int, int]:
    """A Fibonacci-coded integer at ``at`` (ends with two 1 bits); returns (value, next).

    Values past ``MAX_SECTION_ID`` are refused as soon as the code reaches them, so a long
    code costs a few dozen bit reads, never big-integer arithmetic.
    """
    value, fib_prev, fib = 0, 1, 1  # bit i weighs F(i + 2): 1, 2, 3, 5, 8, ...
    previous = 0
    while at < bits.size:
        bit = bits.read(at, 1)
        at += 1
        if bit and previous:
            return value, at
        if bit:
            value += fib
            if value > MAX_SECTION_ID:
                raise GppError(f"section id past {MAX_SECTION_ID}")
        fib_prev, fib = fib, fib_prev + fib
        previous = bit
    raise GppError("Fibonacci integer not terminated")


def section_ids(header: str, most: int = MAX_SECTION_ID) -> list[int]:
    """The section ids listed by a GPP header, in order; more than ``most`` is an error."""
    bits = _bits(header)
    try:
        if bits.size < 24 or bits.read(0, 6) != _HEADER_TYPE:
            raise GppError("not a GPP header")
        entries = bits.read(12, 12)
        at = 24
        ids: list[int] = []
        last = 0
        for _ in range(entries):
            is_range = bits.read(at, 1)
            delta, at = _fibonacci(bits, at + 1)
            start = last + delta
            end = start
            if is_range:
                span, at = _fibonacci(bits, at)
                end = start + span
            if end > MAX_SECTION_ID:
                raise GppError(f"section id past {MAX_SECTION_ID}")
            if len(ids) + end - start + 1 > most:
                raise GppError(f"header lists more than {most} sections")
            ids.extend(range(start, end + 1))
            last = end
    except ConsentError:
        raise GppError("header truncated") from None
    return ids


def parse(gpp: str) -> dict[int, str]:
    """Map each section id to its encoded section; raises ``GppError``."""
    if len(gpp) > MAX_GPP_CHARS:
        raise GppError(f"longer than {MAX_GPP_CHARS} characters")
    header, *sections = gpp.strip().split("~")
    ids = section_ids(header, len(sections))
    if len(ids) != len(sections):
        raise GppError(f"header lists {len(ids)} sections, string has {len(sections)}")
    return dict(zip(ids, sections, strict=True))


def us_opted_out(section_id: int, section: str) -> bool:
    """Whether a US section says the user opted out of sale, sharing or targeted ads."""
    bits = _bits(section)
    offsets = US_OPT_OUT_OFFSETS[section_id]
    if bits.size < offsets[-1] + 2:
        raise GppError(f"section {section_id} truncated")
    return any(bits.read(o, 2) == _OPTED_OUT for o in offsets)
