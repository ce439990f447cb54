"""The TCF v2 decoder against real strings and the values a published decoder expects."""

from __future__ import annotations

import pytest

from enrich_server import tcf
from tests.tcf_strings import core_string
from tests.test_privacy import BITFIELD, RANGES


def test_decode_bitfield_string() -> None:
    tc = tcf.decode(BITFIELD)
    assert (tc.version, tc.policy_version, tc.purpose_one_treatment) == (2, 2, False)
    assert tc.purposes_consent == {1, 3, 9, 10}
    assert tc.purposes_legitimate_interest == {3, 4, 5, 8, 9, 10}
    assert tc.special_features == {2}
    assert tc.vendors_consent == {
        2, 3, 6, 7, 8, 10, 12, 13, 14, 15, 16, 21, 25, 27, 30, 31, 34, 35, 37, 38, 39, 42, 43,
        49, 52, 54, 55, 56, 57, 59, 60, 63, 64, 65, 66, 67, 68, 69, 73, 74, 76, 78, 83, 86, 87,
        89, 90, 92, 96, 99, 100, 106, 109, 110, 114, 115,
    }  # fmt: skip
    assert tc.vendors_legitimate_interest == {1, 9, 26, 27, 30, 36, 37, 43, 86, 97, 110, 113}


def test_decode_range_string_and_ignores_other_segments() -> None:
    tc = tcf.decode(RANGES)
    assert tc.purposes_consent == frozenset()
    assert tc.vendors_consent == {23, 42, 126, 127, 128, 587, 613, 626}
    assert tc.vendors_legitimate_interest == {24, 44, 129, 130, 131, 591, 614, 628}
    assert tcf.decode(BITFIELD + ".argAC0gAAAAAAAAAAAA") == tcf.decode(BITFIELD)


def test_encoder_round_trip() -> None:
    tc = tcf.decode(core_string((1, 24), (2,), (7, 300), (1,), policy_version=4))
    assert (tc.purposes_consent, tc.purposes_legitimate_interest) == (
        frozenset({1, 24}),
        frozenset({2}),
    )
    assert (tc.vendors_consent, tc.vendors_legitimate_interest) == (
        frozenset({7, 300}),
        frozenset({1}),
    )
    assert tc.policy_version == 4


@pytest.mark.parametrize(
    ("consent", "why"),
    [
        pytest.param("", "truncated", id="empty"),
        pytest.param("C!!!", "not base64url", id="not-base64"),
        pytest.param(BITFIELD[:40], "truncated", id="cut-in-vendors"),
        pytest.param("BOEFEAyOEFEAyAHABDENAI4AAAB9vABAASA", "version 1", id="tcf-v1"),
    ],
)
def test_decode_rejects(consent: str, why: str) -> None:
    with pytest.raises(tcf.ConsentError, match=why):
        tcf.decode(consent)


@pytest.mark.parametrize("consent", [BITFIELD, RANGES], ids=["bitfield", "ranges"])
def test_core_view_agrees_with_full_decode(consent: str) -> None:
    full = tcf.decode(consent)
    view = tcf.CoreView(consent)
    assert view.policy_version == full.policy_version
    for purpose in range(1, 25):
        assert view.purpose_consent(purpose) == (purpose in full.purposes_consent)
        assert view.purpose_li(purpose) == (purpose in full.purposes_legitimate_interest)
    for vendor in range(1, 640):
        assert view.vendor(vendor) == (
            vendor in full.vendors_consent,
            vendor in full.vendors_legitimate_interest,
        ), vendor
