"""deploy/compose.yaml against the project: it cannot run here (no Docker engine), so everything it
names is checked to exist: commands parse, settings are Settings fields, mounted files are in the repo,
Prometheus scrapes the services that serve metrics, Grafana is provisioned with files that exist."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

import pytest
import yaml

from pipeline.commands.cliargs import build_parser
from pipeline.commands.supervisor import SINK_ONLY, process_roles
from pipeline.settings import KAFKA_VERSION, Settings
from pipeline.stream import web
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


SERVICES: dict[str, dict[str, Any]] = _compose()["services"]


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host source (a path under deploy/ or a named volume)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def _host_file(service: dict[str, Any], container_path: str) -> Path:
    """The repository file compose mounts at ``container_path`` (directly or inside a mounted dir)."""
    for target, source in sorted(_mounts(service).items(), key=lambda m: -len(m[0])):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            assert source.startswith("."), f"{container_path} is in the named volume {source}"
            return (DEPLOY / source / Path(container_path).relative_to(target)).resolve()
    raise AssertionError(f"nothing is mounted at {container_path}")


def _callmeter_services() -> dict[str, list[str]]:
    return {
        name: [str(a) for a in svc["command"][1:]]
        for name, svc in SERVICES.items()
        if isinstance(svc.get("command"), list) and svc["command"][0] == "callmeter"
    }


def test_every_callmeter_command_parses() -> None:
    commands = _callmeter_services()
    assert commands == {"worker-1": ["worker"], "worker-2": ["worker"], "sink": ["sink"]}
    parser = build_parser()
    for name, argv in commands.items():
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            pytest.fail(f"{name}: `callmeter {' '.join(argv)}` does not parse ({exc.code})")
        assert args.command == argv[0]


def test_every_callmeter_variable_is_a_setting_with_a_valid_value() -> None:
    checked = 0
    for name, service in SERVICES.items():
        env = {k: v for k, v in _env(service).items() if k.startswith("CALLMETER_")}
        fields = {k.removeprefix("CALLMETER_").lower(): v for k, v in env.items()}
        unknown = sorted(k for k in fields if k not in Settings.model_fields)
        assert unknown == [], f"{name}: not settings: {unknown}"
        Settings(**fields)  # values of the right type (a bad one raises)
        checked += len(fields)
    # 8 shared by the three callmeter services, each one's CALLMETER_WORKER_WEB_HOST, and the two
    # workers' CALLMETER_WORKER_PROCESSES and CALLMETER_API_PORT.
    assert checked == 3 * 9 + 2 * 2
    image_env = re.findall(r"^ENV (CALLMETER_\w+)=", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    assert image_env == ["CALLMETER_DATA_DIR"]
    assert image_env[0].removeprefix("CALLMETER_").lower() in Settings.model_fields


def test_the_stream_workers_run_without_a_sink_and_the_sink_runs_once() -> None:
    env = {name: _env(SERVICES[name]) for name in _callmeter_services()}
    for name in ("worker-1", "worker-2"):
        assert (
            Settings(worker_ledger_sink=env[name]["CALLMETER_WORKER_LEDGER_SINK"]).worker_ledger_sink is False
        )
        assert env[name]["CALLMETER_WORKER_WEB_HOST"] == name
    assert [n for n, argv in _callmeter_services().items() if argv[0] == "sink"] == ["sink"]


def test_every_mounted_host_path_and_the_image_build_exist() -> None:
    named = set(_compose()["volumes"])
    for name, service in SERVICES.items():
        for target, source in _mounts(service).items():
            if source.startswith("."):
                path = (DEPLOY / source).resolve()
                assert path.exists(), f"{name}: {source} -> {target} does not exist"
                assert path.is_relative_to(ROOT)
            else:
                assert source in named, f"{name}: named volume {source} is not declared"
    for name in _callmeter_services():
        build = SERVICES[name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT
        dockerfile = context / build["dockerfile"]
        copies = re.findall(r"^COPY (.+) \S+$", dockerfile.read_text(), re.MULTILINE)
        for sources in copies:
            for source in sources.split():
                assert (context / source).exists(), f"Dockerfile copies {source}, which does not exist"


def test_kafka_is_three_kraft_brokers_the_workers_bootstrap_from() -> None:
    brokers = sorted(name for name in SERVICES if name.startswith("kafka-"))
    assert brokers == ["kafka-1", "kafka-2", "kafka-3"]
    for index, name in enumerate(brokers, start=1):
        env = _env(SERVICES[name])
        assert SERVICES[name]["image"] == f"apache/kafka:{KAFKA_VERSION}"
        assert env["KAFKA_NODE_ID"] == str(index)
        assert env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{name}:9092"
        assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert SERVICES[name]["healthcheck"]["test"][1] == "/opt/kafka/bin/kafka-broker-api-versions.sh"
    for name in _callmeter_services():
        assert _env(SERVICES[name])["CALLMETER_KAFKA"] == "kafka-1:9092,kafka-2:9092,kafka-3:9092"
        # Topics get replication min(3, brokers seen): start only once all three are up.
        assert SERVICES[name]["depends_on"] == {
            **{broker: {"condition": "service_healthy"} for broker in brokers},
            "clickhouse": {"condition": "service_healthy"},
        }


def test_the_ledger_url_names_the_clickhouse_service_and_its_credentials() -> None:
    clickhouse = _env(SERVICES["clickhouse"])
    for name in _callmeter_services():
        env = _env(SERVICES[name])
        url = urlsplit(env["CALLMETER_CLICKHOUSE_URL"])
        assert (url.scheme, url.username, url.hostname, url.port, url.path) == (
            "http",
            clickhouse["CLICKHOUSE_USER"],
            "clickhouse",
            8123,
            f"/{clickhouse['CLICKHOUSE_DB']}",
        )
        assert env["CALLMETER_CLICKHOUSE_PASSWORD"] == clickhouse["CLICKHOUSE_PASSWORD"]


def _settings(service: dict[str, Any]) -> Settings:
    env = _env(service)
    return Settings(
        **{k.removeprefix("CALLMETER_").lower(): v for k, v in env.items() if k.startswith("CALLMETER_")}
    )


def _process_ports(name: str) -> list[int]:
    """The ports the service's processes serve /metrics on, as the supervisor lays them out: process i
    of `callmeter worker` on CALLMETER_WORKER_WEB_PORT + i, `callmeter sink` on the port itself."""
    settings = _settings(SERVICES[name])
    roles = SINK_ONLY if _callmeter_services()[name][0] == "sink" else process_roles(settings)
    return [settings.worker_web_port + index for _role, index in roles]


def _worker_services() -> list[str]:
    return [name for name, argv in _callmeter_services().items() if argv[0] == "worker"]


def _scrape_jobs() -> dict[str, list[str]]:
    prometheus = SERVICES["prometheus"]
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    config = yaml.safe_load(_host_file(prometheus, config_path).read_text())
    return {
        job["job_name"]: sorted(t for static in job["static_configs"] for t in static["targets"])
        for job in config["scrape_configs"]
    }


def test_every_worker_service_sets_its_process_count() -> None:
    """Unset, CALLMETER_WORKER_PROCESSES is the cores of whatever host runs the container: the number of
    processes, and so the ports Prometheus must scrape, would depend on the machine."""
    total = 0
    for name in _worker_services():
        env = _env(SERVICES[name])
        assert "CALLMETER_WORKER_PROCESSES" in env, f"{name}: CALLMETER_WORKER_PROCESSES is not set"
        settings = _settings(SERVICES[name])
        assert 1 <= settings.worker_processes <= settings.partitions
        # Every process it asks for runs (the supervisor runs at most one per input partition).
        assert len(_process_ports(name)) == settings.worker_processes
        total += settings.worker_processes
    # No stream process of the group sits idle without a partition.
    assert total == 4
    assert total <= _settings(SERVICES["sink"]).partitions


def test_prometheus_scrapes_every_process_of_every_callmeter_service_with_the_rules() -> None:
    prometheus = SERVICES["prometheus"]
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    config = yaml.safe_load(_host_file(prometheus, config_path).read_text())
    jobs = _scrape_jobs()
    assert sorted(jobs) == ["callmeter-tenant-api", "callmeter-worker"]
    # The job the recording rules and the dashboard are written for.
    assert "`callmeter-worker`" in (DEPLOY / "prometheus" / "recording_rules.yml").read_text()
    # The path pipeline/stream/web.py serves (the sink's prometheus_client server answers on any path).
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
    assert '@app.page("/metrics")' in inspect.getsource(web.install)
    expected = []
    for name in _callmeter_services():
        expected += [f"{name}:{port}" for port in _process_ports(name)]
        # Listening beyond the container's loopback, or Prometheus could not reach it.
        assert _env(SERVICES[name])["CALLMETER_WORKER_WEB_BIND"] == "0.0.0.0"
    assert jobs["callmeter-worker"] == sorted(expected)
    assert len(expected) == 2 * 2 + 1
    rule_files = sorted(_host_file(prometheus, path) for path in config["rule_files"])
    assert rule_files == sorted(p.resolve() for p in (DEPLOY / "prometheus").glob("*_rules.yml"))


def test_the_tenant_api_runs_beside_every_worker_service_and_is_scraped() -> None:
    """README tells gateways to ask the tenant API (CALLMETER_API_PORT, pipeline/tenantapi/): each
    worker service's supervising process serves it, for every tenant, on a port of its own."""
    api_targets = []
    for name in _worker_services():
        settings = _settings(SERVICES[name])
        assert settings.api_port is not None, f"{name}: CALLMETER_API_PORT is not set"
        assert settings.api_port not in _process_ports(name), f"{name}: the API port is a process's port"
        # `callmeter worker` with CALLMETER_WORKER_LEDGER_SINK=false runs no sink process (port + N).
        assert settings.worker_ledger_sink is False
        api_targets.append(f"{name}:{settings.api_port}")
        # Gateways on the host reach it on loopback, each worker's API on a port of its own.
        published = [p.rsplit(":", 1)[1] for p in SERVICES[name]["ports"] if p.startswith("127.0.0.1:")]
        assert str(settings.api_port) in published, f"{name}: the tenant API port is not published"
    assert _scrape_jobs()["callmeter-tenant-api"] == sorted(api_targets)
    host_ports = [p.split(":")[1] for svc in SERVICES.values() for p in svc.get("ports", [])]
    assert len(host_ports) == len(set(host_ports)), f"a host port is published twice: {host_ports}"
    # `callmeter sink` starts no tenant API: the variable would only mislead there.
    assert _settings(SERVICES["sink"]).api_port is None


