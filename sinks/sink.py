"""The ledger sink: worker output topics -> ClickHouse, exactly once in effect.

Commit protocol (what a crash at each step means):

1. Poll a batch from ``calls.rated``, ``provisioning.accepted``, ``deadletter`` and ``duplicates`` with
   ``isolation.level=read_committed``: only outputs of committed worker transactions are seen, so an
   aborted attempt of the worker never reaches the ledger.
2. Turn every record into ledger rows in memory (``Ledger.add``), keeping only first-seen copies: a
   key the ledger already holds from another source record (a resend after a fresh cluster or past
   the stream's retention) is counted in ``duplicates`` and written only as a ``duplicates`` row
   (sinks/ledger.py item 4). A dead letter's key is its source topic and the digest of its original
   bytes: a copy of a bad event the ledger already holds is a duplicate, not a second dead letter.
   Crash here: nothing written, nothing committed; the batch is polled again after restart.
3. ``Ledger.flush(token)`` inserts the rows, one insert per table, each with a deduplication token
   derived from the batch's source offsets and content. Crash or error here: the Kafka offsets are not
   committed, the batch is redelivered; rows already inserted are either refused by the token (same batch) or
   collapse by key (ReplacingMergeTree, read through FINAL/argMax), so nothing counts twice.
   (Crash point ``sink-3-inserted``, just after the insert.) On a ClickHouse cluster
   (``clickhouse_cluster``) the insert into each Distributed table is synchronous and
   quorum-acknowledged (sinks/cluster.py ``SESSION_SETTINGS``): ``flush`` returns only once every
   shard stores its rows, so step 4 never commits offsets of rows still queued for a shard.
4. Commit the batch's offsets synchronously; a coordinator that is away (a broker restarting) is
   waited for, up to ``ledger_outage_seconds``. Crash between 3 and 4: as in 3, the batch comes again
   and is absorbed by the keys. A sink that stops on an error stops its process (the stream worker's,
   when the sink is a thread of it), whose supervisor restarts it. A failed flush never reaches this
   step: the sink retries for up to ``ledger_outage_seconds``, then stops and the worker exits
   non-zero, so a broken ledger never silently drops records. After the commit the sink's counters
   are written to the file its supervisor names (pipeline/runcounts.py): a sink process that then
   dies is counted up to here, no further.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from pipeline import metrics
from pipeline.crashpoints import CRASH_AT as _CRASH_AT
from pipeline.crashpoints import crash_point
from pipeline.settings import Settings
from schemas.serde import Serde
from sinks.entries import DEAD, Entry, EntryMaker, first_seen
from sinks.errors import LedgerError
from sinks.health import SinkHealth, register, unregister
from sinks.ledger import Ledger
from sinks.sql_server import QueryServer, serve_queries

log = logging.getLogger(__name__)
_T = TypeVar("_T")
# Offset commit errors of a coordinator that is away or moving (a broker restarting): a retry of the
# same commit may succeed. A rebalance (the partitions are someone else's now) is not among them.
_COMMIT_RETRIABLE = {
    KafkaError._WAIT_COORD,
    KafkaError._TRANSPORT,
    KafkaError._TIMED_OUT,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.NOT_COORDINATOR,
}


class LedgerSink:
    """Runs the protocol above in a thread of the worker process (chdb allows one process per path)."""

    def __init__(self, settings: Settings, bootstrap: str, serde: Serde, ledger: Ledger) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.serde = serde
        self.ledger = ledger
        self._entries = EntryMaker(self.topics, serde, self._is_final)
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
        # Periods with a final invoice: a call rated into one is late. Refreshed every 10 s.
        self._finalized: set[tuple[str, datetime]] = set()
        self._finalized_at = 0.0
        self.rows_written = 0
        # Copies the ledger already held from another source record (ledger item 4), per kind.
        self.duplicates: Counter[str] = Counter()
        self.batches = 0
        self.health = SinkHealth()
        self.last_progress = time.monotonic()
        # Called after each offset commit (step 4), in the sink's thread (pipeline/runcounts.py).
        self.on_committed: Callable[[], None] | None = None
        # Called from the sink's thread when it stops on an error: the process must not go on without
        # its sink (pipeline/stream/runner.py stops the stream worker, whose supervisor restarts it).
        self.on_failed: Callable[[], None] | None = None
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
        register(self.health)
        self._thread.start()
        # This process holds the ledger: analysts' read-only queries go through it (`callmeter sql`).
        self._queries = serve_queries(self.settings.clickhouse_dsn)

    def stop(self) -> None:
        if self._queries is not None:
            self._queries.stop()
        self._stop.set()
        self._thread.join(timeout=60)
        unregister(self.health)

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
            self.health.stopped(exc)
            if self.on_failed is not None:
                self.on_failed()
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
            entries.append(self._entries.entry(msg, topic, value))
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
        self.health.wrote(written)
        if _CRASH_AT:
            crash_point("sink-3-inserted")
        # Step 4.
        self._commit([TopicPartition(t, p, last + 1) for (t, p), (_first, last) in spans.items()])
        self.batches += 1
        self.last_progress = time.monotonic()
        if self.on_committed is not None:
            self.on_committed()

    def _commit(self, offsets: list[TopicPartition]) -> None:
        """Step 4, riding out a broker that is away for a while: "waiting for coordinator" and its kin
        are retried for up to ``ledger_outage_seconds`` (the rows are written; only the offsets wait).
        Any other error, or the limit, stops the sink: the batch is then redelivered and absorbed by
        its token and keys (step 3)."""
        deadline = time.monotonic() + self.settings.ledger_outage_seconds
        pause = 0.5
        while True:
            try:
                self.consumer.commit(offsets=offsets, asynchronous=False)
                return
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                code = err.code() if isinstance(err, KafkaError) else None
                late = time.monotonic() + pause > deadline
                if code not in _COMMIT_RETRIABLE or late or self._stop.is_set():
                    raise
                log.warning("ledger sink offset commit failed, again in %.1f s: %s", pause, err)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

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
                self.health.failed(exc)
                if time.monotonic() + pause > deadline or self._stop.is_set():
                    raise
                log.warning("ledger %s failed (try %d, again in %.1f s): %s", what, attempt, pause, exc)
                metrics.LEDGER_INSERT_RETRIES.inc()
                time.sleep(pause)
                pause = min(pause * 2, 10.0)

    def _first_seen(self, entries: list[Entry]) -> list[Entry]:
        """Step 2's first-seen check against what the ledger holds (entries.py ``first_seen``)."""
        keys = [e.key for e in entries if e.key is not None]
        known = self.ledger.known_events(k for k in keys if k[0] != DEAD)
        known.update(self.ledger.known_dead_letters(k for k in keys if k[0] == DEAD))
        notes: list[tuple[str, str]] = []
        kept = [
            entry if first is None else self._duplicate(entry, first, notes)
            for entry, first in first_seen(entries, known)
        ]
        if notes:
            # One line per batch: a resent file or a fresh cluster can bring thousands of them.
            log.warning("%s", duplicates_summary(notes))
        return kept

    def _duplicate(self, entry: Entry, first: tuple[int, int, str], notes: list[tuple[str, str]]) -> Entry:
        """Count a copy the ledger already holds and record it in ``duplicates`` (detected_by 'ledger')."""
        assert entry.key is not None
        kind = entry.kind
        self.duplicates[kind] += 1
        metrics.LEDGER_DUPLICATES.labels(kind=kind).inc()
        what = "dead letter" if entry.key[0] == DEAD else kind
        other = "" if first[2] == entry.payload else " with another payload"
        note = (
            f"{what} {entry.tenant_id}/{entry.event_id} from partition {entry.source[0]} offset "
            f"{entry.source[1]}{other} (first seen at partition {first[0]} offset {first[1]})"
        )
        log.debug("already in the ledger, recorded as a duplicate, not billed: %s", note)
        notes.append((kind + other, note))
        topic = self.topics.calls if kind == "call" else self.topics.provisioning
        at = entry.written_at or datetime.now(UTC)
        event_time = entry.event_time or at
        row = {
            "source_topic": topic,
            "source_partition": entry.source[0],
            "source_offset": entry.source[1],
            "kind": kind,
            "tenant_id": entry.tenant_id,
            "event_id": entry.event_id,
            "gateway_id": entry.gateway_id,
            "event_time": event_time,
            "detected_by": "ledger",
            "detected_at": at,
        }
        return Entry(None, entry.source, "", [("duplicates", row)])

    def _is_final(self, tenant_id: str, period_start: datetime) -> bool:
        if time.monotonic() - self._finalized_at > 10:
            self._finalized = self.ledger.finalized_periods()
            self._finalized_at = time.monotonic()
        return (tenant_id, period_start) in self._finalized


def duplicates_summary(notes: list[tuple[str, str]], shown: int = 3) -> str:
    """One warning for the copies of a batch the ledger already held: counts by kind (copies with
    another payload apart: a reused event id, worth a look) and the first few, each in full."""
    counts = Counter(kind for kind, _note in notes)
    by_kind = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items()))
    first = "; ".join(note for _kind, note in notes[:shown])
    more = f"; and {len(notes) - shown} more" if len(notes) > shown else ""
    return (
        f"{len(notes)} event{'s' if len(notes) != 1 else ''} already in the ledger, recorded as duplicates, "
        f"not billed ({by_kind}): {first}{more}"
    )
