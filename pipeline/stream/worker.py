"""The stream worker: deduplicate, keep tenant state, rate, emit — atomically with the input offsets.

Commit protocol. Faust (``processing_guarantee="exactly_once"``) keeps one Kafka transaction open per
assigned input partition P of ``calls``/``provisioning`` (the two are co-partitioned by tenant, so a
tenant's calls and provisioning share P and its state lives in partition P of every table):

0. When partition P is assigned, its transactional producer starts and closes, as aborted, anything an
   earlier owner left open under the same producer id before this worker writes (stream/fencing.py).
1. The consumer (read_committed) hands the agent an event from P; an offset out of order is skipped (a
   redelivery) or stops the process (a record never handled), see stream/continuity.py. From here to
   its acknowledgement the event is one critical section (a batch of one, ``CommitGuard.batch``): no
   Faust commit can run in the middle of it (pipeline/stream/guard.py). The event is Faust's current
   event, so its table writes and outputs go to P's transaction.
2. Undecodable or invalid: a DeadLetter record (original bytes, source topic/partition/offset, reason,
   message) is sent to ``deadletter`` partition P inside P's transaction. A decoded event's key is left
   with a checksum of its bytes: an identical copy is a duplicate, a corrected resend is processed.
3. Dedupe: ``seen`` (RocksDB, changelogged) is looked up by ``(kind, tenant_id, event_id)``. A hit is
   counted as a duplicate: no state write, only a Duplicate record to ``duplicates`` partition P (step 5)
   so the ledger can count duplicates per gateway.
4. State writes (``seen``, ``tenants``, ``parked``, ``balances``, ``alerted``) go to RocksDB and, through
   Faust's producer buffer, to partition P of their changelog topics inside P's transaction.
   (Crash point ``worker-4-state-written``.)
5. Outputs (rated call, accepted provisioning event, dead letter, duplicate, alert) go to partition P of their
   topics inside P's transaction (``_send`` picks P's transactional producer explicitly). The event is
   acknowledged and the critical section ends. (Crash points ``worker-5-output-sent``, ``after-event``.)
6. Every commit interval (and at a rebalance or shutdown) the guard waits for the current event, drains
   the buffered changelog writes into their transactions, and Faust adds P's consumed offsets and
   commits. Only now do 2-5 become visible to read_committed readers: all of them or none.
   (Crash point ``worker-6-committed``, just after.)

   A crash before 6 aborts the transaction (the restarted worker's producers fence it; transactions
   time out after 10 s): changelog writes, outputs and offsets roll back together and the events are
   processed again from the last commit. An exception inside an event stops the process at once
   without any commit (pipeline/stream/guard.py) and ``callmeter worker`` starts a new one. RocksDB is
   only a cache of the changelogs and may still hold writes of the aborted transaction, so the worker marks a
   clean shutdown and, after an unclean one, deletes its local state and rebuilds it from the
   changelogs (read_committed) to each one's last committed record before consuming (runner.py, recovery.py).
   Without this a call whose dedupe key survived in RocksDB but whose rated record was aborted would be
   lost.
7. The ledger sink (pipeline/ledger/sink.py) reads the outputs read_committed and writes ClickHouse under
   its own numbered protocol; together no crash point loses a call or counts one twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime
from typing import Any

import faust

from pipeline import metrics
from pipeline.crashpoints import CRASH_AT as _CRASH_AT
from pipeline.crashpoints import acrash_point
from pipeline.records import call_from_record, provisioning_from_record, rated_to_record
from pipeline.settings import Settings
from pipeline.stream import fencing  # noqa: F401 - patches Faust's transactional producer start
from pipeline.stream.balances import Balances
from pipeline.stream.continuity import CommittedReader, Continuity
from pipeline.stream.facts import (
    RERATING_ACTIONS,
    call_fact,
    check_provisioning,
    dead_copy_differs,
    dead_fact,
    ms,
)
from pipeline.stream.guard import CommitGuard
from pipeline.stream.outputs import Outputs
from pipeline.stream.parking import Parking
from pipeline.stream.retention import Retention
from pipeline.stream.stats import Stats, count_faults
from rating.calls import RatedCall, rate_call, validate_call
from rating.catalog import Catalog
from rating.models import Reason, Rejection
from rating.subscription import TenantTimeline
from schemas.errors import SerdeError
from schemas.serde import Serde

log = logging.getLogger(__name__)

_ROCKSDICT = {"driver": "rocksdict"}


class Meter(Outputs, Parking, Balances, Retention):
    """Builds the Faust app: one agent over both input topics and four co-partitioned tables."""

    def __init__(self, settings: Settings, bootstrap: str, catalog: Catalog, serde: Serde) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.catalog = catalog
        self.serde = serde
        self.stats = Stats()
        self.state_dir = settings.worker_state_dir
        n = settings.partitions
        self.app = faust.App(
            settings.app_id,
            broker=f"kafka://{bootstrap}",
            store="rocksdb://",
            processing_guarantee="exactly_once",
            datadir=str(self.state_dir),
            topic_partitions=n,
            topic_replication_factor=1,
            consumer_auto_offset_reset="earliest",
            table_standby_replicas=0,
            web_enabled=True,
            web_bind=settings.worker_web_bind,
            web_port=settings.worker_web_port,
            canonical_url=f"http://{settings.worker_web_host}:{settings.worker_web_port}",
            broker_commit_interval=1.0,
            # A worker that died (a fault, kill -9) stays a group member until its session times out,
            # and its replacement's join waits for that: Faust's default made every restart wait a
            # minute. Heartbeats run on their own task, so 10 s is ample for a live worker.
            broker_session_timeout=10.0,
            broker_heartbeat_interval=2.0,
            stream_wait_empty=False,
            producer_linger_ms=settings.producer_linger_ms,
        )
        app = self.app
        self.source = app.topic(
            self.topics.calls,
            self.topics.provisioning,
            key_serializer="raw",
            value_serializer="raw",
            partitions=n,
            internal=False,
        )
        # Values are JSON: an int (a provisioning event's time), [ended, started, raw ms] for an accepted
        # call, or [time, "dead", crc32] for a dead-lettered event.
        self.seen = app.Table("seen", partitions=n, key_type=str, options=_ROCKSDICT)
        self.tenants = app.Table("tenants", partitions=n, key_type=str, options=_ROCKSDICT)
        self.parked = app.Table("parked", partitions=n, key_type=str, options=_ROCKSDICT)
        self.balances = app.Table(
            "balances", partitions=n, key_type=str, value_type=int, default=int, options=_ROCKSDICT
        )
        # Alerts already sent, by "tenant|period start|usage|percent", "...|projected" and
        # "...|employees"/"...|numbers" (quota): a correction moving usage down and up again, or a
        # tenant's new threshold list, never sends one twice in a period.
        self.alerted = app.Table("alerted", partitions=n, key_type=str, value_type=int, options=_ROCKSDICT)
        self.guard = CommitGuard()
        reader = CommittedReader(bootstrap)
        self.continuity = Continuity(lambda: app.consumer, reader.first_committed_offset, reader.log_start)
        metrics.initialize(self.topics.inputs)
        # ERROR records of the Kafka/Faust client libraries seen during this run (see run_worker).
        self.faults = 0
        count_faults(self, ("faust", "aiokafka", "mode"))
        app.callmeter_guard = self.guard  # type: ignore[attr-defined]
        app.callmeter_sweep_for = self._sweep_for  # type: ignore[attr-defined]
        app.agent(self.source, name="meter")(self._agent)
        from pipeline.stream import web

        web.install(self)
        # Parsed tenant timelines: rebuilding one from its JSON on every call was ~12 % of the event loop.
        # Only this worker writes a tenant's state while it owns the partition; any rebalance clears it.
        self._timelines: dict[str, TenantTimeline] = {}
        # Balances this worker wrote while owning their partition (a table read per call was ~3 % of the
        # event loop); cleared with the timelines at every rebalance.
        self._balance_cache: dict[str, int] = {}
        # Prometheus children per input topic: labels() per event was a lookup under a lock.
        self._consumed_metric = {t: metrics.EVENTS_CONSUMED.labels(topic=t) for t in self.topics.inputs}

        @app.on_partitions_revoked.connect
        async def _forget_timelines(*_args: Any, **_kwargs: Any) -> None:
            self._timelines.clear()
            self._balance_cache.clear()
            self.continuity.forget()

        @app.on_partitions_assigned.connect
        async def _forget_timelines_again(*_args: Any, **_kwargs: Any) -> None:
            self._timelines.clear()
            self._balance_cache.clear()
            self.continuity.forget()

        # Set once recovery is done and the agent consumes (see _Worker).
        self.ready = threading.Event()
        # Dedupe retention (spec §2): per input partition, the newest event time seen and the event-time
        # day of the last sweep. In memory only: after a restart each partition sweeps once more.
        self._watermark_ms: dict[int, int] = {}
        self._swept_day: dict[int, int] = {}
        # Parking timeout: wall-clock minute of the last sweep of parked calls per partition.
        self._parking_swept: dict[int, int] = {}
        # Record timestamp (seconds) of the last record processed per partition, for event-time lag.
        self._last_record_ts: dict[int, float] = {}
        self.lag: dict[tuple[str, int], int] = {}

    # -- the agent ------------------------------------------------------------------------------------
    async def _agent(self, stream: Any) -> None:
        # One event at a time is a critical section against Faust's commits (pipeline/stream/guard.py).
        # Batches (take_events) ran ~1.5x faster but hung after a broker loss in make chaos (twice in a
        # row, until the stall watchdog): reverted until that is understood (docs/decisions.md).
        async for event in stream.events():
            async with self.guard.batch([event]):
                msg = event.message
                if not await self.continuity.check(msg.topic, msg.partition, msg.offset):
                    continue  # handled already in this assignment (stream/continuity.py, step 3)
                await self.handle(event)
                if _CRASH_AT:
                    await acrash_point("after-event")

    def _sweep_for(self, transactional_id: str) -> tuple[int, list[str], list[str]] | None:
        """For the id of an input partition's producer: that partition, the topics it writes and the
        inputs whose offsets it commits (stream/fencing.py, step 2). None for Faust's other ids."""
        group, _, partition = transactional_id.rpartition("-")
        input_group = self.app.assignor.group_for_topic(self.topics.calls)
        if group != f"{self.app.conf.id}-{input_group}":
            return None
        changelogs = [table.changelog_topic.get_topic_name() for table in self.app.tables.values()]
        outputs = [self.topics.rated, self.topics.accepted, self.topics.alerts, self.topics.deadletter]
        return int(partition), [*outputs, self.topics.duplicates, *changelogs], self.topics.inputs

    def internal_topics(self) -> dict[str, tuple[int, dict[str, str]]]:
        """Changelog topics (compacted, one partition per input partition) and Faust's leader topic."""
        topics = {
            table.changelog_topic.get_topic_name(): (self.settings.partitions, {"cleanup.policy": "compact"})
            for table in self.app.tables.values()
        }
        topics[f"{self.app.conf.id}-__assignor-__leader"] = (1, {})
        return topics

    async def handle(self, event: Any) -> None:
        msg = event.message
        topic, partition, offset = msg.topic, msg.partition, msg.offset
        raw: bytes = event.value if isinstance(event.value, bytes) else bytes(event.value or b"")
        key: bytes | None = msg.key
        kind = "call" if topic == self.topics.calls else "provisioning"
        self.stats.consumed[kind] += 1
        self._last_record_ts[partition] = msg.timestamp
        self._consumed_metric[topic].inc()
        self.stats.tick(consumed=1)
        metrics.LAST_EVENT_TIMESTAMP.set(time.time())
        src = (topic, partition, offset, key, raw)
        try:
            name, record = self.serde.decode(raw)
        except SerdeError as exc:
            await self._dead(src, exc.reason, exc.message)
            return
        expected = "CallRecord" if kind == "call" else "ProvisioningEvent"
        if name != expected:
            await self._dead(src, Reason.INVALID_EVENT, f"{name} record on topic {topic}")
            return
        tenant, event_id = record.get("tenant_id"), record.get("event_id")
        if not tenant or not event_id:
            await self._dead(src, Reason.INVALID_EVENT, "tenant_id and event_id must be non-empty")
            return
        dedupe_key = f"{kind}|{tenant}|{event_id}"
        event_time = record.get("ended_at") if kind == "call" else record.get("occurred_at")
        if isinstance(event_time, datetime):
            self._advance_watermark(partition, ms(event_time))
        await self._maybe_expire_parked(partition)
        known = self._seen_get(dedupe_key)
        if known is not None and not dead_copy_differs(known, raw):
            # A copy of an event already accepted, or of an invalid one already dead-lettered (the same
            # bytes): a duplicate either way. A corrected resend of an invalid event is processed anew.
            await self._duplicate(src, kind, record, event_time)
            return
        if kind == "call":
            await self._on_call(src, record, dedupe_key)
        else:
            await self._on_provisioning(src, record, dedupe_key)

    async def _on_call(self, src: tuple[Any, ...], record: dict[str, Any], dedupe_key: str) -> None:
        call = call_from_record(record)
        rejection = validate_call(call)
        if rejection is not None:
            self.seen[dedupe_key] = dead_fact(ms(call.ended_at), src[4])
            await self._dead(src, rejection.reason, rejection.message)
            return
        timeline = self._timeline(call.tenant_id)
        if timeline is None or not timeline.subscribed:
            # Calls and provisioning are not ordered across topics: hold the call until the tenant's
            # SUBSCRIPTION_STARTED arrives (spec §5). Its key is consumed now so a retry stays a duplicate.
            self._park(src, call.tenant_id)
            self.seen[dedupe_key] = call_fact(call)
            return
        result = rate_call(call, timeline, self.catalog)
        if isinstance(result, Rejection) and result.reason == Reason.NO_SUBSCRIPTION:
            await self._dead_but_revivable(src, call, result)
            self.seen[dedupe_key] = call_fact(call)
            return
        if isinstance(result, Rejection):
            self.seen[dedupe_key] = dead_fact(ms(call.ended_at), src[4])
            await self._dead(src, result.reason, result.message)
            return
        self.seen[dedupe_key] = call_fact(call)
        await self._emit_rated(src, result)
        if _CRASH_AT:
            await acrash_point("worker-5-output-sent")

    async def _emit_rated(self, src: tuple[Any, ...], rated: RatedCall) -> None:
        topic, partition, offset, _key, _raw = src
        record = rated_to_record(rated, source_topic=topic, source_partition=partition, source_offset=offset)
        value = self.serde.encode("RatedCall", record, self.topics.rated)
        tenant = rated.call.tenant_id
        balance_key = self.balance_key(tenant, rated.period.start)
        before = self._balance_cache.get(balance_key)
        if before is None:
            before = int(self.balances[balance_key])
        after = before + rated.billable_seconds
        self.balances[balance_key] = after
        self._balance_cache[balance_key] = after
        if _CRASH_AT:
            await acrash_point("worker-4-state-written")
        self.stats.rated += 1
        metrics.RATED_CALLS.inc()
        metrics.BILLABLE_SECONDS.inc(rated.billable_seconds)
        await self._send(self.topics.rated, tenant.encode(), value)
        metrics.RATED_RECORDS_PRODUCED.inc()
        plan = self.catalog.plan_for(rated.plan_id, rated.period.start)
        ended = rated.call.ended_at
        timeline = self._timeline(tenant)
        await self._usage_alerts(tenant, rated.period, plan, timeline, before, after, crossed_at=ended)
        await self._projected_alert(tenant, rated.period, plan, after, ended)

    def _timeline(self, tenant_id: str) -> TenantTimeline | None:
        cached = self._timelines.get(tenant_id)
        if cached is not None:
            return cached
        stored = self.tenants.get(tenant_id)
        if not stored:
            return None
        timeline = TenantTimeline.from_dict(stored)
        self._timelines[tenant_id] = timeline
        return timeline

    def partition_of(self, tenant_id: str) -> int:
        """The input partition of a tenant: the producers' murmur2 of the tenant bytes."""
        return int(self.app.producer.key_partition(self.topics.calls, tenant_id.encode()).partition)

    def read_owned(self, table: Any, key: str, tenant_id: str | None = None) -> Any:
        """Read a key from the RocksDB of the tenant's own partition.

        Outside an event, Faust's store looks keys up through a key->partition cache over whatever
        partition databases it has open, which after a rebalance can miss a key that is on disk; the
        tenant's partition is known, so read that database directly (opened on demand)."""
        partition = self.partition_of(tenant_id or key)
        db = table.data._db_for_partition(partition)
        raw = db.get(json.dumps(key).encode())
        return None if raw is None else json.loads(raw)

    def status(self) -> dict[str, Any]:
        from pipeline.stream.watch import meter_status

        return meter_status(self)

    async def _on_provisioning(self, src: tuple[Any, ...], record: dict[str, Any], dedupe_key: str) -> None:
        topic, partition, offset, _key, raw = src
        event = provisioning_from_record(record)
        rejection = check_provisioning(event, self.catalog)
        if rejection is not None:
            self.seen[dedupe_key] = dead_fact(ms(event.occurred_at), src[4])
            await self._dead(src, rejection.reason, rejection.message)
            return
        timeline = self._timeline(event.tenant_id) or TenantTimeline.from_events(event.tenant_id, [])
        timeline = timeline.apply(event)
        self.tenants[event.tenant_id] = timeline.to_dict()
        self._timelines[event.tenant_id] = timeline
        self.seen[dedupe_key] = ms(event.occurred_at)
        headers = [
            ("source-topic", topic.encode()),
            ("source-partition", str(partition).encode()),
            ("source-offset", str(offset).encode()),
        ]
        await self._send(self.topics.accepted, event.tenant_id.encode(), raw, headers)
        await self._check_quotas(timeline, event)
        if timeline.subscribed:
            held = self.parked.get(event.tenant_id)
            if held:
                await self._release_parked(event.tenant_id, held, timeline)
            if event.action in RERATING_ACTIONS:
                await self.rerate_balances(event.tenant_id, timeline, event.occurred_at)
