"""The local Kafka broker (pipeline/local/broker.py) against a real broker: lifecycle, topics,
transactions."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from uuid import uuid4

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.errors import BrokerError
from pipeline.local.broker import LocalKafka
from pipeline.local.cluster import bootstrap_servers
from pipeline.settings import Settings
from pipeline.topics import ensure_topics

pytestmark = pytest.mark.integration


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", **kw)  # type: ignore[arg-type]


def _partition_counts(bootstrap: str, topics: list[str]) -> dict[str, int]:
    md = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=15)
    return {t: len(md.topics[t].partitions) for t in topics if t in md.topics}


def _consume_all(
    bootstrap: str, topic: str, expected: int, *, isolation: str, timeout: float = 30
) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": isolation,
        }
    )
    values: list[bytes] = []
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(values) < expected:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    continue
                raise AssertionError(msg.error())
            values.append(msg.value())
        # Give unexpected extra records (e.g. aborted ones leaking through) a chance to show up.
        end = time.monotonic() + 2
        while time.monotonic() < end:
            msg = consumer.poll(0.2)
            if msg is not None and not msg.error():
                values.append(msg.value())
    finally:
        consumer.close()
    return values


def test_up_is_idempotent(local_kafka: LocalKafka | None, kafka_bootstrap: str) -> None:
    if local_kafka is None:
        pytest.skip("CALLMETER_KAFKA points at an external cluster")
    before = local_kafka.status()
    again = LocalKafka(local_kafka.settings)  # e.g. a second `callmeter up` in another process
    assert again.up() == kafka_bootstrap
    after = again.status()
    assert after["pid"] == before["pid"]
    assert after["running"] and after["answering"]
    assert bootstrap_servers(local_kafka.settings) == kafka_bootstrap
    assert Path(after["log"]).is_file()


def test_ensure_topics_creates_all_and_is_idempotent(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = Settings(kafka=kafka_bootstrap, topic_prefix=topic_prefix, partitions=3)
    ensure_topics(settings, kafka_bootstrap)
    assert _partition_counts(kafka_bootstrap, settings.topics.all) == dict.fromkeys(settings.topics.all, 3)
    ensure_topics(settings, kafka_bootstrap)  # second run: nothing to do, no error
    assert _partition_counts(kafka_bootstrap, settings.topics.all) == dict.fromkeys(settings.topics.all, 3)
    assert bootstrap_servers(settings) == kafka_bootstrap


def test_ensure_topics_keeps_inputs_copartitioned(kafka_bootstrap: str, topic_prefix: str) -> None:
    settings = Settings(kafka=kafka_bootstrap, topic_prefix=topic_prefix, partitions=3)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(settings.topics.calls, 2, 1)])[settings.topics.calls].result()
    ensure_topics(settings, kafka_bootstrap)  # provisioning follows calls' count
    counts = _partition_counts(kafka_bootstrap, settings.topics.all)
    assert counts[settings.topics.calls] == counts[settings.topics.provisioning] == 2
    assert counts[settings.topics.rated] == 3


def test_ensure_topics_rejects_inputs_with_different_partition_counts(
    kafka_bootstrap: str, topic_prefix: str
) -> None:
    settings = Settings(kafka=kafka_bootstrap, topic_prefix=topic_prefix, partitions=3)
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    futures = admin.create_topics(
        [NewTopic(settings.topics.calls, 2, 1), NewTopic(settings.topics.provisioning, 4, 1)]
    )
    for f in futures.values():
        f.result()
    with pytest.raises(BrokerError, match="co-partitioned"):
        ensure_topics(settings, kafka_bootstrap)


def test_transactional_produce_read_committed(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = f"{topic_prefix}txn"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result()
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"{topic_prefix}tx"})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, b"aborted")
    producer.flush(10)
    producer.abort_transaction(30)
    producer.begin_transaction()
    producer.produce(topic, b"committed-1")
    producer.produce(topic, b"committed-2")
    producer.commit_transaction(30)

    assert _consume_all(kafka_bootstrap, topic, 2, isolation="read_committed") == [
        b"committed-1",
        b"committed-2",
    ]
    assert b"aborted" in _consume_all(kafka_bootstrap, topic, 3, isolation="read_uncommitted")


def test_down_then_up_keeps_data(tmp_path: Path) -> None:
    # Its own broker and data dir: the session broker keeps serving the other tests.
    settings = _settings(tmp_path)
    broker = LocalKafka(settings)
    try:
        bootstrap = broker.up()
        first = broker.status()
        topic = "persisted"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result()
        producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
        producer.produce(topic, b"survives restarts")
        assert producer.flush(15) == 0

        assert broker.down() is True
        assert not broker.status()["running"]
        with pytest.raises(BrokerError, match="no local broker running"):
            bootstrap_servers(settings)
        assert broker.down() is False  # already down

        assert LocalKafka(settings).up() == bootstrap  # same ports again when free
        second = broker.status()
        assert second["pid"] != first["pid"]
        assert second["cluster_id"] == first["cluster_id"]
        assert _consume_all(bootstrap, topic, 1, isolation="read_committed") == [b"survives restarts"]
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "x"})
        try:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        finally:
            consumer.close()
        assert (low, high) == (0, 1)
    finally:
        broker.down()
    assert not broker.status()["running"]


def test_missing_java_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    broker = LocalKafka(_settings(tmp_path))
    with pytest.raises(BrokerError, match=r"Java 17\+ is required .*'java' not found on PATH"):
        broker.up()
    assert not broker.status()["running"]


def test_missing_maven_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An uncached version needs Maven; with only java on PATH the fetch must fail clearly.
    java = Path(os.path.realpath(_which("java")))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(java)
    monkeypatch.setenv("PATH", str(bin_dir))
    broker = LocalKafka(_settings(tmp_path, cache_dir=tmp_path / "cache"))
    with pytest.raises(BrokerError, match="'mvn' not found on PATH"):
        broker.up()


def test_unresolvable_kafka_version_reports_maven_error(tmp_path: Path) -> None:
    broker = LocalKafka(_settings(tmp_path, cache_dir=tmp_path / "cache", kafka_version="0.0.0-nope"))
    with pytest.raises(BrokerError, match=r"Maven could not fetch Kafka 0\.0\.0-nope: .*kafka_2\.13"):
        broker.fetch()
    assert not broker.fetched


def _which(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        # The Makefile requires Java and Maven; a machine without them must fail here, not skip.
        pytest.fail(f"{name} not installed: the local broker needs it")
    return found
