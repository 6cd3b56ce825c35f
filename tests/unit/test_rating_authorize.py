"""Pre-call authorization: ``allowed``, ``max_call_seconds`` and ``reason`` on every plan type,
at period edges and around cancellations; exact values, table-driven."""

from __future__ import annotations

from datetime import datetime

import pytest

from rating.authorize import Refusal, authorize
from rating.catalog import Catalog, parse_catalog
from rating.errors import UnknownPlanError
from rating.models import ProvisioningEvent
from rating.subscription import TenantTimeline
from tests.unit.test_rating_support import catalog as support_catalog
from tests.unit.test_rating_support import employee, number, prov, start, utc

# Every overage shape the catalog model allows: charge with graduated tiers, charge with a cap, block
# with 1-second and with 60/6 rounding, block with a (meaningless) cap, block with nothing included.
PLANS_YAML = """
revision: 1
currency: USD
tax_regions: {NONE: "0"}
price_books:
  - id: "2026-01"
    effective_from: "2026-01-01T00:00:00Z"
    plans:
      tiered:
        base_fee: "49.00"
        included_seconds: 1000
        overage: charge
        overage_tiers:
          - {up_to: 100, rate: "0.0200"}
          - {up_to: null, rate: "0.0150"}
        overage_cap: null
        rounding: {minimum_seconds: 0, increment_seconds: 1}
        numbers: {included_local: 1, local_fee: "2.00", toll_free_fee: "5.00", max: 3}
        employees: {max_active: 5}
      capped:
        base_fee: "199.00"
        included_seconds: 600
        overage: charge
        overage_tiers:
          - {up_to: null, rate: "0.0100"}
        overage_cap: "5.00"
        rounding: {minimum_seconds: 60, increment_seconds: 6}
        numbers: {included_local: 0, local_fee: "1.50", toll_free_fee: "4.00", max: 20}
        employees: {max_active: 20}
      hardstop:
        base_fee: "19.00"
        included_seconds: 120
        overage: block
        overage_tiers:
          - {up_to: null, rate: "0"}
        overage_cap: null
        rounding: {minimum_seconds: 0, increment_seconds: 1}
        numbers: {included_local: 1, local_fee: "2.00", toll_free_fee: "5.00", max: 1}
        employees: {max_active: 2}
      blockround:
        base_fee: "19.00"
        included_seconds: 600
        overage: block
        overage_tiers:
          - {up_to: null, rate: "0"}
        overage_cap: null
        rounding: {minimum_seconds: 60, increment_seconds: 6}
        numbers: {included_local: 1, local_fee: "2.00", toll_free_fee: "5.00", max: 1}
        employees: {max_active: 2}
      blockcapped:
        base_fee: "19.00"
        included_seconds: 300
        overage: block
        overage_tiers:
          - {up_to: null, rate: "0.0100"}
        overage_cap: "1.00"
        rounding: {minimum_seconds: 0, increment_seconds: 1}
        numbers: {included_local: 1, local_fee: "2.00", toll_free_fee: "5.00", max: 1}
        employees: {max_active: 2}
      nothing:
        base_fee: "5.00"
        included_seconds: 0
        overage: block
        overage_tiers:
          - {up_to: null, rate: "0"}
        overage_cap: null
        rounding: {minimum_seconds: 0, increment_seconds: 1}
        numbers: {included_local: 0, local_fee: "2.00", toll_free_fee: "5.00", max: 0}
        employees: {max_active: 0}
"""


def plans() -> Catalog:
    return parse_catalog(PLANS_YAML)


NOW = utc(2026, 11, 20, 12)


def answer(
    events: list[ProvisioningEvent], used: int, now: datetime = NOW
) -> tuple[bool, int | None, str | None]:
    timeline = TenantTimeline.from_events("t1", events)
    result = authorize("t1", timeline, plans(), used, now)
    return result.allowed, result.max_call_seconds, None if result.reason is None else str(result.reason)


@pytest.mark.parametrize(
    ("plan", "used", "expected"),
    [
        # Charging plans never refuse and are unbounded, whatever the usage: tiers price, they do not stop.
        ("tiered", 0, (True, None, None)),
        ("tiered", 999, (True, None, None)),
        ("tiered", 50_000, (True, None, None)),
        # The cap limits money, not service: far past the point where overage costs the cap, still unbounded.
        ("capped", 0, (True, None, None)),
        ("capped", 600 + 500, (True, None, None)),  # overage 500 s x 0.01 = 5.00, exactly the cap
        ("capped", 1_000_000, (True, None, None)),
        # Block plans: the included seconds left, then refused.
        ("hardstop", 0, (True, 120, None)),
        ("hardstop", 119, (True, 1, None)),
        ("hardstop", 120, (False, 0, "allowance_used_up")),
        ("hardstop", 180, (False, 0, "allowance_used_up")),  # blocked overage already reported
        # Rounding does not shrink the answer: the remaining billable seconds, exactly (docs/decisions.md).
        ("blockround", 540, (True, 60, None)),
        ("blockround", 594, (True, 6, None)),
        ("blockround", 600, (False, 0, "allowance_used_up")),
        # A cap on a block plan changes nothing: blocked overage costs nothing anyway.
        ("blockcapped", 299, (True, 1, None)),
        ("blockcapped", 300, (False, 0, "allowance_used_up")),
        # Nothing included on a block plan: refused from the first call.
        ("nothing", 0, (False, 0, "allowance_used_up")),
    ],
)
def test_every_plan_type(plan: str, used: int, expected: tuple[bool, int | None, str | None]) -> None:
    assert answer([start(utc(2026, 10, 1, 9), plan)], used) == expected


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        # anchor 15, hardstop until the PLAN_CHANGED to tiered takes effect at the next period start
        (utc(2026, 10, 15, 8), (True, 20, None)),  # same day as the subscription, before its instant
        (utc(2026, 11, 14, 23, 59, 59, 999), (True, 20, None)),  # last millisecond of the first period
        (utc(2026, 11, 15), (True, None, None)),  # the period start: the new plan, unbounded
        (utc(2026, 10, 14, 23, 59, 59, 999), (False, 0, "no_subscription")),  # before the first period
    ],
)
def test_period_edges(now: datetime, expected: tuple[bool, int | None, str | None]) -> None:
    events = [
        start(utc(2026, 10, 15, 10), "hardstop"),
        prov("PLAN_CHANGED", utc(2026, 10, 20), plan_id="tiered"),
    ]
    # The caller passes the usage of the period containing ``now``: 100 s in either period here.
    assert answer(events, 100, now) == expected


