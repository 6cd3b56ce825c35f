"""`callmeter usage TENANT [--period YYYY-MM] [--json]`: a tenant's usage review.

The period so far against the previous one, a forecast to the period's end, the daily trend, the
alerts sent and what drove the usage (top days, top employees). Read from the ledger through the
read-only SQL path (pipeline/ledgerquery/sql.py), so it works while a worker runs; charges are
rating/'s invoice computation with the current catalog, for the usage so far and for the forecast.

The forecast is linear: billable seconds so far divided by the elapsed share of the period. A period
that has ended is its own forecast.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from pipeline.errors import InputError
from pipeline.ledgerquery.sql import run_sql
from pipeline.settings import Settings
from rating.catalog import Catalog
from rating.invoice import build_invoice
from rating.models import ProvisioningEvent
from rating.periods import Period
from rating.subscription import TenantTimeline
from schemas.errors import SerdeError
from schemas.serde import Serde

_PROVISIONING = """
SELECT event_id, occurred_at, action, plan_id, tax_region, number, number_type, employee_id
FROM provisioning_events FINAL WHERE tenant_id = {t:String} ORDER BY occurred_at, event_id
"""
_DAILY = """
SELECT toString(toDate(started_at, 'UTC')) AS day, count() AS calls, sum(billable_seconds) AS billable
FROM call_ratings
WHERE tenant_id = {t:String} AND period_start = {p:DateTime64(3, 'UTC')}
GROUP BY day ORDER BY day
"""
_EMPLOYEES = """
SELECT ifNull(employee_id, '(none)') AS employee, count() AS calls, sum(billable_seconds) AS billable
FROM call_ratings
WHERE tenant_id = {t:String} AND period_start = {p:DateTime64(3, 'UTC')}
GROUP BY employee ORDER BY billable DESC, employee LIMIT 3
"""


@dataclass
class _Ledger:
    settings: Settings

    def rows(self, sql: str, **parameters: Any) -> list[dict[str, Any]]:
        settings = self.settings
        columns, rows = run_sql(
            settings.clickhouse_dsn, settings.clickhouse_secret, sql, parameters=parameters
        )
        return [dict(zip(columns, row, strict=True)) for row in rows]


def _utc(text: str) -> datetime:
    parsed = datetime.fromisoformat(text)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def timeline_of(ledger: _Ledger, tenant_id: str) -> TenantTimeline:
    events = [
        ProvisioningEvent(
            event_id=r["event_id"],
            tenant_id=tenant_id,
            occurred_at=_utc(r["occurred_at"]),
            action=r["action"],
            plan_id=r["plan_id"],
            tax_region=r["tax_region"],
            number=r["number"],
            number_type=r["number_type"],
            employee_id=r["employee_id"],
        )
        for r in ledger.rows(_PROVISIONING, t=tenant_id)
    ]
    if not events:
        msg = f"usage: tenant {tenant_id!r} has no provisioning events in the ledger"
        raise InputError(msg)
    return TenantTimeline.from_events(tenant_id, events)


def review(
    settings: Settings,
    catalog: Catalog,
    tenant_id: str,
    month: tuple[int, int] | None,
    now: datetime,
    alerts: list[dict[str, Any]],
) -> dict[str, Any]:
    ledger = _Ledger(settings)
    timeline = timeline_of(ledger, tenant_id)
    if month is not None:
        period = timeline.invoiced_period_in_month(*month)
        if period is None:
            msg = f"usage: no subscribed period of {tenant_id!r} starts in {month[0]}-{month[1]:02d}"
            raise InputError(msg)
    else:
        period = timeline.period_at(now)
        if timeline.plan_for_period(period) is None:
            msg = f"usage: {tenant_id!r} has no subscription covering {now.date().isoformat()}"
            raise InputError(msg)
    previous = timeline.period_at(period.start - timedelta(milliseconds=1))
    current = _period_usage(ledger, catalog, timeline, tenant_id, period, now)
    before = _period_usage(ledger, catalog, timeline, tenant_id, previous, now)
    daily = ledger.rows(_DAILY, t=tenant_id, p=period.start)
    top_days = sorted(daily, key=lambda d: (-int(d["billable"]), d["day"]))[:3]
    return {
        "tenant_id": tenant_id,
        "period": current,
        "previous_period": before if timeline.plan_for_period(previous) is not None else None,
        "daily": daily,
        "top_days": top_days,
        "top_employees": ledger.rows(_EMPLOYEES, t=tenant_id, p=period.start),
        "alerts": [a for a in alerts if a["period_start"] == period.start.isoformat()],
    }


def _period_usage(
    ledger: _Ledger, catalog: Catalog, timeline: TenantTimeline, tenant_id: str, period: Period, now: datetime
) -> dict[str, Any]:
    rows = ledger.rows(_DAILY, t=tenant_id, p=period.start)
    billable = sum(int(r["billable"]) for r in rows)
    elapsed = min(max((now - period.start) / (period.end - period.start), 0.0), 1.0)
    forecast = billable if elapsed >= 1.0 or elapsed == 0.0 else round(billable / elapsed)
    plan_id = timeline.plan_for_period(period)
    out: dict[str, Any] = {
        "start": period.start.isoformat(),
        "end": period.end.isoformat(),
        "plan_id": plan_id,
        "elapsed_percent": round(elapsed * 100, 1),
        "calls": sum(int(r["calls"]) for r in rows),
        "billable_seconds": billable,
        "forecast_billable_seconds": forecast,
    }
    if plan_id is None:
        return out
    plan = catalog.plan_for(plan_id, period.start)
    out["included_seconds"] = plan.included_seconds
    out["overage_mode"] = plan.overage  # "charge", or "block": seconds past the allowance are refused
    for name, seconds in (("so_far", billable), ("forecast", forecast)):
        invoice = build_invoice(
            tenant_id=tenant_id,
            period=period,
            timeline=timeline,
            catalog=catalog,
            billable_seconds_total=seconds,
        )
        out[f"overage_seconds_{name}"] = max(seconds - plan.included_seconds, 0)
        out[f"subtotal_{name}"] = str(invoice.subtotal)
        out[f"total_{name}"] = str(invoice.total)
    out["currency"] = catalog.currency
    return out


def sent_alerts(settings: Settings, bootstrap: str, serde: Serde, tenant_id: str) -> list[dict[str, Any]]:
    """The tenant's alerts on the alerts topic (keyed by tenant), read to the end, never committed."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"callmeter-usage-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        meta = consumer.list_topics(settings.topics.alerts, timeout=10).topics[settings.topics.alerts]
        partitions = [TopicPartition(settings.topics.alerts, p, 0) for p in meta.partitions]
        consumer.assign(partitions)
        found, at_end = [], 0
        while at_end < len(partitions):
            msg = consumer.poll(5.0)
            if msg is None:
                break
            if msg.error() is not None:
                at_end += 1
                continue
            try:
                _name, record = serde.decode(msg.value() or b"")
            except SerdeError:
                continue
            if record.get("tenant_id") == tenant_id:
                found.append(
                    {
                        "kind": record["kind"],
                        "threshold_percent": record.get("threshold_percent"),
                        "period_start": record["period_start"].isoformat(),
                        "used_seconds": record["used_seconds"],
                        "included_seconds": record["included_seconds"],
                        "message": record["message"],
                    }
                )
        return sorted(found, key=lambda a: (a["period_start"], a["used_seconds"], a["kind"]))
    finally:
        consumer.close()


