"""GPP: the header's section ids, US opt-outs, and the privacy decision built on them."""

from __future__ import annotations

import json

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
from tests.gpp_strings import gpp_string, header, us_section
from tests.tcf_strings import CONSENTED
from tests.test_privacy import RANGES

# Seen in a real bid request next to us_privacy "1YNY": US national, notices given, no opt-out.
REAL_USNAT = "DBABLA~BVQqAAAAAAJY.QA"


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


def request(gpp_value: str, sid: list[int] | None = None) -> bytes:
    regs: dict[str, object] = {"gpp": gpp_value}
    if sid is not None:
        regs["gpp_sid"] = sid
    return json.dumps({"regs": regs, "user": {"id": "u"}}).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(request(REAL_USNAT, [7]), None, id="real-usnat-no-opt-out"),
        pytest.param(request(gpp_string({7: us_section({18: 1})}), [7]), GPP_OPT_OUT,
                     id="usnat-sale-opt-out"),
        pytest.param(request(gpp_string({8: us_section({14: 1})})), GPP_OPT_OUT,
                     id="usca-sharing-no-sid-means-all"),
        pytest.param(request(gpp_string({7: us_section({}), 9: us_section({14: 1})}), [7]),
                     None, id="opt-out-in-a-section-not-applicable"),
        pytest.param(request(gpp_string({7: us_section({}), 9: us_section({14: 1})}), [7, 9]),
                     GPP_OPT_OUT, id="va-targeted-opt-out-applicable"),
        pytest.param(request(gpp_string({2: CONSENTED}), [2]), None, id="tcf-eu-consented"),
        pytest.param(request(gpp_string({2: RANGES}), [2]), GDPR_DENIED, id="tcf-eu-denied"),
        pytest.param(request(gpp_string({6: "1YYN"}), [6]), US_PRIVACY, id="usp-section"),
        pytest.param(request(gpp_string({6: "1YNN"}), [6]), None, id="usp-section-no-opt-out"),
        pytest.param(request(gpp_string({21: us_section({})}), [21]), GPP_UNREADABLE,
                     id="unknown-applicable-section"),
        pytest.param(request("DBABLA~"), GPP_UNREADABLE, id="truncated-section"),
        pytest.param(request("not gpp at all"), GPP_UNREADABLE, id="garbage"),
        pytest.param(request("DBABLA~BVQqAAAAAAJY.QA~extra"), GPP_UNREADABLE,
                     id="more-sections-than-header"),
        pytest.param(request(gpp_string({7: us_section({})}), [8]), None,
                     id="applicable-section-absent"),
    ],
)  # fmt: skip
def test_gpp_privacy_decision(body: bytes, reason: str | None) -> None:
    assert suppression_reason(decode(body), PrivacyPolicy()) == reason


def test_gpp_switch_off() -> None:
    body = request(gpp_string({7: us_section({18: 1})}), [7])
    assert suppression_reason(decode(body), PrivacyPolicy(honour_gpp=False)) is None
