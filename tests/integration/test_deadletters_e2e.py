"""Bad input is never dropped silently: it reaches the dead-letter topic with its original bytes,
source coordinates and a reason, and the ledger keeps it for analysts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from pipeline.settings import Settings
from schemas.serde import Serde
from tests.integration.cli import callmeter, ledger_report, worker_stats

pytestmark = pytest.mark.integration

GOOD_SUB = {
    "type": "provisioning",
    "event_id": "s1",
    "tenant_id": "zeta",
    "occurred_at": "2026-11-01T00:00:00Z",
    "action": "SUBSCRIPTION_STARTED",
    "plan_id": "starter",
    "tax_region": "GB",
    "number": None,
    "number_type": None,
    "employee_id": None,
}
BAD_PLAN = dict(GOOD_SUB, event_id="s2", tenant_id="omega", plan_id="platinum")
ENDED_BEFORE_ANSWERED = {
    "type": "call",
    "event_id": "x1",
    "tenant_id": "zeta",
    "call_id": "c-x1",
    "employee_id": None,
    "direction": "INBOUND",
    "from_number": "+15550000001",
    "to_number": "+15551110001",
    "started_at": "2026-11-02T10:00:00Z",
    "answered_at": "2026-11-02T10:00:30Z",
    "ended_at": "2026-11-02T10:00:10Z",
    "disposition": "ANSWERED",
    "gateway_id": "gw-1",
}
GOOD_CALL = dict(ENDED_BEFORE_ANSWERED, event_id="x2", ended_at="2026-11-02T10:01:30Z")
GARBAGE = b"{this is not avro"


def _read_all(bootstrap: str, topic: str) -> list[tuple[int, int, bytes]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{topic}-reader",
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([topic])
    out = []
    idle = 0
    while idle < 6:
        msg = consumer.poll(0.5)
        if msg is None:
            idle += 1
            continue
        if msg.error() is None:
            out.append((msg.partition(), msg.offset(), msg.value()))
    consumer.close()
    return out


def test_bad_records_reach_the_dead_letter_topic_with_reason(cm_env: dict[str, str], tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(
        "\n".join(json.dumps(e) for e in (GOOD_SUB, BAD_PLAN, ENDED_BEFORE_ANSWERED, GOOD_CALL)) + "\n"
    )
    callmeter(cm_env, "produce", str(events))
    settings = Settings(topic_prefix=cm_env["CALLMETER_TOPIC_PREFIX"], partitions=3)
    producer = Producer({"bootstrap.servers": cm_env["CALLMETER_KAFKA"]})
    producer.produce(settings.topics.calls, key=b"zeta", value=GARBAGE)
    producer.flush(10)

    stats = worker_stats(cm_env)
    assert stats["dead_letters"] == {"UNKNOWN_PLAN": 1, "ENDED_BEFORE_ANSWERED": 1, "UNDECODABLE": 1}
    assert stats["rated"] == 1

    serde = Serde()
    letters = [
        serde.decode(v)[1] for _p, _o, v in _read_all(cm_env["CALLMETER_KAFKA"], settings.topics.deadletter)
    ]
    by_reason = {r["reason"]: r for r in letters}
    assert sorted(by_reason) == ["ENDED_BEFORE_ANSWERED", "UNDECODABLE", "UNKNOWN_PLAN"]
    garbage = by_reason["UNDECODABLE"]
    assert garbage["value"] == GARBAGE
    assert garbage["key"] == b"zeta"
    assert garbage["source_topic"] == settings.topics.calls
    # The original bytes of a decodable-but-invalid record decode back to the event that was sent.
    _name, original = serde.decode(by_reason["ENDED_BEFORE_ANSWERED"]["value"])
    assert original["event_id"] == "x1"
    assert "answered" in by_reason["ENDED_BEFORE_ANSWERED"]["message"]
    assert by_reason["UNKNOWN_PLAN"]["source_topic"] == settings.topics.provisioning
    assert "platinum" in by_reason["UNKNOWN_PLAN"]["message"]

    report = ledger_report(cm_env)
    assert report["dead_letters_by_reason"] == {
        "ENDED_BEFORE_ANSWERED": 1,
        "UNDECODABLE": 1,
        "UNKNOWN_PLAN": 1,
    }
    assert report["rated_calls"] == 1
    assert report["billable_seconds_by_tenant"] == {"zeta": 60}
    # Who sent each dead letter, as far as its bytes tell (dead letters by gateway).
    rows = callmeter(
        cm_env, "sql", "SELECT reason, tenant_id, event_id, gateway_id FROM dead_letters ORDER BY reason",
        "--format", "json",
    ).stdout  # fmt: skip
    assert json.loads(rows) == [
        {"reason": "ENDED_BEFORE_ANSWERED", "tenant_id": "zeta", "event_id": "x1", "gateway_id": "gw-1"},
        {"reason": "UNDECODABLE", "tenant_id": "", "event_id": "", "gateway_id": ""},
        {"reason": "UNKNOWN_PLAN", "tenant_id": "omega", "event_id": "s2", "gateway_id": ""},
    ]


def test_produce_rejects_a_bad_file_with_one_line_and_publishes_nothing(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    events = tmp_path / "bad.jsonl"
    events.write_text(
        json.dumps(GOOD_SUB) + "\n" + json.dumps(dict(GOOD_CALL, started_at="yesterday")) + "\n"
    )
    proc = callmeter(cm_env, "produce", str(events), check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert f"{events}:2:" in proc.stderr and "started_at" in proc.stderr
    settings = Settings(topic_prefix=cm_env["CALLMETER_TOPIC_PREFIX"], partitions=3)
    assert _read_all(cm_env["CALLMETER_KAFKA"], settings.topics.provisioning) == []


def test_bad_flags_and_missing_files_exit_non_zero_with_one_line(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    proc = callmeter(cm_env, "invoice", "--period", "2026-13", "--out", str(tmp_path), check=False)
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    proc = callmeter(cm_env, "produce", str(tmp_path / "missing.jsonl"), check=False)
    assert proc.returncode == 1 and "missing.jsonl" in proc.stderr and proc.stderr.count("\n") == 1
    proc = callmeter(cm_env, "worker", "--bogus", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    proc = callmeter(
        cm_env,
        "--catalog",
        str(tmp_path / "nope.yaml"),
        "invoice",
        "--period",
        "2026-11",
        "--out",
        str(tmp_path),
        check=False,
    )
    assert proc.returncode == 1 and "nope.yaml" in proc.stderr and proc.stderr.count("\n") == 1
    # An --out that is a file, not a directory: one line, not a traceback.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = callmeter(
        cm_env, "simulate", "--tenants", "1", "--calls", "3", "--out", str(blocker / "x.jsonl"), check=False
    )
    assert proc.returncode == 1 and "a-file" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_a_ledger_held_by_another_process_is_named_in_one_line(cm_env: dict[str, str]) -> None:
    settings = Settings(data_dir=Path(cm_env["CALLMETER_DATA_DIR"]))
    code = (
        "import sys, time\n"
        "from sinks.ledger import Ledger\n"
        f"ledger = Ledger.open({settings.clickhouse_dsn!r})\n"
        "print('open', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        proc = callmeter(cm_env, "ledger", check=False)
        assert proc.returncode == 1
        line = [ln for ln in proc.stderr.splitlines() if ln.startswith("callmeter: error:")]
        assert len(line) == 1 and f"pid {holder.pid}" in line[0], proc.stderr
    finally:
        holder.kill()
        holder.wait()
