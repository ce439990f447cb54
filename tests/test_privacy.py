from __future__ import annotations

import pytest

from enrich_server.openrtb import RequestView
from enrich_server.privacy import (
    COPPA,
    GDPR_NO_CONSENT,
    US_PRIVACY,
    PrivacyPolicy,
    suppression_reason,
)


@pytest.mark.parametrize(
    ("view", "reason"),
    [
        pytest.param(RequestView(), None, id="no-signals"),
        pytest.param(RequestView(coppa=1), COPPA, id="coppa"),
        pytest.param(RequestView(coppa=0), None, id="coppa-0"),
        pytest.param(RequestView(us_privacy="1YYN"), US_PRIVACY, id="usp-opt-out"),
        pytest.param(RequestView(us_privacy="1nyn"), US_PRIVACY, id="usp-lowercase"),
        pytest.param(RequestView(us_privacy="1YNN"), None, id="usp-notice-only"),
        pytest.param(RequestView(us_privacy="1---"), None, id="usp-not-applicable"),
        pytest.param(RequestView(us_privacy="1Y"), None, id="usp-short"),
        pytest.param(RequestView(gdpr=1), GDPR_NO_CONSENT, id="gdpr-no-consent"),
        pytest.param(RequestView(gdpr=1, consent=""), GDPR_NO_CONSENT, id="gdpr-empty-consent"),
        pytest.param(RequestView(gdpr=1, consent="CPXxRfAPXxRfAAfKABENB"), None, id="gdpr-ok"),
        pytest.param(RequestView(gdpr=0), None, id="gdpr-0"),
        pytest.param(RequestView(coppa=1, us_privacy="1YYN"), COPPA, id="coppa-first"),
    ],
)
def test_suppression_reason_default_policy(view: RequestView, reason: str | None) -> None:
    assert suppression_reason(view, PrivacyPolicy()) == reason


def test_suppression_reason_switches_off() -> None:
    policy = PrivacyPolicy(honour_coppa=False, honour_us_privacy=False, require_gdpr_consent=False)
    assert suppression_reason(RequestView(coppa=1, us_privacy="1YYN", gdpr=1), policy) is None
