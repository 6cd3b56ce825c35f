"""The balance book (pipeline/stream/balances.py): live balances, their coalescing, re-rating when the
timeline changes, and usage alerts that never contradict each other whatever the arrival order."""

from __future__ import annotations

import random
from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.stream.keys import balance_key
from rating.alerts import threshold_crossing
from tests.unit.meterkit import MemoryWorker, at, call, iso, prov, subscribe

NOV, DEC = "2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z"


def test_balances_count_billable_seconds_per_period() -> None:
    w = MemoryWorker()
    w.feed(subscribe(), call("a", "2026-11-02T10:00:00Z", 60.2), call("b", "2026-12-02T10:00:00Z", 30))
    assert (w.used(NOV), w.used(DEC)) == (61, 30)  # starter rounds up to whole seconds
    assert w.tables["balances"].get(0, balance_key("t1", at(NOV))) == 61


def test_a_balance_is_written_once_per_flush_however_many_calls_changed_it() -> None:
    w = MemoryWorker()
    w.feed(subscribe())
    book, balances = w.parts.book, w.tables["balances"]
    writes = balances.writes
    timeline = w.parts.tenants.get(0, "t1")
    assert timeline is not None
    from pipeline.records import call_from_record
    from rating.calls import RatedCall, rate_call
    from schemas.json_events import parse_json_event

    for i in range(5):
        rated = rate_call(
            call_from_record(parse_json_event(call(f"c{i}", "2026-11-02T10:00:00Z", 10))[1]),
            timeline,
            w.catalog,
        )
        assert isinstance(rated, RatedCall)
        book.add(0, rated, timeline)
    assert balances.writes == writes  # nothing written yet: the book holds the changes
    assert book.used(0, "t1", at(NOV)) == 50
    assert book.flush() == 1
    assert balances.writes == writes + 1
    assert balances.get(0, balance_key("t1", at(NOV))) == 50
    assert book.flush() == 0


def test_a_cancellation_rerates_the_remembered_calls_of_every_live_period() -> None:
    w = MemoryWorker()
    w.feed(subscribe(), call("a", "2026-11-05T10:00:00Z", 60), call("b", "2026-12-05T10:00:00Z", 40))
    w.feed(prov("c", "2026-11-20T00:00:00Z", "SUBSCRIPTION_CANCELLED"))
    # No period that starts after the cancellation is billed: December's call counts for nothing.
    assert (w.used(NOV), w.used(DEC)) == (60, 0)
    assert w.stats.rebalanced == 1


def test_an_earlier_start_moves_the_anchor_and_the_balances_follow() -> None:
    w = MemoryWorker()
    w.feed(subscribe("2026-11-15T00:00:00Z"), call("a", "2026-11-20T10:00:00Z", 60))
    assert w.used("2026-11-15T00:00:00Z") == 60
    w.feed(
        prov("sub-0", "2026-11-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE")
    )
    assert (w.used(NOV), w.used("2026-11-15T00:00:00Z")) == (60, 0)


def _calls(durations: list[int], hours: list[int]) -> list[dict]:
    start = at("2026-11-02T00:00:00Z")
    return [
        call(f"c{i}", iso(start + timedelta(hours=h)), d)
        for i, (d, h) in enumerate(zip(durations, hours, strict=False))
    ]


def _usage_alerts(w: MemoryWorker) -> dict[int, tuple]:
    found: dict[int, tuple] = {}
    for alert in w.outputs("alerts"):
        if alert["kind"] == "USAGE_THRESHOLD":
            assert alert["threshold_percent"] not in found, "a threshold sent twice"
            found[alert["threshold_percent"]] = (alert["crossed_at"], alert["used_seconds"])
    return found


@settings(max_examples=60, deadline=None)
@given(
    durations=st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=25),
    hours=st.lists(st.integers(min_value=0, max_value=600), min_size=25, max_size=25),
    seed=st.integers(min_value=0, max_value=10**6),
    restart_after=st.integers(min_value=0, max_value=25),
)
def test_alerts_never_contradict_each_other_in_any_arrival_order(
    durations: list[int], hours: list[int], seed: int, restart_after: int
) -> None:
    """Per tenant and period: each threshold at most once; a higher one never shows an earlier crossing
    or less usage than a lower one; each is true of the calls (those ended by its crossing add up to
    it). Shuffled arrival, with a restart anywhere in it."""
    calls = _calls(durations, hours)
    seconds = {c["event_id"]: d for c, d in zip(calls, durations, strict=False)}
    random.Random(seed).shuffle(calls)
    w = MemoryWorker()
    w.feed(subscribe(), *calls[:restart_after])
    second = w.restart()
    second.feed(*calls[restart_after:])
    second.sent[:0] = w.sent
    alerts = _usage_alerts(second)
    included, total = 1000, sum(seconds.values())
    assert second.used(NOV) == total
    assert sorted(alerts) == [p for p in (75, 90, 100) if total * 100 >= p * included]
    ordered = [alerts[p] for p in sorted(alerts)]
    assert ordered == sorted(ordered)  # crossing times and usage both non-decreasing
    for percent, (crossed_at, used) in alerts.items():
        ended_by_then = sum(seconds[c["event_id"]] for c in calls if at(c["ended_at"]) <= crossed_at)
        assert used * 100 >= percent * included
        assert ended_by_then >= used


def test_in_event_time_order_the_alerts_are_the_batch_crossings() -> None:
    calls = _calls([300, 200, 400, 100, 250], [1, 5, 9, 30, 31])
    w = MemoryWorker()
    w.feed(subscribe(), *calls)
    ends = [(at(c["ended_at"]), d) for c, d in zip(calls, [300, 200, 400, 100, 250], strict=True)]
    expected = {p: threshold_crossing(ends, 1000, p) for p in (75, 90, 100)}
    assert {p: (a, u) for p, (a, u) in _usage_alerts(w).items()} == expected
    assert expected[75] == (ends[2][0], 900)
    assert expected[100] == (ends[3][0], 1000)


def test_a_late_early_call_cannot_make_a_higher_threshold_cross_before_a_lower_one() -> None:
    """75 % is reached on November 20 by what has arrived; then a big call that ended on November 3
    arrives and takes usage past 100 %: 90 and 100 are not dated before 75 %'s crossing."""
    w = MemoryWorker()
    w.feed(subscribe(), call("a", "2026-11-10T10:00:00Z", 400), call("b", "2026-11-20T10:00:00Z", 400))
    w.feed(call("early", "2026-11-03T10:00:00Z", 500))
    alerts = _usage_alerts(w)
    assert alerts[75] == (at("2026-11-20T10:06:40Z"), 800)
    assert alerts[90] == alerts[100] == (at("2026-11-20T10:06:40Z"), 1300)


def test_a_threshold_below_one_already_sent_is_implied_and_not_sent() -> None:
    w = MemoryWorker()
    w.feed(subscribe())
    w.tables["alerted"].put(0, "t1|2026-11-01T00:00:00+00:00|usage|90", {"at": 0, "used": 950})
    w.feed(call("a", "2026-11-10T10:00:00Z", 800))
    assert 75 not in _usage_alerts(w)
