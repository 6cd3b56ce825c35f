"""Faust extended through its own seams: the classes a worker's Faust app is built from.

Every change callmeter makes to Faust's behaviour is an override in a subclass here, reached through
a seam Faust offers; the decisions themselves live in the modules named beside each override. What
has no seam (two attributes) is in stream/faust_patches.py, which also checks at start-up that every
Faust method overridden here still exists with the signature these overrides expect.

=====================  ===========================================  ====================================
Faust class            reached through                              overrides (logic in)
=====================  ===========================================  ====================================
App                    ``MeterApp`` itself (build_app)              ``_new_transport``: MeterTransport
Transport (aiokafka)   ``MeterApp._new_transport``                  Consumer, Producer, TransactionManager
Consumer               ``Transport.Consumer``                       ``force_commit`` (guard.py step 2),
                                                                    ``on_partitions_revoked`` (step 3),
                                                                    ``perform_seek``, ``resume_flow``
                                                                    (recovery.py part 5), ``getmany``
                                                                    (fault injection)
Producer               ``Transport.Producer``                       ``_settings_extra`` (transaction
                                                                    timeout, guard.py)
TransactionManager     ``Transport.TransactionManager``             ``_start_transactions`` (fencing.py)
Topic                  ``App(Topic=...)``                           ``_on_published`` (guard.py step 4)
TableManager           ``App(TableManager=...)``                    ``recovery``: MeterRecovery;
                                                                    ``on_rebalance`` (fault injection)
Recovery               ``MeterTableManager.recovery``               recovery.py parts 1, 3, 4, 5
Table                  ``App(Table=...)``                           ``_new_store_by_url``: MeterStore
Store (rocksdb)        ``MeterTable._new_store_by_url``             ``apply_changelog_batch`` (part 6;
                                                                    dedupe key batches expanded)
=====================  ===========================================  ====================================
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import faust
import faust.stores.rocksdb as faust_rocksdb
import faust.tables.manager as faust_manager
import faust.tables.recovery as faust_recovery
import faust.transport.consumer as faust_consumer
import faust.transport.drivers.aiokafka as faust_aiokafka

from pipeline.crashpoints import CRASH_AT, armed
from pipeline.stream import fencing, guard, recovery
from pipeline.stream.continuity import skipping_calls
from pipeline.stream.dedupe import expand_key_batches

SLOW_ASSIGNMENT_SECONDS = 12.0


class MeterApp(faust.App):
    """The worker's Faust app. What the worker hands Faust's internals is declared here, not set
    onto the app from outside: the commit guard, the stray-transaction sweep and the per-commit hook."""

    guard: guard.CommitGuard | None = None
    # For a transactional id: the input partition it serves, the topics its producer writes and the
    # input topics whose offsets it commits (fencing.py step 2); None for Faust's other ids.
    sweep_for: fencing.SweepFor | None = None
    # What the worker writes once per commit, before the commit (guard.py step 2: the balances).
    before_commit: Callable[[], object] | None = None
    # The Kafka bootstrap servers, for reading the changelogs' committed ends (recovery.py part 1).
    bootstrap = ""

    def _new_transport(self) -> Any:
        return MeterTransport(self.conf.broker_consumer, self)

    def _new_producer_transport(self) -> Any:
        return MeterTransport(self.conf.broker_producer, self)


class MeterConsumer(faust_aiokafka.Consumer):
    async def force_commit(self, topics: Any = None, start_new_transaction: bool = True) -> bool:
        return await guard.guarded_commit(self, super().force_commit, topics, start_new_transaction)

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await guard.commit_then_revoke(self, revoked, super().on_partitions_revoked)

    def getmany(self, timeout: float) -> AsyncIterator[tuple[Any, Any]]:
        messages = super().getmany(timeout)
        if not CRASH_AT:
            return messages
        return recovery.changelogs_late(skipping_calls(messages))

    async def perform_seek(self) -> None:
        if CRASH_AT and armed("seek-late"):
            await asyncio.sleep(recovery.LATE_SECONDS + 1)  # fault injection: a seek on a loaded machine
        await super().perform_seek()
        await recovery.seek_never_committed(self)  # recovery.py part 5

    def resume_flow(self) -> None:
        super().resume_flow()
        # recovery.py part 5: records of a never-committed partition that Faust dropped while its flow
        # was off are fetched again (a task: Faust resumes the flow from synchronous code).
        recovery.after_resume(self)


class MeterProducer(faust_aiokafka.Producer):
    def _settings_extra(self) -> Mapping[str, Any]:
        return guard.with_transaction_timeout(self.app, super()._settings_extra())


class MeterTransactionManager(faust_consumer.TransactionManager):
    async def _start_transactions(self, tids: Iterable[str]) -> None:
        await fencing.start_closing_strays(self, list(tids), super()._start_transactions)


class MeterTransport(faust_aiokafka.Transport):
    Consumer = MeterConsumer
    Producer = MeterProducer
    TransactionManager = MeterTransactionManager


class MeterTopic(faust.Topic):
    def _on_published(self, fut: Any, message: Any, producer: Any, state: Any) -> None:
        super()._on_published(fut, message, producer, state)
        guard.check_published(self.app, fut, message)


class MeterRecovery(faust_recovery.Recovery):
    async def _build_highwaters(self, consumer: Any, tps: Any, destination: Any, title: str) -> None:
        if title != "active":  # standby partitions, which this worker never has, keep Faust's
            await super()._build_highwaters(consumer, tps, destination, title)
            return
        await recovery.committed_highwaters(self, tps, destination, title)

    @property
    def signal_recovery_end(self) -> asyncio.Event:
        return recovery.latched_end(self)

    def _set_recovery_started(self) -> None:
        recovery.round_started(self)
        super()._set_recovery_started()

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        await recovery.verify_completed(self, generation_id)
        await super().on_recovery_completed(generation_id)


class MeterTableManager(faust_manager.TableManager):
    @property
    def recovery(self) -> faust_recovery.Recovery:
        if self._recovery is None:
            self._recovery = MeterRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery

    async def on_rebalance(
        self, assigned: Any, revoked: Any, newly_assigned: Any, generation_id: int = 0
    ) -> None:
        if CRASH_AT.startswith("assign-slow"):
            # Fault injection: taking on an assignment is slower than the session timeout, as on a
            # loaded machine (stream/faust_patches.py).
            await asyncio.sleep(SLOW_ASSIGNMENT_SECONDS)
        await super().on_rebalance(assigned, revoked, newly_assigned, generation_id)


class MeterStore(faust_rocksdb.Store):
    def apply_changelog_batch(self, batch: Any, to_key: Any, to_value: Any) -> None:
        apply = super().apply_changelog_batch

        def apply_and_expand(records: Any) -> None:
            records = list(records)
            apply(records, to_key, to_value)
            expand_key_batches(self, records)  # the dedupe keys of each batch record (stream/dedupe.py)

        recovery.apply_or_die(self, batch, apply_and_expand)


class MeterTable(faust.Table):
    def _new_store_by_url(self, url: Any) -> Any:
        if not str(url).startswith("rocksdb:"):
            return super()._new_store_by_url(url)
        # Faust's own construction (tables/base.py), with the store class the worker needs.
        return MeterStore(
            url,
            self.app,
            self,
            table_name=self.name,
            key_type=self.key_type,
            key_serializer=self.key_serializer,
            value_serializer=self.value_serializer,
            value_type=self.value_type,
            loop=self.loop,
            options=self.options,
        )


# What build_app passes to MeterApp: the configured classes of the table above.
CONFIGURED_CLASSES: dict[str, Any] = {
    "Topic": MeterTopic,
    "TableManager": MeterTableManager,
    "Table": MeterTable,
}
