"""Avro serde: both wire formats, fingerprints, schema evolution and failure reason codes."""

from __future__ import annotations

import copy
import json
import re
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastavro.schema import to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.errors import INVALID_EVENT, UNDECODABLE, UNKNOWN_SCHEMA, RegistryError, SerdeError
from schemas.serde import (
    RECORDS,
    SCHEMA_DIR,
    WRITER_SCHEMAS,
    Serde,
    fingerprint,
    load_schemas,
)

T0 = datetime(2026, 11, 5, 10, 16, 42, 400000, tzinfo=UTC)


def call_record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event_id": "e-1",
        "tenant_id": "acme",
        "call_id": "c-1",
        "employee_id": "emp-1",
        "direction": "INBOUND",
        "from_number": "+15550000001",
        "to_number": "+15551110001",
        "started_at": T0,
        "answered_at": T0 + timedelta(seconds=2, milliseconds=1),
        "ended_at": T0 + timedelta(seconds=1002, milliseconds=401),
        "disposition": "ANSWERED",
        "gateway_id": "gw-1",
    }
    record.update(overrides)
    return record


SAMPLES: dict[str, dict[str, Any]] = {
    "CallRecord": call_record(),
    "ProvisioningEvent": {
        "event_id": "p-1",
        "tenant_id": "acme",
        "occurred_at": T0,
        "action": "NUMBER_PROVISIONED",
        "plan_id": None,
        "tax_region": None,
        "number": "+18005550100",
        "number_type": "TOLL_FREE",
        "employee_id": None,
        "alert_thresholds_percent": None,
    },
    "RatedCall": {
        **call_record(),
        "source_topic": "calls",
        "source_partition": 3,
        "source_offset": 2**40,
        "period_start": datetime(2026, 11, 1, tzinfo=UTC),
        "period_end": datetime(2026, 12, 1, tzinfo=UTC),
        "plan_id": "starter",
        "raw_seconds": "1000.400",
        "billable_seconds": 1001,
        "catalog_revision": 2,
        "late": True,
        "rated_at": T0 + timedelta(hours=1),
    },
    "Alert": {
        "alert_id": "acme-20261101-90",
        "tenant_id": "acme",
        "kind": "USAGE_THRESHOLD",
        "period_start": datetime(2026, 11, 1, tzinfo=UTC),
        "threshold_percent": 90,
        "used_seconds": 16200,
        "included_seconds": 18000,
        "message": "90% of included seconds used",
        "emitted_at": T0,
        "crossed_at": T0 - timedelta(minutes=5),
        "resource": "call_seconds",
        "usage": 16200,
        "allowance": 18000,
        "projected_exhaustion_date": date(2026, 11, 7),
    },
    "DeadLetter": {
        "source_topic": "calls",
        "source_partition": 0,
        "source_offset": 17,
        "key": b"acme",
        "value": b"\x00\xff garbage",
        "reason": "UNDECODABLE",
        "message": "CallRecord body does not decode",
        "failed_at": T0,
    },
    "Duplicate": {
        "source_topic": "calls",
        "source_partition": 2,
        "source_offset": 2**33,
        "kind": "call",
        "tenant_id": "acme",
        "event_id": "c-1",
        "gateway_id": "gw-east",
        "event_time": T0,
        "detected_at": T0 + timedelta(seconds=3),
    },
}


# -- the Avro spec's reference fingerprint, implemented independently of fastavro --------------------

_EMPTY64 = 0xC15D213AA4D7A795


def _fp_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY64 & -(fp & 1))
        table.append(fp)
    return table


_FP_TABLE = _fp_table()


def spec_fingerprint64(data: bytes) -> int:
    fp = _EMPTY64
    for byte in data:
        fp = (fp >> 8) ^ _FP_TABLE[(fp ^ byte) & 0xFF]
    return fp


def test_spec_algorithm_known_vector() -> None:
    assert spec_fingerprint64(b'"int"') == 0x7275D51A3F395C8F


def test_fingerprint_is_spec_value_little_endian() -> None:
    assert fingerprint("int") == (0x7275D51A3F395C8F).to_bytes(8, "little")
    for version in WRITER_SCHEMAS.values():
        canonical = to_parsing_canonical_form(version.raw).encode()
        assert version.fingerprint == spec_fingerprint64(canonical).to_bytes(8, "little")


@pytest.mark.parametrize("record_name", sorted(SAMPLES))
def test_single_object_header(record_name: str) -> None:
    data = Serde().encode(record_name, SAMPLES[record_name], "topic")
    canonical = to_parsing_canonical_form(json.loads(_avsc(record_name).read_text())).encode()
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == spec_fingerprint64(canonical).to_bytes(8, "little")


# -- schema files ---------------------------------------------------------------------------------


