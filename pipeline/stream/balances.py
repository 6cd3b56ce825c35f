"""Live balances and alerts: usage thresholds (per tenant), projected overage (issue 12), quota
alerts, and re-rating a tenant's balances when provisioning changes how its calls rate (issue 8). All
of it runs inside the current input partition's transaction, so a balance, its alerts and the event
that caused them commit together."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, cast

from pipeline import metrics
from pipeline.stream.parts import MeterParts
from rating.alerts import crossed_thresholds, projected_overage, thresholds_in_effect
from rating.balance import period_usage, project_exhaustion
from rating.catalog import Plan
from rating.models import ProvisioningEvent
from rating.periods import Period
from rating.subscription import TenantTimeline

# The resource usage and allowance count in usage alerts (quota alerts name employees or numbers).
CALL_SECONDS = "call_seconds"


class Balances(MeterParts):
    def alert_thresholds(self, timeline: TenantTimeline | None, plan: Plan) -> tuple[int, ...]:
        tenant_own = timeline.alert_thresholds_percent if timeline is not None else None
        return thresholds_in_effect(
            tenant_own, plan.alert_thresholds_percent, self.catalog.alert_thresholds_percent
        )

    async def _usage_alerts(
        self,
        tenant: str,
        period: Period,
        plan: Plan,
        timeline: TenantTimeline | None,
        before: int,
        after: int,
        crossed_at: datetime,
    ) -> None:
        """Threshold alerts (the tenant's, its plan's or the catalog's list) crossed by moving from
        ``before`` to ``after``; each threshold once per tenant and period even when a correction
        (issue 8) moves usage down and up again, or the tenant's list changes in the period."""
        included = plan.included_seconds
        for percent in crossed_thresholds(included, before, after, self.alert_thresholds(timeline, plan)):
            marker = f"{tenant}|{period.start.isoformat()}|usage|{percent}"
            if marker in self.alerted:
                continue
            self.alerted[marker] = after
            await self._alert(
                tenant,
                period.start,
                "USAGE_THRESHOLD",
                percent,
                CALL_SECONDS,
                after,
                included,
                f"{tenant} used {after} of {included} included seconds ({percent} % threshold) "
                f"in the period starting {period.start.date()}",
                crossed_at=crossed_at,
                projected=project_exhaustion(period, included, after, crossed_at),
            )

    async def _projected_alert(
        self, tenant: str, period: Period, plan: Plan, used: int, at: datetime
    ) -> None:
        """PROJECTED_OVERAGE, once per tenant and period: the first balance update after which the
        period's rate so far uses the included seconds up before the period ends (rating/alerts.py)."""
        runs_out = projected_overage(period, plan.included_seconds, used, at)
        marker = f"{tenant}|{period.start.isoformat()}|projected"
        if runs_out is None or marker in self.alerted:
            return
        self.alerted[marker] = used
        await self._alert(
            tenant,
            period.start,
            "PROJECTED_OVERAGE",
            None,
            CALL_SECONDS,
            used,
            plan.included_seconds,
            f"{tenant} is projected to use up its {plan.included_seconds} included seconds on {runs_out} "
            f"({used} used by {at.date()}) in the period starting {period.start.date()}",
            subject=CALL_SECONDS,
            crossed_at=at,
            projected=runs_out,
        )

    async def _alert(
        self,
        tenant: str,
        period_start: datetime,
        kind: str,
        threshold: int | None,
        resource: str,
        used: int,
        allowance: int,
        message: str,
        subject: str = "",
        *,
        crossed_at: datetime,
        projected: date | None = None,
    ) -> None:
        """Sent in the current partition's transaction with the state change that caused it, so a
        restart, a rebalance or a duplicate record can never send it twice (spec §8). The id is
        deterministic (tenant, period, kind, threshold or subject) so consumers can dedupe too."""
        suffix = threshold if threshold is not None else subject
        record = {
            "alert_id": f"{tenant}-{period_start.strftime('%Y%m%d')}-{kind}-{suffix}",
            "tenant_id": tenant,
            "kind": kind,
            "period_start": period_start,
            "threshold_percent": threshold,
            "used_seconds": used,
            "included_seconds": allowance,
            "message": message,
            "emitted_at": datetime.now(UTC),
            "crossed_at": crossed_at,
            "resource": resource,
            "usage": used,
            "allowance": allowance,
            "projected_exhaustion_date": projected,
        }
        await self._send(
            self.topics.alerts, tenant.encode(), self.serde.encode("Alert", record, self.topics.alerts)
        )
        metrics.ALERTS_EMITTED.labels(
            kind=kind, threshold=str(threshold) if threshold is not None else ""
        ).inc()

    async def _check_quotas(self, timeline: TenantTimeline, event: ProvisioningEvent) -> None:
        if event.action not in ("NUMBER_PROVISIONED", "EMPLOYEE_ACTIVATED") or not timeline.subscribed:
            return
        period = timeline.period_at(event.occurred_at)
        plan_id = timeline.plan_for_period(period)
        if plan_id is None:
            return
        plan = self.catalog.plan_for(plan_id, period.start)
        if event.action == "NUMBER_PROVISIONED":
            what, active, limit = (
                "numbers",
                len(timeline.active_numbers_at(event.occurred_at)),
                plan.numbers.max,
            )
        else:
            what, active, limit = (
                "employees",
                len(timeline.active_employees_at(event.occurred_at)),
                plan.employees.max_active,
            )
        marker = f"{event.tenant_id}|{period.start.isoformat()}|{what}"
        if active > limit and marker not in self.alerted:
            self.alerted[marker] = active
            await self._alert(
                event.tenant_id,
                period.start,
                "QUOTA_EXCEEDED",
                None,
                what,
                active,
                limit,
                f"{event.tenant_id} has {active} active {what}; plan {plan_id} allows {limit}",
                subject=what,
                crossed_at=event.occurred_at,
            )

    def remembered_calls(self, tenant: str) -> list[tuple[datetime, Decimal]]:
        """(started_at, raw seconds) of the tenant's calls whose keys this worker still holds, read
        from the tenant's partition of ``seen`` (keys ``call|tenant|event``, JSON-encoded)."""
        db = cast(Any, self.seen.data)._db_for_partition(self.partition_of(tenant))
        prefix = json.dumps(f"call|{tenant}|")[:-1].encode()  # without the closing quote
        calls = []
        for raw_key, raw_value in db.items(from_key=prefix):
            if not raw_key.startswith(prefix):
                break
            fact = json.loads(raw_value)
            if isinstance(fact, list) and len(fact) == 3 and isinstance(fact[1], int):
                started = datetime.fromtimestamp(fact[1] / 1000, UTC)
                calls.append((started, Decimal(fact[2]) / 1000))
        return calls

    async def rerate_balances(self, tenant: str, timeline: TenantTimeline, at: datetime) -> None:
        """A provisioning event changed how the tenant's calls rate (plan, cancellation, anchor): set
        every period balance to the re-rated sum, in this event's transaction (issue 8). Parked and
        revivable calls hold keys too, but no subscription covers them, so they count for nothing."""
        usage = period_usage(self.remembered_calls(tenant), timeline, self.catalog)
        prefix = f"{tenant}|"
        db = cast(Any, self.balances.data)._db_for_partition(self.partition_of(tenant))
        known = {
            json.loads(k): json.loads(v)
            for k, v in db.items(from_key=json.dumps(prefix)[:-1].encode())
            if k.startswith(json.dumps(prefix)[:-1].encode())
        }
        starts = {datetime.fromisoformat(key[len(prefix) :]): int(v) for key, v in known.items()}
        for start in set(starts) | set(usage):
            before, after = starts.get(start, 0), usage.get(start, 0)
            if before == after:
                continue
            key = self.balance_key(tenant, start)
            self.balances[key] = after
            self._balance_cache[key] = after
            self.stats.rebalanced += 1
            period = timeline.period_at(start)
            plan_id = timeline.plan_for_period(period)
            if plan_id is not None:
                plan = self.catalog.plan_for(plan_id, start)
                await self._usage_alerts(tenant, period, plan, timeline, before, after, crossed_at=at)
