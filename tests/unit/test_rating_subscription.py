from __future__ import annotations

import json
from datetime import datetime

import pytest

from rating.errors import RatingError
from rating.models import ProvisioningEvent
from rating.periods import Period, period_starting_in
from rating.subscription import TenantTimeline
from tests.unit.test_rating_support import catalog, employee, number, prov, release, start, utc


def timeline(*events: ProvisioningEvent) -> TenantTimeline:
    return TenantTimeline.from_events("t1", events)


def changed(at: datetime, plan: str) -> ProvisioningEvent:
    return prov("PLAN_CHANGED", at, plan_id=plan)


def cancelled(at: datetime) -> ProvisioningEvent:
    return prov("SUBSCRIPTION_CANCELLED", at)


NOV = period_starting_in(1, 2026, 11)
STARTER = catalog().plan_for("starter", NOV.start)
HARDSTOP = catalog().plan_for("hardstop", NOV.start)


def test_subscription_properties() -> None:
    tl = timeline(start(utc(2026, 10, 31, 22), plan="capped", region="GB"))
    assert tl.subscribed and tl.anchor == 31 and tl.subscribed_at == utc(2026, 10, 31, 22)
    assert (tl.plan_id, tl.tax_region, tl.cancelled_at) == ("capped", "GB", None)
    assert tl.first_period == period_starting_in(31, 2026, 10)


def test_unsubscribed_timeline() -> None:
    tl = timeline(number(utc(2026, 10, 1), "+1"))
    assert not tl.subscribed and tl.subscribed_at is None and tl.plan_id is None
    assert tl.invoiced_period_in_month(2026, 10) is None
    with pytest.raises(RatingError):
        _ = tl.anchor


@pytest.mark.parametrize(
    ("events", "month", "plan"),
    [
        # the period containing subscribed_at, even though it started earlier that day
        ((start(utc(2026, 10, 1, 9)),), 10, "starter"),
        ((start(utc(2026, 10, 1, 9)),), 9, None),
        ((start(utc(2026, 10, 1, 9)),), 12, "starter"),
        # a change takes effect at the next period start
        ((start(utc(2026, 10, 1, 9)), changed(utc(2026, 10, 20), "capped")), 10, "starter"),
        ((start(utc(2026, 10, 1, 9)), changed(utc(2026, 10, 20), "capped")), 11, "capped"),
        # a change exactly at a boundary belongs to the period starting there: effective one later
        ((start(utc(2026, 10, 1, 9)), changed(utc(2026, 11, 1), "capped")), 11, "starter"),
        ((start(utc(2026, 10, 1, 9)), changed(utc(2026, 11, 1), "capped")), 12, "capped"),
        ((start(utc(2026, 10, 1, 9)), changed(utc(2026, 10, 31, 23, 59, 59, 999), "capped")), 11, "capped"),
        # several changes before one boundary: the last by occurred_at wins, whatever the arrival order
        (
            (
                start(utc(2026, 10, 1, 9)),
                changed(utc(2026, 10, 25), "hardstop"),
                changed(utc(2026, 10, 20), "capped"),
            ),
            11,
            "hardstop",
        ),
        # a change on the subscription day only applies from the second period
        ((start(utc(2026, 10, 1, 9)), changed(utc(2026, 10, 1, 10), "capped")), 10, "starter"),
        # a change before the subscription existed is ignored
        ((changed(utc(2026, 9, 20), "capped"), start(utc(2026, 10, 1, 9))), 11, "starter"),
    ],
)
def test_plan_for_period(events: tuple[ProvisioningEvent, ...], month: int, plan: str | None) -> None:
    tl = timeline(*events)
    assert tl.plan_for_period(period_starting_in(1, 2026, month)) == plan
    invoiced = tl.invoiced_period_in_month(2026, month)
    assert (invoiced is not None) == (plan is not None)


@pytest.mark.parametrize(
    ("cancel_at", "invoiced_months"),
    [
        (utc(2026, 10, 20), [10]),
        (utc(2026, 11, 1), [10, 11]),  # at exactly a period start: that period did not start "later"
        (utc(2026, 10, 31, 23, 59, 59, 999), [10]),
        (utc(2026, 10, 1, 9, 30), [10]),
    ],
)
def test_cancellation(cancel_at: datetime, invoiced_months: list[int]) -> None:
    tl = timeline(start(utc(2026, 10, 1, 9)), cancelled(cancel_at))
    assert tl.cancelled_at == cancel_at
    assert [m for m in range(9, 13) if tl.invoiced_period_in_month(2026, m)] == invoiced_months


