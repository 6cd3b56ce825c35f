"""The stream worker's decisions: deduplicate, keep tenant state, rate, emit, atomically with the offsets.

Commit protocol. Faust (``processing_guarantee="exactly_once"``) keeps one Kafka transaction open per
assigned input partition P of ``calls``/``provisioning`` (the two are co-partitioned by tenant, so a
tenant's calls and provisioning share P and its state lives in partition P of every table). Where each
step is enforced is named in brackets; a step enforced inside Faust runs in an override of a Faust class
(stream/faust_seams.py, named after the arrow), and stream/faust_patches.py checks at start-up that each
overridden Faust method is still the one it expects.

0. When partition P is assigned, its transactional producer starts and closes, as aborted, anything an
   earlier owner left open under the same producer id before this worker writes [stream/fencing.py ->
   ``MeterTransactionManager._start_transactions``]. Its local state is recovered from the changelogs
   and the input sought to its committed offsets before any input is handled [stream/recovery.py ->
   ``MeterRecovery``].
1. The consumer (read_committed) hands the agent an event from P; an offset out of order is skipped (a
   redelivery) or stops the process (a record never handled) [stream/continuity.py]. From here to its
   acknowledgement the event is one critical section: no Faust commit can run in the middle of it
   [stream/guard.py, ``CommitGuard.batch``]. The event is Faust's current event, so its table writes and
   outputs go to P's transaction [stream/state.py ``FaustTable``, stream/emitter.py ``faust_send``].
2. A record that does not decode, or names no tenant or id, is dead-lettered (original bytes, source
   position, reason, message) under a key of its bytes; a decoded event that breaks a rule
   (rating/calls.py ``validate_call``, rating/provisioning.py, rating/timing.py: dated in the future)
   under its own key with a checksum of its bytes. An identical copy is then a duplicate, a corrected
   resend is processed [``Meter._refuse``, stream/dedupe.py].
3. Dedupe: a copy of a key already held (stream/dedupe.py), or a provisioning event already in the
   tenant's timeline, is a duplicate: no state write, only a Duplicate record (step 5).
4. State writes, in RocksDB and, through Faust's producer buffer, partition P of their changelogs inside
   P's transaction: the tenant's timeline, parked calls, the live window and alert markers. The event's
   dedupe fact goes to RocksDB at once and to the changelog at the next commit, in one batch record
   with the partition's other new keys (step 6, stream/dedupe.py). A live balance changes in memory
   (answers read it at once) and is written at the next commit too (step 6). A call of a period the
   live window has closed changes no balance (stream/window.py).
   (Crash point ``worker-4-state-written``.)
5. Outputs (rated call, accepted provisioning event, dead letter, duplicate, alert) go to partition P of
   their topics inside P's transaction [stream/emitter.py]. The event is acknowledged and the critical
   section ends. (Crash points ``worker-5-output-sent``, ``after-event``.)
6. Every commit interval (and at a rebalance or shutdown) the guard waits for the current event, writes
   what the parts write once per commit (``Parts.flush``: the balances changed since the last commit,
   one record per tenant period, and the new dedupe keys, one record per partition and 1,000 keys),
   drains the buffered changelog writes into their transactions, and Faust adds P's consumed offsets
   and commits [stream/guard.py ``guarded_commit`` -> ``MeterConsumer.force_commit``; before a rebalance
   ``commit_then_revoke`` -> ``MeterConsumer.on_partitions_revoked``]. Only now do 2-5 become visible to
   read_committed readers: all of them or none. (Crash point ``worker-6-committed``, just after.)

   A crash before 6 aborts the transaction (the restarted worker's producers fence it at once; left alone,
   the broker aborts it after ``guard.TRANSACTION_TIMEOUT_MS``): changelog writes, outputs and offsets
   roll back together and the events are processed again from the last commit. An exception inside an
   event, or a send that failed for good, stops the process at once without any commit [stream/guard.py;
   ``check_published`` -> ``MeterTopic._on_published``] and ``callmeter worker`` starts a new one. RocksDB
   is only a cache of the changelogs and may still hold writes of the aborted transaction, so the worker
   marks a clean shutdown and, after an unclean one, deletes its local state and rebuilds it from the
   changelogs (read_committed) to each one's last committed record before consuming [stream/runner.py
   ``prepare_state_dir``, verified by stream/recovery.py -> ``MeterRecovery``]. Without this a call whose
   dedupe key survived in RocksDB but whose rated record was aborted would be lost.
7. The ledger sink (sinks/sink.py) reads the outputs read_committed and writes ClickHouse under
   its own numbered protocol; together no crash point loses a call or counts one twice.

The worker's parts each own their table (stream/state.py): the dedupe index, the tenant book, the
parking lot, the live window and the balance book. ``Meter`` only orders what they decide; it never
touches Faust, so its decisions are unit-tested with in-memory tables (tests/unit/test_meter.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from pipeline import metrics
from pipeline.crashpoints import CRASH_AT as _CRASH_AT
from pipeline.crashpoints import acrash_point
from pipeline.records import call_from_record, provisioning_from_record
from pipeline.settings import Settings
from pipeline.stream.balances import BalanceBook
from pipeline.stream.dedupe import DedupeIndex, event_key, ms, raw_key
from pipeline.stream.emitter import Emitter
from pipeline.stream.parking import ParkedCall, ParkingLot
from pipeline.stream.source import CALL, PROVISIONING, SourceRecord
from pipeline.stream.stats import Stats
from pipeline.stream.tenants import TenantBook
from pipeline.stream.window import LiveWindow
from rating.calls import RatedCall, rate_call, validate_call
from rating.catalog import Catalog
from rating.models import CallEvent, ProvisioningEvent, Reason, Rejection
from rating.provisioning import RERATING_ACTIONS, check_provisioning
from rating.subscription import TenantTimeline
from rating.timing import future_rejection
from schemas.errors import SerdeError
from schemas.serde import Serde

log = logging.getLogger(__name__)

# Refusals that depend on the catalog, not on the event: fixed by a catalog change, then a resend.
CATALOG_REASONS = frozenset({Reason.UNKNOWN_PLAN, Reason.UNKNOWN_TAX_REGION})


@dataclass
class Parts:
    """The worker's parts, each owning its state (see the module docstring)."""

    dedupe: DedupeIndex
    tenants: TenantBook
    parking: ParkingLot
    window: LiveWindow
    book: BalanceBook
    emit: Emitter

    def flush(self) -> int:
        """Protocol step 6, before each commit: what the parts write once per commit (the balances
        changed, the dedupe keys added) into the partitions' transactions; the records written."""
        return self.book.flush() + self.dedupe.flush()

    def forget(self) -> None:
        """At every rebalance: cached state of partitions that may have moved is read again."""
        self.tenants.forget()
        self.window.forget()
        self.book.forget()