def _avsc(record_name: str) -> Path:
    """The newest schema file of a record (the one ``encode`` writes)."""
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", record_name).lower()
    files = SCHEMA_DIR.glob(f"{snake}.v*.avsc")
    return max(files, key=lambda f: int(f.name.removesuffix(".avsc").rsplit(".v", 1)[1]))


def test_records_are_the_six_types() -> None:
    assert set(RECORDS) == {
        "CallRecord",
        "ProvisioningEvent",
        "RatedCall",
        "Alert",
        "DeadLetter",
        "Duplicate",
    }


@pytest.mark.parametrize("record_name", sorted(SAMPLES))
def test_schema_conventions(record_name: str) -> None:
    raw = json.loads(_avsc(record_name).read_text())
    assert raw["namespace"] == "io.callmeter"
    assert raw["name"] == record_name
    for field in raw["fields"]:
        if isinstance(field["type"], list):
            assert field["type"][0] == "null" and "default" in field and field["default"] is None, field
        if field["name"].endswith("_at") or field["name"] in ("period_start", "period_end"):
            ts = field["type"][1] if isinstance(field["type"], list) else field["type"]
            assert ts == {"type": "long", "logicalType": "timestamp-millis"}, field


def test_rated_call_carries_every_call_record_field() -> None:
    call = json.loads(_avsc("CallRecord").read_text())["fields"]
    rated = json.loads(_avsc("RatedCall").read_text())["fields"]
    assert rated[: len(call)] == call


def test_load_schemas_rejects_misnamed_files(tmp_path: Path) -> None:
    (tmp_path / "call_record.avsc").write_text(_avsc("CallRecord").read_text())
    with pytest.raises(ValueError, match="must be named"):
        load_schemas(tmp_path)
    (tmp_path / "call_record.avsc").unlink()
    (tmp_path / "alert.v1.avsc").write_text(_avsc("CallRecord").read_text())
    with pytest.raises(ValueError, match=r"call_record\.v<N>"):
        load_schemas(tmp_path)


def test_load_schemas_newest_version_last(tmp_path: Path) -> None:
    raw = json.loads(_avsc("Alert").read_text())
    (tmp_path / "alert.v1.avsc").write_text(json.dumps(raw))
    raw["fields"].append({"name": "extra", "type": ["null", "string"], "default": None})
    (tmp_path / "alert.v10.avsc").write_text(json.dumps(raw))
    (tmp_path / "alert.v2.avsc").write_text(json.dumps(raw | {"doc": "v2"}))
    assert [v.version for v in load_schemas(tmp_path)] == [1, 2, 10]


# -- single-object round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("record_name", sorted(SAMPLES))
def test_single_object_round_trip(record_name: str) -> None:
    serde = Serde()
    assert serde.decode(serde.encode(record_name, SAMPLES[record_name], "topic")) == (
        record_name,
        SAMPLES[record_name],
    )


def test_nullable_fields_may_be_left_out() -> None:
    serde = Serde()
    record = call_record()
    del record["employee_id"], record["answered_at"]
    _, decoded = serde.decode(serde.encode("CallRecord", record, "calls"))
    assert decoded["employee_id"] is None and decoded["answered_at"] is None


def test_timestamps_come_back_utc_with_milliseconds() -> None:
    serde = Serde()
    plus_two = timezone(timedelta(hours=2))
    started = datetime(2026, 11, 5, 12, 16, 42, 400000, tzinfo=plus_two)
    # Avro timestamp-millis keeps milliseconds only: 999 µs below the millisecond are dropped.
    ended = datetime(2026, 11, 5, 10, 20, 0, 123999, tzinfo=UTC)
    data = serde.encode("CallRecord", call_record(started_at=started, ended_at=ended), "calls")
    _, decoded = serde.decode(data)
    assert decoded["started_at"] == datetime(2026, 11, 5, 10, 16, 42, 400000, tzinfo=UTC)
    assert decoded["started_at"].tzinfo == UTC
    assert decoded["ended_at"] == datetime(2026, 11, 5, 10, 20, 0, 123000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"direction": "SIDEWAYS"}, "SIDEWAYS"),
        ({"event_id": None}, "event_id"),
        ({"started_at": "yesterday"}, "started_at"),
        ({"unexpected": 1}, "unexpected"),
    ],
)
def test_encode_rejects_records_that_do_not_fit(overrides: dict[str, Any], needle: str) -> None:
    with pytest.raises(SerdeError) as info:
        Serde().encode("CallRecord", call_record(**overrides), "calls")
    assert info.value.reason == INVALID_EVENT
    assert needle in info.value.message


def test_encode_unknown_record_name() -> None:
    with pytest.raises(SerdeError) as info:
        Serde().encode("Invoice", {}, "invoices")
    assert info.value.reason == UNKNOWN_SCHEMA


