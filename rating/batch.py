"""The reference batch computation: events in, invoices out, with no streaming state at all.

Property tests compare the pipeline against it, and the real invoice job shares its last step
(``invoices_from_usage``), so the two can only differ in how they gather usage, never in pricing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from datetime import date
from typing import TypeVar

from rating.calls import RatedCall, rate_call
from rating.catalog import Catalog
from rating.invoice import Invoice, build_invoice
from rating.models import CallEvent, ProvisioningEvent
from rating.subscription import TenantTimeline

E = TypeVar("E", CallEvent, ProvisioningEvent)


def dedupe(events: Iterable[E]) -> list[E]:
    """Keep the first event seen per (kind, tenant_id, event_id), in arrival order (spec §2)."""
    seen: set[tuple[str, str, str]] = set()
    kept: list[E] = []
    for event in events:
        key = (type(event).__name__, event.tenant_id, event.event_id)
        if key not in seen:
            seen.add(key)
            kept.append(event)
    return kept


def timelines_from(provisioning: Iterable[ProvisioningEvent]) -> dict[str, TenantTimeline]:
    by_tenant: dict[str, list[ProvisioningEvent]] = defaultdict(list)
    for event in dedupe(provisioning):
        by_tenant[event.tenant_id].append(event)
    return {tenant: TenantTimeline.from_events(tenant, events) for tenant, events in by_tenant.items()}


def usage_from(
    calls: Iterable[CallEvent], timelines: Mapping[str, TenantTimeline], catalog: Catalog
) -> dict[tuple[str, date], int]:
    """Billable seconds per (tenant, period start date); calls that cannot be rated count for nothing."""
    usage: dict[tuple[str, date], int] = defaultdict(int)
    for call in dedupe(calls):
        timeline = timelines.get(call.tenant_id)
        if timeline is None:
            continue
        rated = rate_call(call, timeline, catalog)
        if isinstance(rated, RatedCall):
            usage[(call.tenant_id, rated.period.start_date)] += rated.billable_seconds
    return dict(usage)


def invoices_from_usage(
    timelines: Mapping[str, TenantTimeline],
    usage_seconds: Mapping[tuple[str, date], int],
    catalog: Catalog,
    year: int,
    month: int,
) -> list[Invoice]:
    """One invoice per tenant whose invoiced period starts in the month, sorted by invoice_id."""
    invoices = []
    for tenant_id, timeline in timelines.items():
        period = timeline.invoiced_period_in_month(year, month)
        if period is None:
            continue
        invoices.append(
            build_invoice(
                tenant_id=tenant_id,
                period=period,
                timeline=timeline,
                catalog=catalog,
                billable_seconds_total=usage_seconds.get((tenant_id, period.start_date), 0),
            )
        )
    return sorted(invoices, key=lambda invoice: invoice.invoice_id)


def invoices_for_month(
    calls: Iterable[CallEvent],
    provisioning: Iterable[ProvisioningEvent],
    catalog: Catalog,
    year: int,
    month: int,
) -> list[Invoice]:
    timelines = timelines_from(provisioning)
    return invoices_from_usage(timelines, usage_from(calls, timelines, catalog), catalog, year, month)
