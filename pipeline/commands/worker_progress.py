"""`callmeter worker --until-idle` on a terminal: a progress line from the consumer groups' committed
offsets, drawn by the supervising process (pipeline/progress.py: terminal only).

It asks the broker, once a second, how far the workers' group has committed the input topics and the
ledger sink's group the output topics, against the partitions' ends. Offsets count records and
transaction markers alike, so the figures are close to event counts, not exact; they are progress,
not accounting (the result line and `callmeter ledger` are that).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from pipeline.offsets import GroupOffsets
from pipeline.progress import Progress
from pipeline.settings import Settings

TP = tuple[str, int]


def remaining(ends: dict[TP, tuple[int, int]], committed: dict[TP, int]) -> int:
    """Records between each partition's committed offset (its start when none) and its end."""
    return sum(high - max(committed.get(tp, -1), low) for tp, (low, high) in ends.items() if high > low)


class UntilIdleProgress:
    """A thread drawing the line until ``stop()``; does nothing unless ``progress`` is enabled."""

    def __init__(self, settings: Settings, bootstrap: str, progress: Progress, interval: float = 1.0) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.progress = progress
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="until-idle-progress", daemon=True)

    def start(self) -> UntilIdleProgress:
        if self.progress.enabled:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.progress.close()

    def _run(self) -> None:
        topics = self.settings.topics
        n = self.settings.partitions
        inputs = [(t, p) for t in topics.inputs for p in range(n)]
        outputs = [(t, p) for t in topics.ledger_inputs for p in range(n)]
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "group.id": "callmeter-progress",  # assign-free reads of watermarks only; never commits
            "enable.auto.commit": False,
            "log_level": 0,
        }
        ends_reader = Consumer(conf)
        workers = GroupOffsets(self.bootstrap, self.settings.app_id)
        sink = GroupOffsets(self.bootstrap, f"{self.settings.app_id}-ledger")
        try:
            self._draw(ends_reader, workers, sink, inputs, outputs)
        except Exception:  # noqa: S110 - progress is a courtesy: it must never disturb the run
            pass
        finally:
            for client in (workers, sink):
                with contextlib.suppress(KafkaException, RuntimeError):
                    client.close()
            with contextlib.suppress(KafkaException, RuntimeError):
                ends_reader.close()

    def _draw(
        self,
        ends_reader: Consumer,
        workers: GroupOffsets,
        sink: GroupOffsets,
        inputs: list[TP],
        outputs: list[TP],
    ) -> None:
        def ends(tps: list[TP]) -> dict[TP, tuple[int, int]]:
            out = {}
            for topic, partition in tps:
                low, high = ends_reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=5)
                out[(topic, partition)] = (int(low), int(high))
            return out

        baseline: int | None = None
        showing = ""
        ledger_start = 0
        first = True
        while not self._stop.wait(0 if first else self.interval):
            first = False
            try:
                input_ends = ends(inputs)
                todo = remaining(input_ends, workers.committed(inputs, timeout=5))
                behind = remaining(ends(outputs), sink.committed(outputs, timeout=5)) if todo == 0 else 0
            except KafkaException:
                continue  # topics not created yet, a coordinator loading: ask again next time
            total = sum(high - low for low, high in input_ends.values())
            if baseline is None:
                baseline = total - todo  # committed before this run began
            if behind > 0:
                if showing != "ledger":
                    showing, ledger_start = "ledger", behind
                    self.progress.phase("worker: writing the ledger", ledger_start, "records")
                self.progress.update(max(ledger_start - behind, 0))
            else:
                if showing != "inputs":
                    showing = "inputs"
                    self.progress.phase("worker: events consumed", total - baseline, "events")
                self.progress.update(total - todo - baseline, total - baseline)
