"""The ``--until-idle`` check (IdleWatch), run beside a stream worker and beside the ledger sink
process: it reads Kafka with its own clients, never the worker's or the sink's."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from pipeline.offsets import GroupOffsets
from pipeline.settings import Settings

log = logging.getLogger(__name__)


class SinkProgress(Protocol):
    """What the check reads of a ledger sink (sinks/sink.py LedgerSink)."""

    error: BaseException | None

    def positions(self) -> dict[tuple[str, int], int] | None: ...


class IdleWatch(threading.Thread):
    """--until-idle: stop once inputs are committed to their end (by the whole consumer group), the
    sink (when this process runs one) has written the outputs up to theirs, and nothing changed for
    ``idle_seconds``."""

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        on_idle: Callable[[], None],
        *,
        progress: Callable[[], tuple[int, int]],
        ready: Callable[[], bool],
        sink: SinkProgress | None,
    ) -> None:
        super().__init__(name="idle-watch", daemon=True)
        self.settings = settings
        self.on_idle = on_idle
        self.progress = progress
        self.ready = ready
        self.sink = sink
        self.admin = AdminClient({"bootstrap.servers": bootstrap})
        self.offsets = GroupOffsets(bootstrap, settings.app_id)
        self._halt = threading.Event()

    def halt(self) -> None:
        self._halt.set()

    def caught_up(self) -> bool:
        """Inputs committed by the stream workers up to their ends, and outputs written by this
        process's sink up to theirs: one metadata, one list-offsets and one group-offsets request."""
        positions: dict[tuple[str, int], int] = {}
        if self.sink is not None:
            sink_positions = self.sink.positions()
            if sink_positions is None:
                return False
            positions = sink_positions
        if not self.ready():
            return False
        topics = self.settings.topics
        outputs = tuple(topics.ledger_inputs) if self.sink is not None else ()
        meta = self.admin.list_topics(timeout=10)
        tps = [TopicPartition(t, p) for t in (*topics.inputs, *outputs) for p in meta.topics[t].partitions]
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

    def _sink_failed(self) -> bool:
        return self.sink is not None and self.sink.error is not None

    def run(self) -> None:
        quiet_since: float | None = None
        last_seen = (-1, -1)
        while not self._halt.wait(0.25):
            try:
                progress = self.progress()
                done = not self._sink_failed() and self.caught_up()
            except Exception:
                log.debug("idle check failed", exc_info=True)
                done = False
                progress = last_seen
            if self._sink_failed():
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
