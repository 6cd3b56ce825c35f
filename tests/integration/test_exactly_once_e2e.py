"""Exactly once under failure, and the pipeline against the pure reference computation.

The reference is ``rating.batch.invoices_for_month`` on the deduplicated events: whatever the worker,
the sink and ClickHouse do in between (batches, retries, a SIGKILL, redelivery), the invoices must be
exactly what the rules say.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from pipeline.commands.cli import load_catalog
from pipeline.commands.simulate import SimulationConfig, write_file
from pipeline.settings import SAMPLE_CATALOG, Settings
from rating.batch import invoices_for_month
from tests.integration.cli import (
    callmeter,
    comparable,
    ledger_report,
    read_invoices,
    reference_events,
    worker_stats,
)

pytestmark = pytest.mark.integration


def reference_invoices(path: Path, year: int, month: int) -> dict[str, dict[str, Any]]:
    calls, provisioning = reference_events(path)
    invoices = invoices_for_month(calls, provisioning, load_catalog(SAMPLE_CATALOG), year, month)
    return {inv.invoice_id: comparable(inv.to_json_dict("x")) for inv in invoices}


def pipeline_invoices(env: dict[str, str], out: Path, period: str) -> dict[str, dict[str, Any]]:
    callmeter(env, "invoice", "--period", period, "--out", str(out))
    return {k: comparable(v) for k, v in read_invoices(out).items()}


def _rated_high_watermark(env: dict[str, str]) -> int:
    settings = Settings(topic_prefix=env["CALLMETER_TOPIC_PREFIX"], partitions=3)
    admin = AdminClient({"bootstrap.servers": env["CALLMETER_KAFKA"]})
    tps = [TopicPartition(settings.topics.rated, p) for p in range(3)]
    result = admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, request_timeout=10)
    return sum(f.result().offset for f in result.values())


def test_sigkill_mid_stream_then_restart_counts_every_call_once(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    events = tmp_path / "events.jsonl"
    write_file(SimulationConfig(tenants=4, calls=6000, duplicate_rate=0.05, late_rate=0.02, seed=11), events)
    callmeter(cm_env, "produce", str(events))
    worker = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "worker"],
        env=cm_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        # Kill it once output is flowing but (with 6000 calls) well before the end.
        while _rated_high_watermark(cm_env) < 500:
            assert worker.poll() is None, worker.stderr.read().decode()[-3000:] if worker.stderr else ""
            assert time.monotonic() < deadline, "worker made no progress"
            time.sleep(0.2)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(30)
    worker_stats(cm_env)  # restart, rebuild state from changelogs, finish
    expected = reference_invoices(events, 2026, 10)
    assert pipeline_invoices(cm_env, tmp_path / "out", "2026-10") == expected
    report = ledger_report(cm_env)
    unique_calls = {
        json.loads(line)["event_id"]
        for line in events.read_text().splitlines()
        if json.loads(line)["type"] == "call"
    }
    assert report["rated_calls"] + sum(report["dead_letters_by_reason"].values()) == len(unique_calls)


@hsettings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(min_value=0, max_value=10_000),
    tenants=st.integers(min_value=1, max_value=6),
    duplicate_rate=st.sampled_from([0.0, 0.1, 0.3]),
    late_rate=st.sampled_from([0.0, 0.05]),
)
def test_pipeline_invoices_equal_the_reference_computation(
    cm_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    seed: int,
    tenants: int,
    duplicate_rate: float,
    late_rate: float,
) -> None:
    tmp = tmp_path_factory.mktemp("prop")
    env = dict(
        cm_env,
        CALLMETER_TOPIC_PREFIX=f"{cm_env['CALLMETER_TOPIC_PREFIX']}{seed}.",
        CALLMETER_DATA_DIR=str(tmp / "data"),
    )
    events = tmp / "events.jsonl"
    cfg = SimulationConfig(
        tenants=tenants,
        calls=300,
        duplicate_rate=duplicate_rate,
        late_rate=late_rate,
        invalid_rate=0.01,
        seed=seed,
    )
    write_file(cfg, events)
    callmeter(env, "produce", str(events))
    worker_stats(env)
    assert pipeline_invoices(env, tmp / "out", "2026-10") == reference_invoices(events, 2026, 10)
