"""`callmeter usage --json` on a ledger built from the spec's worked examples, through the command line:
every figure exact (the example invoice's money), whether the command opens the ledger itself or asks
the running worker that holds it (its query parameters, datetimes among them, then travel to that
process)."""

from __future__ import annotations

import json

import pytest

from tests.integration.cli import EXAMPLES, BackgroundWorker, callmeter

pytestmark = pytest.mark.integration


def test_usage_json_of_the_examples_is_exact(cm_env: dict[str, str]) -> None:
    callmeter(cm_env, "produce", str(EXAMPLES / "events.jsonl"))
    callmeter(cm_env, "worker", "--until-idle")
    alone = _acme_november(cm_env)
    with BackgroundWorker(cm_env):  # its sink holds the embedded ledger: usage asks it
        assert _acme_november(cm_env) == alone


def _acme_november(cm_env: dict[str, str]) -> dict[str, object]:
    proc = callmeter(cm_env, "usage", "acme", "--period", "2026-11", "--json", check=False)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    review = json.loads(proc.stdout)
    # acme's November: c1 (5 h = 18000 s), c2 (1000.4 s, rounded up to 1001 s), c3 (unanswered, 0 s);
    # c4 started on 31 October and belongs to October. The invoice: tests/fixtures/examples/expected.
    assert review["period"] == {
        "start": "2026-11-01T00:00:00+00:00",
        "end": "2026-12-01T00:00:00+00:00",
        "plan_id": "starter",
        "elapsed_percent": 100.0,
        "calls": 3,
        "billable_seconds": 19001,
        "forecast_billable_seconds": 19001,
        "included_seconds": 18000,
        "overage_mode": "charge",
        "overage_seconds_so_far": 1001,
        "subtotal_so_far": "69.52",
        "total_so_far": "75.69",
        "overage_seconds_forecast": 1001,
        "subtotal_forecast": "69.52",
        "total_forecast": "75.69",
        "currency": "USD",
    }
    # October: c4 only (600 s), acme's first period (subscribed on 1 October).
    previous = review["previous_period"]
    assert (previous["start"], previous["calls"], previous["billable_seconds"]) == (
        "2026-10-01T00:00:00+00:00",
        1,
        600,
    )
    assert review["daily"] == [
        {"day": "2026-11-02", "calls": 1, "billable": 18000},
        {"day": "2026-11-05", "calls": 1, "billable": 1001},
        {"day": "2026-11-06", "calls": 1, "billable": 0},
    ]
    assert [d["day"] for d in review["top_days"]] == ["2026-11-02", "2026-11-05", "2026-11-06"]
    assert review["top_employees"] == [{"employee": "emp-1", "calls": 3, "billable": 19001}]
    # c1 alone crosses every default threshold of the 18000 s allowance.
    thresholds = [a for a in review["alerts"] if a["kind"] == "USAGE_THRESHOLD"]
    assert [(a["threshold_percent"], a["used_seconds"]) for a in thresholds] == [
        (75, 18000),
        (90, 18000),
        (100, 18000),
    ]
    return dict(review)
