"""Decisions on GPP and TCF strings made by the IAB reference encoders.

The strings and the decision each must get are in tests/fixtures/privacy_vectors.json,
generated once by tests/fixtures/gen_privacy_vectors.mjs with @iabgpp/cmpapi and
@iabtechlabtcf/core (node is not needed here). ``fields`` is what the reference decoder reads
back from each string: our decoder must read the same values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from enrich_server import gpp, tcf
from enrich_server.openrtb import decode
from enrich_server.privacy import (
    GDPR_DENIED,
    US_RULE_SETS,
    Privacy,
    PrivacyPolicy,
)

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent / "fixtures" / "privacy_vectors.json").read_text()
)["vectors"]
GPP_VECTORS = [v for v in VECTORS if v["kind"] == "gpp"]
TCF_VECTORS = [v for v in VECTORS if v["kind"] == "tcf"]
SECTION_IDS = {section.name: section_id for section_id, section in gpp.US_SECTIONS.items()}


def _gpp_body(vector: dict[str, Any]) -> bytes:
    regs: dict[str, Any] = {"gpp": vector["gpp"]}
    if vector["gpp_sid"] is not None:
        regs["gpp_sid"] = vector["gpp_sid"]
    return json.dumps({"regs": regs, "user": {"id": "u"}}).encode()


def test_every_published_us_section_has_vectors() -> None:
    covered = {int(v["id"].split("-")[0]) for v in GPP_VECTORS if v["id"][0].isdigit()}
    assert covered == set(range(7, 28)) == set(gpp.US_SECTIONS)
    for section_id in gpp.US_SECTIONS:
        labels = [v["id"] for v in GPP_VECTORS if v["id"].startswith(f"{section_id}-")]
        assert any(label.endswith("-not-opted-out") for label in labels), section_id
        assert any(label.endswith("-opted-out") and "not-opted" not in label for label in labels)


@pytest.mark.parametrize("vector", GPP_VECTORS, ids=[v["id"] for v in GPP_VECTORS])
def test_gpp_fields_read_as_the_reference_decoder_reads_them(vector: dict[str, Any]) -> None:
    sections = gpp.parse(vector["gpp"])
    for name, expected in vector["fields"].items():
        section_id = SECTION_IDS[name]
        values = gpp.read_us(section_id, sections[section_id])
        reference = {
            field: tuple(value) if isinstance(value, list) else value
            for field, value in expected.items()
            if field != "GpcSegmentType"  # the sub-section's type, not a field we act on
        }
        assert values == reference


@pytest.mark.parametrize("rules", US_RULE_SETS)
@pytest.mark.parametrize("vector", GPP_VECTORS, ids=[v["id"] for v in GPP_VECTORS])
def test_gpp_decision(vector: dict[str, Any], rules: str) -> None:
    privacy = Privacy(PrivacyPolicy(us_rules=rules))
    assert privacy.suppression_reason(decode(_gpp_body(vector))) == vector[rules]


@pytest.mark.parametrize("vector", TCF_VECTORS, ids=[v["id"] for v in TCF_VECTORS])
def test_tcf_fields_and_decision(vector: dict[str, Any]) -> None:
    fields = vector["fields"]
    tc = tcf.decode(vector["tcf"])
    assert tc.policy_version == fields["policy_version"]
    assert sorted(tc.purposes_consent) == fields["purposes_consent"]
    assert sorted(tc.purposes_legitimate_interest) == fields["purposes_li"]
    assert sorted(tc.vendors_consent) == fields["vendors_consent"]
    assert sorted(tc.vendors_legitimate_interest) == fields["vendors_li"]
    view = tcf.CoreView(vector["tcf"])
    for vendor, restrictions in fields["restrictions"].items():
        assert sorted(view.restrictions(int(vendor)).items()) == sorted(
            (purpose, kind) for purpose, kind in restrictions
        ), vendor
    policy = PrivacyPolicy(gdpr_vendor_id=vector["vendor"], gdpr_purposes=tuple(vector["purposes"]))
    body = json.dumps({"regs": {"gdpr": 1}, "user": {"consent": vector["tcf"]}}).encode()
    assert Privacy(policy).suppression_reason(decode(body)) == vector["decision"]
    assert vector["decision"] in (None, GDPR_DENIED)
