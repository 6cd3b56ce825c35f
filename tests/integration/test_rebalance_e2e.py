"""Several worker processes in one consumer group, joining and leaving while they process.

`callmeter worker` with ``CALLMETER_WORKER_PROCESSES`` = N runs N stream workers and one ledger sink
process. Every join or departure is a rebalance, which under Faust's exactly_once lost state before
the worker committed ahead of each revocation and asked the broker for changelog ends
(pipeline/stream/guard.py, pipeline/stream/runner.py). Every invoice must still equal rating/'s batch
computation and every event be rated, dead-lettered or a duplicate exactly once.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.cli import callmeter, ledger_report, worker_in_background, worker_stats
from tests.integration.test_faults_e2e import _month, assert_every_event_once

pytestmark = pytest.mark.integration


def _stream_children(supervisor: int) -> list[int]:
    """Pids of the supervisor's stream worker processes (not the sink)."""
    out = subprocess.run(["pgrep", "-P", str(supervisor)], capture_output=True, text=True, check=False)
    pids = []
    for pid in (int(p) for p in out.stdout.split()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"CALLMETER_WORKER_ROLE=stream" in environ:
            pids.append(pid)
    return pids


@pytest.mark.chaos
def test_two_worker_processes_share_the_partitions_exactly_once(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(cm_env, CALLMETER_PARTITIONS="6", CALLMETER_WORKER_PROCESSES="2")
    events = _month(tmp_path, seed=202)
    callmeter(env, "produce", str(events))
    stats = worker_stats(env)
    report = assert_every_event_once(env, events)
    assert stats["rated"] == report["rated_calls"]
    assert stats["duplicates_in_ledger"] == {}
    # Again with the same processes' state: nothing new.
    before = ledger_report(env)
    assert worker_stats(env)["rated"] == 0
    assert ledger_report(env) == before


@pytest.mark.chaos
def test_rebalance_storm_three_processes_killed_and_rejoining(cm_env: dict[str, str], tmp_path: Path) -> None:
    env = dict(cm_env, CALLMETER_PARTITIONS="6", CALLMETER_WORKER_PROCESSES="3")
    events = _month(tmp_path, seed=303)
    callmeter(env, "produce", str(events))
    log = tmp_path / "worker.log"
    rng = random.Random(303)
    proc = worker_in_background(env, log)
    kills = 0
    try:
        # Each kill -9 leaves the group (after the session timeout) and the supervisor's replacement
        # joins again: two rebalances per kill, while the others keep processing.
        while proc.poll() is None and kills < 4:
            time.sleep(rng.uniform(3.0, 8.0))
            children = _stream_children(proc.pid)
            if children and proc.poll() is None:
                os.kill(rng.choice(children), signal.SIGKILL)
                kills += 1
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert kills >= 2, f"the run ended after {kills} kill(s); make the month longer"
    assert "restarting" in text
    assert_every_event_once(env, events)
    assert out.decode().strip()
    before = ledger_report(env)
    assert worker_stats(env)["rated"] == 0
    assert ledger_report(env) == before
