"""On-call observability config: Prometheus rules, their promtool unit tests, the Grafana dashboard, runbooks.

Everything here is offline. promtool must be installed (``deploy/install-promtool.sh``; the Makefile runs
it before the tests): a missing promtool fails rather than skips, so unchecked rules never pass CI.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics_core import Metric

from pipeline import metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RECORDING_RULES = PROMETHEUS / "recording_rules.yml"
ALERT_RULES = PROMETHEUS / "alert_rules.yml"
RULE_FILES = (RECORDING_RULES, ALERT_RULES)
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "callmeter.json"
RUNBOOKS = ROOT / "docs" / "runbooks"

METRIC_NAME = re.compile(r"callmeter_[a-z_]+")
RECORDED_NAME = re.compile(r"callmeter:[a-z0-9_:]+")
# Suffixes prometheus_client adds to a family's name in the exposition, by family type.
SUFFIXES: dict[str, tuple[str, ...]] = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}
ALERTS = {
    "CallmeterConsumerLagSustained",
    "CallmeterDuplicateRateHigh",
    "CallmeterDeadLetters",
    "CallmeterLedgerInsertFailures",
    "CallmeterNoEventsIngested",
    "CallmeterEventTimeLagBeyondSettlement",
    "CallmeterWorkerDown",
    "CallmeterTenantApiSlow",
}
# An alert's runbook_url: the external label Prometheus is configured with (deploy/prometheus/prometheus.yml,
# RUNBOOK_BASE_URL) and the runbook's file name in docs/runbooks/.
RUNBOOK_URL = "{{ $externalLabels.runbook_base_url }}/%s.md"


# -- helpers ---------------------------------------------------------------------------------------------
def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found on PATH: run deploy/install-promtool.sh (as root; Debian's prometheus "
            "package provides it) or install Prometheus 2.x promtool by hand"
        )
    return path


def _run(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _rules(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in _rules(ALERT_RULES) if "alert" in rule]


def _recorded_names() -> set[str]:
    return {rule["record"] for rule in _rules(RECORDING_RULES) if "record" in rule}


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """All panels, rows' collapsed children included."""
    out: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _dashboard_exprs() -> list[str]:
    return [
        target["expr"]
        for panel in _panels(_dashboard())
        if panel.get("type") != "row"
        for target in panel.get("targets", [])
    ]


def _exported_names() -> set[str]:
    """Every series name pipeline.metrics can expose, whether or not it has samples yet.

    A family's ``name`` lacks the counter ``_total`` suffix, and a labelled metric that was never used has
    no samples, so names are built from family name + the suffixes of its type.
    """
    names: set[str] = set()
    family: Metric
    for family in metrics.REGISTRY.collect():
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


# -- (a) promtool ----------------------------------------------------------------------------------------
def test_rule_files_and_rule_tests_exist() -> None:
    for path in RULE_FILES:
        assert path.is_file(), path
    assert RULE_TESTS, f"no promtool rule tests in {PROMETHEUS / 'tests'}"


