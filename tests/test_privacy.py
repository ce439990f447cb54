from __future__ import annotations

import itertools
import json
import time
import tracemalloc
from collections.abc import Iterator

import pytest

from enrich_server import gpp, tcf
from enrich_server.openrtb import decode
from enrich_server.privacy import (
    CACHE_BUDGET_CHARS,
    COPPA,
    GDPR_DENIED,
    GDPR_NO_CONSENT,
    GPP_UNREADABLE,
    MAX_CACHED,
    MAX_CACHED_CHARS,
    US_PRIVACY,
    Privacy,
    PrivacyPolicy,
    suppression_reason,
    us_reason,
)
from tests.gpp_strings import REAL_USNAT, gpp_body, gpp_string, header_with_range, us_section
from tests.tcf_strings import CONSENTED, core_string

# Real TCF v2 strings from a published decoder's test suite (GDPR-IAB-TCFv2 on CPAN):
# purposes consented 1, 3, 9, 10 (LI 3, 4, 5, 8, 9, 10), policy version 2, vendor 2
# consented but without legitimate interest, vendor 27 both ...
BITFIELD = "CLcVDxRMWfGmWAVAHCENAXCkAKDAADnAABRgA5mdfCKZuYJez-NQm0TBMYA4oCAAGQYIAAAAAAEAIAEgAA"
# ... and no purpose consented at all (vendors as ranges).
RANGES = "COyfVVoOyfVVoADACHENAwCAAAAAAAAAAAAAE5QBgALgAqgD8AQACSwEygJyAnSAMABgAFkAgQCDASeAmYBOgAA"


def gdpr_body(consent: str | None, placement: str = "user") -> bytes:
    request: dict[str, object] = {"regs": {"gdpr": 1}}
    if consent is not None:
        request["user"] = (
            {"consent": consent} if placement == "user" else {"ext": {"consent": consent}}
        )
    return json.dumps(request).encode()


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
        pytest.param(gdpr_body(None), GDPR_NO_CONSENT, id="gdpr-no-consent"),
        pytest.param(b'{"regs":{"ext":{"gdpr":1}}}', GDPR_NO_CONSENT, id="gdpr-ext"),
        pytest.param(gdpr_body(""), GDPR_NO_CONSENT, id="gdpr-empty-consent"),
        pytest.param(gdpr_body("not a tcf string!"), GDPR_NO_CONSENT, id="gdpr-malformed"),
        pytest.param(gdpr_body("BOEFEAyOEFEAyAHABDENAI4AAAB9vABAASA"), GDPR_NO_CONSENT,
                     id="gdpr-tcf-v1"),
        pytest.param(gdpr_body(CONSENTED), None, id="gdpr-consented"),
        pytest.param(gdpr_body(CONSENTED, "ext"), None, id="gdpr-consented-ext"),
        pytest.param(gdpr_body(RANGES), GDPR_DENIED, id="gdpr-real-no-purposes"),
        pytest.param(gdpr_body(BITFIELD), None, id="gdpr-real-purpose-4-by-li-policy-v2"),
        pytest.param(b'{"regs":{"gdpr":0}}', None, id="gdpr-0"),
        pytest.param(b'{"regs":{"coppa":1,"us_privacy":"1YYN"}}', COPPA, id="coppa-first"),
    ],
)  # fmt: skip
def test_suppression_reason_default_policy(body: bytes, reason: str | None) -> None:
    assert suppression_reason(decode(body), PrivacyPolicy()) == reason


