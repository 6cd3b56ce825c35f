"""The ledger sink: worker output topics -> ClickHouse, exactly once in effect.

Commit protocol (what a crash at each step means):

1. Poll a batch from ``calls.rated``, ``provisioning.accepted`` and ``deadletter`` with
   ``isolation.level=read_committed``: only outputs of committed worker transactions are seen, so an
   aborted attempt of the worker never reaches the ledger.
2. Turn every record into ledger rows in memory (``Ledger.add``). Crash here: nothing written, nothing
   committed; the batch is polled again after restart.
3. ``Ledger.flush(token)`` inserts the rows, one insert per table, each with a deduplication token
   derived from the batch's source offsets. Crash or error here: the Kafka offsets are not committed,
   the batch is redelivered; rows already inserted are either refused by the token (same batch) or
   collapse by key (ReplacingMergeTree, read through FINAL/argMax), so nothing counts twice.
   (Crash point ``sink-3-inserted``, just after the insert.)
4. Commit the batch's offsets synchronously. Crash between 3 and 4: as in 3, the batch comes again and
   is absorbed by the keys. A failed flush never reaches this step: the sink stops and the worker exits
   non-zero, so a broken ledger never silently drops records.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, Message, TopicPartition

from pipeline import metrics
from pipeline.crashpoints import CRASH_AT as _CRASH_AT
from pipeline.crashpoints import crash_point
from pipeline.records import CALL_FIELDS, PROVISIONING_FIELDS, payload_json, rated_call_row
from pipeline.settings import Settings
from schemas.errors import SerdeError
from schemas.serde import Serde
from sinks.errors import LedgerError
from sinks.ledger import Ledger

log = logging.getLogger(__name__)


def _header(msg: Message, name: str) -> str | None:
    raw = msg.headers() or []
    pairs = list(raw.items()) if isinstance(raw, dict) else list(raw)
    for key, value in pairs:
        if key == name and value is not None:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


class LedgerSink:
    """Runs the protocol above in a thread of the worker process (chdb allows one process per path)."""

    def __init__(self, settings: Settings, bootstrap: str, serde: Serde, ledger: Ledger) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.serde = serde
        self.ledger = ledger
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"{settings.app_id}-ledger",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
                # A sink that died with its worker stays a group member until its session expires, and
                # the restarted sink cannot be assigned before that (librdkafka's default is 45 s).
                "session.timeout.ms": 10000,
                "heartbeat.interval.ms": 2000,
            }
        )
        self.error: BaseException | None = None
        # Periods with a final invoice: a call rated into one is late (issue 4). Refreshed every 10 s.
        self._finalized: set[tuple[str, datetime]] = set()
        self._finalized_at = 0.0
        self.rows_written = 0
        self.batches = 0
        self.last_progress = time.monotonic()
        self._stop = threading.Event()
        self._busy = False
        # librdkafka handles are thread-safe, but position() racing consume() can read a position of
        # a batch not yet written; the lock and _busy make "caught up" mean "written".
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ledger-sink", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self.consumer.subscribe([self.topics.rated, self.topics.accepted, self.topics.deadletter])
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def positions(self) -> dict[tuple[str, int], int] | None:
        """Positions of every assigned partition, or None while a batch is being written (or before
        the first assignment). A position moves past the transaction marker after the last record,
        so "position == high watermark" means everything committed upstream has been written."""
        if self._busy or self.ledger.pending() or self.error is not None:
            return None
        with self._lock:
            assignment = self.consumer.assignment()
            if not assignment or self._busy:
                return None
            return {(tp.topic, tp.partition): tp.offset for tp in self.consumer.position(assignment)}

    # -- the loop -------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    messages = self.consumer.consume(num_messages=self.settings.sink_batch_rows, timeout=0.2)
                    self._busy = bool(messages)
                if not messages:
                    time.sleep(0.05)
                    continue
                try:
                    self._write_batch(messages)
                finally:
                    self._busy = False
        except BaseException as exc:  # surfaced to the worker, which exits non-zero
            log.exception("ledger sink stopped")
            self.error = exc
        finally:
            self.consumer.close()

    def _write_batch(self, messages: list[Message]) -> None:
        spans: dict[tuple[str, int], list[int]] = {}
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                text = f"sink consume error: {err}"
                raise LedgerError(text)
            self._add_rows(msg)
            topic, partition, offset = str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0)
            span = spans.setdefault((topic, partition), [offset, offset])
            span[1] = offset
        token = hashlib.sha256(repr(sorted(spans.items())).encode()).hexdigest()[:32]
        # Step 3: a failure raises here, before step 4, so the offsets stay uncommitted.
        self.rows_written += self._flush(token)
        if _CRASH_AT:
            crash_point("sink-3-inserted")
        # Step 4.
        self.consumer.commit(
            offsets=[TopicPartition(t, p, last + 1) for (t, p), (_first, last) in spans.items()],
            asynchronous=False,
        )
        self.batches += 1
        self.last_progress = time.monotonic()

    def _flush(self, token: str) -> int:
        """Insert with bounded retries (a ClickHouse server may blip); the same token makes a retry of a
        partly applied flush harmless. After the last attempt the error stops the sink."""
        pending = self.ledger.pending_by_table()
        attempts = 3
        for attempt in range(1, attempts + 1):
            started = time.perf_counter()
            try:
                written = self.ledger.flush(token)
            except LedgerError:
                metrics.LEDGER_INSERT_ERRORS.inc()
                if attempt == attempts:
                    raise
                metrics.LEDGER_INSERT_RETRIES.inc()
                time.sleep(0.5 * attempt)
                continue
            metrics.LEDGER_INSERT_SECONDS.observe(time.perf_counter() - started)
            metrics.LEDGER_BATCH_ROWS.observe(written)
            metrics.LEDGER_LAST_WRITE.set(time.time())
            for table, rows in pending.items():
                metrics.LEDGER_ROWS.labels(table=table).inc(rows)
            return written
        return 0

    def _add_rows(self, msg: Message) -> None:
        topic = msg.topic()
        value = msg.value() or b""
        now = datetime.now(UTC)
        if topic == self.topics.deadletter:
            record = self._decode(value, "DeadLetter")
            key = record.get("key")
            self.ledger.add(
                "dead_letters",
                [
                    record["source_topic"],
                    record["source_partition"],
                    record["source_offset"],
                    record["reason"],
                    record["message"],
                    key.decode("utf-8", "replace") if isinstance(key, bytes) else key,
                    bytes(record["value"]).hex(),
                    record["failed_at"],
                ],
            )
            return
        if topic == self.topics.rated:
            r = self._decode(value, "RatedCall")
            late = bool(r["late"]) or self._is_final(r["tenant_id"], r["period_start"])
            if late:
                metrics.LATE_EVENTS.inc()
            self.ledger.add("rated_calls", rated_call_row(r, late=late))
            self.ledger.add(
                "raw_events",
                [
                    "calls",
                    r["tenant_id"],
                    r["event_id"],
                    "CallRecord",
                    r["started_at"],
                    payload_json(r, CALL_FIELDS),
                    r["source_partition"],
                    r["source_offset"],
                    now,
                ],
            )
            return
        if topic == self.topics.accepted:
            p = self._decode(value, "ProvisioningEvent")
            src_partition = int(_header(msg, "source-partition") or msg.partition() or 0)
            src_offset = int(_header(msg, "source-offset") or msg.offset() or 0)
            self.ledger.add(
                "provisioning_events",
                [
                    p["tenant_id"],
                    p["event_id"],
                    p["occurred_at"],
                    p["action"],
                    p.get("plan_id"),
                    p.get("tax_region"),
                    p.get("number"),
                    p.get("number_type"),
                    p.get("employee_id"),
                    src_partition,
                    src_offset,
                ],
            )
            self.ledger.add(
                "raw_events",
                [
                    "provisioning",
                    p["tenant_id"],
                    p["event_id"],
                    "ProvisioningEvent",
                    p["occurred_at"],
                    payload_json(p, PROVISIONING_FIELDS),
                    src_partition,
                    src_offset,
                    now,
                ],
            )
            return
        text = f"sink received a record from unexpected topic {topic}"
        raise LedgerError(text)

    def _is_final(self, tenant_id: str, period_start: datetime) -> bool:
        if time.monotonic() - self._finalized_at > 10:
            self._finalized = self.ledger.finalized_periods()
            self._finalized_at = time.monotonic()
        return (tenant_id, period_start) in self._finalized

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
