"""The one request path of ``/balances``, ``/authorize`` and ``/quota``, whoever holds the state.

The stream worker answers from its live RocksDB state (pipeline/tenantapi/worker_port.py), the tenant
API from its view of the committed changelogs (pipeline/tenantapi/view.py). Both hand ``respond`` a
``TenantState``; rating/ decides, and this maps its results to an HTTP status and body, so the two
servers can never disagree on a rule, a status code or a metric.

A period the live window has closed (pipeline/stream/window.py) has no live number any more: its
balance is the ledger's, and asking for it here gets 410 with where to look instead
(docs/decisions.md, "Live balances equal the ledger").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from pipeline import metrics
from rating.authorize import authorize
from rating.balance import balance
from rating.catalog import Catalog
from rating.errors import CatalogError
from rating.periods import Period
from rating.quota import quota
from rating.subscription import TenantTimeline

Answer = tuple[int, dict[str, Any]]


class TenantState(Protocol):
    def not_serving(self, tenant_id: str) -> str | None:
        """Why this state cannot answer for the tenant yet (503), or None."""

    def timeline(self, tenant_id: str) -> TenantTimeline | None: ...

    def used_seconds(self, tenant_id: str, period: Period) -> int | None:
        """Billable seconds of the tenant's period so far; None when the live window has closed it."""


class _Closed(Exception):
    def __init__(self, period: Period) -> None:
        self.period = period


def parse_at(text: str | None) -> datetime | None:
    """The ``?at=`` instant (RFC 3339 with an offset), or None for "now"; ValueError when unusable."""
    if not text:
        return None
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        msg = "at must carry a UTC offset"
        raise ValueError(msg)
    return parsed.astimezone(UTC)


def _used(state: TenantState, tenant_id: str, period: Period) -> int:
    used = state.used_seconds(tenant_id, period)
    if used is None:
        raise _Closed(period)
    return used


def balance_answer(tenant_id: str, state: TenantState, catalog: Catalog, at: datetime | None) -> Answer:
    timeline = state.timeline(tenant_id)
    if timeline is None:
        return 404, {"error": "unknown tenant", "tenant_id": tenant_id}
    now = at or datetime.now(UTC)
    if not timeline.subscribed:
        return 404, {"error": "tenant has no subscription", "tenant_id": tenant_id}
    period = timeline.period_at(now)
    result = balance(timeline, catalog, _used(state, tenant_id, period), now, period)
    if result is None:
        return 404, {"error": "no plan covers the current period", "tenant_id": tenant_id}
    return 200, result.to_json_dict()


def authorize_answer(tenant_id: str, state: TenantState, catalog: Catalog, at: datetime | None) -> Answer:
    now = at or datetime.now(UTC)
    timeline = state.timeline(tenant_id)
    subscribed = timeline is not None and timeline.subscribed
    used = _used(state, tenant_id, timeline.period_at(now)) if timeline is not None and subscribed else 0
    try:
        return 200, authorize(tenant_id, timeline, catalog, used, now).to_json_dict()
    except CatalogError as exc:
        # callmeter cannot decide; the gateway's own unreachable policy applies (README).
        return 503, {"error": str(exc), "tenant_id": tenant_id}


def quota_answer(tenant_id: str, state: TenantState, catalog: Catalog, at: datetime | None) -> Answer:
    try:
        body = quota(tenant_id, state.timeline(tenant_id), catalog, at or datetime.now(UTC))
    except CatalogError as exc:
        return 503, {"error": str(exc), "tenant_id": tenant_id}
    return 200, body.to_json_dict()


AnswerFor = Callable[[str, TenantState, Catalog, datetime | None], Answer]
ANSWERS: dict[str, AnswerFor] = {
    "balances": balance_answer,
    "authorize": authorize_answer,
    "quota": quota_answer,
}


def respond(
    endpoint: str, tenant_id: str, at_text: str | None, state: TenantState, catalog: Catalog
) -> Answer:
    """Status and JSON body of ``GET /<endpoint>/<tenant>[?at=...]``, counted and timed."""
    count, observe = metrics.endpoint_meters(endpoint)
    started = time.perf_counter()
    try:
        at = parse_at(at_text)
    except ValueError as exc:
        count("400")
        return 400, {"error": f"bad at: {exc}"}
    reason = state.not_serving(tenant_id)
    if reason is not None:
        count("503")
        return 503, {"error": reason, "tenant_id": tenant_id}
    try:
        status, body = ANSWERS[endpoint](tenant_id, state, catalog, at)
    except _Closed as closed:
        start = closed.period.start.date()
        status, body = (
            410,
            {
                "error": f"the period starting {start} is closed: its usage is the ledger's "
                f"(callmeter usage {tenant_id} --period {start:%Y-%m})",
                "tenant_id": tenant_id,
                "period_start": start.isoformat(),
            },
        )
    count(str(status))
    observe(time.perf_counter() - started)
    return status, body
