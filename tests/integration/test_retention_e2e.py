"""Dedupe retention (spec §2): keys are kept for the retention window and then forgotten."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.integration.cli import BackgroundWorker, callmeter, worker_stats

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


def test_keys_are_forgotten_past_the_window_and_a_late_copy_changes_no_live_number(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    """Retention 40 days: a key is held while its event time is within 40 + 31 days of the partition's
    event-time day (pipeline/stream/window.py), then forgotten. A copy that comes back after that is in a
    period the window has closed: it is rated for the ledger, which records it as a duplicate, and no
    live balance counts it; that period's balance is then the ledger's."""
    env = dict(cm_env, CALLMETER_DEDUPE_RETENTION_DAYS="40")
    now = datetime.now(UTC).replace(microsecond=0)
    sub = {
        "type": "provisioning",
        "event_id": "s",
        "tenant_id": "ret",
        "occurred_at": _iso(now - timedelta(days=200)),
        "action": "SUBSCRIPTION_STARTED",
        "plan_id": "starter",
        "tax_region": "NONE",
        "number": None,
        "number_type": None,
        "employee_id": None,
    }
    old, recent = _call("old", now - timedelta(days=150)), _call("recent", now - timedelta(days=5))
    first = tmp_path / "first.jsonl"
    # A retry of "old" before the window moves is a duplicate; "recent" moves the window 145 days on.
    first.write_text("\n".join(json.dumps(e) for e in (sub, old, old, recent)) + "\n")
    callmeter(env, "produce", str(first))
    stats = worker_stats(env)
    assert stats["duplicates"] == {"call": 1}
    assert stats["keys_expired"] == 1  # "old"; provisioning is kept by the tenant's timeline
    second = tmp_path / "second.jsonl"
    second.write_text("\n".join(json.dumps(e) for e in (sub, old, recent)) + "\n")
    callmeter(env, "produce", str(second))
    stats = worker_stats(env)
    assert stats["duplicates"] == {"call": 1, "provisioning": 1}  # "recent" and the subscription
    assert (stats["rated"], stats["closed_period"]) == (1, 1)  # "old", for the ledger to decide
    # The ledger already holds "old" from its first copy: it refuses the second and records it as a
    # duplicate it found itself, at the copy's own event time.
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
        {
            "event_id": "s",
            "detected_by": "worker",
            "gateway_id": "",
            "ended": str(sub["occurred_at"])[:19].replace("T", " ") + ".000",
        },
    ]
    # Each period shows one call of 30 s: "old"'s from the ledger, "recent"'s live.
    with BackgroundWorker(env) as worker:
        for call, source in ((old, "ledger"), (recent, None)):
            status, body = worker.get(f"/balances/ret?at={call['ended_at']}")
            assert (status, body["used_seconds"], body.get("source")) == (200, 30, source), body
