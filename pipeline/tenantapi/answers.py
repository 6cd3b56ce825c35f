"""The answers of ``/balances``, ``/authorize`` and ``/quota``, whoever holds the state.

The stream worker answers from its live RocksDB state (pipeline/stream/web.py), the tenant API from
its view of the committed changelogs (pipeline/tenantapi/view.py); both hand a tenant's timeline and a
lookup of its period balances to these functions, so the two can never disagree on a rule. rating/
decides; this only maps its results (and a catalog that cannot decide) to an HTTP status and body.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from rating.authorize import authorize
from rating.balance import balance
from rating.catalog import Catalog
from rating.errors import CatalogError
from rating.quota import quota
from rating.subscription import TenantTimeline

# Billable seconds already rated in the tenant's period starting at the given instant.
UsedSeconds = Callable[[datetime], int]
Answer = tuple[int, dict[str, Any]]


def parse_at(text: str | None) -> datetime | None:
    """The ``?at=`` instant (RFC 3339 with an offset), or None for "now"; ValueError when unusable."""
    if not text:
        return None
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        msg = "at must carry a UTC offset"
        raise ValueError(msg)
    return parsed.astimezone(UTC)


def balance_answer(
    tenant_id: str, timeline: TenantTimeline | None, used: UsedSeconds, catalog: Catalog, at: datetime | None
) -> Answer:
    if timeline is None:
        return 404, {"error": "unknown tenant", "tenant_id": tenant_id}
    now = at or datetime.now(UTC)
    if not timeline.subscribed:
        return 404, {"error": "tenant has no subscription", "tenant_id": tenant_id}
    period = timeline.period_at(now)
    result = balance(timeline, catalog, used(period.start), now, period)
    if result is None:
        return 404, {"error": "no plan covers the current period", "tenant_id": tenant_id}
    return 200, result.to_json_dict()


def authorize_answer(
    tenant_id: str, timeline: TenantTimeline | None, used: UsedSeconds, catalog: Catalog, at: datetime | None
) -> Answer:
    now = at or datetime.now(UTC)
    used_seconds = used(timeline.period_at(now).start) if timeline is not None and timeline.subscribed else 0
    try:
        return 200, authorize(tenant_id, timeline, catalog, used_seconds, now).to_json_dict()
    except CatalogError as exc:
        # callmeter cannot decide; the gateway's own unreachable policy applies (README).
        return 503, {"error": str(exc), "tenant_id": tenant_id}


def quota_answer(
    tenant_id: str, timeline: TenantTimeline | None, _used: UsedSeconds, catalog: Catalog, at: datetime | None
) -> Answer:
    try:
        body = quota(tenant_id, timeline, catalog, at or datetime.now(UTC))
    except CatalogError as exc:
        return 503, {"error": str(exc), "tenant_id": tenant_id}
    return 200, body.to_json_dict()


AnswerFor = Callable[[str, TenantTimeline | None, UsedSeconds, Catalog, datetime | None], Answer]
ANSWERS: dict[str, AnswerFor] = {
    "balances": balance_answer,
    "authorize": authorize_answer,
    "quota": quota_answer,
}


def balance_key(tenant_id: str, period_start: datetime) -> str:
    """The ``balances`` table's key of a tenant's period (the worker writes it, the view reads it)."""
    return f"{tenant_id}|{period_start.isoformat()}"
