from __future__ import annotations

from datetime import date, datetime, timedelta
from decimal import Decimal

import pytest

from rating.calls import MAX_CALL_SECONDS, RatedCall, billable_seconds, rate_call, raw_seconds, validate_call
from rating.catalog import Rounding
from rating.errors import RatingError
from rating.models import Reason, Rejection
from rating.subscription import TenantTimeline
from tests.unit.test_rating_support import call, catalog, prov, start, utc

T0 = utc(2026, 11, 5, 10)


@pytest.mark.parametrize(
    ("raw", "minimum", "increment", "billable"),
    [
        ("0", 60, 6, 0),
        ("0", 0, 1, 0),
        ("10", 60, 6, 60),
        ("61", 60, 6, 66),
        ("60", 60, 6, 60),
        ("66.001", 60, 6, 72),
        ("1000.4", 0, 1, 1001),
        ("1000", 0, 1, 1000),
        ("0.001", 0, 1, 1),
        ("0.001", 30, 60, 60),
        ("59.999", 0, 60, 60),
        ("121", 0, 60, 180),
        ("7200", 60, 6, 7200),
    ],
)
def test_billable_seconds(raw: str, minimum: int, increment: int, billable: int) -> None:
    assert (
        billable_seconds(Decimal(raw), Rounding(minimum_seconds=minimum, increment_seconds=increment))
        == billable
    )


def test_billable_seconds_refuses_negative() -> None:
    with pytest.raises(RatingError):
        billable_seconds(Decimal("-1"), Rounding(minimum_seconds=0, increment_seconds=1))


@pytest.mark.parametrize(
    ("answered", "ended", "disposition", "raw"),
    [
        (T0 + timedelta(seconds=2), T0 + timedelta(seconds=1002, milliseconds=400), "ANSWERED", "1000.4"),
        (T0, T0 + timedelta(seconds=10), "ANSWERED", "10"),
        (T0, T0 + timedelta(milliseconds=1), "ANSWERED", "0.001"),
        (T0, T0, "ANSWERED", "0"),
        (None, T0 + timedelta(seconds=30), "ANSWERED", "0"),
        (None, T0 + timedelta(seconds=30), "NO_ANSWER", "0"),
        (T0, T0 + timedelta(seconds=30), "FAILED", "0"),
        (T0, T0 + timedelta(seconds=30), "BUSY", "0"),
    ],
)
def test_raw_seconds(answered: datetime | None, ended: datetime, disposition: str, raw: str) -> None:
    value = raw_seconds(call(T0, answered, ended, disposition))
    assert value == Decimal(raw)
    assert str(value) == raw


@pytest.mark.parametrize(
    ("started", "answered", "ended", "disposition", "reason"),
    [
        (T0, T0 + timedelta(seconds=5), T0 + timedelta(seconds=4), "ANSWERED", Reason.ENDED_BEFORE_ANSWERED),
        (T0, None, T0 - timedelta(milliseconds=1), "NO_ANSWER", Reason.NEGATIVE_DURATION),
        (T0, T0 + timedelta(seconds=5), T0 - timedelta(seconds=1), "ANSWERED", Reason.NEGATIVE_DURATION),
        (T0, T0 - timedelta(seconds=1), T0 + timedelta(seconds=4), "ANSWERED", Reason.INVALID_EVENT),
        (
            T0,
            T0,
            T0 + timedelta(seconds=MAX_CALL_SECONDS, milliseconds=1),
            "ANSWERED",
            Reason.ABSURD_DURATION,
        ),
        (T0, T0, T0 + timedelta(seconds=10), "HUNG_UP", Reason.INVALID_EVENT),
        (T0.replace(tzinfo=None), None, T0, "NO_ANSWER", Reason.INVALID_EVENT),
    ],
)
def test_validate_call_rejects(
    started: datetime, answered: datetime | None, ended: datetime, disposition: str, reason: Reason
) -> None:
    rejection = validate_call(call(started, answered, ended, disposition))
    assert rejection is not None and rejection.reason == reason and rejection.message


