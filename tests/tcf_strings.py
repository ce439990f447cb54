"""Build TCF v2 core strings for tests: the purposes and vendors a test needs, nothing else.

Real strings from published test suites check the decoder (tests/test_tcf.py); these check
the policy built on it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable


def _bitfield(ids: Iterable[int], width: int) -> str:
    chosen = set(ids)
    return "".join("1" if i in chosen else "0" for i in range(1, width + 1))


def _vendors(ids: Iterable[int]) -> str:
    chosen = sorted(set(ids))
    top = chosen[-1] if chosen else 0
    return f"{top:016b}0" + _bitfield(chosen, top)


def _restrictions(restrictions: list[tuple[int, int, tuple[int, int]]]) -> str:
    bits = f"{len(restrictions):012b}"
    for purpose, kind, (first, last) in restrictions:
        bits += f"{purpose:06b}{kind:02b}{1:012b}"
        bits += f"1{first:016b}{last:016b}" if last != first else f"0{first:016b}"
    return bits


def core_string(
    purposes_consent: Iterable[int] = (),
    purposes_li: Iterable[int] = (),
    vendors_consent: Iterable[int] = (),
    vendors_li: Iterable[int] = (),
    *,
    policy_version: int = 2,
    restrictions: Iterable[tuple[int, int, tuple[int, int]]] = (),
) -> str:
    """A TCF v2 core segment (base64url, unpadded) with the given purposes and vendors, and
    publisher restrictions as (purpose, type, (first vendor, last vendor))."""
    bits = (
        f"{2:06b}{0:036b}{0:036b}{7:012b}{1:012b}{1:06b}{0:012b}{100:012b}"
        f"{policy_version:06b}00{0:012b}"
        + _bitfield(purposes_consent, 24)
        + _bitfield(purposes_li, 24)
        + f"0{0:012b}"
        + _vendors(vendors_consent)
        + _vendors(vendors_li)
        + _restrictions(list(restrictions))
    )
    bits += "0" * (-len(bits) % 8)
    data = int(bits, 2).to_bytes(len(bits) // 8, "big")
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


#: Purposes 1, 3 and 4 consented, no vendor restriction: what the default policy asks for.
CONSENTED = core_string(purposes_consent=(1, 2, 3, 4), vendors_consent=(1, 2, 3))
