"""Is the ledger complete enough to invoice? (An invoice from an unfinished ledger is wrong with
no warning.)

Two consumer groups must be done: the worker's over the input topics (every event consumed, rated,
committed) and the ledger sink's over the output topics (every output written to ClickHouse). A
partition is done when no committed record lies at or after the group's committed offset, or, against
a pipeline that keeps running, when the first record still waiting there was published after the
cutoff (the end of the invoiced periods plus the settlement window): whatever arrives later is a late
event and reaches a later invoice as an adjustment.

Committed offsets stop before a transaction's commit marker, so "done" is decided by reading from the
committed offset (read_committed) until a record or the partition's end, not by comparing offsets.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from pipeline.offsets import committed_offsets
from pipeline.settings import Settings


def ledger_lag(
    settings: Settings,
    bootstrap: str,
    cutoff: datetime,
    timeout: float = 20.0,
    *,
    worker: bool = True,
    sink: bool = True,
) -> list[str]:
    """Descriptions of the partitions the ledger still lacks (empty when complete): those of the
    worker's inputs and the sink's, or only one of them. Raises KafkaException when the cluster cannot
    be asked."""
    topics = settings.topics
    groups = {
        settings.app_id: topics.inputs if worker else (),
        f"{settings.app_id}-ledger": topics.ledger_inputs if sink else (),
    }
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap}
    admin = AdminClient(conf)
    meta = admin.list_topics(timeout=10)
    start: dict[tuple[str, int], int] = {}
    owner: dict[tuple[str, int], str] = {}
    for group, names in groups.items():
        tps = [(name, p) for name in names if name in meta.topics for p in meta.topics[name].partitions]
        committed = committed_offsets(bootstrap, group, tps)
        for key in tps:
            # No commit yet: everything from the beginning is still to do.
            start[key] = max(committed.get(key, -1), 0)
            owner[key] = "worker" if group == settings.app_id else "ledger sink"
    return _waiting(bootstrap, start, owner, cutoff, timeout)


def _waiting(
    bootstrap: str,
    start: dict[tuple[str, int], int],
    owner: dict[tuple[str, int], str],
    cutoff: datetime,
    timeout: float,
) -> list[str]:
    first = first_waiting(bootstrap, start, timeout)
    lagging = [
        f"{t}/{p} (the {owner[(t, p)]} is at offset {start[(t, p)]})"
        for (t, p), ts_ms in first.items()
        if ts_ms is not None and datetime.fromtimestamp(ts_ms / 1000, UTC) <= cutoff
    ]
    lagging += [f"{t}/{p} (no answer from the broker)" for t, p in start if (t, p) not in first]
    return sorted(lagging)


def first_waiting(
    bootstrap: str, start: dict[tuple[str, int], int], timeout: float
) -> dict[tuple[str, int], int | None]:
    """Per partition, the timestamp (ms) of the first committed record at or after its offset in
    ``start``, or None when nothing waits there; a partition the broker did not answer for within
    ``timeout`` is left out. Raises KafkaException on an error of the cluster."""
    if not start:
        return {}
    peek = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "callmeter-completeness-peek",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "log_level": 0,
            "error_cb": lambda _e: None,
        }
    )
    try:
        peek.assign([TopicPartition(t, p, offset) for (t, p), offset in start.items()])
        found: dict[tuple[str, int], int | None] = {}
        deadline = time.monotonic() + timeout
        while len(found) < len(start) and time.monotonic() < deadline:
            msg = peek.poll(0.5)
            if msg is None:
                continue
            key = (str(msg.topic()), int(msg.partition() or 0))
            if key not in start or key in found:
                continue
            err = msg.error()
            if err is not None and err.code() != KafkaError._PARTITION_EOF:
                raise KafkaException(err)
            peek.pause([TopicPartition(*key)])
            found[key] = None if err is not None else msg.timestamp()[1]
        return found
    finally:
        peek.close()
