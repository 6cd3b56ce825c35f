"""Properties of the reference batch computation: arrival order and retries change nothing."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rating.batch import invoices_for_month
from rating.invoice import Invoice
from rating.models import CallEvent, ProvisioningEvent
from rating.subscription import TenantTimeline
from tests.unit.test_rating_examples import EXAMPLES, example_catalog, load_events
from tests.unit.test_rating_support import utc

Event = CallEvent | ProvisioningEvent

BASE = utc(2026, 9, 20)
SPAN_S = 100 * 86400  # up to the end of December
CATALOG = example_catalog()
EXAMPLE_CALLS, EXAMPLE_PROVISIONING = load_events(EXAMPLES / "events.jsonl")


def _moment(draw: st.DrawFn) -> datetime:
    # Coarse seconds plus a millisecond part make boundary-exact and sub-second instants both likely.
    seconds = draw(st.one_of(st.integers(0, SPAN_S).map(lambda s: s - s % 86400), st.integers(0, SPAN_S)))
    return BASE + timedelta(seconds=seconds, milliseconds=draw(st.sampled_from([0, 0, 1, 400, 999])))


@st.composite
def tenant_events(draw: st.DrawFn, tenant: str) -> list[Event]:
    plans = ["starter", "pro", "hardstop"]
    events: list[Event] = [
        ProvisioningEvent(
            f"{tenant}-sub",
            tenant,
            _moment(draw),
            "SUBSCRIPTION_STARTED",
            plan_id=draw(st.sampled_from(plans)),
            tax_region=draw(st.sampled_from(["US-NY", "GB", "NONE"])),
        )
    ]
    actions = [
        "PLAN_CHANGED",
        "SUBSCRIPTION_CANCELLED",
        "SUBSCRIPTION_STARTED",
        "NUMBER_PROVISIONED",
        "NUMBER_RELEASED",
        "EMPLOYEE_ACTIVATED",
        "EMPLOYEE_DEACTIVATED",
    ]
    for i in range(draw(st.integers(0, 8))):
        action = draw(st.sampled_from(actions))
        events.append(
            ProvisioningEvent(
                f"{tenant}-p{i}",
                tenant,
                _moment(draw),
                action,
                plan_id=draw(st.sampled_from(plans))
                if action == "SUBSCRIPTION_STARTED" or "PLAN" in action
                else None,
                tax_region="GB" if action == "SUBSCRIPTION_STARTED" else None,
                number=draw(st.sampled_from(["+1", "+2", "+3"])) if "NUMBER" in action else None,
                number_type=draw(st.sampled_from(["LOCAL", "TOLL_FREE"]))
                if "PROVISIONED" in action
                else None,
                employee_id=draw(st.sampled_from(["a", "b", "c"])) if "EMPLOYEE" in action else None,
            )
        )
    for i in range(draw(st.integers(0, 8))):
        started = _moment(draw)
        answered = started + timedelta(milliseconds=draw(st.integers(0, 5000)))
        ended = answered + timedelta(milliseconds=draw(st.integers(0, 4_000_000)))
        events.append(
            CallEvent(
                f"{tenant}-c{i}",
                tenant,
                f"call-{i}",
                None,
                "OUTBOUND",
                "+1",
                "+2",
                started,
                draw(st.sampled_from([answered, None])),
                ended,
                draw(st.sampled_from(["ANSWERED", "ANSWERED", "NO_ANSWER"])),
                "gw",
            )
        )
    return events


@st.composite
def scenarios(draw: st.DrawFn) -> list[Event]:
    events: list[Event] = [*EXAMPLE_PROVISIONING, *EXAMPLE_CALLS]
    for t in range(draw(st.integers(0, 3))):
        events += draw(tenant_events(f"gen{t}"))
    return events


def _split(events: list[Event]) -> tuple[list[CallEvent], list[ProvisioningEvent]]:
    return (
        [e for e in events if isinstance(e, CallEvent)],
        [e for e in events if isinstance(e, ProvisioningEvent)],
    )


def _render(invoices: list[Invoice]) -> str:
    return json.dumps([inv.to_json_dict("fixed") for inv in invoices])


def _monthly(events: list[Event], month: int) -> str:
    calls, provisioning = _split(events)
    return _render(invoices_for_month(calls, provisioning, CATALOG, 2026, month))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=scenarios(),
    seed=st.integers(0, 2**32 - 1),
    dup_share=st.floats(0, 0.5),
    month=st.sampled_from([10, 11, 12]),
)
def test_shuffling_and_duplicates_never_change_invoices(
    events: list[Event], seed: int, dup_share: float, month: int
) -> None:
    rng = random.Random(seed)
    retried = events + [e for e in events if rng.random() < dup_share]
    rng.shuffle(retried)
    assert _monthly(retried, month) == _monthly(events, month)


@settings(max_examples=100, deadline=None)
@given(events=scenarios(), seed=st.integers(0, 2**32 - 1))
def test_incremental_timeline_equals_batch(events: list[Event], seed: int) -> None:
    _, provisioning = _split(events)
    rng = random.Random(seed)
    shuffled = provisioning + provisioning[: rng.randrange(len(provisioning) + 1)]
    rng.shuffle(shuffled)
    tenants = {e.tenant_id for e in provisioning}
    for tenant in tenants:
        batch = TenantTimeline.from_events(tenant, [e for e in provisioning if e.tenant_id == tenant])
        incremental = TenantTimeline.from_events(tenant, [])
        for event in shuffled:
            if event.tenant_id == tenant:
                incremental = TenantTimeline.from_dict(
                    json.loads(json.dumps(incremental.apply(event).to_dict()))
                )
        assert incremental.to_dict() == batch.to_dict()
        for month in (10, 11, 12):
            assert incremental.invoiced_period_in_month(2026, month) == batch.invoiced_period_in_month(
                2026, month
            )


@settings(max_examples=100, deadline=None)
@given(events=scenarios(), month=st.sampled_from([10, 11, 12]))
def test_invoice_arithmetic(events: list[Event], month: int) -> None:
    calls, provisioning = _split(events)
    for inv in invoices_for_month(calls, provisioning, CATALOG, 2026, month):
        assert inv.subtotal == sum(line.amount for line in inv.lines)
        assert inv.total == inv.subtotal + inv.tax
        assert all(line.amount == line.amount.quantize(inv.subtotal) for line in inv.lines)
        assert inv.period.start.month == month
