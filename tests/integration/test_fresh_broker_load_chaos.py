"""`make chaos`: the first day. A brand-new broker, both cores busy with other work, and the
worker's first start on it (topics, changelogs and the leader topic created from nothing) while a
generated month waits. Before the internal topics were created up front, this crash-looped the agent
for minutes and lost calls. Uses a broker of its own, not the session's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.local.broker import LocalKafka
from pipeline.settings import Settings
from tests.conftest import pipeline_env
from tests.integration.cli import callmeter, worker_stats
from tests.integration.test_faults_e2e import _month, assert_every_event_once

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def test_first_start_on_a_new_broker_under_cpu_load(tmp_path: Path) -> None:
    burners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)
    ]
    broker = LocalKafka(Settings(data_dir=tmp_path / "kafka", kafka=None))
    try:
        env = pipeline_env(broker.up(), "first.", tmp_path / "data")
        events = _month(tmp_path, seed=505)
        callmeter(env, "produce", str(events))
        stats = worker_stats(env)
        for burner in burners:
            burner.kill()
        assert_every_event_once(env, events)
        assert stats["rated"] > 0
        assert worker_stats(env)["rated"] == 0
    finally:
        for burner in burners:
            burner.kill()
        broker.down()