def test_plan_change_after_cancellation_is_ignored() -> None:
    tl = timeline(
        start(utc(2026, 10, 1, 9)), cancelled(utc(2026, 10, 10)), changed(utc(2026, 10, 11), "capped")
    )
    assert tl.plan_for_period(period_starting_in(1, 2026, 10)) == "starter"
    assert tl.plan_for_period(NOV) is None


def test_resubscription_in_a_later_period_keeps_the_anchor() -> None:
    tl = timeline(
        start(utc(2026, 10, 1, 9)),
        cancelled(utc(2026, 10, 10)),
        start(utc(2026, 12, 20), plan="hardstop", region="GB"),
    )
    assert tl.anchor == 1 and tl.cancelled_at is None and tl.tax_region == "GB"
    plans = [tl.plan_for_period(period_starting_in(1, 2026, m)) for m in (10, 11, 12)]
    assert plans == ["starter", None, "hardstop"]
    assert tl.tax_region_for_period(period_starting_in(1, 2026, 10)) == "NONE"
    assert tl.tax_region_for_period(period_starting_in(1, 2026, 12)) == "GB"


def test_resubscription_within_the_cancelled_period_undoes_the_cancellation() -> None:
    tl = timeline(
        start(utc(2026, 10, 1, 9)), cancelled(utc(2026, 10, 10)), start(utc(2026, 10, 12), plan="capped")
    )
    plans = [tl.plan_for_period(period_starting_in(1, 2026, m)) for m in (10, 11)]
    assert plans == ["starter", "capped"]


def test_second_start_while_subscribed_acts_as_a_plan_change() -> None:
    tl = timeline(start(utc(2026, 10, 1, 9)), start(utc(2026, 10, 15), plan="capped", region="GB"))
    assert tl.anchor == 1
    assert tl.plan_for_period(period_starting_in(1, 2026, 10)) == "starter"
    assert tl.plan_for_period(NOV) == "capped"
    assert tl.tax_region_for_period(NOV) == "GB"


def _charges(tl: TenantTimeline, period: Period = NOV) -> list[tuple[str, str, str, str]]:
    plan = STARTER
    return [
        (c.number, c.quantity_text, str(c.unit_price), str(c.amount)) for c in tl.number_charges(period, plan)
    ]


