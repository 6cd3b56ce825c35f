"""The tenant endpoints on each stream worker's own port (Faust's web server), from its live state.

``GET /balances/{tenant}[?at=RFC3339]``, ``/authorize/{tenant}`` and ``/quota/{tenant}`` are answered by
the worker that owns the tenant's partition: a request is forwarded there (Faust's router and the
partition assignor's host map), so with several workers any of them answers from live state, never
from a stale or empty replica. The owner is found by the producers' partitioner (murmur2 of the
tenant bytes), which is what decides where a tenant's state lives. The answer itself is the shared
request path (answers.py ``respond``) over ``LiveState``. Nothing on the path waits for Kafka.
"""

from __future__ import annotations

from typing import Any

from faust.exceptions import SameNode

from pipeline import metrics
from pipeline.stream.app import StreamApp
from pipeline.tenantapi.answers import ANSWERS, respond
from pipeline.tenantapi.ledger_usage import LedgerUsage
from rating.periods import Period
from rating.subscription import TenantTimeline


class LiveState:
    """A ``TenantState`` over one worker's parts (its live RocksDB state)."""

    def __init__(self, stream: StreamApp) -> None:
        self.stream = stream

    def timeline(self, tenant_id: str) -> TenantTimeline | None:
        return self.stream.parts.tenants.get(self.stream.partition_of(tenant_id), tenant_id)

    def used_seconds(self, tenant_id: str, period: Period) -> int | None:
        partition, parts = self.stream.partition_of(tenant_id), self.stream.parts
        if not parts.window.is_live(partition, period.end):
            return None
        return parts.book.used(partition, tenant_id, period.start)

    def not_serving(self, tenant_id: str) -> str | None:
        """A tenant's state is only as good as the changelog recovery behind it: while the worker starts
        (its RocksDB may have been wiped after an unclean stop), rebalances or recovers, an empty or
        stale store would answer "no subscription" or an old balance as if it were a decision. Such a
        request gets 503, which a gateway treats as "callmeter unreachable" (README)."""
        stream = self.stream
        app = stream.app
        if not stream.ready.is_set():
            return "worker starting: state not recovered yet"
        if app.rebalancing or getattr(app, "in_recovery", False):
            return "worker rebalancing: state being recovered"
        partition = stream.partition_of(tenant_id)
        actives = app.assignor.assigned_actives()
        if not any(tp.topic == stream.topics.calls and tp.partition == partition for tp in actives):
            return f"partition {partition} is not assigned to this worker"
        return None


def install(stream: StreamApp) -> None:
    app, state = stream.app, LiveState(stream)
    settings = stream.settings
    # Closed periods are the ledger's: a blocking read-only query of a few ms on this loop, asked only
    # for a period no gateway authorizes against (docs/decisions.md, "Live balances equal the ledger").
    ledger = LedgerUsage(settings.clickhouse_dsn, settings.clickhouse_secret, stream.catalog)

    async def answer(web: Any, request: Any, tenant_id: str, endpoint: str) -> Any:
        """Forward to the owner, or answer from local state once it is recovered (``not_serving``)."""
        owner = app.assignor.key_store(stream.changelog_of("tenants"), tenant_id.encode())
        try:
            return await app.router._route_req(owner, web, request)  # type: ignore[attr-defined]
        except SameNode:
            pass
        except KeyError:
            # Before the first assignment the assignor knows no owner for any partition: the same
            # answer as "starting", not a 500 with a traceback per request.
            metrics.endpoint_meters(endpoint)[0]("503")
            return web.json(
                {"error": "worker starting: no partition assigned yet", "tenant_id": tenant_id}, status=503
            )
        status, body = respond(endpoint, tenant_id, request.query.get("at"), state, stream.catalog, ledger)
        return web.json(body, status=status)

    for endpoint in ANSWERS:

        async def page(web: Any, request: Any, tenant_id: str, endpoint: str = endpoint) -> Any:
            return await answer(web, request, tenant_id, endpoint)

        app.page(f"/{endpoint}/{{tenant_id}}", name=f"tenant-{endpoint}")(page)
