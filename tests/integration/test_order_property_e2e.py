"""Order-independent invoices as a property, through the real broker and the embedded ClickHouse:
random event sets (plan
changes between plans with different rounding, block and charging plans, cancellations, numbers,
employees, duplicates) split into 2-4 random chunks, produced in a random order with a `worker
--until-idle` run after each chunk. Every invoice equals rating/'s batch computation over all the
deduplicated events. Hypothesis prints the failing seed.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.integration.cli import callmeter, comparable, read_invoices, worker_stats
from tests.integration.eventfiles import call, example_catalog, prov, reference_invoices, write_events

pytestmark = pytest.mark.integration

PLANS = ("starter", "pro", "hardstop")


def _iso(ts: datetime) -> str:
    return ts.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def random_events(rng: random.Random) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    for t in range(rng.randint(2, 3)):
        tenant = f"p{t}"
        subscribed = datetime(2026, 9, 1, tzinfo=UTC) + timedelta(days=rng.randint(0, 45), hours=9)
        events.append(
            prov(
                f"{tenant}-s",
                tenant,
                _iso(subscribed),
                "SUBSCRIPTION_STARTED",
                plan_id=rng.choice(PLANS),
                tax_region="GB",
            )
        )
        for n in range(rng.randint(0, 2)):
            at = subscribed + timedelta(days=rng.randint(0, 50))
            events.append(
                prov(f"{tenant}-pc{n}", tenant, _iso(at), "PLAN_CHANGED", plan_id=rng.choice(PLANS))
            )
        if rng.random() < 0.4:
            at = subscribed + timedelta(days=rng.randint(20, 70))
            events.append(prov(f"{tenant}-x", tenant, _iso(at), "SUBSCRIPTION_CANCELLED"))
        for n in range(rng.randint(0, 2)):
            at = subscribed + timedelta(days=rng.randint(0, 40), hours=rng.randint(0, 23))
            number = f"+1555{t:03d}{n:04d}"
            kind = rng.choice(("LOCAL", "TOLL_FREE"))
            events.append(
                prov(
                    f"{tenant}-n{n}", tenant, _iso(at), "NUMBER_PROVISIONED", number=number, number_type=kind
                )
            )
            if rng.random() < 0.3:
                gone = at + timedelta(days=rng.randint(1, 30))
                events.append(prov(f"{tenant}-r{n}", tenant, _iso(gone), "NUMBER_RELEASED", number=number))
        for e in range(rng.randint(0, 3)):
            at = subscribed + timedelta(days=rng.randint(0, 40))
            events.append(
                prov(f"{tenant}-e{e}", tenant, _iso(at), "EMPLOYEE_ACTIVATED", employee_id=f"emp{e}")
            )
        for c in range(rng.randint(5, 25)):
            # Some calls before the subscription and after a cancellation, most inside.
            answered = subscribed + timedelta(days=rng.uniform(-5, 75))
            events.append(call(f"{tenant}-c{c}", tenant, _iso(answered), round(rng.uniform(0, 900), 3)))
    duplicates = [dict(e) for e in events if rng.random() < 0.15]
    return events + duplicates


@hsettings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(min_value=0, max_value=2**31), chunks=st.integers(min_value=2, max_value=4))
def test_invoices_do_not_depend_on_arrival_order_or_chunking(
    cm_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory, seed: int, chunks: int
) -> None:
    note(f"seed={seed} chunks={chunks}")
    rng = random.Random(seed)
    tmp = tmp_path_factory.mktemp("order")
    env = dict(
        cm_env,
        CALLMETER_TOPIC_PREFIX=f"{cm_env['CALLMETER_TOPIC_PREFIX']}{seed}.",
        CALLMETER_DATA_DIR=str(tmp / "data"),
    )
    events = random_events(rng)
    rng.shuffle(events)
    parts: list[list[dict[str, Any]]] = [[] for _ in range(chunks)]
    for event in events:
        parts[rng.randrange(chunks)].append(event)
    files = [write_events(tmp / f"chunk{i}.jsonl", part) for i, part in enumerate(parts) if part]
    for path in files:
        callmeter(env, "produce", str(path))
        worker_stats(env)
    for year, month in ((2026, 9), (2026, 10), (2026, 11)):
        out = tmp / f"out-{month}"
        callmeter(env, "invoice", "--period", f"{year}-{month:02d}", "--out", str(out))
        got = {k: comparable(v) for k, v in read_invoices(out).items()}
        assert got == reference_invoices(files, year, month, example_catalog()), (seed, chunks, month)
