"""Threads beside the Faust loop: consumer lag and the stall watchdog (LagMonitor). They read Kafka
with their own clients, never the worker's. The ``--until-idle`` check is pipeline/idle.py."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from pipeline import metrics
from pipeline.identity import remember_cluster_id
from pipeline.offsets import GroupOffsets
from pipeline.stream.guard import die

if TYPE_CHECKING:
    from pipeline.stream.app import StreamApp

log = logging.getLogger(__name__)
TP = tuple[str, int]


class LagMonitor(threading.Thread):
    """Consumer lag per input partition (high watermark minus committed offset) and event-time lag
    (age of the oldest uncommitted input record, read from Kafka), refreshed every few seconds."""

    def __init__(self, meter: StreamApp, bootstrap: str, every_seconds: float = 3.0) -> None:
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
        self._was_ready = False
        self._last_committed: dict[TP, int] = {}

    def halt(self) -> None:
        self._halt.set()

    def measure(self) -> None:
        settings = self.meter.settings
        meta = self.admin.list_topics(timeout=10)
        remember_cluster_id(meta.cluster_id)
        tps = [TopicPartition(t, p) for t in settings.topics.inputs for p in meta.topics[t].partitions]
        ends = self.admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, request_timeout=10)
        high = {(tp.topic, tp.partition): f.result().offset for tp, f in ends.items()}
        committed = {key: max(offset, 0) for key, offset in self.offsets.committed(list(high)).items()}
        # Judge progress on these fresh offsets, before the peeks below (up to 2 s per lagging
        # partition): judged after them, offsets read seconds earlier stopped a worker that was
        # committing (a needless restart, seen in make chaos).
        self._watch_progress(high, committed)
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
        # Start-up recovery (rebuilding tables from changelogs) commits nothing: allow it longer, and
        # start the shorter clock of a running worker only when it is ready.
        ready = self.meter.ready.is_set()
        if ready and not self._was_ready:
            self._was_ready = True
            self._progress_at = time.monotonic()
        limit = self.meter.settings.stall_timeout_seconds * (1 if ready else 3)
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
        try:  # the cluster this worker states in its /status, before the first measurement
            remember_cluster_id(self.admin.list_topics(timeout=10).cluster_id)
        except Exception:
            log.debug("no cluster id yet", exc_info=True)
        while not self._halt.wait(self.every_seconds):
            try:
                self.measure()
            except Exception:  # metrics must never take the worker down; a long outage is a stall
                log.debug("lag measurement failed", exc_info=True)
                self._check_stall(None)
        self.peek.close()
