"""Paced load for the latency rows of `make bench` (issue 10: "at 80 % of the sustained rate").

A flood (the simulator producing as fast as it can) keeps the worker's input backlogged, so every
request waits behind it and the figures describe an overloaded worker. ``PacedLoad`` publishes
simulated traffic at a fixed rate from a thread instead. ``freshness_ms`` then reads, for every call
produced during the load, the time from its record being produced to its rated record being sent by
the worker (the moment its balance changed in the worker's state), from the records' own timestamps.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.commands.simulate import SimulationConfig, generate
from pipeline.settings import Settings
from schemas.json_events import parse_json_event
from schemas.serde import Serde

TICK_SECONDS = 0.02


class PacedLoad(threading.Thread):
    """Publishes up to ``max_events`` simulated events at ``rate_per_s`` until stopped."""

    def __init__(
        self, bootstrap: str, settings: Settings, serde: Serde, rate_per_s: float, max_events: int
    ) -> None:
        super().__init__(name="paced-load", daemon=True)
        self.rate_per_s = rate_per_s
        self.stopped = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None
        # murmur2, as gateways and `callmeter produce` partition: the worker finds a tenant's state by it.
        self._producer = Producer(
            {"bootstrap.servers": bootstrap, "linger.ms": 5, "partitioner": "murmur2_random"}
        )
        cfg = SimulationConfig(tenants=20, calls=max_events, seed=9)
        # Encoded before the clock starts, so the pace is not limited by this process's Avro.
        self._records: list[tuple[str, bytes, bytes]] = []
        for event in generate(cfg):
            name, record = parse_json_event(event)
            topic = settings.topics.calls if name == "CallRecord" else settings.topics.provisioning
            key = str(record["tenant_id"]).encode()
            self._records.append((topic, key, serde.encode(name, record, topic)))

    def run(self) -> None:
        try:
            started = time.monotonic()
            while not self.stopped.is_set() and self.sent < len(self._records):
                due = min(len(self._records), int((time.monotonic() - started) * self.rate_per_s) + 1)
                while self.sent < due:
                    topic, key, value = self._records[self.sent]
                    self._producer.produce(topic, key=key, value=value)
                    self.sent += 1
                self._producer.poll(0)
                time.sleep(TICK_SECONDS)
            self._producer.flush(30)
        except BaseException as exc:  # reported by the caller, which owns the run
            self.error = exc

    def achieved_rate(self, seconds: float) -> float:
        return self.sent / seconds if seconds > 0 else 0.0


def freshness_ms(bootstrap: str, settings: Settings, serde: Serde, since_ms: int) -> list[float]:
    """Per call rated since ``since_ms``: its rated record's timestamp minus its input record's (ms)."""
    produced: dict[tuple[int, int], int] = {}
    for msg in _read_all(bootstrap, settings.topics.calls):
        if msg.timestamp()[1] >= since_ms:
            produced[(msg.partition(), msg.offset())] = msg.timestamp()[1]
    out: list[float] = []
    for msg in _read_all(bootstrap, settings.topics.rated):
        if not msg.value():  # the empty records of stream/fencing.py
            continue
        _name, rated = serde.decode(msg.value())
        source = (int(rated["source_partition"]), int(rated["source_offset"]))
        if source in produced:
            out.append(float(msg.timestamp()[1] - produced[source]))
    return out


def _read_all(bootstrap: str, topic: str) -> list[Any]:
    """Every record of ``topic`` as the worker wrote it (read_uncommitted: the balance changed when the
    record was sent, before its transaction committed)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "callmeter-bench-freshness", "enable.auto.commit": False}
    )
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list[Any] = []
        done = {p for p, end in ends.items() if end == 0}
        while len(done) < len(parts):
            msg = consumer.poll(5)
            if msg is None:
                break
            if msg.error():
                continue
            out.append(msg)
            offset, partition = msg.offset(), msg.partition()
            # A transactional topic's last offset is a commit marker, never delivered: poll's timeout
            # ends the read then.
            if offset is not None and partition is not None and offset + 1 >= ends[partition]:
                done.add(partition)
        return out
    finally:
        consumer.close()