def render_text(result: dict[str, Any]) -> str:
    cur, prev = result["period"], result["previous_period"]
    lines = [
        f"usage of {result['tenant_id']}: period {cur['start'][:10]} to {cur['end'][:10]} "
        f"(plan {cur['plan_id']}, {cur['elapsed_percent']} % elapsed)",
        "",
        f"{'':<22}{'this period':>14}{'forecast':>14}{'previous':>14}",
    ]

    def row(label: str, now: Any, forecast: Any, before: Any) -> str:
        return f"{label:<22}{now!s:>14}{forecast!s:>14}{before!s:>14}"

    p = prev or {}
    lines.append(row("calls", cur["calls"], "", p.get("calls", "-")))
    lines.append(
        row(
            "billable seconds",
            cur["billable_seconds"],
            cur["forecast_billable_seconds"],
            p.get("billable_seconds", "-"),
        )
    )
    if "included_seconds" in cur:
        lines.append(
            row(
                "blocked seconds" if cur["overage_mode"] == "block" else "overage seconds",
                cur["overage_seconds_so_far"],
                cur["overage_seconds_forecast"],
                p.get("overage_seconds_so_far", "-"),
            )
        )
        lines.append(
            row(
                f"total ({cur['currency']}, with tax)",
                cur["total_so_far"],
                cur["total_forecast"],
                p.get("total_so_far", "-"),
            )
        )
        lines.append(f"included seconds in plan: {cur['included_seconds']}")
    lines += ["", "daily trend (billable seconds)"]
    peak = max((int(d["billable"]) for d in result["daily"]), default=0) or 1
    for day in result["daily"]:
        bar = "#" * max(1, round(30 * int(day["billable"]) / peak))
        lines.append(f"  {day['day']}  {int(day['billable']):>8}  {bar}")
    lines += ["", "top days: " + ", ".join(f"{d['day']} ({d['billable']} s)" for d in result["top_days"])]
    lines.append(
        "top employees: " + ", ".join(f"{e['employee']} ({e['billable']} s)" for e in result["top_employees"])
    )
    lines += ["", "alerts sent this period:"]
    for alert in result["alerts"] or []:
        if alert["kind"] == "USAGE_THRESHOLD":
            lines.append(
                f"  {alert['threshold_percent']} % of included seconds "
                f"({alert['used_seconds']}/{alert['included_seconds']})"
            )
        else:
            lines.append(f"  {alert['kind']}: {alert['message']}")
    if not result["alerts"]:
        lines.append("  none")
    return "\n".join(lines) + "\n"


def render_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=1, default=lambda v: str(v) if isinstance(v, Decimal) else v) + "\n"
