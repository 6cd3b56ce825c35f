"""`callmeter sink` beside a worker run without its in-process sink (CALLMETER_WORKER_LEDGER_SINK=false):
the deployment of N worker services and one sink service, on the real broker and embedded ClickHouse."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.integration.cli import EXAMPLES, callmeter, ledger_report, worker_stats

pytestmark = pytest.mark.integration


def _metric(url: str, line_start: str) -> float | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start)]
    return values[0] if values else None


def test_the_sink_service_writes_the_ledger_for_a_worker_without_a_sink(cm_env: dict[str, str]) -> None:
    worker_env = {**cm_env, "CALLMETER_WORKER_LEDGER_SINK": "false"}
    callmeter(cm_env, "produce", str(EXAMPLES / "events.jsonl"))
    stats = worker_stats(worker_env)
    assert stats["rated"] == 8
    assert stats["duplicates"] == {"call": 1}
    # The worker rated and committed everything, and wrote nothing to the ledger.
    assert ledger_report(cm_env)["rated_calls"] == 0

    # The sink as a service runs it: in the foreground until stopped, its metrics on the web port.
    sink = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "sink"],
        env=cm_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{cm_env['CALLMETER_WORKER_WEB_PORT']}/metrics"
    try:
        deadline = time.monotonic() + 60
        while _metric(url, 'callmeter_ledger_rows_written_total{table="raw_events"}') != 15.0:
            assert sink.poll() is None, sink.stderr.read().decode() if sink.stderr else ""
            assert time.monotonic() < deadline, "the sink did not write the 15 raw events within 60 s"
            time.sleep(0.5)
        assert _metric(url, 'callmeter_ledger_rows_written_total{table="rated_calls"}') == 8.0
        assert _metric(url, 'callmeter_ledger_rows_written_total{table="provisioning_events"}') == 7.0
    finally:
        sink.send_signal(signal.SIGTERM)
        out, err = sink.communicate(timeout=60)
    assert sink.returncode == 0, err.decode()[-3000:]
    # 8 rated calls + 7 provisioning events, each also as a raw event, and the retried call's
    # duplicate record.
    assert json.loads(out.decode().strip().splitlines()[-1]) == {
        "duplicates_in_ledger": {},
        "ledger_rows_written": 31,
    }
    report = ledger_report(cm_env)
    assert report["rated_calls"] == 8
    assert report["provisioning_events"] == 7
    assert report["raw_events"] == 15
    assert report["duplicates"] == 1
    assert report["billable_seconds_by_tenant"] == {"acme": 18000 + 1001 + 0 + 600, "bolt": 7326, "dime": 180}


def test_sink_rejects_an_unknown_flag(cm_env: dict[str, str]) -> None:
    out = callmeter(cm_env, "sink", "--follow", check=False)
    assert out.returncode == 2
    assert out.stderr == "callmeter: error: unrecognized arguments: --follow (see callmeter --help)\n"