@pytest.mark.parametrize(
    ("consent", "policy", "allowed"),
    [
        # the real string: purpose 1 consented, 3 consented, 4 by legitimate interest only
        pytest.param(BITFIELD, PrivacyPolicy(gdpr_purposes=(1, 3)), True, id="real-1-3"),
        pytest.param(BITFIELD, PrivacyPolicy(gdpr_purposes=(1, 3, 4)), True,
                     id="real-4-by-li-policy-v2"),
        pytest.param(BITFIELD, PrivacyPolicy(gdpr_purposes=(1, 3, 4), gdpr_vendor_id=2), False,
                     id="real-4-by-li-but-vendor-2-has-no-li"),
        pytest.param(BITFIELD, PrivacyPolicy(gdpr_purposes=(1, 3, 4), gdpr_vendor_id=27), True,
                     id="real-vendor-27-consent-and-li"),
        pytest.param(BITFIELD, PrivacyPolicy(gdpr_purposes=(1, 3), gdpr_vendor_id=2), True,
                     id="real-vendor-2-consented"),
        pytest.param(BITFIELD, PrivacyPolicy(gdpr_purposes=(1, 3), gdpr_vendor_id=4), False,
                     id="real-vendor-4-not-consented"),
        pytest.param(BITFIELD, PrivacyPolicy(gdpr_purposes=(9,), gdpr_vendor_id=1), True,
                     id="real-vendor-1-by-li"),
        # legitimate interest: never for purpose 1; for 3-6 only before TCF 2.2 (policy 4)
        pytest.param(core_string(purposes_li=(1,)), PrivacyPolicy(gdpr_purposes=(1,)), False,
                     id="li-purpose-1"),
        pytest.param(core_string(purposes_li=(4,)), PrivacyPolicy(gdpr_purposes=(4,)), True,
                     id="li-purpose-4-policy-2"),
        pytest.param(core_string(purposes_li=(4,), policy_version=4),
                     PrivacyPolicy(gdpr_purposes=(4,)), False, id="li-purpose-4-tcf-22"),
        pytest.param(core_string(purposes_li=(7,), vendors_li=(9,), policy_version=4),
                     PrivacyPolicy(gdpr_purposes=(7,), gdpr_vendor_id=9), True,
                     id="li-purpose-7-tcf-22"),
        pytest.param(core_string(purposes_consent=(1, 3, 4), vendors_consent=(5,)),
                     PrivacyPolicy(gdpr_vendor_id=6), False, id="our-vendor-missing"),
    ],
)  # fmt: skip
def test_tcf_purposes_and_vendor(consent: str, policy: PrivacyPolicy, allowed: bool) -> None:
    reason = suppression_reason(decode(gdpr_body(consent)), policy)
    assert reason == (None if allowed else GDPR_DENIED)


def test_consent_decisions_are_cached_by_value() -> None:
    privacy = Privacy()
    request = decode(gdpr_body(CONSENTED))
    assert privacy.suppression_reason(request) is None
    assert privacy._decisions == {CONSENTED: None}
    assert privacy.suppression_reason(decode(gdpr_body("junk"))) == GDPR_NO_CONSENT
    assert len(privacy._decisions) == 2


def test_suppression_reason_switches_off() -> None:
    policy = PrivacyPolicy(honour_coppa=False, honour_us_privacy=False, require_gdpr_consent=False)
    request = decode(b'{"regs":{"coppa":1,"us_privacy":"1YYN","gdpr":1}}')
    assert suppression_reason(request, policy) is None


def _timed_reason(privacy: Privacy, body: bytes) -> tuple[str | None, float]:
    request = decode(body)
    started = time.perf_counter()
    reason = privacy.suppression_reason(request)
    return reason, time.perf_counter() - started


@pytest.mark.parametrize("size", [200_000, 1_000_000], ids=["200KB", "1MB"])
def test_huge_consent_string_is_unreadable_at_once(size: int) -> None:
    # A real consented core segment followed by junk segments: readable were it short.
    huge = CONSENTED + "." + "A" * (size - len(CONSENTED) - 1)
    with pytest.raises(tcf.ConsentError, match="longer than"):
        tcf.CoreView(huge)
    reason, seconds = _timed_reason(Privacy(), gdpr_body(huge))
    assert reason == GDPR_NO_CONSENT
    assert seconds < 0.5  # was 2.9 s at 200 KB (quadratic); a linear refusal is microseconds


