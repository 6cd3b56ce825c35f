"""The project's recording and alert rules, evaluated by a real Prometheus server (Debian's
``prometheus``, installed with promtool by `make test`) scraping a running worker.

Only the rules' ``for:`` durations are shortened (to 5 s) in the copy given to the server; every
expression and threshold is the one in deploy/prometheus/. The duplicate-rate alert must fire after
duplicates are sent, the lag alert once the worker stops processing (an agent stuck mid-event: crash
point ``after-event:N:hang``) while input keeps arriving. As in deploy/: the tenant API is scraped as a
job of its own, and runbook links are URLs built from the server's external label.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import free_port
from tests.integration.cli import BackgroundWorker, callmeter
from tests.integration.eventfiles import call, prov, write_events
from tests.integration.test_tenant_api_e2e import api_get

pytestmark = pytest.mark.integration

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
HANG_AT = 400  # the agent stops at its 400th event
RUNBOOKS = "https://wiki.example.com/callmeter/runbooks"


def _fast_alert_rules(target: Path) -> Path:
    rules = yaml.safe_load((RULES / "alert_rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "5s"
    target.write_text(yaml.safe_dump(rules))
    return target


class Prometheus:
    def __init__(self, tmp: Path, jobs: dict[str, str]) -> None:
        binary = shutil.which("prometheus")
        assert binary, "prometheus is not installed (make promtool installs Debian's prometheus package)"
        self.url = f"http://127.0.0.1:{free_port()}"
        # The external label as deploy/prometheus/prometheus.yml has it, expanded from the environment.
        labels = {"runbook_base_url": "${RUNBOOK_BASE_URL}"}
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "external_labels": labels},
            "rule_files": [str(RULES / "recording_rules.yml"), str(_fast_alert_rules(tmp / "alerts.yml"))],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in jobs.items()
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (tmp / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--enable-feature=expand-external-labels",
            ],
            env={**os.environ, "RUNBOOK_BASE_URL": RUNBOOKS},
            stdout=self.log,
            stderr=self.log,
        )

    def api(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}", timeout=5) as resp:
            return json.loads(resp.read())["data"]

    def firing(self) -> set[str]:
        return set(self.firing_annotations())

    def firing_annotations(self) -> dict[str, dict[str, str]]:
        alerts = self.api("alerts")["alerts"]
        return {a["labels"]["alertname"]: a["annotations"] for a in alerts if a["state"] == "firing"}

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what}; firing: {self._firing_or_none()}")

    def _firing_or_none(self) -> set[str] | None:
        try:
            return self.firing()
        except OSError:
            return None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def _scraped(prometheus: Prometheus) -> bool:
    up = prometheus.api("query?query=up")["result"]
    return len(up) == 2 and all(sample["value"][1] == "1" for sample in up)


def _tenant_api_p99(prometheus: Prometheus) -> list[dict[str, Any]]:
    query = "callmeter:tenant_api_request_duration_seconds:p99_rate5m"
    result: list[dict[str, Any]] = prometheus.api(f"query?query={query}")["result"]
    return result


def test_duplicate_rate_and_lag_alerts_fire_on_a_real_prometheus(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    sub = prov("s", "pm", "2026-11-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="pro", tax_region="NONE")
    callmeter(cm_env, "produce", str(write_events(tmp_path / "a.jsonl", [sub])))
    api_port = str(free_port(1))
    env = dict(
        cm_env,
        CALLMETER_CRASH_AT=f"after-event:{HANG_AT}:hang",
        CALLMETER_STALL_TIMEOUT_SECONDS="900",
        CALLMETER_API_PORT=api_port,
    )
    with BackgroundWorker(env) as worker:
        jobs = {
            "callmeter-worker": worker.url.removeprefix("http://"),
            "callmeter-tenant-api": f"127.0.0.1:{api_port}",
        }
        prometheus = Prometheus(tmp_path, jobs)
        try:
            prometheus.wait(lambda: _scraped(prometheus), "the first scrape of the worker and the tenant API")

            # Pre-call checks on the tenant API, as gateways send them (a steady stream: a rate needs
            # two scrapes that differ): its latency is recorded under its own job, per endpoint.
            def asking() -> bool:
                for _ in range(5):
                    api_get(api_port, "/authorize/pm?at=2026-11-20T00:00:00Z")
                return bool(_tenant_api_p99(prometheus))

            prometheus.wait(asking, "the tenant API's recorded p99")
            (p99,) = _tenant_api_p99(prometheus)
            assert p99["metric"] == {
                "__name__": "callmeter:tenant_api_request_duration_seconds:p99_rate5m",
                "job": "callmeter-tenant-api",
                "instance": f"127.0.0.1:{api_port}",
                "endpoint": "authorize",
            }
            assert 0 < float(p99["value"][1]) <= 0.5
            # (CallmeterNoEventsIngested fires from the start: no call in its 15-minute window.)
            watched = {"CallmeterDuplicateRateHigh", "CallmeterConsumerLagSustained"}
            assert not prometheus.firing() & watched
            # 100 calls, each sent twice: a duplicate rate of 50 %, far above the 0.01 % limit.
            calls = [call(f"d{i}", "pm", f"2026-11-02T10:{i:02d}:00Z", 30) for i in range(60)]
            calls += [call(f"e{i}", "pm", f"2026-11-02T11:{i:02d}:00Z", 30) for i in range(40)]
            callmeter(cm_env, "produce", str(write_events(tmp_path / "b.jsonl", calls + calls)))
            duplicates = "CallmeterDuplicateRateHigh"
            prometheus.wait(lambda: duplicates in prometheus.firing(), "the duplicate alert")
            runbook = prometheus.firing_annotations()[duplicates]["runbook_url"]
            assert runbook == f"{RUNBOOKS}/{duplicates}.md"
            assert "CallmeterConsumerLagSustained" not in prometheus.firing()
            # The agent stops at its 400th event; 10,500 more calls arrive: lag passes 10,000.
            more = [call(f"l{i}", "pm", "2026-11-03T10:00:00Z", 30) for i in range(10_500)]
            callmeter(cm_env, "produce", str(write_events(tmp_path / "c.jsonl", more)))
            prometheus.wait(lambda: "CallmeterConsumerLagSustained" in prometheus.firing(), "the lag alert")
            lag = prometheus.api("query?query=sum(callmeter:consumer_lag_messages:sum)")["result"]
            assert float(lag[0]["value"][1]) >= 10_500 - (HANG_AT - 201)
        finally:
            prometheus.stop()
