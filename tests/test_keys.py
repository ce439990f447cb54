from __future__ import annotations

import json

import pytest

from enrich_server.keys import MAX_KEY_BYTES, parse_key, request_keys
from enrich_server.openrtb import decode


def keys_of(request: object) -> tuple[list[bytes], list[bytes]]:
    return request_keys(decode(json.dumps(request).encode()))


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
    assert keys_of({"site": {"domain": "Example.COM"}}) == ([], [b"domain:example.com"])


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        pytest.param({"ifa": "AAAA-bbbb", "lmt": 0}, [b"ifa:aaaa-bbbb"], id="lowercased"),
        pytest.param({"ifa": "aaaa-bbbb"}, [b"ifa:aaaa-bbbb"], id="no-lmt"),
        pytest.param({"ifa": "aaaa-bbbb", "lmt": 1}, [], id="lmt"),
        pytest.param({"ifa": "00000000-0000-0000-0000-000000000000"}, [], id="all-zeros"),
        pytest.param({"ifa": ""}, [], id="empty"),
    ],
)
def test_request_keys_ifa_rules(device: dict[str, object], expected: list[bytes]) -> None:
    assert keys_of({"device": device}) == (expected, [])


def test_request_keys_skip_empty_and_duplicate_ids() -> None:
    request = {
        "user": {
            "id": "",
            "eids": [
                {"source": "a.com", "uids": [{"id": "1"}]},
                {"source": "A.com", "uids": [{"id": "1"}]},
                {"source": "", "uids": [{"id": "2"}]},
            ],
        },
        "app": {"bundle": ""},
    }
    assert keys_of(request) == ([b"eid:a.com:1"], [])


def test_request_keys_skip_keys_lmdb_cannot_hold() -> None:
    request = {"user": {"id": "x" * MAX_KEY_BYTES}, "device": {"ifa": "ok"}}
    assert keys_of(request) == ([b"ifa:ok"], [])


def test_request_keys_contextual_order() -> None:
    request = {
        "site": {"domain": "d.com"},
        "app": {"bundle": "com.App"},
        "imp": [{"gpid": "/1/a"}, {"ext": {"gpid": "/1/b"}}],
    }
    assert keys_of(request) == (
        [],
        [b"domain:d.com", b"bundle:com.App", b"gpid:/1/a", b"gpid:/1/b"],
    )


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
