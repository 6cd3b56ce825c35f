"""Value types the rating rules work on: decoded events and the reasons a record cannot be rated.

They carry no behaviour; the pipeline converts Avro records into them (pipeline/records.py) and every
rule in this package reads them. Timestamps are aware UTC datetimes with millisecond precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class CallEvent:
    """One finished call as a gateway reported it (spec §1, CallRecord)."""

    event_id: str
    tenant_id: str
    call_id: str
    employee_id: str | None
    direction: str
    from_number: str
    to_number: str
    started_at: datetime
    answered_at: datetime | None
    ended_at: datetime
    disposition: str
    gateway_id: str


@dataclass(frozen=True, slots=True)
class ProvisioningEvent:
    """One change to a tenant's subscription, numbers or AI employees (spec §1)."""

    event_id: str
    tenant_id: str
    occurred_at: datetime
    action: str
    plan_id: str | None = None
    tax_region: str | None = None
    number: str | None = None
    number_type: str | None = None
    employee_id: str | None = None
    # ALERT_THRESHOLDS_SET (issue 12): percents of included seconds; empty means the catalog default.
    alert_thresholds_percent: tuple[int, ...] | None = None


class Reason(StrEnum):
    """Dead-letter reason codes (spec §5). Values equal names so they read the same in every sink."""

    UNDECODABLE = "UNDECODABLE"
    UNKNOWN_SCHEMA = "UNKNOWN_SCHEMA"
    INVALID_EVENT = "INVALID_EVENT"
    ENDED_BEFORE_ANSWERED = "ENDED_BEFORE_ANSWERED"
    NEGATIVE_DURATION = "NEGATIVE_DURATION"
    ABSURD_DURATION = "ABSURD_DURATION"
    UNKNOWN_PLAN = "UNKNOWN_PLAN"
    UNKNOWN_TAX_REGION = "UNKNOWN_TAX_REGION"
    NO_SUBSCRIPTION = "NO_SUBSCRIPTION"
    FUTURE_EVENT = "FUTURE_EVENT"


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a record cannot be rated; the worker turns it into a dead letter, never drops it."""

    reason: Reason
    message: str
