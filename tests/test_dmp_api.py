"""The DMP API end to end: a real ``serve`` with platforms configured, over HTTP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx2 as httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from enrich_server.ingest.sync import sign
from enrich_server.store import SegmentStore, store_dir
from tests.conftest import StoreFactory
from tests.utils import ROOT, RunningServer, run_server

CONFIG = """
[dmp]
max_batch = 50
max_body = 65536

[enrich.auth]
header = "X-Api-Key"
tokens = ["index-token"]

[[platform]]
id = 99999
name = "mapp"
basic = "foo:bar"
plsec = "verysecure"
sync_hosts = ["go.flx1.com"]
ttl = 0

[[platform]]
id = 7
name = "signer"
tokens = ["signer-token"]
hmac_secret = "shared-secret"
sync_hosts = ["sync.signer.example"]

[[platform]]
id = 5
name = "index"
plsec = "idxsec"
"""
MAPP = ("foo", "bar")
ENRICH_HEADERS = {"X-Api-Key": "index-token"}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "enrich.toml"
    path.write_text(CONFIG)
    return path


@pytest.fixture
def store(make_store: StoreFactory) -> Path:
    return make_store("uid:someone\toperator_segment\ndomain:news.example\tctx_news\n")


@pytest.fixture
def server(store: Path, config: Path) -> Iterator[RunningServer]:
    with run_server(store, "--config", str(config)) as running:
        yield running


def _enrich(client: httpx.Client, user_id: str = "", eid: str = "") -> list[str]:
    body: dict[str, object] = {"site": {"domain": "news.example"}}
    if user_id:
        body["user"] = {"id": user_id}
    if eid:
        body["user"] = {"eids": [{"source": "partner.example", "uids": [{"id": eid}]}]}
    answer = client.post("/enrich", content=json.dumps(body), headers=ENRICH_HEADERS)
    assert answer.status_code == 200
    segments: list[str] = answer.json()["segment_ids"]
    return segments


def _sync(client: httpx.Client, cookie: str | None = None) -> str:
    """Run /sync as a browser would; returns our user id from the redirect."""
    headers = {"cookie": f"enrich_uid={cookie}"} if cookie else {}
    out = "https://go.flx1.com/uid?userid=[[USERID]]&pl=99999&plsec=verysecure"
    answer = client.get(f"/sync?out={out}", headers=headers)
    assert answer.status_code == 302, answer.text
    location = answer.headers["location"]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)
    assert location.startswith("https://go.flx1.com/uid?userid=")
    assert query["pl"] == ["99999"]
    assert query["plsec"] == ["verysecure"]
    user_id = query["userid"][0]
    assert f"enrich_uid={user_id};" in answer.headers["set-cookie"]
    return user_id


def test_full_dmp_flow(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, auth=MAPP) as client:
        ours = _sync(client)
        assert _sync(client, cookie=ours) == ours  # the cookie keeps the id
        created = client.post("/v1/segment", params={"title": "My segment"})
        assert created.status_code == 200
        body = created.json()
        assert body["status"] == "OK"
        assert body["created"] is True
        assert set(body) == {"status", "created", "segment_id"}
        sid = body["segment_id"]
        again = client.post("/v1/segment", params={"title": "My segment"}).json()
        assert again == {"status": "OK", "created": False, "segment_id": sid}
        keyed = client.post("/v1/segment", params={"title": "Fans", "key": "mapp_fans"}).json()
        others = [f"other{i}" for i in range(9)]
        batch = [{"segment": sid, "userid": ours}] + [
            {"segment": keyed["segment_id"], "userid": u, "ttl": 3600} for u in [ours, *others]
        ]
        applied = client.post("/v1/segment", content=json.dumps(batch))
        assert applied.status_code == 200
        assert applied.json() == {"status": "OK", "applied": 11}
        assert _enrich(client, ours) == [str(sid), "mapp_fans", "ctx_news"]
        removed = client.delete("/v1/segment", params={"id": sid, "userid": ours})
        assert removed.json() == {"status": "OK", "applied": 1}
        assert _enrich(client, ours) == ["mapp_fans", "ctx_news"]
        gone = [{"segment": keyed["segment_id"], "userid": ours, "op": "remove"}]
        assert client.post("/v1/segment", content=json.dumps(gone)).json()["applied"] == 1
        assert _enrich(client, ours) == ["ctx_news"]
        assert _enrich(client, "other3") == ["mapp_fans", "ctx_news"]
        single = client.post("/v1/segment", params={"id": sid, "userid": "solo"})
        assert single.status_code == 200
        assert _enrich(client, "solo") == [str(sid), "ctx_news"]
        metrics = client.get("/metrics").text
    assert 'enrich_ingest_mutations_total{op="add",platform="mapp"} 12.0' in metrics
    assert 'enrich_ingest_mutations_total{op="remove",platform="mapp"} 2.0' in metrics


def test_segments_list_get_delete_and_key_conflicts(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, auth=MAPP) as client:
        a = client.post("/v1/segment", params={"title": "A", "key": "seg_a"}).json()["segment_id"]
        b = client.post("/v1/segment", params={"title": "B"}).json()["segment_id"]
        listed = client.get("/v1/segment").json()["segments"]
        assert [(s["segment_id"], s["title"], s["key"]) for s in listed] == [
            (a, "A", "seg_a"),
            (b, "B", str(b)),
        ]
        assert client.get(f"/v1/segment/{a}").json()["segment"]["key"] == "seg_a"
        clash = client.post("/v1/segment", params={"title": "C", "key": "seg_a"})
        assert clash.status_code == 409
        assert "seg_a" in clash.json()["error"]
        bad_key = client.post("/v1/segment", params={"title": "D", "key": "x,y"})
        assert bad_key.status_code == 400
        assert client.post("/v1/segment", params={"title": ""}).status_code == 400
        batch = [{"segment": a, "userid": f"u{i}"} for i in range(10)]
        assert client.post("/v1/segment", content=json.dumps(batch)).status_code == 200
        deleted = client.delete(f"/v1/segment/{a}")
        assert deleted.json() == {
            "status": "OK",
            "deleted": True,
            "segment_id": a,
            "memberships_removed": 10,
        }
        assert client.get(f"/v1/segment/{a}").status_code == 404
        assert _enrich(client, "u3") == ["ctx_news"]
    # Another platform sees none of mapp's segments, and cannot push into them.
    theirs = {"Authorization": "Bearer signer-token"}
    with httpx.Client(base_url=server.url, headers=theirs) as other:
        assert other.get("/v1/segment").json()["segments"] == []
        assert other.get(f"/v1/segment/{b}").status_code == 404
        assert other.delete(f"/v1/segment/{b}").status_code == 404
        refused = other.post("/v1/segment", content=json.dumps([{"segment": b, "userid": "x"}]))
        assert refused.status_code == 400
        assert "not a segment of this platform" in refused.json()["problems"][0]


def test_batch_validated_whole(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, auth=MAPP) as client:
        sid = client.post("/v1/segment", params={"title": "T"}).json()["segment_id"]
        batch: list[dict[str, object]] = [{"segment": sid, "userid": f"ok{i}"} for i in range(12)]
        batch[3] = {"segment": sid, "userid": "has space"}
        batch[7] = {"segment": sid, "userid": "fine", "ttl": -5}
        batch[9] = {"segment": 424242, "userid": "fine"}
        batch[10] = {"segment": sid, "userid": "fine", "idtype": "domain"}
        refused = client.post("/v1/segment", content=json.dumps(batch))
        assert refused.status_code == 400
        problems = refused.json()["problems"]
        assert [p.split(":")[0] for p in problems] == ["item 3", "item 7", "item 9", "item 10"]
        assert _enrich(client, "ok0") == ["ctx_news"]  # nothing of it was applied
        typed = [
            {"segment": sid, "userid": "a"},
            {"segment": "x", "userid": 3},
            {"segment": sid, "userid": "b c"},
            {"op": "zap"},
        ]
        wrong = client.post("/v1/segment", content=json.dumps(typed)).json()
        # malformed and invalid items are listed together, by index
        assert [p.split(":")[0] for p in wrong["problems"]] == ["item 1", "item 2", "item 3"]
        unknown = [{"segment": sid, "userid": "a", "colour": "red"}]
        assert client.post("/v1/segment", content=json.dumps(unknown)).status_code == 400
        for body in (b"{not json", b"{}", b"[]"):
            answer = client.post("/v1/segment", content=body)
            assert answer.status_code == 400, body
            assert answer.json()["status"] == "error"
        too_many = [{"segment": sid, "userid": f"u{i}"} for i in range(51)]
        answer = client.post("/v1/segment", content=json.dumps(too_many))
        assert answer.status_code == 400
        assert "more than 50" in answer.json()["problems"][0]
        huge = client.post("/v1/segment", content=b"[" + b" " * 70000 + b"]")
        assert huge.status_code == 413
        assert client.post("/v1/segment", params={"id": "x", "userid": "a"}).status_code == 400
        assert client.delete("/v1/segment", params={"id": sid}).status_code == 400
        assert _enrich(client, "u1") == ["ctx_news"]


def test_ingestion_needs_the_platforms_credentials(server: RunningServer) -> None:
    batch = json.dumps([{"segment": 1, "userid": "a"}])
    with httpx.Client(base_url=server.url) as client:
        for headers in (
            {},
            {"Authorization": "Basic Zm9vOmJheg=="},  # foo:baz
            {"Authorization": "Basic not-base64!"},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "Bearer index-token"},  # /enrich's token is not a DMP credential
            {"X-Api-Key": "index-token"},
            {"Authorization": "Digest foo"},
        ):
            for method, kwargs in (
                ("POST", {"content": batch}),
                ("POST", {"params": {"title": "t"}}),
                ("GET", {}),
                ("DELETE", {"params": {"id": 1, "userid": "a"}}),
            ):
                answer = client.request(method, "/v1/segment", headers=headers, **kwargs)
                assert answer.status_code == 401, (headers, method)
                assert answer.headers["www-authenticate"].startswith("Basic")
            assert client.delete("/v1/segment/1", headers=headers).status_code == 401
        ok = client.get("/v1/segment", headers={"Authorization": "Bearer signer-token"})
        assert ok.status_code == 200
        # and a DMP credential cannot query /enrich
        refused = client.post("/enrich", content=b"{}", auth=MAPP)
        assert refused.status_code == 401


def test_uid_sync_makes_their_ids_resolve(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, auth=MAPP) as client:
        ours = _sync(client)
        sid = client.post("/v1/segment", params={"title": "T", "key": "synced"}).json()[
            "segment_id"
        ]
        client.post("/v1/segment", params={"id": sid, "userid": ours})
        assert _enrich(client, "IDX-123") == ["ctx_news"]
        cookie = {"cookie": f"enrich_uid={ours}"}
        mapped = client.get(
            "/uid", params={"userid": "IDX-123", "pl": 5, "plsec": "idxsec"}, headers=cookie
        )
        assert mapped.status_code == 200, mapped.text
        assert mapped.json() == {"status": "OK"}
        assert f"enrich_uid={ours};" in mapped.headers["set-cookie"]
        assert _enrich(client, "IDX-123") == ["synced", "ctx_news"]
        assert _enrich(client, eid="IDX-123") == ["synced", "ctx_news"]
        # No cookie yet: a new id of ours is made, set, and mapped.
        fresh = client.get("/uid", params={"userid": "IDX-9", "pl": 5, "plsec": "idxsec"})
        assert fresh.status_code == 200
        new_id = fresh.headers["set-cookie"].split(";")[0].split("=")[1]
        assert new_id != ours
        client.post("/v1/segment", params={"id": sid, "userid": new_id})
        assert _enrich(client, "IDX-9") == ["synced", "ctx_news"]


def test_uid_refuses_bad_secrets(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url) as client:
        refused: list[dict[str, str | int]] = [
            {"userid": "a", "pl": 5, "plsec": "wrong"},
            {"userid": "a", "pl": 5},
            {"userid": "a", "pl": 99998, "plsec": "idxsec"},
            {"userid": "a", "pl": "x", "plsec": "idxsec"},
            {"userid": "a", "pl": 7, "plsec": ""},  # signer must sign
            {"userid": "a", "pl": 5, "plsec": "verysecure"},  # another platform's token
        ]
        for params in refused:
            answer = client.get("/uid", params=params)
            assert answer.status_code == 403, params
            assert answer.json()["status"] == "error"
        assert (
            client.get("/uid", params={"userid": "", "pl": 5, "plsec": "idxsec"}).status_code == 400
        )


Params = list[tuple[str, str | int | float | bool | None]]


def _signed(params: list[tuple[str, str]], secret: str = "shared-secret") -> Params:
    return [*params, ("sig", sign(secret, params))]


def test_signed_sync_and_uid(server: RunningServer) -> None:
    now = str(int(time.time()))
    out = "https://sync.signer.example/match?id=[[USERID]]"
    with httpx.Client(base_url=server.url) as client:
        good = client.get("/sync", params=_signed([("out", out), ("pl", "7"), ("ts", now)]))
        assert good.status_code == 302
        assert good.headers["location"].startswith("https://sync.signer.example/match?id=")
        # The signed platform's host is not open to unsigned syncs.
        assert client.get(f"/sync?out={out}").status_code == 400
        tampered = _signed([("out", out), ("pl", "7"), ("ts", now)])
        tampered[0] = ("out", "https://sync.signer.example/other?id=[[USERID]]")
        assert client.get("/sync", params=tampered).status_code == 403
        wrong_key = _signed([("out", out), ("pl", "7"), ("ts", now)], secret="guess")
        assert client.get("/sync", params=wrong_key).status_code == 403
        stale = _signed([("out", out), ("pl", "7"), ("ts", str(int(time.time()) - 3600))])
        assert client.get("/sync", params=stale).status_code == 403
        # A signed target must still be one of the platform's hosts.
        elsewhere = _signed([("out", "https://go.flx1.com/x"), ("pl", "7"), ("ts", now)])
        assert client.get("/sync", params=elsewhere).status_code == 400
        uid = _signed([("userid", "S-1"), ("pl", "7"), ("ts", now)])
        assert client.get("/uid", params=uid).status_code == 200
        assert client.get("/uid", params=uid).status_code == 403  # replayed
        forged = _signed([("userid", "S-2"), ("pl", "7"), ("ts", now)])
        forged[0] = ("userid", "S-3")
        assert client.get("/uid", params=forged).status_code == 403
        unsigned_platform = _signed([("userid", "S-4"), ("pl", "99999"), ("ts", now)])
        assert client.get("/uid", params=unsigned_platform).status_code == 403


@pytest.mark.parametrize(
    "out",
    [
        "https://evil.example/?u=[[USERID]]",
        "//evil.example/",
        "javascript:alert(1)",
        "https://go.flx1.com@evil.example/",
        "https%3A%2F%2Fevil.example%2F",
        "https://go.flx1.com%2eevil.example/",
        "https:/\\evil.example",
    ],
)
def test_sync_refuses_open_redirects_over_http(server: RunningServer, out: str) -> None:
    answer = httpx.get(f"{server.url}/sync?out={out}")
    assert answer.status_code == 400
    assert "location" not in answer.headers


def test_openapi_describes_the_api(server: RunningServer) -> None:
    document = httpx.get(f"{server.url}/openapi.json").json()
    validate(document)  # a valid OpenAPI 3.1 document
    assert {"/sync", "/uid", "/v1/segment", "/v1/segment/{segment_id}"} <= set(document["paths"])
    schemas = document["components"]["schemas"]
    assert schemas["Mutation"]["required"] == ["segment", "userid"]
    assert schemas["Batch"]["maxItems"] == 50  # the configured limit

    def conforms(name: str, instance: object) -> None:
        schema = {**schemas[name], "components": document["components"]}
        Draft202012Validator(
            json.loads(json.dumps(schema).replace("#/components", "#/components"))
        ).validate(instance)

    with httpx.Client(base_url=server.url, auth=MAPP) as client:
        created = client.post("/v1/segment", params={"title": "Spec"}).json()
        conforms("Created", created)
        batch = [{"segment": created["segment_id"], "userid": "s1", "ttl": 60}]
        Draft202012Validator(schemas["Mutation"]).validate(batch[0])
        conforms("Applied", client.post("/v1/segment", json=batch).json())
        conforms("Error", client.post("/v1/segment", json=[{"segment": 0}]).json())
        for segment in client.get("/v1/segment").json()["segments"]:
            conforms("Segment", segment)


@pytest.mark.parametrize("durability", ["fsync", "os"])
def test_acknowledged_batch_survives_kill_9(store: Path, config: Path, durability: str) -> None:
    users = [f"crash{i}" for i in range(500)]
    config.write_text(
        f'[dmp]\ndurability = "{durability}"\n' + config.read_text().replace("[dmp]\n", "")
    )
    with run_server(store, "--config", str(config)) as server:
        with httpx.Client(base_url=server.url, auth=MAPP) as client:
            sid = client.post("/v1/segment", params={"title": "Crash"}).json()["segment_id"]
            for start in range(0, len(users), 50):
                batch = [{"segment": sid, "userid": u} for u in users[start : start + 50]]
                assert client.post("/v1/segment", content=json.dumps(batch)).status_code == 200
        ready = [
            json.loads(line)
            for line in server.log().splitlines()
            if '"ingestion process ready"' in line
        ]
        ingestd, socket = [r["pid"] for r in ready], ready[0]["socket"]
        server.process.kill()  # SIGKILL right after the last acknowledgement
        server.process.wait()
        assert len(ingestd) == 1
        deadline = time.monotonic() + 5
        while _alive(ingestd[0]):  # the ingestion process follows its parent
            assert time.monotonic() < deadline, "ingestion process outlived serve"
            time.sleep(0.05)
        assert not Path(socket).parent.exists()  # and removes what serve could not
    opened = SegmentStore(store)
    try:
        found = [opened.memberships(f"uid:{u}".encode()) for u in users]
    finally:
        opened.close()
    assert all(m == {str(sid): 0} for m in found)
    with (
        run_server(store, "--config", str(config)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        assert _enrich(client, "crash499") == [str(sid), "ctx_news"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        # A zombie waits for its reaper; it holds nothing.
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def test_concurrent_batches_across_two_workers(store: Path, config: Path) -> None:
    with run_server(store, "--config", str(config), "--workers", "2") as server:
        with httpx.Client(base_url=server.url, auth=MAPP) as client:
            sid = client.post("/v1/segment", params={"title": "Many"}).json()["segment_id"]

        def push(n: int) -> int:
            batch = [{"segment": sid, "userid": f"w{n}-{i}"} for i in range(50)]
            with httpx.Client(base_url=server.url, auth=MAPP) as own:
                answer = own.post("/v1/segment", content=json.dumps(batch))
            assert answer.status_code == 200
            applied: int = answer.json()["applied"]
            return applied

        with ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(push, range(40))) == 2000
        with httpx.Client(base_url=server.url) as client:
            assert _enrich(client, "w39-49") == [str(sid), "ctx_news"]
        # A signed /uid is applied once, whichever worker a replay reaches.
        signed = _signed([("userid", "R-1"), ("pl", "7"), ("ts", str(int(time.time())))])
        statuses = [httpx.get(f"{server.url}/uid", params=signed).status_code for _ in range(6)]
        assert sorted(statuses) == [200, 403, 403, 403, 403, 403]
    opened = SegmentStore(store)
    try:
        assert opened.stats().segment_members[str(sid)] == 2000
    finally:
        opened.close()


def test_no_platforms_keeps_the_store_read_only(store: Path) -> None:
    data = (store / "data.mdb").read_bytes()
    with run_server(store) as server:
        assert httpx.get(f"{server.url}/v1/segment", auth=MAPP).status_code == 401
        assert httpx.get(f"{server.url}/sync?out=https://go.flx1.com/").status_code == 400
    assert (store / "data.mdb").read_bytes() == data


def test_ingestion_follows_a_replaced_store(store: Path, config: Path, tmp_path: Path) -> None:
    """After load --replace, pushes land in the new generation: the DMP's segments (and
    synced ids) carry over, its pushed memberships are superseded with the rest."""
    snapshot = tmp_path / "next.tsv"
    snapshot.write_text("uid:someone\tnew_operator_segment\n")
    with (
        run_server(store, "--config", str(config)) as server,
        httpx.Client(base_url=server.url, auth=MAPP) as client,
    ):
        sid = client.post("/v1/segment", params={"title": "Kept", "key": "kept"}).json()[
            "segment_id"
        ]
        client.post("/v1/segment", params={"id": sid, "userid": "before"})
        assert _enrich(client, "before") == ["kept", "ctx_news"]
        load = subprocess.run(
            [sys.executable, "-m", "enrich_server", "load", str(snapshot), "--store",
             str(store), "--replace", "--quiet"],
            capture_output=True, text=True, check=False, cwd=ROOT,
        )  # fmt: skip
        assert load.returncode == 0, load.stderr
        deadline = time.monotonic() + 5
        while _enrich(client, "someone") != ["new_operator_segment"]:
            assert time.monotonic() < deadline, "the replace was not served"
            time.sleep(0.1)
        assert client.get(f"/v1/segment/{sid}").status_code == 200  # the registry stayed
        after = client.post("/v1/segment", params={"id": sid, "userid": "after"})
        assert after.status_code == 200
        assert _enrich(client, "after") == ["kept"]
        assert _enrich(client, "before") == []  # a replace supersedes pushed memberships
    follower = SegmentStore(store_dir(store))
    try:
        assert follower.memberships(b"uid:after") == {"kept": 0}
    finally:
        follower.close()


def test_a_dead_ingestion_process_is_restarted(server: RunningServer) -> None:
    pids = [
        json.loads(line)["pid"]
        for line in server.log().splitlines()
        if '"ingestion process ready"' in line
    ]
    os.kill(pids[0], 9)
    with httpx.Client(base_url=server.url, auth=MAPP) as client:
        statuses = []
        deadline = time.monotonic() + 10
        while True:
            answer = client.post("/v1/segment", params={"title": "After a crash"})
            statuses.append(answer.status_code)
            if answer.status_code == 200:
                break
            assert answer.status_code == 503, answer.text  # said plainly while it is down
            assert time.monotonic() < deadline, statuses
            time.sleep(0.1)
        assert client.get("/v1/segment").json()["segments"][0]["title"] == "After a crash"
    assert '"ingestion process exited; restarting it"' in server.log()
    assert server.log().count('"ingestion process ready"') == 2


def test_lookup_shows_synced_ids(server: RunningServer, store: Path) -> None:
    with httpx.Client(base_url=server.url) as client:
        cookie = {"cookie": "enrich_uid=AAAAAAAAAAAAAAAAAAAAAA"}
        params: dict[str, str | int] = {"userid": "IDX-7", "pl": 5, "plsec": "idxsec"}
        assert client.get("/uid", params=params, headers=cookie).status_code == 200
    lookup = subprocess.run(
        [sys.executable, "-m", "enrich_server", "lookup", "--store", str(store), "uid:IDX-7"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    assert json.loads(lookup.stdout)["synced_to"] == "uid:AAAAAAAAAAAAAAAAAAAAAA"


def test_hostile_numbers_and_names_get_400_not_500(server: RunningServer) -> None:
    with httpx.Client(base_url=server.url, auth=MAPP) as client:
        sid = client.post("/v1/segment", params={"title": "N"}).json()["segment_id"]
        for query in (
            "id=99999999999999999999&userid=a",
            f"id={sid}&userid=a&ttl=99999999999999999999",
            "id=%C2%B2&userid=a",
            f"id={sid}&userid=a&ttl=%C2%B2",
            f"id={sid}&userid=a&ttl=-1",
            "id=&userid=a",
        ):
            answer = client.post(f"/v1/segment?{query}")
            assert answer.status_code == 400, (query, answer.text)
            assert client.delete(f"/v1/segment?{query}").status_code == 400, query
        for params in (
            {"title": "x" * 501},
            {"title": "T", "key": "12345"},
            {"title": "T", "key": "a,b"},
        ):
            assert client.post("/v1/segment", params=params).status_code == 400, params
        taken = client.post("/v1/segment", params={"title": "T", "key": "operator_segment"})
        assert taken.status_code == 409
        assert "an operator's segment" in taken.json()["error"]
        assert _enrich(client, "someone") == ["operator_segment", "ctx_news"]
        huge = json.dumps([{"segment": 10**30, "userid": "a"}, {"segment": sid, "ttl": 10**30}])
        refused = client.post("/v1/segment", content=huge)
        assert refused.status_code == 400
        assert [p.split(":")[0] for p in refused.json()["problems"]] == ["item 0", "item 1"]
    for query in (
        "userid=a&pl=%C2%B2&plsec=idxsec",
        "userid=a&pl=5&ts=%C2%B2&sig=00",
        "userid=a&pl=7&ts=" + "9" * 400 + "&sig=00",
        "userid=a&pl=7&ts=" + "9" * 5000 + "&sig=00",
        "userid=a&pl=" + "9" * 30 + "&plsec=x",
    ):
        assert httpx.get(f"{server.url}/uid?{query}").status_code == 403, query
    assert (
        httpx.get(f"{server.url}/sync?out=https://go.flx1.com:99999999999999/").status_code == 400
    )


def test_sig_inside_an_unencoded_target_is_the_targets(server: RunningServer) -> None:
    out = "https://go.flx1.com/uid?userid=[[USERID]]&sig=abc"
    answer = httpx.get(f"{server.url}/sync?out={out}")
    assert answer.status_code == 302
    assert answer.headers["location"].endswith("&sig=abc")


def test_serve_cleans_up_after_sigterm(store: Path, config: Path) -> None:
    with run_server(store, "--config", str(config)) as server:
        ready = [
            json.loads(line)
            for line in server.log().splitlines()
            if '"ingestion process ready"' in line
        ]
        folder = Path(ready[0]["socket"]).parent
        assert folder.is_dir()
        server.process.terminate()
        assert server.process.wait(15) == -15  # ended by SIGTERM, after the clean-up
    assert not folder.exists()
    assert not _alive(ready[0]["pid"])
