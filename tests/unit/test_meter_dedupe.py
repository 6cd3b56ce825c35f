"""The worker's dedupe decisions (pipeline/stream/worker.py steps 2-3) over in-memory tables: which input is
new, which is a copy, which is a corrected resend, and that each distinct bad event is one dead letter."""

from __future__ import annotations

import pytest

from pipeline.records import call_from_record
from pipeline.stream.dedupe import DedupeIndex, call_fact, dead_fact, event_key, raw_key
from pipeline.stream.source import CALL
from pipeline.stream.state import MemoryTable
from schemas.json_events import parse_json_event
from tests.unit.meterkit import SERDE, MemoryWorker, call, prov, subscribe

NOV = "2026-11-01T00:00:00Z"


def test_the_first_copy_is_rated_and_every_later_one_is_a_duplicate() -> None:
    w = MemoryWorker()
    w.feed(subscribe(), *[call("a", "2026-11-02T10:00:00Z", 60)] * 3)
    assert w.stats.rated == 1
    assert w.stats.duplicates == {"call": 2}
    assert w.used(NOV) == 60
    dups = w.outputs("duplicates")
    assert [(d["kind"], d["tenant_id"], d["event_id"], d["gateway_id"]) for d in dups] == [
        ("call", "t1", "a", "gw-1")
    ] * 2


def test_a_call_and_a_provisioning_event_may_share_an_id() -> None:
    w = MemoryWorker()
    w.feed(subscribe(), call("sub-t1", "2026-11-02T10:00:00Z", 30))
    assert (w.stats.rated, w.stats.duplicates) == (1, {})


def test_a_provisioning_copy_is_a_duplicate_by_the_timeline_for_ever() -> None:
    """The timeline keeps every accepted event, so no retention sweep can forget a provisioning key."""
    w = MemoryWorker(retention_days=1)
    w.feed(subscribe("2026-01-01T00:00:00Z"), call("late", "2026-12-06T10:00:00Z", 5))
    w.feed(subscribe("2026-01-01T00:00:00Z"))
    assert w.stats.duplicates == {"provisioning": 1}
    assert len(w.outputs("provisioning.accepted")) == 1


@pytest.mark.parametrize(
    ("second", "rated", "dead", "duplicates"),
    [
        # The same bytes again: a copy of a dead-lettered event, counted as a duplicate, not a dead letter.
        ({}, 0, 1, {"call": 1}),
        # The gateway fixed the record and resent it under the same id: processed, and rated.
        ({"ended_at": "2026-11-02T10:01:00Z"}, 1, 1, {}),
        # Resent with other bytes that are still invalid: a second, distinct bad event.
        ({"ended_at": "2026-11-02T09:58:00Z", "gateway_id": "gw-2"}, 0, 2, {}),
    ],
)
def test_copies_and_corrections_of_an_invalid_call(
    second: dict[str, str], rated: int, dead: int, duplicates: dict[str, int]
) -> None:
    bad = call("x", "2026-11-02T10:00:00Z", 60, ended_at="2026-11-02T09:59:00Z")  # ended before answered
    w = MemoryWorker()
    w.feed(subscribe(), bad, {**bad, **second})
    assert w.stats.rated == rated
    assert sum(w.stats.dead_letters.values()) == dead == len(w.outputs("deadletter"))
    assert w.stats.duplicates == duplicates


def test_copies_of_undecodable_bytes_are_one_dead_letter() -> None:
    w = MemoryWorker()
    junk = b"\x00not avro at all"
    w.feed(w.record(junk), w.record(junk), w.record(junk + b"!"))
    assert w.stats.dead_letters == {"UNKNOWN_SCHEMA": 2}
    assert w.stats.duplicates == {"call": 2 - 1}
    assert w.outputs("duplicates")[0]["tenant_id"] == "t1"  # the Kafka key names the tenant


