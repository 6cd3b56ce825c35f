"""The stream worker: deduplicate, keep tenant state, rate, emit — atomically with the input offsets.

Commit protocol. Faust (``processing_guarantee="exactly_once"``) keeps one Kafka transaction open per
assigned input partition P of ``calls``/``provisioning`` (the two are co-partitioned by tenant, so a
tenant's calls and provisioning share P and its state lives in partition P of every table):

1. The consumer (read_committed) hands the agent an event from P.
2. Undecodable or invalid: a DeadLetter record (original bytes, source topic/partition/offset, reason,
   message) is sent to ``deadletter`` partition P inside P's transaction. The idempotency key is not
   consumed, so a corrected resend is still accepted.
3. Dedupe: ``seen`` (RocksDB, changelogged) is looked up by ``(kind, tenant_id, event_id)``. A hit is
   counted as a duplicate and writes nothing anywhere.
4. State writes (``seen``, ``tenants``, ``parked``, ``balances``) append to partition P of their
   changelog topics inside P's transaction.
5. Outputs (rated call, accepted provisioning event, dead letter) go to partition P of their topics
   inside P's transaction (``_send`` picks P's transactional producer explicitly).
6. Every commit interval Faust adds P's consumed offsets to the transaction and commits it. Only now
   do 2-5 become visible to read_committed readers: all of them or none.

   A crash before 6 aborts the transaction (or the restarted worker fences it): changelog writes,
   outputs and offsets roll back together and the events are processed again from the last commit.
   RocksDB is only a cache of the changelogs and may still hold writes of the aborted transaction, so
   the worker marks a clean shutdown and, after an unclean one, deletes its local state and rebuilds
   it from the changelogs (read_committed) before consuming (``prepare_state_dir``). Without this a
   call whose dedupe key survived in RocksDB but whose rated record was aborted would be lost.
7. The ledger sink (pipeline/sink.py) reads the outputs read_committed and writes ClickHouse under its
   own numbered protocol; together no crash point loses a call or counts one twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faust
import faust.tables.recovery as faust_recovery
from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from pipeline import metrics
from pipeline.crashpoints import CRASH_AT as _CRASH_AT
from pipeline.crashpoints import crash_point
from pipeline.errors import PipelineError, RetryableError
from pipeline.guard import CommitGuard, die
from pipeline.offsets import GroupOffsets
from pipeline.records import call_from_record, provisioning_from_record, rated_to_record
from pipeline.settings import Settings
from rating.balance import crossed_thresholds
from rating.calls import RatedCall, rate_call, validate_call
from rating.catalog import Catalog
from rating.models import ProvisioningEvent, Reason, Rejection
from rating.subscription import TenantTimeline
from schemas.errors import SerdeError
from schemas.serde import Serde
from sinks.ledger import Ledger

log = logging.getLogger(__name__)
TP = tuple[str, int]

_ROCKSDICT = {"driver": "rocksdict"}
_CLEAN_MARKER = ".clean-shutdown"
_ACTIONS_NEEDING = {
    "SUBSCRIPTION_STARTED": ("plan_id", "tax_region"),
    "PLAN_CHANGED": ("plan_id",),
    "NUMBER_PROVISIONED": ("number", "number_type"),
    "NUMBER_RELEASED": ("number",),
    "EMPLOYEE_ACTIVATED": ("employee_id",),
    "EMPLOYEE_DEACTIVATED": ("employee_id",),
    "SUBSCRIPTION_CANCELLED": (),
}


@dataclass
class Stats:
    """Counters of this worker run (also the source of the Prometheus metrics)."""

    consumed: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    dead_letters: Counter[str] = field(default_factory=Counter)
    rated: int = 0
    parked: int = 0
    unparked: int = 0
    revived: int = 0  # dead-lettered NO_SUBSCRIPTION, then rated when later provisioning covered them
    keys_expired: int = 0
    # Per wall-clock minute: [events consumed, duplicates, dead letters], for "the last minutes".
    minutes: dict[int, list[int]] = field(default_factory=dict)

    def tick(self, consumed: int = 0, duplicates: int = 0, dead: int = 0) -> None:
        minute = int(time.time() // 60)
        bucket = self.minutes.setdefault(minute, [0, 0, 0])
        bucket[0] += consumed
        bucket[1] += duplicates
        bucket[2] += dead
        for old in [m for m in self.minutes if m < minute - 60]:
            del self.minutes[old]

    def window(self, minutes: int) -> dict[str, int]:
        since = int(time.time() // 60) - minutes + 1
        totals = [0, 0, 0]
        for minute, bucket in self.minutes.items():
            if minute >= since:
                totals = [a + b for a, b in zip(totals, bucket, strict=True)]
        return {"minutes": minutes, "consumed": totals[0], "duplicates": totals[1], "dead_letters": totals[2]}

    def total(self) -> int:
        return sum(self.consumed.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "consumed": dict(self.consumed),
            "duplicates": dict(self.duplicates),
            "dead_letters": dict(self.dead_letters),
            "rated": self.rated,
            "parked": self.parked,
            "unparked": self.unparked,
            "revived": self.revived,
            "keys_expired": self.keys_expired,
        }


def check_provisioning(event: ProvisioningEvent, catalog: Catalog) -> Rejection | None:
    """Field rules per action (spec §1) and catalog references, before the event touches state."""
    for name in _ACTIONS_NEEDING.get(event.action, ()):
        if getattr(event, name) in (None, ""):
            return Rejection(Reason.INVALID_EVENT, f"{event.action} needs {name}")
    plan_action = event.action in ("SUBSCRIPTION_STARTED", "PLAN_CHANGED")
    if plan_action and event.plan_id is not None and not catalog.has_plan(event.plan_id):
        return Rejection(Reason.UNKNOWN_PLAN, f"plan {event.plan_id!r} is not in catalog")
    if event.action == "SUBSCRIPTION_STARTED" and event.tax_region not in catalog.tax_regions:
        return Rejection(Reason.UNKNOWN_TAX_REGION, f"tax region {event.tax_region!r} is not in catalog")
    return None


def prepare_state_dir(state_dir: Path) -> bool:
    """Keep local table state only after a clean shutdown; return True when it was wiped."""
    marker = state_dir / _CLEAN_MARKER
    if marker.exists():
        marker.unlink()
        return False
    if state_dir.exists() and any(state_dir.iterdir()):
        log.warning("previous worker stop was not clean: rebuilding local state from changelogs")
        shutil.rmtree(state_dir)
        state_dir.mkdir(parents=True)
        return True
    state_dir.mkdir(parents=True, exist_ok=True)
    return False


def mark_clean(state_dir: Path) -> None:
    (state_dir / _CLEAN_MARKER).write_text(datetime.now(UTC).isoformat())


class _QuickRecoveryPoll:
    """Faust's changelog recovery waits on its queue with a hard-coded 5 s timeout and, under
    exactly_once, needs two empty waits before it notices that the only thing left before the high
    watermark is a transaction marker — a ~10-15 s stall on every start. Ending recovery still requires
    the consumer position to have reached the high watermark (``detect_aborted_tx``), so a shorter
    wait cannot end recovery early; it only stops waiting on an idle queue for so long."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def wait_for(aw: Any, timeout: float | None = None) -> Any:
        return await asyncio.wait_for(aw, timeout=min(timeout, 0.5) if timeout else timeout)