def test_a_call_started_before_the_period_ends_gets_only_the_old_remainder() -> None:
    # Anchor 31: November has no 31st, so the boundary is Nov 30 00:00 (spec §4). A call billed to the
    # old period cannot borrow the new period's allowance, however long it runs.
    events = [start(utc(2026, 10, 31, 9), "hardstop")]
    timeline = TenantTimeline.from_events("t1", events)
    before = authorize("t1", timeline, plans(), 115, utc(2026, 11, 29, 23, 59, 59))
    after = authorize("t1", timeline, plans(), 0, utc(2026, 11, 30))
    assert (before.max_call_seconds, str(before.period and before.period.start.date())) == (5, "2026-10-31")
    assert (after.max_call_seconds, str(after.period and after.period.start.date())) == (120, "2026-11-30")


@pytest.mark.parametrize(
    ("events", "now", "expected"),
    [
        # Cancelled at 12:00: allowed up to the instant before, refused from the instant on, although the
        # rest of that period is still invoiced and late call records in it are still rated.
        ([start(utc(2026, 10, 1), "tiered"), prov("SUBSCRIPTION_CANCELLED", utc(2026, 11, 10, 12))],
         utc(2026, 11, 10, 11, 59, 59, 999), (True, None, None)),
        ([start(utc(2026, 10, 1), "tiered"), prov("SUBSCRIPTION_CANCELLED", utc(2026, 11, 10, 12))],
         utc(2026, 11, 10, 12), (False, 0, "cancelled")),
        ([start(utc(2026, 10, 1), "tiered"), prov("SUBSCRIPTION_CANCELLED", utc(2026, 11, 10, 12))],
         utc(2027, 2, 3), (False, 0, "cancelled")),  # periods no longer invoiced
        # Re-subscribed in the same period: the cancellation is undone.
        ([start(utc(2026, 10, 1), "tiered"), prov("SUBSCRIPTION_CANCELLED", utc(2026, 11, 10, 12)),
          start(utc(2026, 11, 12), "hardstop")],
         utc(2026, 11, 20), (True, None, None)),
        # Re-subscribed two periods later: a new subscription with its own plan.
        ([start(utc(2026, 10, 1), "tiered"), prov("SUBSCRIPTION_CANCELLED", utc(2026, 11, 10, 12)),
          start(utc(2027, 1, 5), "hardstop")],
         utc(2027, 1, 6), (True, 20, None)),
        # Provisioning but no subscription yet.
        ([number(utc(2026, 10, 1), "+15550001"), employee(utc(2026, 10, 1), "e1")],
         NOW, (False, 0, "no_subscription")),
    ],
)  # fmt: skip
def test_subscription_state(
    events: list[ProvisioningEvent], now: datetime, expected: tuple[bool, int | None, str | None]
) -> None:
    assert answer(events, 100, now) == expected


def test_unknown_tenant_is_refused_without_a_period() -> None:
    result = authorize("ghost", None, plans(), 0, NOW)
    assert result.to_json_dict() == {
        "tenant_id": "ghost",
        "allowed": False,
        "max_call_seconds": 0,
        "reason": "no_subscription",
        "plan_id": None,
        "overage_mode": None,
        "period_start": None,
    }
    assert result.reason is Refusal.NO_SUBSCRIPTION


def test_json_of_a_block_plan_answer() -> None:
    timeline = TenantTimeline.from_events("t1", [start(utc(2026, 10, 1, 9), "hardstop")])
    assert authorize("t1", timeline, plans(), 45, NOW).to_json_dict() == {
        "tenant_id": "t1",
        "allowed": True,
        "max_call_seconds": 75,
        "reason": None,
        "plan_id": "hardstop",
        "overage_mode": "block",
        "period_start": "2026-11-01",
    }


def test_a_plan_missing_from_the_period_price_book_is_an_error_not_an_answer() -> None:
    # The support catalog's 2026-12 book has no hardstop plan.
    timeline = TenantTimeline.from_events("t1", [start(utc(2026, 10, 1, 9), "hardstop")])
    with pytest.raises(UnknownPlanError, match="hardstop"):
        authorize("t1", timeline, support_catalog(), 0, utc(2026, 12, 2))
