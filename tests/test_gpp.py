"""GPP: the header's section ids, US opt-outs, and the privacy decision built on them."""

from __future__ import annotations

import pytest

from enrich_server import gpp
from enrich_server.openrtb import decode
from enrich_server.privacy import (
    GDPR_DENIED,
    GPP_OPT_OUT,
    GPP_UNREADABLE,
    US_PRIVACY,
    PrivacyPolicy,
    suppression_reason,
)
from tests.gpp_strings import REAL_USNAT, gpp_body, gpp_string, header, us_section
from tests.tcf_strings import CONSENTED
from tests.test_privacy import RANGES


@pytest.mark.parametrize(
    ("encoded", "ids"),
    [
        pytest.param("DBABLA", [7], id="real-usnat"),
        pytest.param("DBABMA", [2], id="real-tcf-eu"),
        pytest.param(header([2, 6, 7, 8, 12]), [2, 6, 7, 8, 12], id="several"),
        pytest.param(header([21]), [21], id="large-id"),
    ],
)
def test_header_section_ids(encoded: str, ids: list[int]) -> None:
    assert gpp.section_ids(encoded) == ids


def test_real_usnat_string_has_no_opt_out() -> None:
    sections = gpp.parse(REAL_USNAT)
    assert list(sections) == [7]
    assert not gpp.us_opted_out(7, sections[7])


@pytest.mark.parametrize(
    ("section_id", "field", "offset"),
    [
        (7, "sale", 18), (7, "sharing", 20), (7, "targeted", 22),
        (8, "sale", 12), (8, "sharing", 14),
        (9, "sale", 12), (9, "targeted", 14),
        (10, "sale", 12), (10, "targeted", 14),
        (11, "sale", 14), (11, "targeted", 16),
        (12, "sale", 12), (12, "targeted", 14),
    ],
)  # fmt: skip
def test_us_opt_outs(section_id: int, field: str, offset: int) -> None:
    assert gpp.us_opted_out(section_id, us_section({offset: 1})), field
    assert not gpp.us_opted_out(section_id, us_section({offset: 2})), field  # did not opt out
    assert not gpp.us_opted_out(section_id, us_section({offset: 0})), field  # not applicable


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(gpp_body(REAL_USNAT, [7]), None, id="real-usnat-no-opt-out"),
        pytest.param(gpp_body(gpp_string({7: us_section({18: 1})}), [7]), GPP_OPT_OUT,
                     id="usnat-sale-opt-out"),
        pytest.param(gpp_body(gpp_string({8: us_section({14: 1})})), GPP_OPT_OUT,
                     id="usca-sharing-no-sid-means-all"),
        pytest.param(gpp_body(gpp_string({7: us_section({}), 9: us_section({14: 1})}), [7]),
                     None, id="opt-out-in-a-section-not-applicable"),
        pytest.param(gpp_body(gpp_string({7: us_section({}), 9: us_section({14: 1})}), [7, 9]),
                     GPP_OPT_OUT, id="va-targeted-opt-out-applicable"),
        pytest.param(gpp_body(gpp_string({2: CONSENTED}), [2]), None, id="tcf-eu-consented"),
        pytest.param(gpp_body(gpp_string({2: RANGES}), [2]), GDPR_DENIED, id="tcf-eu-denied"),
        pytest.param(gpp_body(gpp_string({6: "1YYN"}), [6]), US_PRIVACY, id="usp-section"),
        pytest.param(gpp_body(gpp_string({6: "1YNN"}), [6]), None, id="usp-section-no-opt-out"),
        pytest.param(gpp_body(gpp_string({21: us_section({})}), [21]), GPP_UNREADABLE,
                     id="unknown-applicable-section"),
        pytest.param(gpp_body("DBABLA~"), GPP_UNREADABLE, id="truncated-section"),
        pytest.param(gpp_body("not gpp at all"), GPP_UNREADABLE, id="garbage"),
        pytest.param(gpp_body("DBABLA~BVQqAAAAAAJY.QA~extra"), GPP_UNREADABLE,
                     id="more-sections-than-header"),
        pytest.param(gpp_body(gpp_string({7: us_section({})}), [8]), None,
                     id="applicable-section-absent"),
    ],
)  # fmt: skip
def test_gpp_privacy_decision(body: bytes, reason: str | None) -> None:
    assert suppression_reason(decode(body), PrivacyPolicy()) == reason


def test_gpp_switch_off() -> None:
    body = gpp_body(gpp_string({7: us_section({18: 1})}), [7])
    assert suppression_reason(decode(body), PrivacyPolicy(honour_gpp=False)) is None
