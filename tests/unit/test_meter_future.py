"""Events dated after the broker's time (rating/timing.py, docs/decisions.md "Future-dated events")."""

from __future__ import annotations

from datetime import timedelta

import pytest

from rating.models import Reason
from rating.timing import future_rejection
from tests.unit.meterkit import NOW, MemoryWorker, at, call, iso, prov, subscribe


@pytest.mark.parametrize(
    ("ahead", "refused"),
    [
        (timedelta(0), False),
        (timedelta(seconds=300), False),
        (timedelta(seconds=301), True),
        (-timedelta(days=400), False),
    ],
)
def test_future_rejection_beyond_the_tolerance_only(ahead: timedelta, refused: bool) -> None:
    result = future_rejection(NOW + ahead, NOW, timedelta(seconds=300))
    assert (result is not None) == refused
    if result is not None:
        assert result.reason == Reason.FUTURE_EVENT


def test_a_call_dated_years_ahead_is_a_future_event_dead_letter_and_its_copy_a_duplicate() -> None:
    w = MemoryWorker()
    future = call("f", "2031-01-01T00:00:00Z", 60)
    w.feed(subscribe(), future, future)
    assert w.stats.dead_letters == {"FUTURE_EVENT": 1}
    assert w.stats.duplicates == {"call": 1}
    assert w.stats.rated == 0
    message = w.outputs("deadletter")[0]["message"]
    assert message.startswith("ended_at 2031-01-01T00:01:00+00:00 is ")
    assert "after the record reached Kafka (2026-12-07T12:00:00+00:00)" in message


def test_the_tolerance_is_a_setting_and_a_call_within_it_is_rated() -> None:
    w = MemoryWorker(future_tolerance_seconds=3600)
    soon = call("soon", iso(NOW + timedelta(minutes=30)), 60)
    later = call("later", iso(NOW + timedelta(hours=2)), 60)
    w.feed(subscribe(), soon, later)
    assert w.stats.rated == 1
    assert w.stats.dead_letters == {"FUTURE_EVENT": 1}


def test_a_future_provisioning_event_changes_no_timeline() -> None:
    w = MemoryWorker()
    w.feed(subscribe("2031-01-01T00:00:00Z"))
    assert w.stats.dead_letters == {"FUTURE_EVENT": 1}
    assert w.parts.tenants.get(0, "t1") is None


def test_the_broker_time_of_the_record_is_the_reference_not_the_wall_clock() -> None:
    """Processing a backlog later changes nothing: the record's own timestamp decides."""
    w = MemoryWorker(future_tolerance_seconds=0)
    old = call("b", "2026-11-02T10:00:00Z", 60)
    w.feed(subscribe(), w.record(old, received=at("2026-11-02T10:01:00Z")))
    early = w.record(call("c", "2026-11-02T10:00:00Z", 60), received=at("2026-11-02T10:00:30Z"))
    w.feed(early)
    assert w.stats.rated == 1
    assert w.stats.dead_letters == {"FUTURE_EVENT": 1}
    assert prov  # builders shared with the other tests