def test_prometheus_config_is_valid_for_promtool(tmp_path: Path) -> None:
    # promtool is installed for the rule tests (deploy/install-promtool.sh); missing, it fails, not skips.
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool not found on PATH: run deploy/install-promtool.sh"
    prometheus = SERVICES["prometheus"]
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    config = yaml.safe_load(_host_file(prometheus, config_path).read_text())
    # The rule files at their host paths, as compose mounts them.
    config["rule_files"] = [str(_host_file(prometheus, path)) for path in config["rule_files"]]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [promtool, "check", "config", str(checked)], capture_output=True, text=True, check=False, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 2 rule files found" in proc.stdout


def _provisioning(kind: str) -> list[dict[str, Any]]:
    grafana = SERVICES["grafana"]
    directory = _host_file(grafana, f"/etc/grafana/provisioning/{kind}")
    files = sorted(directory.glob("*.yaml"))
    assert files, f"no {kind} provisioning files in {directory}"
    return [yaml.safe_load(f.read_text()) for f in files]


def test_grafana_datasources_point_at_the_services() -> None:
    datasources = {ds["type"]: ds for doc in _provisioning("datasources") for ds in doc["datasources"]}
    assert sorted(datasources) == ["grafana-clickhouse-datasource", "prometheus"]
    prom = urlsplit(datasources["prometheus"]["url"])
    assert prom.hostname == "prometheus"
    assert prom.hostname in SERVICES
    assert f"127.0.0.1:{prom.port}:{prom.port}" in SERVICES["prometheus"]["ports"]
    clickhouse = datasources["grafana-clickhouse-datasource"]["jsonData"]
    assert clickhouse["host"] in SERVICES
    assert clickhouse["defaultDatabase"] == _env(SERVICES["clickhouse"])["CLICKHOUSE_DB"]
    # Grafana reads as the read-only user compose gives the ClickHouse server, not as the ledger's writer.
    users = ElementTree.parse(
        _host_file(SERVICES["clickhouse"], "/etc/clickhouse-server/users.d/grafana.xml")
    )
    user = users.find(f"users/{clickhouse['username']}")
    assert user is not None
    assert (
        user.findtext("password")
        == datasources["grafana-clickhouse-datasource"]["secureJsonData"]["password"]
    )
    assert users.findtext(f"profiles/{user.findtext('profile')}/readonly") == "2"
    assert user.findtext("grants/query") == f"GRANT SELECT ON {clickhouse['defaultDatabase']}.*"
    assert clickhouse["username"] != _env(SERVICES["clickhouse"])["CLICKHOUSE_USER"]
    plugins = _env(SERVICES["grafana"])["GF_INSTALL_PLUGINS"].split(",")
    assert "grafana-clickhouse-datasource" in plugins


