"""The tenant API's view applies changelog records as the stream worker wrote them (JSON key and
value, tombstones on delete) and skips what it cannot read without losing what it already holds
(pipeline/tenantapi/view.py ``apply``)."""

from __future__ import annotations

import json
from datetime import datetime

from pipeline.tenantapi.answers import authorize_answer, balance_key
from pipeline.tenantapi.view import ChangelogView
from rating.subscription import TenantTimeline
from tests.unit.test_rating_authorize import plans
from tests.unit.test_rating_support import start, utc

TENANTS, BALANCES = "app-tenants-changelog", "app-balances-changelog"
SUB = start(utc(2026, 10, 1, 9), "hardstop")  # 120 included seconds, then refused
PERIOD = utc(2026, 11, 1)


def view() -> ChangelogView:
    return ChangelogView(lambda: "unused:9092", "app", 6)


def enc(value: object) -> bytes:
    return json.dumps(value).encode()


def timeline_record() -> bytes:
    return enc(TenantTimeline.from_events("t1", [SUB]).to_dict())


def test_topics_are_fausts_changelog_names() -> None:
    assert view().topics == {TENANTS: "tenants", BALANCES: "balances"}


def test_balances_are_set_replaced_and_deleted_by_tombstone() -> None:
    v, key = view(), enc(balance_key("t1", PERIOD))
    v.apply(BALANCES, key, enc(47))
    assert v.used_seconds(balance_key("t1", PERIOD)) == 47
    v.apply(BALANCES, key, enc(120))
    assert v.used_seconds(balance_key("t1", PERIOD)) == 120
    v.apply(BALANCES, key, None)
    assert v.used_seconds(balance_key("t1", PERIOD)) == 0
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
    v.apply(BALANCES, enc("k"), enc(5))
    v.apply(TENANTS, enc("t1"), b"{not json")
    v.apply(TENANTS, enc("t1"), enc({"version": 999, "tenant_id": "t1", "events": []}))
    v.apply(BALANCES, enc("k"), enc("five"))
    v.apply(BALANCES, None, enc(7))
    v.apply(BALANCES, enc(["not", "a", "str"]), enc(7))
    assert v.timeline("t1") is not None
    assert v.used_seconds("k") == 5
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
    v.apply(BALANCES, enc(balance_key("t1", PERIOD)), enc(100))
    timeline = v.timeline("t1")
    assert timeline is not None
    assert timeline.period_at(utc(2026, 11, 20)).start == PERIOD

    def lookup(period_start: datetime) -> int:
        return v.used_seconds(balance_key("t1", period_start))

    status, fresh = authorize_answer("t1", timeline, lambda _s: 0, plans(), utc(2026, 11, 20))
    status2, spent = authorize_answer("t1", timeline, lookup, plans(), utc(2026, 11, 20))
    assert (status, status2) == (200, 200)
    assert (fresh["allowed"], fresh["max_call_seconds"]) == (True, 120)
    assert (spent["allowed"], spent["max_call_seconds"]) == (True, 20)
