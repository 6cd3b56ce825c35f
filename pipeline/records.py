"""Conversions between Avro record dicts (schemas/) and the rating domain's value types (rating/)."""

from __future__ import annotations

import json
from dataclasses import fields
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from rating.calls import RatedCall
from rating.models import CallEvent, ProvisioningEvent

_CALL_FIELDS = tuple(f.name for f in fields(CallEvent))
_PROVISIONING_FIELDS = tuple(f.name for f in fields(ProvisioningEvent))


def call_from_record(record: dict[str, Any]) -> CallEvent:
    # Newer writer schemas may carry more fields; the domain takes the ones it knows.
    values: dict[str, Any] = {name: record.get(name) for name in _CALL_FIELDS}
    return CallEvent(**values)


def provisioning_from_record(record: dict[str, Any]) -> ProvisioningEvent:
    values: dict[str, Any] = {name: record.get(name) for name in _PROVISIONING_FIELDS}
    if values["alert_thresholds_percent"] is not None:
        values["alert_thresholds_percent"] = tuple(values["alert_thresholds_percent"])
    return ProvisioningEvent(**values)


def call_to_record(call: CallEvent) -> dict[str, Any]:
    return {name: getattr(call, name) for name in _CALL_FIELDS}


def provisioning_to_record(event: ProvisioningEvent) -> dict[str, Any]:
    record = {name: getattr(event, name) for name in _PROVISIONING_FIELDS}
    if event.alert_thresholds_percent is not None:
        record["alert_thresholds_percent"] = list(event.alert_thresholds_percent)
    return record


def rated_to_record(
    rated: RatedCall, *, source_topic: str, source_partition: int, source_offset: int, late: bool = False
) -> dict[str, Any]:
    record = call_to_record(rated.call)
    record.update(
        source_topic=source_topic,
        source_partition=source_partition,
        source_offset=source_offset,
        period_start=rated.period.start,
        period_end=rated.period.end,
        plan_id=rated.plan_id,
        raw_seconds=str(rated.raw_seconds),
        billable_seconds=rated.billable_seconds,
        catalog_revision=rated.catalog_revision,
        late=late,
        rated_at=datetime.now(UTC),
    )
    return record


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, Decimal):
        return str(value)
    return value


def payload_json(record: dict[str, Any], names: tuple[str, ...]) -> str:
    """The raw event as analysts see it in ClickHouse: compact JSON, RFC 3339 timestamps."""
    return json.dumps({name: _iso(record.get(name)) for name in names}, separators=(",", ":"))


CALL_FIELDS = _CALL_FIELDS
PROVISIONING_FIELDS = _PROVISIONING_FIELDS


_RATED_CALL_FIELDS = (
    *_CALL_FIELDS,
    "period_start",
    "period_end",
    "plan_id",
    "raw_seconds",
    "billable_seconds",
    "catalog_revision",
    "rated_at",
    "source_partition",
    "source_offset",
)


def rated_call_row(r: dict[str, Any], *, late: bool) -> dict[str, Any]:
    """A ``rated_calls`` ledger row by column name (sinks/columns.py) from a RatedCall record."""
    return {**{name: r.get(name) for name in _RATED_CALL_FIELDS}, "late": int(late)}
