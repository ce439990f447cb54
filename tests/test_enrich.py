"""The enrichment endpoint in-process (Starlette TestClient, lifespan running)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from enrich_server.app import create_app
from enrich_server.config import load_config
from enrich_server.enrich import MAX_SEGMENTS
from tests.conftest import StoreFactory
from tests.tcf_strings import CONSENTED

ClientFactory = Callable[..., TestClient]


@pytest.fixture
def client_for(make_store: StoreFactory) -> Iterator[ClientFactory]:
    """Factory: a started TestClient over a store built from snapshot text."""
    clients: list[TestClient] = []

    def start(snapshot: str, **enrich: object) -> TestClient:
        store = make_store(snapshot)
        # The guard off, as for the real-server tests: a loaded VM's lag must not shed here.
        enrich = {"guard_lag_ms": 0.0, **enrich}
        flags = {"server.store": str(store), **{f"enrich.{k}": v for k, v in enrich.items()}}
        client = TestClient(create_app(load_config(flags=flags)))
        client.__enter__()
        clients.append(client)
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


def test_enrich_seed_app_sample(client_for: ClientFactory, seed_bodies: dict[str, bytes]) -> None:
    client = client_for(Path("segments.example.tsv").read_text())
    response = client.post("/enrich", content=seed_bodies["app"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "max-age=86400"
    assert response.json() == {
        "segment_ids": [
            "sports_news", "football_players", "target_shoppers", "gender_female",
            "arsenal", "english_sports", "cat_owners", "ctx_mobile_games", "ctx_homepage_atf",
        ]
    }  # fmt: skip


def test_enrich_user_level_first_then_contextual(client_for: ClientFactory) -> None:
    client = client_for("domain:d.com\tctx,shared\nuid:u\tshared,user\n")
    body = b'{"site":{"domain":"d.com"},"user":{"id":"u"}}'
    assert client.post("/enrich", content=body).json() == {"segment_ids": ["shared", "user", "ctx"]}


def test_enrich_caps_at_exactly_500(client_for: ClientFactory) -> None:
    user = ",".join(f"u{i}" for i in range(400))
    ctx = ",".join(f"c{i}" for i in range(300))
    client = client_for(f"uid:u\t{user}\ndomain:d.com\t{ctx}\n")
    ids = client.post("/enrich", content=b'{"user":{"id":"u"},"site":{"domain":"d.com"}}').json()
    assert len(ids["segment_ids"]) == MAX_SEGMENTS
    assert ids["segment_ids"][399] == "u399"
    assert ids["segment_ids"][400] == "c0"
    assert ids["segment_ids"][-1] == "c99"


def test_enrich_nothing_known_is_empty_no_cache(client_for: ClientFactory) -> None:
    client = client_for("uid:u\tx\n")
    for body in (b'{"user":{"id":"other"}}', b"{}", b"null", b"[]"):
        response = client.post("/enrich", content=body)
        assert response.status_code == 200
        assert response.json() == {"segment_ids": []}
        assert response.headers["cache-control"] == "no-cache"


def test_enrich_max_age_never_above_shortest_ttl(client_for: ClientFactory) -> None:
    soon = int(time.time()) + 600
    client = client_for(f"uid:u\tlong\nuid:u\tshort\t{soon}\nuid:v\tx\t{soon + 10**6}\n")
    response = client.post("/enrich", content=b'{"user":{"id":"u"}}')
    assert response.json() == {"segment_ids": ["long", "short"]}
    max_age = int(response.headers["cache-control"].removeprefix("max-age="))
    assert 590 <= max_age <= 600
    # a TTL longer than the configured max-age does not raise it
    response = client.post("/enrich", content=b'{"user":{"id":"v"}}')
    assert response.headers["cache-control"] == "max-age=86400"


def test_enrich_expired_membership_not_served(client_for: ClientFactory) -> None:
    client = client_for(f"uid:u\tgone\t{int(time.time()) - 1}\nuid:u\tkept\n")
    assert client.post("/enrich", content=b'{"user":{"id":"u"}}').json() == {
        "segment_ids": ["kept"]
    }


def test_enrich_configured_max_age(client_for: ClientFactory) -> None:
    client = client_for("uid:u\tx\n", max_age=60)
    assert client.post("/enrich", content=b'{"user":{"id":"u"}}').headers["cache-control"] == (
        "max-age=60"
    )


@pytest.mark.parametrize(
    "regs",
    [
        pytest.param('{"coppa":1}', id="coppa"),
        pytest.param('{"us_privacy":"1YYN"}', id="us_privacy"),
        pytest.param('{"ext":{"us_privacy":"1NYY"}}', id="us_privacy-ext"),
        pytest.param('{"gdpr":1}', id="gdpr-no-consent"),
        pytest.param('{"ext":{"gdpr":1}}', id="gdpr-ext-no-consent"),
    ],
)
def test_enrich_privacy_keeps_only_contextual(client_for: ClientFactory, regs: str) -> None:
    client = client_for("uid:u\tuser\nifa:i\tdevice\ndomain:d.com\tctx\n")
    body = (
        f'{{"user":{{"id":"u"}},"device":{{"ifa":"i"}},"site":{{"domain":"d.com"}},"regs":{regs}}}'
    )
    response = client.post("/enrich", content=body.encode())
    assert response.json() == {"segment_ids": ["ctx"]}
    assert response.headers["cache-control"] == "no-cache"


def test_enrich_gdpr_with_consent_serves_user_level(client_for: ClientFactory) -> None:
    client = client_for("uid:u\tuser\n")
    request = {"user": {"id": "u", "ext": {"consent": CONSENTED}}, "regs": {"ext": {"gdpr": 1}}}
    body = json.dumps(request).encode()
    assert client.post("/enrich", content=body).json() == {"segment_ids": ["user"]}


def test_enrich_lmt_skips_ifa_only(client_for: ClientFactory) -> None:
    client = client_for("uid:u\tuser\nifa:i\tdevice\n")
    body = b'{"user":{"id":"u"},"device":{"ifa":"i","lmt":1}}'
    assert client.post("/enrich", content=body).json() == {"segment_ids": ["user"]}


def test_enrich_wrong_types_still_answered(client_for: ClientFactory) -> None:
    client = client_for("eid:a.com:x\tfrom_eid\ndomain:d.com\tctx\n")
    body = (
        b'{"user":{"id":5,"eids":[{"source":"a.com","uids":[{"id":"x"}]}]},"regs":"bad",'
        b'"site":{"domain":"d.com"},"device":"weird"}'
    )
    response = client.post("/enrich", content=body)
    assert response.status_code == 200
    assert response.json() == {"segment_ids": ["from_eid", "ctx"]}


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b"\xff"], ids=repr)
def test_enrich_not_json_is_400_with_json_error(client_for: ClientFactory, body: bytes) -> None:
    response = client_for("uid:u\tx\n").post("/enrich", content=body)
    assert response.status_code == 400
    assert response.json()["error"].startswith("body is not JSON")


def test_enrich_body_over_limit_is_413(client_for: ClientFactory) -> None:
    client = client_for("uid:u\tx\n", max_body=100)
    response = client.post("/enrich", content=b'{"user":{"id":"u"},"pad":"' + b"x" * 200 + b'"}')
    assert response.status_code == 413
    assert response.json() == {"error": "body larger than 100 bytes"}
    assert client.post("/enrich", content=b'{"user":{"id":"u"}}').status_code == 200


def test_enrich_chunked_body_over_limit_is_413(client_for: ClientFactory) -> None:
    client = client_for("uid:u\tx\n", max_body=1000)
    chunks = iter([b'{"user":{"id":"u"},"pad":"', b"x" * 600, b"x" * 600, b'"}'])
    response = client.post("/enrich", content=chunks)
    assert response.status_code == 413


def test_enrich_deep_nesting_is_200_empty(client_for: ClientFactory) -> None:
    client = client_for("uid:u\tx\n")
    body = b'{"user":{"id":"u"},"ext":' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    response = client.post("/enrich", content=body)
    assert response.status_code == 200
    assert response.json() == {"segment_ids": []}


def test_enrich_get_is_405(client_for: ClientFactory) -> None:
    response = client_for("uid:u\tx\n").get("/enrich")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json() == {"error": "use POST"}


def test_enrich_configured_path(client_for: ClientFactory) -> None:
    client = client_for("uid:u\tx\n", path="/v2/rtd")
    assert client.post("/v2/rtd", content=b'{"user":{"id":"u"}}').json() == {"segment_ids": ["x"]}
    assert client.post("/enrich", content=b"{}").status_code == 404


def test_health_and_ready(client_for: ClientFactory) -> None:
    client = client_for("uid:u\tx\n")
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
