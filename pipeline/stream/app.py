"""The stream worker on Faust: the app, its tables, the agent, and the Meter's parts bound to them.

``StreamApp`` is what a worker process runs (pipeline/stream/runner.py) and what its threads and HTTP
handlers read (watch.py, web.py). The decisions are the Meter's (worker.py); this module only binds
them to Faust: each part's table is a Faust table behind ``FaustTable``, outputs go through the
event's transactional producer (emitter.py ``faust_send``), and the agent runs each event as one
critical section (protocol step 1, guard.py) after the offset-continuity check (continuity.py).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pipeline import metrics
from pipeline.crashpoints import CRASH_AT as _CRASH_AT
from pipeline.crashpoints import acrash_point
from pipeline.identity import describe
from pipeline.partitioning import partition_for
from pipeline.settings import Settings
from pipeline.stream import faust_patches
from pipeline.stream.balances import BalanceBook
from pipeline.stream.continuity import CommittedReader, Continuity
from pipeline.stream.dedupe import DedupeIndex
from pipeline.stream.emitter import Emitter, faust_send
from pipeline.stream.faust_seams import CONFIGURED_CLASSES, MeterApp
from pipeline.stream.guard import CommitGuard
from pipeline.stream.parking import ParkingLot
from pipeline.stream.source import SourceRecord
from pipeline.stream.state import FaustTable
from pipeline.stream.stats import Stats, count_faults
from pipeline.stream.tenants import TenantBook
from pipeline.stream.window import LiveWindow
from pipeline.stream.worker import Meter, Parts
from rating.catalog import Catalog
from schemas.serde import Serde
from sinks.health import running_sink_status

log = logging.getLogger(__name__)

_ROCKSDICT = {"driver": "rocksdict"}
# The tables, in the order their changelogs are created; values are JSON (stream/dedupe.py and the
# other parts say what each holds).
TABLES = ("seen", "tenants", "parked", "balances", "alerted")


def build_app(settings: Settings, bootstrap: str) -> MeterApp:
    """The worker's Faust app, built from the classes of stream/faust_seams.py once Faust is checked
    to be the one they extend (stream/faust_patches.py)."""
    faust_patches.install()
    app = MeterApp(
        settings.app_id,
        **CONFIGURED_CLASSES,
        broker=f"kafka://{bootstrap}",
        store="rocksdb://",
        processing_guarantee="exactly_once",
        datadir=str(settings.worker_state_dir),
        topic_partitions=settings.partitions,
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
    app.bootstrap = bootstrap
    return app


class StreamApp:
    """One worker process's Faust app with the Meter's parts on its tables."""

    def __init__(self, settings: Settings, bootstrap: str, catalog: Catalog, serde: Serde) -> None:
        self.settings = settings
        self.topics = settings.topics
        self.catalog = catalog
        self.stats = Stats()
        self.app = app = build_app(settings, bootstrap)
        n = settings.partitions
        self.source = app.topic(
            *self.topics.inputs,
            key_serializer="raw",
            value_serializer="raw",
            partitions=n,
            internal=False,
        )
        self.tables = {
            name: app.Table(name, partitions=n, key_type=str, options=_ROCKSDICT) for name in TABLES
        }
        window = LiveWindow(FaustTable(self.tables["balances"]), settings.dedupe_retention_days)
        dedupe = DedupeIndex(FaustTable(self.tables["seen"]), window.key_floor_ms)
        self.parts = Parts(
            dedupe=dedupe,
            tenants=TenantBook(FaustTable(self.tables["tenants"])),
            parking=ParkingLot(FaustTable(self.tables["parked"])),
            window=window,
            book=BalanceBook(
                FaustTable(self.tables["balances"]),
                FaustTable(self.tables["alerted"]),
                catalog,
                window,
                dedupe.calls_of,
            ),
            emit=Emitter(serde, self.topics, faust_send(app)),
        )
        self.meter = Meter(settings, catalog, serde, self.parts, self.stats)
        self.guard = CommitGuard()
        reader = CommittedReader(bootstrap)
        self.continuity = Continuity(lambda: app.consumer, reader.first_committed_offset, reader.log_start)
        metrics.initialize(self.topics.inputs)
        # ERROR records of the Kafka/Faust client libraries seen during this run (see run_worker).
        self.faults = 0
        count_faults(self, ("faust", "aiokafka", "mode"))
        app.guard = self.guard
        app.sweep_for = self._sweep_for
        app.before_commit = self.parts.flush
        app.agent(self.source, name="meter")(self._agent)
        # Set once recovery is done and the agent consumes (runner.py).
        self.ready = threading.Event()
        self.lag: dict[tuple[str, int], int] = {}

        @app.on_partitions_revoked.connect
        async def _revoked(*_args: Any, **_kwargs: Any) -> None:
            self.parts.forget()
            self.continuity.forget()

        @app.on_partitions_assigned.connect
        async def _assigned(*_args: Any, **_kwargs: Any) -> None:
            self.parts.forget()
            self.continuity.forget()

    async def _agent(self, stream: Any) -> None:
        # One event at a time is a critical section against Faust's commits (protocol step 1).
        # Batches (take_events) ran ~1.5x faster but hung after a broker loss in make chaos (twice in a
        # row, until the stall watchdog): reverted until that is understood (docs/decisions.md).
        calls = self.topics.calls
        # Manual acks (Faust's ``noack``): an event is acked by the guard once handled (step 1), never
        # by Faust's iteration. Faust acks every event the agent moves past, so an event skipped as
        # taken before a rebalance (guard.py step 3) was acked too, and a later commit could pass its
        # offset before its redelivery was handled: two calls lost in a SIGKILL storm on a busy host.
        async for event in stream.noack().events():
            async with self.guard.batch([event]):
                msg = event.message
                if not await self.continuity.check(msg.topic, msg.partition, msg.offset):
                    continue  # handled already in this assignment (stream/continuity.py, step 3)
                await self.meter.handle(SourceRecord.of(msg, event.value, calls))
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

    def partition_of(self, tenant_id: str) -> int:
        """The input partition of a tenant: the producers' murmur2 of the tenant bytes."""
        return partition_for(tenant_id, self.settings.partitions)

    def changelog_of(self, table: str) -> str:
        return str(self.tables[table].changelog_topic.get_topic_name())

    def status(self) -> dict[str, Any]:
        """The worker's ``/status`` (stream/web.py), for `callmeter status` and on-call."""
        return {
            # Who answers (pipeline/identity.py), and its ledger sink when it runs one (one process).
            "pipeline": describe(self.settings),
            "sink": running_sink_status(),
            "stats": self.stats.to_dict(),
            "lag": [{"topic": t, "partition": p, "messages": n} for (t, p), n in sorted(self.lag.items())],
            "event_time_lag_seconds": metrics.EVENT_TIME_LAG._value.get(),
            "ledger_last_write_unix": metrics.LEDGER_LAST_WRITE._value.get(),
            "ready": self.ready.is_set(),
            "assigned_calls_partitions": sorted(
                tp.partition for tp in self.app.assignor.assigned_actives() if tp.topic == self.topics.calls
            ),
            "last_5_minutes": self.stats.window(5),
            "parked_calls": metrics.PARKED_CALLS._value.get(),
        }
