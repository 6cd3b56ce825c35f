"""Rules on an event's own time that hold whatever its kind (docs/decisions.md, "Future-dated events").

A gateway reports when a call ended and the provisioning service when a change occurred; both have
happened by the time the record reaches Kafka. An event dated later than the broker's time by more than
a tolerance (clock skew) is a clock fault, not usage: counted, it would raise alerts dated in the future
and make ``/authorize`` refuse a tenant today on calls that have not happened.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from rating.models import Reason, Rejection


def future_rejection(
    event_time: datetime, received_at: datetime, tolerance: timedelta, what: str = "event time"
) -> Rejection | None:
    """``FUTURE_EVENT`` when ``event_time`` is more than ``tolerance`` after ``received_at`` (the time the
    broker stamped on the record); None otherwise. Both are aware datetimes."""
    if event_time - received_at <= tolerance:
        return None
    ahead = event_time - received_at
    return Rejection(
        Reason.FUTURE_EVENT,
        f"{what} {event_time.isoformat()} is {ahead} after the record reached Kafka "
        f"({received_at.isoformat()}); at most {tolerance} of clock skew is accepted",
    )
