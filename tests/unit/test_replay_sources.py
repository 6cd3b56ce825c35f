"""replay's Avro fast path reads exactly what Serde.decode reads, as integer epoch millis."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from fastavro import parse_schema, schemaless_writer

from pipeline.replay.sources import CallDecoder, CallFacts, _without_logical_types
from schemas.errors import SerdeError
from schemas.serde import WRITER_SCHEMAS, Serde
from tests.unit.test_serde import _call_record_v2, call_record

# 2026-11-05T10:16:42.400Z and the answered/ended times of test_serde's call_record, in epoch millis.
STARTED = 1_793_873_802_400
EXPECTED = CallFacts(
    "acme", "e-1", "c-1", "emp-1", "INBOUND", "+15550000001", "+15551110001",
    STARTED, STARTED + 2_001, STARTED + 1_002_401, "ANSWERED", "gw-1", 4, 17,
)  # fmt: skip


def test_started_millis_is_the_instant() -> None:
    assert datetime.fromtimestamp(STARTED / 1000, UTC) == call_record()["started_at"]


def test_a_call_record_decodes_to_its_fields_in_millis() -> None:
    serde = Serde()
    data = serde.encode("CallRecord", call_record(), "calls")
    assert CallDecoder(serde).decode(data, 4, 17) == EXPECTED
    assert EXPECTED.to_call().started_at == call_record()["started_at"]


def test_a_never_answered_call_has_no_answer_time() -> None:
    serde = Serde()
    data = serde.encode("CallRecord", call_record(answered_at=None, employee_id=None), "calls")
    got = CallDecoder(serde).decode(data, 0, 0)
    assert got == EXPECTED._replace(
        answered_millis=None, employee_id=None, source_partition=0, source_offset=0
    )
    assert got is not None and got.to_call().answered_at is None


def test_what_serde_refuses_is_skipped() -> None:
    serde = Serde()
    decoder = CallDecoder(serde)
    data = serde.encode("CallRecord", call_record(), "calls")
    assert decoder.decode(data + b"\x00", 0, 0) is None  # trailing bytes
    assert decoder.decode(data[:-3], 0, 0) is None  # truncated
    assert decoder.decode(b"", 0, 0) is None
    assert decoder.decode(b"\x00\x00\x00\x00\x01" + data[10:], 0, 0) is None  # Confluent framing, no registry
    assert decoder.decode(b"\xc3\x01" + b"\x01" * 8 + data[10:], 0, 0) is None  # unknown fingerprint


def test_a_writer_schema_registered_later_goes_through_serde() -> None:
    new = Serde()
    new.add_schema_version(_call_record_v2())
    data = new.encode("CallRecord", {**call_record(), "recording_url": "s3://x"}, "calls")
    old = Serde()
    assert CallDecoder(old).decode(data, 4, 17) is None  # not known: UNKNOWN_SCHEMA
    old.register_writer_schema(_call_record_v2())
    assert CallDecoder(old).decode(data, 4, 17) == EXPECTED


@pytest.mark.parametrize(
    ("started_millis", "decodes"),
    [
        (-62_135_596_800_000, True),  # 0001-01-01T00:00:00Z
        (-62_135_596_800_001, False),
        (253_402_300_799_999, True),  # 9999-12-31T23:59:59.999Z
        (253_402_300_800_000, False),
        (2**62, False),
    ],
)
def test_a_timestamp_no_datetime_holds_is_skipped_as_serde_refuses_it(
    started_millis: int, decodes: bool
) -> None:
    serde = Serde()
    good = serde.encode("CallRecord", call_record(), "calls")
    writer = next(v for v in WRITER_SCHEMAS.values() if v.fingerprint == good[2:10])
    body = io.BytesIO()
    record = {**call_record(), "started_at": started_millis, "answered_at": None, "ended_at": started_millis}
    schemaless_writer(body, parse_schema(_without_logical_types(writer.raw)), record)
    data = good[:10] + body.getvalue()
    serde_decodes = True
    try:
        serde.decode(data)
    except SerdeError:
        serde_decodes = False
    assert serde_decodes == decodes
    got = CallDecoder(serde).decode(data, 0, 0)
    assert (got is not None) == decodes
    assert got is None or got.started_millis == started_millis
