"""The ledger sink: worker output topics -> ClickHouse, exactly once in effect.

Commit protocol (what a crash at each step means):

1. Poll a batch from ``calls.rated``, ``provisioning.accepted``, ``deadletter`` and ``duplicates`` with
   ``isolation.level=read_committed``: only outputs of committed worker transactions are seen, so an
   aborted attempt of the worker never reaches the ledger.
2. Turn every record into ledger rows in memory (``Ledger.add``), keeping only first-seen copies: a
   key the ledger already holds from another source record (a resend after a fresh cluster or past
   the stream's retention) is counted in ``duplicates`` and written only as a ``duplicates`` row
   (sinks/ledger.py item 4).
   Crash here: nothing written, nothing committed; the batch is polled again after restart.
3. ``Ledger.flush(token)`` inserts the rows, one insert per table, each with a deduplication token
   derived from the batch's source offsets and content. Crash or error here: the Kafka offsets are not
   committed, the batch is redelivered; rows already inserted are either refused by the token (same batch) or
   collapse by key (ReplacingMergeTree, read through FINAL/argMax), so nothing counts twice.
   (Crash point ``sink-3-inserted``, just after the insert.) On a ClickHouse cluster
   (``clickhouse_cluster``) the insert into each Distributed table is synchronous and
   quorum-acknowledged (sinks/cluster.py ``SESSION_SETTINGS``): ``flush`` returns only once every
   shard stores its rows, so step 4 never commits offsets of rows still queued for a shard.
4. Commit the batch's offsets synchronously. Crash between 3 and 4: as in 3, the batch comes again and
   is absorbed by the keys. A failed flush never reaches this step: the sink retries for up to
   ``ledger_outage_seconds``, then stops and the worker exits non-zero, so a broken ledger never
   silently drops records. After the commit the sink's counters are written to the file its supervisor
   names (pipeline/runcounts.py): a sink process that then dies is counted up to here, no further.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

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
from sinks.query import QueryServer, serve_queries
from sinks.schema import DUPLICATE_COLUMNS, PROVISIONING_COLUMNS

log = logging.getLogger(__name__)
_T = TypeVar("_T")
# raw_events' topic column -> the kind the worker's counters use.
_KIND = {"calls": "call", "provisioning": "provisioning"}


@dataclass(frozen=True)
class _Entry:
    """One output record as ledger rows, with the identity the first-seen check needs."""

    key: tuple[str, str, str] | None  # (raw topic, tenant, event id); None for dead letters, duplicates
    source: tuple[int, int]  # input partition and offset of the event
    payload: str
    rows: list[tuple[str, list[Any]]]
    gateway_id: str = ""
    # The output record's Kafka timestamp: the same on every redelivery, so a duplicate the ledger finds
    # is one row however often its batch is written.
    written_at: datetime | None = None
    event_time: datetime | None = None  # the call's end or the provisioning event's time


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
        # Copies the ledger already held from another source record (ledger item 4), per kind.
        self.duplicates: Counter[str] = Counter()
        self.batches = 0
        self.last_progress = time.monotonic()
        # Called after each offset commit (step 4), in the sink's thread (pipeline/runcounts.py).
        self.on_committed: Callable[[], None] | None = None
        self._stop = threading.Event()
        self._busy = False
        # librdkafka handles are thread-safe, but position() racing consume() can read a position of
        # a batch not yet written; the lock and _busy make "caught up" mean "written".
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="ledger-sink", daemon=True)
        self._queries: QueryServer | None = None

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        self.consumer.subscribe(self.topics.ledger_inputs)
        self._thread.start()
        # This process holds the ledger: analysts' read-only queries go through it (`callmeter sql`).
        self._queries = serve_queries(self.ledger, self.settings.clickhouse_dsn)

    def stop(self) -> None:
        if self._queries is not None:
            self._queries.stop()
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
        # The token covers content as well as offsets: a fresh cluster repeats offsets (ledger item 3).
        digest = hashlib.sha256()
        entries = []
        for msg in messages:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    continue
                text = f"sink consume error: {err}"
                raise LedgerError(text)
            topic, partition, offset = str(msg.topic()), int(msg.partition() or 0), int(msg.offset() or 0)
            value = msg.value() or b""
            digest.update(f"{topic}:{partition}:{offset}:{len(value)}:".encode())
            digest.update(value)
            entries.append(self._entry(msg, topic, value))
            span = spans.setdefault((topic, partition), [offset, offset])
            span[1] = offset
        # Step 2: rows of the first-seen copies only (ledger item 4).
        for entry in self._retrying("first-seen check", lambda: self._first_seen(entries)):
            for table, row in entry.rows:
                self.ledger.add(table, row)
        # Step 3: a failure raises here, before step 4, so the offsets stay uncommitted.
        pending = self.ledger.pending_by_table()
        started = time.perf_counter()
        written = self._retrying("insert", lambda: self.ledger.flush(digest.hexdigest()[:32]))
        metrics.LEDGER_INSERT_SECONDS.observe(time.perf_counter() - started)
        metrics.LEDGER_BATCH_ROWS.observe(written)
        metrics.LEDGER_LAST_WRITE.set(time.time())
        for table, rows in pending.items():
            metrics.LEDGER_ROWS.labels(table=table).inc(rows)
        self.rows_written += written
        if _CRASH_AT:
            crash_point("sink-3-inserted")
        # Step 4.
        self.consumer.commit(
            offsets=[TopicPartition(t, p, last + 1) for (t, p), (_first, last) in spans.items()],
            asynchronous=False,
        )
        self.batches += 1
        self.last_progress = time.monotonic()
        if self.on_committed is not None:
            self.on_committed()

    def _retrying(self, what: str, action: Callable[[], _T]) -> _T:
        """Retry while the ledger is unavailable (a server restarting, a full disk being freed), with
        growing pauses, for up to ``ledger_outage_seconds``. Nothing is committed meanwhile: the batch's
        offsets wait, the stream workers go on, and the batch's token makes a retry of a partly applied
        flush harmless. Past the limit the error stops the sink and the worker exits non-zero."""
        deadline = time.monotonic() + self.settings.ledger_outage_seconds
        pause = 0.5
        attempt = 0
        while True:
            attempt += 1
            try:
                return action()
            except LedgerError as exc:
                metrics.LEDGER_INSERT_ERRORS.inc()
                if time.monotonic() + pause > deadline or self._stop.is_set():
                    raise
                log.warning("ledger %s failed (try %d, again in %.1f s): %s", what, attempt, pause, exc)
                metrics.LEDGER_INSERT_RETRIES.inc()
                time.sleep(pause)
                pause = min(pause * 2, 10.0)

    def _first_seen(self, entries: list[_Entry]) -> list[_Entry]:
        """Drop every entry whose key the ledger (or an earlier entry of this batch) already holds from
        another source record. The same source record again (a redelivered batch) is kept: its rows
        collapse with the ones written before."""
        known = self.ledger.known_events(e.key for e in entries if e.key is not None)
        kept = []
        for entry in entries:
            if entry.key is None:
                kept.append(entry)
                continue
            copies = known.setdefault(entry.key, [])
            mine = (*entry.source, entry.payload)
            if copies and mine not in copies:
                kept.append(self._duplicate(entry, copies[0]))
                continue
            if not copies:
                copies.append(mine)
            kept.append(entry)
        return kept

    def _duplicate(self, entry: _Entry, first: tuple[int, int, str]) -> _Entry:
        """Count a copy the ledger already holds and record it in ``duplicates`` (detected_by 'ledger')."""
        assert entry.key is not None
        kind = _KIND[entry.key[0]]
        self.duplicates[kind] += 1
        metrics.LEDGER_DUPLICATES.labels(kind=kind).inc()
        other = "" if first[2] == entry.payload else " with another payload"
        log.warning(
            "%s %s/%s from partition %d offset %d is already in the ledger%s (first seen at partition %d "
            "offset %d): recorded as a duplicate, not billed",
            kind,
            entry.key[1],
            entry.key[2],
            entry.source[0],
            entry.source[1],
            other,
            first[0],
            first[1],
        )
        topic = self.topics.calls if kind == "call" else self.topics.provisioning
        at = entry.written_at or datetime.now(UTC)
        event_time = entry.event_time or at
        row = [
            topic,
            *entry.source,
            kind,
            entry.key[1],
            entry.key[2],
            entry.gateway_id,
            event_time,
            "ledger",
            at,
        ]
        return _Entry(None, entry.source, "", [("duplicates", row)])

    def _entry(self, msg: Message, topic: str, value: bytes) -> _Entry:
        now = datetime.now(UTC)
        kind_ms, ms = msg.timestamp()
        written_at = datetime.fromtimestamp(ms / 1000, UTC) if kind_ms and ms > 0 else now
        if topic == self.topics.duplicates:
            d = self._decode(value, "Duplicate")
            row = [d[name] for name in DUPLICATE_COLUMNS[:8]] + ["worker", d["detected_at"]]
            return _Entry(
                None, (int(d["source_partition"]), int(d["source_offset"])), "", [("duplicates", row)]
            )
        if topic == self.topics.deadletter:
            record = self._decode(value, "DeadLetter")
            key = record.get("key")
            original = bytes(record["value"])
            row = [
                record["source_topic"],
                record["source_partition"],
                record["source_offset"],
                record["reason"],
                record["message"],
                key.decode("utf-8", "replace") if isinstance(key, bytes) else key,
                original.hex(),
                record["failed_at"],
                int.from_bytes(hashlib.blake2b(original, digest_size=8).digest(), "big"),
                *self._identity(original),
            ]
            source = (int(record["source_partition"]), int(record["source_offset"]))
            return _Entry(None, source, "", [("dead_letters", row)])
        if topic == self.topics.rated:
            r = self._decode(value, "RatedCall")
            late = bool(r["late"]) or self._is_final(r["tenant_id"], r["period_start"])
            if late:
                metrics.LATE_EVENTS.inc()
            payload = payload_json(r, CALL_FIELDS)
            source = (int(r["source_partition"]), int(r["source_offset"]))
            raw = ["calls", r["tenant_id"], r["event_id"], "CallRecord", r["started_at"], payload]
            rows = [("rated_calls", rated_call_row(r, late=late)), ("raw_events", [*raw, *source, now])]
            call_key = ("calls", r["tenant_id"], r["event_id"])
            return _Entry(call_key, source, payload, rows, r["gateway_id"], written_at, r["ended_at"])
        if topic == self.topics.accepted:
            p = self._decode(value, "ProvisioningEvent")
            source = (
                int(_header(msg, "source-partition") or msg.partition() or 0),
                int(_header(msg, "source-offset") or msg.offset() or 0),
            )
            payload = payload_json(p, PROVISIONING_FIELDS)
            fields = [p.get(name) for name in PROVISIONING_COLUMNS[4:9]]
            prov = [p["tenant_id"], p["event_id"], p["occurred_at"], p["action"], *fields, *source]
            raw = ["provisioning", p["tenant_id"], p["event_id"], "ProvisioningEvent", p["occurred_at"]]
            rows = [("provisioning_events", prov), ("raw_events", [*raw, payload, *source, now])]
            prov_key = ("provisioning", p["tenant_id"], p["event_id"])
            return _Entry(prov_key, source, payload, rows, "", written_at, p["occurred_at"])
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
