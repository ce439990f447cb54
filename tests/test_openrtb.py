from __future__ import annotations

import time
from collections.abc import Callable

import msgspec
import pytest

from enrich_server import openrtb
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


# Hostile input (issue 12): numbers of any size, lone surrogates, long lists, linear cost.

_HUGE_INT = "1" * 4301  # one digit past Python's int-from-text limit
_HUGER_INT = "9" * 60_000


@pytest.mark.parametrize("digits", [_HUGE_INT, _HUGER_INT], ids=["4301-digits", "60k-digits"])
@pytest.mark.parametrize(
    ("template", "check"),
    [
        pytest.param('{"regs":{"coppa":%s},"user":{"id":"u"}}', "coppa", id="regs.coppa"),
        pytest.param('{"user":{"id":%s,"consent":"c"}}', "user.id", id="user.id"),
        pytest.param('{"device":{"ifa":"a","lmt":%s}}', "lmt", id="device.lmt"),
        pytest.param('{"regs":{"ext":{"gdpr":%s,"us_privacy":"1YNN"}}}', "gdpr", id="ext.gdpr"),
        pytest.param('{"regs":{"gpp_sid":[%s,7],"coppa":1}}', "gpp_sid", id="regs.gpp_sid"),
        pytest.param('{"user":{"id":"u","x":%s}}', "unknown", id="unknown-field"),
    ],
)
def test_decode_huge_integers_are_ignored_like_any_wrong_value(
    template: str, check: str, digits: str
) -> None:
    request = decode((template % digits).encode())
    if check == "coppa":
        assert request.regs is not None
        assert request.regs.coppa is None
        assert request.user is not None
        assert request.user.id == "u"
    elif check == "user.id":
        assert request.user is not None
        assert (request.user.id, request.user.consent) == (None, "c")
    elif check == "lmt":
        assert request.device is not None
        assert (request.device.ifa, request.device.lmt) == ("a", None)
    elif check == "gdpr":
        assert (gdpr(request.regs), us_privacy(request.regs)) == (None, "1YNN")
    elif check == "gpp_sid":
        assert request.regs is not None
        assert (request.regs.gpp_sid, request.regs.coppa) == ([7], 1)
    else:
        assert request.user is not None
        assert request.user.id == "u"


@pytest.mark.parametrize(
    ("escaped", "expected"),
    [
        pytest.param(r"U1\ud800", "U1\ufffd", id="lone-high"),
        pytest.param(r"U1\udc00x", "U1\ufffdx", id="lone-low"),
        pytest.param(r"\ud800\ud800\udc00", "\ufffd\U00010000", id="high-then-pair"),
        pytest.param(r"\ud83d\ude00", "\U0001f600", id="pair-kept"),
        pytest.param(r"a\\ud800", "a\\ud800", id="escaped-backslash-is-text"),
        pytest.param(r"a\\\ud800", "a\\\ufffd", id="escaped-backslash-then-lone"),
    ],
)
def test_decode_lone_surrogates_read_as_replacement_character(escaped: str, expected: str) -> None:
    body = b'{"user":{"id":"' + escaped.encode() + b'","eids":5},"site":{"domain":"d"}}'
    request = decode(body)
    assert request.user is not None
    assert request.user.id == expected
    assert request.site is not None
    assert request.site.domain == "d"


def test_lone_surrogate_after_a_wrong_type_is_repaired_too() -> None:
    # The typed decoder stops at the wrong-typed imp and the lenient path meets the surrogate
    # (found by atheris: it was a DecodeError on valid JSON).
    request = decode(b'{"imp":"x","user":{"id":"U1\\ud800"}}')
    assert request.user is not None
    assert request.user.id == "U1\ufffd"


def test_lone_surrogate_repair_is_bounded_and_says_why() -> None:
    half = openrtb.MAX_SURROGATE_ESCAPES // 2
    pair, lone = b"\\ud83d\\ude00", b"\\ud800"
    at_limit = decode(b'{"user":{"id":"' + pair * (half - 1) + lone * 2 + b'"}}')
    assert at_limit.user is not None
    assert at_limit.user.id == "\U0001f600" * (half - 1) + "\ufffd" * 2
    with pytest.raises(openrtb.TooManySurrogateEscapes, match="too many to repair"):
        decode(b'{"user":{"id":"' + pair * half + lone + b'"}}')
    # Pairs alone, however many, never need the repair.
    many = decode(b'{"user":{"id":"' + pair * half * 20 + b'"}}')
    assert many.user is not None
    assert many.user.id == "\U0001f600" * half * 20


def test_decode_malformed_escape_is_still_not_json() -> None:
    with pytest.raises(msgspec.DecodeError):
        decode(b'{"user":{"id":"\\ud800\\x"}}')


def test_eids_read_at_most_the_limit() -> None:
    groups = [{"source": f"s{i}", "uids": [{"id": f"u{i}"}, {"id": ""}]} for i in range(5000)]
    request = decode(msgspec.json.encode({"user": {"eids": groups, "ext": {"eids": groups}}}))
    pairs = eids(request.user)
    assert len(pairs) == openrtb.MAX_EID_UIDS
    assert pairs[-1] == (f"s{openrtb.MAX_EID_UIDS - 1}", f"u{openrtb.MAX_EID_UIDS - 1}")


def test_gpids_read_from_the_first_imps_only() -> None:
    imps = [{"gpid": f"g{i}"} for i in range(10_000)]
    assert gpids(decode(msgspec.json.encode({"imp": imps})).imp) == [
        f"g{i}" for i in range(openrtb.MAX_IMPS)
    ]


def test_lenient_lists_read_up_to_the_limit_and_keep_good_items() -> None:
    bad = {"source": "s", "uids": [{"id": 1}]}
    good = {"source": "t", "uids": [{"id": "v"}]}
    body = msgspec.json.encode({"user": {"eids": [good, bad] * 20_000}})
    pairs = eids(decode(body).user)
    assert pairs == [("t", "v")] * (openrtb.MAX_LENIENT_ITEMS // 2)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            msgspec.json.encode(
                {"user": {"ext": {"eids": [{"source": "s", "uids": [{"id": 1}]}] * 30_000}}}
            ),
            id="bad-leaf-in-every-eid",
        ),
        pytest.param(
            msgspec.json.encode(
                {"user": {"eids": [{"source": "s", "uids": [{"id": "x"}]}] * 30_000 + [5]}}
            ),
            id="one-bad-item-after-many-good",
        ),
        pytest.param(msgspec.json.encode({"imp": [{"ext": {"gpid": 1}}] * 60_000}), id="imps"),
    ],
)
def test_lenient_decode_is_linear_on_megabyte_bodies(body: bytes) -> None:
    # Before the field-by-field path these took 2-10 s (every item rebuilt at each level and
    # converted through the generic Python path); now a few ms. The bound is generous on
    # purpose: it separates linear from quadratic, not fast from slow.
    assert len(body) > 900_000
    started = time.perf_counter()
    request = decode(body)
    assert time.perf_counter() - started < 0.5
    assert request.user is not None or request.imp is not None
