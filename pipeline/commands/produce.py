"""`callmeter produce`: publish JSON-lines events to their topics, keyed by tenant, in file order."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaException, Producer

from pipeline.errors import InputError, PipelineError
from pipeline.settings import Settings
from schemas.errors import SerdeError
from schemas.json_events import parse_json_event
from schemas.serde import Serde


class _TransientKafkaWarnings(logging.Filter):
    """librdkafka warns while a brand-new cluster's coordinator loads ("Coordinator load in progress:
    retrying") and retries by itself; a user producing to a fresh broker has nothing to do about it.
    Anything else the client logs still reaches stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage().lower()
        return not (
            "retrying" in text and ("load in progress" in text or "coordinator not available" in text)
        )


KAFKA_LOG = logging.getLogger("callmeter.kafka")
KAFKA_LOG.addFilter(_TransientKafkaWarnings())


def producer_config(bootstrap: str) -> dict[str, Any]:
    return {
        "bootstrap.servers": bootstrap,
        "logger": KAFKA_LOG,
        # Idempotence keeps per-partition order through retries, so "file order per tenant" holds.
        "enable.idempotence": True,
        # The Java client's partitioner: every producer of calls and provisioning must hash tenants
        # the same way or a tenant's two streams land on different partition numbers.
        "partitioner": "murmur2_random",
        "linger.ms": 20,
        "compression.type": "lz4",
        "queue.buffering.max.messages": 500000,
    }


def read_events(path: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """Yield (line number, record name, record) for every non-blank line; InputError names the line."""
    try:
        handle = path.open(encoding="utf-8")
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror or exc}"
        raise InputError(msg) from exc
    with handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                msg = f"{path}:{lineno}: not valid JSON ({exc.msg})"
                raise InputError(msg) from exc
            if not isinstance(obj, dict):
                msg = f"{path}:{lineno}: expected a JSON object"
                raise InputError(msg)
            try:
                name, record = parse_json_event(obj)
            except SerdeError as exc:
                msg = f"{path}:{lineno}: {exc.message}"
                raise InputError(msg) from exc
            yield lineno, name, record


class EventPublisher:
    """Encodes and publishes events; raises PipelineError when any delivery failed."""

    def __init__(self, settings: Settings, bootstrap: str, serde: Serde) -> None:
        self.topics = settings.topics
        self.serde = serde
        self.producer = Producer(producer_config(bootstrap))
        self.sent: Counter[str] = Counter()
        self.failures: list[str] = []

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.failures.append(str(err))

    def publish(self, name: str, record: dict[str, Any]) -> None:
        topic = self.topics.calls if name == "CallRecord" else self.topics.provisioning
        self.publish_raw(topic, record["tenant_id"].encode(), self.serde.encode(name, record, topic))
        self.sent[topic] += 1

    def publish_raw(self, topic: str, key: bytes | None, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(topic, key=key, value=value, on_delivery=self._on_delivery)
                break
            except BufferError:
                self.producer.poll(0.1)
        self.producer.poll(0)

    def close(self) -> None:
        try:
            remaining = self.producer.flush(60)
        except KafkaException as exc:
            msg = f"produce failed: {exc}"
            raise PipelineError(msg) from exc
        if remaining:
            msg = f"{remaining} events not delivered within 60 s"
            raise PipelineError(msg)
        if self.failures:
            msg = f"{len(self.failures)} events not delivered: {self.failures[0]}"
            raise PipelineError(msg)


def produce_files(settings: Settings, bootstrap: str, serde: Serde, paths: list[Path]) -> Counter[str]:
    # Validate every file completely first: a bad line aborts before anything is published, so a
    # corrected file can simply be produced again (and a partial publish never happens).
    for path in paths:
        for _ in read_events(path):
            pass
    publisher = EventPublisher(settings, bootstrap, serde)
    for path in paths:
        for _lineno, name, record in read_events(path):
            publisher.publish(name, record)
    publisher.close()
    return publisher.sent
