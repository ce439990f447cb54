"""Replicated mode over real processes: a nats-server with JetStream and three ``serve``
nodes, each with its own LMDB store (DESIGN §8)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx2 as httpx
import msgspec
import nats as nats_client
import pytest
from nats.js import JetStreamContext
from nats.js import api as nats_api

from enrich_server.config import load_config, to_json
from enrich_server.ingest import checkpoints, entries, jetstream, objectstore
from enrich_server.store import SegmentStore
from tests.conftest import StoreFactory
from tests.nats import NatsServer, run_nats
from tests.test_metrics import Samples, samples
from tests.utils import RunningServer, free_port, run_server

PLATFORM = """
[enrich.auth]
header = "X-Api-Key"
tokens = ["index-token"]

[[platform]]
id = 99999
name = "mapp"
basic = "foo:bar"
ttl = 0
"""
MAPP = ("foo", "bar")
ENRICH_HEADERS = {"X-Api-Key": "index-token"}
SNAPSHOT = "uid:someone\toperator_segment\n"


def _config(tmp_path: Path, name: str, nats: NatsServer) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(f'{PLATFORM}\n[replication]\nnats = ["{nats.url}"]\nmax_lag = 2.0\n')
    return path


#: Each running node's store directory, for ``_digest``.
STORES: dict[str, Path] = {}


@contextlib.contextmanager
def _nodes(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer, count: int = 3
) -> Iterator[list[RunningServer]]:
    with contextlib.ExitStack() as stack:
        nodes = []
        for i in range(count):
            store = make_store(SNAPSHOT)
            config = _config(tmp_path, f"n{i}", nats)
            node = stack.enter_context(run_server(store, "--config", str(config)))
            STORES[node.url] = store
            nodes.append(node)
        yield nodes


def _digest(node: RunningServer) -> dict[str, object]:
    """``enrich-server digest`` of the node's store, read beside the running node."""
    done = subprocess.run(
        [sys.executable, "-m", "enrich_server", "digest", "--store", str(STORES[node.url])],
        capture_output=True,
        check=True,
    )
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    with run_nats(tmp_path / "nats") as server:
        yield server


def _segments_of(node: RunningServer, user: str) -> list[str]:
    body = json.dumps({"user": {"id": user}})
    answer = httpx.post(f"{node.url}/enrich", content=body, headers=ENRICH_HEADERS, timeout=5)
    assert answer.status_code == 200
    return sorted(answer.json()["segment_ids"])


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the propagation bound"
        time.sleep(0.02)


def _serves(node: RunningServer, user: str, segments: list[str]) -> Callable[[], bool]:
    return lambda: _segments_of(node, user) == segments


def _applied(node: RunningServer, sequence: int) -> Callable[[], bool]:
    return lambda: _ready(node).get("applied") == sequence


def _create(node: RunningServer, title: str) -> int:
    answer = httpx.post(f"{node.url}/v1/segment", params={"title": title}, auth=MAPP, timeout=15)
    assert answer.status_code == 200, answer.text
    sid: int = answer.json()["segment_id"]
    return sid


def _push(node: RunningServer, items: list[dict[str, object]]) -> httpx.Response:
    return httpx.post(f"{node.url}/v1/segment", content=json.dumps(items), auth=MAPP, timeout=15)


def _listing(node: RunningServer) -> list[tuple[int, str]]:
    answer = httpx.get(f"{node.url}/v1/segment", auth=MAPP, timeout=5)
    assert answer.status_code == 200
    return sorted((s["segment_id"], s["title"]) for s in answer.json()["segments"])


def _ready(node: RunningServer) -> dict[str, object]:
    answer: dict[str, object] = httpx.get(f"{node.url}/readyz", timeout=5).json()
    return answer


