"""JSON-lines events (spec section 1): parsing, error messages naming the field, and the inverse."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from schemas.errors import INVALID_EVENT, SerdeError
from schemas.json_events import (
    event_to_json,
    format_timestamp,
    parse_json_event,
    parse_json_line,
    parse_timestamp,
)
from schemas.serde import Serde

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "examples" / "events.jsonl"

CALL: dict[str, Any] = {
    "type": "call",
    "event_id": "c1",
    "tenant_id": "acme",
    "call_id": "call-1",
    "employee_id": None,
    "direction": "OUTBOUND",
    "from_number": "+15550000001",
    "to_number": "+15551110001",
    "started_at": "2026-11-05T10:16:40Z",
    "answered_at": "2026-11-05T10:16:42.400Z",
    "ended_at": "2026-11-05T12:33:22.800+02:00",
    "disposition": "ANSWERED",
    "gateway_id": "gw-1",
}


def _fixture_lines() -> list[str]:
    return [line for line in FIXTURE.read_text().splitlines() if line.strip()]


def test_fixture_events_parse_and_survive_avro() -> None:
    serde = Serde()
    kinds = set()
    for line in _fixture_lines():
        record_name, record = parse_json_line(line)
        kinds.add(record_name)
        assert serde.decode(serde.encode(record_name, record, "t")) == (record_name, record)
    assert kinds == {"CallRecord", "ProvisioningEvent"}


def test_fixture_events_round_trip_through_event_to_json() -> None:
    for line in _fixture_lines():
        record_name, record = parse_json_line(line)
        again = event_to_json(record_name, record)
        assert next(iter(again)) == "type"
        assert parse_json_event(json.loads(json.dumps(again))) == (record_name, record)


def test_call_timestamps_become_aware_utc() -> None:
    record_name, record = parse_json_event(CALL)
    assert record_name == "CallRecord"
    assert record["answered_at"] == datetime(2026, 11, 5, 10, 16, 42, 400000, tzinfo=UTC)
    assert record["ended_at"] == datetime(2026, 11, 5, 10, 33, 22, 800000, tzinfo=UTC)
    assert record["ended_at"].tzinfo == UTC
    assert record["employee_id"] is None


def test_event_to_json_writes_milliseconds_and_z() -> None:
    _, record = parse_json_event(CALL)
    out = event_to_json("CallRecord", record)
    assert out["started_at"] == "2026-11-05T10:16:40.000Z"
    assert out["ended_at"] == "2026-11-05T10:33:22.800Z"
    assert out["employee_id"] is None


def test_missing_nullable_field_is_null() -> None:
    obj = dict(CALL)
    del obj["employee_id"], obj["answered_at"]
    _, record = parse_json_event(obj)
    assert record["employee_id"] is None and record["answered_at"] is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"event_id": None}, "event_id"),
        ({"event_id": ""}, "event_id"),
        ({"tenant_id": 7}, "tenant_id"),
        ({"direction": "SIDEWAYS"}, "direction"),
        ({"direction": None}, "direction"),
        ({"disposition": "answered"}, "disposition"),
        ({"started_at": "2026-11-05 10:16:40"}, "started_at"),
        ({"started_at": "2026-11-05T10:16:40"}, "started_at"),
        ({"started_at": "2026-13-05T10:16:40Z"}, "started_at"),
        ({"started_at": "2026-11-05T10:16:40.4001Z"}, "started_at"),
        ({"started_at": 1794000000000}, "started_at"),
        ({"answered_at": "soon"}, "answered_at"),
        ({"employee_id": 5}, "employee_id"),
        ({"gatway_id": "gw-1"}, "gatway_id"),
    ],
)
def test_invalid_call_names_the_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(SerdeError) as info:
        parse_json_event({**CALL, **change})
    assert info.value.reason == INVALID_EVENT
    assert f"'{field}'" in info.value.message
    assert "\n" not in info.value.message


def test_missing_required_field() -> None:
    obj = dict(CALL)
    del obj["gateway_id"]
    with pytest.raises(SerdeError, match="'gateway_id': missing"):
        parse_json_event(obj)


@pytest.mark.parametrize("kind", [None, "invoice", 3])
def test_unknown_type(kind: Any) -> None:
    with pytest.raises(SerdeError, match="'type'") as info:
        parse_json_event({**CALL, "type": kind})
    assert info.value.reason == INVALID_EVENT


def test_missing_type() -> None:
    obj = dict(CALL)
    del obj["type"]
    with pytest.raises(SerdeError, match="'type': expected 'call' or 'provisioning', missing"):
        parse_json_event(obj)


def test_provisioning_enums() -> None:
    obj = {
        "type": "provisioning",
        "event_id": "p1",
        "tenant_id": "acme",
        "occurred_at": "2026-10-01T09:00:00Z",
        "action": "NUMBER_PROVISIONED",
        "number": "+15551110001",
        "number_type": "LOCAL",
    }
    assert parse_json_event(obj)[1]["number_type"] == "LOCAL"
    with pytest.raises(SerdeError, match="'number_type'"):
        parse_json_event({**obj, "number_type": "MOBILE"})
    with pytest.raises(SerdeError, match="'action'"):
        parse_json_event({**obj, "action": "NUMBER_PORTED"})


def test_non_object_and_bad_json() -> None:
    with pytest.raises(SerdeError) as info:
        parse_json_event([1, 2])  # type: ignore[arg-type]
    assert info.value.reason == INVALID_EVENT
    with pytest.raises(SerdeError, match="not valid JSON") as info:
        parse_json_line('{"type": "call",')
    assert info.value.reason == INVALID_EVENT


def test_semantically_odd_calls_are_still_valid_events() -> None:
    # Ended before answered is the rating step's dead-letter case, not a parse error.
    _, record = parse_json_event({**CALL, "ended_at": "2026-11-05T10:16:41Z"})
    assert record["ended_at"] < record["answered_at"]


def test_event_to_json_rejects_naive_and_unknown() -> None:
    _, record = parse_json_event(CALL)
    with pytest.raises(SerdeError, match="'started_at'"):
        event_to_json("CallRecord", {**record, "started_at": datetime(2026, 11, 5)})
    with pytest.raises(SerdeError, match="RatedCall"):
        event_to_json("RatedCall", record)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-05T10:16:42.400Z", datetime(2026, 11, 5, 10, 16, 42, 400000, tzinfo=UTC)),
        ("2026-11-05t10:16:42.4z", datetime(2026, 11, 5, 10, 16, 42, 400000, tzinfo=UTC)),
        ("2026-11-05T10:16:42.400000000+00:00", datetime(2026, 11, 5, 10, 16, 42, 400000, tzinfo=UTC)),
        ("2026-11-05T05:46:42.001-04:30", datetime(2026, 11, 5, 10, 16, 42, 1000, tzinfo=UTC)),
    ],
)
def test_parse_timestamp(text: str, expected: datetime) -> None:
    assert parse_timestamp(text) == expected
    assert parse_timestamp(text).tzinfo == UTC


def test_format_timestamp_truncates_below_millisecond() -> None:
    assert format_timestamp(datetime(2026, 1, 2, 3, 4, 5, 678999, tzinfo=UTC)) == "2026-01-02T03:04:05.678Z"
