"""ClickHouse refusing inserts for a while. The sink retries without committing anything early,
the stream worker goes on, and once the ledger takes writes again every event is there exactly once.

The outage is real: the embedded ClickHouse's table directories are made immutable (``chattr +i``, which
holds for root too), so each insert fails in ClickHouse itself creating its part directory.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.cli import callmeter, ledger_query, worker_in_background, worker_stats
from tests.integration.eventfiles import prov, write_events
from tests.integration.test_faults_e2e import _month, assert_every_event_once

# chattr comes with e2fsprogs (essential on Debian); the test runs wherever make chaos does.
pytestmark = [pytest.mark.integration, pytest.mark.chaos]

_TABLES = "('rated_calls', 'raw_events', 'provisioning_events', 'dead_letters')"


def _chattr(flag: str, paths: list[str]) -> None:
    subprocess.run(["chattr", flag, *paths], check=True, capture_output=True)


def test_sink_rides_out_a_ledger_that_refuses_inserts(cm_env: dict[str, str], tmp_path: Path) -> None:
    # A first run creates the ledger's tables.
    warmup = prov(
        "w", "warm", "2026-10-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE"
    )
    callmeter(cm_env, "produce", str(write_events(tmp_path / "warmup.jsonl", [warmup])))
    worker_stats(cm_env)
    query = f"SELECT data_paths FROM system.tables WHERE name IN {_TABLES}"
    paths = [path for (found,) in ledger_query(cm_env, query) for path in found]
    assert len(paths) == 4, paths

    events = _month(tmp_path, seed=404)
    # The warm-up event is part of the month (sent again: a duplicate), so the counts cover it.
    events.write_text(events.read_text() + json.dumps(warmup) + "\n")
    callmeter(cm_env, "produce", str(events))
    log = tmp_path / "worker.log"
    _chattr("+i", paths)
    try:
        proc = worker_in_background(cm_env, log)
        deadline = time.monotonic() + 120
        while "ledger insert failed" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the sink never tried to write"
            time.sleep(0.5)
        time.sleep(15)  # the outage goes on; the worker must neither give up nor commit the batch
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
    finally:
        _chattr("-i", paths)
    try:
        assert proc.wait(timeout=600) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    assert "restarting" not in log.read_text(errors="replace")
    assert_every_event_once(cm_env, events, produced_before=1)  # the warm-up event, produced twice
