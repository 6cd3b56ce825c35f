"""The worker's /metrics count exactly what was injected, lag returns to 0 when idle, and
`callmeter status` reports it (exit 1 while dead letters are recent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from confluent_kafka import Producer

from pipeline.commands.simulate import SimulationConfig, generate
from pipeline.settings import Settings
from tests.integration.cli import BackgroundWorker, callmeter, metric_values

pytestmark = pytest.mark.integration


def test_metrics_count_injected_duplicates_and_bad_records(cm_env: dict[str, str], tmp_path: Path) -> None:
    events = list(
        generate(
            SimulationConfig(
                tenants=3, calls=400, duplicate_rate=0.0, late_rate=0.0, invalid_rate=0.0, seed=5
            )
        )
    )
    calls = [e for e in events if e["type"] == "call"]
    provisioning = [e for e in events if e["type"] == "provisioning"]
    duplicates = calls[10:35] + provisioning[:2]  # 25 call retries, 2 provisioning retries
    bad = [
        dict(
            calls[0],
            event_id=f"bad-{i}",
            answered_at=calls[0]["started_at"],
            ended_at="2000-01-01T00:00:00.000Z",
        )
        for i in range(3)
    ]  # ends before it started
    path = tmp_path / "events.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in events + duplicates + bad))
    callmeter(cm_env, "produce", str(path))
    settings = Settings(topic_prefix=cm_env["CALLMETER_TOPIC_PREFIX"], partitions=3)
    producer = Producer({"bootstrap.servers": cm_env["CALLMETER_KAFKA"]})
    for _ in range(2):
        producer.produce(settings.topics.calls, key=b"tenant-0001", value=b"\x00\x00garbage")
    producer.flush(10)
    total = len(events) + len(duplicates) + len(bad) + 2

    with BackgroundWorker(cm_env) as worker:
        worker.wait_for(lambda s: sum(s["stats"]["consumed"].values()) == total, "all events consumed")
        worker.wait_for(
            lambda s: s["lag"] and all(r["messages"] == 0 for r in s["lag"]), "lag back to 0", timeout=60
        )
        _code, text = worker.get("/metrics")
        # The two garbage records are the same bytes: one bad event, one dead letter and one duplicate
        # (each distinct bad event is one dead letter, docs/decisions.md "Deduplication").
        assert metric_values(text, "callmeter_duplicates_total") == {
            f'{{topic="{settings.topics.calls}"}}': 25.0 + 1,
            f'{{topic="{settings.topics.provisioning}"}}': 2.0,
        }
        assert metric_values(text, "callmeter_dead_letters_total") == {
            '{reason="NEGATIVE_DURATION"}': 3.0,
            '{reason="UNKNOWN_SCHEMA"}': 1.0,
        }
        consumed = metric_values(text, "callmeter_events_consumed_total")
        assert sum(consumed.values()) == total
        lag = metric_values(text, "callmeter_consumer_lag_messages")
        assert len(lag) == 6 and set(lag.values()) == {0.0}
        assert metric_values(text, "callmeter_event_time_lag_seconds") == {"": 0.0}
        assert metric_values(text, "callmeter_rated_calls_total") == {"": float(len(calls))}
        assert metric_values(text, "callmeter_parked_calls") == {"": 0.0}
        assert "tenant" not in "".join(line for line in text.splitlines() if line.startswith("callmeter_"))

        status = callmeter(cm_env, "status", check=False)
        assert status.returncode == 1, status.stdout
        assert "4 dead letters in the last 5 minutes" in status.stdout
        assert "total 0" in status.stdout
        assert '"NEGATIVE_DURATION": 3' in status.stdout
        healthy = callmeter(cm_env, "status", "--max-duplicate-ratio", "1", check=False)
        assert healthy.returncode == 1  # dead letters still count against health
        # The ledger's own figures, read through the worker that holds the embedded ledger.
        assert f"ledger: {len(calls)} rated calls" in status.stdout, status.stdout
    down = callmeter(cm_env, "status", check=False)
    assert down.returncode == 1 and "worker: DOWN" in down.stdout
    # With the worker down, status still says what the ledger holds.
    assert f"ledger: {len(calls)} rated calls" in down.stdout, down.stdout
    assert 'ledger dead letters by reason: {"NEGATIVE_DURATION": 3, "UNKNOWN_SCHEMA": 1}' in down.stdout
    assert 'ledger duplicates by kind: {"call": 26, "provisioning": 2}' in down.stdout
