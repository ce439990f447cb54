"""IAB Global Privacy Platform strings (``regs.gpp`` with ``regs.gpp_sid``), as far as we act.

A GPP string is ``header~section~section...``. The header (base64url bits) holds a type (3),
a version, and the ids of the sections that follow, as a Fibonacci-coded range list. The EU
TCF section (id 2) goes to the TCF policy and the US Privacy section (id 6) to the US Privacy
rule; every US section the IAB has published (7-27, ``US_SECTIONS``) is read field by field
and normalised to the shape of the national section (``UsNational``), which the privacy
policy judges.

Limits the standard does not set (a string past one is unreadable, refused before decoding):
``MAX_GPP_CHARS`` for the whole string, ``MAX_SECTIONS`` sections, ``MAX_SECTION_ID`` for an
id in the header (a Fibonacci range could otherwise name 10^9 sections in 12 characters); the
header may list no more ids than the string carries sections, which is checked before a range
is expanded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from enrich_server.tcf import Bits, ConsentError

TCF_EU: Final = 2
US_PRIVACY: Final = 6

#: The longest GPP string we read, in characters: every section the IAB has published, with
#: a full TCF EU section, stays well under 16 KB.
MAX_GPP_CHARS: Final = 65_536
#: The largest section id we accept in a header (ids published so far end at 27).
MAX_SECTION_ID: Final = 4_095
#: The most sections a string (and ``regs.gpp_sid``) may list: each published id once, with
#: room for 20 more. Reading 4,095 sections' header codes alone took 11 ms.
MAX_SECTIONS: Final = 48

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
        if fib > MAX_SECTION_ID and not bit:  # only a 1 can follow, and it would be too big
            raise GppError(f"section id past {MAX_SECTION_ID}")
        previous = bit
    raise GppError("Fibonacci integer not terminated")


def section_ids(header: str, most: int = MAX_SECTION_ID) -> list[int]:
    """The section ids listed by a GPP header, in order; more than ``most`` is an error."""
    bits = _bits(header)
    try:
        if bits.size < 24 or bits.read(0, 6) != _HEADER_TYPE:
            raise GppError("not a GPP header")
        entries = bits.read(12, 12)
        if entries > most:  # each entry names at least one id
            raise GppError(f"header lists more than {most} sections")
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
    if gpp.count("~") > MAX_SECTIONS:
        raise GppError(f"more than {MAX_SECTIONS} sections")
    header, *sections = gpp.strip().split("~")
    ids = section_ids(header, len(sections))
    if len(ids) != len(sections):
        raise GppError(f"header lists {len(ids)} sections, string has {len(sections)}")
    return dict(zip(ids, sections, strict=True))


# --- US sections -------------------------------------------------------------------------
#
# Each US section is a core sub-section of fixed-width fields (a 6-bit version, then 2-bit
# values and lists of them), optionally followed by ``.`` and a GPC sub-section (2-bit type
# 1, then one bit) or, for Indiana, Kentucky and Rhode Island, a sensitive-data sub-section.
# The layouts are those of the IAB section specifications as the IAB reference encoder
# (@iabgpp/cmpapi 3.2) writes them. A section is normalised to the national shape as Prebid
# does (docs.prebid.org/features/mspa-usnat.html, prebid-server-java USMapped*GppReader):
# fields of the same name carry over, a field the state lacks is None, sensitive-data
# categories move to their national position, and a state's known-child values become
# (0, 0) when all are 0 and (1, 1) (no consent) otherwise, since a state string cannot say
# which national age band consented.

UsValues = dict[str, int | bool | tuple[int, ...]]
"""The fields of one US section as decoded, by their IAB names."""

#: National SensitiveDataProcessing positions (v2 has 16; v1 and the rules use 1-12).
NATIONAL_SENSITIVE: Final = 16
_GPC_SUBSECTION: Final = 1


@dataclass(frozen=True, slots=True)
class UsNational:
    """A US section in the shape of the national one (section 7): what the rules read.

    ``fields`` holds the scalar national fields the section has (absent = the state has no
    such field, Prebid's NULL); ``sensitive`` the 16 SensitiveDataProcessing positions;
    ``child`` the two KnownChildSensitiveDataConsents Prebid reads (13-16, under 13).
    """

    fields: dict[str, int]
    sensitive: tuple[int | None, ...]
    child: tuple[int | None, int | None]
    gpc: bool | None

    def get(self, name: str) -> int | None:
        """A scalar national field, or None when the section has none."""
        return self.fields.get(name)


@dataclass(frozen=True, slots=True)
class UsSection:
    """One US section: its layouts by version, sub-section, and normalisation."""

    name: str
    layouts: dict[int, tuple[tuple[str, int, int], ...]]
    """Version -> fields as (name, bit offset, count): count 0 is a 6-bit integer, 1 a 2-bit
    one, n > 1 a list of n 2-bit values."""
    subsection: str | None
    """``"gpc"``, ``"sensitive"`` (a SensitiveDataProcessing list of ``sensitive_count``)
    or None."""
    sensitive: tuple[tuple[int, ...], ...]
    """State SensitiveDataProcessing position i (0-based) -> national positions (1-based)."""
    renames: dict[str, str]
    national_child: bool = False
    """KnownChildSensitiveDataConsents is already in national order (section 7 itself)."""

    def needed_bits(self, version: int) -> int:
        """Bits the core sub-section of ``version`` occupies."""
        _, offset, count = self.layouts[version][-1]
        return offset + (6 if count == 0 else 2 * count)


def _layout(*fields: str) -> tuple[tuple[str, int, int], ...]:
    """Fields in order: ``Name:6`` (6-bit), ``Name`` (2-bit) or ``Name*n`` (n 2-bit values)."""
    out: list[tuple[str, int, int]] = []
    offset = 0
    for spec in fields:
        if spec.endswith(":6"):
            name, count, width = spec[:-2], 0, 6
        elif "*" in spec:
            name, n = spec.split("*")
            count, width = int(n), 2 * int(n)
        else:
            name, count, width = spec, 1, 2
        out.append((name, offset, count))
        offset += width
    return tuple(out)


def _moves(spec: str) -> tuple[tuple[int, ...], ...]:
    """``"9 10 1+2"``: state category 1 -> national 9, 2 -> 10, 3 -> national 1 and 2."""
    return tuple(tuple(int(p) for p in token.split("+")) for token in spec.split())


_MSPA = ("MspaCoveredTransaction", "MspaOptOutOptionMode", "MspaServiceProviderMode")
_STATE_NOTICES = ("ProcessingNotice", "SaleOptOutNotice", "TargetedAdvertisingOptOutNotice")
_STATE_OPT_OUTS = ("SaleOptOut", "TargetedAdvertisingOptOut")
_STANDARD_8: Final = _moves("1 2 3 4 5 6 7 8")


def _state(
    name: str,
    sensitive: int,
    child: int,
    *,
    moves: tuple[tuple[int, ...], ...] = _STANDARD_8,
    notices: tuple[str, ...] = _STATE_NOTICES,
    additional: bool = True,
    gpc: bool = True,
) -> UsSection:
    """The common shape of the state sections 9-23: notices, opt-outs, sensitive data,
    known-child consents, then the MSPA fields."""
    fields = [
        "Version:6",
        *notices,
        *_STATE_OPT_OUTS,
        f"SensitiveDataProcessing*{sensitive}",
        f"KnownChildSensitiveDataConsents*{child}"
        if child > 1
        else "KnownChildSensitiveDataConsents",
        *(("AdditionalDataProcessingConsent",) if additional else ()),
        *_MSPA,
    ]
    renames = {"SensitiveDataOptOutNotice": "SensitiveDataProcessingOptOutNotice"}
    return UsSection(name, {1: _layout(*fields)}, "gpc" if gpc else None, moves, renames)


def _mspa_mode_state(name: str, *, child: bool = True) -> UsSection:
    """Maryland, Indiana, Kentucky, Rhode Island (2025): MSPA fields first, one ``MspaMode``;
    Maryland has a GPC sub-section and no sensitive data, the others their sensitive data
    in a sub-section of their own."""
    core = _layout(
        "MspaVersion:6", "MspaCoveredTransaction", "MspaMode", *_STATE_NOTICES,
        *_STATE_OPT_OUTS, *(("KnownChildSensitiveDataConsents",) if child else ()),
        "AdditionalDataProcessingConsent",
    )  # fmt: skip
    return UsSection(name, {1: core}, "sensitive" if child else "gpc", _STANDARD_8, {})


_USNAT_NOTICES = (
    "SharingNotice", "SaleOptOutNotice", "SharingOptOutNotice",
    "TargetedAdvertisingOptOutNotice", "SensitiveDataProcessingOptOutNotice",
    "SensitiveDataLimitUseNotice",
)  # fmt: skip
_USNAT_OPT_OUTS = ("SaleOptOut", "SharingOptOut", "TargetedAdvertisingOptOut")
_SHARING_NOTICES = ("SharingNotice", "SaleOptOutNotice", "TargetedAdvertisingOptOutNotice")

#: Every US section the IAB has published, by section id. A new one is one entry here.
US_SECTIONS: Final[dict[int, UsSection]] = {
    7: UsSection(
        "usnat",
        {
            1: _layout("Version:6", *_USNAT_NOTICES, *_USNAT_OPT_OUTS,
                       "SensitiveDataProcessing*12", "KnownChildSensitiveDataConsents*2",
                       "PersonalDataConsents", *_MSPA),
            2: _layout("Version:6", *_USNAT_NOTICES, *_USNAT_OPT_OUTS,
                       "SensitiveDataProcessing*16", "KnownChildSensitiveDataConsents*3",
                       "PersonalDataConsents", *_MSPA),
        },
        "gpc",
        _moves(" ".join(str(i) for i in range(1, NATIONAL_SENSITIVE + 1))),
        {},
        national_child=True,
    ),
    8: UsSection(
        "usca",
        {1: _layout("Version:6", "SaleOptOutNotice", "SharingOptOutNotice",
                    "SensitiveDataLimitUseNotice", "SaleOptOut", "SharingOptOut",
                    "SensitiveDataProcessing*9", "KnownChildSensitiveDataConsents*2",
                    "PersonalDataConsents", *_MSPA)},
        "gpc",
        _moves("9 10 8 1+2 12 6 7 3 4"),
        {},
    ),
    9: _state("usva", 8, 1, notices=_SHARING_NOTICES, additional=False, gpc=False),
    10: _state("usco", 7, 1, moves=_moves("1 2 3 4 5 6 7"), notices=_SHARING_NOTICES,
               additional=False),
    11: _state("usut", 8, 1, moves=_moves("1 2 4 5 3 6 7 8"),
               notices=(*_SHARING_NOTICES, "SensitiveDataProcessingOptOutNotice"),
               additional=False, gpc=False),
    12: _state("usct", 8, 3, notices=_SHARING_NOTICES, additional=False),
    13: _state("usfl", 8, 3, gpc=False),
    14: _state("usmt", 8, 3, notices=_SHARING_NOTICES),
    15: _state("usor", 11, 3, moves=_moves("1 2 3 4 16 5 15 14 6 7 8")),
    16: _state("ustx", 8, 1),
    17: _state("usde", 9, 5, moves=_moves("1 2 3 4 16 5 6 7 8")),
    18: _state("usia", 8, 1, notices=(*_STATE_NOTICES, "SensitiveDataOptOutNotice"),
               additional=False),
    19: _state("usne", 8, 1),
    20: _state("usnh", 8, 3),
    21: _state("usnj", 10, 5, moves=_moves("1 2 3 4 5 6 7 8 16 10")),
    22: _state("ustn", 8, 1),
    23: _state("usmn", 8, 1),
    24: _mspa_mode_state("usmd", child=False),
    25: _mspa_mode_state("usin"),
    26: _mspa_mode_state("usky"),
    27: _mspa_mode_state("usri"),
}  # fmt: skip


def read_us(section_id: int, encoded: str) -> UsValues:
    """The fields of US section ``section_id`` by IAB name (``Gpc`` from its sub-section).

    Raises ``GppError`` for an unknown version or a core sub-section too short for it.
    """
    layout = US_SECTIONS[section_id]
    core, _, rest = encoded.partition(".")
    bits = _bits(core)
    try:
        version = bits.read(0, 6)
        fields = layout.layouts.get(version)
        if fields is None:
            raise GppError(f"section {section_id} version {version} unknown")
        needed = layout.needed_bits(version)
        if bits.size < needed:
            raise GppError(f"section {section_id} truncated")
        core_bits = bits.head(needed)  # one integer: each field is then a shift and a mask
        values: UsValues = {}
        for name, offset, count in fields:
            if count <= 1:
                width = 6 if count == 0 else 2
                values[name] = core_bits >> (needed - offset - width) & ((1 << width) - 1)
            else:
                end = needed - offset
                values[name] = tuple(core_bits >> (end - 2 * i - 2) & 3 for i in range(count))
        sub = rest.partition(".")[0]
        if sub and layout.subsection == "gpc":
            sub_bits = _bits(sub)
            if sub_bits.read(0, 2) == _GPC_SUBSECTION:
                values["Gpc"] = bool(sub_bits.read(2, 1))
        elif sub and layout.subsection == "sensitive":
            sub_bits = _bits(sub)
            count = len(layout.sensitive)
            values["SensitiveDataProcessing"] = tuple(sub_bits.read(2 * i, 2) for i in range(count))
    except ConsentError:
        raise GppError(f"section {section_id} truncated") from None
    return values


def national(section_id: int, values: UsValues) -> UsNational:
    """``values`` of section ``section_id`` in the national shape (see the notes above)."""
    layout = US_SECTIONS[section_id]
    fields: dict[str, int] = {}
    for name, value in values.items():
        if isinstance(value, int) and not isinstance(value, bool):
            fields[layout.renames.get(name, name)] = value
    if "MspaMode" in fields:  # 1 = opt-out option mode, 2 = service provider mode
        mode = fields.pop("MspaMode")
        fields["MspaServiceProviderMode"] = {0: 0, 1: 2, 2: 1}.get(mode, mode)
        fields["MspaOptOutOptionMode"] = {0: 0, 1: 1, 2: 2}.get(mode, mode)
    for state_only in ("Version", "MspaVersion"):
        fields.pop(state_only, None)
    sensitive: list[int | None] = [None] * NATIONAL_SENSITIVE
    state_sensitive = values.get("SensitiveDataProcessing", ())
    assert isinstance(state_sensitive, tuple)
    for value, targets in zip(state_sensitive, layout.sensitive, strict=False):
        for target in targets:
            if sensitive[target - 1] is None:
                sensitive[target - 1] = value
    child_value = values.get("KnownChildSensitiveDataConsents", 0)
    children = child_value if isinstance(child_value, tuple) else (int(child_value),)
    child: tuple[int | None, int | None]
    if layout.national_child:
        child = (children[0], children[1])
    else:
        child = (0, 0) if not any(children) else (1, 1)
    gpc = values.get("Gpc")
    return UsNational(fields, tuple(sensitive), child, gpc if isinstance(gpc, bool) else None)