faust_recovery.asyncio = _QuickRecoveryPoll()  # type: ignore[assignment]


def _ms(ts: datetime) -> int:
    return int(ts.timestamp() * 1000)


class _FaultCounter(logging.Handler):
    def __init__(self, meter: Meter) -> None:
        super().__init__(level=logging.ERROR)
        self.meter = meter

    def emit(self, record: logging.LogRecord) -> None:
        self.meter.faults += 1


class Meter:
    """Builds the Faust app: one agent over both input topics and four co-partitioned tables."""

    def __init__(self, settings: Settings, bootstrap: str, catalog: Catalog, serde: Serde) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.catalog = catalog
        self.serde = serde
        self.stats = Stats()
        self.state_dir = settings.data_dir / "worker"
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
            web_bind="127.0.0.1",
            web_port=settings.worker_web_port,
            canonical_url=f"http://127.0.0.1:{settings.worker_web_port}",
            broker_commit_interval=1.0,
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
        self.seen = app.Table("seen", partitions=n, key_type=str, value_type=int, options=_ROCKSDICT)
        self.tenants = app.Table("tenants", partitions=n, key_type=str, options=_ROCKSDICT)
        self.parked = app.Table("parked", partitions=n, key_type=str, options=_ROCKSDICT)
        self.balances = app.Table(
            "balances", partitions=n, key_type=str, value_type=int, default=int, options=_ROCKSDICT
        )
        # QUOTA_EXCEEDED alerts already sent, by "tenant|period start|kind" (usage thresholds need no
        # memory: a threshold is crossed by exactly one balance update).
        self.alerted = app.Table("alerted", partitions=n, key_type=str, value_type=int, options=_ROCKSDICT)
        self.guard = CommitGuard()
        # ERROR records of the Kafka/Faust client libraries seen during this run (see run_worker).
        self.faults = 0
        fault_counter = _FaultCounter(self)
        for name in ("faust", "aiokafka", "mode"):
            logging.getLogger(name).addHandler(fault_counter)
        app.callmeter_guard = self.guard  # type: ignore[attr-defined]
        app.agent(self.source, name="meter")(self._agent)
        from pipeline import web

        web.install(self)
        # Parsed tenant timelines: rebuilding one from its JSON on every call was ~12 % of the event loop.
        # Only this worker writes a tenant's state while it owns the partition; any rebalance clears it.
        self._timelines: dict[str, TenantTimeline] = {}

        @app.on_partitions_revoked.connect
        async def _forget_timelines(*_args: Any, **_kwargs: Any) -> None:
            self._timelines.clear()

        @app.on_partitions_assigned.connect
        async def _forget_timelines_again(*_args: Any, **_kwargs: Any) -> None:
            self._timelines.clear()

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
        # One event at a time is a critical section against Faust's commits (pipeline/guard.py).
        async for event in stream.events():
            async with self.guard.event(event):
                await self.handle(event)
                if _CRASH_AT:
                    crash_point("after-event")

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
        metrics.EVENTS_CONSUMED.labels(topic=topic).inc()
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
            self._advance_watermark(partition, _ms(event_time))
        await self._maybe_expire_parked(partition)
        if dedupe_key in self.seen:
            self.stats.duplicates[kind] += 1
            metrics.DUPLICATES.labels(topic=topic).inc()
            self.stats.tick(duplicates=1)
            return
        if kind == "call":
            await self._on_call(src, record, dedupe_key)
        else:
            await self._on_provisioning(src, record, dedupe_key)

    def _advance_watermark(self, partition: int, event_ms: int) -> None:
        # Clamp to the wall clock: one record with a clock far in the future must not expire every key.
        event_ms = min(event_ms, int(time.time() * 1000))
        if event_ms <= self._watermark_ms.get(partition, -1):
            return
        self._watermark_ms[partition] = event_ms
        day = event_ms // 86_400_000
        if self._swept_day.get(partition) != day:
            self._swept_day[partition] = day
            self.sweep_seen(partition, event_ms - self.settings.dedupe_retention_days * 86_400_000)

    def sweep_seen(self, partition: int, older_than_ms: int) -> int:
        """Forget idempotency keys of this partition whose event time is before ``older_than_ms``.

        Runs inside the current event's transaction (same partition), so the deletions reach the
        changelog atomically with everything else; a retry older than the retention window is then
        treated as a new event, which the retention (> one period + settlement window) makes moot.
        """
        store = self.seen.data
        db_for = getattr(store, "_db_for_partition", None)
        if db_for is None:
            return 0
        expired = []
        for raw_key, raw_value in db_for(partition).items():
            try:
                key, value = json.loads(raw_key), json.loads(raw_value)
            except (ValueError, TypeError):
                continue  # Faust's own bookkeeping keys (persisted offsets)
            if isinstance(value, int) and isinstance(key, str) and value < older_than_ms:
                expired.append(key)
        for key in expired:
            del self.seen[key]
        if expired:
            log.info("dedupe retention: forgot %d keys of partition %d", len(expired), partition)
        self.stats.keys_expired += len(expired)
        return len(expired)

    async def _maybe_expire_parked(self, partition: int) -> None:
        minute = int(time.time() // 60)
        if self._parking_swept.get(partition) == minute:
            return
        self._parking_swept[partition] = minute
        await self.expire_parked(
            partition, int(time.time() * 1000) - self.settings.parking_timeout_seconds * 1000
        )

    async def expire_parked(self, partition: int, parked_before_ms: int) -> int:
        """Dead-letter (NO_SUBSCRIPTION) the parked calls of this partition parked before the cutoff.

        Runs inside the current event's transaction, which is this partition's: the dead letters and
        the removal from ``parked`` commit together. Nothing is dropped silently (spec §5)."""
        db_for = getattr(self.parked.data, "_db_for_partition", None)
        if db_for is None:
            return 0
        expired = 0
        for raw_key, raw_value in list(db_for(partition).items()):
            try:
                tenant, held = json.loads(raw_key), json.loads(raw_value)
            except (ValueError, TypeError):
                continue
            if not isinstance(tenant, str) or not isinstance(held, list):
                continue
            keep = [item for item in held if item["at"] >= parked_before_ms]
            for item in held:
                if item["at"] < parked_before_ms:
                    src = (item["t"], item["p"], item["o"], tenant.encode(), bytes.fromhex(item["v"]))
                    message = (
                        f"no SUBSCRIPTION_STARTED for tenant {tenant!r} within the parking timeout "
                        f"({self.settings.parking_timeout_seconds} s)"
                    )
                    if not item.get("d"):  # a revivable call was dead-lettered when it was refused
                        await self._dead(src, Reason.NO_SUBSCRIPTION, message)
                        metrics.PARKED_CALLS.dec()
                    # Not accepted after all: release its idempotency key so a resend after the
                    # subscription exists is rated.
                    _name, record = self.serde.decode(src[4])
                    self.seen.pop(f"call|{tenant}|{record['event_id']}", None)
                    expired += 1
            if len(keep) != len(held):
                if keep:
                    self.parked[tenant] = keep
                else:
                    del self.parked[tenant]
        return expired

    async def _on_call(self, src: tuple[Any, ...], record: dict[str, Any], dedupe_key: str) -> None:
        call = call_from_record(record)
        rejection = validate_call(call)
        if rejection is not None:
            await self._dead(src, rejection.reason, rejection.message)
            return
        timeline = self._timeline(call.tenant_id)
        if timeline is None or not timeline.subscribed:
            # Calls and provisioning are not ordered across topics: hold the call until the tenant's
            # SUBSCRIPTION_STARTED arrives (spec §5). Its key is consumed now so a retry stays a duplicate.
            self._park(src, call.tenant_id)
            self.seen[dedupe_key] = _ms(call.ended_at)
            return
        result = rate_call(call, timeline, self.catalog)
        if isinstance(result, Rejection) and result.reason == Reason.NO_SUBSCRIPTION:
            await self._dead_but_revivable(src, call, result)
            self.seen[dedupe_key] = _ms(call.ended_at)
            return
        if isinstance(result, Rejection):
            await self._dead(src, result.reason, result.message)
            return
        self.seen[dedupe_key] = _ms(call.ended_at)
        await self._emit_rated(src, result)
        if _CRASH_AT:
            crash_point("worker-5-output-sent")

    async def _dead_but_revivable(self, src: tuple[Any, ...], call: Any, rejection: Rejection) -> None:
        """The tenant is subscribed but nothing covers the call's period: dead-letter it now (on-call
        sees it, the counts add up), yet keep it among the parked calls marked ``d`` until the parking
        timeout. Provisioning still to come (a re-subscription, an earlier start that moves the anchor)
        can cover it after all; then it is rated (revived), as the batch computation over all events
        would rate it (docs/decisions.md, "Order of events")."""
        await self._dead(src, rejection.reason, rejection.message)
        self._park(src, call.tenant_id, revivable=True)

    def _park(
        self, src: tuple[Any, ...], tenant: str, parked_at_ms: int | None = None, revivable: bool = False
    ) -> None:
        topic, partition, offset, _key, raw = src
        held = list(self.parked.get(tenant) or [])
        at = parked_at_ms if parked_at_ms is not None else int(time.time() * 1000)
        item = {"t": topic, "p": partition, "o": offset, "v": raw.hex(), "at": at}
        if revivable:
            item["d"] = 1  # already dead-lettered; kept only to be revived
        held.append(item)
        self.parked[tenant] = held
        if parked_at_ms is None and not revivable:
            self.stats.parked += 1
            metrics.PARKED_CALLS.inc()

    async def _emit_rated(self, src: tuple[Any, ...], rated: RatedCall) -> None:
        topic, partition, offset, _key, _raw = src
        record = rated_to_record(rated, source_topic=topic, source_partition=partition, source_offset=offset)
        value = self.serde.encode("RatedCall", record, self.topics.rated)
        tenant = rated.call.tenant_id
        balance_key = self.balance_key(tenant, rated.period.start)
        before = int(self.balances[balance_key])
        after = before + rated.billable_seconds
        self.balances[balance_key] = after
        if _CRASH_AT:
            crash_point("worker-4-state-written")
        self.stats.rated += 1
        metrics.RATED_CALLS.inc()
        metrics.BILLABLE_SECONDS.inc(rated.billable_seconds)
        await self._send(self.topics.rated, tenant.encode(), value)
        metrics.RATED_RECORDS_PRODUCED.inc()
        included = self.catalog.plan_for(rated.plan_id, rated.period.start).included_seconds
        for percent in crossed_thresholds(included, before, after):
            await self._alert(
                tenant,
                rated.period.start,
                "USAGE_THRESHOLD",
                percent,
                after,
                included,
                f"{tenant} used {after} of {included} included seconds ({percent} % threshold) "
                f"in the period starting {rated.period.start.date()}",
            )

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
        return _meter_status(self)

    @staticmethod
    def balance_key(tenant: str, period_start: datetime) -> str:
        return f"{tenant}|{period_start.isoformat()}"

    async def _alert(
        self,
        tenant: str,
        period_start: datetime,
        kind: str,
        threshold: int | None,
        used: int,
        included: int,
        message: str,
        subject: str = "",
    ) -> None:
        """Sent in the current partition's transaction with the state change that caused it, so a
        restart, a rebalance or a duplicate record can never send it twice (spec §8). The id is
        deterministic (tenant, period, kind, threshold or quota subject) so consumers can dedupe too."""
        suffix = threshold if threshold is not None else subject
        record = {
            "alert_id": f"{tenant}-{period_start.strftime('%Y%m%d')}-{kind}-{suffix}",
            "tenant_id": tenant,
            "kind": kind,
            "period_start": period_start,
            "threshold_percent": threshold,
            "used_seconds": used,
            "included_seconds": included,
            "message": message,
            "emitted_at": datetime.now(UTC),
        }
        await self._send(
            self.topics.alerts, tenant.encode(), self.serde.encode("Alert", record, self.topics.alerts)
        )
        metrics.ALERTS_EMITTED.labels(
            kind=kind, threshold=str(threshold) if threshold is not None else ""
        ).inc()

    async def _check_quotas(self, timeline: TenantTimeline, event: ProvisioningEvent) -> None:
        if event.action not in ("NUMBER_PROVISIONED", "EMPLOYEE_ACTIVATED") or not timeline.subscribed:
            return
        period = timeline.period_at(event.occurred_at)
        plan_id = timeline.plan_for_period(period)
        if plan_id is None:
            return
        plan = self.catalog.plan_for(plan_id, period.start)
        if event.action == "NUMBER_PROVISIONED":
            what, active, limit = (
                "numbers",
                len(timeline.active_numbers_at(event.occurred_at)),
                plan.numbers.max,
            )
        else:
            what, active, limit = (
                "employees",
                len(timeline.active_employees_at(event.occurred_at)),
                plan.employees.max_active,
            )
        marker = f"{event.tenant_id}|{period.start.isoformat()}|{what}"
        if active > limit and marker not in self.alerted:
            self.alerted[marker] = active
            await self._alert(
                event.tenant_id,
                period.start,
                "QUOTA_EXCEEDED",
                None,
                active,
                limit,
                f"{event.tenant_id} has {active} active {what}; plan {plan_id} allows {limit}",
                subject=what,
            )

    async def _on_provisioning(self, src: tuple[Any, ...], record: dict[str, Any], dedupe_key: str) -> None:
        topic, partition, offset, _key, raw = src
        event = provisioning_from_record(record)
        rejection = check_provisioning(event, self.catalog)
        if rejection is not None:
            await self._dead(src, rejection.reason, rejection.message)
            return
        timeline = self._timeline(event.tenant_id) or TenantTimeline.from_events(event.tenant_id, [])
        timeline = timeline.apply(event)
        self.tenants[event.tenant_id] = timeline.to_dict()
        self._timelines[event.tenant_id] = timeline
        self.seen[dedupe_key] = _ms(event.occurred_at)
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

    async def _release_parked(
        self, tenant: str, held: list[dict[str, Any]], timeline: TenantTimeline
    ) -> None:
        """Rate, in arrival order, the parked calls the tenant's timeline now covers. A call it does not
        cover is dead-lettered (once) and kept as revivable with its original parking time."""
        del self.parked[tenant]
        for item in held:
            raw = bytes.fromhex(item["v"])
            src = (item["t"], item["p"], item["o"], tenant.encode(), raw)
            _name, record = self.serde.decode(raw)  # it decoded when it was parked
            call = call_from_record(record)
            result = rate_call(call, timeline, self.catalog)
            already_dead = bool(item.get("d"))
            if isinstance(result, Rejection) and result.reason == Reason.NO_SUBSCRIPTION:
                if not already_dead:
                    await self._dead(src, result.reason, result.message)
                    metrics.PARKED_CALLS.dec()
                self._park(src, tenant, parked_at_ms=int(item["at"]), revivable=True)
                continue
            if not already_dead:
                self.stats.unparked += 1
                metrics.PARKED_CALLS.dec()
            if isinstance(result, Rejection):
                # Not accepted after all: like any dead letter it does not consume its idempotency key.
                self.seen.pop(f"call|{tenant}|{call.event_id}", None)
                if not already_dead:
                    await self._dead(src, result.reason, result.message)
            else:
                if already_dead:
                    self.stats.revived += 1
                await self._emit_rated(src, result)

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


class LagMonitor(threading.Thread):
    """Consumer lag per input partition (high watermark minus committed offset) and event-time lag
    (age of the oldest uncommitted input record, read from Kafka), refreshed every few seconds."""

    def __init__(self, meter: Meter, bootstrap: str, every_seconds: float = 3.0) -> None:
        super().__init__(name="lag-monitor", daemon=True)
        from confluent_kafka import Consumer

        self.meter = meter
        self.every_seconds = every_seconds
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.offsets = GroupOffsets(bootstrap, meter.settings.app_id)
        self.peek = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"{meter.settings.app_id}-lag-peek",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        self._halt = threading.Event()
        self._progress_at = time.monotonic()
        self._last_committed: dict[TP, int] = {}

    def halt(self) -> None:
        self._halt.set()

    def measure(self) -> None:
        settings = self.meter.settings
        meta = self.admin.list_topics(timeout=10)
        tps = [TopicPartition(t, p) for t in settings.topics.inputs for p in meta.topics[t].partitions]
        ends = self.admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, request_timeout=10)
        high = {(tp.topic, tp.partition): f.result().offset for tp, f in ends.items()}
        committed = {key: max(offset, 0) for key, offset in self.offsets.committed(list(high)).items()}
        oldest_age = 0.0
        for key, end in high.items():
            done_to = committed.get(key, 0)
            lag = max(end - done_to, 0)
            self.meter.lag[key] = lag
            metrics.CONSUMER_LAG.labels(topic=key[0], partition=str(key[1])).set(lag)
            if lag:
                self.peek.assign([TopicPartition(key[0], key[1], done_to)])
                msg = self.peek.poll(2.0)
                if msg is not None and msg.error() is None:
                    _kind, ts_ms = msg.timestamp()
                    oldest_age = max(oldest_age, time.time() - ts_ms / 1000)
        metrics.EVENT_TIME_LAG.set(round(oldest_age, 3))
        self._watch_progress(high, committed)

    def _watch_progress(
        self, high: dict[tuple[str, int], int], committed: dict[tuple[str, int], int]
    ) -> None:
        """Stall watchdog: input left to consume, yet no committed offset moved for the stall timeout."""
        behind = {
            key: (committed.get(key, 0), end) for key, end in high.items() if committed.get(key, 0) < end
        }
        if not behind or committed != self._last_committed:
            self._last_committed = committed
            self._progress_at = time.monotonic()
            return
        self._check_stall(behind)

    def _check_stall(self, behind: dict[tuple[str, int], tuple[int, int]] | None) -> None:
        # Start-up recovery (rebuilding tables from changelogs) commits nothing: allow it longer.
        limit = self.meter.settings.stall_timeout_seconds * (1 if self.meter.ready.is_set() else 3)
        stalled = time.monotonic() - self._progress_at
        if stalled < limit:
            return
        if behind is None:
            what = "Kafka unreachable"
        else:
            what = ", ".join(f"{t}/{p} committed {c} of {h}" for (t, p), (c, h) in sorted(behind.items())[:3])
        die(f"no input committed for {stalled:.0f} s ({what})")

    def run(self) -> None:
        self._progress_at = time.monotonic()
        self._last_committed = {}
        while not self._halt.wait(self.every_seconds):
            try:
                self.measure()
            except Exception:  # metrics must never take the worker down; a long outage is a stall
                log.debug("lag measurement failed", exc_info=True)
                self._check_stall(None)
        self.peek.close()


