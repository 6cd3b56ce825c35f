"""The tenant API's view applies changelog records as the stream worker wrote them (JSON key and
value, tombstones on delete) and skips what it cannot read without losing what it already holds
(pipeline/tenantapi/view.py ``apply``)."""

from __future__ import annotations

import json

from pipeline.partitioning import partition_for
from pipeline.stream.keys import DAY_MS, balance_key, window_key
from pipeline.tenantapi.answers import respond
from pipeline.tenantapi.view import ChangelogView
from rating.periods import Period
from rating.subscription import TenantTimeline
from tests.unit.test_rating_authorize import plans
from tests.unit.test_rating_support import start, utc

TENANTS, BALANCES = "app-tenants-changelog", "app-balances-changelog"
SUB = start(utc(2026, 10, 1, 9), "hardstop")  # 120 included seconds, then refused
PERIOD = utc(2026, 11, 1)
NOVEMBER = Period(PERIOD, utc(2026, 12, 1))


def view(retention_days: int = 40) -> ChangelogView:
    return ChangelogView(lambda: "unused:9092", "app", 6, retention_days)


def enc(value: object) -> bytes:
    return json.dumps(value).encode()


def timeline_record() -> bytes:
    return enc(TenantTimeline.from_events("t1", [SUB]).to_dict())


def test_topics_are_fausts_changelog_names() -> None:
    assert view().topics == {TENANTS: "tenants", BALANCES: "balances"}


def test_balances_are_set_replaced_and_deleted_by_tombstone() -> None:
    v, key = view(), enc(balance_key("t1", PERIOD))
    v.apply(BALANCES, key, enc(47))
    assert v.used_seconds("t1", NOVEMBER) == 47
    v.apply(BALANCES, key, enc(120))
    assert v.used_seconds("t1", NOVEMBER) == 120
    v.apply(BALANCES, key, None)
    assert v.used_seconds("t1", NOVEMBER) == 0
    assert v.records_applied == 3


def test_timelines_are_set_and_deleted_by_tombstone() -> None:
    v = view()
    v.apply(TENANTS, enc("t1"), timeline_record())
    timeline = v.timeline("t1")
    assert timeline is not None
    assert [e.event_id for e in timeline.events] == [SUB.event_id]
    v.apply(TENANTS, enc("t1"), None)
    assert v.timeline("t1") is None


def test_unreadable_records_are_skipped_and_keep_the_last_good_value() -> None:
    v = view()
    v.apply(TENANTS, enc("t1"), timeline_record())
    key = enc(balance_key("t1", PERIOD))
    v.apply(BALANCES, key, enc(5))
    v.apply(TENANTS, enc("t1"), b"{not json")
    v.apply(TENANTS, enc("t1"), enc({"version": 999, "tenant_id": "t1", "events": []}))
    v.apply(BALANCES, key, enc("five"))
    v.apply(BALANCES, None, enc(7))
    v.apply(BALANCES, enc(["not", "a", "str"]), enc(7))
    assert v.timeline("t1") is not None
    assert v.used_seconds("t1", NOVEMBER) == 5
    assert v.records_applied == 2


def test_serving_starts_only_once_every_partition_reached_its_end() -> None:
    v = view()
    v._pending = {(TENANTS, 0), (BALANCES, 0)}
    assert v.not_serving() == "tenant API starting: reading the committed state"
    v._reached_end(TENANTS, 0)
    assert v.not_serving() is not None
    v._reached_end(BALANCES, 0)
    assert v.not_serving() is None
    assert v.status()["caught_up"] is True


def test_authorize_from_the_view_counts_the_committed_period_balance() -> None:
    v = view()
    v.apply(TENANTS, enc("t1"), timeline_record())
    v._pending = set()
    v.caught_up.set()
    assert v.timeline("t1") is not None
    assert respond("authorize", "t1", "2026-11-20T00:00:00Z", v, plans())[1]["max_call_seconds"] == 120
    v.apply(BALANCES, enc(balance_key("t1", PERIOD)), enc(100))
    status, spent = respond("authorize", "t1", "2026-11-20T00:00:00Z", v, plans())
    assert status == 200
    assert (spent["allowed"], spent["max_call_seconds"]) == (True, 20)


def test_a_period_the_live_window_closed_is_answered_410_not_with_a_stale_number() -> None:
    """The workers' live window (stream/window.py) reached a day 3 days after November ended: with a
    3-day retention November is the ledger's now, December is still live."""
    v = view(retention_days=3)
    v.apply(TENANTS, enc("t1"), timeline_record())
    v.apply(BALANCES, enc(balance_key("t1", PERIOD)), enc(100))
    partition = partition_for("t1", 6)
    day = int(utc(2026, 12, 4).timestamp() * 1000)
    v.apply(BALANCES, enc(window_key(partition)), enc(day - DAY_MS))  # Dec 3: November still live
    assert v.used_seconds("t1", NOVEMBER) == 100
    v.apply(BALANCES, enc(window_key(partition)), enc(day))
    assert v.used_seconds("t1", NOVEMBER) is None
    v._pending = set()
    v.caught_up.set()
    status, body = respond("balances", "t1", "2026-11-20T00:00:00Z", v, plans())
    assert status == 410
    assert body["error"] == (
        "the period starting 2026-11-01 is closed: its usage is the ledger's "
        "(callmeter usage t1 --period 2026-11)"
    )
    assert respond("balances", "t1", "2026-12-02T00:00:00Z", v, plans())[0] == 200
    # Another partition's window closes nothing of t1's.
    v.apply(BALANCES, enc(window_key((partition + 1) % 6)), enc(day + 90 * DAY_MS))
    assert respond("balances", "t1", "2026-12-02T00:00:00Z", v, plans())[0] == 200


def test_a_closed_period_is_answered_from_the_ledger_when_there_is_one() -> None:
    v = view(retention_days=3)
    v.apply(TENANTS, enc("t1"), timeline_record())
    v.apply(BALANCES, enc(balance_key("t1", PERIOD)), enc(100))  # what the workers had counted
    v.apply(BALANCES, enc(window_key(partition_for("t1", 6))), enc(int(utc(2026, 12, 20).timestamp() * 1000)))
    v._pending = set()
    v.caught_up.set()
    asked = []

    def ledger(tenant: str, timeline: TenantTimeline, period: Period) -> int:
        asked.append((tenant, period.start))
        return 110

    status, body = respond("balances", "t1", "2026-11-20T00:00:00Z", v, plans(), ledger)
    assert (status, body["used_seconds"], body["source"]) == (200, 110, "ledger")
    assert asked == [("t1", PERIOD)]
    status, body = respond("authorize", "t1", "2026-11-20T00:00:00Z", v, plans(), ledger)
    assert (status, body["allowed"], body["source"]) == (200, True, "ledger")
    assert body["max_call_seconds"] == 10

    def down(tenant: str, timeline: TenantTimeline, period: Period) -> int:
        raise OSError("connection refused")

    status, body = respond("balances", "t1", "2026-11-20T00:00:00Z", v, plans(), down)
    assert (status, body["error"]) == (
        503,
        "the period is closed and the ledger did not answer: connection refused",
    )
    # A live period never asks the ledger.
    assert respond("balances", "t1", "2026-12-20T00:00:00Z", v, plans(), down)[0] == 200
