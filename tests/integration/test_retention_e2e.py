"""Dedupe retention (spec §2): keys are kept for the retention window and then forgotten."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.integration.cli import callmeter, worker_stats

pytestmark = pytest.mark.integration


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _call(event_id: str, started: datetime) -> dict[str, object]:
    return {
        "type": "call",
        "event_id": event_id,
        "tenant_id": "ret",
        "call_id": event_id,
        "employee_id": None,
        "direction": "INBOUND",
        "from_number": "+15550000001",
        "to_number": "+15551110001",
        "started_at": _iso(started),
        "answered_at": _iso(started),
        "ended_at": _iso(started + timedelta(seconds=30)),
        "disposition": "ANSWERED",
        "gateway_id": "gw-1",
    }


def test_keys_older_than_the_retention_window_are_forgotten(cm_env: dict[str, str], tmp_path: Path) -> None:
    env = dict(cm_env, CALLMETER_DEDUPE_RETENTION_DAYS="40")
    now = datetime.now(UTC).replace(microsecond=0)
    sub = {
        "type": "provisioning",
        "event_id": "s",
        "tenant_id": "ret",
        "occurred_at": _iso(now - timedelta(days=100)),
        "action": "SUBSCRIPTION_STARTED",
        "plan_id": "starter",
        "tax_region": "NONE",
        "number": None,
        "number_type": None,
        "employee_id": None,
    }
    old, recent = _call("old", now - timedelta(days=55)), _call("recent", now - timedelta(days=10))
    first = tmp_path / "first.jsonl"
    # A retry of "old" within the window is a duplicate; once "recent" moves the partition's event time
    # past old + 40 days, "old" is forgotten and its next copy is new again.
    first.write_text("\n".join(json.dumps(e) for e in (sub, old, old, recent)) + "\n")
    callmeter(env, "produce", str(first))
    stats = worker_stats(env)
    assert stats["duplicates"] == {"call": 1}
    assert stats["keys_expired"] == 2  # "old" and the subscription (occurred 100 days ago)
    second = tmp_path / "second.jsonl"
    second.write_text(json.dumps(old) + "\n" + json.dumps(recent) + "\n")
    callmeter(env, "produce", str(second))
    stats = worker_stats(env)
    assert stats["duplicates"] == {"call": 1}  # "recent" is still remembered
    assert stats["rated"] == 1  # "old" came back after its key expired
    # The ledger already holds "old" from its first copy: it refuses the second and records it as a
    # duplicate it found itself, at the copy's own event time (issue 11: duplicates in the ledger).
    assert stats["duplicates_in_ledger"] == {"call": 1}
    query = (
        "SELECT event_id, detected_by, gateway_id, toString(event_time) AS ended FROM duplicates FINAL "
        "ORDER BY detected_by, event_id"
    )
    rows = json.loads(callmeter(env, "sql", query, "--format", "json").stdout)

    def ended(call: dict[str, object]) -> str:
        return datetime.fromisoformat(str(call["ended_at"])).strftime("%Y-%m-%d %H:%M:%S.000")

    assert rows == [
        {"event_id": "old", "detected_by": "ledger", "gateway_id": "gw-1", "ended": ended(old)},
        {"event_id": "old", "detected_by": "worker", "gateway_id": "gw-1", "ended": ended(old)},
        {"event_id": "recent", "detected_by": "worker", "gateway_id": "gw-1", "ended": ended(recent)},
    ]
