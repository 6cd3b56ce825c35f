"""Which usage alerts a balance update sends (spec §8, issue 12): thresholds per tenant and the
projected overage. Pure: seconds and aware UTC datetimes in, thresholds and instants out.

Thresholds are whole percents of the period's included seconds, 1 to 100 (the billing docs name 50,
75, 90, 95 and 100). A tenant's own list (ALERT_THRESHOLDS_SET) wins over its plan's catalog default,
which wins over the catalog's, which defaults to 75/90/100.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta

from rating.periods import Period

DEFAULT_THRESHOLDS_PERCENT = (75, 90, 100)
MAX_THRESHOLDS = 10
# The period's rate over less than a day is one or two calls, not a rate: no projected-overage alert
# before a day of the period has passed.
MIN_PROJECTION_ELAPSED = timedelta(days=1)


def threshold_problem(values: Iterable[int]) -> str | None:
    """Why ``values`` is not a usable threshold list, or None. Empty is usable (the defaults)."""
    listed = list(values)
    if len(listed) > MAX_THRESHOLDS:
        return f"at most {MAX_THRESHOLDS} alert thresholds, not {len(listed)}"
    for value in listed:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100:
            return f"alert thresholds are whole percents from 1 to 100, not {value!r}"
    if len(set(listed)) != len(listed):
        return f"alert thresholds repeat a value: {listed}"
    return None


def thresholds_in_effect(
    tenant: Sequence[int] | None, plan: Sequence[int] | None, catalog: Sequence[int]
) -> tuple[int, ...]:
    """The first of tenant, plan and catalog lists that is set and not empty, ascending."""
    for values in (tenant, plan):
        if values:
            return tuple(sorted(values))
    return tuple(sorted(catalog))


def crossed_thresholds(
    included_seconds: int,
    before_seconds: int,
    after_seconds: int,
    thresholds_percent: Sequence[int] = DEFAULT_THRESHOLDS_PERCENT,
) -> list[int]:
    """Thresholds (percent of included) crossed by moving from ``before`` to ``after`` seconds.

    A threshold is crossed when usage reaches it: ``before < t% <= after``. Order of calls does not
    matter for *which* thresholds a period crosses in total, only for which call crosses them.
    """
    if included_seconds <= 0 or after_seconds <= before_seconds:
        return []
    crossed = []
    for percent in sorted(thresholds_percent):
        # Integer arithmetic: reaching 75 % of 18000 s means used * 100 >= 75 * 18000.
        limit = percent * included_seconds
        if before_seconds * 100 < limit <= after_seconds * 100:
            crossed.append(percent)
    return crossed


def exhaustion_at(period: Period, included_seconds: int, used_seconds: int, now: datetime) -> datetime | None:
    """At the period's average rate so far (used over the time since its start), the instant the
    allowance runs out, if inside the period and not run out already; else None. Exact to the
    millisecond (integer arithmetic, rounded up: it has not run out before that millisecond)."""
    if used_seconds <= 0 or used_seconds >= included_seconds or now <= period.start:
        return None
    elapsed_ms = _ms(min(now, period.end) - period.start)
    remaining = included_seconds - used_seconds
    left_ms = -(-elapsed_ms * remaining // used_seconds)
    runs_out = now + timedelta(milliseconds=left_ms)
    return runs_out if runs_out < period.end else None


def projected_overage(period: Period, included_seconds: int, used_seconds: int, now: datetime) -> date | None:
    """The UTC date of the projected-overage alert: the allowance runs out before the period ends at
    the rate so far, measured over at least MIN_PROJECTION_ELAPSED; None when there is no alert."""
    if now - period.start < MIN_PROJECTION_ELAPSED:
        return None
    runs_out = exhaustion_at(period, included_seconds, used_seconds, now)
    return runs_out.date() if runs_out is not None else None


def _ms(delta: timedelta) -> int:
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def threshold_crossing(
    calls: Iterable[tuple[datetime, int]],
    included_seconds: int,
    percent: int,
    not_before: datetime | None = None,
) -> tuple[datetime, int] | None:
    """When a period's usage reached ``percent`` of its included seconds, in event time.

    ``calls`` are the period's calls as ``(ended_at, billable seconds)``, in any order. The crossing is
    the earliest instant at which the calls that had ended by then add up to the threshold; the usage
    returned is theirs at that instant. ``not_before`` (the crossing of a lower threshold already
    announced) moves it later, never earlier, and the usage is then the usage at that later instant.
    So, over any set of calls, a higher threshold never crosses earlier nor with less usage than a
    lower one, whatever order the calls arrived in (docs/decisions.md, "Usage alerts in event time").
    None when the calls do not reach the threshold."""
    if included_seconds <= 0:
        return None
    by_end: dict[datetime, int] = {}
    for ended, seconds in calls:
        by_end[ended] = by_end.get(ended, 0) + seconds
    limit = percent * included_seconds
    used = 0
    crossed = None
    for ended in sorted(by_end):
        used += by_end[ended]
        if used * 100 >= limit:
            crossed = ended
            break
    if crossed is None:
        return None
    if not_before is None or not_before <= crossed:
        return crossed, used
    return not_before, sum(seconds for ended, seconds in by_end.items() if ended <= not_before)
