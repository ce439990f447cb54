"""GPP: the header's section ids, US opt-outs, and the privacy decision built on them."""

from __future__ import annotations

import time

import pytest

from enrich_server import gpp, openrtb
from enrich_server.openrtb import decode
from enrich_server.privacy import (
    GDPR_DENIED,
    GPP_UNREADABLE,
    US_PRIVACY,
    PrivacyPolicy,
    suppression_reason,
    us_reason,
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


def test_real_usnat_string_is_read_and_normalised() -> None:
    sections = gpp.parse(REAL_USNAT)
    assert list(sections) == [7]
    values = gpp.read_us(7, sections[7])
    assert (values["Version"], values["SaleOptOut"], values["Gpc"]) == (1, 2, False)
    assert values["SensitiveDataProcessing"] == (0,) * 12  # version 1: 12 categories
    section = gpp.national(7, values)
    assert section.get("SaleOptOutNotice") == 1
    assert section.child == (0, 0)
    assert section.sensitive[12:] == (None,) * 4


@pytest.mark.parametrize(
    "encoded",
    [
        pytest.param(us_section({}, width=54), id="usnat-v1-short"),
        pytest.param("AVQqAAAAAAJY", id="usnat-version-0"),
        pytest.param("DVQqAAAAAAJY", id="usnat-version-3"),
    ],
)
def test_unreadable_us_sections(encoded: str) -> None:
    with pytest.raises(gpp.GppError):
        gpp.read_us(7, encoded)


def test_state_normalisation() -> None:
    # California's fourth category (sex life) is the national first and second; a known
    # child in any band withholds both national bands; sharing notice is absent (None).
    ca = gpp.national(8, {"SensitiveDataProcessing": (0, 0, 0, 1, 0, 0, 0, 0, 2),
                          "KnownChildSensitiveDataConsents": (0, 2), "SaleOptOut": 2})  # fmt: skip
    assert ca.sensitive[:4] == (1, 1, 0, 2)
    assert ca.child == (1, 1)
    assert ca.get("SharingNotice") is None
    # Indiana's one MspaMode: 2 is service provider mode.
    indiana = gpp.national(25, {"MspaMode": 2})
    assert (indiana.get("MspaServiceProviderMode"), indiana.get("MspaOptOutOptionMode")) == (1, 2)
    iowa = gpp.national(18, {"SensitiveDataOptOutNotice": 2})
    assert iowa.get("SensitiveDataProcessingOptOutNotice") == 2


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(gpp_body(REAL_USNAT, [7]), None, id="real-usnat-no-opt-out"),
        pytest.param(gpp_body(gpp_string({7: us_section({18: 1})}), [7]),
                     us_reason("SaleOptOut"), id="usnat-sale-opt-out"),
        pytest.param(gpp_body(gpp_string({8: us_section({14: 1})})), us_reason("SharingOptOut"),
                     id="usca-sharing-no-sid-means-all"),
        pytest.param(gpp_body(gpp_string({7: us_section({}), 9: us_section({14: 1})}), [7]),
                     None, id="opt-out-in-a-section-not-applicable"),
        pytest.param(gpp_body(gpp_string({7: us_section({}), 9: us_section({14: 1})}), [7, 9]),
                     us_reason("TargetedAdvertisingOptOut"), id="va-targeted-opt-out-applicable"),
        pytest.param(gpp_body(gpp_string({2: CONSENTED}), [2]), None, id="tcf-eu-consented"),
        pytest.param(gpp_body(gpp_string({2: RANGES}), [2]), GDPR_DENIED, id="tcf-eu-denied"),
        pytest.param(gpp_body(gpp_string({6: "1YYN"}), [6]), US_PRIVACY, id="usp-section"),
        pytest.param(gpp_body(gpp_string({6: "1YNN"}), [6]), None, id="usp-section-no-opt-out"),
        pytest.param(gpp_body(gpp_string({28: us_section({})}), [28]), GPP_UNREADABLE,
                     id="unknown-applicable-section"),
        pytest.param(gpp_body(gpp_string({3: us_section({}), 7: us_section({})}), [7]), None,
                     id="unknown-section-not-applicable"),
        pytest.param(gpp_body("DBABLA~"), GPP_UNREADABLE, id="truncated-section"),
        pytest.param(gpp_body("not gpp at all"), GPP_UNREADABLE, id="garbage"),
        pytest.param(gpp_body("DBABLA~BVQqAAAAAAJY.QA~extra"), GPP_UNREADABLE,
                     id="more-sections-than-header"),
        pytest.param(gpp_body(gpp_string({7: us_section({})}), [8]), GPP_UNREADABLE,
                     id="applicable-section-absent"),
    ],
)  # fmt: skip
def test_gpp_privacy_decision(body: bytes, reason: str | None) -> None:
    assert suppression_reason(decode(body), PrivacyPolicy()) == reason


def test_gpp_switch_off() -> None:
    body = gpp_body(gpp_string({7: us_section({18: 1})}), [7])
    assert suppression_reason(decode(body), PrivacyPolicy(honour_gpp=False)) is None


def test_fibonacci_run_of_zeros_is_refused_without_big_numbers() -> None:
    # One entry whose Fibonacci code never ends: 360,000 zero bits. Each zero used to grow a
    # big integer (2.5 s for a 64 KiB header); past the largest section id it is refused.
    started = time.perf_counter()
    with pytest.raises(gpp.GppError, match="past"):
        gpp.section_ids("DBAB" + "A" * 60_000)
    assert time.perf_counter() - started < 0.5


def test_more_sections_than_the_limit_are_unreadable_and_cost_little() -> None:
    most = {i: us_section({}) for i in range(1, gpp.MAX_SECTIONS + 1)}
    assert len(gpp.parse(gpp_string(most))) == gpp.MAX_SECTIONS
    too_many = {i: us_section({}) for i in range(1, 4096)}
    started = time.perf_counter()
    with pytest.raises(gpp.GppError, match=f"more than {gpp.MAX_SECTIONS} sections"):
        gpp.parse(gpp_string(too_many))
    assert time.perf_counter() - started < 0.05  # reading 4,095 header codes took 11 ms
    # A header counting more entries than the string's sections is refused before reading.
    with pytest.raises(gpp.GppError, match="more than 1 sections"):
        gpp.section_ids(header(list(range(1, 40))), most=1)


def test_gpp_sid_longer_than_the_limit_withholds_user_data() -> None:
    string = gpp_string({7: us_section({})})
    at_limit = gpp_body(string, [7] * gpp.MAX_SECTIONS)
    assert suppression_reason(decode(at_limit), PrivacyPolicy()) is None
    past = gpp_body(string, [7] * (gpp.MAX_SECTIONS + 1))
    assert suppression_reason(decode(past), PrivacyPolicy()) == GPP_UNREADABLE
    # The lenient path reads lists up to its own limit, which must exceed this one, so a
    # long gpp_sid with a bad item cannot shrink to an acceptable length.
    assert openrtb.MAX_LENIENT_ITEMS > gpp.MAX_SECTIONS
    lenient = decode(gpp_body(string, [7] * 100).replace(b"[7,", b'["x",7,', 1))
    assert suppression_reason(lenient, PrivacyPolicy()) == GPP_UNREADABLE
