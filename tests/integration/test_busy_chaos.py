"""`make chaos` scenarios that must hold on a busy machine too (`make chaos-busy`, tests/busy.py).

Each runs a generated month through `callmeter worker --until-idle` with a fault injected from
outside, as an operator or the host would: a SIGKILL storm, the worker's local state lost and the
events resent, a zombie (a worker frozen 40 s and resumed), the broker killed and brought back, and two
pipelines started side by side on one broker. Each must end with exit 0, every event rated,
dead-lettered or counted a duplicate once, invoices equal to rating/'s batch computation, and at
most one restart per injected fault: none where nothing was injected, and never giving up. With the
load average at 4-8x the cores these failed before (docs/decisions.md, "A busy machine").
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.commands.simulate import SimulationConfig, write_file
from pipeline.local.broker import LocalKafka
from pipeline.offsets import GroupOffsets
from pipeline.settings import Settings
from tests.busy import restarts
from tests.conftest import pipeline_env
from tests.integration.cli import callmeter, worker_in_background, worker_stats
from tests.integration.test_faults_e2e import assert_every_event_once
from tests.integration.test_rebalance_e2e import _stream_children

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.timeout(3600)]

RUN_SECONDS = 1800  # a run's bound on a busy machine: minutes, not the 5 of a quiet one


def _events(tmp_path: Path, seed: int, calls: int = 6000) -> Path:
    events = tmp_path / "events.jsonl"
    write_file(
        SimulationConfig(tenants=4, calls=calls, duplicate_rate=0.03, invalid_rate=0.01, seed=seed), events
    )
    return events


def _two_processes(env: dict[str, str]) -> dict[str, str]:
    return dict(env, CALLMETER_PARTITIONS="6", CALLMETER_WORKER_PROCESSES="2")


def _finish(proc: subprocess.Popen[bytes], log: Path) -> str:
    """Wait for a background `worker --until-idle`; its stderr, after checking it succeeded."""
    try:
        out, _ = proc.communicate(timeout=RUN_SECONDS)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    assert "giving up" not in text, text[-4000:]
    assert json.loads(out.decode().strip().splitlines()[-1])["consumed"], out
    return text


def _wait_for_first_commit(env: dict[str, str], proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the stream workers have committed input on the calls topic (read from outside the group)."""
    settings = Settings(kafka=env["CALLMETER_KAFKA"], topic_prefix=env["CALLMETER_TOPIC_PREFIX"])
    tps = [(settings.topics.calls, p) for p in range(int(env["CALLMETER_PARTITIONS"]))]
    reader = GroupOffsets(env["CALLMETER_KAFKA"], settings.app_id)
    try:
        deadline = time.monotonic() + RUN_SECONDS
        while not any(offset > 0 for offset in reader.committed(tps).values()):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "no input committed"
            time.sleep(0.5)
    finally:
        reader.close()


def _nothing_left(env: dict[str, str]) -> None:
    before = json.loads(callmeter(env, "ledger").stdout)
    assert worker_stats(env)["rated"] == 0
    assert json.loads(callmeter(env, "ledger").stdout) == before


def test_sigkill_storm(cm_env: dict[str, str], tmp_path: Path) -> None:
    """Four times, a random stream worker process is killed -9 while two share the partitions: each
    kill is one restart of that process, and nothing else restarts."""
    env = _two_processes(cm_env)
    events = _events(tmp_path, seed=271)
    callmeter(env, "produce", str(events))
    log = tmp_path / "worker.log"
    proc = worker_in_background(env, log)
    rng = random.Random(271)
    kills = 0
    while proc.poll() is None and kills < 4:
        time.sleep(rng.uniform(8.0, 15.0))
        children = _stream_children(proc.pid)
        if children and proc.poll() is None:
            os.kill(rng.choice(children), signal.SIGKILL)
            kills += 1
    text = _finish(proc, log)
    assert kills >= 2, f"the run ended after {kills} kill(s); make the month longer"
    assert restarts(text) <= kills, text[-4000:]
    assert_every_event_once(env, events)
    _nothing_left(env)


