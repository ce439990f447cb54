"""Endpoint auth: header and query tokens, OAuth2 client credentials, IP allow-lists."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from starlette.testclient import TestClient

from enrich_server.app import create_app
from enrich_server.auth import (
    BAD_CREDENTIALS,
    IP_NOT_ALLOWED,
    NO_CREDENTIALS,
    EndpointAuth,
    TokenSigner,
)
from enrich_server.config import AuthConfig, load_config
from tests.conftest import StoreFactory
from tests.test_metrics import samples
from tests.utils import run_server

BODY = b'{"user":{"id":"u"}}'
CC = {"grant_type": "client_credentials"}


def scope(
    headers: dict[str, str] | None = None, query: str = "", client: str = "127.0.0.1"
) -> dict[str, object]:
    return {
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "query_string": query.encode(),
        "client": (client, 50000),
    }


TOKENS = AuthConfig(header="X-Api-Key", query="token", tokens=("t-one", "t-two"))


@pytest.mark.parametrize(
    ("request_scope", "reason"),
    [
        pytest.param(scope({"X-Api-Key": "t-one"}), None, id="header"),
        pytest.param(scope({"X-Api-Key": "t-two"}), None, id="header-second-token"),
        pytest.param(scope(query="a=1&token=t-one"), None, id="query"),
        pytest.param(scope(query="token=t%2Done"), None, id="query-url-encoded"),
        pytest.param(scope({"X-Api-Key": "t-three"}), BAD_CREDENTIALS, id="header-wrong"),
        pytest.param(scope(query="token=t-on"), BAD_CREDENTIALS, id="query-prefix"),
        pytest.param(scope(query="xtoken=t-one"), NO_CREDENTIALS, id="other-param"),
        pytest.param(
            scope({"Authorization": "Bearer t-one"}), BAD_CREDENTIALS, id="bearer-no-oauth"
        ),
        pytest.param(scope(), NO_CREDENTIALS, id="nothing"),
    ],
)
def test_tokens(request_scope: dict[str, object], reason: str | None) -> None:
    rejection = EndpointAuth(TOKENS).check(request_scope)
    assert (rejection.reason if rejection else None) == reason
    if rejection:
        assert rejection.status == 401


def test_open_when_nothing_configured() -> None:
    assert not EndpointAuth(AuthConfig()).enabled
    assert not EndpointAuth(AuthConfig(header="X-Api-Key")).enabled  # a header but no tokens


def test_oauth_tokens_verify_expire_and_rotate() -> None:
    old = TokenSigner(["key-old"], ttl=60)
    rotated = TokenSigner(["key-new", "key-old"], ttl=60)
    token = old.issue("index", now=1000).encode()
    assert rotated.verify(token, now=1030)  # issued before the rotation: still good
    assert not rotated.verify(token, now=1060)  # expired
    assert not TokenSigner(["key-new"], ttl=60).verify(token, now=1030)  # old key retired
    payload, signature = token.rsplit(b".", 1)
    tampered = payload[:-2] + (b"AA" if payload[-2:] != b"AA" else b"BB") + b"." + signature
    assert not rotated.verify(tampered, now=1030)
    assert not rotated.verify(b"garbage", now=1030)
    assert TokenSigner(["key-new"], ttl=60).issue("x").startswith("v1.")


@pytest.mark.parametrize(
    ("client", "forwarded", "trusted", "allowed"),
    [
        pytest.param("203.0.113.7", None, (), True, id="v4-in-range"),
        pytest.param("198.51.100.1", None, (), False, id="v4-out-of-range"),
        pytest.param("2001:db8::1", None, (), True, id="v6-in-range"),
        pytest.param("2001:db9::1", None, (), False, id="v6-out-of-range"),
        pytest.param("198.51.100.1", "203.0.113.7", (), False, id="xff-spoof-untrusted-peer"),
        pytest.param("10.0.0.5", "203.0.113.7", ("10.0.0.0/8",), True, id="xff-behind-proxy"),
        pytest.param("10.0.0.5", "203.0.113.7, 198.51.100.1", ("10.0.0.0/8",), False,
                     id="xff-rightmost-untrusted-wins"),
        pytest.param("10.0.0.5", "203.0.113.7, 10.0.0.9", ("10.0.0.0/8",), True,
                     id="xff-chain-of-proxies"),
        pytest.param("10.0.0.5", "not-an-ip", ("10.0.0.0/8",), False, id="xff-garbage"),
        pytest.param("10.0.0.5", None, ("10.0.0.0/8",), False, id="proxy-itself-not-allowed"),
    ],
)  # fmt: skip
def test_ip_allow_list(
    client: str, forwarded: str | None, trusted: tuple[str, ...], allowed: bool
) -> None:
    config = AuthConfig(allow_cidrs=("203.0.113.0/24", "2001:db8::/32"), trusted_proxies=trusted)
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    rejection = EndpointAuth(config).check(scope(headers, client=client))
    assert (rejection is None) == allowed
    if rejection:
        assert (rejection.status, rejection.reason) == (403, IP_NOT_ALLOWED)


def test_allow_list_and_token_both_required() -> None:
    config = AuthConfig(header="X-Api-Key", tokens=("t",), allow_cidrs=("203.0.113.0/24",))
    auth = EndpointAuth(config)
    assert auth.check(scope({"X-Api-Key": "t"}, client="203.0.113.1")) is None
    assert auth.check(scope({"X-Api-Key": "t"}, client="198.51.100.1")).status == 403  # type: ignore[union-attr]
    assert auth.check(scope(client="203.0.113.1")).status == 401  # type: ignore[union-attr]


@pytest.fixture
def oauth_client(make_store: StoreFactory) -> Iterator[TestClient]:
    flags = {
        "server.store": str(make_store("uid:u\tx\n")),
        "enrich.auth.oauth_clients": {"index": "s3cret"},
        "enrich.auth.oauth_keys": ["k1"],
        "enrich.auth.header": "X-Api-Key",
        "enrich.auth.tokens": ["static"],
        "enrich.guard_lag_ms": 0.0,  # a loaded VM's lag must not shed these answers
    }
    with TestClient(create_app(load_config(flags=flags))) as client:
        yield client


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_oauth_client_credentials_flow_over_http(oauth_client: TestClient) -> None:
    issued = oauth_client.post(
        "/oauth/token", data={"grant_type": "client_credentials"}, headers=basic("index", "s3cret")
    )
    assert issued.status_code == 200
    grant = issued.json()
    assert grant["token_type"] == "Bearer"
    assert grant["expires_in"] == 3600
    assert issued.headers["cache-control"] == "no-store"
    bearer = {"Authorization": f"Bearer {grant['access_token']}"}
    assert oauth_client.post("/enrich", content=BODY, headers=bearer).json() == {
        "segment_ids": ["x"]
    }
    assert (
        oauth_client.post("/enrich", content=BODY, headers={"X-Api-Key": "static"}).status_code
        == 200
    )
    wrong = oauth_client.post("/enrich", content=BODY, headers={"X-Api-Key": "statics"})
    assert (wrong.status_code, wrong.json()) == (401, {"error": "invalid or expired credentials"})
    refused = oauth_client.post("/enrich", content=BODY, headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert refused.json() == {"error": "invalid or expired credentials"}
    missing = oauth_client.post("/enrich", content=BODY)
    assert (missing.status_code, missing.json()) == (401, {"error": "credentials required"})
    metrics = samples(oauth_client.get("/metrics").text)
    assert metrics[("enrich_auth_rejections_total", (("reason", "bad_credentials"),))] == 2
    assert metrics[("enrich_auth_rejections_total", (("reason", "no_credentials"),))] == 1
    assert metrics[("enrich_requests_total", (("status", "401"),))] == 3


@pytest.mark.parametrize(
    ("headers", "data", "status", "error"),
    [
        pytest.param(basic("index", "wrong"), CC, 401, "invalid_client", id="bad-secret"),
        pytest.param(basic("other", "s3cret"), CC, 401, "invalid_client", id="unknown-client"),
        pytest.param({}, CC, 401, "invalid_client", id="no-auth"),
        pytest.param({"Authorization": "Basic !!!"}, CC, 401, "invalid_client", id="garbled"),
        pytest.param(basic("index", "s3cret"), {"grant_type": "password"}, 400,
                     "unsupported_grant_type", id="grant"),
    ],
)  # fmt: skip
def test_oauth_token_refusals(
    oauth_client: TestClient, headers: dict[str, str], data: dict[str, str], status: int, error: str
) -> None:
    response = oauth_client.post("/oauth/token", data=data, headers=headers)
    assert (response.status_code, response.json()) == (status, {"error": error})


def test_oauth_not_configured_is_404(make_store: StoreFactory) -> None:
    config = load_config(flags={"server.store": str(make_store("uid:u\tx\n"))})
    with TestClient(create_app(config)) as client:
        assert (
            client.post("/oauth/token", data={"grant_type": "client_credentials"}).status_code
            == 404
        )


def test_real_server_query_token_ip_allow_list_and_no_secret_in_logs(
    make_store: StoreFactory, tmp_path: Path
) -> None:
    config = tmp_path / "auth.toml"
    config.write_text(
        '[enrich.auth]\nquery = "token"\ntokens = ["q-SECRET-value"]\n'
        'allow_cidrs = ["127.0.0.0/8", "::1/128"]\n'
    )
    with run_server(make_store("uid:u\tx\n"), "--config", str(config)) as server:
        url = f"{server.url}/enrich"
        assert httpx.post(f"{url}?token=q-SECRET-value", content=BODY).json() == {
            "segment_ids": ["x"]
        }
        assert httpx.post(f"{url}?token=wrong", content=BODY).status_code == 401
        # a spoofed X-Forwarded-For is ignored: no proxy is trusted
        spoofed = httpx.post(f"{url}?token=q-SECRET-value", content=BODY,
                             headers={"X-Forwarded-For": "198.51.100.1"})  # fmt: skip
        assert spoofed.status_code == 200
        log = server.log()
    assert "q-SECRET-value" not in log
    assert "<redacted>" in log
    outside = tmp_path / "outside.toml"
    outside.write_text('[enrich.auth]\nallow_cidrs = ["203.0.113.0/24"]\ntrusted_proxies = []\n')
    with run_server(make_store("uid:u\tx\n"), "--config", str(outside)) as server:
        refused = httpx.post(
            f"{server.url}/enrich", content=BODY, headers={"X-Forwarded-For": "203.0.113.9"}
        )
        assert (refused.status_code, refused.json()) == (
            403,
            {"error": "client address not allowed"},
        )
