"""The balance book: each tenant period's live balance (billable seconds) and the alerts it sends.

Balances live in the ``balances`` table under ``keys.balance_key``; only periods the live window still
holds (pipeline/stream/window.py) are kept, changed or answered for. A change is made in memory, where
every answer reads it at once, and written to the table by ``flush()``, once per key however many calls
changed it: the worker flushes just before each commit, into the transactions being committed
(protocol step 6), so a balance commits with the events that changed it and costs one changelog
record per tenant period per commit instead of one per call.

Alerts are decisions returned to the worker, which sends them in the same transaction (step 5); the
``alerted`` table remembers each one so it is sent once per tenant, period and threshold (spec §8),
across restarts and whatever the order calls arrive in:

- a usage threshold is sent when a change moves the balance across it; its ``crossed_at`` is the
  instant, in event time, by which the period's calls known then had reached it, never earlier than a
  lower threshold's already sent, and ``used_seconds`` the usage at that instant
  (``rating.alerts.threshold_crossing``). A threshold below one already sent for the period is implied
  by it and not sent (it could only happen after a correction moved usage down);
- projected overage and quota alerts, once per tenant and period.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime

from pipeline.stream.dedupe import RememberedCall
from pipeline.stream.keys import MAX_PERIOD_MS, balance_key
from pipeline.stream.state import StateTable
from pipeline.stream.window import LiveWindow
from rating.alerts import crossed_thresholds, projected_overage, threshold_crossing, thresholds_in_effect
from rating.balance import period_calls, period_usage, project_exhaustion
from rating.calls import RatedCall
from rating.catalog import Catalog, Plan
from rating.models import ProvisioningEvent
from rating.periods import Period
from rating.subscription import TenantTimeline

CALL_SECONDS = "call_seconds"
CallsOf = Callable[[int, str], list[RememberedCall]]


@dataclass(frozen=True, slots=True)
class AlertNote:
    """An alert to send (its record is built by pipeline/stream/emitter.py)."""

    tenant_id: str
    period_start: datetime
    kind: str  # USAGE_THRESHOLD, PROJECTED_OVERAGE, QUOTA_EXCEEDED
    threshold_percent: int | None
    resource: str
    used: int
    allowance: int
    message: str
    crossed_at: datetime
    subject: str = ""
    projected: date | None = None


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _marker_start(key: str) -> datetime | None:
    """The period start named in an ``alerted`` key (``tenant|start|usage|75``, ``tenant|start|projected``,
    ``tenant|start|employees``), or None."""
    for parts in (2, 1):
        head = key.rsplit("|", parts)[0]
        try:
            return datetime.fromisoformat(head.rsplit("|", 1)[-1])
        except ValueError:
            continue
    return None


class BalanceBook:
    def __init__(
        self,
        balances: StateTable,
        alerted: StateTable,
        catalog: Catalog,
        window: LiveWindow,
        calls_of: CallsOf,
    ) -> None:
        self.balances = balances
        self.alerted = alerted
        self.catalog = catalog
        self.window = window
        self.calls_of = calls_of
        self._cache: dict[tuple[int, str], int] = {}
        self._dirty: dict[tuple[int, str], int] = {}

    # -- balances -------------------------------------------------------------------------------------
    def used(self, partition: int, tenant_id: str, period_start: datetime) -> int:
        key = (partition, balance_key(tenant_id, period_start))
        cached = self._cache.get(key)
        if cached is None:
            stored = self.balances.get(partition, key[1])
            cached = self._cache[key] = stored if isinstance(stored, int) else 0
        return cached

    def _set(self, partition: int, tenant_id: str, period_start: datetime, seconds: int) -> None:
        key = (partition, balance_key(tenant_id, period_start))
        self._cache[key] = self._dirty[key] = seconds

    def flush(self) -> int:
        """Write every balance changed since the last flush, once each; the number written."""
        for (partition, key), seconds in self._dirty.items():
            self.balances.write_now(partition, key, seconds)
        written = len(self._dirty)
        self._dirty.clear()
        return written

    def forget(self) -> None:
        """At a rebalance (after the last flush): partitions may move, read balances from the table again."""
        self._cache.clear()
        self._dirty.clear()

    def add(self, partition: int, rated: RatedCall, timeline: TenantTimeline) -> list[AlertNote]:
        """A rated call of a live period: its seconds added, and the alerts that sends."""
        tenant, period = rated.call.tenant_id, rated.period
        before = self.used(partition, tenant, period.start)
        after = before + rated.billable_seconds
        self._set(partition, tenant, period.start, after)
        plan = self.catalog.plan_for(rated.plan_id, period.start)
        alerts = self._usage_alerts(partition, timeline, period, plan, before, after, rated.call.ended_at)
        projected = self._projected(partition, tenant, period, plan, after, rated.call.ended_at)
        return alerts + projected

    def rerate(self, partition: int, timeline: TenantTimeline, at: datetime) -> tuple[int, list[AlertNote]]:
        """The tenant's timeline changed how its calls rate (plan, anchor, cancellation): every live period
        balance set to its remembered calls re-rated; the balances changed and the alerts sent."""
        tenant = timeline.tenant_id
        calls = self.calls_of(partition, tenant)
        usage = period_usage([(started, raw) for started, _ended, raw in calls], timeline, self.catalog)
        prefix = f"{tenant}|"
        starts = {
            datetime.fromisoformat(key[len(prefix) :]) for key, _ in self.balances.scan(partition, prefix)
        }
        starts |= {
            datetime.fromisoformat(k[len(prefix) :])
            for p, k in self._cache
            if p == partition and k.startswith(prefix)
        }
        changed, alerts = 0, []
        for start in sorted(starts | set(usage)):
            period = timeline.period_at(start) if timeline.subscribed else None
            if period is not None and not self.window.is_live(partition, period.end):
                continue
            before, after = self.used(partition, tenant, start), usage.get(start, 0)
            if before == after:
                continue
            self._set(partition, tenant, start, after)
            changed += 1
            plan_id = timeline.plan_for_period(period) if period is not None else None
            if period is not None and plan_id is not None and period.start == start:
                plan = self.catalog.plan_for(plan_id, start)
                alerts += self._usage_alerts(partition, timeline, period, plan, before, after, at)
        return changed, alerts

    def sweep(self, partition: int, horizon_ms: int) -> int:
        """Drop balances and alert markers of periods closed before ``horizon_ms`` (a period ends at most
        31 days after it starts), unwritten changes included; the number of keys dropped."""

        def closed(start: datetime | None) -> bool:
            return start is not None and _ms(start) + MAX_PERIOD_MS <= horizon_ms

        dropped = 0
        for key, _value in list(self.alerted.scan(partition)):
            if closed(_marker_start(key)):
                self.alerted.delete(partition, key)
                dropped += 1
        stored = {key for key, _value in self.balances.scan(partition)}
        cached = {key for p, key in self._cache if p == partition}
        for key in stored | cached:
            if closed(_marker_start(f"{key}|x")):
                if key in stored:
                    self.balances.delete(partition, key)
                self._cache.pop((partition, key), None)
                self._dirty.pop((partition, key), None)
                dropped += 1
        return dropped

    # -- alerts ---------------------------------------------------------------------------------------
    def thresholds(self, timeline: TenantTimeline, plan: Plan) -> tuple[int, ...]:
        return thresholds_in_effect(
            timeline.alert_thresholds_percent,
            plan.alert_thresholds_percent,
            self.catalog.alert_thresholds_percent,
        )

    def _usage_alerts(
        self,
        partition: int,
        timeline: TenantTimeline,
        period: Period,
        plan: Plan,
        before: int,
        after: int,
        at: datetime,
    ) -> list[AlertNote]:
        """``at``: when the change happened in event time (the call's end, the provisioning event's
        time), the crossing when the remembered calls cannot tell (they always can in a live period)."""
        tenant, included = timeline.tenant_id, plan.included_seconds
        crossed = crossed_thresholds(included, before, after, self.thresholds(timeline, plan))
        if not crossed:
            return []
        prefix = f"{tenant}|{period.start.isoformat()}|usage|"
        sent = {int(key[len(prefix) :]): value for key, value in self.alerted.scan(partition, prefix)}
        calls = period_calls(self.calls_of(partition, tenant), timeline, self.catalog, period.start)
        alerts = []
        for percent in crossed:
            if percent in sent or any(higher > percent for higher in sent):
                continue
            lower = [v["at"] for p, v in sent.items() if p < percent and isinstance(v, dict)]
            crossing = threshold_crossing(calls, included, percent, _at(max(lower)) if lower else None)
            crossed_at, used = crossing if crossing is not None else (max([at, *map(_at, lower)]), after)
            sent[percent] = {"at": _ms(crossed_at), "used": used}
            self.alerted.put(partition, f"{prefix}{percent}", sent[percent])
            alerts.append(
                AlertNote(
                    tenant,
                    period.start,
                    "USAGE_THRESHOLD",
                    percent,
                    CALL_SECONDS,
                    used,
                    included,
                    f"{tenant} used {used} of {included} included seconds ({percent} % threshold) "
                    f"by {crossed_at.isoformat()} in the period starting {period.start.date()}",
                    crossed_at=crossed_at,
                    projected=project_exhaustion(period, included, used, crossed_at),
                )
            )
        return alerts

    def _projected(
        self, partition: int, tenant: str, period: Period, plan: Plan, used: int, at: datetime
    ) -> list[AlertNote]:
        """PROJECTED_OVERAGE, once per tenant and period: the first change after which the period's rate
        so far uses the included seconds up before the period ends (rating/alerts.py)."""
        runs_out = projected_overage(period, plan.included_seconds, used, at)
        marker = f"{tenant}|{period.start.isoformat()}|projected"
        if runs_out is None or self.alerted.get(partition, marker) is not None:
            return []
        self.alerted.put(partition, marker, {"at": _ms(at), "used": used})
        included = plan.included_seconds
        return [
            AlertNote(
                tenant,
                period.start,
                "PROJECTED_OVERAGE",
                None,
                CALL_SECONDS,
                used,
                included,
                f"{tenant} is projected to use up its {included} included seconds on {runs_out} "
                f"({used} used by {at.date()}) in the period starting {period.start.date()}",
                subject=CALL_SECONDS,
                crossed_at=at,
                projected=runs_out,
            )
        ]

    def quota(self, partition: int, timeline: TenantTimeline, event: ProvisioningEvent) -> list[AlertNote]:
        """QUOTA_EXCEEDED, once per tenant, period and resource, when a number or an employee takes the
        tenant past its plan's limit."""
        if event.action not in ("NUMBER_PROVISIONED", "EMPLOYEE_ACTIVATED") or not timeline.subscribed:
            return []
        period = timeline.period_at(event.occurred_at)
        plan_id = timeline.plan_for_period(period)
        if plan_id is None or not self.window.is_live(partition, period.end):
            return []
        plan = self.catalog.plan_for(plan_id, period.start)
        if event.action == "NUMBER_PROVISIONED":
            what, active, limit = (
                "numbers",
                len(timeline.active_numbers_at(event.occurred_at)),
                plan.numbers.max,
            )
        else:
            what = "employees"
            active, limit = len(timeline.active_employees_at(event.occurred_at)), plan.employees.max_active
        marker = f"{event.tenant_id}|{period.start.isoformat()}|{what}"
        if active <= limit or self.alerted.get(partition, marker) is not None:
            return []
        self.alerted.put(partition, marker, {"at": _ms(event.occurred_at), "used": active})
        return [
            AlertNote(
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
        ]
