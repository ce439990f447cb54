"""SRE-facing pieces with the real tools: Prometheus scraping a real multi-worker server,
promtool on the alert rules, every PromQL expression we ship evaluated, deploy/ validated."""

from __future__ import annotations

import contextlib
import json
import math
import re
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

from enrich_server.cli import build_parser
from enrich_server.config import Config, load_config
from tests.conftest import StoreFactory
from tests.nats import NATS_SERVER, run_nats
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
                assert rates.keys() == {
                    "mutations", "create", "delete", "alias", "dropfile", "compact", "snapshot",
                    "dropobject",
                }  # fmt: skip
                assert rates["mutations"] > 0
                assert {rates[k] for k in rates.keys() - {"mutations", "create"}} == {0}
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
    core = [path for path in _k8s_manifests() if path.name != "servicemonitor.yaml"]
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", *map(str, core)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    objects = [doc for path in core for doc in yaml.safe_load_all(path.read_text())]
    assert result.stdout.count("passed") == len(objects)
    assert {"Deployment", "StatefulSet", "ConfigMap", "Service"} <= {o["kind"] for o in objects}


def test_kubernetes_pieces_fit_together() -> None:
    k8s = _k8s_objects()
    deployment = k8s["Deployment", "enrich-server"]
    service, monitor = k8s["Service", "enrich-server"], k8s["ServiceMonitor", "enrich-server"]
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
        k8s["PodDisruptionBudget", "enrich-server"]["spec"]["selector"]["matchLabels"]
        == deployment["spec"]["selector"]["matchLabels"]
    )
    target = k8s["HorizontalPodAutoscaler", "enrich-server"]["spec"]["scaleTargetRef"]
    assert target == {
        "apiVersion": deployment["apiVersion"],
        "kind": deployment["kind"],
        "name": deployment["metadata"]["name"],
    }
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_kubernetes_lists_every_manifest_in_its_kustomization() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in _k8s_manifests())


def test_enrich_pods_own_their_store_on_an_empty_dir(tmp_path: Path) -> None:
    """No shared volume (an LMDB environment is never shared across pods or hosts): each pod's
    store is on its own emptyDir, which serve bootstraps from the checkpoint and the stream."""
    k8s = _k8s_objects()
    assert not [name for kind, name in k8s if kind == "PersistentVolumeClaim"]
    deployment = k8s["Deployment", "enrich-server"]
    assert "volumeClaimTemplates" not in deployment["spec"]
    pod = deployment["spec"]["template"]["spec"]
    assert all("persistentVolumeClaim" not in volume for volume in pod["volumes"])
    config, container = _enrich_config(k8s, tmp_path)
    store = Path(config.server.store)
    mounts = [m for m in container["volumeMounts"] if store.is_relative_to(m["mountPath"])]
    mount = max(mounts, key=lambda m: len(m["mountPath"]))
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"]["sizeLimit"]
    # On disk its pages are reclaimable page cache; tmpfs would pin all of it in memory.
    assert volume["emptyDir"].get("medium") != "Memory"
    # The scheduler places a pod only where its store fits.
    assert (
        container["resources"]["requests"]["ephemeral-storage"] == volume["emptyDir"]["sizeLimit"]
    )


def test_enrich_pods_run_the_configmap_as_a_replicated_node(tmp_path: Path) -> None:
    k8s = _k8s_objects()
    config, container = _enrich_config(k8s, tmp_path)
    nats = k8s["StatefulSet", "nats"]
    assert config.replicated
    assert config.replication.replicas == 3 == nats["spec"]["replicas"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert ports[container[probe]["httpGet"]["port"]] == config.server.port
    assert config.server.host in ("0.0.0.0", "::")  # the Service reaches the pod's address
    assert config.server.workers == int(container["resources"]["requests"]["cpu"])
    nats_ports = {p["name"]: p["containerPort"] for p in _only_container(nats)["ports"]}
    for url in config.replication.nats:
        parsed = urllib.parse.urlsplit(url)
        service = k8s["Service", str(parsed.hostname)]
        assert (
            service["spec"]["selector"].items() <= nats["spec"]["selector"]["matchLabels"].items()
        )
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == parsed.port]
        assert nats_ports[port["targetPort"]] == parsed.port


