"""rating/bulk.py's TenantRater gives exactly what rate_call gives, call by call, in any order."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rating.bulk import BulkRating, TenantRater, millis_of, raw_seconds_of
from rating.calls import RatedCall, rate_call
from rating.catalog import Catalog
from rating.models import CallEvent, ProvisioningEvent, Reason, Rejection
from rating.subscription import TenantTimeline
from tests.unit.test_rating_examples import EXAMPLES, example_catalog, load_events
from tests.unit.test_rating_properties import tenant_events
from tests.unit.test_rating_support import call, catalog, start, utc

EXAMPLE_CALLS, EXAMPLE_PROVISIONING = load_events(EXAMPLES / "events.jsonl")


def _bulk(rater: TenantRater, c: CallEvent, slow: list[str] | None = None) -> BulkRating | Rejection:
    def build() -> CallEvent:
        if slow is not None:
            slow.append(c.event_id)
        return c

    answered = None if c.answered_at is None else millis_of(c.answered_at)
    return rater.rate(millis_of(c.started_at), answered, millis_of(c.ended_at), c.disposition, build)


def _same(got: BulkRating | Rejection, want: RatedCall | Rejection) -> None:
    if isinstance(want, Rejection):
        assert got == want
        return
    assert isinstance(got, BulkRating)
    assert (got.period, got.plan_id, got.billable_seconds) == (
        want.period,
        want.plan_id,
        want.billable_seconds,
    )
    assert (got.period_start_millis, got.period_end_millis) == (
        millis_of(want.period.start),
        millis_of(want.period.end),
    )
    assert raw_seconds_of(got.raw_millis) == want.raw_seconds


def _check_all(
    calls: list[CallEvent], provisioning: list[ProvisioningEvent], cat: Catalog
) -> tuple[int, int]:
    """Rate every call both ways, one rater per tenant: (calls rated, calls handed to rate_call)."""
    rated, slow = 0, []
    raters: dict[str, TenantRater] = {}
    for c in calls:
        if c.tenant_id not in raters:
            mine = [p for p in provisioning if p.tenant_id == c.tenant_id]
            raters[c.tenant_id] = TenantRater(TenantTimeline.from_events(c.tenant_id, mine), cat)
        rater = raters[c.tenant_id]
        want = rate_call(c, rater.timeline, cat)
        _same(_bulk(rater, c, slow), want)
        rated += isinstance(want, RatedCall)
    return rated, len(slow)


def test_the_examples_rate_the_same() -> None:
    rated, slow = _check_all(EXAMPLE_CALLS, EXAMPLE_PROVISIONING, example_catalog())
    # All 9 example calls are rated; only the first call of each tenant period takes rate_call's path:
    # acme's October and November, bolt's period from 15 November, dime's November.
    assert (rated, slow) == (9, 4)


T0 = utc(2026, 11, 1)
CASES = [
    # (plan, answered after start ms, ended after start ms, disposition, raw seconds, billable seconds)
    ("starter", 0, 0, "ANSWERED", "0", 0),
    ("starter", 0, 1, "ANSWERED", "0.001", 1),
    ("starter", 500, 61_500, "ANSWERED", "61", 61),
    ("starter", 0, 61_001, "ANSWERED", "61.001", 62),
    ("capped", 0, 1, "ANSWERED", "0.001", 60),  # minimum 60 s
    ("capped", 0, 60_001, "ANSWERED", "60.001", 66),  # 6 s increments, rounded up
    ("capped", 0, 66_000, "ANSWERED", "66", 66),
    ("capped", None, 90_000, "NO_ANSWER", "0", 0),
    ("capped", 1_000, 90_000, "BUSY", "0", 0),  # connected time counts only when answered
    ("starter", 0, 86_400_000, "ANSWERED", "86400", 86400),  # exactly a day is still a call
]


@pytest.mark.parametrize(("plan", "answered", "ended", "disposition", "raw", "billable"), CASES)
def test_table(
    plan: str, answered: int | None, ended: int, disposition: str, raw: str, billable: int
) -> None:
    timeline = TenantTimeline.from_events("t1", [start(utc(2026, 10, 5), plan)])
    rater = TenantRater(timeline, catalog())
    at = T0 + timedelta(hours=3)
    first = call(
        at, at, at + timedelta(seconds=20)
    )  # the first call of a period goes through rate_call and fills the cache
    _same(_bulk(rater, first), rate_call(first, timeline, catalog()))
    c = CallEvent(
        "e1",
        "t1",
        "c1",
        None,
        "INBOUND",
        "+1",
        "+2",
        at,
        None if answered is None else at + timedelta(milliseconds=answered),
        at + timedelta(milliseconds=ended),
        disposition,
        "gw",
    )
    got = _bulk(rater, c)
    assert isinstance(got, BulkRating)
    assert (got.plan_id, raw_seconds_of(got.raw_millis), got.billable_seconds) == (
        plan,
        Decimal(raw),
        billable,
    )
    assert got.period.start == utc(2026, 10, 5) and got.period.end == utc(2026, 11, 5)
    _same(got, rate_call(c, timeline, catalog()))


@pytest.mark.parametrize(
    ("answered", "ended", "disposition", "reason"),
    [
        (0, 10, "HUNG_UP", Reason.INVALID_EVENT),
        (0, -1, "ANSWERED", Reason.NEGATIVE_DURATION),
        (-1, 10, "ANSWERED", Reason.INVALID_EVENT),
        (11, 10, "ANSWERED", Reason.ENDED_BEFORE_ANSWERED),
        (0, 86_400_001, "ANSWERED", Reason.ABSURD_DURATION),
    ],
)
def test_invalid_calls_are_the_reference_rejection(
    answered: int, ended: int, disposition: str, reason: Reason
) -> None:
    timeline = TenantTimeline.from_events("t1", [start(utc(2026, 10, 5))])
    rater = TenantRater(timeline, catalog())
    at = T0 + timedelta(hours=3)
    _bulk(
        rater, call(at, at, at + timedelta(seconds=20))
    )  # the period is cached: an invalid call must still be refused
    c = CallEvent(
        "e1",
        "t1",
        "c1",
        None,
        "INBOUND",
        "+1",
        "+2",
        at,
        at + timedelta(milliseconds=answered),
        at + timedelta(milliseconds=ended),
        disposition,
        "gw",
    )
    got = _bulk(rater, c)
    assert isinstance(got, Rejection) and got.reason == reason
    assert got == rate_call(c, timeline, catalog())


def test_uncovered_period_and_no_subscription_are_refused_like_rate_call() -> None:
    timeline = TenantTimeline.from_events("t1", [start(utc(2026, 10, 5))])
    rater = TenantRater(timeline, catalog())
    before = call(utc(2026, 9, 1, 10), utc(2026, 9, 1, 10), utc(2026, 9, 1, 10, 0, 30))
    got = _bulk(rater, before)
    assert isinstance(got, Rejection) and got.reason == Reason.NO_SUBSCRIPTION
    assert got == rate_call(before, timeline, catalog())
    nobody = TenantRater(TenantTimeline.from_events("t1", []), catalog())
    assert _bulk(nobody, before) == Rejection(Reason.NO_SUBSCRIPTION, "tenant 't1' has no subscription")


_DISPOSITIONS = ["ANSWERED", "ANSWERED", "ANSWERED", "NO_ANSWER", "BUSY", "FAILED", "CANCELLED", "LOST"]


@st.composite
def odd_calls(draw: st.DrawFn, tenant: str) -> list[CallEvent]:
    """Calls of every shape, valid or not, around period boundaries and price-book changes."""
    out = []
    base = utc(2026, 9, 20)
    for i in range(draw(st.integers(1, 25))):
        seconds = draw(
            st.one_of(st.integers(0, 100 * 86400).map(lambda s: s - s % 86400), st.integers(0, 100 * 86400))
        )
        started = base + timedelta(seconds=seconds, milliseconds=draw(st.sampled_from([0, 1, 999])))
        answered = started + timedelta(milliseconds=draw(st.integers(-2, 7000)))
        ended = started + timedelta(
            milliseconds=draw(st.one_of(st.integers(-2, 4_000_000), st.just(86_400_001)))
        )
        out.append(
            CallEvent(
                f"{tenant}-x{i}",
                tenant,
                f"x{i}",
                None,
                "INBOUND",
                "+1",
                "+2",
                started,
                draw(st.sampled_from([answered, None])),
                ended,
                draw(st.sampled_from(_DISPOSITIONS)),
                "gw",
            )
        )
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=tenant_events("gen"), extra=odd_calls("gen"))
def test_generated_calls_rate_the_same(
    events: list[CallEvent | ProvisioningEvent], extra: list[CallEvent]
) -> None:
    calls = [e for e in events if isinstance(e, CallEvent)] + extra
    provisioning = [e for e in events if isinstance(e, ProvisioningEvent)]
    _check_all(calls, provisioning, catalog())
    _check_all(list(reversed(calls)), provisioning, catalog())
