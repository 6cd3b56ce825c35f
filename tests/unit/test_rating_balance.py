"""Live balance and usage-threshold crossing (spec §8), table-driven with exact values."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from rating.alerts import crossed_thresholds
from rating.balance import balance, period_usage, project_exhaustion
from rating.catalog import Catalog, parse_catalog
from rating.models import ProvisioningEvent
from rating.periods import period_starting_in
from rating.subscription import TenantTimeline
from tests.unit.test_rating_support import number, start, utc


def catalog() -> Catalog:
    """The worked examples' catalog: starter 18000 s, pro 600 s capped at 5.00, hardstop 120 s blocked."""
    return parse_catalog((Path(__file__).parents[1] / "fixtures" / "examples" / "catalog.yaml").read_text())


NOV = period_starting_in(1, 2026, 11)


@pytest.mark.parametrize(
    ("included", "before", "after", "crossed"),
    [
        (18000, 0, 13499, []),
        (18000, 0, 13500, [75]),  # reaching a threshold crosses it
        (18000, 13500, 13501, []),  # already past 75 %
        (18000, 13499, 18000, [75, 90, 100]),  # one long call crosses all three
        (18000, 16199, 16200, [90]),
        (18000, 18000, 25000, []),  # over 100 % there is nothing left to cross
        (120, 89, 90, [75]),
        (120, 107, 108, [90]),
        (600, 0, 7326, [75, 90, 100]),
        (0, 0, 100, []),  # no allowance, no percentage
        (18000, 500, 500, []),  # a zero-second call crosses nothing
    ],
)
def test_crossed_thresholds(included: int, before: int, after: int, crossed: list[int]) -> None:
    assert crossed_thresholds(included, before, after) == crossed


@pytest.mark.parametrize(
    ("used", "now", "expected"),
    [
        (6000, utc(2026, 11, 5), date(2026, 11, 13)),  # 1500 s/day, 12000 s left -> 8 days
        (6000, utc(2026, 11, 29), None),  # at that pace it outlasts the period
        (0, utc(2026, 11, 5), None),  # no usage, no rate
        (18000, utc(2026, 11, 5), None),  # already used up
        (9000, utc(2026, 11, 1), None),  # no elapsed time yet
    ],
)
def test_projected_exhaustion(used: int, now: object, expected: date | None) -> None:
    assert project_exhaustion(NOV, 18000, used, now) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("plan", "used", "remaining", "overage", "allowed", "charges"),
    [
        ("starter", 0, 18000, 0, True, "49.00"),
        ("starter", 19001, 0, 1001, True, "67.02"),  # 49 + 12.00 + 6.02
        ("hardstop", 119, 1, 0, True, "19.00"),
        ("hardstop", 120, 0, 0, False, "19.00"),  # block plan: used up means not allowed
        ("hardstop", 180, 0, 60, False, "19.00"),  # blocked overage is free
        ("pro", 7326, 0, 6726, True, "204.00"),  # overage capped at 5.00
    ],
)
def test_balance(plan: str, used: int, remaining: int, overage: int, allowed: bool, charges: str) -> None:
    timeline = TenantTimeline.from_events("t1", [start(utc(2026, 10, 1, 9), plan, "NONE")])
    result = balance(timeline, catalog(), used, utc(2026, 11, 20))
    assert result is not None
    body = result.to_json_dict()
    assert (body["used_seconds"], body["remaining_seconds"], body["overage_seconds"]) == (
        used,
        remaining,
        overage,
    )
    assert (body["allowed"], body["charges_so_far"]) == (allowed, charges)
    assert (body["period_start"], body["period_end"], body["plan_id"]) == ("2026-11-01", "2026-12-01", plan)


def test_balance_charges_include_numbers_like_the_invoice() -> None:
    timeline = TenantTimeline.from_events(
        "t1",
        [
            start(utc(2026, 10, 1, 9), "starter", "NONE"),
            number(utc(2026, 11, 16, 12), "+18005550100", "TOLL_FREE"),
        ],
    )
    result = balance(timeline, catalog(), 0, utc(2026, 11, 20))
    assert result is not None and result.to_json_dict()["charges_so_far"] == "51.50"  # 49 + 5 * 15/30


def test_no_balance_without_subscription() -> None:
    assert balance(TenantTimeline.from_events("t1", []), catalog(), 0, utc(2026, 11, 20)) is None


def _plan_change(at: datetime, plan: str) -> ProvisioningEvent:
    return ProvisioningEvent("pc-" + plan, "t1", at, "PLAN_CHANGED", plan_id=plan)


def _cancel(at: datetime) -> ProvisioningEvent:
    return ProvisioningEvent("x", "t1", at, "SUBSCRIPTION_CANCELLED")


@pytest.mark.parametrize(
    ("extra", "calls", "expected"),
    [
        # starter (1 s increments): 600 s and 59.2 s -> 600 + 60 in November.
        ([], [(utc(2026, 11, 2), Decimal("600")), (utc(2026, 11, 3), Decimal("59.2"))], {NOV.start: 660}),
        # pro from November (changed in October): 60 s minimum, 6 s increments -> 600 + 60.
        (
            [_plan_change(utc(2026, 10, 20), "pro")],
            [(utc(2026, 11, 2), Decimal("600")), (utc(2026, 11, 3), Decimal("59"))],
            {NOV.start: 660},
        ),
        # pro: 1 s -> 60 s minimum, 61 s -> 66 s.
        (
            [_plan_change(utc(2026, 10, 20), "pro")],
            [(utc(2026, 11, 2), Decimal("1")), (utc(2026, 11, 3), Decimal("61"))],
            {NOV.start: 126},
        ),
        # A call of 0 raw seconds costs nothing, whatever the minimum.
        ([_plan_change(utc(2026, 10, 20), "pro")], [(utc(2026, 11, 2), Decimal("0"))], {NOV.start: 0}),
        # Cancelled in October: November is not covered, October still is.
        (
            [_cancel(utc(2026, 10, 20))],
            [(utc(2026, 10, 25), Decimal("10")), (utc(2026, 11, 2), Decimal("20"))],
            {period_starting_in(1, 2026, 10).start: 10},
        ),
        # Before the first period: nothing.
        ([], [(utc(2026, 9, 30, 23), Decimal("10"))], {}),
    ],
)
def test_period_usage_rerates_remembered_calls_against_the_timeline(
    extra: list[ProvisioningEvent], calls: list[tuple[datetime, Decimal]], expected: dict[datetime, int]
) -> None:
    timeline = TenantTimeline.from_events("t1", [start(utc(2026, 10, 1, 9)), *extra])
    assert period_usage(calls, timeline, catalog()) == expected


def test_period_usage_of_a_tenant_without_subscription_is_empty() -> None:
    timeline = TenantTimeline.from_events("t1", [])
    assert period_usage([(utc(2026, 11, 2), Decimal("5"))], timeline, catalog()) == {}