SUB = start(utc(2026, 10, 1, 9))


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        # active at the start: full fee; the earliest local is the included one
        (
            [number(utc(2026, 10, 1, 9), "+2", "LOCAL"), number(utc(2026, 10, 3), "+1", "LOCAL")],
            [("+2", "1", "2.00", "0.00"), ("+1", "1", "2.00", "2.00")],
        ),
        # ties on provisioning time go to the lower number
        (
            [number(utc(2026, 10, 3), "+2", "LOCAL"), number(utc(2026, 10, 3), "+1", "LOCAL")],
            [("+1", "1", "2.00", "0.00"), ("+2", "1", "2.00", "2.00")],
        ),
        # first activated inside: pro-rated from the UTC date (16th..30th = 15 of 30 days)
        ([number(utc(2026, 11, 16, 12), "+8", "TOLL_FREE")], [("+8", "0.5000", "5.00", "2.50")]),
        # a toll-free number is never included, even on a plan that includes locals
        (
            [number(utc(2026, 10, 2), "+8", "TOLL_FREE"), number(utc(2026, 11, 20), "+1", "LOCAL")],
            [("+8", "1", "5.00", "5.00"), ("+1", "0.3667", "2.00", "0.00")],
        ),
        # 11 of 30 days of 5.00 = 1.8333.. -> 1.83; of 2.00 = 0.7333.. -> 0.73
        (
            [
                number(utc(2026, 10, 2), "+1"),
                number(utc(2026, 11, 20), "+8", "TOLL_FREE"),
                number(utc(2026, 11, 20), "+2"),
            ],
            [("+1", "1", "2.00", "0.00"), ("+2", "0.3667", "2.00", "0.73"), ("+8", "0.3667", "5.00", "1.83")],
        ),
        # provisioned during the first day of the period but after 00:00: 30/30 of the fee
        ([number(utc(2026, 11, 1, 9), "+8", "TOLL_FREE")], [("+8", "1.0000", "5.00", "5.00")]),
        # provisioned at exactly the start: active at the start
        ([number(utc(2026, 11, 1), "+8", "TOLL_FREE")], [("+8", "1", "5.00", "5.00")]),
        # the last day of the period: 1/30
        ([number(utc(2026, 11, 30, 23), "+8", "TOLL_FREE")], [("+8", "0.0333", "5.00", "0.17")]),
        # releasing never refunds
        (
            [number(utc(2026, 10, 2), "+8", "TOLL_FREE"), release(utc(2026, 11, 2), "+8")],
            [("+8", "1", "5.00", "5.00")],
        ),
        (
            [number(utc(2026, 11, 16), "+8", "TOLL_FREE"), release(utc(2026, 11, 17), "+8")],
            [("+8", "0.5000", "5.00", "2.50")],
        ),
        # released at exactly the period start: not active at any moment of the period
        ([number(utc(2026, 10, 2), "+8", "TOLL_FREE"), release(utc(2026, 11, 1), "+8")], []),
        # released before, provisioned after the period: nothing
        ([number(utc(2026, 10, 2), "+8", "TOLL_FREE"), release(utc(2026, 10, 5), "+8")], []),
        ([number(utc(2026, 12, 1), "+8", "TOLL_FREE")], []),
        # provisioned and released at one instant: never active
        ([number(utc(2026, 11, 10), "+8", "TOLL_FREE"), release(utc(2026, 11, 10), "+8")], []),
        # re-provisioned in the same period: charged once, from the first activation
        (
            [
                number(utc(2026, 11, 16), "+8", "TOLL_FREE"),
                release(utc(2026, 11, 18), "+8"),
                number(utc(2026, 11, 25), "+8", "TOLL_FREE"),
            ],
            [("+8", "0.5000", "5.00", "2.50")],
        ),
        (
            [
                number(utc(2026, 10, 16), "+8", "TOLL_FREE"),
                release(utc(2026, 11, 18), "+8"),
                number(utc(2026, 11, 25), "+8", "TOLL_FREE"),
            ],
            [("+8", "1", "5.00", "5.00")],
        ),
        # provisioning an active number again changes nothing
        (
            [number(utc(2026, 10, 16), "+8", "TOLL_FREE"), number(utc(2026, 11, 20), "+8", "TOLL_FREE")],
            [("+8", "1", "5.00", "5.00")],
        ),
    ],
)
def test_number_charges(events: list[ProvisioningEvent], expected: list[tuple[str, str, str, str]]) -> None:
    assert _charges(timeline(SUB, *events)) == expected


def test_included_locals_follow_the_plan() -> None:
    tl = timeline(
        SUB, number(utc(2026, 10, 2), "+1"), number(utc(2026, 10, 3), "+2"), number(utc(2026, 10, 4), "+3")
    )
    charges = tl.number_charges(NOV, HARDSTOP)
    assert [(c.number, c.included, str(c.amount)) for c in charges] == [
        ("+1", True, "0.00"),
        ("+2", True, "0.00"),
        ("+3", False, "2.00"),
    ]


def test_pro_ration_in_a_31_day_february_period() -> None:
    # anchor 31: the period from 2026-02-28 runs to 2026-03-31, 31 days
    tl = TenantTimeline.from_events(
        "t1", [start(utc(2026, 1, 31)), number(utc(2026, 3, 15), "+8", "TOLL_FREE")]
    )
    period = period_starting_in(31, 2026, 2)
    [charge] = tl.number_charges(period, STARTER)
    assert (charge.quantity_text, str(charge.amount)) == ("0.5161", "2.58")  # 16/31 of 5.00 = 2.5806


@pytest.mark.parametrize(
    ("events", "peak"),
    [
        ([], 0),
        ([employee(utc(2026, 10, 2), "a")], 1),
        ([employee(utc(2026, 10, 2), "a"), employee(utc(2026, 11, 3), "b")], 2),
        ([employee(utc(2026, 10, 2), "a"), employee(utc(2026, 10, 20), "a", on=False)], 0),
        # deactivated at exactly the start: not active within the period
        ([employee(utc(2026, 10, 2), "a"), employee(utc(2026, 11, 1), "a", on=False)], 0),
        # activated at exactly the end: belongs to the next period
        ([employee(utc(2026, 12, 1), "a")], 0),
        # one leaves at the instant another arrives: never two at once
        (
            [
                employee(utc(2026, 11, 2), "a"),
                employee(utc(2026, 11, 5), "a", on=False),
                employee(utc(2026, 11, 5), "b"),
            ],
            1,
        ),
        (
            [
                employee(utc(2026, 11, 2), "a"),
                employee(utc(2026, 11, 3), "b"),
                employee(utc(2026, 11, 4), "c"),
                employee(utc(2026, 11, 5), "a", on=False),
                employee(utc(2026, 11, 6), "b", on=False),
                employee(utc(2026, 11, 7), "d"),
            ],
            3,
        ),
        # re-activating an active employee does not count it twice
        ([employee(utc(2026, 11, 2), "a"), employee(utc(2026, 11, 3), "a")], 1),
        # deactivating an unknown employee is harmless
        ([employee(utc(2026, 11, 2), "x", on=False)], 0),
    ],
)
def test_employees_peak(events: list[ProvisioningEvent], peak: int) -> None:
    assert timeline(SUB, *events).employees_peak(NOV) == peak


