"""The worker's outputs other than rated calls: dead letters, duplicates, and the send that puts every
output inside the source partition's transaction (pipeline/stream/worker.py, protocol step 5)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import faust

from pipeline import metrics
from pipeline.errors import PipelineError
from pipeline.stream.parts import MeterParts


class Outputs(MeterParts):
    async def _duplicate(
        self, src: tuple[Any, ...], kind: str, record: dict[str, Any], event_time: datetime | None
    ) -> None:
        """Count a copy and tell the ledger (``duplicates``): duplicate rates per gateway and tenant are
        answered from there (issue 11), not only from this process's counters."""
        topic, partition, offset, _key, _raw = src
        self.stats.duplicates[kind] += 1
        metrics.DUPLICATES.labels(topic=topic).inc()
        self.stats.tick(duplicates=1)
        now = datetime.now(UTC)
        note = {
            "source_topic": topic,
            "source_partition": partition,
            "source_offset": offset,
            "kind": kind,
            "tenant_id": record["tenant_id"],
            "event_id": record["event_id"],
            "gateway_id": str(record.get("gateway_id") or ""),
            "event_time": event_time if isinstance(event_time, datetime) else now,
            "detected_at": now,
        }
        value = self.serde.encode("Duplicate", note, self.topics.duplicates)
        await self._send(self.topics.duplicates, record["tenant_id"].encode(), value)

    async def _dead(self, src: tuple[Any, ...], reason: str, message: str) -> None:
        topic, partition, offset, key, raw = src
        self.stats.dead_letters[str(reason)] += 1
        metrics.DEAD_LETTERS.labels(reason=str(reason)).inc()
        self.stats.tick(dead=1)
        record = {
            "source_topic": topic,
            "source_partition": partition,
            "source_offset": offset,
            "key": key,
            "value": raw,
            "reason": str(reason),
            "message": message,
            "failed_at": datetime.now(UTC),
        }
        await self._send(
            self.topics.deadletter, key, self.serde.encode("DeadLetter", record, self.topics.deadletter)
        )

    async def _send(
        self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None = None
    ) -> None:
        """Send inside the transaction of the input partition being processed (protocol step 5).

        Faust's own TransactionManager.send picks the transaction from the *destination* topic's group,
        which only exists for topics this app consumes; output topics are not among them, so we name the
        source partition's transactional producer ourselves (same id format Faust uses).
        """
        event = faust.current_event()
        if event is None:
            msg = "output sent outside of an event"
            raise PipelineError(msg)
        src_topic, partition = event.message.topic, event.message.partition
        tid = f"{self.app.conf.id}-{self.app.assignor.group_for_topic(src_topic)}-{partition}"
        await self.app.producer.send(topic, key, value, partition, None, headers, transactional_id=tid)
