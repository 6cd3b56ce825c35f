"""Pre-call authorization: may a tenant's next call connect, and for how long at most.

Pure: the worker passes the tenant's timeline (None when it has never seen the tenant), the billable
seconds already used in the period containing ``now`` and the time. The rule follows the spec:

- A call needs a subscription covering ``now``. Before the first period there is none
  (``no_subscription``); from the instant of a SUBSCRIPTION_CANCELLED on, service has stopped
  (``cancelled``), even for the rest of the period that is still invoiced: that period's rating of late
  call records is not a licence to connect new calls.
- Block plans (spec §5, §8) refuse once the included seconds are used up (``allowance_used_up``);
  before that ``max_call_seconds`` is what is left of them. A call bills to the period it started in,
  so a call started just before a period ends gets only the old period's remainder.
- Charge plans never refuse and are unbounded (``max_call_seconds`` None). ``overage_cap`` is "the most
  that overage may cost in one period" (spec §3, §5): it caps the price, never the service, so a capped
  charging plan stays unbounded too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from rating.catalog import Catalog
from rating.periods import Period, require_utc
from rating.subscription import TenantTimeline


class Refusal(StrEnum):
    NO_SUBSCRIPTION = "no_subscription"
    CANCELLED = "cancelled"
    ALLOWANCE_USED_UP = "allowance_used_up"


@dataclass(frozen=True, slots=True)
class Service:
    """Which plan serves a tenant at an instant, or why none does."""

    period: Period | None
    plan_id: str | None
    refusal: Refusal | None


def service_at(timeline: TenantTimeline | None, now: datetime) -> Service:
    """The plan in force at ``now``: the plan of the period containing it, unless no subscription has
    started by then or the one that had was cancelled at or before ``now``."""
    now = require_utc(now, "now")
    if timeline is None or not timeline.subscribed:
        return Service(None, None, Refusal.NO_SUBSCRIPTION)
    period = timeline.period_at(now)
    if timeline.cancelled_as_of(now) is not None:
        return Service(period, None, Refusal.CANCELLED)
    plan_id = timeline.plan_for_period(period)
    if plan_id is None:
        # Not covered and not cancelled: ``now`` is before the first period.
        return Service(period, None, Refusal.NO_SUBSCRIPTION)
    return Service(period, plan_id, None)


@dataclass(frozen=True, slots=True)
class Authorization:
    tenant_id: str
    allowed: bool
    # None = unbounded (a charging plan); 0 when refused.
    max_call_seconds: int | None
    reason: Refusal | None
    plan_id: str | None
    overage_mode: str | None
    period: Period | None

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "allowed": self.allowed,
            "max_call_seconds": self.max_call_seconds,
            "reason": None if self.reason is None else str(self.reason),
            "plan_id": self.plan_id,
            "overage_mode": self.overage_mode,
            "period_start": None if self.period is None else self.period.start.date().isoformat(),
        }


def authorize(
    tenant_id: str,
    timeline: TenantTimeline | None,
    catalog: Catalog,
    used_seconds: int,
    now: datetime,
) -> Authorization:
    """The answer for a call starting at ``now``; ``used_seconds`` are the billable seconds already
    rated in the period containing ``now``. Raises ``UnknownPlanError`` when the catalog lacks the
    period's plan: callmeter cannot decide, and must not pretend to."""
    service = service_at(timeline, now)
    if service.plan_id is None or service.period is None:
        return Authorization(tenant_id, False, 0, service.refusal, None, None, service.period)
    plan = catalog.plan_for(service.plan_id, service.period.start)
    if plan.overage == "charge":
        return Authorization(tenant_id, True, None, None, service.plan_id, plan.overage, service.period)
    remaining = max(plan.included_seconds - used_seconds, 0)
    return Authorization(
        tenant_id,
        remaining > 0,
        remaining,
        None if remaining > 0 else Refusal.ALLOWANCE_USED_UP,
        service.plan_id,
        plan.overage,
        service.period,
    )