def test_active_helpers() -> None:
    tl = timeline(
        SUB,
        employee(utc(2026, 11, 2), "a"),
        employee(utc(2026, 11, 3), "b"),
        employee(utc(2026, 11, 4), "a", on=False),
        number(utc(2026, 11, 2), "+2"),
        number(utc(2026, 11, 2), "+1"),
        release(utc(2026, 11, 5), "+2"),
    )
    assert tl.active_employees_at(utc(2026, 11, 3, 12)) == ["a", "b"]
    assert tl.active_employees_at(utc(2026, 11, 4)) == ["b"]
    assert tl.active_numbers_at(utc(2026, 11, 4)) == ["+1", "+2"]
    assert tl.active_numbers_at(utc(2026, 11, 5)) == ["+1"]
    assert tl.active_numbers_at(utc(2026, 11, 1)) == []


EVENTS = [
    start(utc(2026, 10, 1, 9), region="US-NY"),
    changed(utc(2026, 10, 20), "capped"),
    number(utc(2026, 10, 2), "+1"),
    number(utc(2026, 11, 16, 12), "+8", "TOLL_FREE"),
    release(utc(2026, 11, 20), "+1"),
    employee(utc(2026, 10, 2), "a"),
    employee(utc(2026, 11, 3), "b"),
    cancelled(utc(2026, 11, 25)),
]


def _summary(tl: TenantTimeline) -> tuple[object, ...]:
    periods = [period_starting_in(1, 2026, m) for m in (9, 10, 11, 12)]
    return (
        tl.subscribed,
        tl.anchor,
        tl.cancelled_at,
        [tl.plan_for_period(p) for p in periods],
        [c.amount for p in periods[1:3] for c in tl.number_charges(p, STARTER)],
        [tl.employees_peak(p) for p in periods],
    )


def test_apply_in_any_order_equals_from_events() -> None:
    expected = _summary(timeline(*EVENTS))
    for order in (EVENTS, list(reversed(EVENTS)), EVENTS[3:] + EVENTS[:3]):
        tl = TenantTimeline.from_events("t1", [])
        for event in order:
            tl = tl.apply(event)
        assert _summary(tl) == expected


def test_apply_keeps_the_first_event_with_an_id() -> None:
    first = start(utc(2026, 10, 1, 9))
    impostor = ProvisioningEvent(
        first.event_id, "t1", utc(2026, 10, 5), "SUBSCRIPTION_STARTED", "capped", "GB"
    )
    tl = timeline(first).apply(impostor)
    assert (tl.anchor, tl.plan_id) == (1, "starter")
    assert timeline(first, impostor).plan_id == "starter"


def test_json_round_trip() -> None:
    tl = timeline(*EVENTS)
    data = json.loads(json.dumps(tl.to_dict()))
    again = TenantTimeline.from_dict(data)
    assert _summary(again) == _summary(tl)
    assert again.to_dict() == tl.to_dict()
    assert again.tax_region == "US-NY"


def test_round_trip_keeps_milliseconds() -> None:
    tl = timeline(start(utc(2026, 10, 1, 9, 0, 0, 123)))
    assert TenantTimeline.from_dict(tl.to_dict()).subscribed_at == utc(2026, 10, 1, 9, 0, 0, 123)


def test_events_of_another_tenant_are_refused() -> None:
    with pytest.raises(RatingError):
        TenantTimeline.from_events("t1", [start(utc(2026, 10, 1), tenant="t2")])
    with pytest.raises(RatingError):
        timeline().apply(start(utc(2026, 10, 1), tenant="t2"))


def test_unknown_action_is_ignored() -> None:
    tl = timeline(SUB, prov("NUMBER_PORTED", utc(2026, 10, 3), number="+1"))
    assert tl.number_charges(NOV, STARTER) == []
    assert tl.invoiced_period_in_month(2026, 11) == NOV
