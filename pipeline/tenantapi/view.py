"""Every tenant's timeline and period balances as of the stream workers' last commits.

The stream workers keep this state in RocksDB and write each change to the ``tenants`` and
``balances`` changelog topics inside the input partition's transaction (pipeline/stream/worker.py,
protocol steps 4 and 6). A read_committed consumer of those changelogs therefore sees exactly the
committed state of every partition, whichever worker owns it, across rebalances, restarts and kill -9
(an aborted transaction's writes are never delivered). This view applies them to two dicts in a
thread of its own, so the tenant API answers without the stream worker's event loop.

How current it is: a change is visible here once its transaction commits (the workers commit every
second, ``broker_commit_interval``), so an answer lags the worker's live state by about a second.
For pre-call authorization that is the right trade: a call in progress is not in any balance until it
ends, which is a far larger uncertainty than one commit interval (docs/decisions.md).

Readiness: until the consumer has reached the end of every changelog partition as it was when the
view started (``caught_up``), the state is partial and the API answers 503, as a worker recovering its
state does. After that it stays ready; ``status()`` tells how far behind each partition is.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from pipeline.errors import BrokerError
from pipeline.partitioning import partition_for
from pipeline.stream.keys import balance_key, period_is_live, window_partition
from rating.errors import CallmeterError
from rating.periods import Period
from rating.subscription import TenantTimeline

log = logging.getLogger(__name__)

TENANTS, BALANCES = "tenants", "balances"


def changelog_topic(app_id: str, table: str) -> str:
    """Faust's name for a table's changelog topic (``<app id>-<table>-changelog``)."""
    return f"{app_id}-{table}-changelog"


class ChangelogView:
    """A ``TenantState`` (answers.py) from the committed changelogs; ``run()`` in a thread."""

    def __init__(
        self, bootstrap: Callable[[], str], app_id: str, partitions: int, retention_days: int
    ) -> None:
        self._bootstrap = bootstrap
        self.topics = {changelog_topic(app_id, TENANTS): TENANTS, changelog_topic(app_id, BALANCES): BALANCES}
        self.partitions = partitions
        self.retention_days = retention_days
        # Parsed once per change (a tenant's provisioning is rare); read by the HTTP threads. A dict's
        # get and set are atomic under the GIL, and each key is one value, so no lock is needed.
        self._timelines: dict[str, TenantTimeline] = {}
        self._balances: dict[str, int] = {}
        # The live window's event-time day per input partition (stream/keys.py window_key).
        self._windows: dict[int, int] = {}
        self._pending: set[tuple[str, int]] = set()
        self.caught_up = threading.Event()
        self.stopping = threading.Event()
        self.records_applied = 0
        self.last_applied_at: float | None = None
        self.error: str | None = None

    # -- what the API reads ----------------------------------------------------------------------------
    def timeline(self, tenant_id: str) -> TenantTimeline | None:
        return self._timelines.get(tenant_id)

    def used_seconds(self, tenant_id: str, period: Period) -> int | None:
        """As the worker answers (pipeline/stream/window.py): None once the live window closed the period."""
        window = self._windows.get(partition_for(tenant_id, self.partitions))
        if not period_is_live(window, self.retention_days, period.end):
            return None
        return self._balances.get(balance_key(tenant_id, period.start), 0)

    def not_serving(self, tenant_id: str = "") -> str | None:
        if self.caught_up.is_set():
            return None
        if self.error:
            return f"tenant API starting: {self.error}"
        return "tenant API starting: reading the committed state"

    def status(self) -> dict[str, Any]:
        return {
            "caught_up": self.caught_up.is_set(),
            "partitions_catching_up": len(self._pending),
            "records_applied": self.records_applied,
            "seconds_since_last_change": (
                None if self.last_applied_at is None else round(time.monotonic() - self.last_applied_at, 3)
            ),
            "tenants": len(self._timelines),
            "error": self.error,
        }

    # -- the consumer thread ---------------------------------------------------------------------------
    def apply(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        """One changelog record: a JSON key (Faust's table key serializer) and a JSON value, or a
        tombstone (value None) when the worker deleted the key."""
        if key is None:
            return
        try:
            name = json.loads(key)
            decoded = None if value is None else json.loads(value)
        except ValueError:
            log.warning("tenant API: undecodable record on %s skipped", topic)
            return
        if not isinstance(name, str):
            return
        if self.topics[topic] == TENANTS:
            if decoded is None:
                self._timelines.pop(name, None)
            else:
                try:
                    self._timelines[name] = TenantTimeline.from_dict(decoded)
                except (CallmeterError, KeyError, TypeError, ValueError) as exc:
                    log.warning("tenant API: timeline of %s unreadable (%s); kept the last one", name, exc)
                    return
        elif decoded is None:
            self._balances.pop(name, None)
        elif isinstance(decoded, int) and not isinstance(decoded, bool):
            partition = window_partition(name)
            if partition is not None:
                self._windows[partition] = decoded
            else:
                self._balances[name] = decoded
        else:
            log.warning("tenant API: balance %s is not a whole number of seconds; kept the last one", name)
            return
        self.records_applied += 1
        self.last_applied_at = time.monotonic()

    def run(self) -> None:
        """Consume until ``stopping`` is set; a broker away is waited for (the client reconnects)."""
        consumer = None
        while consumer is None and not self.stopping.is_set():
            try:
                consumer = self._subscribe()
            except CallmeterError as exc:
                # No broker yet, or the workers have not created their changelogs yet (fresh cluster).
                self.error = str(exc)
                self.stopping.wait(1.0)
        if consumer is None:
            return
        self.error = None
        try:
            while not self.stopping.is_set():
                for msg in consumer.consume(num_messages=1000, timeout=0.2):
                    err = msg.error()
                    if err is None:
                        self.apply(str(msg.topic()), msg.key(), msg.value())
                    elif err.code() == KafkaError._PARTITION_EOF:
                        self._reached_end(str(msg.topic()), int(msg.partition() or 0))
                    elif not err.retriable():
                        self.error = str(err)
                        log.warning("tenant API: changelog consumer: %s", err)
        finally:
            consumer.close()

    def _reached_end(self, topic: str, partition: int) -> None:
        self._pending.discard((topic, partition))
        if not self._pending:
            self.caught_up.set()

    def _subscribe(self) -> Consumer:
        bootstrap = self._bootstrap()
        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "callmeter-tenant-api",  # never committed: every start reads from the start
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "enable.partition.eof": True,
                "auto.offset.reset": "earliest",
                # Changes are applied as soon as they commit, not after the broker's 500 ms fetch wait.
                "fetch.wait.max.ms": 50,
            }
        )
        try:
            metadata = consumer.list_topics(timeout=10)
        except Exception as exc:
            consumer.close()
            msg = f"broker at {bootstrap} not reachable: {exc}"
            raise BrokerError(msg) from exc
        assignment = []
        for topic in self.topics:
            found = metadata.topics.get(topic)
            if found is None or found.error is not None or len(found.partitions) < self.partitions:
                consumer.close()
                msg = f"changelog {topic} does not exist yet (no worker has started)"
                raise BrokerError(msg)
            assignment += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(found.partitions)]
        # From offset 0 of every partition: a compacted changelog holds the latest value of every key.
        self._pending = {(tp.topic, tp.partition) for tp in assignment}
        consumer.assign(assignment)
        return consumer