def test_a_record_without_tenant_or_id_is_one_dead_letter_however_often_resent() -> None:
    w = MemoryWorker()
    name, record = parse_json_event(call("n", "2026-11-02T10:00:00Z", 60))
    nameless = SERDE.encode(name, {**record, "event_id": ""}, "calls")
    w.feed(subscribe(), w.record(nameless), w.record(nameless))
    assert w.stats.dead_letters == {"INVALID_EVENT": 1}
    assert w.stats.duplicates == {"call": 1}


def test_an_invalid_provisioning_event_copy_is_a_duplicate_and_its_correction_is_accepted() -> None:
    w = MemoryWorker()
    bad = prov("p", "2026-11-01T00:00:00Z", "NUMBER_PROVISIONED", number="+1555", number_type=None)
    w.feed(subscribe(), bad, bad, {**bad, "number_type": "LOCAL"})
    assert w.stats.dead_letters == {"INVALID_EVENT": 1}
    assert w.stats.duplicates == {"provisioning": 1}
    assert len(w.outputs("provisioning.accepted")) == 2


def test_an_event_refused_for_what_the_catalog_lacks_is_processed_when_resent_after_the_fix() -> None:
    """The plan was missing from the catalog: the gateway's record was right, so resending the very
    same bytes once the catalog has the plan must subscribe the tenant."""
    from rating.catalog import parse_catalog
    from tests.unit.test_rating_support import CATALOG_YAML

    w = MemoryWorker()
    sub = prov("p", "2026-11-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="gold", tax_region="NONE")
    w.feed(sub, sub)
    assert w.stats.dead_letters == {"UNKNOWN_PLAN": 2}
    assert w.stats.duplicates == {}
    fixed = CATALOG_YAML.replace("      capped:", "      gold:\n" + _plan_body() + "      capped:")
    again = w.restart(rating_catalog=parse_catalog(fixed))
    again.feed(sub)
    assert again.stats.dead_letters == {}
    assert again.parts.tenants.get(0, "t1") is not None


def test_dedupe_index_keys_and_facts() -> None:
    index = DedupeIndex(MemoryTable())
    record = call_from_record(parse_json_event(call("a", "2026-11-02T10:00:00Z", 61.5))[1])
    key = event_key(CALL, "t1", "a")
    assert key == "call|t1|a"
    assert raw_key(CALL, b"x").startswith("raw|call|") and raw_key(CALL, b"x") != raw_key(CALL, b"y")
    assert not index.is_copy(0, key, b"bytes")
    index.accept_call(0, key, record)
    assert index.is_copy(0, key, b"other bytes: an accepted key is a copy whatever its payload")
    assert call_fact(record)[2] == 61_500  # raw connected milliseconds
    assert [(s.isoformat(), e.isoformat(), str(r)) for s, e, r in index.calls_of(0, "t1")] == [
        ("2026-11-02T09:59:59+00:00", "2026-11-02T10:01:01.500000+00:00", "61.5")
    ]
    index.refuse(0, "call|t1|b", 1, b"bad")
    assert index.state.get(0, "call|t1|b") == dead_fact(1, b"bad")
    assert index.is_copy(0, "call|t1|b", b"bad") and not index.is_copy(0, "call|t1|b", b"fixed")
    index.release(0, "call|t1|b")
    assert not index.is_copy(0, "call|t1|b", b"bad")


def test_the_sweep_forgets_only_keys_before_the_floor() -> None:
    table = MemoryTable()
    index = DedupeIndex(table)
    table.put(0, "call|t|old", [999, 900, 10])
    table.put(0, "call|t|new", [1000, 990, 10])
    table.put(0, "provisioning|t|p", 500)
    table.put(0, "raw|call|abc", [100, "dead", 7])
    assert index.sweep(0, 1000) == 3
    assert [key for key, _ in table.scan(0)] == ["call|t|new"]


def _plan_body() -> str:
    return """        base_fee: "10.00"
        included_seconds: 100
        overage: charge
        overage_tiers:
          - {up_to: null, rate: "0.0100"}
        overage_cap: null
        rounding: {minimum_seconds: 0, increment_seconds: 1}
        numbers: {included_local: 0, local_fee: "1.50", toll_free_fee: "4.00", max: 20}
        employees: {max_active: 20}
"""
