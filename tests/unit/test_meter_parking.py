"""Parked calls (pipeline/stream/parking.py and the Meter's release and expiry): calls that arrive before
their tenant's subscription, and calls no subscription covers yet."""

from __future__ import annotations

import time

from pipeline.stream.parking import ParkedCall, ParkingLot
from pipeline.stream.source import CALL, SourceRecord
from pipeline.stream.state import MemoryTable
from tests.unit.meterkit import MemoryWorker, call, prov, subscribe

NOV = "2026-11-01T00:00:00Z"


def test_calls_before_the_subscription_are_parked_then_rated_in_arrival_order() -> None:
    w = MemoryWorker()
    w.feed(call("a", "2026-11-03T10:00:00Z", 60), call("b", "2026-11-02T10:00:00Z", 30))
    assert (w.stats.parked, w.stats.rated) == (2, 0)
    w.feed(call("a", "2026-11-03T10:00:00Z", 60))  # a retry while parked is a copy
    w.feed(subscribe())
    assert (w.stats.unparked, w.stats.rated, w.stats.duplicates) == (2, 2, {"call": 1})
    assert [r["event_id"] for r in w.outputs("calls.rated")] == ["a", "b"]
    assert w.used(NOV) == 90
    assert w.parts.parking.take(0, "t1") == []


def test_a_call_no_subscription_covers_is_dead_lettered_at_once_and_revived_by_an_earlier_start() -> None:
    w = MemoryWorker()
    w.feed(subscribe("2026-11-10T00:00:00Z"), call("early", "2026-11-05T10:00:00Z", 40))
    assert w.stats.dead_letters == {"NO_SUBSCRIPTION": 1}
    assert w.stats.rated == 0
    # An earlier SUBSCRIPTION_STARTED arrives later (a new id): the call is covered after all.
    w.feed(
        prov(
            "sub-earlier",
            "2026-11-01T00:00:00Z",
            "SUBSCRIPTION_STARTED",
            plan_id="starter",
            tax_region="NONE",
        )
    )
    assert (w.stats.revived, w.stats.rated) == (1, 1)
    assert w.stats.dead_letters == {"NO_SUBSCRIPTION": 1}  # dead-lettered once, rated once


def test_a_parked_call_past_the_timeout_is_a_dead_letter_and_a_later_resend_is_rated() -> None:
    w = MemoryWorker(parking_timeout_seconds=0)
    w.feed(call("a", "2026-11-03T10:00:00Z", 60))
    assert w.stats.parked == 1
    w.meter._parking_swept.clear()
    time.sleep(0.002)
    w.feed(prov("n", "2026-11-03T10:00:00Z", "NUMBER_PROVISIONED", number="+1555", number_type="LOCAL"))
    assert w.stats.dead_letters == {"NO_SUBSCRIPTION": 1}
    assert "within the parking timeout (0 s)" in w.outputs("deadletter")[0]["message"]
    # Its key was released: once the tenant is subscribed, a resend is rated.
    w.feed(subscribe(), call("a", "2026-11-03T10:00:00Z", 60))
    assert (w.stats.rated, w.stats.duplicates) == (1, {})


def test_the_parking_lot_keeps_arrival_order_and_expires_by_parking_time() -> None:
    lot = ParkingLot(MemoryTable())

    def parked(offset: int, at_ms: int, revivable: bool = False) -> ParkedCall:
        return ParkedCall(
            SourceRecord("calls", 0, offset, b"t", b"v%d" % offset, at_ms, CALL), at_ms, revivable
        )

    for item in (parked(1, 100), parked(2, 300, True), parked(3, 200)):
        lot.park("t", item)
    expired = lot.expire(0, 250)
    assert [(t, c.source.offset) for t, c in expired] == [("t", 1), ("t", 3)]
    assert [(c.source.offset, c.revivable, c.source.value) for c in lot.take(0, "t")] == [(2, True, b"v2")]
    assert lot.take(0, "t") == []
