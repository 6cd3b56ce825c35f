"""Quota checks before creating an AI employee or a phone number: "3 of 5 employees active".

Pure counting over the tenant's timeline. The limits are those of the plan in force at ``now``
(``service_at``: the plan of the period containing it; a PLAN_CHANGED takes effect at the next period,
so a downgrade's lower limits apply from then on, exactly as the QUOTA_EXCEEDED alert judges them).
Active means active at the instant ``now`` (an interval ``[activated, deactivated)``), the same count the
alert uses; every number counts against ``numbers.max`` whatever its type. Without a plan in force (no
subscription, cancelled) there is no limit to compare with and nothing more may be created.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rating.authorize import Refusal, service_at
from rating.catalog import Catalog
from rating.subscription import TenantTimeline


@dataclass(frozen=True, slots=True)
class QuotaUse:
    resource: str  # "employees" or "numbers"
    active: int
    limit: int | None

    @property
    def one_more_allowed(self) -> bool:
        return self.limit is not None and self.active + 1 <= self.limit

    @property
    def summary(self) -> str:
        if self.limit is None:
            return f"{self.active} {_noun(self.resource, self.active)} active, no plan in force"
        return f"{self.active} of {self.limit} {_noun(self.resource, self.limit)} active"

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "limit": self.limit,
            "one_more_allowed": self.one_more_allowed,
            "summary": self.summary,
        }


def _noun(resource: str, count: int) -> str:
    return resource if count != 1 else resource.removesuffix("s")


@dataclass(frozen=True, slots=True)
class Quota:
    tenant_id: str
    plan_id: str | None
    reason: Refusal | None
    employees: QuotaUse
    numbers: QuotaUse

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "tenant_id": self.tenant_id,
            "plan_id": self.plan_id,
            "reason": None if self.reason is None else str(self.reason),
            "employees": self.employees.to_json_dict(),
            "numbers": self.numbers.to_json_dict(),
        }


def quota(tenant_id: str, timeline: TenantTimeline | None, catalog: Catalog, now: datetime) -> Quota:
    """Active employees and numbers at ``now`` against the limits of the plan in force. Raises
    ``UnknownPlanError`` when the catalog lacks that plan."""
    service = service_at(timeline, now)
    employees = len(timeline.active_employees_at(now)) if timeline is not None else 0
    numbers = len(timeline.active_numbers_at(now)) if timeline is not None else 0
    if service.plan_id is None or service.period is None:
        return Quota(
            tenant_id,
            None,
            service.refusal,
            QuotaUse("employees", employees, None),
            QuotaUse("numbers", numbers, None),
        )
    plan = catalog.plan_for(service.plan_id, service.period.start)
    return Quota(
        tenant_id,
        service.plan_id,
        None,
        QuotaUse("employees", employees, plan.employees.max_active),
        QuotaUse("numbers", numbers, plan.numbers.max),
    )
