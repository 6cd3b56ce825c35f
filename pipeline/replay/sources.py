"""Where `callmeter replay` reads its calls (step 2 of replay/job.py's protocol), as ``CallFacts``.

A replay reads a month of calls, so the hot path builds no datetimes and no CallEvent: Avro is decoded
with the logical types stripped from the writer schema (timestamps stay integer epoch millis), and the
ledger's raw events are unpacked by ClickHouse itself. Anything off that path (a Confluent-framed value,
a writer schema callmeter does not ship) goes through ``Serde.decode``, which yields the same fields.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, cast

from confluent_kafka import Consumer, TopicPartition
from fastavro import parse_schema, schemaless_reader

from pipeline.settings import Settings
from rating.bulk import millis_of
from rating.models import CallEvent
from schemas.errors import SerdeError
from schemas.serde import RECORDS, SINGLE_OBJECT_MAGIC, WRITER_SCHEMAS, Serde
from sinks.ledger import Ledger

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The timestamps Serde.decode can turn into datetimes (years 1-9999); anything outside does not decode.
_MIN_MILLIS = millis_of(datetime.min.replace(tzinfo=UTC))
_MAX_MILLIS = millis_of(datetime.max.replace(tzinfo=UTC))
_HEADER_LEN = 10  # single-object encoding: C3 01 + 8-byte fingerprint
_CONSUME_BATCH = 10_000
_CONSUME_WAIT_SECONDS = 0.1
_QUIET_SECONDS = 5.0  # nothing more arrives for this long: the rest is an open transaction's


class CallFacts(NamedTuple):
    """One call as read from a source, timestamps in epoch millis, with where it was read."""

    tenant_id: str
    event_id: str
    call_id: str
    employee_id: str | None
    direction: str
    from_number: str
    to_number: str
    started_millis: int
    answered_millis: int | None
    ended_millis: int
    disposition: str
    gateway_id: str
    source_partition: int
    source_offset: int

    def to_call(self) -> CallEvent:
        answered = None if self.answered_millis is None else _datetime(self.answered_millis)
        return CallEvent(
            self.event_id,
            self.tenant_id,
            self.call_id,
            self.employee_id,
            self.direction,
            self.from_number,
            self.to_number,
            _datetime(self.started_millis),
            answered,
            _datetime(self.ended_millis),
            self.disposition,
            self.gateway_id,
        )


def _datetime(millis: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=millis)


def _facts(record: dict[str, Any], partition: int, offset: int) -> CallFacts:
    return CallFacts(
        record["tenant_id"],
        record["event_id"],
        record["call_id"],
        record.get("employee_id"),
        record["direction"],
        record["from_number"],
        record["to_number"],
        record["started_at"],
        record.get("answered_at"),
        record["ended_at"],
        record["disposition"],
        record["gateway_id"],
        partition,
        offset,
    )


def _without_logical_types(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_without_logical_types(v) for v in schema]
    return schema


class CallDecoder:
    """Avro CallRecord values -> CallFacts (None for anything else, or what does not decode: it went to
    the dead-letter topic when it arrived, and replay rates calls only)."""

    def __init__(self, serde: Serde) -> None:
        self.serde = serde
        newest = next(v for v in WRITER_SCHEMAS.values() if v.parsed is RECORDS["CallRecord"])
        reader = parse_schema(_without_logical_types(newest.raw))
        # Writer fingerprint -> (writer, reader or None when they are the same), as Serde resolves.
        self._plain: dict[bytes, tuple[Any, Any]] = {
            fp: (parse_schema(_without_logical_types(v.raw)), None if v is newest else reader)
            for fp, v in WRITER_SCHEMAS.items()
            if v.record_name == "CallRecord"
        }

    def decode(self, data: bytes, partition: int, offset: int) -> CallFacts | None:
        plain = self._plain.get(data[2:_HEADER_LEN]) if data[:2] == SINGLE_OBJECT_MAGIC else None
        if plain is None:
            return self._slow(data, partition, offset)
        buf = io.BytesIO(data)
        buf.seek(_HEADER_LEN)
        try:
            record = cast("dict[str, Any]", schemaless_reader(buf, plain[0], plain[1]))
        except Exception:  # corrupt bytes: what Serde.decode reports as UNDECODABLE
            return None
        if buf.tell() != len(data):  # trailing bytes: not written with this schema (Serde refuses it too)
            return None
        answered = record["answered_at"]
        if not (
            _MIN_MILLIS <= record["started_at"] <= _MAX_MILLIS
            and _MIN_MILLIS <= record["ended_at"] <= _MAX_MILLIS
            and (answered is None or _MIN_MILLIS <= answered <= _MAX_MILLIS)
        ):
            return None  # no datetime holds it: Serde refuses it as UNDECODABLE
        return _facts(record, partition, offset)

    def _slow(self, data: bytes, partition: int, offset: int) -> CallFacts | None:
        try:
            name, record = self.serde.decode(data)
        except SerdeError:
            return None
        if name != "CallRecord":
            return None
        answered = record.get("answered_at")
        record.update(
            started_at=millis_of(record["started_at"]),
            answered_at=None if answered is None else millis_of(answered),
            ended_at=millis_of(record["ended_at"]),
        )
        return _facts(record, partition, offset)


# -- Kafka -------------------------------------------------------------------------------------------
def consumer(settings: Settings, bootstrap: str) -> Consumer:
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            # Never committed: replay must not move any group's offsets.
            "group.id": f"{settings.app_id}-replay-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
        }
    )


def kafka_covers(settings: Settings, bootstrap: str, ts_from: datetime) -> bool:
    """True when no record the range may need has been deleted from the calls topic."""
    c = consumer(settings, bootstrap)
    try:
        topic = settings.topics.calls
        meta = c.list_topics(topic, timeout=10).topics[topic]
        for partition in meta.partitions:
            low, high = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
            if low == 0:
                continue
            if low >= high:
                return False  # everything ever written here is gone
            c.assign([TopicPartition(topic, partition, low)])
            msg = c.poll(10)
            if msg is None or msg.error() is not None or msg.timestamp()[1] > ts_from.timestamp() * 1000:
                return False
        return True
    finally:
        c.close()


def calls_from_kafka(
    settings: Settings, bootstrap: str, serde: Serde, ts_from: datetime, ts_to: datetime, tenant: str | None
) -> Iterator[CallFacts]:
    """Every CallRecord of the calls topic that started in [from, to), read up to the end offsets
    taken at the start, in partition order."""
    c = consumer(settings, bootstrap)
    topic = settings.topics.calls
    decoder = CallDecoder(serde)
    from_ms, to_ms = millis_of(ts_from), millis_of(ts_to)
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        # A call is published after it started, so nothing it needs has a record timestamp before ts_from.
        wanted = [TopicPartition(topic, p, from_ms) for p in meta.partitions]
        starts = c.offsets_for_times(wanted, timeout=10)
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions}
        assign = [tp for tp in starts if tp.offset >= 0 and tp.offset < ends[tp.partition]]
        if not assign:
            return
        c.assign(assign)
        remaining = {tp.partition for tp in assign}
        quiet_since: float | None = None
        while remaining:
            # A short wait: consume() holds a partly filled batch until its timeout, which would add
            # the whole wait to the last batch of every replay.
            msgs = c.consume(_CONSUME_BATCH, _CONSUME_WAIT_SECONDS)
            if not msgs:
                now = time.monotonic()
                quiet_since = now if quiet_since is None else quiet_since
                if now - quiet_since >= _QUIET_SECONDS:
                    # read_committed stops short of an open transaction's records; nothing else is pending.
                    break
                continue
            quiet_since = None
            for msg in msgs:
                if msg.error() is not None:
                    continue
                partition, offset = int(msg.partition() or 0), int(msg.offset() or 0)
                end = ends[partition]
                if offset >= end - 1:
                    remaining.discard(partition)
                if offset >= end:
                    continue
                facts = decoder.decode(msg.value() or b"", partition, offset)
                if facts is None or (tenant and facts.tenant_id != tenant):
                    continue
                if from_ms <= facts.started_millis < to_ms:
                    yield facts
    finally:
        c.close()


# -- the ledger ----------------------------------------------------------------------------------------
def _millis_sql(name: str) -> str:
    text = f"JSONExtract(payload, '{name}', 'Nullable(String)')"
    return f"toUnixTimestamp64Milli(parseDateTime64BestEffortOrNull({text}, 3, 'UTC'))"


_STRING_SQL = "JSONExtractString(payload, '{}')"
# The CallFacts fields from a raw event's payload: the sink's compact JSON with
# ``YYYY-MM-DDTHH:MM:SS.mmmZ`` timestamps (pipeline/records.py payload_json), unpacked by ClickHouse.
_FACTS_SQL = ", ".join(
    [
        *(_STRING_SQL.format(n) for n in ("tenant_id", "event_id", "call_id")),
        "JSONExtract(payload, 'employee_id', 'Nullable(String)')",
        *(_STRING_SQL.format(n) for n in ("direction", "from_number", "to_number")),
        f"assumeNotNull({_millis_sql('started_at')})",
        _millis_sql("answered_at"),
        f"assumeNotNull({_millis_sql('ended_at')})",
        *(_STRING_SQL.format(n) for n in ("disposition", "gateway_id")),
        "source_partition",
        "source_offset",
    ]
)


def calls_from_ledger(
    ledger: Ledger, ts_from: datetime, ts_to: datetime, tenant: str | None
) -> Iterator[CallFacts]:
    """Every deduplicated call in ``raw_events`` that started in [from, to): the source once the
    topic's retention no longer covers the range."""
    tenant_clause = "AND tenant_id = {t:String}" if tenant else ""
    rows = ledger.query(
        f"SELECT {_FACTS_SQL} FROM raw_events FINAL "  # noqa: S608  # constant SQL, values are parameters
        "WHERE topic = 'calls' AND event_time >= {f:DateTime64(3, 'UTC')} "
        f"AND event_time < {{u:DateTime64(3, 'UTC')}} {tenant_clause} "
        "ORDER BY tenant_id, event_time, event_id",
        {"f": ts_from, "u": ts_to, "t": tenant},
    )
    for row in rows:
        yield CallFacts(*row)
