"""User sync pieces without HTTP: redirect targets, signatures, our user id."""

from __future__ import annotations

import re

import pytest

from enrich_server.ingest.sync import (
    ReplayGuard,
    SignatureChecker,
    canonical_query,
    our_user_id,
    raw_sync_target,
    redirect_problem,
    sign,
    their_id_problem,
    user_cookie,
    with_user_id,
)

HOSTS = ("go.flx1.com",)

#: Open-redirect attempts: every one must be refused. (name, out)
OPEN_REDIRECTS = [
    ("other host", "https://evil.example/uid?u=[[USERID]]"),
    ("javascript scheme", "javascript:alert(1)//go.flx1.com"),
    ("javascript mixed case", "JaVaScRiPt:alert(document.cookie)"),
    ("data scheme", "data:text/html,<script>alert(1)</script>"),
    ("scheme-relative", "//evil.example/go.flx1.com"),
    ("no scheme", "go.flx1.com/uid"),
    ("single slash", "https:/evil.example"),
    ("no slashes", "https:evil.example"),
    ("backslashes", "https:\\\\evil.example"),
    ("backslash after host", "https://go.flx1.com\\@evil.example"),
    ("user info", "https://go.flx1.com@evil.example/"),
    ("user info with password", "https://go.flx1.com:pw@evil.example/"),
    ("allowed host as suffix", "https://go.flx1.com.evil.example/"),
    ("allowed host as prefix", "https://evilgo.flx1.com/"),
    ("encoded dot in host", "https://go%2eflx1%2ecom/"),
    ("encoded at sign", "https://go.flx1.com%40evil.example/"),
    ("tab inside scheme", "java\tscript:alert(1)"),
    ("newline in host", "https://go.flx1.com\n.evil.example/"),
    ("space in url", "https://go.flx1.com /"),
    ("trailing dot host", "https://go.flx1.com./"),
    ("unicode lookalike host", "https://gо.flx1.com/"),  # noqa: RUF001 - Cyrillic o on purpose
    ("ftp scheme", "ftp://go.flx1.com/"),
    ("bad port", "https://go.flx1.com:99999/"),
    ("empty port", "https://go.flx1.com:/"),
    ("empty", ""),
    ("host in query only", "https://evil.example/?next=https://go.flx1.com/"),
    ("host in fragment only", "https://evil.example#https://go.flx1.com/"),
]


@pytest.mark.parametrize(("name", "out"), OPEN_REDIRECTS, ids=[n for n, _ in OPEN_REDIRECTS])
def test_open_redirect_attempts_are_refused(name: str, out: str) -> None:
    assert redirect_problem(out, HOSTS) is not None, name


def test_the_table_is_big_enough() -> None:
    assert len(OPEN_REDIRECTS) >= 15


@pytest.mark.parametrize(
    "out",
    [
        "https://go.flx1.com/uid?userid=[[USERID]]&pl=99999&plsec=verysecure",
        "http://go.flx1.com/uid?userid=[[USERID]]",
        "HTTPS://GO.FLX1.COM/uid",
        "https://go.flx1.com:8443/uid?x=%40",
        "https://go.flx1.com",
    ],
)
def test_allowed_targets_pass(out: str) -> None:
    assert redirect_problem(out, HOSTS) is None


def test_no_allowed_hosts_refuses_everything() -> None:
    assert redirect_problem("https://go.flx1.com/", ()) is not None


def test_raw_target_keeps_the_templates_own_parameters() -> None:
    raw = "out=https://go.flx1.com/uid?userid=[[USERID]]&pl=99999&plsec=verysecure"
    assert (
        raw_sync_target(raw)
        == "https://go.flx1.com/uid?userid=[[USERID]]&pl=99999&plsec=verysecure"
    )


