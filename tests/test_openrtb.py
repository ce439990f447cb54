from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

from enrich_server.openrtb import (
    BidRequest,
    consent,
    decode,
    eids,
    gdpr,
    gpids,
    us_privacy,
)


def test_decode_seed_app_reads_every_field_we_use(seed_bodies: dict[str, bytes]) -> None:
    request = decode(seed_bodies["app"])
    assert request.user is not None
    assert request.user.id == "AbcdEfgHijklmnoP"
    assert eids(request.user) == [
        ("ID_Provider.com", "Abcdefgh1234567" * 5),
        ("Provider_id.org", "123456-abcde-123456-abcde-123456"),
    ]
    assert request.device is not None
    assert (request.device.ifa, request.device.lmt) == ("aaaaaaaa-ebad-aaaa-aaaa-aaaaaaa", 0)
    assert request.app is not None
    assert request.app.bundle == "123456789"
    assert request.site is None
    assert gpids(request.imp) == ["/1234567/home/mpu/atf"]
    assert request.regs is not None
    assert (request.regs.coppa, gdpr(request.regs), us_privacy(request.regs)) == (0, 0, "1---")


def test_decode_seed_web_reads_moved_fields_from_ext(seed_bodies: dict[str, bytes]) -> None:
    request = decode(seed_bodies["web"])
    assert request.site is not None
    assert request.site.domain == "example.com"
    assert gpids(request.imp) == ["/1234567/home/mpu/atf"]  # imp.ext.gpid
    assert gdpr(request.regs) == 0  # regs.ext.gdpr


def test_decode_seed_ctv_reads_us_privacy_from_regs_ext(seed_bodies: dict[str, bytes]) -> None:
    assert us_privacy(decode(seed_bodies["ctv"]).regs) == "1YNN"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(b'{"user":{"consent":"A","ext":{"consent":"B"}}}', "A", id="top-wins"),
        pytest.param(b'{"user":{"ext":{"consent":"B"}}}', "B", id="ext-only"),
        pytest.param(b'{"user":{"consent":null,"ext":{"consent":"B"}}}', "B", id="null-top"),
        pytest.param(b'{"user":{}}', None, id="absent"),
        pytest.param(b"{}", None, id="no-user"),
    ],
)
def test_consent_both_placements(body: bytes, expected: str | None) -> None:
    assert consent(decode(body).user) == expected


@pytest.mark.parametrize(
    ("body", "gdpr_value", "usp"),
    [
        pytest.param(b'{"regs":{"gdpr":1,"ext":{"gdpr":0}}}', 1, None, id="top-gdpr-wins"),
        pytest.param(b'{"regs":{"ext":{"gdpr":1,"us_privacy":"1YYN"}}}', 1, "1YYN", id="ext"),
        pytest.param(b'{"regs":{"us_privacy":"1NNN","ext":{"us_privacy":"1YYN"}}}', None, "1NNN",
                     id="top-usp-wins"),
        pytest.param(b"{}", None, None, id="no-regs"),
    ],
)  # fmt: skip
def test_regs_both_placements(body: bytes, gdpr_value: int | None, usp: str | None) -> None:
    regs = decode(body).regs
    assert (gdpr(regs), us_privacy(regs)) == (gdpr_value, usp)


def test_gpids_both_placements_deduplicated() -> None:
    body = b'{"imp":[{"gpid":"/a","ext":{"gpid":"/x"}},{"ext":{"gpid":"/b"}},{"gpid":"/a"},{}]}'
    assert gpids(decode(body).imp) == ["/a", "/b"]


def test_eids_from_user_and_user_ext() -> None:
    body = (
        b'{"user":{"eids":[{"source":"a.com","uids":[{"id":"1"},{"id":""},{}]}],'
        b'"ext":{"eids":[{"source":"s.com","uids":[{"id":"2"}]},{"uids":[{"id":"3"}]}]}}}'
    )
    assert eids(decode(body).user) == [("a.com", "1"), ("s.com", "2")]


Check = Callable[[BidRequest], bool]


@pytest.mark.parametrize(
    ("body", "check"),
    [
        pytest.param(
            b'{"user":{"id":5,"eids":[{"source":"a.com","uids":[{"id":"x"}]}]}}',
            lambda r: r.user.id is None and eids(r.user) == [("a.com", "x")],
            id="user-id-int-keeps-eids",
        ),
        pytest.param(
            b'{"user":{"id":"u1","eids":"x"}}',
            lambda r: r.user.id == "u1" and eids(r.user) == [],
            id="eids-string",
        ),
        pytest.param(
            b'{"regs":"bad","user":{"id":"u1"}}',
            lambda r: r.user.id == "u1" and r.regs is None,
            id="regs-string",
        ),
        pytest.param(
            b'{"user":{"eids":[5,{"source":"a.com","uids":[7,{"id":9},{"id":"ok"}]}]}}',
            lambda r: eids(r.user) == [("a.com", "ok")],
            id="odd-items-dropped-good-kept",
        ),
        pytest.param(
            b'{"regs":{"coppa":"1"},"device":{"lmt":"1","ifa":"X"}}',
            lambda r: r.regs.coppa == 1 and r.device.lmt == 1 and r.device.ifa == "X",
            id="numeric-strings-still-count-for-privacy",
        ),
        pytest.param(b'{"regs":{"coppa":1.0}}', lambda r: r.regs.coppa == 1, id="integral-float"),
        pytest.param(
            b'{"device":{"ifa":["x"],"lmt":true},"site":{"domain":{"a":1}},"app":[]}',
            lambda r: r.device.ifa is None and r.site.domain is None and r.app is None,
            id="all-wrong",
        ),
        pytest.param(b"null", lambda r: r == BidRequest(), id="null"),
        pytest.param(b"[1,2]", lambda r: r == BidRequest(), id="array"),
        pytest.param(b'"str"', lambda r: r == BidRequest(), id="string"),
        pytest.param(b'{"imp":{"gpid":"/a"}}', lambda r: gpids(r.imp) == [], id="imp-object"),
        pytest.param(b'{"regs":{"gdpr":1e400}}', lambda r: gdpr(r.regs) is None, id="huge-float"),
        pytest.param(
            b'{"regs":{"gdpr":100000000000000000000000000000}}',
            lambda r: gdpr(r.regs) != 1,
            id="huge-int",
        ),
    ],
)
def test_decode_wrong_types_are_ignored_not_fatal(body: bytes, check: Check) -> None:
    request = decode(body)
    assert check(request), request


def test_decode_unknown_fields_are_skipped() -> None:
    body = b'{"id":"r1","ext":{"deep":[[[{"x":1}]]]},"user":{"id":"u","yob":1990,"data":[{}]}}'
    user = decode(body).user
    assert user is not None
    assert user.id == "u"


@pytest.mark.parametrize(
    "body", [b"", b"{", b"nope", b'{"user":}', b"\xff\xfe", b'{"a":1}{"b":2}'], ids=repr
)
def test_decode_not_json_raises_decode_error(body: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decode(body)
