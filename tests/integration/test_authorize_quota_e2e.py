"""Pre-call authorization and quota checks from a running worker, through the real broker."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from pipeline.settings import SAMPLE_CATALOG
from tests.integration.cli import BackgroundWorker, callmeter, metric_values
from tests.integration.eventfiles import prov
from tests.integration.test_balances_alerts_e2e import T0, call, subscription, write

pytestmark = pytest.mark.integration

AT = "?at=2026-11-20T00:00:00Z"
LATER_BOOK = """
  - id: "2027-01"
    effective_from: "2027-01-01T00:00:00Z"
    plans:
      starter:
        base_fee: "49.00"
        included_seconds: 18000
        overage: charge
        overage_tiers:
          - {up_to: null, rate: "0.0200"}
        overage_cap: null
        rounding: {minimum_seconds: 0, increment_seconds: 1}
        numbers: {included_local: 1, local_fee: "2.00", toll_free_fee: "5.00", max: 3}
        employees: {max_active: 5}
"""


def test_authorization_and_quota_follow_calls_and_provisioning(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    # blk: hardstop, 120 s included, overage blocked. qt: starter, 5 employees and 3 numbers.
    def emp(event_id: str, at: str, employee: str, on: bool = True) -> dict[str, object]:
        action = "EMPLOYEE_ACTIVATED" if on else "EMPLOYEE_DEACTIVATED"
        return prov(event_id, "qt", at, action, employee_id=employee)

    def num(event_id: str, at: str, number: str, on: bool = True) -> dict[str, object]:
        if on:
            return prov(event_id, "qt", at, "NUMBER_PROVISIONED", number=number, number_type="LOCAL")
        return prov(event_id, "qt", at, "NUMBER_RELEASED", number=number)

    setup = [
        subscription("blk", "hardstop"),
        subscription("qt", "starter"),
        *[emp(f"e{i}", f"2026-11-0{i + 2}T10:00:00Z", f"emp-{i}") for i in range(3)],
        num("n1", "2026-11-02T11:00:00Z", "+15550001"),
        num("n2", "2026-11-03T11:00:00Z", "+15550002"),
    ]
    # The shipped catalog plus a 2027 price book without hardstop: a period callmeter cannot decide.
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(SAMPLE_CATALOG.read_text() + LATER_BOOK)
    cm_env = dict(cm_env, CALLMETER_CATALOG=str(catalog))
    callmeter(cm_env, "produce", write(tmp_path / "setup.jsonl", setup))
    with BackgroundWorker(cm_env) as worker:
        worker.wait_for(lambda s: s["stats"]["consumed"].get("provisioning") == 7, "provisioning")
        assert worker.get(f"/authorize/blk{AT}") == (
            200,
            {
                "tenant_id": "blk",
                "allowed": True,
                "max_call_seconds": 120,
                "reason": None,
                "plan_id": "hardstop",
                "overage_mode": "block",
                "period_start": "2026-11-01",
            },
        )
        _status, body = worker.get(f"/authorize/qt{AT}")
        assert (body["allowed"], body["max_call_seconds"], body["overage_mode"]) == (True, None, "charge")
        _status, body = worker.get(f"/authorize/nobody{AT}")
        assert (body["allowed"], body["max_call_seconds"], body["reason"]) == (False, 0, "no_subscription")
        _status, body = worker.get(f"/quota/qt{AT}")
        assert (body["employees"]["summary"], body["employees"]["one_more_allowed"]) == (
            "3 of 5 employees active",
            True,
        )
        assert (body["numbers"]["active"], body["numbers"]["limit"]) == (2, 3)

        # 47 s used: exactly 73 s left.
        callmeter(cm_env, "produce", write(tmp_path / "c1.jsonl", [call("blk", "b1", 47)]))
        worker.wait_for(lambda s: s["stats"]["rated"] == 1, "first call rated")
        _status, body = worker.get(f"/authorize/blk{AT}")
        assert (body["allowed"], body["max_call_seconds"], body["reason"]) == (True, 73, None)

        # The next call uses the rest; and qt changes its employees and numbers, then cancels on the 25th.
        changes = [
            call("blk", "b2", 73, T0 + timedelta(hours=1)),
            emp("e9", "2026-11-10T00:00:00Z", "emp-0", on=False),
            emp("e3", "2026-11-11T00:00:00Z", "emp-3"),
            emp("e4", "2026-11-12T00:00:00Z", "emp-4"),
            emp("e5", "2026-11-12T00:00:00Z", "emp-5"),
            num("n3", "2026-11-13T00:00:00Z", "+15550003"),
            num("n9", "2026-11-14T00:00:00Z", "+15550001", on=False),
            num("n4", "2026-11-15T00:00:00Z", "+15550004"),
            prov("cx", "qt", "2026-11-25T00:00:00Z", "SUBSCRIPTION_CANCELLED"),
        ]
        callmeter(cm_env, "produce", write(tmp_path / "c2.jsonl", changes))
        worker.wait_for(
            lambda s: s["stats"]["rated"] == 2 and s["stats"]["consumed"].get("provisioning") == 15,
            "second call and the provisioning changes",
        )
        _status, body = worker.get(f"/authorize/blk{AT}")
        assert (body["allowed"], body["max_call_seconds"], body["reason"]) == (False, 0, "allowance_used_up")
        _status, body = worker.get(f"/quota/qt{AT}")
        assert (
            body["employees"]["summary"],
            body["employees"]["one_more_allowed"],
            body["numbers"]["summary"],
            body["numbers"]["one_more_allowed"],
        ) == ("5 of 5 employees active", False, "3 of 3 numbers active", False)
        # Before the changes the counts were the first ones; after the cancellation nothing is in force.
        _status, body = worker.get("/quota/qt?at=2026-11-09T00:00:00Z")
        assert (body["employees"]["active"], body["numbers"]["active"]) == (3, 2)
        _status, body = worker.get("/quota/qt?at=2026-11-25T00:00:00Z")
        assert (body["reason"], body["employees"]["limit"], body["employees"]["one_more_allowed"]) == (
            "cancelled",
            None,
            False,
        )
        _status, body = worker.get("/authorize/qt?at=2026-11-25T00:00:00Z")
        assert (body["allowed"], body["reason"]) == (False, "cancelled")
        assert worker.get("/authorize/blk?at=yesterday")[0] == 400
        status, body = worker.get("/authorize/blk?at=2027-01-05T00:00:00Z")
        assert (status, body) == (
            503,
            {"error": "plan 'hardstop' is not in price book '2027-01'", "tenant_id": "blk"},
        )
        assert worker.get("/quota/blk?at=2027-01-05T00:00:00Z")[0] == 503
        _status, text = worker.get("/metrics")
        served = metric_values(text, "callmeter_tenant_api_requests_total")
        assert served['{endpoint="authorize",status="200"}'] == 6
        assert served['{endpoint="quota",status="200"}'] == 4
