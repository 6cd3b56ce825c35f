"""`make chaos`: a 3-broker KRaft cluster on loopback (replication 3, min ISR 2) loses a broker
(kill -9) in the middle of a run and gets it back later. Partition leaders, the group coordinator and
the transaction coordinators move; the worker must go on and end with every event once. Uses a cluster
of its own (`callmeter up --brokers 3`), not the session's broker."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from pipeline.commands.simulate import SimulationConfig, write_file
from pipeline.local.cluster import LocalKafkaCluster
from pipeline.settings import Settings
from tests.conftest import pipeline_env
from tests.integration.cli import callmeter, worker_in_background, worker_stats
from tests.integration.test_faults_e2e import assert_every_event_once

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def test_worker_rides_out_losing_one_broker_of_three(tmp_path: Path) -> None:
    cluster = LocalKafkaCluster(Settings(data_dir=tmp_path / "kafka", kafka=None), 3)
    try:
        env = pipeline_env(cluster.up(), "three.", tmp_path / "data")
        events = tmp_path / "events.jsonl"
        write_file(
            SimulationConfig(tenants=3, calls=8000, duplicate_rate=0.05, invalid_rate=0.01, seed=33), events
        )
        callmeter(env, "produce", str(events))
        log = tmp_path / "worker.log"
        worker = worker_in_background(env, log)
        try:
            time.sleep(12)  # consuming (8,000 calls take it well over half a minute)
            assert worker.poll() is None, log.read_text(errors="replace")[-3000:]
            cluster.kill(2)
            time.sleep(20)  # two brokers carry on: min ISR 2 still holds
            cluster.up()  # the lost broker comes back and catches up
            out, _ = worker.communicate(timeout=600)
        finally:
            if worker.poll() is None:
                worker.send_signal(signal.SIGKILL)
        assert worker.returncode == 0, log.read_text(errors="replace")[-3000:]
        assert out.decode().strip()
        assert_every_event_once(env, events)
        assert worker_stats(env)["rated"] == 0
    finally:
        cluster.down()
