"""Privacy policy: whether a request may receive user-level segments at all.

Built once from configuration; pure apart from a cache of consent decisions. Contextual
segments (``domain:``, ``bundle:``, ``gpid:``) are never affected: they describe the page, not
the person.

| signal | effect |
|---|---|
| ``regs.coppa == 1`` | no user-level segments (reason ``coppa``) |
| ``us_privacy`` third character ``Y`` (``1YYN``) | no user-level segments (``us_privacy``) |
| ``gdpr == 1`` without a consent string, or one that is not TCF v2 | none (``gdpr_no_consent``) |
| ``gdpr == 1``, TCF v2 string without the purposes/vendor we need | none (``gdpr_denied``) |
| ``regs.gpp``: an applicable US section (7-27) fails a rule of ``US_RULES`` | none
  (``gpp_`` + the field, e.g. ``gpp_sale_opt_out``) |
| ``regs.gpp``: its TCF EU or US Privacy section | as the TCF / US Privacy rows |
| ``regs.gpp`` unreadable, an applicable section we cannot read or do not know, one
  ``regs.gpp_sid`` lists that the string lacks, or a ``gpp_sid`` of more than
  ``gpp.MAX_SECTIONS`` entries | none (``gpp_unreadable``) |
| ``device.lmt == 1`` or an all-zero ifa | the ``ifa:`` key alone is skipped (see ``keys``) |

GPP sections apply when listed in ``regs.gpp_sid`` (all sections of the string when it is
absent). An applicable section we cannot read withholds user-level segments: an opt-out we
cannot see must not be ignored. US sections are normalised to the national shape
(``gpp.national``) and judged by ``US_RULES`` (Prebid Server's ``USNatTransmitUfpd``), or by
its three opt-outs alone under ``us_rules = "opt_outs"``.

TCF: every configured purpose (default 1, 3, 4) must be allowed, by consent (purpose and, if
``gdpr_vendor_id`` is set, our vendor) or by legitimate interest where the TCF policy permits
it: never for purpose 1, and not for purposes 3-6 from policy version 4 (TCF 2.2) on; the
publisher's restrictions on our vendor narrow that (``purposes_allowed``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from enrich_server import gpp, tcf
from enrich_server.openrtb import BidRequest, consent, gdpr, us_privacy

_Key = TypeVar("_Key", str, tuple[str, tuple[int, ...]])

COPPA: Final = "coppa"
US_PRIVACY: Final = "us_privacy"
GDPR_NO_CONSENT: Final = "gdpr_no_consent"
GDPR_DENIED: Final = "gdpr_denied"
GPP_UNREADABLE: Final = "gpp_unreadable"

US_RULES_STRICT: Final = "strict"
US_RULES_OPT_OUTS: Final = "opt_outs"
#: The choices of ``[privacy] us_rules``.
US_RULE_SETS: Final = (US_RULES_STRICT, US_RULES_OPT_OUTS)


# Values of the national fields: notices 1 = given, 2 = not given; opt-outs 1 = opted out,
# 2 = did not; consents 1 = no consent, 2 = consent; 0 is always "not applicable".
_NOTICE_NOT_GIVEN: Final = 2
_OPTED_OUT: Final = 1
_DID_NOT_OPT_OUT: Final = 2
_NO_CONSENT: Final = 1
_CONSENT: Final = 2
_YES: Final = 1
# SensitiveDataProcessing positions (0-based) as prebid-server-java's USNatTransmitUfpd reads
# them: consent without a notice (all but precise geolocation, 7), no consent (racial origin,
# religion, health, sex life, citizenship, union membership), and any answer at all (genetic,
# biometric, id numbers, account log-in, mail contents). Positions 13-16 are not read.
_SENSITIVE_CONSENT_WITHOUT_NOTICE: Final = (0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11)
_SENSITIVE_NO_CONSENT: Final = (0, 1, 2, 3, 4, 10)
_SENSITIVE_ANY: Final = (5, 6, 8, 9, 11)


def _notice_rule(notice: str, opt_out: str) -> Callable[[gpp.UsNational], bool]:
    # A notice not given (2), or not applicable (0) while the user "did not opt out" (2):
    # Prebid Server reads the latter as inconsistent and withholds.
    def rule(n: gpp.UsNational) -> bool:
        value = n.get(notice)
        return value == _NOTICE_NOT_GIVEN or (value == 0 and n.get(opt_out) == _DID_NOT_OPT_OUT)

    return rule


def _sensitive_rule(n: gpp.UsNational) -> bool:
    sdp = n.sensitive
    notice_na = (
        n.get("SensitiveDataProcessingOptOutNotice") == 0
        or n.get("SensitiveDataLimitUseNotice") == 0
    )
    return (
        (notice_na and any(sdp[i] == _CONSENT for i in _SENSITIVE_CONSENT_WITHOUT_NOTICE))
        or any(sdp[i] == _NO_CONSENT for i in _SENSITIVE_NO_CONSENT)
        or any(sdp[i] in (_NO_CONSENT, _CONSENT) for i in _SENSITIVE_ANY)
    )


#: The US rules, in the order Prebid Server's USNatTransmitUfpd applies them: (national
#: field, test on the normalised section that withholds user data). ``opt_outs`` applies the
#: three opt-out rows alone. Each suppression is counted as ``gpp_`` + the field in snake case.
US_RULES: Final[tuple[tuple[str, Callable[[gpp.UsNational], bool]], ...]] = (
    ("MspaServiceProviderMode", lambda n: n.get("MspaServiceProviderMode") == _YES),
    ("Gpc", lambda n: n.gpc is True),
    ("SaleOptOut", lambda n: n.get("SaleOptOut") == _OPTED_OUT),
    ("SaleOptOutNotice", _notice_rule("SaleOptOutNotice", "SaleOptOut")),
    ("SharingOptOut", lambda n: n.get("SharingOptOut") == _OPTED_OUT),
    ("SharingNotice", _notice_rule("SharingNotice", "SharingOptOut")),
    ("SharingOptOutNotice", _notice_rule("SharingOptOutNotice", "SharingOptOut")),
    ("TargetedAdvertisingOptOut", lambda n: n.get("TargetedAdvertisingOptOut") == _OPTED_OUT),
    (
        "TargetedAdvertisingOptOutNotice",
        _notice_rule("TargetedAdvertisingOptOutNotice", "TargetedAdvertisingOptOut"),
    ),
    (
        "SensitiveDataProcessingOptOutNotice",
        lambda n: n.get("SensitiveDataProcessingOptOutNotice") == _NOTICE_NOT_GIVEN,
    ),
    (
        "SensitiveDataLimitUseNotice",
        lambda n: n.get("SensitiveDataLimitUseNotice") == _NOTICE_NOT_GIVEN,
    ),
    ("SensitiveDataProcessing", _sensitive_rule),
    (
        "KnownChildSensitiveDataConsents",
        lambda n: n.child[0] == _NO_CONSENT or n.child[1] in (_NO_CONSENT, _CONSENT),
    ),
    ("PersonalDataConsents", lambda n: n.get("PersonalDataConsents") == _CONSENT),
)
_OPT_OUT_FIELDS: Final = ("SaleOptOut", "SharingOptOut", "TargetedAdvertisingOptOut")


def us_reason(field: str) -> str:
    """The suppression reason counted for a US rule on ``field`` (``gpp_sale_opt_out``)."""
    snake = "".join(f"_{c.lower()}" if c.isupper() else c for c in field).lstrip("_")
    return f"gpp_{snake}"


def us_rules(rule_set: str) -> tuple[tuple[str, str, Callable[[gpp.UsNational], bool]], ...]:
    """The rules of ``rule_set`` (``strict`` or ``opt_outs``) as (field, reason, test)."""
    chosen = [
        (field, us_reason(field), test)
        for field, test in US_RULES
        if rule_set == US_RULES_STRICT or field in _OPT_OUT_FIELDS
    ]
    return tuple(chosen)


#: Every suppression reason, for metrics labels (a bounded set).
REASONS: Final = (
    COPPA, US_PRIVACY, GDPR_NO_CONSENT, GDPR_DENIED, GPP_UNREADABLE,
    *(us_reason(field) for field, _ in US_RULES),
)  # fmt: skip

# Index 2 of the IAB US Privacy string ("1YYN") is "opt-out of sale".
_US_PRIVACY_OPT_OUT_INDEX: Final = 2
# TCF policy version 4 (TCF 2.2) removed legitimate interest as a basis for purposes 3-6.
_TCF_22_POLICY: Final = 4
_CONSENT_ONLY_FROM_22: Final = frozenset({3, 4, 5, 6})
#: Decision caches: strings longer than ``MAX_CACHED_CHARS`` are decided every time rather
#: than kept (real consent and GPP strings are well under it), and a cache is emptied when
#: it would pass ``MAX_CACHED`` entries or ``CACHE_BUDGET_CHARS`` characters of keys, so
#: each holds a few MB whatever callers send.
MAX_CACHED: Final = 10_000
MAX_CACHED_CHARS: Final = 4_096
CACHE_BUDGET_CHARS: Final = 2_000_000


@dataclass(frozen=True, slots=True)
class PrivacyPolicy:
    """Which signals suppress user-level segments; every switch defaults to on."""

    honour_coppa: bool = True
    honour_us_privacy: bool = True
    require_gdpr_consent: bool = True
    honour_gpp: bool = True
    gdpr_vendor_id: int = 0
    """Our TCF vendor id; 0 checks purposes only."""
    gdpr_purposes: tuple[int, ...] = (1, 3, 4)
    us_rules: str = US_RULES_STRICT
    """``strict`` (Prebid Server's US national rules) or ``opt_outs`` (the three opt-outs)."""


def purposes_allowed(tc: tcf.CoreView, purposes: tuple[int, ...], vendor: int) -> bool:
    """Whether every purpose in ``purposes`` has a legal basis for ``vendor`` (0 = any).

    A publisher restriction on ``vendor`` for a purpose narrows it: not allowed leaves no
    basis, require consent rules out legitimate interest, require legitimate interest rules
    out consent. Raises ``tcf.ConsentError`` when the string is truncated.
    """
    vendor_consent, vendor_li = tc.vendor(vendor) if vendor else (True, True)
    restrictions = tc.restrictions(vendor) if vendor else {}
    return all(
        _legal_basis(tc, p, vendor_consent, vendor_li, restrictions.get(p)) is not None
        for p in purposes
    )


def purpose_basis(tc: tcf.CoreView, purpose: int, vendor: int) -> str:
    """How ``purpose`` is established for ``vendor`` (0 = any), in words (``consent``)."""
    vendor_consent, vendor_li = tc.vendor(vendor) if vendor else (True, True)
    restriction = tc.restrictions(vendor).get(purpose) if vendor else None
    basis = _legal_basis(tc, purpose, vendor_consent, vendor_li, restriction)
    return f"by {basis}" if basis is not None else "no legal basis"


def _legal_basis(
    tc: tcf.CoreView, purpose: int, vendor_consent: bool, vendor_li: bool, restriction: int | None
) -> str | None:
    if restriction == tcf.NOT_ALLOWED:
        return None
    if tc.purpose_consent(purpose) and vendor_consent and restriction != tcf.REQUIRE_LI:
        return "consent"
    li_possible = purpose != 1 and not (
        tc.policy_version >= _TCF_22_POLICY and purpose in _CONSENT_ONLY_FROM_22
    )
    if li_possible and tc.purpose_li(purpose) and vendor_li and restriction != tcf.REQUIRE_CONSENT:
        return "legitimate interest"
    return None


class _Decisions(dict[_Key, str | None]):
    """A decision cache: a plain dict for hits, bounded in entries and key characters."""

    __slots__ = ("chars",)

    def __init__(self) -> None:
        super().__init__()
        self.chars = 0

    def keep(self, key: _Key, chars: int, decision: str | None) -> None:
        """Remember ``decision`` for ``key`` (``chars`` long) unless that is too big."""
        if chars > MAX_CACHED_CHARS:
            return
        if len(self) >= MAX_CACHED or self.chars + chars > CACHE_BUDGET_CHARS:
            self.clear()
            self.chars = 0
        self[key] = decision
        self.chars += chars


class Privacy:
    """Applies a ``PrivacyPolicy`` to requests; consent strings are decided once each."""

    def __init__(self, policy: PrivacyPolicy | None = None) -> None:
        self.policy = policy if policy is not None else PrivacyPolicy()
        self._decisions: _Decisions[str] = _Decisions()
        self._gpp_decisions: _Decisions[tuple[str, tuple[int, ...]]] = _Decisions()
        self._us_rules = us_rules(self.policy.us_rules)

    def suppression_reason(self, request: BidRequest) -> str | None:
        """Why user-level segments must be withheld, or ``None`` when they may be served."""
        regs = request.regs
        if regs is None:
            return None  # no regulation signal at all: the common case, decided at once
        policy = self.policy
        if policy.honour_coppa and regs.coppa == 1:
            return COPPA
        if policy.honour_us_privacy and _usp_opted_out(us_privacy(regs)):
            return US_PRIVACY
        if policy.require_gdpr_consent and gdpr(regs) == 1:
            reason = self._consent_reason(consent(request.user))
            if reason is not None:
                return reason
        if policy.honour_gpp and regs.gpp:
            applicable = regs.gpp_sid or ()
            if len(applicable) > gpp.MAX_SECTIONS:
                return GPP_UNREADABLE
            # Each section decided once, however often gpp_sid repeats it.
            return self._gpp_reason(regs.gpp, tuple(dict.fromkeys(applicable)))
        return None

    def _gpp_reason(self, gpp_string: str, applicable: tuple[int, ...]) -> str | None:
        key = (gpp_string, applicable)
        try:
            return self._gpp_decisions[key]
        except KeyError:
            pass
        decision = self._decide_gpp(gpp_string, applicable)
        self._gpp_decisions.keep(key, len(gpp_string) + len(applicable), decision)
        return decision

    def _decide_gpp(self, gpp_string: str, applicable: tuple[int, ...]) -> str | None:
        try:
            sections = gpp.parse(gpp_string)
        except gpp.GppError:
            return GPP_UNREADABLE
        for section_id in applicable or tuple(sections):
            section = sections.get(section_id)
            if section is None:
                return GPP_UNREADABLE  # said to apply, not carried: its signal is unknown
            if section_id == gpp.TCF_EU:
                if self.policy.require_gdpr_consent:
                    reason = self._consent_reason(section)
                    if reason is not None:
                        return reason
            elif section_id == gpp.US_PRIVACY:
                if self.policy.honour_us_privacy and _usp_opted_out(section):
                    return US_PRIVACY
            elif section_id in gpp.US_SECTIONS:
                try:
                    values = gpp.read_us(section_id, section)
                except gpp.GppError:
                    return GPP_UNREADABLE
                reason = self._us_verdict(gpp.national(section_id, values))
                if reason is not None:
                    return reason
            else:
                return GPP_UNREADABLE
        return None

    def _us_verdict(self, section: gpp.UsNational) -> str | None:
        """The first US rule that withholds user data for a normalised section, or None."""
        for _, reason, withholds in self._us_rules:
            if withholds(section):
                return reason
        return None

    def _consent_reason(self, consent_string: str | None) -> str | None:
        if not consent_string:
            return GDPR_NO_CONSENT
        try:
            return self._decisions[consent_string]
        except KeyError:
            pass
        policy = self.policy
        try:
            tc = tcf.CoreView(consent_string)
            allowed = purposes_allowed(tc, policy.gdpr_purposes, policy.gdpr_vendor_id)
        except tcf.ConsentError:
            decision: str | None = GDPR_NO_CONSENT
        else:
            decision = None if allowed else GDPR_DENIED
        self._decisions.keep(consent_string, len(consent_string), decision)
        return decision


def _usp_opted_out(usp: str | None) -> bool:
    return (
        usp is not None
        and len(usp) > _US_PRIVACY_OPT_OUT_INDEX
        and usp[_US_PRIVACY_OPT_OUT_INDEX] in "Yy"
    )


def suppression_reason(request: BidRequest, policy: PrivacyPolicy) -> str | None:
    """One-off form of ``Privacy.suppression_reason`` (tests, tools); no cache kept."""
    return Privacy(policy).suppression_reason(request)
