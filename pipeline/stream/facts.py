"""Pure helpers of the stream worker: provisioning field rules and the values kept under dedupe keys."""

from __future__ import annotations

import zlib
from datetime import datetime
from typing import Any

from rating.alerts import threshold_problem
from rating.catalog import Catalog
from rating.models import CallEvent, ProvisioningEvent, Reason, Rejection

_ACTIONS_NEEDING = {
    "SUBSCRIPTION_STARTED": ("plan_id", "tax_region"),
    "PLAN_CHANGED": ("plan_id",),
    "NUMBER_PROVISIONED": ("number", "number_type"),
    "NUMBER_RELEASED": ("number",),
    "EMPLOYEE_ACTIVATED": ("employee_id",),
    "EMPLOYEE_DEACTIVATED": ("employee_id",),
    "SUBSCRIPTION_CANCELLED": (),
    "ALERT_THRESHOLDS_SET": ("alert_thresholds_percent",),
}


def check_provisioning(event: ProvisioningEvent, catalog: Catalog) -> Rejection | None:
    """Field rules per action (spec §1) and catalog references, before the event touches state."""
    for name in _ACTIONS_NEEDING.get(event.action, ()):
        if getattr(event, name) in (None, ""):
            return Rejection(Reason.INVALID_EVENT, f"{event.action} needs {name}")
    plan_action = event.action in ("SUBSCRIPTION_STARTED", "PLAN_CHANGED")
    if plan_action and event.plan_id is not None and not catalog.has_plan(event.plan_id):
        return Rejection(Reason.UNKNOWN_PLAN, f"plan {event.plan_id!r} is not in catalog")
    if event.action == "ALERT_THRESHOLDS_SET":
        problem = threshold_problem(event.alert_thresholds_percent or ())
        if problem is not None:
            return Rejection(Reason.INVALID_EVENT, problem)
    if event.action == "SUBSCRIPTION_STARTED" and event.tax_region not in catalog.tax_regions:
        return Rejection(Reason.UNKNOWN_TAX_REGION, f"tax region {event.tax_region!r} is not in catalog")
    return None


def ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


def call_fact(call: CallEvent) -> list[int]:
    """The value of a call's dedupe key: ``[ended_ms, started_ms, raw_ms]``. The end is what retention
    measures; start and raw connected milliseconds are all a re-rating needs (``period_usage``)."""
    raw_ms = 0
    if call.disposition == "ANSWERED" and call.answered_at is not None:
        raw_ms = ms(call.ended_at) - ms(call.answered_at)
    return [ms(call.ended_at), ms(call.started_at), raw_ms]


def dead_fact(event_ms: int, raw: bytes) -> list[Any]:
    """The value of a dead-lettered event's key: its time (for retention) and a checksum of its bytes.
    An identical copy is then a duplicate (issue 9: copies of an invalid event each became a dead letter
    and escaped the duplicate rate); a corrected resend under the same id differs and is processed."""
    return [event_ms, "dead", zlib.crc32(raw)]


def dead_copy_differs(known: Any, raw: bytes) -> bool:
    return isinstance(known, list) and len(known) == 3 and known[1] == "dead" and known[2] != zlib.crc32(raw)


RERATING_ACTIONS = frozenset({"SUBSCRIPTION_STARTED", "PLAN_CHANGED", "SUBSCRIPTION_CANCELLED"})
