"""Worker output records as ledger rows, with the identity the sink's first-seen check needs
(sinks/sink.py, protocol step 2)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Message

from pipeline import metrics
from pipeline.records import CALL_FIELDS, PROVISIONING_FIELDS, payload_json, rated_call_row
from pipeline.settings import Topics
from schemas.errors import SerdeError
from schemas.serde import Serde
from sinks.columns import PROVISIONING_COLUMNS
from sinks.errors import LedgerError

DEAD = "deadletter"  # the first element of a dead letter's first-seen key


@dataclass(frozen=True)
class Entry:
    """One output record as ledger rows, with the identity the first-seen check needs."""

    # (raw topic, tenant, event id) of an accepted event, (DEAD, source topic, digest) of a dead letter;
    # None for duplicates.
    key: tuple[str, str, str] | None
    source: tuple[int, int]  # input partition and offset of the event
    payload: str
    rows: list[tuple[str, dict[str, Any]]]
    gateway_id: str = ""
    # The output record's Kafka timestamp: the same on every redelivery, so a duplicate the ledger finds
    # is one row however often its batch is written.
    written_at: datetime | None = None
    event_time: datetime | None = None  # the call's end or the provisioning event's time
    kind: str = ""  # call or provisioning
    tenant_id: str = ""
    event_id: str = ""


def _raw_event(
    topic: str, tenant_id: str, event_id: str, event_type: str, event_time: datetime, payload: str
) -> dict[str, Any]:
    return {
        "topic": topic,
        "tenant_id": tenant_id,
        "event_id": event_id,
        "event_type": event_type,
        "event_time": event_time,
        "payload": payload,
    }


def _at(source: tuple[int, int], ingested_at: datetime) -> dict[str, Any]:
    return {"source_partition": source[0], "source_offset": source[1], "ingested_at": ingested_at}


def _header(msg: Message, name: str) -> str | None:
    raw = msg.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else list(raw)
    for key, value in pairs:
        if key == name and value is not None:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


Copy = tuple[int, int, str]  # source partition, source offset, payload of a record the ledger holds


def first_seen(
    entries: list[Entry], known: dict[tuple[str, str, str], list[Copy]]
) -> list[tuple[Entry, Copy | None]]:
    """Each entry with None when it is to be written, or with the first copy the ledger (``known``, by key)
    or an earlier entry of the batch already holds from another source record: then it is a duplicate.
    The same source record again (a redelivered batch) is written: its rows collapse with the first."""
    known = {key: list(copies) for key, copies in known.items()}
    decided: list[tuple[Entry, Copy | None]] = []
    for entry in entries:
        if entry.key is None:
            decided.append((entry, None))
            continue
        copies = known.setdefault(entry.key, [])
        mine = (*entry.source, entry.payload)
        if copies and mine not in copies:
            decided.append((entry, copies[0]))
            continue
        if not copies:
            copies.append(mine)
        decided.append((entry, None))
    return decided


class EntryMaker:
    """``entry(msg)``: one output record as ledger rows. ``is_final(tenant, period start)`` says whether
    a period has a final invoice (a call rated into it is late)."""

    def __init__(self, topics: Topics, serde: Serde, is_final: Callable[[str, datetime], bool]) -> None:
        self.topics = topics
        self.serde = serde
        self._is_final = is_final

    def entry(self, msg: Message, topic: str, value: bytes) -> Entry:
        now = datetime.now(UTC)
        kind_ms, ms = msg.timestamp()
        written_at = datetime.fromtimestamp(ms / 1000, UTC) if kind_ms and ms > 0 else now
        if topic == self.topics.duplicates:
            d = self._decode(value, "Duplicate")
            names = ("source_topic", "source_partition", "source_offset", "kind", "tenant_id", "event_id")
            row = {name: d[name] for name in (*names, "gateway_id", "event_time", "detected_at")}
            row["detected_by"] = "worker"
            source = (int(d["source_partition"]), int(d["source_offset"]))
            return Entry(None, source, "", [("duplicates", row)])
        if topic == self.topics.deadletter:
            record = self._decode(value, "DeadLetter")
            key = record.get("key")
            original = bytes(record["value"])
            digest = int.from_bytes(hashlib.blake2b(original, digest_size=8).digest(), "big")
            tenant, event_id, gateway = self._identity(original)
            row = {
                **{name: record[name] for name in ("source_topic", "source_partition", "source_offset")},
                **{name: record[name] for name in ("reason", "message", "failed_at")},
                "key": key.decode("utf-8", "replace") if isinstance(key, bytes) else key,
                "value_hex": original.hex(),
                "value_digest": digest,
                "tenant_id": tenant,
                "event_id": event_id,
                "gateway_id": gateway,
            }
            source = (int(record["source_partition"]), int(record["source_offset"]))
            kind = "call" if record["source_topic"] == self.topics.calls else "provisioning"
            dead_key = (DEAD, str(record["source_topic"]), str(digest))
            return Entry(
                dead_key,
                source,
                "",
                [("dead_letters", row)],
                gateway,
                written_at,
                None,
                kind,
                tenant,
                event_id,
            )
        if topic == self.topics.rated:
            r = self._decode(value, "RatedCall")
            late = bool(r["late"]) or self._is_final(r["tenant_id"], r["period_start"])
            if late:
                metrics.LATE_EVENTS.inc()
            payload = payload_json(r, CALL_FIELDS)
            source = (int(r["source_partition"]), int(r["source_offset"]))
            raw = _raw_event("calls", r["tenant_id"], r["event_id"], "CallRecord", r["started_at"], payload)
            rows = [
                ("rated_calls", rated_call_row(r, late=late)),
                ("raw_events", {**raw, **_at(source, now)}),
            ]
            call_key = ("calls", r["tenant_id"], r["event_id"])
            return Entry(
                call_key,
                source,
                payload,
                rows,
                r["gateway_id"],
                written_at,
                r["ended_at"],
                "call",
                *call_key[1:],
            )
        if topic == self.topics.accepted:
            p = self._decode(value, "ProvisioningEvent")
            source = (
                int(_header(msg, "source-partition") or msg.partition() or 0),
                int(_header(msg, "source-offset") or msg.offset() or 0),
            )
            payload = payload_json(p, PROVISIONING_FIELDS)
            prov = {
                name: p.get(name)
                for name in PROVISIONING_COLUMNS
                if name not in ("source_partition", "source_offset")
            }
            prov.update(source_partition=source[0], source_offset=source[1])
            raw = _raw_event(
                "provisioning", p["tenant_id"], p["event_id"], "ProvisioningEvent", p["occurred_at"], payload
            )
            rows = [("provisioning_events", prov), ("raw_events", {**raw, **_at(source, now)})]
            prov_key = ("provisioning", p["tenant_id"], p["event_id"])
            return Entry(
                prov_key,
                source,
                payload,
                rows,
                "",
                written_at,
                p["occurred_at"],
                "provisioning",
                *prov_key[1:],
            )
        text = f"sink received a record from unexpected topic {topic}"
        raise LedgerError(text)

    def _identity(self, original: bytes) -> tuple[str, str, str]:
        """Tenant, event id and gateway of a dead letter's original bytes, or blanks when they do not
        decode (the reason the record is a dead letter at all, often)."""
        try:
            _name, record = self.serde.decode(original)
        except SerdeError:
            return ("", "", "")
        fields = (record.get("tenant_id"), record.get("event_id"), record.get("gateway_id"))
        return tuple(value if isinstance(value, str) else "" for value in fields)  # type: ignore[return-value]

    def _decode(self, value: bytes, expected: str) -> dict[str, Any]:
        try:
            name, record = self.serde.decode(value)
        except SerdeError as exc:
            # Our own output topics: a record we cannot read is a bug or a foreign writer; stop loudly
            # rather than skip money.
            text = f"undecodable record on an output topic ({exc.reason}): {exc.message}"
            raise LedgerError(text) from exc
        if name != expected:
            text = f"expected {expected} on output topic, got {name}"
            raise LedgerError(text)
        return record