def _meter_status(meter: Meter) -> dict[str, Any]:
    return {
        "stats": meter.stats.to_dict(),
        "lag": [{"topic": t, "partition": p, "messages": n} for (t, p), n in sorted(meter.lag.items())],
        "event_time_lag_seconds": metrics.EVENT_TIME_LAG._value.get(),
        "ledger_last_write_unix": metrics.LEDGER_LAST_WRITE._value.get(),
        "ready": meter.ready.is_set(),
        "assigned_calls_partitions": sorted(
            tp.partition for tp in meter.app.assignor.assigned_actives() if tp.topic == meter.topics.calls
        ),
        "last_5_minutes": meter.stats.window(5),
        "parked_calls": metrics.PARKED_CALLS._value.get(),
    }


class _Worker(faust.Worker):
    """Faust's worker, telling the meter when start-up (recovery included) has finished."""

    meter: Meter

    async def on_startup_finished(self) -> None:
        await super().on_startup_finished()
        # The Kafka client logs every send at DEBUG; whatever enabled it, it costs ~4 % of the event
        # loop at volume. Keep the client libraries at the configured level or quieter.
        level = max(logging.getLevelName(self.meter.settings.log_level.upper()), logging.INFO)
        for name in ("aiokafka", "faust", "mode", "kafka"):
            logging.getLogger(name).setLevel(level)
        # "producer buffer full" is Faust applying backpressure to changelog writes, which is normal
        # at volume, not a fault; operators watch lag and throughput instead.
        logging.getLogger("faust.transport.producer").setLevel(max(level, logging.ERROR))
        self.meter.ready.set()


