"""Build GPP strings for tests: a header listing section ids, and US sections with chosen
opt-outs. Real strings seen in traffic check the decoder too (tests/test_gpp.py)."""

from __future__ import annotations

import base64
import json

# Seen in a real bid request next to us_privacy "1YNY": US national, notices given, no opt-out.
REAL_USNAT = "DBABLA~BVQqAAAAAAJY.QA"


def base64url(bits: str) -> str:
    """A bit string as base64url text, zero-padded to whole characters (as IAB strings are)."""
    bits += "0" * (-len(bits) % 6)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return "".join(alphabet[int(bits[i : i + 6], 2)] for i in range(0, len(bits), 6))


def fibonacci_code(value: int) -> str:
    """``value`` (>= 1) Fibonacci-coded as GPP writes it: Zeckendorf bits, lowest weight
    (1, 2, 3, 5, ...) first, then the terminating 1."""
    fibs = [1, 2]
    while fibs[-1] <= value:
        fibs.append(fibs[-1] + fibs[-2])
    bits = ["0"] * len(fibs)
    for i in range(len(fibs) - 1, -1, -1):
        if fibs[i] <= value:
            bits[i] = "1"
            value -= fibs[i]
    return "".join(bits).rstrip("0") + "1"


def header(ids: list[int]) -> str:
    """A GPP header listing ``ids`` (one single-id entry each)."""
    bits = f"{3:06b}{1:06b}{len(ids):012b}"
    last = 0
    for section in ids:
        bits += "0" + fibonacci_code(section - last)
        last = section
    return base64url(bits)


def header_with_range(start: int, span: int) -> str:
    """A GPP header with one range entry: ids ``start`` to ``start + span``."""
    return base64url(f"{3:06b}{1:06b}{1:012b}1" + fibonacci_code(start) + fibonacci_code(span))


def gpp_body(gpp_value: str, sid: list[int] | None = None) -> bytes:
    """A bid request carrying ``regs.gpp`` (and ``regs.gpp_sid`` when given) and a user id."""
    regs: dict[str, object] = {"gpp": gpp_value}
    if sid is not None:
        regs["gpp_sid"] = sid
    return json.dumps({"regs": regs, "user": {"id": "u"}}).encode()


def us_section(opt_outs: dict[int, int], width: int = 72) -> str:
    """A US section (version 1) with 2-bit values at the given bit offsets, zero elsewhere
    (72 bits hold the longest core sub-section, usnat version 2)."""
    bits = ["0"] * width
    bits[5] = "1"  # version 1
    for offset, value in opt_outs.items():
        bits[offset : offset + 2] = list(f"{value:02b}")
    return base64url("".join(bits))


def gpp_string(sections: dict[int, str]) -> str:
    """``header~section~...`` for sections in id order."""
    ids = sorted(sections)
    return "~".join([header(ids), *(sections[i] for i in ids)])


def b64url(data: bytes) -> str:
    """base64url without padding (what GPP sections use)."""
    return base64.urlsafe_b64encode(data).decode().rstrip("=")
