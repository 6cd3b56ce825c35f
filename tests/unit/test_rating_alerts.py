"""Configurable thresholds and the projected overage (rating/alerts.py), with exact values."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from rating.alerts import (
    crossed_thresholds,
    exhaustion_at,
    projected_overage,
    threshold_problem,
    thresholds_in_effect,
)
from rating.catalog import parse_catalog
from rating.errors import CatalogError
from rating.models import ProvisioningEvent
from rating.periods import period_starting_in
from rating.subscription import TenantTimeline

NOV = period_starting_in(1, 2026, 11)  # 2026-11-01 .. 2026-12-01, 30 days


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ([75, 90, 100], None),
        ([50, 95], None),
        ([], None),  # back to the defaults
        ([1, 100], None),
        ([0], "alert thresholds are whole percents from 1 to 100, not 0"),
        ([101], "alert thresholds are whole percents from 1 to 100, not 101"),
        ([True], "alert thresholds are whole percents from 1 to 100, not True"),
        ([50, 50], "alert thresholds repeat a value: [50, 50]"),
        (list(range(1, 12)), "at most 10 alert thresholds, not 11"),
    ],
)
def test_threshold_problem(values: list[int], problem: str | None) -> None:
    assert threshold_problem(values) == problem


@pytest.mark.parametrize(
    ("tenant", "plan", "catalog", "expected"),
    [
        (None, None, (75, 90, 100), (75, 90, 100)),
        ((95, 50), None, (75, 90, 100), (50, 95)),  # the tenant's own, ascending
        (None, (50, 100), (75, 90, 100), (50, 100)),  # the plan's catalog default
        ((95,), (50, 100), (75, 90, 100), (95,)),  # the tenant's wins over its plan's
        ((), (50, 100), (75, 90, 100), (50, 100)),  # empty: the defaults
        ((), (), (80,), (80,)),
    ],
)
def test_thresholds_in_effect(
    tenant: tuple[int, ...] | None,
    plan: tuple[int, ...] | None,
    catalog: tuple[int, ...],
    expected: tuple[int, ...],
) -> None:
    assert thresholds_in_effect(tenant, plan, catalog) == expected


@pytest.mark.parametrize(
    ("thresholds", "before", "after", "crossed"),
    [
        ((50, 95), 0, 8999, []),
        ((50, 95), 0, 9000, [50]),  # 50 % of 18000 s
        ((50, 95), 9000, 17100, [95]),  # 95 % is 17100 s
        ((95, 50), 0, 18000, [50, 95]),  # ascending whatever the order given
        ((50, 75, 90, 95, 100), 13499, 17100, [75, 90, 95]),
        ((1,), 0, 180, [1]),
        ((), 0, 18000, []),
    ],
)
def test_crossed_configured_thresholds(
    thresholds: tuple[int, ...], before: int, after: int, crossed: list[int]
) -> None:
    assert crossed_thresholds(18000, before, after, thresholds) == crossed


@pytest.mark.parametrize(
    ("used", "now", "expected"),
    [
        (6000, utc(2026, 11, 5), utc(2026, 11, 13)),  # 1500 s/day, 12000 s left: 8 days
        (13500, utc(2026, 11, 2, 12, 45), utc(2026, 11, 3, 1)),  # 36.75 h for 13500: 12.25 h more
        (7, utc(2026, 11, 1, 0, 0, 1), utc(2026, 11, 1, 0, 42, 51, 429000)),  # 2570.428571 s: up to the ms
        (6000, utc(2026, 11, 11), None),  # 600 s/day lasts exactly to the period's end: not before it
        (6000, utc(2026, 11, 10, 23, 59, 59), utc(2026, 11, 30, 23, 59, 57)),
        (0, utc(2026, 11, 5), None),
        (18000, utc(2026, 11, 5), None),  # already used up: the 100 % alert says so
        (9000, utc(2026, 11, 1), None),  # no time has passed
        (9000, utc(2026, 12, 3), None),  # a late call after the period: nothing left to project
    ],
)
def test_exhaustion_at(used: int, now: datetime, expected: datetime | None) -> None:
    assert exhaustion_at(NOV, 18000, used, now) == expected


@pytest.mark.parametrize(
    ("used", "now", "expected"),
    [
        (6000, utc(2026, 11, 5), date(2026, 11, 13)),
        (13500, utc(2026, 11, 2, 12, 45), date(2026, 11, 3)),
        (1800, utc(2026, 11, 2), date(2026, 11, 11)),  # exactly one day elapsed: 1800 s/day, 9 more days
        (1800, utc(2026, 11, 1, 23, 59, 59), None),  # less than a day of rate: no alert yet
        (6000, utc(2026, 11, 29), None),  # at that pace it outlasts the period
        (18000, utc(2026, 11, 20), None),
    ],
)
def test_projected_overage(used: int, now: datetime, expected: date | None) -> None:
    assert projected_overage(NOV, 18000, used, now) == expected


def _event(event_id: str, at: datetime, action: str, **fields: object) -> ProvisioningEvent:
    return ProvisioningEvent(event_id, "acme", at, action, **fields)  # type: ignore[arg-type]


def test_tenant_thresholds_latest_in_event_time_and_empty_resets() -> None:
    sub = _event("s", utc(2026, 11, 1), "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE")
    timeline = TenantTimeline.from_events("acme", [sub])
    assert timeline.alert_thresholds_percent is None
    later = _event("a2", utc(2026, 11, 3), "ALERT_THRESHOLDS_SET", alert_thresholds_percent=(95, 50))
    earlier = _event("a1", utc(2026, 11, 2), "ALERT_THRESHOLDS_SET", alert_thresholds_percent=(80,))
    # Arriving in either order, the setting latest in event time wins.
    assert timeline.apply(later).apply(earlier).alert_thresholds_percent == (50, 95)
    assert timeline.apply(earlier).apply(later).alert_thresholds_percent == (50, 95)
    reset = _event("a3", utc(2026, 11, 4), "ALERT_THRESHOLDS_SET", alert_thresholds_percent=())
    assert timeline.apply(later).apply(reset).alert_thresholds_percent is None
    # Kept through the worker's stored form.
    stored = TenantTimeline.from_dict(timeline.apply(later).to_dict())
    assert stored.alert_thresholds_percent == (50, 95)


SAMPLE = (Path(__file__).parents[2] / "pipeline" / "catalog.yaml").read_text()


@pytest.mark.parametrize(
    ("extra", "catalog_default", "starter"),
    [
        ("", (75, 90, 100), None),
        ("alert_thresholds_percent: [95, 50]\n", (50, 95), None),
    ],
)
def test_catalog_thresholds(
    extra: str, catalog_default: tuple[int, ...], starter: tuple[int, ...] | None
) -> None:
    catalog = parse_catalog(SAMPLE + extra)
    assert catalog.alert_thresholds_percent == catalog_default
    assert catalog.plan_for("starter", utc(2026, 11, 1)).alert_thresholds_percent == starter


def test_plan_thresholds_and_refusals() -> None:
    per_plan = SAMPLE.replace(
        "employees: {max_active: 5}",
        "employees: {max_active: 5}\n        alert_thresholds_percent: [100, 50]",
    )
    assert parse_catalog(per_plan).plan_for("starter", utc(2026, 11, 1)).alert_thresholds_percent == (50, 100)
    with pytest.raises(CatalogError, match="whole percents from 1 to 100, not 120"):
        parse_catalog(SAMPLE + "alert_thresholds_percent: [120]\n")
