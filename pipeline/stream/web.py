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
from datetime import datetime
from typing import TYPE_CHECKING, Any

from faust.exceptions import SameNode
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pipeline import metrics
from pipeline.tenantapi.answers import ANSWERS, Answer, parse_at
from rating.subscription import TenantTimeline

if TYPE_CHECKING:
    from pipeline.stream.parts import MeterParts


def _timeline(meter: MeterParts, tenant_id: str) -> TenantTimeline | None:
    # The agent's parsed timelines are current for every tenant of this worker's partitions (it
    # updates them with the table); parsing the stored JSON is the fallback for one it has not needed.
    cached = meter._timelines.get(tenant_id)
    if cached is not None:
        return cached
    stored = meter.read_owned(meter.tenants, tenant_id)
    return TenantTimeline.from_dict(stored) if stored else None


def local_answer(meter: MeterParts, endpoint: str, tenant_id: str, at: datetime | None) -> Answer:
    """The endpoint's answer from this worker's live state (pipeline/tenantapi/answers.py decides)."""

    def used(period_start: datetime) -> int:
        key = meter.balance_key(tenant_id, period_start)
        return int(meter.read_owned(meter.balances, key, tenant_id) or 0)

    return ANSWERS[endpoint](tenant_id, _timeline(meter, tenant_id), used, meter.catalog, at)


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

    async def answer(web: Any, request: Any, tenant_id: str, endpoint: str) -> Any:
        """Forward to the owner, or answer from local state once it is recovered (``not_serving``)."""
        count, observe = metrics.endpoint_meters(endpoint)
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
            at = parse_at(request.query.get("at"))
        except ValueError as exc:
            count("400")
            return web.json({"error": f"bad at: {exc}"}, status=400)
        reason = not_serving(meter, tenant_id)
        if reason is not None:
            count("503")
            return web.json({"error": reason, "tenant_id": tenant_id}, status=503)
        status, result = local_answer(meter, endpoint, tenant_id, at)
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
        return await answer(web, request, tenant_id, "balances")

    @app.page("/authorize/{tenant_id}")
    async def authorize_page(web: Any, request: Any, tenant_id: str) -> Any:
        return await answer(web, request, tenant_id, "authorize")

    @app.page("/quota/{tenant_id}")
    async def quota_page(web: Any, request: Any, tenant_id: str) -> Any:
        return await answer(web, request, tenant_id, "quota")
