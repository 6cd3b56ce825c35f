"""What `produce` reads and what `consume` prints."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.commands.consume import render as render_record
from pipeline.commands.consume import topic_name
from pipeline.commands.produce import read_events
from pipeline.errors import InputError, UsageError
from pipeline.settings import Settings
from schemas.serde import Serde

# -- produce's input -----------------------------------------------------------------------------------


def test_a_line_that_is_not_utf8_is_named_with_its_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n" + '{"type": "call", "tenant_id": "Caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(InputError) as err:
        list(read_events(path))
    assert str(err.value) == f"{path}:2: not UTF-8 text (byte 0xe9 at column 35); JSON lines must be UTF-8"


def test_a_byte_order_mark_is_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf[1]\n")
    with pytest.raises(InputError) as err:
        list(read_events(path, "<stdin>"))
    assert str(err.value) == "<stdin>:1: expected a JSON object"


# -- what `consume` prints -----------------------------------------------------------------------------

CALL = {
    "event_id": "e1",
    "tenant_id": "acme",
    "call_id": "c1",
    "employee_id": None,
    "direction": "INBOUND",
    "from_number": "+15550000001",
    "to_number": "+15551110001",
    "started_at": datetime(2026, 11, 2, 10, 0, tzinfo=UTC),
    "answered_at": None,
    "ended_at": datetime(2026, 11, 2, 10, 0, 30, 500000, tzinfo=UTC),
    "disposition": "NO_ANSWER",
    "gateway_id": "gw-1",
}
STAMP = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp() * 1000)


def test_consume_shows_a_record_decoded() -> None:
    serde = Serde()
    value = serde.encode("CallRecord", CALL, "calls")
    assert render_record(serde, "calls", 2, 7, STAMP, b"acme", value) == {
        "topic": "calls",
        "partition": 2,
        "offset": 7,
        "timestamp": "2026-12-01T00:00:00.000Z",
        "key": "acme",
        "record": "CallRecord",
        "value": dict(CALL, started_at="2026-11-02T10:00:00.000Z", ended_at="2026-11-02T10:00:30.500Z"),
    }


def test_consume_shows_a_dead_letter_with_its_original_decoded() -> None:
    serde = Serde()
    original = serde.encode("CallRecord", CALL, "calls")
    letter = {
        "source_topic": "calls",
        "source_partition": 2,
        "source_offset": 7,
        "key": b"acme",
        "value": original,
        "reason": "ENDED_BEFORE_ANSWERED",
        "message": "ended before answered",
        "failed_at": datetime(2026, 12, 1, tzinfo=UTC),
    }
    line = render_record(
        serde, "deadletter", 2, 0, STAMP, b"acme", serde.encode("DeadLetter", letter, "deadletter")
    )
    assert line["value"]["key"] == {"utf8": "acme"}
    assert line["value"]["reason"] == "ENDED_BEFORE_ANSWERED"
    assert line["original_decoded"]["record"] == "CallRecord"
    assert line["original_decoded"]["value"]["event_id"] == "e1"


def test_consume_shows_undecodable_bytes_with_the_reason() -> None:
    line = render_record(Serde(), "calls", 0, 3, STAMP, None, b"{not avro")
    assert line["key"] is None
    assert line["error"].startswith("UNDECODABLE: unknown framing: starts with 7b6e")
    assert line["value_base64"] == "e25vdCBhdnJv"


@pytest.mark.parametrize(
    ("prefix", "name", "topic"),
    [
        ("", "calls", "calls"),
        ("t1.", "deadletter", "t1.deadletter"),
        ("t1.", "t1.calls.rated", "t1.calls.rated"),
    ],
)
def test_consume_takes_short_and_full_topic_names(prefix: str, name: str, topic: str) -> None:
    assert topic_name(Settings(topic_prefix=prefix), name) == topic


def test_consume_refuses_a_topic_that_is_not_the_pipelines() -> None:
    with pytest.raises(UsageError) as err:
        topic_name(Settings(), "__consumer_offsets")
    assert str(err.value) == (
        "consume: unknown topic '__consumer_offsets'; one of: calls, provisioning, calls.rated, "
        "provisioning.accepted, alerts, deadletter, duplicates"
    )
