"""Every number callmeter shows is the ledger's number (docs/decisions.md, "Live balances equal the ledger").

Through the real broker, the embedded ledger and the `callmeter` command line: a dedupe retention of three
days, the whole input resent after the window moved on, a worker killed with SIGKILL in the middle of a
resend, then its local state lost and everything resent once more. Afterwards, for every period of the
tenant, the worker's `/balances` and the tenant API's equal rating/'s batch computation on the
deduplicated events (which is what the invoice job computes from the ledger); the ledger holds each call
once and each distinct bad event as one dead letter; alerts never contradict each other.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer

from pipeline.settings import Settings
from rating.batch import timelines_from, usage_from
from schemas.serde import Serde
from tests.conftest import free_port
from tests.integration.cli import (
    BackgroundWorker,
    callmeter,
    ledger_query,
    ledger_report,
    reference_events,
    worker_stats,
)
from tests.integration.eventfiles import call, prov, write_events
from tests.integration.test_tenant_api_e2e import api_get, eventually

pytestmark = pytest.mark.integration

TENANT = "lv"
# One mid-period instant per period of the tenant (anchor day 1): September and October close once the
# window passes three days after their ends; November stays live.
PERIODS = {
    "2026-09-01": "2026-09-15T00:00:00Z",
    "2026-10-01": "2026-10-15T00:00:00Z",
    "2026-11-01": "2026-11-20T00:00:00Z",
}


def _events() -> list[dict[str, Any]]:
    rng = random.Random(23)
    events = [
        prov(
            "sub",
            TENANT,
            "2026-09-01T00:00:00Z",
            "SUBSCRIPTION_STARTED",
            plan_id="starter",
            tax_region="NONE",
        )
    ]
    for month, days in ((9, 30), (10, 31), (11, 28)):
        for day in range(1, days + 1, 3):
            seconds = rng.randint(1000, 3000)  # about 20,000 s a month: past 100 % of starter's 18,000
            events.append(call(f"c-{month}-{day}", TENANT, f"2026-{month:02d}-{day:02d}T10:00:00Z", seconds))
    # Two invalid calls (ended before answered): one dead letter each, however often resent.
    for name, day in (("bad-1", "2026-10-07"), ("bad-2", "2026-11-07")):
        bad = call(name, TENANT, f"{day}T10:00:00Z", 60)
        bad["ended_at"] = bad["started_at"]
        events.append(bad)
    rng.shuffle(events[1:])
    return events


def _poison(env: dict[str, str]) -> None:
    """Bytes that do not decode: one dead letter, however often resent."""
    settings = Settings(topic_prefix=env["CALLMETER_TOPIC_PREFIX"])
    producer = Producer({"bootstrap.servers": env["CALLMETER_KAFKA"]})
    producer.produce(settings.topics.calls, key=TENANT.encode(), value=b"\x00\x01 not a call record")
    producer.flush(10)


def _alerts(env: dict[str, str]) -> list[dict[str, Any]]:
    settings = Settings(topic_prefix=env["CALLMETER_TOPIC_PREFIX"])
    consumer = Consumer(
        {
            "bootstrap.servers": env["CALLMETER_KAFKA"],
            "group.id": f"{settings.app_id}-test-alerts",
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
        }
    )
    consumer.subscribe([settings.topics.alerts])
    serde, found, eof = Serde(), [], 0
    partitions = int(env["CALLMETER_PARTITIONS"])
    while eof < partitions:
        msg = consumer.poll(10)
        assert msg is not None, "alerts topic not read to its end"
        if msg.error():
            eof += 1
            continue
        found.append(serde.decode(msg.value())[1])
    consumer.close()
    return found


def test_live_balances_equal_the_ledger_after_resends_past_the_window_kills_and_state_loss(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(cm_env, CALLMETER_DEDUPE_RETENTION_DAYS="3", CALLMETER_API_PORT=str(free_port(1)))
    events = _events()
    path = write_events(tmp_path / "events.jsonl", events)
    callmeter(env, "produce", str(path))
    _poison(env)
    first = worker_stats(env)
    assert first["rated"] == len(events) - 3  # the subscription and two bad calls
    # A call on a later day moves the window: keys older than 3 + 31 days before it are forgotten.
    later = write_events(tmp_path / "later.jsonl", [call("c-later", TENANT, "2026-11-29T10:00:00Z", 45)])
    callmeter(env, "produce", str(later))
    assert worker_stats(env)["keys_expired"] > 0

    # The whole input again, with the worker killed (SIGKILL) in the middle of it.
    callmeter(env, "produce", str(path))
    _poison(env)
    callmeter(dict(env, CALLMETER_CRASH_AT="after-event:25:kill"), "worker", "--until-idle")
    # The worker's local state lost, and everything resent once more.
    shutil.rmtree(Path(env["CALLMETER_DATA_DIR"]) / "worker")
    callmeter(env, "produce", str(path))
    _poison(env)
    worker_stats(env)
    # Copies of forgotten keys did reach the ledger, which recorded them as duplicates, not usage.
    caught = ledger_query(env, "SELECT count() FROM duplicates FINAL WHERE detected_by = 'ledger'")
    assert caught[0][0] > 0

    # The ledger: every call once, each distinct bad event once.
    report = ledger_report(env)
    calls, provisioning = reference_events(path)
    calls += reference_events(later)[0]
    assert report["rated_calls"] == len(events) - 3 + 1
    assert report["dead_letters"] == 3

    # Every period's live number is the batch computation's.
    from pipeline.catalogs import read_catalog

    catalog = read_catalog(Settings().catalog)[0]
    timelines = timelines_from(provisioning)
    expected = {
        str(start): seconds for (tenant, start), seconds in usage_from(calls, timelines, catalog).items()
    }
    assert set(expected) == set(PERIODS)
    port = env["CALLMETER_API_PORT"]
    with BackgroundWorker(env) as worker:
        for start, instant in PERIODS.items():
            status, body = worker.get(f"/balances/{TENANT}?at={instant}")
            assert (status, body["period_start"], body["used_seconds"]) == (200, start, expected[start]), body
            assert body.get("source") == (None if start == "2026-11-01" else "ledger")

            def api_used(instant: str = instant) -> Any:
                code, answer = api_get(port, f"/balances/{TENANT}?at={instant}")
                return answer.get("used_seconds") if code == 200 else (code, answer)

            eventually(api_used, expected[start], f"tenant API balance of {start}")

    # Alerts: each threshold once per period, never contradicting a lower one.
    by_period: dict[Any, dict[int, tuple[Any, int]]] = {}
    for alert in _alerts(env):
        if alert["kind"] != "USAGE_THRESHOLD":
            continue
        sent = by_period.setdefault(alert["period_start"], {})
        assert alert["threshold_percent"] not in sent, alert
        sent[alert["threshold_percent"]] = (alert["crossed_at"], alert["used_seconds"])
    assert by_period
    for sent in by_period.values():
        ordered = [sent[p] for p in sorted(sent)]
        assert ordered == sorted(ordered), sent
    assert json.dumps  # keep the import for readers printing bodies while debugging


def test_a_call_dated_years_ahead_is_a_future_event_dead_letter(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    sub = prov(
        "s", "fu", "2026-11-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE"
    )
    future = call("f", "fu", "2031-01-01T00:00:00Z", 60)
    now = call("n", "fu", "2026-11-02T10:00:00Z", 60)
    callmeter(cm_env, "produce", str(write_events(tmp_path / "e.jsonl", [sub, future, now, future])))
    stats = worker_stats(cm_env)
    assert (stats["rated"], stats["dead_letters"], stats["duplicates"]) == (
        1,
        {"FUTURE_EVENT": 1},
        {"call": 1},
    )
    report = ledger_report(cm_env)
    assert report["dead_letters_by_reason"] == {"FUTURE_EVENT": 1}
    assert report["billable_seconds_by_tenant"] == {"fu": 60}
