"""``enrich-server consent``: a TCF or GPP string explained field by field.

The verdict printed last is the one the server reaches (``Privacy.suppression_reason`` on a
request carrying the string); the lines before it show the fields that led there, read by
the same decoders and judged by the same rule table.
"""

from __future__ import annotations

import json

from enrich_server import gpp, tcf
from enrich_server.openrtb import decode
from enrich_server.privacy import (
    US_RULES_OPT_OUTS,
    Privacy,
    PrivacyPolicy,
    purpose_basis,
    us_rules,
)

_RESTRICTION_NAMES = {
    tcf.NOT_ALLOWED: "not allowed",
    tcf.REQUIRE_CONSENT: "require consent",
    tcf.REQUIRE_LI: "require legitimate interest",
}
_SPECIAL_FEATURES = {1: "precise geolocation", 2: "device scanning"}


def is_gpp(text: str) -> bool:
    """Whether ``text`` looks like a GPP string (a GPP header first) rather than TCF."""
    try:
        gpp.section_ids(text.strip().split("~", 1)[0])
    except gpp.GppError:
        return False
    return True


def explain(
    text: str, policy: PrivacyPolicy, gpp_sid: list[int] | None
) -> tuple[list[str], str | None]:
    """Lines explaining ``text`` under ``policy``, and the suppression reason (None = allowed).

    ``gpp_sid`` is the request's ``regs.gpp_sid`` (None: all sections of the string apply).
    """
    if is_gpp(text):
        lines = _explain_gpp(text, policy, gpp_sid)
        regs: dict[str, object] = {"gpp": text}
        if gpp_sid is not None:
            regs["gpp_sid"] = gpp_sid
        body = {"regs": regs, "user": {"id": "u"}}
    else:
        lines = _explain_tcf(text, policy)
        body = {"regs": {"gdpr": 1}, "user": {"id": "u", "consent": text}}
    reason = Privacy(policy).suppression_reason(decode(json.dumps(body).encode()))
    verdict = "allowed" if reason is None else f"withheld ({reason})"
    lines.append(f"user-level segments: {verdict}")
    return lines, reason


def _explain_tcf(text: str, policy: PrivacyPolicy) -> list[str]:
    try:
        tc = tcf.decode(text)
        view = tcf.CoreView(text)
        vendor = policy.gdpr_vendor_id
        vendor_consent, vendor_li = view.vendor(vendor) if vendor else (True, True)
        restrictions = view.restrictions(vendor) if vendor else {}
    except tcf.ConsentError as exc:
        return [f"TCF v2 string: unreadable ({exc})"]
    features = ", ".join(_SPECIAL_FEATURES.get(f, str(f)) for f in sorted(tc.special_features))
    lines = [
        f"TCF v2 string, policy version {tc.policy_version}",
        f"  purposes with consent: {_ids(tc.purposes_consent)}",
        f"  purposes with legitimate interest: {_ids(tc.purposes_legitimate_interest)}",
        f"  purpose one treatment: {'yes' if tc.purpose_one_treatment else 'no'} "
        "(purpose 1 still needs the consent bit)",
        f"  special features opted in: {features or 'none'} (not used by us)",
        f"  vendors with consent: {len(tc.vendors_consent)}, "
        f"with legitimate interest: {len(tc.vendors_legitimate_interest)}",
    ]
    if vendor:
        lines.append(
            f"  our vendor {vendor}: consent {_yes(vendor_consent)}, "
            f"legitimate interest {_yes(vendor_li)}"
        )
        for purpose, kind in sorted(restrictions.items()):
            lines.append(
                f"  publisher restriction on us, purpose {purpose}: {_RESTRICTION_NAMES[kind]}"
            )
    else:
        lines.append("  our vendor: not configured (privacy.gdpr_vendor_id = 0): purposes only")
    for purpose in policy.gdpr_purposes:
        lines.append(f"  purpose {purpose}: {purpose_basis(view, purpose, vendor)}")
    return lines


def _explain_gpp(text: str, policy: PrivacyPolicy, gpp_sid: list[int] | None) -> list[str]:
    try:
        sections = gpp.parse(text)
    except gpp.GppError as exc:
        return [f"GPP string: unreadable ({exc})"]
    applicable = gpp_sid if gpp_sid is not None else list(sections)
    lines = [
        f"GPP string, sections {_ids(sections)}; applicable (regs.gpp_sid): "
        + (_ids(applicable) if gpp_sid is not None else "all (no gpp_sid)")
    ]
    for section_id in sorted(set(sections) | set(applicable)):
        applies = "applies" if section_id in applicable else "does not apply"
        if section_id not in sections:
            lines.append(f"section {section_id}: listed in gpp_sid but not carried: unreadable")
            continue
        section = sections[section_id]
        if section_id == gpp.TCF_EU:
            lines.append(f"section 2 (TCF EU), {applies}: judged as a TCF string")
            lines.extend(_explain_tcf(section, policy))
        elif section_id == gpp.US_PRIVACY:
            lines.append(
                f"section 6 (US Privacy {section!r}), {applies}: third character Y = opted out"
            )
        elif section_id in gpp.US_SECTIONS:
            lines.extend(_explain_us(section_id, section, policy, applies))
        else:
            lines.append(
                f"section {section_id}, {applies}: unknown to us (unreadable if it applies)"
            )
    return lines


def _explain_us(section_id: int, section: str, policy: PrivacyPolicy, applies: str) -> list[str]:
    name = gpp.US_SECTIONS[section_id].name
    try:
        values = gpp.read_us(section_id, section)
    except gpp.GppError as exc:
        return [f"section {section_id} ({name}), {applies}: unreadable ({exc})"]
    lines = [f"section {section_id} ({name}), {applies}; fields as sent:"]
    lines.extend(f"  {field} = {_value(value)}" for field, value in values.items())
    national = gpp.national(section_id, values)
    lines.append(f"  normalised to the national shape, rules {policy.us_rules}:")
    checked = {field for field, _, _ in us_rules(policy.us_rules)}
    for field, reason, withholds in us_rules("strict"):
        value = _national_value(national, field)
        if field not in checked:
            verdict = f"not checked (us_rules = {US_RULES_OPT_OUTS})"
        else:
            verdict = f"withholds ({reason})" if withholds(national) else "ok"
        lines.append(f"  {field} = {value}: {verdict}")
    return lines


def _national_value(national: gpp.UsNational, field: str) -> str:
    if field == "Gpc":
        return _value(national.gpc)
    if field == "SensitiveDataProcessing":
        return _value(national.sensitive[:12])
    if field == "KnownChildSensitiveDataConsents":
        return _value(national.child)
    return _value(national.get(field))


def _value(value: object) -> str:
    if value is None:
        return "absent"
    if isinstance(value, tuple):
        return "[" + ", ".join("-" if v is None else str(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def _ids(ids: object) -> str:
    chosen = sorted(ids)  # type: ignore[call-overload]
    return ", ".join(str(i) for i in chosen) if chosen else "none"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