class Meter:
    def __init__(
        self, settings: Settings, catalog: Catalog, serde: Serde, parts: Parts, stats: Stats
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.serde = serde
        self.parts = parts
        self.stats = stats
        self.future_tolerance = timedelta(seconds=settings.future_tolerance_seconds)
        # Parking timeout: wall-clock minute of the last sweep of parked calls per partition.
        self._parking_swept: dict[int, int] = {}
        self._consumed = {t: metrics.EVENTS_CONSUMED.labels(topic=t) for t in settings.topics.inputs}

    async def handle(self, src: SourceRecord) -> None:
        """One input record, steps 2-5 (steps 1 and 6 are the agent's and the guard's)."""
        self._count(src)
        await self._expire_parked(src.partition)
        try:
            name, record = self.serde.decode(src.value)
        except SerdeError as exc:
            await self._refuse(src, raw_key(src.kind, src.value), src.timestamp_ms, exc.reason, exc.message)
            return
        expected = "CallRecord" if src.kind == CALL else "ProvisioningEvent"
        if name != expected:
            reason, message = Reason.INVALID_EVENT, f"{name} record on topic {src.topic}"
        elif not record.get("tenant_id") or not record.get("event_id"):
            reason, message = Reason.INVALID_EVENT, "tenant_id and event_id must be non-empty"
        elif src.kind == CALL:
            await self._on_call(src, call_from_record(record))
            return
        else:
            await self._on_provisioning(src, provisioning_from_record(record))
            return
        await self._refuse(src, raw_key(src.kind, src.value), src.timestamp_ms, reason, message)

    # -- calls ----------------------------------------------------------------------------------------
    async def _on_call(self, src: SourceRecord, call: CallEvent) -> None:
        p, parts = src.partition, self.parts
        key = event_key(CALL, call.tenant_id, call.event_id)
        if parts.dedupe.is_copy(p, key, src.value):  # step 3
            await self._duplicate(src, call.tenant_id, call.event_id, call.gateway_id, call.ended_at)
            return
        rejection = validate_call(call) or self._future(call.ended_at, src, "ended_at")
        timeline = parts.tenants.get(p, call.tenant_id)
        if rejection is None and timeline is not None and timeline.subscribed:
            result: RatedCall | Rejection = rate_call(call, timeline, self.catalog)
            if isinstance(result, Rejection) and result.reason != Reason.NO_SUBSCRIPTION:
                rejection = result
        if rejection is not None:  # step 2
            await self._refuse(src, key, ms(call.ended_at), rejection.reason, rejection.message)
            return
        # Step 4: the key is consumed whatever follows (rated, parked, revivable), so a retry is a copy.
        parts.dedupe.accept_call(p, key, call)
        self._advance(p, call.ended_at)
        if timeline is None or not timeline.subscribed:
            # Events on the two topics are not ordered: hold the call until SUBSCRIPTION_STARTED (spec §5).
            parts.parking.park(call.tenant_id, ParkedCall(src, int(time.time() * 1000), revivable=False))
            self.stats.parked += 1
            metrics.PARKED_CALLS.inc()
            return
        if isinstance(result, Rejection):
            # Subscribed, but nothing covers the call's period as far as this worker knows: dead-letter it
            # now, keep it revivable until the parking timeout (docs/decisions.md, "Parking").
            await self._dead(src, result.reason, result.message)
            parts.parking.park(call.tenant_id, ParkedCall(src, int(time.time() * 1000), revivable=True))
            return
        await self._rated(src, result, timeline)
        if _CRASH_AT:
            await acrash_point("worker-5-output-sent")

    async def _rated(self, src: SourceRecord, rated: RatedCall, timeline: TenantTimeline) -> None:
        """A rated call: its balance and alerts (live periods only), then its outputs (steps 4-5)."""
        p, parts = src.partition, self.parts
        alerts = []
        if parts.window.is_live(p, rated.period.end):
            alerts = parts.book.add(p, rated, timeline)
        else:
            # A closed period answers from the ledger: its first-seen check decides whether this call,
            # whose key the worker no longer holds, is new (docs/decisions.md, "Live balances").
            self.stats.closed_period += 1
        if _CRASH_AT:
            await acrash_point("worker-4-state-written")
        self.stats.rated += 1
        metrics.RATED_CALLS.inc()
        metrics.BILLABLE_SECONDS.inc(rated.billable_seconds)
        await parts.emit.rated(src, rated)
        for alert in alerts:
            await parts.emit.alert(alert)

    # -- provisioning ---------------------------------------------------------------------------------
    async def _on_provisioning(self, src: SourceRecord, event: ProvisioningEvent) -> None:
        p, parts = src.partition, self.parts
        key = event_key(PROVISIONING, event.tenant_id, event.event_id)
        timeline = parts.tenants.get(p, event.tenant_id)
        if (timeline is not None and timeline.has_event(event.event_id)) or parts.dedupe.is_copy(
            p, key, src.value
        ):  # step 3
            await self._duplicate(src, event.tenant_id, event.event_id, "", event.occurred_at)
            return
        rejection = check_provisioning(event, self.catalog) or self._future(
            event.occurred_at, src, "occurred_at"
        )
        if rejection is not None:  # step 2
            await self._refuse(src, key, ms(event.occurred_at), rejection.reason, rejection.message)
            return
        # Step 4: the timeline keeps the event for ever; it is the tenant's provisioning dedupe record.
        timeline = (timeline or TenantTimeline.from_events(event.tenant_id, [])).apply(event)
        parts.tenants.put(p, timeline)
        self._advance(p, event.occurred_at)
        alerts = parts.book.quota(p, timeline, event)
        await parts.emit.accepted(src, event.tenant_id)
        for alert in alerts:
            await parts.emit.alert(alert)
        if not timeline.subscribed:
            return
        await self._release_parked(p, timeline)
        if event.action in RERATING_ACTIONS:
            # The change may rate remembered calls differently: live balances follow at once.
            changed, alerts = parts.book.rerate(p, timeline, event.occurred_at)
            self.stats.rebalanced += changed
            for alert in alerts:
                await parts.emit.alert(alert)

    async def _release_parked(self, p: int, timeline: TenantTimeline) -> None:
        """Rate, in arrival order, the parked calls the timeline now covers. One it does not cover is
        dead-lettered (once) and kept revivable with its original parking time."""
        parts = self.parts
        for parked in parts.parking.take(p, timeline.tenant_id):
            call = call_from_record(self.serde.decode(parked.source.value)[1])  # it decoded when parked
            result = rate_call(call, timeline, self.catalog)
            if isinstance(result, Rejection) and result.reason == Reason.NO_SUBSCRIPTION:
                if not parked.revivable:
                    await self._dead(parked.source, result.reason, result.message)
                    metrics.PARKED_CALLS.dec()
                parts.parking.park(timeline.tenant_id, ParkedCall(parked.source, parked.parked_at_ms, True))
                continue
            if not parked.revivable:
                self.stats.unparked += 1
                metrics.PARKED_CALLS.dec()
            if isinstance(result, Rejection):
                # Not accepted after all: its bytes are remembered like any refused event's.
                key = event_key(CALL, call.tenant_id, call.event_id)
                parts.dedupe.refuse(p, key, ms(call.ended_at), parked.source.value)
                if not parked.revivable:
                    await self._dead(parked.source, result.reason, result.message)
                continue
            if parked.revivable:
                self.stats.revived += 1
            await self._rated(parked.source, result, timeline)

    async def _expire_parked(self, p: int) -> None:
        """At most once a wall-clock minute per partition: calls parked longer than the timeout leave
        as NO_SUBSCRIPTION dead letters (spec §5: nothing is dropped silently), in this event's
        transaction, and release their keys, so a resend once the tenant is subscribed is rated."""
        minute = int(time.time() // 60)
        if self._parking_swept.get(p) == minute:
            return
        self._parking_swept[p] = minute
        timeout = self.settings.parking_timeout_seconds
        for tenant, parked in self.parts.parking.expire(p, int(time.time() * 1000) - timeout * 1000):
            if not parked.revivable:  # a revivable call was dead-lettered when it was refused
                message = (
                    f"no SUBSCRIPTION_STARTED for tenant {tenant!r} within the parking timeout ({timeout} s)"
                )
                await self._dead(parked.source, Reason.NO_SUBSCRIPTION, message)
                metrics.PARKED_CALLS.dec()
            event_id = self.serde.decode(parked.source.value)[1]["event_id"]
            self.parts.dedupe.release(p, event_key(CALL, tenant, event_id))

    # -- shared steps ---------------------------------------------------------------------------------
    def _future(self, event_time: datetime, src: SourceRecord, what: str) -> Rejection | None:
        return future_rejection(event_time, src.received_at, self.future_tolerance, what)

    def _advance(self, p: int, event_time: datetime) -> None:
        """An accepted event moves the live window; on a new day, forget what the window no longer holds."""
        parts = self.parts
        if not parts.window.advance(p, ms(event_time)):
            return
        floor, horizon = parts.window.key_floor_ms(p), parts.window.horizon_ms(p)
        if floor is not None and horizon is not None:
            self.stats.keys_expired += parts.dedupe.sweep(p, floor)
            parts.book.sweep(p, horizon)

    async def _refuse(self, src: SourceRecord, key: str, event_ms: int, reason: str, message: str) -> None:
        """Step 2: a dead letter, once per distinct bad event; an identical copy is a duplicate. An event
        refused for what the catalog lacks, not for what it says, keeps no key: once the catalog is
        fixed, resending the very same record is the remedy (the ledger still counts copies sent before
        as one dead letter, by their bytes)."""
        if self.parts.dedupe.is_copy(src.partition, key, src.value):
            await self._duplicate(src, src.key_text, "", "", None)
            return
        if reason not in CATALOG_REASONS:
            self.parts.dedupe.refuse(src.partition, key, event_ms, src.value)
        await self._dead(src, reason, message)

    async def _dead(self, src: SourceRecord, reason: str, message: str) -> None:
        self.stats.dead_letters[str(reason)] += 1
        self.stats.tick(dead=1)
        await self.parts.emit.dead(src, reason, message)

    async def _duplicate(
        self, src: SourceRecord, tenant: str, event_id: str, gateway: str, event_time: datetime | None
    ) -> None:
        self.stats.duplicates[src.kind] += 1
        self.stats.tick(duplicates=1)
        await self.parts.emit.duplicate(src, tenant, event_id, gateway, event_time)

    def _count(self, src: SourceRecord) -> None:
        self.stats.consumed[src.kind] += 1
        self.stats.last_record_ms[src.partition] = src.timestamp_ms
        self._consumed[src.topic].inc()
        self.stats.tick(consumed=1)
        metrics.LAST_EVENT_TIMESTAMP.set(time.time())