def test_encode_missing_required_field() -> None:
    record = call_record()
    del record["gateway_id"]
    with pytest.raises(SerdeError, match="gateway_id") as info:
        Serde().encode("CallRecord", record, "calls")
    assert info.value.reason == INVALID_EVENT


# -- failures on decode -------------------------------------------------------------------------------


def _reason(serde: Serde, data: bytes) -> str:
    with pytest.raises(SerdeError) as info:
        serde.decode(data)
    assert "\n" not in info.value.message
    return info.value.reason


@pytest.mark.parametrize("data", [b"", b"hello world", b"\xc3", b"\xc3\x01\x00", b"\x00\x00\x01", b"{}"])
def test_garbage_is_undecodable(data: bytes) -> None:
    assert _reason(Serde(), data) == UNDECODABLE


def test_every_truncation_is_undecodable() -> None:
    serde = Serde()
    data = serde.encode("CallRecord", call_record(), "calls")
    for end in range(len(data)):
        assert _reason(serde, data[:end]) == UNDECODABLE, end


def test_trailing_bytes_are_undecodable() -> None:
    serde = Serde()
    assert _reason(serde, serde.encode("Alert", SAMPLES["Alert"], "alerts") + b"\x00") == UNDECODABLE


def test_corrupt_body_is_undecodable() -> None:
    serde = Serde()
    data = bytearray(serde.encode("CallRecord", call_record(), "calls"))
    data[10] = 0x7F  # event_id length -64: negative
    assert _reason(serde, bytes(data)) == UNDECODABLE


def test_unknown_fingerprint() -> None:
    serde = Serde()
    data = bytearray(serde.encode("CallRecord", call_record(), "calls"))
    data[2] ^= 0xFF
    assert _reason(serde, bytes(data)) == UNKNOWN_SCHEMA


def test_confluent_framing_without_registry_is_unknown_schema() -> None:
    body = Serde().encode("Alert", SAMPLES["Alert"], "alerts")[10:]
    assert _reason(Serde(), b"\x00" + (42).to_bytes(4, "big") + body) == UNKNOWN_SCHEMA


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=80))
def test_arbitrary_body_never_leaks_a_fastavro_error(body: bytes) -> None:
    serde = Serde()
    header = serde.encode("CallRecord", call_record(), "calls")[:10]
    try:
        name, _ = serde.decode(header + body)
    except SerdeError as exc:
        assert exc.reason == UNDECODABLE
    else:
        assert name == "CallRecord"


def test_decode_many_returns_errors_in_place() -> None:
    serde = Serde()
    good = serde.encode("Alert", SAMPLES["Alert"], "alerts")
    results = serde.decode_many([good, b"junk", good])
    assert results[0] == ("Alert", SAMPLES["Alert"]) == results[2]
    assert isinstance(results[1], SerdeError) and results[1].reason == UNDECODABLE


# -- evolution ------------------------------------------------------------------------------------


def _call_record_v2() -> dict[str, Any]:
    raw = json.loads(_avsc("CallRecord").read_text())
    raw["fields"].append({"name": "recording_url", "type": ["null", "string"], "default": None})
    raw["fields"].append({"name": "codec", "type": "string", "default": "PCMU"})
    return raw


def test_old_writer_new_reader_gets_defaults() -> None:
    old_bytes = Serde().encode("CallRecord", call_record(), "calls")
    new = Serde()
    fp = new.add_schema_version(_call_record_v2())
    assert new.current_version("CallRecord").fingerprint == fp
    name, decoded = new.decode(old_bytes)
    assert name == "CallRecord"
    assert decoded == {**call_record(), "recording_url": None, "codec": "PCMU"}
    # New bytes carry the v2 fingerprint and round-trip through v2.
    new_bytes = new.encode("CallRecord", {**call_record(), "codec": "OPUS"}, "calls")
    assert new_bytes[2:10] == fp
    assert new.decode(new_bytes)[1]["codec"] == "OPUS"


def test_new_writer_old_reader_drops_unknown_fields() -> None:
    new = Serde()
    new.add_schema_version(_call_record_v2())
    new_bytes = new.encode("CallRecord", {**call_record(), "recording_url": "s3://x"}, "calls")
    old = Serde()
    assert _reason(old, new_bytes) == UNKNOWN_SCHEMA  # v2 not known to this consumer yet
    old.register_writer_schema(_call_record_v2())
    assert old.decode(new_bytes) == ("CallRecord", call_record())


def test_incompatible_writer_is_unknown_schema() -> None:
    raw = json.loads(_avsc("Alert").read_text())
    for field in raw["fields"]:
        if field["name"] == "used_seconds":
            field["type"] = "string"
    writer = Serde()
    writer.add_schema_version(copy.deepcopy(raw))
    data = writer.encode("Alert", {**SAMPLES["Alert"], "used_seconds": "lots"}, "alerts")
    reader = Serde()
    reader.register_writer_schema(raw)
    assert _reason(reader, data) == UNKNOWN_SCHEMA


