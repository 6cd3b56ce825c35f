"""The worker's HTTP endpoints (Faust's web server): balances, metrics and a status summary.

``GET /balances/{tenant_id}[?at=RFC3339]`` is answered by the worker that owns the tenant's partition:
the request is forwarded there (Faust's router and the partition assignor's host map), so with several
workers any of them answers from live state, never from a stale or empty replica. The owner is found
by hashing the raw tenant bytes with the producers' partitioner (murmur2), because that, not the
JSON-encoded table key, decides which partition holds a tenant's state.

``GET /authorize/{tenant_id}`` (pre-call authorization) and ``GET /quota/{tenant_id}`` (quota before
creating an employee or a number) are routed the same way and answered from the same local state: the
tenant's timeline and its period balance in RocksDB, with ``rating.authorize`` / ``rating.quota`` deciding.
Nothing on their path waits for Kafka: a gateway asks once per call.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from faust.exceptions import SameNode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline import metrics
from rating.authorize import authorize
from rating.balance import balance
from rating.errors import CatalogError
from rating.quota import quota
from rating.subscription import TenantTimeline

if TYPE_CHECKING:
    from pipeline.stream.parts import MeterParts


def _parse_at(text: str | None) -> datetime | None:
    if not text:
        return None
    parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        msg = "at must carry a UTC offset"
        raise ValueError(msg)
    return parsed.astimezone(UTC)


def balance_body(meter: MeterParts, tenant_id: str, at: datetime | None) -> tuple[int, dict[str, Any]]:
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


def _timeline(meter: MeterParts, tenant_id: str) -> TenantTimeline | None:
    # The agent's parsed timelines are current for every tenant of this worker's partitions (it
    # updates them with the table); parsing the stored JSON is the fallback for one it has not needed.
    cached = meter._timelines.get(tenant_id)
    if cached is not None:
        return cached
    stored = meter.read_owned(meter.tenants, tenant_id)
    return TenantTimeline.from_dict(stored) if stored else None


def authorize_body(meter: MeterParts, tenant_id: str, at: datetime | None) -> tuple[int, dict[str, Any]]:
    timeline = _timeline(meter, tenant_id)
    now = at or datetime.now(UTC)
    used = 0
    if timeline is not None and timeline.subscribed:
        key = meter.balance_key(tenant_id, timeline.period_at(now).start)
        used = int(meter.read_owned(meter.balances, key, tenant_id) or 0)
    try:
        return 200, authorize(tenant_id, timeline, meter.catalog, used, now).to_json_dict()
    except CatalogError as exc:
        # callmeter cannot decide; the gateway's own unreachable policy applies (README).
        return 503, {"error": str(exc), "tenant_id": tenant_id}


def quota_body(meter: MeterParts, tenant_id: str, at: datetime | None) -> tuple[int, dict[str, Any]]:
    try:
        body = quota(tenant_id, _timeline(meter, tenant_id), meter.catalog, at or datetime.now(UTC))
    except CatalogError as exc:
        return 503, {"error": str(exc), "tenant_id": tenant_id}
    return 200, body.to_json_dict()


def not_serving(meter: MeterParts, tenant_id: str) -> str | None:
    """Why this worker cannot answer for the tenant from its local state yet, or None when it can.

    A tenant's state is only as good as the changelog recovery behind it: while the worker starts (its
    RocksDB may have been wiped after an unclean stop), rebalances or recovers, an empty or stale store
    would answer "no subscription" or an old balance as if it were a decision. Such a request gets 503,
    which a gateway treats as "callmeter unreachable" (README), never a confident wrong answer."""
    app = meter.app
    if not meter.ready.is_set():
        return "worker starting: state not recovered yet"
    if app.rebalancing or getattr(app, "in_recovery", False):
        return "worker rebalancing: state being recovered"
    partition = meter.partition_of(tenant_id)
    actives = app.assignor.assigned_actives()
    if not any(tp.topic == meter.topics.calls and tp.partition == partition for tp in actives):
        return f"partition {partition} is not assigned to this worker"
    return None


def _meters(endpoint: str) -> tuple[Callable[[str], None], Callable[[float], None]]:
    """Request counter and latency histogram of an endpoint (balances keep their own metric names)."""
    if endpoint == "balances":
        return (
            lambda status: metrics.BALANCE_REQUESTS.labels(status=status).inc()
        ), metrics.BALANCE_SECONDS.observe
    return (
        lambda status: metrics.TENANT_API_REQUESTS.labels(endpoint=endpoint, status=status).inc(),
        metrics.TENANT_API_SECONDS.labels(endpoint=endpoint).observe,
    )


def install(meter: MeterParts) -> None:
    app = meter.app

    async def forwarded(web: Any, request: Any, tenant_id: str) -> Any:
        """The owner's response when another worker owns the tenant's partition, else None."""
        changelog = meter.tenants.changelog_topic.get_topic_name()
        owner = app.assignor.key_store(changelog, tenant_id.encode())
        try:
            return await app.router._route_req(owner, web, request)  # type: ignore[attr-defined]
        except SameNode:
            return None

    async def answer(web: Any, request: Any, tenant_id: str, endpoint: str, body: Any) -> Any:
        """Forward to the owner, or answer from local state once it is recovered (``not_serving``)."""
        count, observe = _meters(endpoint)
        try:
            routed = await forwarded(web, request, tenant_id)
        except KeyError:
            # Before the first assignment the assignor knows no owner for any partition: the same
            # answer as "starting", not a 500 with a traceback per request.
            count("503")
            return web.json(
                {"error": "worker starting: no partition assigned yet", "tenant_id": tenant_id}, status=503
            )
        if routed is not None:
            return routed
        started = time.perf_counter()
        try:
            at = _parse_at(request.query.get("at"))
        except ValueError as exc:
            count("400")
            return web.json({"error": f"bad at: {exc}"}, status=400)
        reason = not_serving(meter, tenant_id)
        if reason is not None:
            count("503")
            return web.json({"error": reason, "tenant_id": tenant_id}, status=503)
        status, result = body(meter, tenant_id, at)
        count(str(status))
        observe(time.perf_counter() - started)
        return web.json(result, status=status)

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(metrics.REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/status")
    async def status_page(web: Any, request: Any) -> Any:
        return web.json(meter.status())

    @app.page("/balances/{tenant_id}")
    async def balance_page(web: Any, request: Any, tenant_id: str) -> Any:
        return await answer(web, request, tenant_id, "balances", balance_body)

    @app.page("/authorize/{tenant_id}")
    async def authorize_page(web: Any, request: Any, tenant_id: str) -> Any:
        return await answer(web, request, tenant_id, "authorize", authorize_body)

    @app.page("/quota/{tenant_id}")
    async def quota_page(web: Any, request: Any, tenant_id: str) -> Any:
        return await answer(web, request, tenant_id, "quota", quota_body)
