"""The TCF v2 decoder against real strings and the values a published decoder expects."""

from __future__ import annotations

import pytest

from enrich_server import tcf
from tests.tcf_strings import core_string
from tests.test_privacy import BITFIELD, RANGES

BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


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


def test_bits_read_at_any_offset_matches_the_sextets() -> None:
    text = core_string(purposes_consent=(1, 5, 24), vendors_consent=(3, 700))
    as_int = 0
    for char in text:
        as_int = as_int << 6 | BASE64URL.index(char)
    bits = tcf.Bits(text)
    assert bits.size == len(text) * 6
    for offset, width in [(0, 6), (5, 3), (7, 17), (152, 24), (bits.size - 9, 9)]:
        expected = (as_int >> (bits.size - offset - width)) & ((1 << width) - 1)
        assert bits.read(offset, width) == expected, (offset, width)
    with pytest.raises(tcf.ConsentError):
        bits.read(bits.size - 3, 4)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("AB+C", id="standard-plus"),
        pytest.param("AB/C", id="standard-slash"),
        pytest.param("ABC=", id="padding"),
        pytest.param("AB C", id="space"),
        pytest.param("ABé", id="non-ascii"),
    ],
)
def test_bits_accept_only_the_base64url_alphabet(text: str) -> None:
    with pytest.raises(tcf.ConsentError):
        tcf.Bits(text)


def test_a_string_at_the_limit_is_read_and_one_past_it_refused() -> None:
    # Our vendor 60,000 in a 60,000-bit field: a real decode of an 10 KB core segment, then
    # padded with a disclosed-vendors segment to exactly the limit.
    core = core_string(purposes_consent=(1, 3, 4), vendors_consent=(2, 60_000))
    at_limit = core + "." + "A" * (tcf.MAX_CONSENT_CHARS - len(core) - 1)
    assert len(at_limit) == tcf.MAX_CONSENT_CHARS
    assert tcf.CoreView(at_limit).vendor(60_000) == (True, False)
    assert 60_000 in tcf.decode(at_limit).vendors_consent
    with pytest.raises(tcf.ConsentError, match="longer than"):
        tcf.CoreView(at_limit + "A")


def test_publisher_restrictions_by_vendor_range() -> None:
    tc = tcf.CoreView(
        core_string(
            purposes_consent=(1, 3, 4),
            vendors_consent=(10, 20),
            restrictions=[(3, tcf.NOT_ALLOWED, (5, 15)), (4, tcf.REQUIRE_LI, (20, 20))],
        )
    )
    assert tc.restrictions(10) == {3: tcf.NOT_ALLOWED}
    assert tc.restrictions(20) == {4: tcf.REQUIRE_LI}
    assert tc.restrictions(16) == {}


def test_truncated_publisher_restrictions_are_an_error() -> None:
    text = core_string(vendors_consent=(10,), restrictions=[(3, tcf.NOT_ALLOWED, (5, 15))])
    with pytest.raises(tcf.ConsentError):
        tcf.CoreView(text[:-4]).restrictions(10)