class IdleWatch(threading.Thread):
    """--until-idle: stop once inputs are committed to their end, the sink has caught up, and nothing
    changed for ``idle_seconds``."""

    def __init__(self, meter: Meter, sink: Any, bootstrap: str, on_idle: Any) -> None:
        super().__init__(name="idle-watch", daemon=True)
        self.meter = meter
        self.sink = sink
        self.on_idle = on_idle
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.offsets = GroupOffsets(bootstrap, meter.settings.app_id)
        self.settings = meter.settings
        self._halt = threading.Event()

    def halt(self) -> None:
        self._halt.set()

    def caught_up(self) -> bool:
        """Inputs committed by the worker up to their ends, and outputs written by the sink up to theirs:
        one metadata, one list-offsets and one group-offsets request per check."""
        positions = self.sink.positions()
        if positions is None or not self.meter.ready.is_set():
            return False
        topics = self.settings.topics
        meta = self.admin.list_topics(timeout=10)
        tps = [
            TopicPartition(t, p)
            for t in (*topics.inputs, topics.rated, topics.accepted, topics.deadletter)
            for p in meta.topics[t].partitions
        ]
        ends = self.admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, request_timeout=10)
        high = {(tp.topic, tp.partition): f.result().offset for tp, f in ends.items()}
        committed = self.offsets.committed([key for key in high if key[0] in topics.inputs])
        for key, end in high.items():
            if end == 0:
                continue
            done_to = committed.get(key, -1) if key[0] in topics.inputs else positions.get(key, -1)
            if done_to < end:
                return False
        return True

    def run(self) -> None:
        quiet_since: float | None = None
        last_seen = (-1, -1)
        while not self._halt.wait(0.25):
            try:
                progress = (self.meter.stats.total(), self.sink.rows_written)
                done = self.sink.error is None and self.caught_up()
            except Exception:
                log.debug("idle check failed", exc_info=True)
                done = False
                progress = last_seen
            if self.sink.error is not None:
                self.on_idle()
                return
            if not done or progress != last_seen:
                log.debug("not idle yet: done=%s progress=%s", done, progress)
                quiet_since = None
                last_seen = progress
                continue
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= self.settings.idle_seconds:
                self.on_idle()
                return


