"""Quota checks before creating: active employees and numbers against the plan in force,
and whether one more of each is allowed; exact counts, table-driven."""

from __future__ import annotations

from datetime import datetime

import pytest

from rating.models import ProvisioningEvent
from rating.quota import quota
from rating.subscription import TenantTimeline
from tests.unit.test_rating_authorize import plans
from tests.unit.test_rating_support import employee, number, prov, release, start, utc

NOW = utc(2026, 11, 20, 12)
SUB = start(utc(2026, 10, 1, 9), "tiered")  # tiered: 5 employees, 3 numbers


def counts(events: list[ProvisioningEvent], now: datetime = NOW) -> tuple[object, ...]:
    result = quota("t1", TenantTimeline.from_events("t1", events), plans(), now)
    e, n = result.employees, result.numbers
    return (e.summary, e.one_more_allowed, n.summary, n.one_more_allowed)


@pytest.mark.parametrize(
    ("events", "now", "expected"),
    [
        ([SUB], NOW, ("0 of 5 employees active", True, "0 of 3 numbers active", True)),
        ([SUB, *[employee(utc(2026, 11, 2, i), f"e{i}") for i in range(3)]], NOW,
         ("3 of 5 employees active", True, "0 of 3 numbers active", True)),
        ([SUB, *[employee(utc(2026, 11, 2, i), f"e{i}") for i in range(5)]], NOW,
         ("5 of 5 employees active", False, "0 of 3 numbers active", True)),
        # A deactivation frees the seat from its instant on; a re-activation of an active one counts once.
        ([SUB, *[employee(utc(2026, 11, 2, i), f"e{i}") for i in range(5)],
          employee(utc(2026, 11, 3), "e0", on=False), employee(utc(2026, 11, 4), "e1")],
         utc(2026, 11, 3), ("4 of 5 employees active", True, "0 of 3 numbers active", True)),
        ([SUB, *[employee(utc(2026, 11, 2, i), f"e{i}") for i in range(5)],
          employee(utc(2026, 11, 3), "e0", on=False)],
         utc(2026, 11, 2, 23, 59, 59, 999),
         ("5 of 5 employees active", False, "0 of 3 numbers active", True)),
        # Local and toll-free numbers count alike; one provisioned before the subscription counts too.
        ([number(utc(2026, 9, 1), "+1555001"), SUB, number(utc(2026, 11, 2), "+1800001", "TOLL_FREE"),
          number(utc(2026, 11, 3), "+1555002")], NOW,
         ("0 of 5 employees active", True, "3 of 3 numbers active", False)),
        ([SUB, number(utc(2026, 11, 2), "+1555001"), number(utc(2026, 11, 3), "+1555002"),
          release(utc(2026, 11, 4), "+1555001")], NOW,
         ("0 of 5 employees active", True, "1 of 3 numbers active", True)),
    ],
)  # fmt: skip
def test_counts_against_the_plan(
    events: list[ProvisioningEvent], now: datetime, expected: tuple[object, ...]
) -> None:
    assert counts(events, now) == expected


def test_over_the_limit_and_singular_nouns() -> None:
    # hardstop: 2 employees, 1 number. Three employees got in (the QUOTA_EXCEEDED alert's case).
    events = [
        start(utc(2026, 10, 1), "hardstop"),
        *[employee(utc(2026, 11, 2, i), f"e{i}") for i in range(3)],
        number(utc(2026, 11, 2), "+1555001"),
    ]
    assert counts(events) == ("3 of 2 employees active", False, "1 of 1 number active", False)


def test_a_downgrade_lowers_the_limits_at_the_next_period() -> None:
    events = [
        SUB,
        *[employee(utc(2026, 11, 2, i), f"e{i}") for i in range(2)],
        prov("PLAN_CHANGED", utc(2026, 11, 10), plan_id="hardstop"),
    ]
    assert counts(events, utc(2026, 11, 30, 23, 59)) == (
        "2 of 5 employees active",
        True,
        "0 of 3 numbers active",
        True,
    )
    assert counts(events, utc(2026, 12, 1)) == (
        "2 of 2 employees active",
        False,
        "0 of 1 number active",
        True,
    )


def test_no_plan_in_force_allows_nothing_more() -> None:
    cancelled = [
        SUB,
        employee(utc(2026, 11, 2), "e1"),
        employee(utc(2026, 11, 2), "e2"),
        prov("SUBSCRIPTION_CANCELLED", utc(2026, 11, 10)),
    ]
    result = quota("t1", TenantTimeline.from_events("t1", cancelled), plans(), NOW)
    assert result.to_json_dict() == {
        "tenant_id": "t1",
        "plan_id": None,
        "reason": "cancelled",
        "employees": {
            "active": 2,
            "limit": None,
            "one_more_allowed": False,
            "summary": "2 employees active, no plan in force",
        },
        "numbers": {
            "active": 0,
            "limit": None,
            "one_more_allowed": False,
            "summary": "0 numbers active, no plan in force",
        },
    }
    ghost = quota("ghost", None, plans(), NOW).to_json_dict()
    assert (ghost["reason"], ghost["employees"]["active"], ghost["numbers"]["one_more_allowed"]) == (
        "no_subscription",
        0,
        False,
    )


def test_json_of_a_quota_answer() -> None:
    events = [SUB, *[employee(utc(2026, 11, 2, i), f"e{i}") for i in range(3)]]
    assert quota("t1", TenantTimeline.from_events("t1", events), plans(), NOW).to_json_dict() == {
        "tenant_id": "t1",
        "plan_id": "tiered",
        "reason": None,
        "employees": {
            "active": 3,
            "limit": 5,
            "one_more_allowed": True,
            "summary": "3 of 5 employees active",
        },
        "numbers": {"active": 0, "limit": 3, "one_more_allowed": True, "summary": "0 of 3 numbers active"},
    }