@pytest.mark.parametrize(
    ("answered", "ended", "disposition"),
    [
        (T0, T0 + timedelta(seconds=MAX_CALL_SECONDS), "ANSWERED"),
        (None, T0 + timedelta(seconds=30), "ANSWERED"),
        (T0, T0, "ANSWERED"),
        (None, T0, "CANCELLED"),
    ],
)
def test_validate_call_accepts(answered: datetime | None, ended: datetime, disposition: str) -> None:
    assert validate_call(call(T0, answered, ended, disposition)) is None


def _timeline(*events: object) -> TenantTimeline:
    return TenantTimeline.from_events("t1", events)  # type: ignore[arg-type]


def test_rate_call_uses_period_plan_and_its_rounding() -> None:
    timeline = _timeline(start(utc(2026, 10, 15, 8), plan="capped"))
    rated = rate_call(call(T0, T0, T0 + timedelta(seconds=61)), timeline, catalog())
    assert isinstance(rated, RatedCall)
    assert (rated.period.start_date, rated.period.end_date) == (date(2026, 10, 15), date(2026, 11, 15))
    assert (rated.plan_id, rated.raw_seconds, rated.billable_seconds, rated.catalog_revision) == (
        "capped",
        Decimal(61),
        66,
        3,
    )


def test_call_a_millisecond_before_period_end_belongs_to_that_period() -> None:
    timeline = _timeline(start(utc(2026, 10, 15, 8)))
    started = utc(2026, 12, 14, 23, 59, 59, 999)
    rated = rate_call(call(started, utc(2026, 12, 15), utc(2026, 12, 15, 2)), timeline, catalog())
    assert isinstance(rated, RatedCall)
    assert rated.period.start_date == date(2026, 11, 15)
    assert rated.billable_seconds == 7200


def test_call_on_subscription_day_before_subscribing_is_in_first_period() -> None:
    timeline = _timeline(start(utc(2026, 10, 1, 9)))
    rated = rate_call(
        call(utc(2026, 10, 1, 8), utc(2026, 10, 1, 8), utc(2026, 10, 1, 8, 1)), timeline, catalog()
    )
    assert isinstance(rated, RatedCall) and rated.period.start_date == date(2026, 10, 1)


@pytest.mark.parametrize(
    ("events", "started", "reason"),
    [
        ((), utc(2026, 11, 5), Reason.NO_SUBSCRIPTION),
        ((start(utc(2026, 10, 1, 9)),), utc(2026, 9, 30, 23, 59, 59), Reason.NO_SUBSCRIPTION),
        (
            (start(utc(2026, 10, 1, 9)), prov("SUBSCRIPTION_CANCELLED", utc(2026, 10, 20))),
            utc(2026, 11, 1),
            Reason.NO_SUBSCRIPTION,
        ),
        ((start(utc(2026, 10, 1, 9), plan="gone"),), utc(2026, 11, 5), Reason.UNKNOWN_PLAN),
        # "capped" exists only in the first price book; periods from December use the second one.
        ((start(utc(2026, 11, 1), plan="capped"),), utc(2026, 12, 5), Reason.UNKNOWN_PLAN),
        ((start(utc(2025, 12, 1)),), utc(2025, 12, 5), Reason.UNKNOWN_PLAN),
    ],
)
def test_rate_call_rejections(events: tuple[object, ...], started: datetime, reason: Reason) -> None:
    result = rate_call(
        call(started, None, started + timedelta(seconds=5), "NO_ANSWER"), _timeline(*events), catalog()
    )
    assert isinstance(result, Rejection) and result.reason == reason


def test_call_after_cancellation_within_the_cancelled_period_is_rated() -> None:
    timeline = _timeline(start(utc(2026, 10, 1, 9)), prov("SUBSCRIPTION_CANCELLED", utc(2026, 10, 20)))
    rated = rate_call(
        call(utc(2026, 10, 25), utc(2026, 10, 25), utc(2026, 10, 25, 0, 1)), timeline, catalog()
    )
    assert isinstance(rated, RatedCall) and rated.billable_seconds == 60


def test_rate_call_refuses_another_tenants_timeline() -> None:
    timeline = TenantTimeline.from_events("other", [start(utc(2026, 10, 1), tenant="other")])
    with pytest.raises(RatingError):
        rate_call(call(T0, None, T0, "NO_ANSWER"), timeline, catalog())