def test_promtool_check_rules() -> None:
    result = _run([_promtool(), "check", "rules", *map(str, RULE_FILES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules() -> None:
    # The test files name their rule files relative to themselves; promtool resolves them that way.
    result = _run([_promtool(), "test", "rules", *map(str, RULE_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    fired: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text()).get("tests", []):
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    names = {rule["alert"] for rule in _alert_rules()}
    assert names == ALERTS
    assert names - fired == set(), "alerts without a firing test case"
    assert names - silent == set(), "alerts without a non-firing test case"


def test_dashboard_exprs_parse_as_promql(tmp_path: Path) -> None:
    """promtool check rules on a throwaway rule file holding every dashboard query."""
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, expr in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard_exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([_promtool(), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_tests_render_runbook_urls_as_absolute_urls() -> None:
    """promtool renders each annotation with the test group's external labels: every group gives a
    base URL, and every expected runbook_url is that base + the alert's page."""
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text()).get("tests", []):
            if not case.get("alert_rule_test"):
                continue
            base = case.get("external_labels", {}).get("runbook_base_url", "")
            assert re.fullmatch(r"https?://[^\s/]+(/\S*)?", base), f"{path.name}: runbook_base_url {base!r}"
            for check in case["alert_rule_test"]:
                for alert in check.get("exp_alerts", []):
                    url = alert["exp_annotations"]["runbook_url"]
                    assert url == f"{base}/{check['alertname']}.md", url


# -- (b) dashboard structure ----------------------------------------------------------------------------
def test_dashboard_top_level() -> None:
    dash = _dashboard()
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time", "version"):
        assert key in dash, key
    assert dash["uid"] == "callmeter"
    assert dash["schemaVersion"] == 39
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"


def test_dashboard_panels() -> None:
    panels = [p for p in _panels(_dashboard()) if p.get("type") != "row"]
    assert panels
    ids = [p["id"] for p in _panels(_dashboard())]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {ids}"
    for panel in panels:
        title = panel.get("title")
        assert title, panel
        grid = panel.get("gridPos")
        assert isinstance(grid, dict), title
        assert {"h", "w", "x", "y"} <= grid.keys(), title
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, title
        assert panel.get("datasource") == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, title
        targets = panel.get("targets")
        assert targets, title
        ref_ids = [t.get("refId") for t in targets]
        assert all(ref_ids) and len(ref_ids) == len(set(ref_ids)), title
        for target in targets:
            assert isinstance(target.get("expr"), str), title
            assert target["expr"].strip(), title


def test_dashboard_covers_the_on_call_views() -> None:
    exprs = "\n".join(_dashboard_exprs())
    for needle in (
        "callmeter_consumer_lag_messages",
        "callmeter_event_time_lag_seconds",
        "callmeter:duplicate_ratio:rate5m",
        "callmeter:dead_letters:rate5m",
        "callmeter_events_consumed_total",
        "callmeter_rated_calls_total",
        "callmeter:ledger_insert_duration_seconds:p50_rate5m",
        "callmeter:ledger_insert_duration_seconds:p99_rate5m",
        "callmeter_ledger_rows_written_total",
        "callmeter_ledger_insert_errors_total",
        "callmeter:balance_request_duration_seconds:p50_rate5m",
        "callmeter:balance_request_duration_seconds:p99_rate5m",
        "callmeter_parked_calls",
        "callmeter_alerts_emitted_total",
        "callmeter:tenant_api_request_duration_seconds:p50_rate5m",
        "callmeter:tenant_api_request_duration_seconds:p99_rate5m",
        "callmeter_tenant_api_requests_total",
    ):
        assert needle in exprs, needle


def test_tenant_api_latency_is_recorded_from_the_histogram_it_exports() -> None:
    """The recording rules read the histogram the tenant API observes (pipeline/metrics.py), per job,
    instance and endpoint, and the alert reads the tenant API's scrape job."""
    histogram = metrics.TENANT_API_SECONDS.describe()[0]
    assert (histogram.name, histogram.type) == ("callmeter_tenant_api_request_duration_seconds", "histogram")
    recorded = {rule["record"]: rule["expr"] for rule in _rules(RECORDING_RULES) if "record" in rule}
    for quantile in ("p50", "p99"):
        expr = recorded[f"callmeter:tenant_api_request_duration_seconds:{quantile}_rate5m"]
        assert "callmeter_tenant_api_request_duration_seconds_bucket" in expr
        assert "by (job, instance, endpoint, le)" in expr
    (alert,) = [rule for rule in _alert_rules() if rule["alert"] == "CallmeterTenantApiSlow"]
    assert 'job="callmeter-tenant-api"' in alert["expr"]


# -- (c) every referenced metric exists -----------------------------------------------------------------
def test_exported_names_include_suffixes() -> None:
    names = _exported_names()
    assert "callmeter_events_consumed_total" in names  # labelled, maybe never incremented
    assert "callmeter_ledger_insert_duration_seconds_bucket" in names
    assert "callmeter_parked_calls" in names


@pytest.mark.parametrize("source", ["dashboard", "recording_rules", "alert_rules"])
def test_referenced_metrics_exist(source: str) -> None:
    if source == "dashboard":
        exprs = _dashboard_exprs()
    else:
        exprs = [rule["expr"] for rule in _rules(PROMETHEUS / f"{source}.yml")]
    assert exprs
    exported, recorded = _exported_names(), _recorded_names()
    unknown = {
        (name, expr)
        for expr in exprs
        for name in METRIC_NAME.findall(expr) + RECORDED_NAME.findall(expr)
        if name not in exported and name not in recorded
    }
    assert not unknown, f"metric names not exported by pipeline.metrics nor recorded: {sorted(unknown)}"


# -- (d) runbooks ---------------------------------------------------------------------------------------
def test_alerts_have_severity_annotations_and_runbooks() -> None:
    index = (RUNBOOKS / "README.md").read_text()
    for rule in _alert_rules():
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in {"critical", "warning"}, name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            assert annotations.get(key), f"{name}: no {key}"
        url = annotations["runbook_url"]
        assert url == RUNBOOK_URL % name, f"{name}: runbook_url {url}"
        page = RUNBOOKS / f"{name}.md"
        assert page.is_file(), f"{name}: {page} does not exist"
        assert page.read_text().startswith(f"# {name}\n"), f"{name}: {page} is not its runbook"
        assert f"({name}.md)" in index, f"{name}: not linked from docs/runbooks/README.md"
