"""IAB Global Privacy Platform strings (``regs.gpp`` with ``regs.gpp_sid``), as far as we act.

A GPP string is ``header~section~section...``. The header (base64url bits) holds a type (3),
a version, and the ids of the sections that follow, as a Fibonacci-coded range list. We read
the opt-outs of the US sections (the 2-bit fields ``SaleOptOut``, ``SharingOptOut`` and
``TargetedAdvertisingOptOut``: 1 = opted out), hand the EU TCF section (id 2) to the TCF
policy and the US Privacy section (id 6) to the US Privacy rule.
"""

from __future__ import annotations

from typing import Final

from enrich_server.tcf import ConsentError, base64url_bits

TCF_EU: Final = 2
US_PRIVACY: Final = 6

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


def _bits(encoded: str) -> str:
    core = encoded.split(".", 1)[0]
    try:
        value, size = base64url_bits(core)
    except ConsentError as exc:
        raise GppError(str(exc)) from None
    return f"{value:0{size}b}" if size else ""


def _fibonacci(bits: str, at: int) -> tuple[int, int]:
    """A Fibonacci-coded integer at ``at`` (ends with two 1 bits); returns (value, next)."""
    value, fib_prev, fib = 0, 1, 1  # bit i weighs F(i + 2): 1, 2, 3, 5, 8, ...
    previous = "0"
    while at < len(bits):
        bit = bits[at]
        at += 1
        if bit == "1" and previous == "1":
            return value, at
        if bit == "1":
            value += fib
        fib_prev, fib = fib, fib_prev + fib
        previous = bit
    raise GppError("Fibonacci integer not terminated")


def section_ids(header: str) -> list[int]:
    """The section ids listed by a GPP header, in order."""
    bits = _bits(header)
    if len(bits) < 24 or int(bits[0:6], 2) != _HEADER_TYPE:
        raise GppError("not a GPP header")
    entries = int(bits[12:24], 2)
    at = 24
    ids: list[int] = []
    last = 0
    for _ in range(entries):
        if at >= len(bits):
            raise GppError("header truncated")
        is_range = bits[at] == "1"
        delta, at = _fibonacci(bits, at + 1)
        start = last + delta
        end = start
        if is_range:
            span, at = _fibonacci(bits, at)
            end = start + span
        ids.extend(range(start, end + 1))
        last = end
    return ids


def parse(gpp: str) -> dict[int, str]:
    """Map each section id to its encoded section; raises ``GppError``."""
    header, *sections = gpp.strip().split("~")
    ids = section_ids(header)
    if len(ids) != len(sections):
        raise GppError(f"header lists {len(ids)} sections, string has {len(sections)}")
    return dict(zip(ids, sections, strict=True))


def us_opted_out(section_id: int, section: str) -> bool:
    """Whether a US section says the user opted out of sale, sharing or targeted ads."""
    bits = _bits(section)
    offsets = US_OPT_OUT_OFFSETS[section_id]
    if len(bits) < offsets[-1] + 2:
        raise GppError(f"section {section_id} truncated")
    return any(int(bits[o : o + 2], 2) == _OPTED_OUT for o in offsets)