def test_raw_target_encoded_as_a_whole_is_decoded_once() -> None:
    raw = "out=https%3A%2F%2Fgo.flx1.com%2Fuid%3Fuserid%3D%5B%5BUSERID%5D%5D%26pl%3D1"
    assert raw_sync_target(raw) == "https://go.flx1.com/uid?userid=[[USERID]]&pl=1"
    # Encoded twice: decoded once it is still not a URL, so it is refused, not chased.
    twice = raw_sync_target("out=https%253A%252F%252Fevil.example")
    assert twice is not None
    assert redirect_problem(twice, HOSTS) is not None


def test_raw_target_must_come_first() -> None:
    assert raw_sync_target("pl=1&out=https://go.flx1.com/") is None


def test_macro_replaced_raw_and_encoded() -> None:
    assert (
        with_user_id("https://h/?a=[[USERID]]&b=%5b%5bUSERID%5d%5d", "U1") == "https://h/?a=U1&b=U1"
    )


def test_our_user_id_from_cookie_or_new() -> None:
    mine, new = our_user_id("AAAAAAAAAAAAAAAAAAAAAA")
    assert (mine, new) == ("AAAAAAAAAAAAAAAAAAAAAA", False)
    fresh, new = our_user_id(None)
    assert new
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", fresh)
    # A cookie we could not have set (too short, odd characters) is replaced.
    assert our_user_id("x")[1]
    assert our_user_id("a;b=c" * 5)[1]
    assert our_user_id(None)[0] != fresh


def test_cookie_is_cross_site_and_secure() -> None:
    cookie = user_cookie("enrich_uid", "U1", 60)
    assert cookie.startswith("enrich_uid=U1;")
    assert "Secure" in cookie
    assert "SameSite=None" in cookie
    assert "HttpOnly" in cookie
    assert "Max-Age=60" in cookie


def test_their_id_checks() -> None:
    assert their_id_problem("abc-def123") is None
    assert their_id_problem("") is not None
    assert their_id_problem("a b") is not None
    assert their_id_problem("a\x00") is not None
    assert their_id_problem("x" * 300) is not None


def test_canonical_query_is_sorted_and_encoded() -> None:
    params = [("ts", "10"), ("out", "https://h/?a=1&b=[[USERID]]"), ("pl", "7"), ("sig", "zz")]
    assert canonical_query(params) == (
        b"out=https%3A%2F%2Fh%2F%3Fa%3D1%26b%3D%5B%5BUSERID%5D%5D&pl=7&ts=10"
    )


def test_signature_checker() -> None:
    checker = SignatureChecker(window=300)
    params = [("userid", "abc"), ("pl", "7"), ("ts", "1000")]
    good = [*params, ("sig", sign("secret", params))]
    assert checker.problem("secret", good, now=1100) is None
    fresh = [("userid", "abc"), ("pl", "7"), ("ts", "1001")]
    signed = [*fresh, ("sig", sign("secret", fresh).upper())]
    assert checker.problem("secret", signed, now=1100) is None  # hex case does not matter
    tampered = [("userid", "abd"), ("pl", "7"), ("ts", "1002")]
    assert checker.problem("secret", [*tampered, ("sig", sign("secret", fresh))], now=1100) == (
        "bad signature"
    )
    wrong_key = [("userid", "abc"), ("pl", "7"), ("ts", "1003")]
    assert checker.problem("secret", [*wrong_key, ("sig", sign("other", wrong_key))], 1100) == (
        "bad signature"
    )
    stale = [("userid", "abc"), ("pl", "7"), ("ts", "500")]
    assert "away from our clock" in str(
        checker.problem("secret", [*stale, ("sig", sign("secret", stale))], 1100)
    )
    assert "ts" in str(checker.problem("secret", [("userid", "a"), ("sig", "00")], 1100))


def test_replay_guard() -> None:
    guard = ReplayGuard(window=300)
    assert guard.first_use("aa", now=1000)
    assert not guard.first_use("aa", now=1200)
    assert guard.first_use("bb", now=1200)
    # long past the window the signature is forgotten (its ts check refuses it anyway)
    assert guard.first_use("aa", now=2000)
