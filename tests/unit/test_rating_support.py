"""Builders shared by the rating tests (no tests here): terse events and a small catalog."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

from rating.catalog import Catalog, parse_catalog
from rating.models import CallEvent, ProvisioningEvent

_ids = itertools.count(1)

CATALOG_YAML = """
revision: 3
currency: USD
tax_regions: {US-NY: "0.08875", GB: "0.20", NONE: "0", HALF: "0.5"}
price_books:
  - id: "2026-01"
    effective_from: "2026-01-01T00:00:00Z"
    plans:
      starter:
        base_fee: "49.00"
        included_seconds: 1000
        overage: charge
        overage_tiers:
          - {up_to: 100, rate: "0.0200"}
          - {up_to: 300, rate: "0.0150"}
          - {up_to: null, rate: "0.0100"}
        overage_cap: null
        rounding: {minimum_seconds: 0, increment_seconds: 1}
        numbers: {included_local: 1, local_fee: "2.00", toll_free_fee: "5.00", max: 3}
        employees: {max_active: 5}
      capped:
        base_fee: "10.00"
        included_seconds: 0
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
        numbers: {included_local: 2, local_fee: "2.00", toll_free_fee: "5.00", max: 1}
        employees: {max_active: 2}
  - id: "2026-12"
    effective_from: "2026-12-01T00:00:00Z"
    plans:
      starter:
        base_fee: "59.00"
        included_seconds: 1000
        overage: charge
        overage_tiers:
          - {up_to: null, rate: "0.0300"}
        overage_cap: null
        rounding: {minimum_seconds: 0, increment_seconds: 1}
        numbers: {included_local: 1, local_fee: "3.00", toll_free_fee: "6.00", max: 3}
        employees: {max_active: 5}
"""


def catalog() -> Catalog:
    return parse_catalog(CATALOG_YAML)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, ms: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, ms * 1000, tzinfo=UTC)


def prov(
    action: str, at: datetime, tenant: str = "t1", event_id: str | None = None, **fields: str | None
) -> ProvisioningEvent:
    return ProvisioningEvent(
        event_id=event_id or f"p{next(_ids)}", tenant_id=tenant, occurred_at=at, action=action, **fields
    )


def start(at: datetime, plan: str = "starter", region: str = "NONE", tenant: str = "t1") -> ProvisioningEvent:
    return prov("SUBSCRIPTION_STARTED", at, tenant, plan_id=plan, tax_region=region)


def number(at: datetime, num: str, kind: str = "LOCAL", tenant: str = "t1") -> ProvisioningEvent:
    return prov("NUMBER_PROVISIONED", at, tenant, number=num, number_type=kind)


def release(at: datetime, num: str, tenant: str = "t1") -> ProvisioningEvent:
    return prov("NUMBER_RELEASED", at, tenant, number=num)


def employee(at: datetime, emp: str, on: bool = True, tenant: str = "t1") -> ProvisioningEvent:
    return prov("EMPLOYEE_ACTIVATED" if on else "EMPLOYEE_DEACTIVATED", at, tenant, employee_id=emp)


def call(
    started: datetime,
    answered: datetime | None,
    ended: datetime,
    disposition: str = "ANSWERED",
    tenant: str = "t1",
    event_id: str | None = None,
) -> CallEvent:
    return CallEvent(
        event_id=event_id or f"c{next(_ids)}",
        tenant_id=tenant,
        call_id="call",
        employee_id=None,
        direction="INBOUND",
        from_number="+15550000001",
        to_number="+15551110001",
        started_at=started,
        answered_at=answered,
        ended_at=ended,
        disposition=disposition,
        gateway_id="gw-1",
    )
