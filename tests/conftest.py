"""Shared fixtures: one Kafka broker per test session, isolated topic prefixes per test."""

from __future__ import annotations

import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import pytest

from pipeline.local.broker import LocalKafka
from pipeline.settings import Settings
from tests.busy import busy_mode, hog_count, start_hogs, stop_hogs


@pytest.fixture(scope="session")
def local_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka | None]:
    """The session's own LocalKafka, or None when $CALLMETER_KAFKA points at an existing cluster.

    Its data dir is a session temp dir; the jar cache stays the default (~/.cache/callmeter) so jars are
    fetched once per machine. Stopped at session end.
    """
    if os.environ.get("CALLMETER_KAFKA"):
        yield None
        return
    broker = LocalKafka(Settings(data_dir=tmp_path_factory.mktemp("kafka"), kafka=None))
    try:
        broker.up()
        yield broker
    finally:
        broker.down()


@pytest.fixture(scope="session")
def kafka_bootstrap(local_kafka: LocalKafka | None) -> str:
    """Bootstrap servers for the tests: $CALLMETER_KAFKA if set, else the session's local broker."""
    if local_kafka is None:
        return os.environ["CALLMETER_KAFKA"]
    status = local_kafka.status()
    assert status["running"], status
    return str(status["bootstrap"])


def free_port(span: int = 8) -> int:
    """A loopback port that it and the next ``span - 1`` are free right now (worker i of a run listens
    on port + i), outside the kernel's ephemeral range. An ephemeral port (bind to port 0) was taken by
    some process's outgoing Kafka connection while a killed worker's replacement waited to reuse it:
    make chaos, six failed restarts on "address already in use"."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - span)
        try:
            for port in range(base, base + span):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    msg = "no free loopback port range between 20000 and 32000"
    raise RuntimeError(msg)


@pytest.fixture
def topic_prefix() -> str:
    """A unique topic prefix so tests sharing the broker never see each other's topics or groups."""
    return f"t{uuid4().hex[:8]}."


def pipeline_env(bootstrap: str, topic_prefix: str, data_dir: Path) -> dict[str, str]:
    """Environment for running the `callmeter` CLI in a subprocess against a broker."""
    env = dict(os.environ)
    env.update(
        CALLMETER_KAFKA=bootstrap,
        CALLMETER_TOPIC_PREFIX=topic_prefix,
        CALLMETER_DATA_DIR=str(data_dir),
        CALLMETER_PARTITIONS="3",
        # The fixtures are dated 2026 while dedupe retention is measured against the wall clock (capped
        # event time): keep every key so resending an old file stays a duplicate whenever the suite
        # runs. test_retention_e2e.py sets the real default back on purpose.
        CALLMETER_DEDUPE_RETENTION_DAYS="36500",
        CALLMETER_WORKER_WEB_PORT=str(free_port()),
        # Invoices become final only through --finalize in tests, whatever the date the suite runs on
        # (the fixtures' periods are in 2026; the default settlement window is 48 h after period end).
        CALLMETER_SETTLEMENT_WINDOW_HOURS="876000",
        # The fixtures' periods (October-November 2026) have all ended by then, so tests may finalize
        # them whatever the date; tests of the "period has not ended" refusal set their own clock.
        CALLMETER_CLOCK_NOW="2027-01-15T00:00:00Z",
        # One stream worker process unless a test asks for more (the default is one per core): the
        # crash points, the stats line and the fault scenarios are written against one process.
        CALLMETER_WORKER_PROCESSES="1",
    )
    return env


@pytest.fixture
def cm_env(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> dict[str, str]:
    """Environment for running the `callmeter` CLI in a subprocess against the test broker."""
    return pipeline_env(kafka_bootstrap, topic_prefix, tmp_path / "data")


@pytest.fixture(autouse=True)
def busy_machine(request: pytest.FixtureRequest) -> Iterator[None]:
    """`make chaos-busy` (CALLMETER_CHAOS_BUSY=1): CPU hogs beside every chaos scenario (tests/busy.py)."""
    if not busy_mode() or request.node.get_closest_marker("chaos") is None:
        yield
        return
    hogs = start_hogs(hog_count())
    try:
        yield
    finally:
        stop_hogs(hogs)
