from __future__ import annotations

import msgspec
import pytest

from enrich_server.openrtb import RequestView, decode


def test_decode_seed_app_reads_every_field_we_use(seed_bodies: dict[str, bytes]) -> None:
    view = decode(seed_bodies["app"])
    assert view.user_id == "AbcdEfgHijklmnoP"
    assert view.eids == [
        ("ID_Provider.com", "Abcdefgh1234567" * 5),
        ("Provider_id.org", "123456-abcde-123456-abcde-123456"),
    ]
    assert view.ifa == "aaaaaaaa-ebad-aaaa-aaaa-aaaaaaa"
    assert view.lmt == 0
    assert view.bundle == "123456789"
    assert view.domain is None
    assert view.gpids == ["/1234567/home/mpu/atf"]
    assert (view.coppa, view.gdpr, view.us_privacy) == (0, 0, "1---")


def test_decode_seed_web_reads_moved_fields_from_ext(seed_bodies: dict[str, bytes]) -> None:
    view = decode(seed_bodies["web"])
    assert view.domain == "example.com"
    assert view.gpids == ["/1234567/home/mpu/atf"]  # imp.ext.gpid
    assert view.gdpr == 0  # regs.ext.gdpr


def test_decode_seed_ctv_reads_us_privacy_from_regs_ext(seed_bodies: dict[str, bytes]) -> None:
    view = decode(seed_bodies["ctv"])
    assert view.us_privacy == "1YNN"
    assert view.bundle == "MYBUNDLE"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b'{"user":{"consent":"A","ext":{"consent":"B"}}}', "A", id="top-wins"),
        pytest.param(b'{"user":{"ext":{"consent":"B"}}}', "B", id="ext-only"),
        pytest.param(b'{"user":{"consent":null,"ext":{"consent":"B"}}}', "B", id="null-top"),
    ],
)
def test_decode_consent_both_placements(body: bytes, expected: str) -> None:
    assert decode(body).consent == expected


@pytest.mark.parametrize(
    ("body", "gdpr", "us_privacy"),
    [
        pytest.param(b'{"regs":{"gdpr":1,"ext":{"gdpr":0}}}', 1, None, id="top-gdpr-wins"),
        pytest.param(b'{"regs":{"ext":{"gdpr":1,"us_privacy":"1YYN"}}}', 1, "1YYN", id="ext"),
        pytest.param(b'{"regs":{"us_privacy":"1NNN","ext":{"us_privacy":"1YYN"}}}', None, "1NNN",
                     id="top-usp-wins"),
    ],
)  # fmt: skip
def test_decode_regs_both_placements(body: bytes, gdpr: int | None, us_privacy: str | None) -> None:
    view = decode(body)
    assert (view.gdpr, view.us_privacy) == (gdpr, us_privacy)


def test_decode_gpid_both_placements_deduplicated() -> None:
    body = b'{"imp":[{"gpid":"/a","ext":{"gpid":"/x"}},{"ext":{"gpid":"/b"}},{"gpid":"/a"},{}]}'
    assert decode(body).gpids == ["/a", "/b"]


def test_decode_eids_from_user_ext_too() -> None:
    body = b'{"user":{"ext":{"eids":[{"source":"s.com","uids":[{"id":"1"}]}]}}}'
    assert decode(body).eids == [("s.com", "1")]


@pytest.mark.parametrize(
    ("body", "check"),
    [
        pytest.param(
            b'{"user":{"id":5,"eids":[{"source":"a.com","uids":[{"id":"x"}]}]}}',
            lambda v: v.user_id is None and v.eids == [("a.com", "x")],
            id="user-id-int-keeps-eids",
        ),
        pytest.param(
            b'{"user":{"id":"u1","eids":"x"}}',
            lambda v: v.user_id == "u1" and v.eids == [],
            id="eids-string",
        ),
        pytest.param(
            b'{"regs":"bad","user":{"id":"u1"}}',
            lambda v: v.user_id == "u1" and v.coppa is None,
            id="regs-string",
        ),
        pytest.param(
            b'{"user":{"eids":[5,{"source":"a.com","uids":[7,{"id":9},{"id":"ok"}]}]}}',
            lambda v: v.eids == [("a.com", "ok")],
            id="odd-items-dropped-good-kept",
        ),
        pytest.param(
            b'{"regs":{"coppa":"1"},"device":{"lmt":"1","ifa":"X"}}',
            lambda v: v.coppa == 1 and v.lmt == 1 and v.ifa == "X",
            id="numeric-strings-still-count-for-privacy",
        ),
        pytest.param(
            b'{"device":{"ifa":["x"],"lmt":true},"site":{"domain":{"a":1}},"app":[]}',
            lambda v: v.ifa is None and v.domain is None and v.bundle is None,
            id="all-wrong",
        ),
        pytest.param(b"null", lambda v: v == RequestView(), id="null"),
        pytest.param(b"[1,2]", lambda v: v == RequestView(), id="array"),
        pytest.param(b'"str"', lambda v: v == RequestView(), id="string"),
        pytest.param(b'{"imp":{"gpid":"/a"}}', lambda v: v.gpids == [], id="imp-object"),
        pytest.param(b'{"regs":{"gdpr":1e400}}', lambda v: v.gdpr is None, id="huge-float"),
    ],
)
def test_decode_wrong_types_are_ignored_not_fatal(body: bytes, check: object) -> None:
    view = decode(body)
    assert callable(check)
    assert check(view), view


def test_decode_unknown_fields_are_skipped() -> None:
    body = b'{"id":"r1","ext":{"deep":[[[{"x":1}]]]},"user":{"id":"u","yob":1990,"data":[{}]}}'
    assert decode(body).user_id == "u"


@pytest.mark.parametrize(
    "body", [b"", b"{", b"nope", b'{"user":}', b"\xff\xfe", b'{"a":1}{"b":2}'], ids=repr
)
def test_decode_not_json_raises_decode_error(body: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode(body)
