"""`callmeter alerts [--follow]`: the alerts topic, one readable line per alert."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer

from pipeline.settings import Settings
from schemas.errors import SerdeError
from schemas.serde import Serde


def format_alert(record: dict[str, object]) -> str:
    when = record["emitted_at"]
    period = record["period_start"]
    stamp = when.strftime("%Y-%m-%d %H:%M:%SZ") if hasattr(when, "strftime") else str(when)
    start = period.strftime("%Y-%m-%d") if hasattr(period, "strftime") else str(period)
    if record["kind"] == "USAGE_THRESHOLD":
        what = (
            f"{record['threshold_percent']:>3} % of included seconds used "
            f"({record['used_seconds']}/{record['included_seconds']})"
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
    try:
        while follow or time.monotonic() - quiet_since < idle_seconds:
            msg = consumer.poll(0.5)
            if msg is None or msg.error() is not None:
                continue
            quiet_since = time.monotonic()
            try:
                _name, record = serde.decode(msg.value() or b"")
            except SerdeError as exc:
                print(f"(undecodable alert at offset {msg.offset()}: {exc.message})", flush=True)
                continue
            print(format_alert(record), flush=True)
            printed += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return printed
