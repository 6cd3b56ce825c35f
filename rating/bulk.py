"""Rating many calls of one tenant fast (replay, backfill): ``rate_call`` on integer epoch millis.

The live path rates one call at a time from datetimes; a replay rates a month of calls and cannot
afford a Period, a plan lookup and Decimal arithmetic per call. ``TenantRater`` gives exactly what
``rate_call`` gives (tests/unit/test_bulk_rating.py proves it on the examples and on generated calls):

- a call that is valid on its face (known disposition, started <= answered <= ended, at most a day
  long) in a period already seen is rated from the cached period, plan and rounding in integers;
- anything else (an invalid call, a period not seen yet, a period no subscription covers, an unknown
  plan) goes through ``rate_call`` itself, so every rejection and its message is the reference one.

Why the cache is exact: ``rate_call``'s period depends only on the tenant's anchor and ``started_at``,
the plan only on the period, and the rounding only on the plan and the period start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from rating.calls import DISPOSITIONS, MAX_CALL_SECONDS, rate_call
from rating.catalog import Catalog
from rating.models import CallEvent, Rejection
from rating.periods import Period
from rating.subscription import TenantTimeline

_MAX_CALL_MILLIS = MAX_CALL_SECONDS * 1000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def millis_of(ts: datetime) -> int:
    """Epoch milliseconds of an aware datetime (exact for the millisecond timestamps calls carry)."""
    return (ts - _EPOCH) // timedelta(milliseconds=1)


def raw_seconds_of(raw_millis: int) -> Decimal:
    """``raw_millis`` as the exact decimal seconds ``rate_call`` reports (equal by value)."""
    return Decimal(raw_millis).scaleb(-3)


@dataclass(frozen=True, slots=True)
class BulkRating:
    """What ``rate_call``'s RatedCall says of a call, in integers (raw seconds as exact milliseconds)."""

    period: Period
    period_start_millis: int
    period_end_millis: int
    plan_id: str
    raw_millis: int
    billable_seconds: int


@dataclass(frozen=True, slots=True)
class _CachedPeriod:
    start_millis: int
    end_millis: int
    period: Period
    plan_id: str
    increment_millis: int
    increment_seconds: int
    minimum_seconds: int


class TenantRater:
    """Rates one tenant's calls against its timeline and a catalog; periods are cached as seen."""

    def __init__(self, timeline: TenantTimeline, catalog: Catalog) -> None:
        self.timeline = timeline
        self.catalog = catalog
        self._periods: list[_CachedPeriod] = []
        self._last: _CachedPeriod | None = None

    def rate(
        self,
        started_millis: int,
        answered_millis: int | None,
        ended_millis: int,
        disposition: str,
        call: Callable[[], CallEvent],
    ) -> BulkRating | Rejection:
        """Rate a call given its timestamps in epoch millis; ``call()`` builds the CallEvent, needed
        only when the call is handed to ``rate_call`` (never for a valid call in a known period)."""
        if (
            disposition not in DISPOSITIONS
            or ended_millis < started_millis
            or ended_millis - started_millis > _MAX_CALL_MILLIS
            or (answered_millis is not None and not started_millis <= answered_millis <= ended_millis)
        ):
            return self._reference(call())
        cached = self._last
        if cached is None or not cached.start_millis <= started_millis < cached.end_millis:
            cached = self._find(started_millis)
            if cached is None:
                return self._reference(call())
            self._last = cached
        raw_millis = 0
        if disposition == "ANSWERED" and answered_millis is not None:
            raw_millis = ended_millis - answered_millis
        billable = 0
        if raw_millis:
            units = -(-raw_millis // cached.increment_millis)  # whole increments, rounded up
            billable = max(cached.minimum_seconds, units * cached.increment_seconds)
        return BulkRating(
            cached.period, cached.start_millis, cached.end_millis, cached.plan_id, raw_millis, billable
        )

    def _find(self, started_millis: int) -> _CachedPeriod | None:
        for cached in self._periods:
            if cached.start_millis <= started_millis < cached.end_millis:
                return cached
        return None

    def _reference(self, call: CallEvent) -> BulkRating | Rejection:
        """``rate_call`` itself; a rated call's period is cached for the calls that follow."""
        result = rate_call(call, self.timeline, self.catalog)
        if isinstance(result, Rejection):
            return result
        period = result.period
        start, end = millis_of(period.start), millis_of(period.end)
        if self._find(start) is None:
            rounding = self.catalog.plan_for(result.plan_id, period.start).rounding
            self._periods.append(
                _CachedPeriod(
                    start,
                    end,
                    period,
                    result.plan_id,
                    rounding.increment_seconds * 1000,
                    rounding.increment_seconds,
                    rounding.minimum_seconds,
                )
            )
        raw = result.raw_seconds.scaleb(3)
        return BulkRating(period, start, end, result.plan_id, int(raw), result.billable_seconds)
