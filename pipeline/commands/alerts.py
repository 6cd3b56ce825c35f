"""`callmeter alerts [--follow]`: the alerts topic, one readable line per alert, in the order the
thresholds were crossed (event time: the crossing call's end, or the provisioning event's time).
Alerts written before schema v2 have no crossing time; they show when they were sent, marked so."""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer

from pipeline.settings import Settings
from schemas.errors import SerdeError
from schemas.serde import Serde


def crossing_time(record: dict[str, Any]) -> datetime:
    crossed = record.get("crossed_at")
    return crossed if isinstance(crossed, datetime) else record["emitted_at"]


def _order(record: dict[str, Any]) -> tuple[datetime, str, int]:
    return crossing_time(record), str(record["tenant_id"]), int(record.get("threshold_percent") or 0)


def format_alert(record: dict[str, Any]) -> str:
    when = crossing_time(record)
    period = record["period_start"]
    stamp = when.strftime("%Y-%m-%d %H:%M:%SZ")
    if record.get("crossed_at") is None:
        stamp += " (sent)"
    start = period.strftime("%Y-%m-%d") if hasattr(period, "strftime") else str(period)
    if record["kind"] == "USAGE_THRESHOLD":
        what = (
            f"{record['threshold_percent']:>3} % of included seconds used "
            f"({record['used_seconds']}/{record['included_seconds']})"
        )
    elif record["kind"] == "PROJECTED_OVERAGE":
        what = (
            f"projected to use up the included seconds on {record['projected_exhaustion_date']} "
            f"({record['used_seconds']}/{record['included_seconds']} so far)"
        )
    else:
        what = f"QUOTA_EXCEEDED: {record['message']}"
    return f"{stamp}  {record['tenant_id']:<16} period {start}  {what}"


def follow_alerts(
    settings: Settings, bootstrap: str, serde: Serde, follow: bool, idle_seconds: float = 3.0
) -> int:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            # A throwaway group: reading alerts must never move anybody else's offsets.
            "group.id": f"callmeter-alerts-cli-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe([settings.topics.alerts])
    printed = 0
    quiet_since = time.monotonic()
    # What is on the topic now is printed in crossing order once it has been read; with --follow, later
    # alerts are printed as they arrive (alerts of different tenants come from different partitions).
    backlog: list[dict[str, Any]] | None = []
    try:
        while follow or time.monotonic() - quiet_since < idle_seconds:
            if backlog is not None and time.monotonic() - quiet_since >= idle_seconds:
                printed += _print_all(backlog)
                backlog = None
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            quiet_since = time.monotonic()
            try:
                _name, record = serde.decode(msg.value() or b"")
            except SerdeError as exc:
                print(f"(undecodable alert at offset {msg.offset()}: {exc.message})", flush=True)
                continue
            if backlog is not None:
                backlog.append(record)
            else:
                printed += _print_all([record])
        if backlog:
            printed += _print_all(backlog)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return printed


def _print_all(records: list[dict[str, Any]]) -> int:
    for record in sorted(records, key=_order):
        print(format_alert(record), flush=True)
    return len(records)