def run_worker(
    settings: Settings,
    bootstrap: str,
    catalog: Catalog,
    serde: Serde,
    until_idle: bool,
    catalog_text: str = "",
) -> Stats:
    """Run the worker in this process until SIGTERM/SIGINT, or until idle. Raises on a sink failure."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger.open(settings.clickhouse_dsn, _secret(settings))
    if catalog_text:
        from pipeline.catalogs import register_catalog

        try:
            register_catalog(ledger, catalog, catalog_text)
        except Exception:
            ledger.close()
            raise
    prepare_state_dir(settings.data_dir / "worker")
    meter = Meter(settings, bootstrap, catalog, serde)
    from pipeline.broker import ensure_internal_topics

    try:
        ensure_internal_topics(bootstrap, meter.internal_topics())
    except Exception:
        ledger.close()
        raise
    from pipeline.sink import LedgerSink

    sink = LedgerSink(settings, bootstrap, serde, ledger)
    # stdout is the command's result (JSON stats); Faust's console output goes to stderr.
    worker = _Worker(
        meter.app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False, stdout=sys.stderr
    )
    worker.meter = meter
    loop = worker.loop

    def stop_soon() -> None:
        loop.call_soon_threadsafe(worker._schedule_shutdown, signal.SIGTERM)

    watch = IdleWatch(meter, sink, bootstrap, stop_soon) if until_idle else None
    lag = LagMonitor(meter, bootstrap)
    lag.start()
    sink.start()
    if watch is not None:
        watch.start()
    exit_code: object = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        exit_code = exc.code
    finally:
        if watch is not None:
            watch.halt()
        lag.halt()
        sink.stop()
        ledger.close()
    if sink.error is not None:
        msg = f"ledger sink failed: {sink.error}"
        raise RetryableError(msg) from sink.error
    if exit_code not in (0, None):
        # Faust stopped on an error: the last transaction may be aborted, so the local state is not
        # marked clean and the next start rebuilds it from the changelogs.
        msg = f"stream worker stopped with an error (exit {exit_code}); see the log above"
        raise RetryableError(msg)
    if meter.faults:
        # A client error was logged during the run (broker connection lost, a failed commit): the
        # local state may hold writes of a transaction that never committed. Do not vouch for it.
        log.warning("not marking local state clean after %d client error(s)", meter.faults)
    else:
        mark_clean(settings.data_dir / "worker")
    (settings.data_dir / "worker-stats.json").write_text(json.dumps(meter.stats.to_dict(), indent=2))
    return meter.stats


def _secret(settings: Settings) -> str | None:
    return settings.clickhouse_password.get_secret_value() if settings.clickhouse_password else None
