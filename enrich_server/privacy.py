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
| ``regs.gpp``: a US section (national, CA, VA, CO, UT, CT) with a sale, sharing or
  targeted-advertising opt-out | none (``gpp_opt_out``) |
| ``regs.gpp``: its TCF EU or US Privacy section | as the TCF / US Privacy rows |
| ``regs.gpp`` unreadable, or an applicable section we cannot read | none (``gpp_unreadable``) |
| ``device.lmt == 1`` or an all-zero ifa | the ``ifa:`` key alone is skipped (see ``keys``) |

GPP sections apply when listed in ``regs.gpp_sid`` (all sections of the string when it is
absent). An applicable section we cannot read withholds user-level segments: an opt-out we
cannot see must not be ignored.

TCF: every configured purpose (default 1, 3, 4) must be allowed, by consent (purpose and, if
``gdpr_vendor_id`` is set, our vendor) or by legitimate interest where the TCF policy permits
it: never for purpose 1, and not for purposes 3-6 from policy version 4 (TCF 2.2) on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, TypeVar

from enrich_server import gpp, tcf
from enrich_server.openrtb import BidRequest, consent, gdpr, us_privacy

_Key = TypeVar("_Key", str, tuple[str, tuple[int, ...]])

COPPA: Final = "coppa"
US_PRIVACY: Final = "us_privacy"
GDPR_NO_CONSENT: Final = "gdpr_no_consent"
GDPR_DENIED: Final = "gdpr_denied"
GPP_OPT_OUT: Final = "gpp_opt_out"
GPP_UNREADABLE: Final = "gpp_unreadable"

#: Every suppression reason, for metrics labels (a bounded set).
REASONS: Final = (COPPA, US_PRIVACY, GDPR_NO_CONSENT, GDPR_DENIED, GPP_OPT_OUT, GPP_UNREADABLE)

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


def purposes_allowed(tc: tcf.CoreView, purposes: tuple[int, ...], vendor: int) -> bool:
    """Whether every purpose in ``purposes`` has a legal basis for ``vendor`` (0 = any).

    Raises ``tcf.ConsentError`` when the vendor sections are truncated.
    """
    vendor_consent, vendor_li = tc.vendor(vendor) if vendor else (True, True)
    for purpose in purposes:
        if tc.purpose_consent(purpose) and vendor_consent:
            continue
        li_possible = purpose != 1 and not (
            tc.policy_version >= _TCF_22_POLICY and purpose in _CONSENT_ONLY_FROM_22
        )
        if li_possible and tc.purpose_li(purpose) and vendor_li:
            continue
        return False
    return True


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
            return self._gpp_reason(regs.gpp, tuple(regs.gpp_sid or ()))
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
                continue  # listed as applicable but not carried: nothing to honour
            if section_id == gpp.TCF_EU:
                if self.policy.require_gdpr_consent:
                    reason = self._consent_reason(section)
                    if reason is not None:
                        return reason
            elif section_id == gpp.US_PRIVACY:
                if self.policy.honour_us_privacy and _usp_opted_out(section):
                    return US_PRIVACY
            elif section_id in gpp.US_OPT_OUT_OFFSETS:
                try:
                    if gpp.us_opted_out(section_id, section):
                        return GPP_OPT_OUT
                except gpp.GppError:
                    return GPP_UNREADABLE
            else:
                return GPP_UNREADABLE
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
