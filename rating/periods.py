"""Billing periods (spec §4): anchored on the subscription's UTC day of month, end exclusive."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime

from rating.errors import RatingError

_MONTH_RE = re.compile(r"(\d{4})-(\d{2})")


def require_utc(ts: datetime, what: str) -> datetime:
    """Return ``ts`` in UTC; a naive datetime is refused because its instant is unknowable."""
    if ts.tzinfo is None or ts.utcoffset() is None:
        msg = f"{what} must be timezone-aware, got naive {ts.isoformat()}"
        raise RatingError(msg)
    return ts.astimezone(UTC)


@dataclass(frozen=True, slots=True, order=True)
class Period:
    """A half-open billing interval ``[start, end)`` between two anchor-day midnights (UTC)."""

    start: datetime
    end: datetime

    def __post_init__(self) -> None:
        # Normalising here lets equality and hashing agree for the same instant in any zone.
        object.__setattr__(self, "start", require_utc(self.start, "period start"))
        object.__setattr__(self, "end", require_utc(self.end, "period end"))
        if self.end <= self.start:
            msg = f"period end {self.end.isoformat()} is not after its start {self.start.isoformat()}"
            raise RatingError(msg)

    @property
    def days(self) -> int:
        return (self.end - self.start).days

    @property
    def label(self) -> str:
        return self.start.strftime("%Y%m%d")

    @property
    def start_date(self) -> date:
        return self.start.date()

    @property
    def end_date(self) -> date:
        return self.end.date()

    def contains(self, ts: datetime) -> bool:
        return self.start <= ts < self.end


def anchor_day(subscribed_at: datetime) -> int:
    return require_utc(subscribed_at, "subscribed_at").day


def _check_anchor(anchor: int) -> None:
    if not 1 <= anchor <= 31:
        msg = f"anchor day must be 1..31, got {anchor}"
        raise RatingError(msg)


def _boundary(anchor: int, year: int, month: int) -> datetime:
    # A month without the anchor day (29-31) puts the boundary on its last day (spec §4).
    day = min(anchor, calendar.monthrange(year, month)[1])
    return datetime(year, month, day, tzinfo=UTC)


def _next_month(year: int, month: int) -> tuple[int, int]:
    return (year + 1, 1) if month == 12 else (year, month + 1)


def _previous_month(year: int, month: int) -> tuple[int, int]:
    return (year - 1, 12) if month == 1 else (year, month - 1)


def period_starting_in(anchor: int, year: int, month: int) -> Period:
    _check_anchor(anchor)
    if not 1 <= month <= 12:
        msg = f"month must be 1..12, got {month}"
        raise RatingError(msg)
    return Period(_boundary(anchor, year, month), _boundary(anchor, *_next_month(year, month)))


def period_containing(anchor: int, ts: datetime) -> Period:
    ts = require_utc(ts, "timestamp")
    if ts >= _boundary(anchor, ts.year, ts.month):
        return period_starting_in(anchor, ts.year, ts.month)
    return period_starting_in(anchor, *_previous_month(ts.year, ts.month))


def parse_month(text: str) -> tuple[int, int]:
    """``"YYYY-MM"`` -> ``(year, month)``, as given to ``--period``."""
    match = _MONTH_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if match is None or not 1 <= int(match.group(2)) <= 12:
        msg = f"period must look like YYYY-MM (e.g. 2026-11), got {text!r}"
        raise RatingError(msg)
    return int(match.group(1)), int(match.group(2))
