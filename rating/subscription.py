"""A tenant's provisioning history and what it means for each billing period (spec §4, §6).

The timeline keeps every accepted provisioning event (one per ``event_id``) and derives its state by
replaying them in ``(occurred_at, event_id)`` order. Replaying instead of mutating makes the result
independent of arrival order: events on the provisioning topic can arrive late or out of order, and
``apply`` of a late event gives exactly what ``from_events`` over the full set gives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any

from rating.catalog import Plan
from rating.errors import RatingError
from rating.models import ProvisioningEvent
from rating.periods import Period, anchor_day, period_containing, period_starting_in, require_utc

_CENT = Decimal("0.01")
_QUANTITY = Decimal("0.0001")
_FORMAT_VERSION = 1


def round_cents(value: Decimal) -> Decimal:
    """Round a money amount once to cents, half up, never producing a negative zero."""
    rounded = value.quantize(_CENT, rounding=ROUND_HALF_UP)
    return rounded.copy_abs() if rounded.is_zero() else rounded


@dataclass(frozen=True, slots=True)
class Interval:
    """One stretch ``[start, end)`` during which a number or employee was active."""

    start: datetime
    end: datetime | None
    kind: str | None = None

    @property
    def empty(self) -> bool:
        return self.end is not None and self.end <= self.start

    def active_at(self, ts: datetime) -> bool:
        return self.start <= ts and (self.end is None or ts < self.end)

    def overlaps(self, period: Period) -> bool:
        # A zero-length interval (provisioned and released at one instant) is active at no moment.
        return not self.empty and self.start < period.end and (self.end is None or self.end > period.start)


@dataclass(frozen=True, slots=True)
class NumberCharge:
    """What one phone number costs in one period (spec §6)."""

    number: str
    number_type: str
    first_active: datetime
    full_period: bool
    quantity: Decimal
    unit_price: Decimal
    amount: Decimal
    included: bool

    @property
    def quantity_text(self) -> str:
        return "1" if self.full_period else format(self.quantity, "f")


@dataclass(frozen=True, slots=True)
class _Segment:
    """A run of invoiced periods: from ``first_start`` until the cancellation, if any."""

    first_start: datetime
    cancelled_at: datetime | None = None

    def covers(self, period_start: datetime) -> bool:
        # "No period that starts later [than the cancellation] is invoiced" (spec §4): strictly later.
        return self.first_start <= period_start and (
            self.cancelled_at is None or period_start <= self.cancelled_at
        )


def _order(event: ProvisioningEvent) -> tuple[datetime, str]:
    return (event.occurred_at, event.event_id)


class TenantTimeline:
    """Subscription, plan schedule, numbers and employees of one tenant, derived from its events."""

    def __init__(self, tenant_id: str, events: Mapping[str, ProvisioningEvent]) -> None:
        self.tenant_id = tenant_id
        self._events = dict(events)
        self._anchor: int | None = None
        self._subscribed_at: datetime | None = None
        self._initial_plan: str | None = None
        self._latest_region: str | None = None
        # Keyed by the period start at which a value takes effect; the latest key <= a period's start wins.
        self._plans: dict[datetime, str] = {}
        self._regions: dict[datetime, str] = {}
        self._segments: list[_Segment] = []
        self._numbers: dict[str, list[Interval]] = {}
        self._employees: dict[str, list[Interval]] = {}
        self._alert_thresholds: tuple[int, ...] | None = None
        for event in sorted(self._events.values(), key=_order):
            self._replay(event)

    # construction -------------------------------------------------------------------------------

    @classmethod
    def from_events(cls, tenant_id: str, events: Iterable[ProvisioningEvent]) -> TenantTimeline:
        kept: dict[str, ProvisioningEvent] = {}
        for event in events:
            cls._check_tenant(tenant_id, event)
            kept.setdefault(event.event_id, _normalised(event))
        return cls(tenant_id, kept)

    def apply(self, event: ProvisioningEvent) -> TenantTimeline:
        """This timeline with ``event`` added; a repeated ``event_id`` changes nothing (first seen wins)."""
        self._check_tenant(self.tenant_id, event)
        if event.event_id in self._events:
            return self
        return TenantTimeline(self.tenant_id, {**self._events, event.event_id: _normalised(event)})

    @staticmethod
    def _check_tenant(tenant_id: str, event: ProvisioningEvent) -> None:
        if event.tenant_id != tenant_id:
            msg = f"provisioning event {event.event_id} of tenant {event.tenant_id!r} given to {tenant_id!r}"
            raise RatingError(msg)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": _FORMAT_VERSION,
            "tenant_id": self.tenant_id,
            "events": [_event_to_dict(e) for e in sorted(self._events.values(), key=_order)],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TenantTimeline:
        if data.get("version") != _FORMAT_VERSION:
            msg = f"unsupported timeline format version {data.get('version')!r}"
            raise RatingError(msg)
        tenant_id = str(data["tenant_id"])
        return cls.from_events(tenant_id, (_event_from_dict(d) for d in data["events"]))

    @property
    def events(self) -> list[ProvisioningEvent]:
        return sorted(self._events.values(), key=_order)

    def has_event(self, event_id: str) -> bool:
        """Whether an event with this id was accepted: the timeline keeps every one for ever, so it is
        also the complete dedupe record of the tenant's provisioning (no retention forgets it)."""
        return event_id in self._events

    # replay -------------------------------------------------------------------------------------

    def _replay(self, event: ProvisioningEvent) -> None:
        handler = getattr(self, f"_on_{event.action.lower()}", None)
        # Unknown actions (a newer schema's enum symbol) carry nothing billing understands yet.
        if handler is not None:
            handler(event)

    def _active_segment(self) -> _Segment | None:
        if self._segments and self._segments[-1].cancelled_at is None:
            return self._segments[-1]
        return None

    def _set_from(self, start: datetime, event: ProvisioningEvent) -> None:
        if event.plan_id:
            self._plans[start] = event.plan_id
        if event.tax_region:
            self._regions[start] = event.tax_region
            self._latest_region = event.tax_region

    def _on_subscription_started(self, event: ProvisioningEvent) -> None:
        if self._anchor is None:
            self._anchor = anchor_day(event.occurred_at)
            self._subscribed_at = event.occurred_at
            self._initial_plan = event.plan_id
            first = period_containing(self._anchor, event.occurred_at)
            self._segments.append(_Segment(first.start))
            self._set_from(first.start, event)
            return
        period = period_containing(self._anchor, event.occurred_at)
        last = self._segments[-1]
        if last.cancelled_at is None:
            # A second start while subscribed can only change what is sold from the next period on.
            self._set_from(period.end, event)
        elif last.covers(period.start):
            # Re-subscribed within the period that is still invoiced: the cancellation is undone and
            # the (possibly new) plan follows the plan-change rule.
            self._segments[-1] = replace(last, cancelled_at=None)
            self._set_from(period.end, event)
        else:
            # Like the first start: the period containing the re-subscription is invoiced in full.
            self._segments.append(_Segment(period.start))
            self._set_from(period.start, event)

    def _on_plan_changed(self, event: ProvisioningEvent) -> None:
        if self._anchor is None or self._active_segment() is None or not event.plan_id:
            return
        self._plans[period_containing(self._anchor, event.occurred_at).end] = event.plan_id

    def _on_subscription_cancelled(self, event: ProvisioningEvent) -> None:
        segment = self._active_segment()
        if segment is not None:
            self._segments[-1] = replace(segment, cancelled_at=event.occurred_at)

    def _on_number_provisioned(self, event: ProvisioningEvent) -> None:
        if event.number:
            _open(self._numbers, event.number, event.occurred_at, event.number_type)

    def _on_number_released(self, event: ProvisioningEvent) -> None:
        if event.number:
            _close(self._numbers, event.number, event.occurred_at)

    def _on_employee_activated(self, event: ProvisioningEvent) -> None:
        if event.employee_id:
            _open(self._employees, event.employee_id, event.occurred_at, None)

    def _on_employee_deactivated(self, event: ProvisioningEvent) -> None:
        if event.employee_id:
            _close(self._employees, event.employee_id, event.occurred_at)

    def _on_alert_thresholds_set(self, event: ProvisioningEvent) -> None:
        # The latest setting in event time wins; an empty list goes back to the catalog default.
        self._alert_thresholds = tuple(sorted(event.alert_thresholds_percent or ())) or None

    @property
    def alert_thresholds_percent(self) -> tuple[int, ...] | None:
        """The tenant's own usage alert thresholds (issue 12), or None for the catalog default."""
        return self._alert_thresholds

    # subscription -------------------------------------------------------------------------------

    @property
    def subscribed(self) -> bool:
        """True once a SUBSCRIPTION_STARTED is known (the period grid exists), even if later cancelled."""
        return self._anchor is not None

    @property
    def subscribed_at(self) -> datetime | None:
        return self._subscribed_at

    @property
    def anchor(self) -> int:
        if self._anchor is None:
            msg = f"tenant {self.tenant_id!r} has no SUBSCRIPTION_STARTED yet"
            raise RatingError(msg)
        return self._anchor

    @property
    def plan_id(self) -> str | None:
        """The plan the subscription started with."""
        return self._initial_plan

    @property
    def tax_region(self) -> str | None:
        """The tax region of the latest SUBSCRIPTION_STARTED."""
        return self._latest_region

    @property
    def cancelled_at(self) -> datetime | None:
        """When the current subscription was cancelled; None while it runs (or was resumed)."""
        return self._segments[-1].cancelled_at if self._segments else None

    @property
    def first_period(self) -> Period | None:
        if self._anchor is None or self._subscribed_at is None:
            return None
        return period_containing(self._anchor, self._subscribed_at)

    def cancelled_as_of(self, ts: datetime) -> datetime | None:
        """When the subscription in force at ``ts`` (the latest one started by ``ts``'s period) was
        cancelled, if that happened at or before ``ts``; None while it runs, or before any started."""
        if self._anchor is None:
            return None
        start = period_containing(self._anchor, require_utc(ts, "timestamp")).start
        started = [segment for segment in self._segments if segment.first_start <= start]
        cancelled = started[-1].cancelled_at if started else None
        return cancelled if cancelled is not None and cancelled <= ts else None

    def period_at(self, ts: datetime) -> Period:
        return period_containing(self.anchor, ts)

    def covers(self, period: Period) -> bool:
        return any(segment.covers(period.start) for segment in self._segments)

    def plan_for_period(self, period: Period) -> str | None:
        """The plan in effect at the period's start, or None when no subscription covers the period."""
        if not self.covers(period):
            return None
        return _in_effect(self._plans, period.start)

    def tax_region_for_period(self, period: Period) -> str | None:
        if not self.covers(period):
            return None
        return _in_effect(self._regions, period.start)

    def invoiced_period_in_month(self, year: int, month: int) -> Period | None:
        if self._anchor is None:
            return None
        period = period_starting_in(self._anchor, year, month)
        return period if self.plan_for_period(period) is not None else None

    # numbers and employees ----------------------------------------------------------------------

    def number_intervals(self) -> dict[str, list[Interval]]:
        return {number: list(intervals) for number, intervals in self._numbers.items()}

    def employee_intervals(self) -> dict[str, list[Interval]]:
        return {employee: list(intervals) for employee, intervals in self._employees.items()}

    def active_numbers_at(self, ts: datetime) -> list[str]:
        return _active_at(self._numbers, require_utc(ts, "timestamp"))

    def active_employees_at(self, ts: datetime) -> list[str]:
        return _active_at(self._employees, require_utc(ts, "timestamp"))

    def number_charges(self, period: Period, plan: Plan) -> list[NumberCharge]:
        """One charge per number active at some moment of the period, ordered by (first activity, number)."""
        found: list[tuple[datetime, str, Interval]] = []
        for number, intervals in self._numbers.items():
            overlapping = [iv for iv in intervals if iv.overlaps(period)]
            if overlapping:
                # Intervals are chronological, so the first one is the one active at the start, if any.
                found.append((overlapping[0].start, number, overlapping[0]))
        found.sort(key=lambda item: (item[0], item[1]))
        free_locals = plan.numbers.included_local
        charges = []
        for first_active, number, interval in found:
            number_type = interval.kind or ""
            fee = _fee(plan, number_type, number)
            included = number_type == "LOCAL" and free_locals > 0
            if included:
                free_locals -= 1
            if first_active <= period.start:
                quantity, amount, full = Decimal(1), fee, True
            else:
                days = (period.end_date - first_active.date()).days
                with localcontext() as ctx:
                    # Enough digits that the single rounding to cents below is the only one that matters.
                    ctx.prec = 50
                    share = Decimal(days) / Decimal(period.days)
                    amount = fee * Decimal(days) / Decimal(period.days)
                quantity, full = share.quantize(_QUANTITY, rounding=ROUND_HALF_UP), False
            charges.append(
                NumberCharge(
                    number=number,
                    number_type=number_type,
                    first_active=first_active,
                    full_period=full,
                    quantity=quantity,
                    unit_price=fee,
                    amount=Decimal("0.00") if included else round_cents(amount),
                    included=included,
                )
            )
        return charges

    def employees_peak(self, period: Period) -> int:
        """Most employees active at one instant of ``[start, end)``."""
        steps: list[tuple[datetime, int]] = []
        for intervals in self._employees.values():
            for iv in intervals:
                if not iv.overlaps(period):
                    continue
                start = max(iv.start, period.start)
                end = period.end if iv.end is None else min(iv.end, period.end)
                steps += [(start, 1), (end, -1)]
        # At one instant a deactivation sorts before an activation: end-exclusive intervals that merely
        # touch were never active together.
        steps.sort()
        peak = current = 0
        for _, step in steps:
            current += step
            peak = max(peak, current)
        return peak