def test_nats_is_a_three_node_cluster_syncing_every_write(tmp_path: Path) -> None:
    k8s = _k8s_objects()
    nats = k8s["StatefulSet", "nats"]
    spec = nats["spec"]
    container = _only_container(nats)
    command = container["command"]
    config_path = Path(command[command.index("--config") + 1])
    text = _mounted_file(k8s, nats, config_path)
    # The real nats-server of the tests parses it (unknown fields and bad values fail);
    # variables from fieldRefs get a pod's name.
    conf = tmp_path / config_path.name
    conf.write_text(text)
    environ = {e["name"]: e.get("value", f"{nats['metadata']['name']}-0")
               for e in container["env"]}  # fmt: skip
    checked = subprocess.run(
        [str(NATS_SERVER), "-t", "-c", str(conf)],
        env=environ, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "is valid" in checked.stdout + checked.stderr

    assert spec["replicas"] == 3
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert re.findall(r"^port:\s*(\d+)", text, re.MULTILINE) == [str(ports["client"])]
    cluster = re.search(r"^cluster\s*\{[^}]*?^\s*port:\s*(\d+)", text, re.MULTILINE)
    assert cluster is not None
    assert int(cluster[1]) == ports["cluster"]
    assert int(_conf_value(text, "http_port")) == ports["monitor"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "monitor"
    # JetStream on file storage, on each server's own claim, fsynced before every ack.
    store_dir = Path(_conf_value(text, "store_dir"))
    claims = {claim["metadata"]["name"] for claim in spec["volumeClaimTemplates"]}
    (mount,) = [m for m in container["volumeMounts"] if store_dir.is_relative_to(m["mountPath"])]
    assert mount["name"] in claims
    assert _conf_value(text, "sync_interval") == "always"
    # Routes: every server by its stable name under the headless Service, on the route port.
    headless = k8s["Service", spec["serviceName"]]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["publishNotReadyAddresses"] is True
    routes = set(re.findall(r"nats://([\w.-]+):(\d+)", text))
    name = nats["metadata"]["name"]
    expected = {(f"{name}-{i}.{spec['serviceName']}", str(ports["cluster"]))
                for i in range(spec["replicas"])}  # fmt: skip
    assert routes == expected
    # Deployed what the tests run.
    version = subprocess.run(
        [str(NATS_SERVER), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    assert container["image"].split(":")[1].split("-")[0] == version.removeprefix("v")
    # Never two servers on one node; a disruption leaves a quorum.
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]
    (rule,) = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert rule["topologyKey"] == "kubernetes.io/hostname"
    pdb = k8s["PodDisruptionBudget", name]["spec"]
    assert pdb["selector"] == spec["selector"]
    assert spec["replicas"] - pdb["maxUnavailable"] > spec["replicas"] // 2


K8S = DEPLOY / "k8s"


def _k8s_manifests() -> list[Path]:
    """The manifests under deploy/k8s (the kustomization lists them)."""
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _k8s_objects() -> dict[tuple[str, str], Any]:
    """Every object of the manifests, by kind and name."""
    docs = [doc for path in _k8s_manifests() for doc in yaml.safe_load_all(path.read_text())]
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}
    assert len(objects) == len(docs), "two objects of one kind share a name"
    return objects


def _only_container(workload: Any) -> Any:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _mounted_file(k8s: dict[tuple[str, str], Any], workload: Any, path: Path) -> str:
    """The text of ``path`` in ``workload``'s container: a key of a mounted ConfigMap."""
    (mount,) = [m for m in _only_container(workload)["volumeMounts"]
                if m["mountPath"] == str(path.parent)]  # fmt: skip
    volumes = workload["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == mount["name"]]
    text: str = k8s["ConfigMap", volume["configMap"]["name"]]["data"][path.name]
    return text


def _enrich_config(k8s: dict[tuple[str, str], Any], folder: Path) -> tuple[Config, Any]:
    """The configuration an enrich-server pod runs, with its container: the image's ENV, then
    the container's env, over the ConfigMap's file, loaded by the project's own loader."""
    deployment = k8s["Deployment", "enrich-server"]
    container = _only_container(deployment)
    args = build_parser().parse_args(["serve", *container["args"]])  # ENTRYPOINT: serve
    path = folder / args.config.name
    path.write_text(_mounted_file(k8s, deployment, args.config))
    environ = _image_env() | {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return load_config(path, environ), container


def _image_env() -> dict[str, str]:
    """The ENV of the runtime image (deploy/docker/Dockerfile): what a container starts with."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            for item in line.split()[1:]:
                key, _, value = item.partition("=")
                env[key] = value
    return env


def _conf_value(text: str, key: str) -> str:
    """The value of the one ``key: value`` line of a nats-server configuration."""
    values: list[str] = re.findall(rf"^\s*{key}:\s*(\S+)", text, re.MULTILINE)
    (value,) = values
    return value


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
