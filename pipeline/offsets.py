"""Committed offsets of a consumer group, read without joining it.

Through ``Consumer.committed`` rather than ``AdminClient.list_consumer_group_offsets``: on a brand-new
cluster (the group coordinator still loading) the admin call crashed the whole process with a
segmentation fault inside the client library (confluent-kafka 2.16.1, seen on first start), which no
``except`` can catch.
"""

from __future__ import annotations

import time
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

_NOT_READY = {
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
}


class GroupOffsets:
    def __init__(self, bootstrap: str, group: str) -> None:
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "enable.auto.commit": False,
            "log_level": 0,
        }
        self._consumer = Consumer(conf)

    def committed(self, tps: list[tuple[str, int]], timeout: float = 30.0) -> dict[tuple[str, int], int]:
        """(topic, partition) -> committed offset; -1 where the group has committed nothing."""
        if not tps:
            return {}
        deadline = time.monotonic() + timeout
        while True:
            try:
                result = self._consumer.committed([TopicPartition(t, p) for t, p in tps], timeout=timeout)
                break
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                # A new cluster's group coordinator takes a moment to load: that is not an answer yet.
                if not isinstance(err, KafkaError) or err.code() not in _NOT_READY:
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        return {(str(tp.topic), int(tp.partition)): (tp.offset if tp.offset >= 0 else -1) for tp in result}

    def close(self) -> None:
        self._consumer.close()


def committed_offsets(bootstrap: str, group: str, tps: list[tuple[str, int]]) -> dict[tuple[str, int], int]:
    reader = GroupOffsets(bootstrap, group)
    try:
        return reader.committed(tps)
    finally:
        reader.close()
