"""`make chaos`: the broker is killed (-9) under a running worker and comes back 15 s later.

The worker must ride it out: resume, commit, and finish with every call rated or dead-lettered once and
every invoice equal to the batch computation. Uses a broker of its own (it kills it), not the session's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.commands.simulate import SimulationConfig, write_file
from pipeline.invoicing.completeness import ledger_lag
from pipeline.local.broker import LocalKafka
from pipeline.settings import Settings
from tests.conftest import pipeline_env
from tests.integration.cli import callmeter
from tests.integration.test_faults_e2e import assert_every_event_once

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def test_worker_rides_out_a_broker_kill_and_restart(tmp_path: Path) -> None:
    broker = LocalKafka(Settings(data_dir=tmp_path / "kafka", kafka=None))
    bootstrap = broker.up()
    env = pipeline_env(bootstrap, "loss.", tmp_path / "data")
    try:
        events = tmp_path / "events.jsonl"
        write_file(
            SimulationConfig(tenants=3, calls=15000, duplicate_rate=0.05, invalid_rate=0.01, seed=9), events
        )
        callmeter(env, "produce", str(events))
        log = (tmp_path / "worker.log").open("wb")
        worker = subprocess.Popen(
            [sys.executable, "-m", "pipeline", "worker"], env=env, stdout=subprocess.DEVNULL, stderr=log
        )
        try:
            time.sleep(10)  # the worker is consuming (15,000 calls take it well over a minute)
            assert ledger_lag(
                Settings(topic_prefix="loss.", partitions=3), bootstrap, datetime(2100, 1, 1, tzinfo=UTC)
            )
            pid = int(broker._read_state()["pid"])
            os.kill(pid, signal.SIGKILL)
            time.sleep(15)
            assert broker.up() == bootstrap  # same address: the clients reconnect by themselves
            # The same worker process resumes: inputs committed and outputs written to their ends.
            settings = Settings(topic_prefix="loss.", partitions=3)
            far = datetime(2100, 1, 1, tzinfo=UTC)
            deadline = time.monotonic() + 150
            while ledger_lag(settings, bootstrap, far):
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the worker did not resume after the broker came back"
                time.sleep(2)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        stats = json.loads(callmeter(env, "worker", "--until-idle").stdout.strip().splitlines()[-1])
        assert stats["rated"] == 0  # nothing was left for a new run
        assert_every_event_once(env, events)
    finally:
        broker.down()
