"""The one request path of ``/balances``, ``/authorize`` and ``/quota``, whoever holds the state.

The stream worker answers from its live RocksDB state (pipeline/tenantapi/worker_port.py), the tenant
API from its view of the committed changelogs (pipeline/tenantapi/view.py). Both hand ``respond`` a
``TenantState``; rating/ decides, and this maps its results to an HTTP status and body, so the two
servers can never disagree on a rule, a status code or a metric.

A period the live window has closed (pipeline/stream/window.py) has no live number any more: its
usage is the ledger's, and is asked of the ledger (``LedgerLookup``, ledger_usage.py); the answer then
says ``"source": "ledger"``. Without a ledger to ask the answer is 410, naming where to look; with one
that does not answer, 503 (docs/decisions.md, "Live balances equal the ledger").
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
# The ledger's billable seconds of a tenant's closed period (ledger_usage.py); raises on failure.
LedgerLookup = Callable[[str, TenantTimeline, Period], int]


class TenantState(Protocol):
    def not_serving(self, tenant_id: str) -> str | None:
        """Why this state cannot answer for the tenant yet (503), or None."""

    def timeline(self, tenant_id: str) -> TenantTimeline | None: ...

    def used_seconds(self, tenant_id: str, period: Period) -> int | None:
        """Billable seconds of the tenant's period so far; None when the live window has closed it."""


class _Closed(Exception):
    def __init__(self, period: Period) -> None:
        self.period = period


class _LedgerDown(Exception):
    pass


class _Source:
    """Where an answer's usage came from: the live state, or the ledger for a closed period."""

    def __init__(self, state: TenantState, ledger: LedgerLookup | None) -> None:
        self.state = state
        self.ledger = ledger
        self.from_ledger = False

    def used(self, tenant_id: str, timeline: TenantTimeline, period: Period) -> int:
        used = self.state.used_seconds(tenant_id, period)
        if used is not None:
            return used
        if self.ledger is None:
            raise _Closed(period)
        try:
            used = self.ledger(tenant_id, timeline, period)
        except Exception as exc:  # any failure to ask: the gateway's unreachable policy applies
            raise _LedgerDown(str(exc)) from exc
        self.from_ledger = True
        return used


def parse_at(text: str | None) -> datetime | None:
    """The ``?at=`` instant (RFC 3339 with an offset), or None for "now"; ValueError when unusable."""
    if not text:
        return None
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        msg = "at must carry a UTC offset"
        raise ValueError(msg)
    return parsed.astimezone(UTC)


def balance_answer(tenant_id: str, source: _Source, catalog: Catalog, at: datetime | None) -> Answer:
    timeline = source.state.timeline(tenant_id)
    if timeline is None:
        return 404, {"error": "unknown tenant", "tenant_id": tenant_id}
    now = at or datetime.now(UTC)
    if not timeline.subscribed:
        return 404, {"error": "tenant has no subscription", "tenant_id": tenant_id}
    period = timeline.period_at(now)
    result = balance(timeline, catalog, source.used(tenant_id, timeline, period), now, period)
    if result is None:
        return 404, {"error": "no plan covers the current period", "tenant_id": tenant_id}
    return 200, result.to_json_dict()


def authorize_answer(tenant_id: str, source: _Source, catalog: Catalog, at: datetime | None) -> Answer:
    now = at or datetime.now(UTC)
    timeline = source.state.timeline(tenant_id)
    used = 0
    if timeline is not None and timeline.subscribed:
        used = source.used(tenant_id, timeline, timeline.period_at(now))
    try:
        return 200, authorize(tenant_id, timeline, catalog, used, now).to_json_dict()
    except CatalogError as exc:
        # callmeter cannot decide; the gateway's own unreachable policy applies (README).
        return 503, {"error": str(exc), "tenant_id": tenant_id}


def quota_answer(tenant_id: str, source: _Source, catalog: Catalog, at: datetime | None) -> Answer:
    try:
        body = quota(tenant_id, source.state.timeline(tenant_id), catalog, at or datetime.now(UTC))
    except CatalogError as exc:
        return 503, {"error": str(exc), "tenant_id": tenant_id}
    return 200, body.to_json_dict()


AnswerFor = Callable[[str, _Source, Catalog, datetime | None], Answer]
ANSWERS: dict[str, AnswerFor] = {
    "balances": balance_answer,
    "authorize": authorize_answer,
    "quota": quota_answer,
}


def respond(
    endpoint: str,
    tenant_id: str,
    at_text: str | None,
    state: TenantState,
    catalog: Catalog,
    ledger: LedgerLookup | None = None,
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
    source = _Source(state, ledger)
    try:
        status, body = ANSWERS[endpoint](tenant_id, source, catalog, at)
        if source.from_ledger:
            body["source"] = "ledger"
    except _LedgerDown as down:
        status, body = 503, {"error": f"the period is closed and the ledger did not answer: {down}"}
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
