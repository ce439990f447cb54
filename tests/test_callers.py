"""Explain, holdout, /ortb and /rtc (issue 16): over a real server (the fast lane), and
in-process through the ASGI routes, both giving the same answers."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import jsonschema
import pytest
from starlette.testclient import TestClient

from enrich_server import amp
from enrich_server.app import create_app
from enrich_server.cli import main
from enrich_server.config import load_config
from enrich_server.errors import ConfigError
from enrich_server.guard import LoadGuard
from enrich_server.holdout import Holdout
from enrich_server.store import SegmentStore, StoreWriter
from tests.conftest import StoreFactory
from tests.utils import RunningServer, run_server

SNAPSHOT = (
    "uid:ours-1\tiab_sports,news_daily\n"
    "uid:u2\tiab_cars\t4102444800\n"
    "uid:gone\tlapsed\t1000000000\n"
    "ifa:aaaaaaaa-1111-2222-3333-444444444444\tcat_owners\n"
    "domain:example.com\tctx_news\n"
)
CONFIG = """
[enrich.auth]
explain_tokens = ["op-token"]
[ortb]
data_name = "acme-dmp"
segtax = { "iab_" = 4, "ctx_" = 7 }
[rtc]
targeting_key = "acme_seg"
"""
OPERATOR = {"authorization": "Bearer op-token"}

#: OpenRTB 2.6, 3.2.21 Data and 3.2.22 Segment, as the answer carries them under user.data.
ORTB_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["user"],
    "additionalProperties": False,
    "properties": {"user": {
        "type": "object", "required": ["data"], "additionalProperties": False,
        "properties": {"data": {"type": "array", "items": {
            "type": "object", "required": ["segment"], "additionalProperties": False,
            "properties": {
                "id": {"type": "string"}, "name": {"type": "string"},
                "ext": {"type": "object", "properties": {"segtax": {"type": "integer"}}},
                "segment": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["id"], "additionalProperties": False,
                    "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                   "value": {"type": "string"}},
                }},
            },
        }}},
    }},
}  # fmt: skip
#: AMP RTC (amp.dev, "RTC documentation"): an object whose ``targeting`` object is merged
#: into the ad request's targeting.
RTC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["targeting"],
    "additionalProperties": False,
    "properties": {"targeting": {"type": "object", "additionalProperties": {
        "type": "array", "items": {"type": "string"}}}},
}  # fmt: skip


@pytest.fixture
def store(make_store: StoreFactory) -> Path:
    path = make_store(SNAPSHOT)
    with StoreWriter(path) as writer:
        writer.map_alias(b"their-9", b"ours-1")  # as /uid would: their id -> our user id
    return path


@pytest.fixture
def server(store: Path, tmp_path: Path) -> Iterator[RunningServer]:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    with run_server(store, "--config", str(config)) as running:
        yield running


@pytest.fixture
def client(store: Path, tmp_path: Path) -> Iterator[TestClient]:
    config_file = tmp_path / "in-process.toml"
    config_file.write_text(CONFIG + f'\n[server]\nstore = "{store}"\n')
    config = load_config(config_file, {"ENRICH_ENRICH_GUARD_LAG_MS": "0"})
    with TestClient(create_app(config)) as test_client:
        yield test_client


def _body(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# --- explain ------------------------------------------------------------------------------


def test_explain_a_hit_an_alias_and_a_skipped_ifa(server: RunningServer) -> None:
    body = _body(
        user={"id": "their-9", "eids": [{"source": "s.com", "uids": [{"id": ""}]}]},
        device={"ifa": "aaaaaaaa-1111-2222-3333-444444444444", "lmt": 1},
        site={"domain": "example.com"},
    )
    response = httpx.post(f"{server.url}/enrich?explain=1", content=body, headers=OPERATOR)
    assert response.status_code == 200
    answer = response.json()
    plain = httpx.post(f"{server.url}/enrich", content=body).json()
    assert answer["segment_ids"] == plain["segment_ids"] == [
        "iab_sports", "news_daily", "ctx_news"]  # fmt: skip
    explain = answer["explain"]
    assert [k["key"] for k in explain["keys"]] == ["uid:their-9", "domain:example.com"]
    assert explain["aliases"] == [{"key": "uid:their-9", "resolves_to": "uid:ours-1"}]
    assert {"field": "device.ifa", "why": "device.lmt is 1 (limit ad tracking)"} in explain[
        "skipped"
    ]
    hits = {row["key"]: row["hit"] for row in explain["lookups"]}
    assert hits == {"uid:their-9": False, "uid:ours-1": True, "domain:example.com": True}
    sources = {s["segment"]: s["source"] for s in explain["segments"]}
    assert sources == {"iab_sports": "uid:ours-1", "news_daily": "uid:ours-1",
                       "ctx_news": "domain:example.com"}  # fmt: skip
    assert explain["privacy"] == {"withheld": None, "field": None}
    assert explain["cache_control"] == {"value": "max-age=86400", "why": "user known: max_age"}
    assert explain["holdout"] is False
    assert explain["shed"] is False


def test_explain_a_suppression_and_ttls(server: RunningServer) -> None:
    suppressed = _body(user={"id": "ours-1"}, site={"domain": "example.com"},
                       regs={"ext": {"us_privacy": "1YYN"}})  # fmt: skip
    explain = httpx.post(
        f"{server.url}/enrich?explain=1", content=suppressed, headers=OPERATOR
    ).json()["explain"]
    assert explain["privacy"] == {"withheld": "us_privacy", "field": "regs.ext.us_privacy"}
    assert [row["key"] for row in explain["lookups"]] == ["domain:example.com"]
    assert explain["cache_control"]["value"] == "no-cache"
    assert "withheld (us_privacy)" in explain["cache_control"]["why"]
    expiring = _body(user={"id": "u2"})
    explain = httpx.post(
        f"{server.url}/enrich?explain=1", content=expiring, headers=OPERATOR
    ).json()["explain"]
    (segment,) = explain["segments"]
    assert segment["segment"] == "iab_cars"
    assert 0 < segment["ttl"] <= 4102444800
    assert explain["cache_control"]["value"] == "max-age=86400"
    lapsed = httpx.post(
        f"{server.url}/enrich?explain=1", content=_body(user={"id": "gone"}), headers=OPERATOR
    ).json()
    assert lapsed["segment_ids"] == []
    assert lapsed["explain"]["lookups"][0]["segments"][0]["expired"] is True
    assert lapsed["explain"]["cache_control"]["why"].startswith("no segment found")


def test_explain_needs_an_operator_token(server: RunningServer, store: Path) -> None:
    url = f"{server.url}/enrich?explain=1"
    body = _body(user={"id": "ours-1"})
    missing = httpx.post(url, content=body)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert httpx.post(url, content=body, headers={"authorization": "Bearer x"}).status_code == 401
    with run_server(store) as unconfigured:  # no explain_tokens: never open
        off = httpx.post(f"{unconfigured.url}/enrich?explain=1", content=body, headers=OPERATOR)
        assert off.status_code == 403
        assert "explain_tokens" in off.json()["error"]


def test_explain_cli_matches_the_server(server: RunningServer, store: Path, tmp_path: Path) -> None:
    body_file = tmp_path / "body.json"
    body_file.write_bytes(_body(user={"id": "their-9"}, regs={"coppa": 1}))
    config = tmp_path / "cli.toml"
    config.write_text(CONFIG)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert (
            main(["explain", str(body_file), "--store", str(store), "--config", str(config)]) == 0
        )
    printed = json.loads(out.getvalue())
    served = httpx.post(
        f"{server.url}/enrich?explain=1", content=body_file.read_bytes(), headers=OPERATOR
    ).json()
    assert printed == served
    assert printed["explain"]["privacy"] == {"withheld": "coppa", "field": "regs.coppa"}


# --- holdout ------------------------------------------------------------------------------


def test_holdout_share_is_within_a_point_and_stable_per_user() -> None:
    for share in (0.05, 0.2):
        holdout = Holdout(share)
        held = [holdout.held_out(b"uid:user-%d" % i) for i in range(100_000)]
        assert abs(sum(held) / len(held) - share) < 0.01
        again = [Holdout(share).held_out(b"uid:user-%d" % i) for i in range(1000)]
        assert again == held[:1000]
    assert not any(Holdout(0.0).held_out(b"uid:user-%d" % i) for i in range(1000))
    assert all(Holdout(1.0).held_out(b"uid:user-%d" % i) for i in range(1000))


def test_holdout_answers_held_out_users_empty_and_counts_them(store: Path) -> None:
    holdout = Holdout(0.5)
    users = [f"ours-1-{i}" for i in range(40)]
    snapshot_users = [u for u in users if holdout.held_out(f"uid:{u}".encode())]
    assert 5 < len(snapshot_users) < 35
    with StoreWriter(store) as writer:
        sid = writer.intern("iab_sports")
        for user in users:
            writer.add(f"uid:{user}".encode(), [sid], 0)
    with run_server(store, env={"ENRICH_ENRICH_HOLDOUT": "0.5"}) as server:
        for user in users:
            response = httpx.post(f"{server.url}/enrich", content=_body(user={"id": user}))
            held = user in snapshot_users
            assert response.json()["segment_ids"] == ([] if held else ["iab_sports"]), user
            assert response.headers["cache-control"] == ("no-cache" if held else "max-age=86400")
        metrics = httpx.get(f"{server.url}/metrics").text
    assert f"enrich_holdout_total {float(len(snapshot_users))}" in metrics


# --- /ortb and /rtc -----------------------------------------------------------------------


def test_ortb_answer_has_the_openrtb_shape_with_segtax(
    server: RunningServer, client: TestClient
) -> None:
    body = _body(user={"id": "ours-1"}, site={"domain": "example.com"})
    for response in (
        httpx.post(f"{server.url}/ortb", content=body),
        client.post("/ortb", content=body),
    ):
        assert response.status_code == 200
        answer = response.json()
        jsonschema.validate(answer, ORTB_SCHEMA)
        by_tax = {e.get("ext", {}).get("segtax"): [s["id"] for s in e["segment"]]
                  for e in answer["user"]["data"]}  # fmt: skip
        assert by_tax == {4: ["iab_sports"], None: ["news_daily"], 7: ["ctx_news"]}
        assert {e["name"] for e in answer["user"]["data"]} == {"acme-dmp"}
        assert response.headers["cache-control"] == "max-age=86400"
    empty = httpx.post(f"{server.url}/ortb", content=_body(user={"id": "nobody"}))
    assert empty.json() == {"user": {"data": []}}
    assert empty.headers["cache-control"] == "no-cache"
    assert httpx.post(f"{server.url}/ortb", content=b"{not json").status_code == 400


def test_rtc_reads_amp_macros_from_the_query(server: RunningServer, client: TestClient) -> None:
    query = "uid=ours-1&url=https%3A%2F%2Fexample.com%2Fpage%3Fa%3D1&gdpr=0"
    for response in (httpx.get(f"{server.url}/rtc?{query}"), client.get(f"/rtc?{query}")):
        assert response.status_code == 200
        answer = response.json()
        jsonschema.validate(answer, RTC_SCHEMA)
        assert answer == {"targeting": {"acme_seg": ["iab_sports", "news_daily", "ctx_news"]}}
    withheld = httpx.get(f"{server.url}/rtc?uid=ours-1&domain=example.com&us_privacy=1YYN")
    assert withheld.json() == {"targeting": {"acme_seg": ["ctx_news"]}}
    assert withheld.headers["cache-control"] == "no-cache"
    nothing = httpx.get(f"{server.url}/rtc")
    assert nothing.json() == {"targeting": {}}
    jsonschema.validate(nothing.json(), RTC_SCHEMA)
    assert httpx.post(f"{server.url}/rtc").status_code == 405


def test_rtc_query_reading_is_bounded_and_tolerant() -> None:
    request = amp.request_from_query(
        b"uid=a&uid=b&gdpr=x&lmt=%C2%B2&gpp_sid=7,x,8&ifa=i&" + b"&".join([b"p=1"] * 10_000)
    )
    assert request.user is not None
    assert request.user.id == "a"
    assert request.regs is not None
    assert request.regs.gdpr is None
    assert request.regs.gpp_sid == [7, 8]
    assert request.device is not None
    assert request.device.lmt is None
    far = amp.request_from_query(b"&".join([b"p=1"] * amp.MAX_PARAMETERS) + b"&uid=late")
    assert far.user is None  # past the parameters read


def test_endpoint_paths_and_segtax_are_checked(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[ortb]\nsegtax = { "iab_" = "four" }\n')
    with pytest.raises(ConfigError, match="expected a table of integers"):
        load_config(bad)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        load_config(None, {"ENRICH_ENRICH_HOLDOUT": "1.5"})
    clash = tmp_path / "clash.toml"
    clash.write_text('[rtc]\npath = "/enrich"\n')
    with pytest.raises(ConfigError, match="same path"):
        load_config(clash)


def test_a_shed_call_is_answered_empty_in_its_callers_shape(store: Path, tmp_path: Path) -> None:
    config_file = tmp_path / "shed.toml"
    config_file.write_text(CONFIG)
    server = create_app(load_config(config_file))
    endpoint = server.enrich
    endpoint.store = SegmentStore(store)
    loop = asyncio.new_event_loop()
    guard = LoadGuard(0.001)
    guard.start(loop)  # the loop never runs: no tick resets the lag set here
    guard.lag = 1.0
    endpoint.guard = guard
    try:
        body = _body(user={"id": "ours-1"})
        shapes = {}
        for lane in server.lanes:
            status, cache, out, _ = endpoint.respond(body, 0.0, lane.answer, lane.empty)
            assert (status, cache, out) == (200, b"no-cache", lane.empty)
            shapes[lane.path] = json.loads(out)
    finally:
        guard.stop()
        loop.close()
        endpoint.store.close()
    assert shapes == {b"/enrich": {"segment_ids": []}, b"/ortb": {"user": {"data": []}},
                      b"/rtc": {"targeting": {}}}  # fmt: skip
    jsonschema.validate(shapes[b"/ortb"], ORTB_SCHEMA)
    assert endpoint.tally.shed == 3
