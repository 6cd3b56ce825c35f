"""The steady rate of a `worker --until-idle` run, net of its start-up and of its idle check.

A run's wall time includes importing, joining the group, recovering tables and, at the end, the check
that nothing is left. The reference rows (bench/refs.py) time only the records' own work, from the
first received to the last handled. To compare like with like, ``CommitProbe`` samples the worker
group's committed input offsets from outside while the run goes on, and the steady rate is the records
committed between the first commit and the last, over the time between them. (The first commit's own
records are left out with the time they took, so the rate is of records the worker was already
running for.)
"""

from __future__ import annotations

import threading
import time
from typing import Any

from confluent_kafka.admin import AdminClient

from pipeline.offsets import GroupOffsets


class CommitProbe:
    def __init__(self, bootstrap: str, group: str, topics: list[str], interval_s: float = 0.25) -> None:
        self.bootstrap = bootstrap
        self.group = group
        self.topics = topics
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-probe", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=30)
        return steady(self.samples)

    def _run(self) -> None:
        metadata = AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=30)
        tps = [(t, p) for t in self.topics for p in metadata.topics[t].partitions]
        reader = GroupOffsets(self.bootstrap, self.group)
        try:
            while not self._stop.is_set():
                committed = reader.committed(tps)
                self.samples.append((time.monotonic(), sum(max(o, 0) for o in committed.values())))
                self._stop.wait(self.interval_s)
        finally:
            reader.close()


def steady(samples: list[tuple[float, int]]) -> dict[str, Any]:
    """From (time, committed records) samples: the first and last commit and the rate between them."""
    moving = [(t, n) for t, n in samples if n > 0]
    if len(moving) < 2:
        return {"steady_records": 0, "steady_seconds": 0.0, "steady_per_second": None}
    final = moving[-1][1]
    first_t, first_n = moving[0]
    last_t = next(t for t, n in moving if n == final)
    seconds = last_t - first_t
    records = final - first_n
    return {
        "steady_records": records,
        "steady_seconds": round(seconds, 2),
        "steady_per_second": round(records / seconds) if seconds > 0 and records > 0 else None,
    }
