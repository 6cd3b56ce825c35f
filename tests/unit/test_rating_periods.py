from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from rating.errors import RatingError
from rating.periods import Period, anchor_day, parse_month, period_containing, period_starting_in
from tests.unit.test_rating_support import utc


@pytest.mark.parametrize(
    ("anchor", "year", "month", "start", "end", "days"),
    [
        (1, 2026, 11, date(2026, 11, 1), date(2026, 12, 1), 30),
        (15, 2026, 12, date(2026, 12, 15), date(2027, 1, 15), 31),
        (31, 2026, 1, date(2026, 1, 31), date(2026, 2, 28), 28),
        (31, 2026, 2, date(2026, 2, 28), date(2026, 3, 31), 31),
        (31, 2026, 4, date(2026, 4, 30), date(2026, 5, 31), 31),
        (31, 2026, 3, date(2026, 3, 31), date(2026, 4, 30), 30),
        (30, 2026, 1, date(2026, 1, 30), date(2026, 2, 28), 29),
        (30, 2026, 2, date(2026, 2, 28), date(2026, 3, 30), 30),
        (30, 2028, 2, date(2028, 2, 29), date(2028, 3, 30), 30),
        (29, 2026, 1, date(2026, 1, 29), date(2026, 2, 28), 30),
        (29, 2026, 2, date(2026, 2, 28), date(2026, 3, 29), 29),
        (29, 2028, 1, date(2028, 1, 29), date(2028, 2, 29), 31),
        (29, 2028, 2, date(2028, 2, 29), date(2028, 3, 29), 29),
        (31, 2028, 1, date(2028, 1, 31), date(2028, 2, 29), 29),
        (31, 2026, 9, date(2026, 9, 30), date(2026, 10, 31), 31),
        (28, 2026, 2, date(2026, 2, 28), date(2026, 3, 28), 28),
    ],
)
def test_period_starting_in(anchor: int, year: int, month: int, start: date, end: date, days: int) -> None:
    period = period_starting_in(anchor, year, month)
    assert (period.start_date, period.end_date, period.days) == (start, end, days)
    assert period.start.tzinfo is UTC and period.start.time() == datetime.min.time()
    assert period.label == start.strftime("%Y%m%d")


@pytest.mark.parametrize(
    ("anchor", "ts", "start"),
    [
        (1, utc(2026, 11, 1), date(2026, 11, 1)),
        (1, utc(2026, 11, 30, 23, 59, 59, 999), date(2026, 11, 1)),
        (1, utc(2026, 12, 1), date(2026, 12, 1)),
        (15, utc(2026, 12, 14, 23, 59, 59, 999), date(2026, 11, 15)),
        (15, utc(2026, 12, 15), date(2026, 12, 15)),
        (15, utc(2027, 1, 3), date(2026, 12, 15)),
        (31, utc(2026, 2, 27, 23), date(2026, 1, 31)),
        (31, utc(2026, 2, 28), date(2026, 2, 28)),
        (31, utc(2026, 3, 30, 12), date(2026, 2, 28)),
        (31, utc(2026, 3, 31), date(2026, 3, 31)),
        (30, utc(2028, 2, 29, 1), date(2028, 2, 29)),
        (30, utc(2028, 2, 28, 23), date(2028, 1, 30)),
        (29, utc(2026, 3, 1), date(2026, 2, 28)),
        (1, utc(2027, 1, 1), date(2027, 1, 1)),
        (5, utc(2027, 1, 4), date(2026, 12, 5)),
    ],
)
def test_period_containing(anchor: int, ts: datetime, start: date) -> None:
    period = period_containing(anchor, ts)
    assert period.start_date == start
    assert period.start <= ts < period.end


def test_end_is_exclusive_and_next_period_begins_there() -> None:
    period = period_starting_in(15, 2026, 11)
    last_ms = period.end - timedelta(milliseconds=1)
    assert period_containing(15, last_ms) == period
    assert period_containing(15, period.end) == period_starting_in(15, 2026, 12)
    assert not period.contains(period.end) and period.contains(last_ms)


def test_other_offsets_are_normalised_to_utc() -> None:
    # 2026-11-15 01:00 at +02:00 is still 14 November in UTC.
    ts = datetime(2026, 11, 15, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert period_containing(15, ts).start_date == date(2026, 10, 15)
    assert anchor_day(ts) == 14


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(RatingError):
        period_containing(1, datetime(2026, 11, 1))
    with pytest.raises(RatingError):
        Period(datetime(2026, 11, 1), datetime(2026, 12, 1))


def test_periods_order_by_start() -> None:
    assert period_starting_in(1, 2026, 10) < period_starting_in(1, 2026, 11)


@pytest.mark.parametrize(("text", "expected"), [("2026-11", (2026, 11)), ("2027-01", (2027, 1))])
def test_parse_month(text: str, expected: tuple[int, int]) -> None:
    assert parse_month(text) == expected


@pytest.mark.parametrize("text", ["2026-13", "2026-00", "2026-1", "26-11", "2026/11", "", "2026-11-01"])
def test_parse_month_rejects(text: str) -> None:
    with pytest.raises(RatingError, match="YYYY-MM"):
        parse_month(text)


@pytest.mark.parametrize("anchor", [0, 32])
def test_bad_anchor(anchor: int) -> None:
    with pytest.raises(RatingError):
        period_starting_in(anchor, 2026, 1)