@pytest.mark.parametrize("size", [200_000, 1_000_000], ids=["200KB", "1MB"])
def test_huge_gpp_string_is_unreadable_at_once(size: int) -> None:
    section = us_section({})  # usnat, no opt-out: readable were the string short
    huge = gpp_string({7: section + "." + "A" * (size - len(section))})
    with pytest.raises(gpp.GppError, match="longer than"):
        gpp.parse(huge)
    reason, seconds = _timed_reason(Privacy(), gpp_body(huge, [7]))
    assert reason == GPP_UNREADABLE
    assert seconds < 0.5


def test_gpp_string_at_the_limit_is_decided() -> None:
    section = us_section({18: 1})  # usnat, opted out of sale
    filler = "A" * (gpp.MAX_GPP_CHARS - len(gpp_string({7: section})) - 1)
    long_gpp = gpp_string({7: section + "." + filler})
    assert len(long_gpp) == gpp.MAX_GPP_CHARS
    assert Privacy().suppression_reason(decode(gpp_body(long_gpp, [7]))) == us_reason("SaleOptOut")


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("DBAB5USgCKY", id="fibonacci-range-of-20M-ids"),
        pytest.param("DBAB" + "Q" * 2000 + "w", id="2000-bit-fibonacci-code"),
        pytest.param(header_with_range(1, 50), id="range-longer-than-the-sections"),
    ],
)
def test_gpp_header_with_a_huge_range_is_unreadable_without_expanding_it(header: str) -> None:
    tracemalloc.start()
    try:
        reason = Privacy().suppression_reason(decode(gpp_body(header + "~x")))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reason == GPP_UNREADABLE
    assert peak < 2_000_000  # was +763 MB: the range expanded into a list of ids


def _held_by(privacy: Privacy, bodies: Iterator[bytes]) -> int:
    """Bytes still allocated after deciding each body (the bodies themselves freed)."""
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for body in bodies:
            privacy.suppression_reason(decode(body))
        after, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return after - before


def test_long_strings_are_not_cached() -> None:
    privacy = Privacy()
    # 120 distinct 30 KB consent strings (readable: under the length limit) and 120 GPP ones
    consents = (gdpr_body(f"{CONSENTED}.{i:06d}{'A' * 30_000}") for i in range(120))
    gpps = (gpp_body(f"{REAL_USNAT}.{i:06d}{'A' * 30_000}", [7]) for i in range(120))
    held = _held_by(privacy, itertools.chain(consents, gpps))
    assert held < 500_000  # was 89 MB for 120 strings of 800 KB
    assert len(privacy._decisions) == len(privacy._gpp_decisions) == 0


def test_cache_is_bounded_in_characters() -> None:
    privacy = Privacy()
    length = MAX_CACHED_CHARS - 8  # the longest strings still cached
    count = 3 * CACHE_BUDGET_CHARS // length  # three budgets' worth
    bodies = (gdpr_body(f"{CONSENTED}.{i:07d}".ljust(length, "A")) for i in range(count))
    held = _held_by(privacy, bodies)
    assert 0 < privacy._decisions.chars <= CACHE_BUDGET_CHARS
    assert len(privacy._decisions) < MAX_CACHED
    # the kept keys plus dict overhead: about the budget, not the 3x that went through
    assert held < 1.5 * CACHE_BUDGET_CHARS


def test_cached_decision_is_the_decision() -> None:
    privacy = Privacy()
    for _ in range(2):
        assert privacy.suppression_reason(decode(gdpr_body(RANGES))) == GDPR_DENIED
        assert privacy.suppression_reason(decode(gpp_body(REAL_USNAT, [7]))) is None
    assert privacy._decisions == {RANGES: GDPR_DENIED}
    assert privacy._decisions.chars == len(RANGES)
