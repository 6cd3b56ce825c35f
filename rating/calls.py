"""Rating one call (spec §5): validity, raw and billable seconds, and the period and plan it bills to."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from rating.catalog import Catalog, Rounding
from rating.errors import RatingError, UnknownPlanError
from rating.models import CallEvent, Reason, Rejection
from rating.periods import Period, period_containing
from rating.subscription import TenantTimeline

# A call longer than a day is a gateway clock or bookkeeping fault, not a conversation to bill.
MAX_CALL_SECONDS = 86400

DISPOSITIONS = frozenset({"ANSWERED", "NO_ANSWER", "BUSY", "FAILED", "CANCELLED"})

_MICROSECOND = timedelta(microseconds=1)
_MICROS_PER_SECOND = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class RatedCall:
    call: CallEvent
    period: Period
    plan_id: str
    raw_seconds: Decimal
    billable_seconds: int
    catalog_revision: int


def _aware(ts: datetime | None) -> bool:
    return ts is None or (ts.tzinfo is not None and ts.utcoffset() is not None)


def validate_call(call: CallEvent) -> Rejection | None:
    """Why the call cannot be rated whatever the tenant's state, or None when it can."""
    if not (_aware(call.started_at) and _aware(call.answered_at) and _aware(call.ended_at)):
        return Rejection(Reason.INVALID_EVENT, "call timestamps must be timezone-aware")
    if call.disposition not in DISPOSITIONS:
        return Rejection(Reason.INVALID_EVENT, f"unknown disposition {call.disposition!r}")
    if call.ended_at < call.started_at:
        return Rejection(
            Reason.NEGATIVE_DURATION,
            f"ended_at {call.ended_at.isoformat()} is before started_at {call.started_at.isoformat()}",
        )
    if call.answered_at is not None and call.answered_at < call.started_at:
        return Rejection(
            Reason.INVALID_EVENT,
            f"answered_at {call.answered_at.isoformat()} is before started_at {call.started_at.isoformat()}",
        )
    if call.answered_at is not None and call.answered_at > call.ended_at:
        return Rejection(
            Reason.ENDED_BEFORE_ANSWERED,
            f"ended_at {call.ended_at.isoformat()} is before answered_at {call.answered_at.isoformat()}",
        )
    length = call.ended_at - call.started_at
    if length > timedelta(seconds=MAX_CALL_SECONDS):
        return Rejection(Reason.ABSURD_DURATION, f"call lasted {length}, more than {MAX_CALL_SECONDS} s")
    return None


def raw_seconds(call: CallEvent) -> Decimal:
    """Connected time in exact decimal seconds; 0 unless the call was answered with a known answer time."""
    if call.disposition != "ANSWERED" or call.answered_at is None:
        return Decimal(0)
    # Integer microseconds keep the value exact (timestamps are millisecond precision, so this is ms/1000).
    micros = (call.ended_at - call.answered_at) // _MICROSECOND
    return Decimal(micros) / _MICROS_PER_SECOND


def billable_seconds(raw: Decimal, rounding: Rounding) -> int:
    if raw < 0:
        msg = f"raw seconds cannot be negative, got {raw}"
        raise RatingError(msg)
    if raw == 0:
        return 0
    increment = Decimal(rounding.increment_seconds)
    units, remainder = divmod(raw, increment)
    whole = int(units) + (1 if remainder else 0)
    return max(rounding.minimum_seconds, whole * rounding.increment_seconds)


def rate_call(call: CallEvent, timeline: TenantTimeline, catalog: Catalog) -> RatedCall | Rejection:
    rejection = validate_call(call)
    if rejection is not None:
        return rejection
    if call.tenant_id != timeline.tenant_id:
        msg = f"call {call.event_id} of tenant {call.tenant_id!r} rated against {timeline.tenant_id!r}"
        raise RatingError(msg)
    if not timeline.subscribed:
        return Rejection(Reason.NO_SUBSCRIPTION, f"tenant {call.tenant_id!r} has no subscription")
    period = period_containing(timeline.anchor, call.started_at)
    plan_id = timeline.plan_for_period(period)
    if plan_id is None:
        return Rejection(
            Reason.NO_SUBSCRIPTION,
            f"no subscription of tenant {call.tenant_id!r} covers the period {period.label} "
            f"containing started_at {call.started_at.isoformat()}",
        )
    try:
        plan = catalog.plan_for(plan_id, period.start)
    except UnknownPlanError as exc:
        return Rejection(Reason.UNKNOWN_PLAN, str(exc))
    raw = raw_seconds(call)
    return RatedCall(
        call=call,
        period=period,
        plan_id=plan_id,
        raw_seconds=raw,
        billable_seconds=billable_seconds(raw, plan.rounding),
        catalog_revision=catalog.revision,
    )