def test_a_push_to_one_node_is_served_by_the_others(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    with _nodes(tmp_path, make_store, nats) as (a, b, c):
        sid = _create(a, "Sports")
        pushed = _push(a, [{"segment": sid, "userid": f"user-{i}"} for i in range(50)])
        assert pushed.status_code == 200, pushed.text
        assert pushed.json()["applied"] == 50
        # The receiving node serves the change on its next request...
        assert _segments_of(a, "user-7") == [str(sid)]
        # ... the others within the propagation bound.
        for node in (b, c):
            _eventually(_serves(node, "user-49", [str(sid)]))
            assert _segments_of(node, "someone") == ["operator_segment"]
        removed = _push(a, [{"segment": sid, "userid": "user-7", "op": "remove"}])
        assert removed.status_code == 200
        _eventually(lambda: _segments_of(c, "user-7") == [])
        # Each node reports the same applied sequence once caught up: 1 create + 2 batches.
        for node in (a, b, c):
            _eventually(_applied(node, 3))
            assert _ready(node)["status"] == "ready"
        digests = [_digest(node) for node in (a, b, c)]
        assert digests[0]["sequence"] == 3
        assert digests[0] == digests[1] == digests[2]


def test_segments_created_on_two_nodes_at_once_get_distinct_ids_everywhere(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    with _nodes(tmp_path, make_store, nats) as (a, b, c):
        titles = [(a if i % 2 else b, f"title-{i}") for i in range(20)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda pair: _create(*pair), titles))
        assert len(set(ids)) == 20  # two creations never share an id
        expected = sorted(zip(ids, (t for _, t in titles), strict=True))
        _eventually(lambda: all(_listing(n) == expected for n in (a, b, c)))
        _eventually(lambda: _digest(a) == _digest(b) == _digest(c))
        assert _digest(a)["sequence"] == 20


def test_a_bad_batch_is_refused_before_it_is_published(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    with _nodes(tmp_path, make_store, nats, count=1) as (a,):
        sid = _create(a, "Mine")
        refused = _push(a, [{"segment": sid, "userid": "u1"}, {"segment": 12345, "userid": "u2"}])
        assert refused.status_code == 400
        assert refused.json()["problems"] == [
            "item 1: segment 12345 is not a segment of this platform"
        ]
        _eventually(lambda: _ready(a).get("last") == 1)  # only the create is in the stream
        time.sleep(1.5)  # the next look at the stream would show a published batch
        assert _ready(a)["last"] == 1
        assert _segments_of(a, "u1") == []


def test_writes_answer_503_while_nats_is_down_and_enrich_keeps_answering(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    with _nodes(tmp_path, make_store, nats, count=2) as (a, b):
        sid = _create(a, "Before")
        assert _push(a, [{"segment": sid, "userid": "kept"}]).status_code == 200
        _eventually(lambda: _segments_of(b, "kept") == [str(sid)])
        nats.kill()
        during = _push(a, [{"segment": sid, "userid": "in-outage"}])
        assert during.status_code == 503
        assert during.json()["status"] == "error"
        assert "not acknowledged" in during.json()["error"] or "NATS" in during.json()["error"]
        assert _segments_of(a, "kept") == [str(sid)]  # /enrich unaffected
        assert _segments_of(b, "someone") == ["operator_segment"]
        assert _ready(b)["status"] == "ready"  # an outage does not take nodes out of service
        nats.start()  # the same store directory: what was acknowledged is still there
        _eventually(lambda: _push(a, [{"segment": sid, "userid": "after"}]).status_code == 200)
        for node in (a, b):
            _eventually(_serves(node, "after", [str(sid)]))
            assert _segments_of(node, "kept") == [str(sid)]
            assert _segments_of(node, "in-outage") == []


def test_a_write_nats_did_not_acknowledge_is_answered_as_unconfirmed_not_as_lost(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    config = _config(tmp_path, "a", nats)
    config.write_text(config.read_text() + "publish_timeout = 0.5\n")
    with run_server(make_store(SNAPSHOT), "--config", str(config)) as a:
        sid = _create(a, "Unsure")
        assert nats.process is not None
        nats.process.send_signal(signal.SIGSTOP)  # connected, but it answers nothing
        try:
            unsure = _push(a, [{"segment": sid, "userid": "maybe"}])
        finally:
            nats.process.send_signal(signal.SIGCONT)
        assert unsure.status_code == 503
        error = unsure.json()["error"]
        assert error.startswith("write not confirmed: ")
        assert "may still be applied" in error
        assert "nothing applied" not in error
        # The publish had reached the server: once it runs again the write is in the log and
        # applied, which is why the 503 could not say it was not.
        _eventually(_serves(a, "maybe", [str(sid)]))
        assert _stream_last(nats) == 2  # sent twice with one Nats-Msg-Id: stored once


def test_a_node_killed_during_pushes_catches_up_after_restart(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    store_b = make_store(SNAPSHOT)
    config_b = _config(tmp_path, "b", nats)
    with (
        run_server(make_store(SNAPSHOT), "--config", str(_config(tmp_path, "a", nats))) as a,
        run_server(store_b, "--config", str(config_b)) as b,
    ):
        sid = _create(a, "Pushed")
        acknowledged = []
        for round_ in range(10):
            users = [f"r{round_}-u{i}" for i in range(20)]
            if round_ == 3:
                os.kill(b.process.pid, signal.SIGKILL)  # its ingestion process follows it
            answer = _push(a, [{"segment": sid, "userid": u} for u in users])
            assert answer.status_code == 200
            acknowledged += users
        b.process.wait()
        with run_server(store_b, "--config", str(config_b)) as b_again:
            _eventually(lambda: _ready(b_again).get("applied") == 11)
            for user in acknowledged:
                assert _segments_of(b_again, user) == [str(sid)], user


def _checkpoint(config: Path, store: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "enrich_server", "checkpoint", "--config", str(config),
         "--store", str(store)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


T = TypeVar("T")


def _on_jetstream(nats: NatsServer, work: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    """``work`` done on a connection of its own to ``nats``, as a client outside the nodes."""

    async def run() -> T:
        client = await nats_client.connect(nats.url)
        try:
            return await work(client.jetstream())
        finally:
            await client.close()

    return asyncio.run(run())


def _purge_before(nats: NatsServer, sequence: int) -> None:
    """Drop the stream's entries before ``sequence``, as expiry would."""
    _on_jetstream(nats, lambda js: js.purge_stream("ENRICH", seq=sequence))


def _stream_last(nats: NatsServer) -> int:
    """The stream's last sequence, as JetStream reports it."""
    info = _on_jetstream(nats, lambda js: js.stream_info("ENRICH"))
    last: int = info.state.last_seq
    return last


def test_a_new_node_with_an_empty_directory_starts_from_the_latest_checkpoint(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    with _nodes(tmp_path, make_store, nats) as (a, b, c):
        sid = _create(a, "Early")
        early = [f"early-{i}" for i in range(30)]
        assert _push(a, [{"segment": sid, "userid": u} for u in early]).status_code == 200
        _eventually(_applied(b, 2))
        config_b = tmp_path / "n1.toml"
        uploaded = _checkpoint(config_b, STORES[b.url])
        assert "uploaded checkpoint-000000000002" in uploaded
        assert "sequence 2" in uploaded
        assert "already holds" in _checkpoint(config_b, STORES[b.url])  # nothing newer
        late = _push(c, [{"segment": sid, "userid": "late"}])
        assert late.status_code == 200
        # The stream forgets what the checkpoint holds: only the checkpoint can give it now.
        _purge_before(nats, 3)
        empty = tmp_path / "new-node"  # does not exist yet, like an empty volume's subdir
        with run_server(empty, "--config", str(_config(tmp_path, "d", nats))) as d:
            STORES[d.url] = empty
            _eventually(_applied(d, 3))
            assert _segments_of(d, "early-29") == [str(sid)]
            assert _segments_of(d, "late") == [str(sid)]
            assert _listing(d) == _listing(a)
            assert "checkpoint restored" in d.log()
            _eventually(lambda: _digest(d) == _digest(a) == _digest(b) == _digest(c))
            assert _digest(d)["sequence"] == 3


def test_a_node_behind_the_stream_restores_a_checkpoint_and_never_skips_a_gap(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    store_a, store_b = make_store(SNAPSHOT), make_store(SNAPSHOT)
    config_a, config_b = _config(tmp_path, "a", nats), _config(tmp_path, "b", nats)
    with run_server(store_a, "--config", str(config_a)) as a:
        STORES[a.url] = store_a
        with run_server(store_b, "--config", str(config_b)) as b:
            sid = _create(a, "Seen")
            _eventually(_applied(b, 1))
        for i in range(3):  # b is down: entries 2-4
            assert _push(a, [{"segment": sid, "userid": f"missed-{i}"}]).status_code == 200
        _purge_before(nats, 4)
        # No checkpoint covers entries 2-3: b must stop rather than skip them.
        with run_server(store_b, "--config", str(config_b), wait_for="/healthz") as b:
            _eventually(lambda: "no checkpoint covers" in str(_ready(b).get("why", "")))
            assert httpx.get(f"{b.url}/readyz", timeout=5).status_code == 503
            assert _segments_of(b, "missed-2") == []
            assert _segments_of(b, "someone") == ["operator_segment"]  # still serves
            refused = _push(b, [{"segment": sid, "userid": "x"}])  # it could not apply it
            assert refused.status_code == 503
            assert "no checkpoint covers" in refused.json()["error"]
            assert _stream_last(nats) == 4  # nothing published
            assert _ready(a)["last"] == 4
            # An operator's checkpoint covers the gap: the halted node restores it by itself.
            assert "sequence 4" in _checkpoint(config_a, store_a)
            _eventually(lambda: _ready(b)["status"] == "ready", timeout=30)
            STORES[b.url] = store_b
            assert _segments_of(b, "missed-0") == [str(sid)]
            assert _digest(b) == _digest(a)
            assert "checkpoint restored" in b.log()


def test_the_periodic_checkpoint_process_uploads_only_what_is_newer(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    config = load_config(
        _config(tmp_path, "p", nats), {}, {"server.store": str(make_store(SNAPSHOT))}
    )

    async def run() -> list[checkpoints.Checkpoint]:
        assert await checkpoints.take_in_process(to_json(config)) == 0
        assert await checkpoints.take_in_process(to_json(config)) == 0  # not newer: skipped
        client = await objectstore.connect(config.replication)
        try:
            bucket = await objectstore.bucket(client.jetstream(), config.replication)
            return await checkpoints.stored(bucket)
        finally:
            await client.close()

    stored = asyncio.run(run())
    assert [(c.name, c.sequence) for c in stored] == [("checkpoint-000000000000", 0)]
    assert stored[0].size > 0


def test_checkpoint_command_errors_are_clear(tmp_path: Path, make_store: StoreFactory) -> None:
    store = make_store(SNAPSHOT)
    single = tmp_path / "single.toml"
    single.write_text(PLATFORM)
    unreachable = tmp_path / "unreachable.toml"
    unreachable.write_text(f'[replication]\nnats = ["nats://127.0.0.1:{free_port()}"]\n')
    for config, code, message in (
        (single, 2, "checkpoint needs a replicated configuration"),
        (unreachable, 1, "is not reachable"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "enrich_server", "checkpoint", "--config", str(config),
             "--store", str(store)],
            check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == code, done.stderr
        assert message in done.stderr


def _scrape(node: RunningServer) -> Samples:
    answer = httpx.get(f"{node.url}/metrics", timeout=5)
    assert answer.status_code == 200
    return samples(answer.text)


def _replication(exposed: Samples, name: str) -> float:
    return exposed[(f"enrich_replication_{name}", ())]


def _sees_last(node: RunningServer, sequence: int) -> Callable[[], bool]:
    return lambda: _replication(_scrape(node), "last_sequence") == sequence


def _by_kind(exposed: Samples) -> dict[str, float]:
    return {
        labels[0][1]: value
        for (name, labels), value in exposed.items()
        if name == "enrich_replication_entries_applied_total"
    }


def test_metrics_report_the_applied_sequence_entries_by_kind_and_lag(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    with _nodes(tmp_path, make_store, nats, count=2) as (a, b):
        sid = _create(a, "Metered")
        for round_ in range(2):
            users = [{"segment": sid, "userid": f"m{round_}-{i}"} for i in range(10)]
            assert _push(a, users).status_code == 200
        gone = httpx.delete(f"{a.url}/v1/segment/{_create(a, 'Gone')}", auth=MAPP, timeout=15)
        assert gone.status_code == 200
        for node in (a, b):  # 2 creates, 2 batches, 1 delete; the last one seen within 1 s
            _eventually(_sees_last(node, 5))
            exposed = _scrape(node)
            assert _replication(exposed, "applied_sequence") == 5
            assert _replication(exposed, "lag_entries") == 0
            assert _replication(exposed, "lag_seconds") == 0
            assert _replication(exposed, "connected") == 1
            assert _replication(exposed, "halted") == 0
            assert _replication(exposed, "max_lag_seconds") == 2.0  # the node's [replication]
            assert _replication(exposed, "publish_failures_total") == 0
            assert _by_kind(exposed) == {
                "mutations": 2,
                "create": 2,
                "delete": 1,
                "alias": 0,
                "dropfile": 0,
                "compact": 0,
                "snapshot": 0,
                "dropobject": 0,
            }
        # a hung ingestion process: the scrape still answers at once, reporting connected 0
        ingestd = next(
            json.loads(line)["pid"]
            for line in b.log().splitlines()
            if '"ingestion process ready"' in line
        )
        os.kill(ingestd, signal.SIGSTOP)
        try:
            started = time.monotonic()
            hung = _scrape(b)
            took = time.monotonic() - started
        finally:
            os.kill(ingestd, signal.SIGCONT)
        assert took < 2.0
        assert _replication(hung, "connected") == 0
        assert ("enrich_replication_applied_sequence", ()) not in hung
        assert hung[("enrich_requests_total", (("status", "200"),))] == 0  # the rest as ever
        # NATS gone: the write that could not be published is counted, the link reported down
        nats.kill()
        assert _push(a, [{"segment": sid, "userid": "lost"}]).status_code == 503
        assert _replication(_scrape(a), "publish_failures_total") == 1
        _eventually(lambda: _replication(_scrape(a), "connected") == 0)
        assert _replication(_scrape(b), "applied_sequence") == 5


def test_load_replace_on_one_node_is_served_by_every_node_without_a_failed_call(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    snapshot = tmp_path / "nightly.tsv"
    snapshot.write_text("".join(f"uid:n{i}\tnightly_segment\n" for i in range(2000)))
    with _nodes(tmp_path, make_store, nats) as nodes:
        a = nodes[0]
        sid = _create(a, "Kept")  # DMP state: carried over by every node
        assert _push(a, [{"segment": sid, "userid": "pushed"}]).status_code == 200
        failures: list[str] = []
        stop_calls = False

        def call_forever(node: RunningServer) -> int:
            calls = 0
            with httpx.Client(timeout=5) as client:
                while not stop_calls:
                    answer = client.post(
                        f"{node.url}/enrich",
                        content=json.dumps({"user": {"id": "someone"}}),
                        headers=ENRICH_HEADERS,
                    )
                    calls += 1
                    if answer.status_code != 200:
                        failures.append(f"{node.url}: {answer.status_code}")
            return calls

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            callers = [pool.submit(call_forever, node) for node in nodes]
            done = subprocess.run(
                [sys.executable, "-m", "enrich_server", "load", str(snapshot), "--replace",
                 "--quiet", "--store", str(STORES[a.url]), "--config", str(tmp_path / "n0.toml")],
                check=False, capture_output=True, text=True, timeout=60,
                env={**os.environ, "ENRICH_SERVER_STORE": str(STORES[a.url])},
            )  # fmt: skip
            published = time.monotonic()
            assert done.returncode == 0, done.stderr
            assert "as log entry 3" in done.stdout
            assert "this node serves it" in done.stdout
            for node in nodes:
                _eventually(_serves(node, "n1999", ["nightly_segment"]), timeout=10)
            swapped_within = time.monotonic() - published
            stop_calls = True
            calls = [caller.result() for caller in callers]
        assert failures == []
        assert min(calls) > 0
        assert swapped_within < 10
        for node in nodes:
            assert _segments_of(node, "someone") == []  # replaced: the old snapshot is gone
            assert _segments_of(node, "pushed") == []  # DMP memberships go with it, as locally
            assert (sid, "Kept") in _listing(node)  # the DMP's segment stays
            _eventually(_applied(node, 3))
        _eventually(lambda: _digest(nodes[0]) == _digest(nodes[1]) == _digest(nodes[2]))


def test_a_delta_load_on_a_replicated_node_is_refused(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    snapshot = tmp_path / "delta.tsv"
    snapshot.write_text("uid:x\tseg\n")
    done = subprocess.run(
        [sys.executable, "-m", "enrich_server", "load", str(snapshot), "--store",
         str(make_store(SNAPSHOT)), "--config", str(_config(tmp_path, "a", nats))],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "must be --replace" in done.stderr


def test_nats_killed_during_pushes_loses_no_acknowledged_one(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    with _nodes(tmp_path, make_store, nats, count=2) as (a, b):
        sid = _create(a, "Pushed")
        answers: dict[str, int] = {}

        def push_all() -> None:
            for i in range(200):
                user = f"p{i}"
                answers[user] = _push(a, [{"segment": sid, "userid": user}]).status_code
                time.sleep(0.01)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pushing = pool.submit(push_all)
            _eventually(lambda: len(answers) >= 20)
            nats.kill()  # mid-push: SIGKILL, nothing flushed but what was synced
            _eventually(lambda: 503 in answers.values())
            nats.start()  # the same store directory
            pushing.result(timeout=120)
        acknowledged = [u for u, code in answers.items() if code == 200]
        refused = [u for u, code in answers.items() if code == 503]
        assert set(answers.values()) <= {200, 503}
        assert len(acknowledged) >= 20
        assert refused
        for node in (a, b):
            _eventually(_serves(node, acknowledged[-1], [str(sid)]), timeout=20)
            for user in acknowledged:
                assert _segments_of(node, user) == [str(sid)], user
        _eventually(lambda: _digest(a) == _digest(b))


def _drop_file(folder: Path, sid: int, minute: int, text: str) -> Path:
    """A settled drop file for segment ``sid``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"Mapp_dmp_{sid}_2026_12_06_20_{minute:02d}.tsv.gz"
    path.write_bytes(gzip.compress(text.encode()))
    old = time.time() - 60
    os.utime(path, (old, old))
    return path


def _ingest(config: Path, store: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enrich_server", "ingest", "--config", str(config),
         "--store", str(store), *arguments],
        check=False, capture_output=True, text=True, timeout=90,
    )  # fmt: skip


def test_a_drop_file_on_one_node_is_applied_by_every_node_once(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    with _nodes(tmp_path, make_store, nats) as (a, b, c):
        sid = _create(a, "Dropped")
        assert _push(a, [{"segment": sid, "userid": "leaving"}]).status_code == 200
        lines = "".join(f"drop-{i}\n" for i in range(300)) + "leaving\tremove\n"
        path = _drop_file(tmp_path / "in", sid, 1, lines)
        config_a = tmp_path / "n0.toml"
        done = _ingest(config_a, STORES[a.url], str(path))
        assert done.returncode == 0, done.stderr
        assert "300 add and 1 remove lines applied as log entry 3" in done.stdout
        assert _segments_of(a, "drop-299") == [str(sid)]  # applied here before it returned
        for node in (b, c):
            _eventually(_serves(node, "drop-0", [str(sid)]))
            assert _segments_of(node, "leaving") == []
        again = _ingest(tmp_path / "n1.toml", STORES[b.url], str(path))  # on another node
        assert again.returncode == 0, again.stderr
        assert "already applied, skipped" in again.stdout
        assert _stream_last(nats) == 3  # nothing published the second time
        _eventually(lambda: _digest(a) == _digest(b) == _digest(c))
        assert _digest(a)["sequence"] == 3


def test_a_bad_drop_file_on_a_replicated_node_publishes_nothing(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    with _nodes(tmp_path, make_store, nats, count=2) as (a, b):
        sid = _create(a, "Watched")
        drop = tmp_path / "drop"
        good = _drop_file(drop, sid, 1, "w1\nw2\tremove\n")
        bad = _drop_file(drop, sid, 2, "w3\nw 4\nw5\tzap\n")
        unknown = _drop_file(drop, 12345, 3, "w6\n")  # not a DMP segment
        direct = _ingest(tmp_path / "n0.toml", STORES[a.url], str(bad))
        assert direct.returncode == 1
        assert f"{bad.name}:2: userid" in direct.stderr
        assert f"{bad.name}:3: op 'zap' is not add or remove" in direct.stderr
        assert _stream_last(nats) == 1  # only the create
        watched = _ingest(tmp_path / "n0.toml", STORES[a.url], "--watch", str(drop), "--once")
        assert watched.returncode == 1  # two refused
        assert sorted(p.name for p in (drop / "applied").iterdir()) == [good.name]
        rejected = drop / "rejected"
        assert (rejected / bad.name).is_file()
        why = (rejected / f"{bad.name}.why").read_text().splitlines()
        assert [line.split(": ")[0] for line in why] == [f"{bad.name}:2", f"{bad.name}:3"]
        assert "not a segment a DMP created" in (rejected / f"{unknown.name}.why").read_text()
        assert _stream_last(nats) == 2  # the good file alone
        for node in (a, b):
            _eventually(_serves(node, "w1", [str(sid)]))
            assert _segments_of(node, "w3") == []
        _eventually(lambda: _digest(a) == _digest(b))
        # A micro-batch too large for one entry (as its planned changes: ~1.2 MB) is a 400
        # too, not a 503 from NATS.
        big = [{"segment": sid, "userid": f"{i:0120d}"} for i in range(9_000)]
        refused = _push(a, big)
        assert refused.status_code == 400, refused.text
        assert "one mutations entry may take: split it" in refused.json()["problems"][0]
        assert _stream_last(nats) == 2


def _publish_raw(nats: NatsServer, entry: entries.LogEntry, msg_id: str) -> int:
    """Publish ``entry`` as a node would, under ``msg_id``; its stream sequence."""
    payload, headers = entries.encode(entry), {"Nats-Msg-Id": msg_id}
    ack = _on_jetstream(nats, lambda js: js.publish("ENRICH.entries", payload, headers=headers))
    sequence: int = ack.seq
    return sequence


def test_a_drop_file_published_twice_is_applied_once_on_every_node(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    with _nodes(tmp_path, make_store, nats, count=2) as (a, b):
        sid = _create(a, "Twice")
        entry = entries.DropFile(
            f"Mapp_dmp_{sid}_2026_12_06_20_01.tsv.gz",
            "ab" * 32, sid, 1, 1_800_000_000_000, 1_900_000_000, [(b"uid:twice", True)],
        )  # fmt: skip
        assert _publish_raw(nats, entry, "first") == 2
        assert _publish_raw(nats, entry, "first") == 2  # within the duplicate window: dropped
        # Published again after the window (another id), made at another time: skipped by
        # every applier, as the name and content are recorded.
        later = msgspec.structs.replace(entry, at_ms=1_800_000_999_000, expires=1_950_000_000)
        assert _publish_raw(nats, later, "second") == 3
        for node in (a, b):
            _eventually(_applied(node, 3))
        stores = [SegmentStore(STORES[node.url]) for node in (a, b)]
        try:
            for store in stores:
                assert store.memberships(b"uid:twice") == {str(sid): 1_900_000_000}
                record = json.loads(store.applied_file(entry.name) or b"{}")
                assert record == {"applied_at": 1_800_000_000, "sha256": "ab" * 32, "lines": 1}
        finally:
            for store in stores:
                store.close()
        assert _digest(a) == _digest(b)


#: Lines of a drop file too large for one entry (about 35,000 fit): it goes through the bucket.
LARGE_LINES = 60_000
BUCKET = "enrich-snapshots"  # [replication] bucket's default


def _large_drop_file(folder: Path, sid: int, minute: int) -> Path:
    lines = "".join(f"large-{i:017d}\n" for i in range(LARGE_LINES)) + "leaving\tremove\n"
    return _drop_file(folder, sid, minute, lines)


def _in_bucket(nats: NatsServer, prefix: str) -> list[nats_api.ObjectInfo]:
    async def names(js: JetStreamContext) -> list[nats_api.ObjectInfo]:
        return await objectstore.names(await js.object_store(BUCKET), prefix)

    return _on_jetstream(nats, names)


def _write_object(nats: NatsServer, name: str, data: bytes | None) -> None:
    """Put ``data`` in the bucket as ``name``, or delete it (``None``)."""

    async def write(js: JetStreamContext) -> None:
        bucket = await js.object_store(BUCKET)
        await (bucket.delete(name) if data is None else bucket.put(name, data))

    _on_jetstream(nats, write)


def _entry_at(nats: NatsServer, sequence: int) -> entries.LogEntry:
    message = _on_jetstream(nats, lambda js: js.get_msg("ENRICH", sequence))
    return entries.decode(message.data or b"")


def test_a_drop_file_too_large_for_one_entry_reaches_every_node_through_the_bucket(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    with _nodes(tmp_path, make_store, nats) as (a, b, c):
        sid = _create(a, "Large")
        assert _push(a, [{"segment": sid, "userid": "leaving"}]).status_code == 200
        drop = tmp_path / "drop"
        path = _large_drop_file(drop, sid, 1)
        watched = _ingest(tmp_path / "n0.toml", STORES[a.url], "--watch", str(drop), "--once")
        assert watched.returncode == 0, watched.stderr
        applied = drop / "applied" / path.name
        assert applied.is_file()
        last = f"large-{LARGE_LINES - 1:017d}"
        assert _segments_of(a, last) == [str(sid)]  # applied here before it returned
        (stored,) = _in_bucket(nats, "dropfile-")
        assert stored.size == applied.stat().st_size  # the file as dropped
        entry = _entry_at(nats, 3)
        assert isinstance(entry, entries.DropFileObject)
        assert (entry.object, entry.size, entry.lines) == (stored.name, stored.size, 60_001)
        for node in (b, c):
            _eventually(_serves(node, last, [str(sid)]), timeout=30)
            assert _segments_of(node, "large-00000000000000000") == [str(sid)]
            assert _segments_of(node, "leaving") == []
        _eventually(lambda: _digest(a) == _digest(b) == _digest(c))
        assert _digest(a)["sequence"] == 3
        again = _ingest(tmp_path / "n1.toml", STORES[b.url], str(applied))  # on another node
        assert again.returncode == 0, again.stderr
        assert "already applied, skipped" in again.stdout
        assert _stream_last(nats) == 3  # nothing published the second time
        assert len(_in_bucket(nats, "dropfile-")) == 1
        # Published again after the duplicate window, its object gone meanwhile: skipped by
        # its record on every node, not fetched, no halt.
        _write_object(nats, stored.name, None)
        assert _publish_raw(nats, entry, "again, later") == 4
        for node in (a, b, c):
            _eventually(_applied(node, 4))
            assert _ready(node)["status"] == "ready"
        assert _digest(a) == _digest(b) == _digest(c)


def test_a_large_drop_file_whose_object_is_missing_or_corrupt_halts_a_node_never_skipped(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    store_a, store_b = make_store(SNAPSHOT), make_store(SNAPSHOT)
    config_a, config_b = _config(tmp_path, "a", nats), _config(tmp_path, "b", nats)
    with run_server(store_a, "--config", str(config_a)) as a:
        with run_server(store_b, "--config", str(config_b)) as b:
            sid = _create(a, "Fragile")
            _eventually(_applied(b, 1))
        path = _large_drop_file(tmp_path / "in", sid, 2)
        original = path.read_bytes()
        done = _ingest(config_a, store_a, str(path))
        assert done.returncode == 0, done.stderr
        assert "applied as log entry 2" in done.stdout
        (stored,) = _in_bucket(nats, "dropfile-")
        _write_object(nats, stored.name, None)  # gone before B applied it
        with run_server(store_b, "--config", str(config_b), wait_for="/healthz") as b:
            why = "entry 2 (dropobject) cannot be applied: "
            _eventually(lambda: why + f"{stored.name} is not in the bucket" in str(_ready(b)))
            _write_object(nats, stored.name, gzip.compress(b"someone-else\n"))  # another one
            _eventually(lambda: "is not the object the log names" in str(_ready(b)), timeout=20)
            assert _ready(b)["applied"] == 1  # halted before it, not past it
            assert _segments_of(b, "large-00000000000000000") == []
            _write_object(nats, stored.name, original)  # put back: B goes on with it
            _eventually(_applied(b, 2), timeout=20)
            assert _ready(b)["status"] == "ready"
            assert _segments_of(b, "large-00000000000000000") == [str(sid)]
            STORES[a.url], STORES[b.url] = store_a, store_b
            assert _digest(a) == _digest(b)


def test_a_caught_up_node_halted_on_an_entry_stays_halted_until_it_applies_it(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    store_a = make_store(SNAPSHOT)
    config_a = _config(tmp_path, "a", nats)
    with run_server(store_a, "--config", str(config_a)) as a:
        sid = _create(a, "Held")
        path = _large_drop_file(tmp_path / "in", sid, 3)
        assert _ingest(config_a, store_a, str(path)).returncode == 0
        entry = _entry_at(nats, 2)
        assert isinstance(entry, entries.DropFileObject)
        held = msgspec.structs.replace(
            entry, name=path.name.replace("_03.tsv", "_04.tsv"), object="dropfile-held"
        )
        assert _publish_raw(nats, held, "held") == 3
        _eventually(lambda: "dropfile-held is not in the bucket" in str(_ready(a)))
        # Each retry looks for the object again: the node stays out of service meanwhile.
        deadline = time.monotonic() + jetstream.HALTED_RETRY_SECONDS + 1.5
        while time.monotonic() < deadline:
            ready = httpx.get(f"{a.url}/readyz", timeout=5)
            assert ready.status_code == 503, ready.text
            assert "dropfile-held" in ready.json()["why"]
            time.sleep(0.1)
        refused = _push(a, [{"segment": sid, "userid": "x"}])
        assert refused.status_code == 503
        assert "cannot apply writes" in refused.json()["error"]
        _write_object(nats, "dropfile-held", path.read_bytes())
        _eventually(_applied(a, 3), timeout=20)
        assert _ready(a)["status"] == "ready"
        assert _push(a, [{"segment": sid, "userid": "x"}]).status_code == 200


def _ttl_config(tmp_path: Path, name: str, nats: NatsServer, ttl: int) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f"{PLATFORM.replace('ttl = 0', f'ttl = {ttl}')}\n"
        f'[replication]\nnats = ["{nats.url}"]\nmax_lag = 2.0\n'
    )
    return path


def test_a_node_replaying_later_with_another_ttl_reaches_the_same_digest(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    store_a = make_store(SNAPSHOT)
    config_a = _ttl_config(tmp_path, "a", nats, 3600)
    with run_server(store_a, "--config", str(config_a)) as a:
        STORES[a.url] = store_a
        sid = _create(a, "Expiring")
        assert _push(a, [{"segment": sid, "userid": "pushed"}]).status_code == 200
        assert _push(a, [{"segment": sid, "userid": "own", "ttl": 60}]).status_code == 200
        dropped = _ingest(config_a, store_a, str(_drop_file(tmp_path, sid, 5, "dropped\n")))
        assert dropped.returncode == 0, dropped.stderr
        time.sleep(2.5)  # the replay below runs at another second of the clock
        # Another node, its platform ttl configured otherwise: the entries' own ttl wins.
        store_d = make_store(SNAPSHOT)
        config_d = _ttl_config(tmp_path, "d", nats, 60)
        with run_server(store_d, "--config", str(config_d)) as d:
            STORES[d.url] = store_d
            _eventually(_applied(d, 4))
            assert _segments_of(d, "dropped") == [str(sid)]
            assert _digest(d) == _digest(a)
    replayed, original = SegmentStore(store_d), SegmentStore(store_a)
    try:
        for user in (b"uid:pushed", b"uid:own", b"uid:dropped"):
            assert replayed.memberships(user) == original.memberships(user)
        expiries = original.memberships(b"uid:dropped") or {}
        assert 3000 < expiries[str(sid)] - time.time() <= 3600  # the publisher's ttl
    finally:
        replayed.close()
        original.close()


def test_a_replicated_store_is_not_given_a_drop_file_or_compacted_directly(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    with _nodes(tmp_path, make_store, nats, count=1) as (a,):
        sid = _create(a, "Guarded")
        single = tmp_path / "single.toml"
        single.write_text(PLATFORM)
        refused = _ingest(single, STORES[a.url], str(_drop_file(tmp_path, sid, 7, "x\n")))
        assert refused.returncode == 2
        assert "is a replicated node's store" in refused.stderr
        assert _segments_of(a, "x") == []
        compacted = subprocess.run(
            [sys.executable, "-m", "enrich_server", "compact", "--store", str(STORES[a.url])],
            check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert compacted.returncode == 2
        assert "so that every node compacts alike" in compacted.stderr


def test_the_stream_is_created_with_explicit_limits(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    with _nodes(tmp_path, make_store, nats, count=1):
        created = _on_jetstream(nats, lambda js: js.stream_info("ENRICH")).config
    assert created.max_msg_size == jetstream.MAX_MESSAGE_BYTES == 1 << 20
    assert created.duplicate_window == jetstream.DUPLICATE_WINDOW_SECONDS
    assert created.storage == nats_api.StorageType.FILE
    assert created.retention == nats_api.RetentionPolicy.LIMITS
    assert (created.max_age, created.max_msgs, created.max_bytes) == (0, -1, -1)


def test_compact_on_a_replicated_node_drops_the_same_memberships_on_every_node(
    tmp_path: Path, make_store: StoreFactory, nats: NatsServer
) -> None:
    with _nodes(tmp_path, make_store, nats, count=2) as (a, b):
        sid = _create(a, "Short")
        short = [{"segment": sid, "userid": f"short-{i}", "ttl": 1} for i in range(30)]
        assert _push(a, [*short, {"segment": sid, "userid": "long"}]).status_code == 200
        time.sleep(2.1)  # the short ones expired; still in every store, as digests count them
        done = subprocess.run(
            [sys.executable, "-m", "enrich_server", "compact", "--store", str(STORES[a.url]),
             "--config", str(tmp_path / "n0.toml")],
            check=False, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "in 1 slice(s) (log entries 3-3)" in done.stdout
        for node in (a, b):
            _eventually(_applied(node, 3))
            store = SegmentStore(STORES[node.url])
            try:
                assert store.memberships(b"uid:short-0") is None  # the key went with its last
                assert store.memberships(b"uid:long") == {str(sid): 0}
            finally:
                store.close()
            assert _segments_of(node, "long") == [str(sid)]
        assert _digest(a) == _digest(b)