def test_grafana_dashboards_provider_loads_both_dashboards_from_the_repo() -> None:
    grafana = SERVICES["grafana"]
    (provider,) = [p for doc in _provisioning("dashboards") for p in doc["providers"]]
    path = provider["options"]["path"].rstrip("/")
    mounted = {
        target: _host_file(grafana, target) for target in _mounts(grafana) if target.startswith(path + "/")
    }
    assert sorted(p.name for p in mounted.values()) == ["callmeter.json", "finance.json"]
    assert sorted(mounted.values()) == sorted(p.resolve() for p in (DEPLOY / "grafana").glob("*.json"))
    provisioned_types = {ds["type"] for doc in _provisioning("datasources") for ds in doc["datasources"]}
    for host_path in mounted.values():
        dashboard = json.loads(host_path.read_text())
        assert dashboard["uid"]
        # A dashboard that picks its datasource by type finds one of that type provisioned.
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable.get("type") == "datasource":
                assert variable["query"] in provisioned_types, (host_path.name, variable["name"])


def test_alert_runbook_links_are_urls_the_deployment_serves(tmp_path: Path) -> None:
    """Each alert's runbook_url is <runbook_base_url>/<alert>.md (deploy/prometheus/alert_rules.yml):
    Prometheus expands the external label from RUNBOOK_BASE_URL, which defaults to the `runbooks`
    service: docs/runbooks/ served as plain text on the host's loopback."""
    prometheus = SERVICES["prometheus"]
    assert "--enable-feature=expand-external-labels" in prometheus["command"]
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    config = yaml.safe_load(_host_file(prometheus, config_path).read_text())
    assert config["global"]["external_labels"]["runbook_base_url"] == "${RUNBOOK_BASE_URL}"
    setting = _env(prometheus)["RUNBOOK_BASE_URL"]
    match = re.fullmatch(r"\$\{RUNBOOK_BASE_URL:-(\S+)\}", setting)
    assert match, f"RUNBOOK_BASE_URL is {setting!r}: an operator's value with a default, please"
    default = urlsplit(match.group(1))
    assert (default.scheme, default.hostname, default.path) == ("http", "127.0.0.1", "")
    runbooks = SERVICES["runbooks"]
    assert f"127.0.0.1:{default.port}:{default.port}" in runbooks["ports"]
    served = _host_file(runbooks, "/srv/runbooks")
    assert served == (ROOT / "docs" / "runbooks").resolve()
    # The service's own command, run here on a free port and the repository's directory.
    command = [str(a) for a in runbooks["command"]]
    assert command[:2] == ["python", "-c"]
    port = free_port(1)
    code = command[2].replace(str(default.port), str(port)).replace("/srv/runbooks", str(served))
    assert code != command[2]
    server = subprocess.Popen([sys.executable, "-c", code])
    try:
        body, content_type = "", ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/CallmeterWorkerDown.md", timeout=2
                ) as r:
                    body, content_type = r.read().decode(), r.headers["Content-Type"]
                break
            except OSError:
                time.sleep(0.2)
        assert body.startswith("# CallmeterWorkerDown\n")
        # Shown by a browser, not downloaded.
        assert content_type.startswith("text/plain")
    finally:
        server.terminate()
        server.wait(10)