def _fee(plan: Plan, number_type: str, number: str) -> Decimal:
    if number_type == "LOCAL":
        return plan.numbers.local_fee
    if number_type == "TOLL_FREE":
        return plan.numbers.toll_free_fee
    msg = f"number {number} has type {number_type!r}, which has no fee"
    raise RatingError(msg)


def _in_effect(schedule: Mapping[datetime, str], at: datetime) -> str | None:
    starts = [start for start in schedule if start <= at]
    return schedule[max(starts)] if starts else None


def _open(table: dict[str, list[Interval]], key: str, at: datetime, kind: str | None) -> None:
    intervals = table.setdefault(key, [])
    # Provisioning what is already active changes nothing: its first activation keeps counting.
    if not intervals or intervals[-1].end is not None:
        intervals.append(Interval(at, None, kind))


def _close(table: dict[str, list[Interval]], key: str, at: datetime) -> None:
    intervals = table.get(key)
    if intervals and intervals[-1].end is None:
        intervals[-1] = replace(intervals[-1], end=at)


def _active_at(table: Mapping[str, list[Interval]], ts: datetime) -> list[str]:
    return sorted(key for key, intervals in table.items() if any(iv.active_at(ts) for iv in intervals))


def _normalised(event: ProvisioningEvent) -> ProvisioningEvent:
    return replace(event, occurred_at=require_utc(event.occurred_at, "occurred_at"))


def _event_to_dict(event: ProvisioningEvent) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "tenant_id": event.tenant_id,
        "occurred_at": event.occurred_at.isoformat(),
        "action": event.action,
        "plan_id": event.plan_id,
        "tax_region": event.tax_region,
        "number": event.number,
        "number_type": event.number_type,
        "employee_id": event.employee_id,
        "alert_thresholds_percent": (
            list(event.alert_thresholds_percent) if event.alert_thresholds_percent is not None else None
        ),
    }


def _event_from_dict(data: Mapping[str, Any]) -> ProvisioningEvent:
    return ProvisioningEvent(
        event_id=data["event_id"],
        tenant_id=data["tenant_id"],
        occurred_at=datetime.fromisoformat(data["occurred_at"]),
        action=data["action"],
        plan_id=data.get("plan_id"),
        tax_region=data.get("tax_region"),
        number=data.get("number"),
        number_type=data.get("number_type"),
        employee_id=data.get("employee_id"),
        alert_thresholds_percent=(
            tuple(data["alert_thresholds_percent"])
            if data.get("alert_thresholds_percent") is not None
            else None
        ),
    )
