"""The worker's HTTP endpoints (Faust's web server): balances, metrics and a status summary.

``GET /balances/{tenant_id}[?at=RFC3339]`` is answered by the worker that owns the tenant's partition:
the request is forwarded there (Faust's router and the partition assignor's host map), so with several
workers any of them answers from live state, never from a stale or empty replica. The owner is found
by hashing the raw tenant bytes with the producers' partitioner (murmur2), because that, not the
JSON-encoded table key, decides which partition holds a tenant's state.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from faust.exceptions import SameNode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline import metrics
from rating.balance import balance
from rating.subscription import TenantTimeline

if TYPE_CHECKING:
    from pipeline.worker import Meter


def _parse_at(text: str | None) -> datetime | None:
    if not text:
        return None
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        msg = "at must carry a UTC offset"
        raise ValueError(msg)
    return parsed.astimezone(UTC)


def balance_body(meter: Meter, tenant_id: str, at: datetime | None) -> tuple[int, dict[str, Any]]:
    stored = meter.read_owned(meter.tenants, tenant_id)
    if not stored:
        return 404, {"error": "unknown tenant", "tenant_id": tenant_id}
    timeline = TenantTimeline.from_dict(stored)
    now = at or datetime.now(UTC)
    if not timeline.subscribed:
        return 404, {"error": "tenant has no subscription", "tenant_id": tenant_id}
    period = timeline.period_at(now)
    used = int(meter.read_owned(meter.balances, meter.balance_key(tenant_id, period.start), tenant_id) or 0)
    result = balance(timeline, meter.catalog, used, now, period)
    if result is None:
        return 404, {"error": "no plan covers the current period", "tenant_id": tenant_id}
    return 200, result.to_json_dict()


def install(meter: Meter) -> None:
    app = meter.app

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(metrics.REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/status")
    async def status_page(web: Any, request: Any) -> Any:
        return web.json(meter.status())

    @app.page("/balances/{tenant_id}")
    async def balance_page(web: Any, request: Any, tenant_id: str) -> Any:
        changelog = meter.tenants.changelog_topic.get_topic_name()
        owner = app.assignor.key_store(changelog, tenant_id.encode())
        try:
            return await app.router._route_req(owner, web, request)  # type: ignore[attr-defined]
        except SameNode:
            pass
        started = time.perf_counter()
        try:
            at = _parse_at(request.query.get("at"))
        except ValueError as exc:
            metrics.BALANCE_REQUESTS.labels(status="400").inc()
            return web.json({"error": f"bad at: {exc}"}, status=400)
        status, body = balance_body(meter, tenant_id, at)
        metrics.BALANCE_REQUESTS.labels(status=str(status)).inc()
        metrics.BALANCE_SECONDS.observe(time.perf_counter() - started)
        return web.json(body, status=status)
