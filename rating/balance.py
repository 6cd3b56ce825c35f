"""Live balance of a tenant's current period (spec §8); which alerts it sends is rating/alerts.py.

Pure: the worker passes the timeline, the period's billable seconds so far and the time; the charges
are the invoice's own subtotal so far (``build_invoice``), so the balance can never disagree with the
invoice the same usage would produce.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from rating.alerts import exhaustion_at
from rating.calls import billable_seconds
from rating.catalog import Catalog, Rounding
from rating.errors import UnknownPlanError
from rating.invoice import build_invoice, money_text
from rating.periods import Period, period_containing
from rating.subscription import TenantTimeline


@dataclass(frozen=True)
class Balance:
    tenant_id: str
    period: Period
    plan_id: str
    included_seconds: int
    used_seconds: int
    overage_mode: str
    charges_so_far: Decimal
    currency: str
    projected_exhaustion_date: date | None

    @property
    def remaining_seconds(self) -> int:
        return max(self.included_seconds - self.used_seconds, 0)

    @property
    def overage_seconds(self) -> int:
        return max(self.used_seconds - self.included_seconds, 0)

    @property
    def allowed(self) -> bool:
        # Only a block plan with nothing left refuses calls (spec §8).
        return not (self.overage_mode == "block" and self.remaining_seconds == 0)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "period_start": self.period.start.date().isoformat(),
            "period_end": self.period.end.date().isoformat(),
            "plan_id": self.plan_id,
            "included_seconds": self.included_seconds,
            "used_seconds": self.used_seconds,
            "remaining_seconds": self.remaining_seconds,
            "overage_seconds": self.overage_seconds,
            "overage_mode": self.overage_mode,
            "allowed": self.allowed,
            "charges_so_far": money_text(self.charges_so_far),
            "currency": self.currency,
            "projected_exhaustion_date": (
                self.projected_exhaustion_date.isoformat() if self.projected_exhaustion_date else None
            ),
        }


def project_exhaustion(
    period: Period, included_seconds: int, used_seconds: int, now: datetime
) -> date | None:
    """At the period's average daily rate so far, the UTC date the allowance runs out, if that falls
    inside the period and it has not run out already; else None."""
    runs_out = exhaustion_at(period, included_seconds, used_seconds, now)
    return runs_out.date() if runs_out is not None else None


def balance(
    timeline: TenantTimeline, catalog: Catalog, used_seconds: int, now: datetime, period: Period | None = None
) -> Balance | None:
    """The balance of the period containing ``now`` (or ``period``); None when no plan covers it."""
    if not timeline.subscribed:
        return None
    period = period or timeline.period_at(now)
    plan_id = timeline.plan_for_period(period)
    if plan_id is None:
        return None
    plan = catalog.plan_for(plan_id, period.start)
    invoice = build_invoice(
        tenant_id=timeline.tenant_id,
        period=period,
        timeline=timeline,
        catalog=catalog,
        billable_seconds_total=used_seconds,
    )
    return Balance(
        tenant_id=timeline.tenant_id,
        period=period,
        plan_id=plan_id,
        included_seconds=plan.included_seconds,
        used_seconds=used_seconds,
        overage_mode=plan.overage,
        charges_so_far=invoice.subtotal,
        currency=catalog.currency,
        projected_exhaustion_date=project_exhaustion(period, plan.included_seconds, used_seconds, now),
    )


class _PeriodRules:
    """The rounding of each period a tenant's calls fall in, looked up once per period: the same rules
    as ``rate_call`` (the period from the anchor, the plan in effect at the period's start; no covering
    subscription or an unknown plan rates a call at nothing)."""

    def __init__(self, timeline: TenantTimeline, catalog: Catalog) -> None:
        self.timeline = timeline
        self.catalog = catalog
        self._periods: dict[datetime, tuple[Period, Rounding | None]] = {}

    def rate(self, started_at: datetime, raw: Decimal) -> tuple[Period, int] | None:
        period = period_containing(self.timeline.anchor, started_at)
        cached = self._periods.get(period.start)
        if cached is None:
            plan_id = self.timeline.plan_for_period(period)
            rounding = None
            if plan_id is not None:
                try:
                    rounding = self.catalog.plan_for(plan_id, period.start).rounding
                except UnknownPlanError:
                    rounding = None
            cached = self._periods[period.start] = (period, rounding)
        if cached[1] is None:
            return None
        return cached[0], billable_seconds(raw, cached[1])


def period_usage(
    calls: Iterable[tuple[datetime, Decimal]], timeline: TenantTimeline, catalog: Catalog
) -> dict[datetime, int]:
    """Billable seconds per period start of calls given as ``(started_at, raw_seconds)``, rated
    against ``timeline``: what the live balances must hold after the timeline changed."""
    if not timeline.subscribed:
        return {}
    usage: dict[datetime, int] = defaultdict(int)
    rules = _PeriodRules(timeline, catalog)
    for started_at, raw in calls:
        rated = rules.rate(started_at, raw)
        if rated is not None:
            usage[rated[0].start] += rated[1]
    return dict(usage)


def period_calls(
    calls: Iterable[tuple[datetime, datetime, Decimal]],
    timeline: TenantTimeline,
    catalog: Catalog,
    period_start: datetime,
) -> list[tuple[datetime, int]]:
    """``(ended_at, billable seconds)`` of the calls, given as ``(started_at, ended_at, raw_seconds)``,
    that bill to the period starting at ``period_start``: what an alert's crossing is computed over
    (``rating.alerts.threshold_crossing``)."""
    if not timeline.subscribed:
        return []
    rules = _PeriodRules(timeline, catalog)
    found = []
    for started_at, ended_at, raw in calls:
        rated = rules.rate(started_at, raw)
        if rated is not None and rated[0].start == period_start:
            found.append((ended_at, rated[1]))
    return found