def test_registering_a_writer_for_an_unknown_record_fails() -> None:
    with pytest.raises(SerdeError) as info:
        Serde().register_writer_schema({"type": "record", "name": "Invoice", "fields": []})
    assert info.value.reason == UNKNOWN_SCHEMA


def test_instances_do_not_share_registered_schemas() -> None:
    Serde().add_schema_version(_call_record_v2())
    assert Serde().current_version("CallRecord").version == 1


# -- Confluent wire format against an in-process registry (real HTTP on loopback, no mocks) ----------


class _Registry(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _RegistryHandler)
        self.schemas: list[str] = []
        self.subjects: dict[str, list[int]] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _RegistryHandler(BaseHTTPRequestHandler):
    """The two endpoints the serializer and our decoder use, per the Confluent REST API."""

    server: _Registry

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        match = re.fullmatch(r"/subjects/([^/?]+)/versions(\?.*)?", self.path)
        if match is None:
            self._reply(404, {"error_code": 404, "message": "not found"})
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            if body["schema"] not in self.server.schemas:
                self.server.schemas.append(body["schema"])
            schema_id = self.server.schemas.index(body["schema"]) + 1
            self.server.subjects.setdefault(match[1], []).append(schema_id)
        self._reply(200, {"id": schema_id})

    def do_GET(self) -> None:
        match = re.fullmatch(r"/schemas/ids/(\d+)(\?.*)?", self.path)
        schema_id = int(match[1]) if match else 0
        if not 1 <= schema_id <= len(self.server.schemas):
            self._reply(404, {"error_code": 40403, "message": "Schema not found"})
            return
        self._reply(200, {"schema": self.server.schemas[schema_id - 1]})

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def registry() -> Iterator[_Registry]:
    server = _Registry()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("record_name", sorted(SAMPLES))
def test_confluent_round_trip(registry: _Registry, record_name: str) -> None:
    producer = Serde(registry.url)
    data = producer.encode(record_name, SAMPLES[record_name], "topic-a")
    assert data[0] == 0
    assert int.from_bytes(data[1:5], "big") == 1
    assert registry.subjects == {"topic-a-value": [1]}
    # A fresh consumer has to fetch the schema by id.
    assert Serde(registry.url).decode(data) == (record_name, SAMPLES[record_name])


def test_registry_consumer_reads_single_object_too(registry: _Registry) -> None:
    data = Serde().encode("CallRecord", call_record(), "calls")
    assert Serde(registry.url).decode(data) == ("CallRecord", call_record())


def test_plain_consumer_cannot_read_confluent_framing(registry: _Registry) -> None:
    data = Serde(registry.url).encode("CallRecord", call_record(), "calls")
    assert _reason(Serde(), data) == UNKNOWN_SCHEMA


def test_confluent_unknown_schema_id(registry: _Registry) -> None:
    body = Serde().encode("Alert", SAMPLES["Alert"], "alerts")[10:]
    assert _reason(Serde(registry.url), b"\x00" + (99).to_bytes(4, "big") + body) == UNKNOWN_SCHEMA


def test_confluent_truncated_body(registry: _Registry) -> None:
    data = Serde(registry.url).encode("CallRecord", call_record(), "calls")
    consumer = Serde(registry.url)
    for end in (1, 4, 5, len(data) - 1):
        assert _reason(consumer, data[:end]) == UNDECODABLE


def test_confluent_writer_resolves_to_newest_reader(registry: _Registry) -> None:
    data = Serde(registry.url).encode("CallRecord", call_record(), "calls")
    consumer = Serde(registry.url)
    consumer.add_schema_version(_call_record_v2())
    assert consumer.decode(data)[1]["codec"] == "PCMU"


def test_confluent_schema_of_a_foreign_record(registry: _Registry) -> None:
    registry.schemas.append(json.dumps({"type": "record", "name": "Other", "fields": []}))
    data = b"\x00" + len(registry.schemas).to_bytes(4, "big")
    assert _reason(Serde(registry.url), data) == UNKNOWN_SCHEMA


def test_confluent_encode_rejects_unknown_fields(registry: _Registry) -> None:
    with pytest.raises(SerdeError) as info:
        Serde(registry.url).encode("CallRecord", call_record(extra=1), "calls")
    assert info.value.reason == INVALID_EVENT


def test_registry_outage_is_not_a_serde_error() -> None:
    # Port 9 (discard) on loopback: nothing listens, so the connection is refused. An outage must not
    # turn into UNKNOWN_SCHEMA, or every record would be dead-lettered while the registry is down.
    with pytest.raises(RegistryError):
        Serde("http://127.0.0.1:9").decode(b"\x00\x00\x00\x00\x01\x02")
