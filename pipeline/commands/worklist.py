"""What a stopped `worker --until-idle` (or `sink --until-idle`) run left undone, for its last line."""

from __future__ import annotations

from datetime import UTC, datetime

from confluent_kafka import TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from pipeline.invoicing.completeness import ledger_lag
from pipeline.local.cluster import bootstrap_servers
from pipeline.offsets import committed_offsets
from pipeline.settings import Settings

_EVER = datetime(9999, 1, 1, tzinfo=UTC)


def work_left(settings: Settings, *, inputs: bool, outputs: bool) -> list[str]:
    """Phrases like "17,001 of 29,089 records of calls not processed yet", empty when nothing is left:
    the worker's inputs (``inputs``) and the sink's (``outputs``). Raises when Kafka cannot be asked."""
    bootstrap = bootstrap_servers(settings)
    left: list[str] = []
    if inputs and ledger_lag(settings, bootstrap, _EVER, sink=False):
        left += _input_records_left(settings, bootstrap)
    if outputs:
        behind = ledger_lag(settings, bootstrap, _EVER, worker=False)
        if behind:
            left.append(f"the ledger sink behind on {len(behind)} partition(s): {', '.join(behind[:3])}")
    return left


def _input_records_left(settings: Settings, bootstrap: str) -> list[str]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    meta = admin.list_topics(timeout=10)
    names = [t for t in settings.topics.inputs if t in meta.topics]
    tps = [TopicPartition(t, p) for t in names for p in meta.topics[t].partitions]
    starts = admin.list_offsets({tp: OffsetSpec.earliest() for tp in tps}, request_timeout=10)
    ends = admin.list_offsets({tp: OffsetSpec.latest() for tp in tps}, request_timeout=10)
    committed = committed_offsets(bootstrap, settings.app_id, [(tp.topic, tp.partition) for tp in tps])
    out = []
    for topic in names:
        total = todo = 0
        for tp in (tp for tp in tps if tp.topic == topic):
            low, high = starts[tp].result().offset, ends[tp].result().offset
            done_to = max(committed.get((tp.topic, tp.partition), -1), low)
            total += high - low
            todo += max(high - done_to, 0)
        if todo:
            out.append(f"{todo:,} of {total:,} records of {topic} not processed yet")
    return out