def test_state_loss_and_resend(cm_env: dict[str, str], tmp_path: Path) -> None:
    """The workers' local state is lost (a new host) and the gateways resend every event: the tables
    are rebuilt from their changelogs without a restart, and every resent event is a duplicate."""
    env = _two_processes(cm_env)
    events = _events(tmp_path, seed=272)
    callmeter(env, "produce", str(events))
    first = tmp_path / "first.log"
    _finish(worker_in_background(env, first), first)
    for state in Path(env["CALLMETER_DATA_DIR"]).glob("worker*"):
        if state.is_dir():
            shutil.rmtree(state)
    callmeter(env, "produce", str(events))
    log = tmp_path / "worker.log"
    text = _finish(worker_in_background(env, log), log)
    assert restarts(text) == 0, text[-4000:]
    assert "changelog recovery incomplete" not in text
    assert_every_event_once(env, events, produced_before=len(events.read_text().splitlines()))


def test_zombie_worker_frozen_and_resumed(cm_env: dict[str, str], tmp_path: Path) -> None:
    """A stream worker process is frozen (SIGSTOP) for 40 s, long past its session: the other takes
    its partitions. Resumed, the zombie must not commit anything its successor redid; at most it
    restarts once."""
    env = _two_processes(cm_env)
    events = _events(tmp_path, seed=273, calls=15000)
    callmeter(env, "produce", str(events))
    log = tmp_path / "worker.log"
    proc = worker_in_background(env, log)
    # Frozen once work is under way, however fast this machine is: a fixed delay froze a worker
    # that had already finished on a quiet machine, and one that had not started on a busy one.
    _wait_for_first_commit(env, proc, log)
    children = _stream_children(proc.pid)
    assert children and proc.poll() is None, log.read_text(errors="replace")[-3000:]
    zombie = random.Random(273).choice(children)
    os.kill(zombie, signal.SIGSTOP)
    try:
        time.sleep(40)
    finally:
        os.kill(zombie, signal.SIGCONT)
    text = _finish(proc, log)
    assert restarts(text) <= 1, text[-4000:]
    assert_every_event_once(env, events)
    _nothing_left(env)


def test_broker_bounce(tmp_path: Path) -> None:
    """The broker is killed (-9) under a running worker and is back 15 s later: the worker rides it
    out, restarting at most once."""
    broker = LocalKafka(Settings(data_dir=tmp_path / "kafka", kafka=None))
    bootstrap = broker.up()
    try:
        env = pipeline_env(bootstrap, "bounce.", tmp_path / "data")
        events = _events(tmp_path, seed=274, calls=9000)
        callmeter(env, "produce", str(events))
        log = tmp_path / "worker.log"
        proc = worker_in_background(env, log)
        time.sleep(20)
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        os.kill(int(broker._read_state()["pid"]), signal.SIGKILL)
        time.sleep(15)
        assert broker.up() == bootstrap  # same address: the clients reconnect by themselves
        text = _finish(proc, log)
        assert restarts(text) <= 1, text[-4000:]
        assert_every_event_once(env, events)
        _nothing_left(env)
    finally:
        broker.down()


def test_two_pipelines_start_side_by_side(
    kafka_bootstrap: str, tmp_path: Path, cm_env: dict[str, str]
) -> None:
    """Two pipelines (their own topics, groups and ledgers) start at the same moment on one broker,
    each with two stream worker processes and a sink: nothing is injected, so nothing restarts."""
    runs = []
    for name, seed in (("a", 275), ("b", 276)):
        prefix = f"{cm_env['CALLMETER_TOPIC_PREFIX']}{name}."
        env = _two_processes(pipeline_env(kafka_bootstrap, prefix, tmp_path / name / "data"))
        (tmp_path / name).mkdir(exist_ok=True)
        events = _events(tmp_path / name, seed=seed)
        callmeter(env, "produce", str(events))
        runs.append((env, events, tmp_path / name / "worker.log"))
    procs = [worker_in_background(env, log) for env, _events_file, log in runs]
    texts = [_finish(proc, log) for proc, (_env, _events_file, log) in zip(procs, runs, strict=True)]
    for text in texts:
        assert restarts(text) == 0, text[-4000:]
        assert "never handled" not in text
    for env, events, _log in runs:
        assert_every_event_once(env, events)
