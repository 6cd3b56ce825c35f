"""The emitter: every record the worker writes besides table changes, inside the transaction of the input
partition being handled (pipeline/stream/worker.py, protocol step 5).

Rated calls, accepted provisioning events, dead letters, duplicates and alerts are encoded here
(schemas/) and handed to ``send``, which the worker binds to the event's transactional producer
(``faust_send``); unit tests bind a list.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import faust

from pipeline import metrics
from pipeline.errors import PipelineError
from pipeline.records import rated_to_record
from pipeline.settings import Topics
from pipeline.stream.balances import AlertNote
from pipeline.stream.source import SourceRecord
from rating.calls import RatedCall
from schemas.serde import Serde

Headers = list[tuple[str, bytes]]
Send = Callable[[str, bytes | None, bytes, Headers | None], Awaitable[None]]


def faust_send(app: Any) -> Send:
    """``send`` through the transactional producer of the input partition being handled.

    Faust's own TransactionManager.send picks the transaction from the *destination* topic's group,
    which exists only for topics this app consumes; output topics are not among them, so the source
    partition's producer is named here (the id format Faust uses)."""

    async def send(topic: str, key: bytes | None, value: bytes, headers: Headers | None) -> None:
        event = faust.current_event()
        if event is None:
            msg = "output sent outside of an event"
            raise PipelineError(msg)
        src_topic, partition = event.message.topic, event.message.partition
        tid = f"{app.conf.id}-{app.assignor.group_for_topic(src_topic)}-{partition}"
        await app.producer.send(topic, key, value, partition, None, headers, transactional_id=tid)

    return send


class Emitter:
    def __init__(self, serde: Serde, topics: Topics, send: Send) -> None:
        self.serde = serde
        self.topics = topics
        self.send = send

    async def rated(self, src: SourceRecord, rated: RatedCall) -> None:
        record = rated_to_record(
            rated, source_topic=src.topic, source_partition=src.partition, source_offset=src.offset
        )
        value = self.serde.encode("RatedCall", record, self.topics.rated)
        await self.send(self.topics.rated, rated.call.tenant_id.encode(), value, None)
        metrics.RATED_RECORDS_PRODUCED.inc()

    async def accepted(self, src: SourceRecord, tenant_id: str) -> None:
        """An accepted provisioning event: its original bytes, its source position in headers."""
        headers = [
            ("source-topic", src.topic.encode()),
            ("source-partition", str(src.partition).encode()),
            ("source-offset", str(src.offset).encode()),
        ]
        await self.send(self.topics.accepted, tenant_id.encode(), src.value, headers)

    async def dead(self, src: SourceRecord, reason: str, message: str) -> None:
        metrics.DEAD_LETTERS.labels(reason=str(reason)).inc()
        record = {
            "source_topic": src.topic,
            "source_partition": src.partition,
            "source_offset": src.offset,
            "key": src.key,
            "value": src.value,
            "reason": str(reason),
            "message": message,
            "failed_at": datetime.now(UTC),
        }
        value = self.serde.encode("DeadLetter", record, self.topics.deadletter)
        await self.send(self.topics.deadletter, src.key, value, None)

    async def duplicate(
        self, src: SourceRecord, tenant_id: str, event_id: str, gateway_id: str, event_time: datetime | None
    ) -> None:
        """A copy the worker dropped, for the ledger's duplicate counts per gateway and tenant."""
        metrics.DUPLICATES.labels(topic=src.topic).inc()
        now = datetime.now(UTC)
        note = {
            "source_topic": src.topic,
            "source_partition": src.partition,
            "source_offset": src.offset,
            "kind": src.kind,
            "tenant_id": tenant_id,
            "event_id": event_id,
            "gateway_id": gateway_id,
            "event_time": event_time or src.received_at,
            "detected_at": now,
        }
        value = self.serde.encode("Duplicate", note, self.topics.duplicates)
        await self.send(self.topics.duplicates, tenant_id.encode(), value, None)

    async def alert(self, note: AlertNote) -> None:
        """The id is deterministic (tenant, period, kind, threshold or subject) so consumers can dedupe
        too; the ``alerted`` table already makes it one per tenant, period and threshold."""
        suffix = note.threshold_percent if note.threshold_percent is not None else note.subject
        record = {
            "alert_id": f"{note.tenant_id}-{note.period_start.strftime('%Y%m%d')}-{note.kind}-{suffix}",
            "tenant_id": note.tenant_id,
            "kind": note.kind,
            "period_start": note.period_start,
            "threshold_percent": note.threshold_percent,
            "used_seconds": note.used,
            "included_seconds": note.allowance,
            "message": note.message,
            "emitted_at": datetime.now(UTC),
            "crossed_at": note.crossed_at,
            "resource": note.resource,
            "usage": note.used,
            "allowance": note.allowance,
            "projected_exhaustion_date": note.projected,
        }
        value = self.serde.encode("Alert", record, self.topics.alerts)
        await self.send(self.topics.alerts, note.tenant_id.encode(), value, None)
        threshold = str(note.threshold_percent) if note.threshold_percent is not None else ""
        metrics.ALERTS_EMITTED.labels(kind=note.kind, threshold=threshold).inc()
