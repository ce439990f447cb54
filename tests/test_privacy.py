from __future__ import annotations

import pytest

from enrich_server.openrtb import decode
from enrich_server.privacy import (
    COPPA,
    GDPR_NO_CONSENT,
    US_PRIVACY,
    PrivacyPolicy,
    suppression_reason,
)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b"{}", None, id="no-signals"),
        pytest.param(b'{"regs":{}}', None, id="empty-regs"),
        pytest.param(b'{"regs":{"coppa":1}}', COPPA, id="coppa"),
        pytest.param(b'{"regs":{"coppa":0}}', None, id="coppa-0"),
        pytest.param(b'{"regs":{"us_privacy":"1YYN"}}', US_PRIVACY, id="usp-opt-out"),
        pytest.param(b'{"regs":{"ext":{"us_privacy":"1NYN"}}}', US_PRIVACY, id="usp-ext"),
        pytest.param(b'{"regs":{"us_privacy":"1nyn"}}', US_PRIVACY, id="usp-lowercase"),
        pytest.param(b'{"regs":{"us_privacy":"1YNN"}}', None, id="usp-notice-only"),
        pytest.param(b'{"regs":{"us_privacy":"1---"}}', None, id="usp-not-applicable"),
        pytest.param(b'{"regs":{"us_privacy":"1Y"}}', None, id="usp-short"),
        pytest.param(b'{"regs":{"gdpr":1}}', GDPR_NO_CONSENT, id="gdpr-no-consent"),
        pytest.param(b'{"regs":{"ext":{"gdpr":1}}}', GDPR_NO_CONSENT, id="gdpr-ext"),
        pytest.param(
            b'{"regs":{"gdpr":1},"user":{"consent":""}}', GDPR_NO_CONSENT, id="gdpr-empty-consent"
        ),
        pytest.param(b'{"regs":{"gdpr":1},"user":{"consent":"CPXxRfA"}}', None, id="gdpr-ok"),
        pytest.param(
            b'{"regs":{"gdpr":1},"user":{"ext":{"consent":"CPXxRfA"}}}', None, id="gdpr-ok-ext"
        ),
        pytest.param(b'{"regs":{"gdpr":0}}', None, id="gdpr-0"),
        pytest.param(b'{"regs":{"coppa":1,"us_privacy":"1YYN"}}', COPPA, id="coppa-first"),
    ],
)
def test_suppression_reason_default_policy(body: bytes, reason: str | None) -> None:
    assert suppression_reason(decode(body), PrivacyPolicy()) == reason


def test_suppression_reason_switches_off() -> None:
    policy = PrivacyPolicy(honour_coppa=False, honour_us_privacy=False, require_gdpr_consent=False)
    request = decode(b'{"regs":{"coppa":1,"us_privacy":"1YYN","gdpr":1}}')
    assert suppression_reason(request, policy) is None
