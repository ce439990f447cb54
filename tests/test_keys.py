from __future__ import annotations

import pytest

from enrich_server.keys import MAX_KEY_BYTES, parse_key, request_keys
from enrich_server.openrtb import RequestView, decode


def test_request_keys_seed_app_in_order(seed_bodies: dict[str, bytes]) -> None:
    user, context = request_keys(decode(seed_bodies["app"]))
    assert user == [
        b"uid:AbcdEfgHijklmnoP",
        b"eid:id_provider.com:" + b"Abcdefgh1234567" * 5,
        b"eid:provider_id.org:123456-abcde-123456-abcde-123456",
        b"ifa:aaaaaaaa-ebad-aaaa-aaaa-aaaaaaa",
    ]
    assert context == [b"bundle:123456789", b"gpid:/1234567/home/mpu/atf"]


def test_request_keys_web_has_domain_lowercased() -> None:
    _, context = request_keys(RequestView(domain="Example.COM"))
    assert context == [b"domain:example.com"]


@pytest.mark.parametrize(
    ("ifa", "lmt", "expected"),
    [
        pytest.param("AAAA-bbbb", 0, [b"ifa:aaaa-bbbb"], id="lowercased"),
        pytest.param("aaaa-bbbb", None, [b"ifa:aaaa-bbbb"], id="no-lmt"),
        pytest.param("aaaa-bbbb", 1, [], id="lmt"),
        pytest.param("00000000-0000-0000-0000-000000000000", 0, [], id="all-zeros"),
        pytest.param("", 0, [], id="empty"),
    ],
)
def test_request_keys_ifa_rules(ifa: str, lmt: int | None, expected: list[bytes]) -> None:
    user, _ = request_keys(RequestView(ifa=ifa, lmt=lmt))
    assert user == expected


def test_request_keys_skip_empty_and_duplicate_ids() -> None:
    view = RequestView(user_id="", eids=[("a.com", "1"), ("A.com", "1"), ("", "2")], bundle="")
    user, context = request_keys(view)
    assert user == [b"eid:a.com:1"]
    assert context == []


def test_request_keys_skip_keys_lmdb_cannot_hold() -> None:
    user, _ = request_keys(RequestView(user_id="x" * MAX_KEY_BYTES, ifa="ok"))
    assert user == [b"ifa:ok"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("uid:AbC", b"uid:AbC"),
        ("ifa:AAA-B", b"ifa:aaa-b"),
        ("eid:ID_Provider.com:XyZ", b"eid:id_provider.com:XyZ"),
        ("eid:src:id:with:colons", b"eid:src:id:with:colons"),
        ("domain:Example.com", b"domain:example.com"),
        ("bundle:Com.App", b"bundle:Com.App"),
        ("gpid:/1/home", b"gpid:/1/home"),
    ],
)
def test_parse_key_normalises_like_requests(text: str, expected: bytes) -> None:
    assert parse_key(text) == expected


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("nocolon", "no namespace"),
        ("foo:bar", "unknown namespace 'foo'"),
        ("uid:", "empty id"),
        ("eid:onlysource", "eid:<source>:<id>"),
        ("eid::id", "eid:<source>:<id>"),
        ("uid:" + "x" * 600, "longer than 511 bytes"),
    ],
)
def test_parse_key_rejects_with_reason(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_key(text)
