"""Privacy policy: whether a request may receive user-level segments at all.

Pure functions over a decoded ``BidRequest``. Contextual segments (``domain:``, ``bundle:``,
``gpid:``) are never affected: they describe the page, not the person.

| signal | effect |
|---|---|
| ``regs.coppa == 1`` | no user-level segments (reason ``coppa``) |
| ``us_privacy`` third character ``Y`` (``1YYN``) | no user-level segments (``us_privacy``) |
| ``gdpr == 1`` without a consent string | no user-level segments (``gdpr_no_consent``) |
| ``device.lmt == 1`` or an all-zero ifa | the ``ifa:`` key alone is skipped (see ``keys``) |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from enrich_server.openrtb import BidRequest, consent, gdpr, us_privacy

COPPA: Final = "coppa"
US_PRIVACY: Final = "us_privacy"
GDPR_NO_CONSENT: Final = "gdpr_no_consent"

#: Every suppression reason, for metrics labels (a bounded set).
REASONS: Final = (COPPA, US_PRIVACY, GDPR_NO_CONSENT)

# Index 2 of the IAB US Privacy string ("1YYN") is "opt-out of sale".
_US_PRIVACY_OPT_OUT_INDEX: Final = 2


@dataclass(frozen=True, slots=True)
class PrivacyPolicy:
    """Which signals suppress user-level segments; every switch defaults to on."""

    honour_coppa: bool = True
    honour_us_privacy: bool = True
    require_gdpr_consent: bool = True


def suppression_reason(request: BidRequest, policy: PrivacyPolicy) -> str | None:
    """Return why user-level segments must be withheld, or ``None`` when they may be served."""
    regs = request.regs
    if regs is None:
        return None  # no regulation signal at all: the common case, decided at once
    if policy.honour_coppa and regs.coppa == 1:
        return COPPA
    usp = us_privacy(regs)
    if (
        policy.honour_us_privacy
        and usp is not None
        and len(usp) > _US_PRIVACY_OPT_OUT_INDEX
        and usp[_US_PRIVACY_OPT_OUT_INDEX] in "Yy"
    ):
        return US_PRIVACY
    if policy.require_gdpr_consent and gdpr(regs) == 1 and not consent(request.user):
        return GDPR_NO_CONSENT
    return None
