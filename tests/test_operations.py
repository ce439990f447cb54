"""SRE-facing pieces with the real tools: Prometheus scraping a real multi-worker server,
promtool on the alert rules, every PromQL expression we ship evaluated, deploy/ validated."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml

from tests.conftest import StoreFactory
from tests.nats import run_nats
from tests.test_metrics import samples
from tests.utils import ROOT, free_port, run_server, stop

DEPLOY = ROOT / "deploy"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "enrich-server.json"
#: The rules in ``ALERTS``.
RULES = 10


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not installed: run `make test-deps` (Debian's prometheus package)")
    return path


@contextlib.contextmanager
def prometheus(target: str) -> Iterator[str]:
    """A real Prometheus on loopback scraping ``target`` every second, with our alert rules."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="enrich-prometheus-") as folder:
        config = Path(folder) / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                    "rule_files": [str(ALERTS)],
                    "scrape_configs": [
                        {"job_name": "enrich-server", "static_configs": [{"targets": [target]}]}
                    ],
                }
            )
        )
        log = (Path(folder) / "prometheus.log").open("wb")
        process = subprocess.Popen(
            [_tool("prometheus"), f"--config.file={config}",
             f"--storage.tsdb.path={folder}/data", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=log,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((Path(folder) / "prometheus.log").read_text())
                time.sleep(0.1)
            yield url
        finally:
            stop(process)
            log.close()


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """Evaluate ``expr`` now; fails on a PromQL error."""
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=5).json()
    assert response["status"] == "success", (expr, response)
    result: list[dict[str, Any]] = response["data"]["result"]
    return result


def wait_for(url: str, expr: str, expected: float, timeout: float = 20.0) -> float:
    """Poll ``expr`` until its single value equals ``expected``; returns the last value seen."""
    deadline = time.monotonic() + timeout
    value = math.nan
    while time.monotonic() < deadline:
        result = query(url, expr)
        if result:
            value = float(result[0]["value"][1])
            if value == expected:
                return value
        time.sleep(0.5)
    return value


def panel_expressions() -> list[str]:
    """Every PromQL expression of the dashboard's panels (Grafana's ``$__rate_interval``
    becomes 1m); rows have none."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", ())]
    return [e.replace("$__rate_interval", "1m") for e in exprs]


def shipped_expressions() -> list[str]:
    """Every PromQL expression of the alert rules and the dashboard."""
    rules = yaml.safe_load(ALERTS.read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    return exprs + panel_expressions()


PLATFORM = '[[platform]]\nid = 1\nname = "mapp"\nbasic = "foo:bar"\n'


def test_real_prometheus_scrapes_two_workers(make_store: StoreFactory, tmp_path: Path) -> None:
    store = make_store("uid:u\tx,y\ndomain:d.com\tctx\n")
    sent = {"200": 150, "400": 7}
    config = tmp_path / "enrich.toml"
    config.write_text(PLATFORM)
    with run_server(store, "--workers", "2", "--config", str(config)) as server:
        target = urllib.parse.urlsplit(server.url).netloc
        with prometheus(target) as prom:
            deadline = time.monotonic() + 20
            while server.log().count('"store opened"') < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            for i in range(sent["200"]):  # new connections: spread over both workers
                body = b'{"user":{"id":"u"}}' if i % 2 else b'{"site":{"domain":"nope.com"}}'
                assert httpx.post(f"{server.url}/enrich", content=body).status_code == 200
            for _ in range(sent["400"]):
                assert httpx.post(f"{server.url}/enrich", content=b"{oops").status_code == 400
            for status, count in sent.items():
                seen = wait_for(prom, f'sum(enrich_requests_total{{status="{status}"}})', count)
                assert seen == count, status
            assert wait_for(prom, "sum(enrich_request_duration_seconds_count)", sum(sent.values()))
            # a second round, so rate() has an increase to work with
            for _ in range(50):
                httpx.post(f"{server.url}/enrich", content=b'{"user":{"id":"u"}}')
            wait_for(prom, 'sum(enrich_requests_total{status="200"})', sent["200"] + 50)
            p99 = query(
                prom,
                "histogram_quantile(0.99, sum by (le) "
                "(rate(enrich_request_duration_seconds_bucket[1m])))",
            )
            assert p99, "histogram_quantile returned nothing"
            value = float(p99[0]["value"][1])
            assert 0 < value < 0.1
            hits = query(prom, 'sum(enrich_lookups_total{result="hit"})')
            assert float(hits[0]["value"][1]) == sent["200"] // 2 + 50
            assert float(query(prom, "min(enrich_ready)")[0]["value"][1]) == 1
            # DMP ingestion, counted by platform and op whichever worker took the call
            mapp = httpx.Client(base_url=server.url, auth=("foo", "bar"))
            sid = mapp.post("/v1/segment", params={"title": "t"}).json()["segment_id"]
            for n in range(6):
                items = [{"segment": sid, "userid": f"p{n}-{i}"} for i in range(20)]
                items += [{"segment": sid, "userid": f"p{n}-0", "op": "remove"}]
                assert mapp.post("/v1/segment", json=items).status_code == 200
            mapp.close()
            added = 'sum(enrich_ingest_mutations_total{platform="mapp",op="add"})'
            assert wait_for(prom, added, 120) == 120
            removed = 'sum(enrich_ingest_mutations_total{platform="mapp",op="remove"})'
            assert wait_for(prom, removed, 6) == 6
            for expr in shipped_expressions():
                query(prom, expr)  # every expression we ship parses and evaluates
            rules = httpx.get(f"{prom}/api/v1/rules").json()["data"]["groups"][0]["rules"]
            assert len(rules) == RULES
            assert all(rule["health"] in ("ok", "unknown") for rule in rules), rules


def test_promtool_accepts_the_alert_rules() -> None:
    result = subprocess.run(
        [_tool("promtool"), "check", "rules", str(ALERTS)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {RULES} rules found" in result.stdout


def test_alerts_cover_what_sres_page_on() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert names >= {
        "EnrichLatencyP99High", "EnrichBreakerRisk", "EnrichErrorResponses",
        "EnrichSnapshotStale", "EnrichNotReady", "EnrichIngestionFailing",
        "EnrichReplicationLagging", "EnrichReplicationHalted", "EnrichReplicationDisconnected",
    }  # fmt: skip
    for rule in rules:
        assert rule["annotations"]["summary"]
        assert rule["labels"]["severity"] in ("page", "warning")


def test_real_prometheus_reads_a_replicated_node(make_store: StoreFactory, tmp_path: Path) -> None:
    store = make_store("uid:u\tx\n")
    with run_nats(tmp_path / "nats") as nats:
        config = tmp_path / "enrich.toml"
        config.write_text(f'{PLATFORM}\n[replication]\nnats = ["{nats.url}"]\n')
        with run_server(store, "--workers", "2", "--config", str(config)) as server:
            target = urllib.parse.urlsplit(server.url).netloc
            with (
                prometheus(target) as prom,
                httpx.Client(base_url=server.url, auth=("foo", "bar")) as mapp,
            ):
                sid = mapp.post("/v1/segment", params={"title": "t"}).json()["segment_id"]
                mutations = 'sum(enrich_replication_entries_applied_total{kind="mutations"})'
                for round_ in range(2):  # two rounds, so rate() has an increase to work with
                    for n in range(3):
                        items = [{"segment": sid, "userid": f"r{round_}-{n}-{i}"} for i in range(5)]
                        assert mapp.post("/v1/segment", json=items).status_code == 200
                    assert wait_for(prom, mutations, 3 * (round_ + 1)) == 3 * (round_ + 1)
                assert wait_for(prom, "max(enrich_replication_applied_sequence)", 7) == 7
                assert wait_for(prom, "max(enrich_replication_lag_entries)", 0) == 0
                assert wait_for(prom, "min(enrich_replication_connected)", 1) == 1
                created = 'sum(enrich_replication_entries_applied_total{kind="create"})'
                assert float(query(prom, created)[0]["value"][1]) == 1
                by_kind = query(
                    prom, "max by (kind) (rate(enrich_replication_entries_applied_total[1m]))"
                )
                rates = {r["metric"]["kind"]: float(r["value"][1]) for r in by_kind}
                assert rates.keys() == {"mutations", "create", "delete", "alias"}
                assert rates["mutations"] > 0
                assert rates["delete"] == rates["alias"] == 0
                for expr in panel_expressions():
                    if "enrich_replication_" in expr:
                        assert query(prom, expr), expr  # every replication panel has data
                rules = httpx.get(f"{prom}/api/v1/rules").json()["data"]["groups"][0]["rules"]
                replication = [r for r in rules if r["name"].startswith("EnrichReplication")]
                assert len(replication) == 3
                assert all(r["health"] == "ok" and r["state"] == "inactive" for r in replication)
            # new connections, spread over both workers: each asks the one ingestion process
            for _ in range(6):
                exposed = samples(httpx.get(f"{server.url}/metrics", timeout=5).text)
                assert exposed[("enrich_replication_applied_sequence", ())] == 7
                kind = (("kind", "mutations"),)
                assert exposed[("enrich_replication_entries_applied_total", kind)] == 6


def test_replication_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool's rule unit tests on synthetic series: lag over max_lag for 5 min pages (a
    shorter spell does not), a halted applier pages after 1 min, a disconnected one warns
    after 5 min."""
    rules = {r["alert"]: r for r in yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]}

    def firing(name: str, instance: str, value: str = "") -> dict[str, Any]:
        rule = rules[name]
        annotations = {
            key: text.replace("{{ $labels.instance }}", instance).replace(
                "{{ $value | humanizeDuration }}", value
            )
            for key, text in rule["annotations"].items()
        }
        return {
            "exp_labels": {**rule["labels"], "job": "enrich-server", "instance": instance},
            "exp_annotations": annotations,
        }

    def series(name: str, instance: str, values: str) -> dict[str, str]:
        return {"series": f'{name}{{job="enrich-server",instance="{instance}"}}', "values": values}

    cases = [
        # n1: 8 s behind from minute 2 on; n2: over max_lag for 3 minutes only
        series("enrich_replication_lag_seconds", "n1", "0 0 8x10"),
        series("enrich_replication_lag_seconds", "n2", "0 9 9 9 0x8"),
        series("enrich_replication_max_lag_seconds", "n1", "5x12"),
        series("enrich_replication_max_lag_seconds", "n2", "5x12"),
        series("enrich_replication_halted", "n1", "0 0 1x10"),
        series("enrich_replication_halted", "n2", "0x12"),
        series("enrich_replication_connected", "n1", "1 1 0x10"),
        series("enrich_replication_connected", "n2", "1x12"),
    ]
    expected = [
        ("EnrichReplicationLagging", "6m", []),
        ("EnrichReplicationLagging", "8m", [firing("EnrichReplicationLagging", "n1", "8s")]),
        ("EnrichReplicationHalted", "2m", []),
        ("EnrichReplicationHalted", "3m", [firing("EnrichReplicationHalted", "n1")]),
        ("EnrichReplicationDisconnected", "6m", []),
        ("EnrichReplicationDisconnected", "7m", [firing("EnrichReplicationDisconnected", "n1")]),
    ]
    unit = tmp_path / "replication-alerts-test.yaml"
    unit.write_text(
        yaml.safe_dump(
            {
                "rule_files": [str(ALERTS)],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": cases,
                        "alert_rule_test": [
                            {"alertname": name, "eval_time": at, "exp_alerts": alerts}
                            for name, at, alerts in expected
                        ],
                    }
                ],
            }
        )
    )
    result = subprocess.run(
        [_tool("promtool"), "test", "rules", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_kubernetes_manifests_validate_against_schemas() -> None:

    manifests = sorted((DEPLOY / "k8s").glob("*.yaml"))
    core = [m for m in manifests if m.name != "servicemonitor.yaml"]
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", *map(str, core)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(core) == 4


def test_kubernetes_pieces_fit_together() -> None:
    docs = {p.stem: yaml.safe_load(p.read_text()) for p in (DEPLOY / "k8s").glob("*.yaml")}
    deployment, service, monitor = docs["deployment"], docs["service"], docs["servicemonitor"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert {p["name"] for p in service["spec"]["ports"]} >= {
        monitor["spec"]["endpoints"][0]["port"]
    }
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]
    assert (
        docs["pdb"]["spec"]["selector"]["matchLabels"]
        == deployment["spec"]["selector"]["matchLabels"]
    )
    assert docs["hpa"]["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "enrich-server.service").read_text()
    for directive in ("DynamicUser=yes", "ProtectSystem=strict", "MemoryMax=", "LimitNOFILE=",
                      "NoNewPrivileges=yes"):  # fmt: skip
        assert directive in unit
    # systemd-analyze checks the binary exists: point it at this checkout's.
    binary = Path(sys.executable).parent / "enrich-server"
    local = tmp_path / "enrich-server.service"
    local.write_text(unit.replace("/opt/enrich-server/bin/enrich-server", str(binary)))
    result = subprocess.run(
        [_tool("systemd-analyze"), "verify", str(local)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    lines = [
        line.strip()
        for line in (DEPLOY / "docker" / "Dockerfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert sum(line.startswith("FROM ") for line in lines) == 2
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users
    assert users[-1] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert any("/readyz" in line for line in lines)
    assert "EXPOSE 8080" in lines
