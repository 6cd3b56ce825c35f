"""The live window (pipeline/stream/window.py): retention by event time, kept across restarts, and the rule
that no copy of a forgotten key becomes live usage."""

from __future__ import annotations

from datetime import timedelta

from pipeline.stream.keys import DAY_MS, MAX_PERIOD_MS, balance_key, period_is_live, window_key
from pipeline.stream.state import MemoryTable
from pipeline.stream.window import LiveWindow
from tests.unit.meterkit import NOW, MemoryWorker, at, call, subscribe

SEP, OCT, NOV = "2026-09-01T00:00:00Z", "2026-10-01T00:00:00Z", "2026-11-01T00:00:00Z"


def test_the_window_moves_by_day_never_back_and_never_past_the_wall_clock() -> None:
    table = MemoryTable()
    window = LiveWindow(table, 3, clock=lambda: NOW.timestamp())
    day = int(at("2026-11-20T00:00:00Z").timestamp() * 1000)
    assert window.advance(0, day + 5000)
    assert not window.advance(0, day + 9000)  # the same day
    assert not window.advance(0, day - DAY_MS)  # never back
    assert table.get(0, window_key(0)) == day
    assert window.horizon_ms(0) == day - 3 * DAY_MS
    assert window.key_floor_ms(0) == day - 3 * DAY_MS - MAX_PERIOD_MS
    assert window.advance(0, int(at("2031-01-01T00:00:00Z").timestamp() * 1000))
    assert table.get(0, window_key(0)) == int(at("2026-12-07T00:00:00Z").timestamp() * 1000)
    assert LiveWindow(table, 3).day_ms(0) == table.get(0, window_key(0))  # a restart reads it back


def test_period_liveness() -> None:
    end = at("2026-12-01T00:00:00Z")
    dec4 = int(at("2026-12-04T00:00:00Z").timestamp() * 1000)
    assert period_is_live(None, 3, end)
    assert period_is_live(dec4 - DAY_MS, 3, end)
    assert not period_is_live(dec4, 3, end)


def test_a_resend_of_a_whole_month_after_the_window_moved_on_changes_no_live_balance() -> None:
    """The demo run twice (resends older than a short retention): every copy is a duplicate while its
    period is live, and a copy in a closed period changes nothing live."""
    w = MemoryWorker(retention_days=3)
    october = [call(f"o{i}", f"2026-10-{i + 1:02d}T10:00:00Z", 10) for i in range(30)]
    w.feed(subscribe("2026-09-01T00:00:00Z"), *october)
    assert w.used(OCT) == 300
    # November's first call moves the window: October is live until November 4 (3 days after its end).
    w.feed(call("n1", "2026-11-02T10:00:00Z", 20), *october)
    assert w.used(OCT) == 300
    assert w.stats.duplicates == {"call": 30}
    # November 20: October (ended November 1) is closed; keys are held until 3 days + 31 days before
    # the window's day (October 17): the 16 calls ended before it are forgotten, the rest still known.
    w.feed(call("n2", "2026-11-20T10:00:00Z", 20))
    assert w.stats.keys_expired == 16
    rated, october_alerts = w.stats.rated, len(w.outputs("alerts"))
    w.feed(*october)
    assert w.stats.duplicates == {"call": 30 + 14}
    # The 16 forgotten ones are rated for the ledger, whose first-seen check makes them duplicates;
    # nothing live moved and no alert names October.
    assert (w.stats.rated - rated, w.stats.closed_period) == (16, 16)
    assert w.used(NOV) == 40
    assert w.tables["balances"].get(0, balance_key("t1", at(OCT))) is None
    assert len(w.outputs("alerts")) == october_alerts


def test_the_window_survives_a_restart() -> None:
    """The watermark used to live in memory: a restart followed by an old event swept nothing and kept
    counting, then forgot keys a resend turned into usage. Now it is a table value."""
    w = MemoryWorker(retention_days=3)
    w.feed(subscribe(SEP), call("s", "2026-09-05T10:00:00Z", 10), call("d", "2026-12-06T10:00:00Z", 10))
    again = w.restart()
    again.feed(call("s", "2026-09-05T10:00:00Z", 10))
    assert again.stats.closed_period == 1
    assert again.used(SEP) == 0  # September's balance was dropped with its period
    assert again.tables["balances"].get(0, balance_key("t1", at(SEP))) is None


def test_sweeps_drop_closed_periods_balances_and_alert_markers() -> None:
    w = MemoryWorker(retention_days=3)
    w.feed(subscribe(SEP), *[call(f"s{i}", "2026-09-05T10:00:00Z", 400) for i in range(3)])
    assert w.tables["alerted"].partitions[0]
    w.feed(call("d", "2026-12-06T10:00:00Z", 10))
    assert not [k for k in w.tables["alerted"].partitions[0] if "2026-09-01" in k]
    assert set(w.tables["balances"].partitions[0]) == {
        balance_key("t1", at(NOV) + timedelta(days=30)),
        "~window|0",
    }
