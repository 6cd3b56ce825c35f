"""How a `callmeter worker` run ends: what it counts after restarts, what a stopped run says, and a last
line that names the cause of a failure (pipeline/commands/supervisor.py, childlog.py, runcounts.py).
"""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest

from pipeline.commands.simulate import SimulationConfig, write_file
from pipeline.local.broker import LocalKafka
from pipeline.settings import Settings
from tests.conftest import pipeline_env
from tests.integration.cli import callmeter, worker_in_background
from tests.integration.test_faults_e2e import _month

pytestmark = pytest.mark.integration


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.replace("\x1b[?25h", "").replace("\x1b[?25l", "").splitlines()]
    return [line for line in lines if line][-1]


@pytest.mark.parametrize("crash_at", ["worker-4-state-written:1200:raise", "after-event:900:kill"])
def test_the_summary_counts_the_work_of_processes_that_were_restarted(
    cm_env: dict[str, str], tmp_path: Path, crash_at: str
) -> None:
    """The closing summary summed only what each slot's last process printed: the calls handled and
    committed by a process that then stopped on a fault were missing (23,599 consumed for a run of
    30,600). Every input record is consumed in exactly one committed transaction, so the summary's
    consumed counts add up to the records produced, and its rated count to the ledger's."""
    events = _month(tmp_path, seed=61)
    callmeter(cm_env, "produce", str(events))
    proc = callmeter(dict(cm_env, CALLMETER_CRASH_AT=crash_at), "worker", "--until-idle")
    assert "restarting" in proc.stderr, proc.stderr[-2000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [json.loads(line) for line in events.read_text().splitlines()]
    assert stats["consumed"] == {
        "call": sum(r["type"] == "call" for r in rows),
        "provisioning": sum(r["type"] == "provisioning" for r in rows),
    }
    report = json.loads(callmeter(cm_env, "ledger").stdout)
    assert stats["rated"] == report["rated_calls"]
    assert sum(stats["duplicates"].values()) == report["duplicates"]
    assert sum(stats["dead_letters"].values()) == report["dead_letters"]


def test_until_idle_stopped_by_sigterm_fails_and_says_what_is_left(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    """`worker --until-idle` stopped by SIGTERM exited 0 with input left (12,088 of 29,089 calls rated),
    though it exits 0 only when everything is written. A run that did not finish says so."""
    events = tmp_path / "events.jsonl"
    write_file(SimulationConfig(tenants=3, calls=20000, seed=62), events)
    callmeter(cm_env, "produce", str(events))
    log = tmp_path / "worker.log"
    worker = worker_in_background(cm_env, log)
    try:
        time.sleep(12)  # started, far from done (20,000 calls take it well over a minute)
        worker.send_signal(signal.SIGTERM)
        worker.wait(120)
    finally:
        if worker.poll() is None:
            worker.kill()
    text = log.read_text(errors="replace")
    assert worker.returncode == 1, text[-3000:]
    last = _last_line(text)
    assert last.startswith("callmeter: error: stopped by SIGTERM before the run was done: "), last
    assert re.search(r": [0-9,]+ of 20,[0-9]{3} records of t[0-9a-f]+\.calls not processed yet$", last), last


def test_giving_up_names_the_cause_on_the_last_line(tmp_path: Path) -> None:
    """The broker gone for good: every restart fails on "no local broker running", and the run gives
    up. Its last line said "see the reasons above", with the reason buried under the retries."""
    data = tmp_path / "data"
    broker = LocalKafka(Settings(data_dir=data, kafka=None))
    broker.up()
    try:
        env = pipeline_env("unused", "gone.", data)
        del env["CALLMETER_KAFKA"]  # the local broker of the data dir, as `callmeter up` runs it
        env.update(CALLMETER_WORKER_RESTARTS="2", CALLMETER_STALL_TIMEOUT_SECONDS="5")
        events = tmp_path / "events.jsonl"
        write_file(SimulationConfig(tenants=2, calls=20000, seed=63), events)
        callmeter(env, "produce", str(events))
        log = tmp_path / "worker.log"
        worker = worker_in_background(env, log)
        try:
            time.sleep(12)
            broker.down()
            worker.wait(300)
        finally:
            if worker.poll() is None:
                worker.kill()
    finally:
        broker.down()
    text = log.read_text(errors="replace")
    assert worker.returncode == 1, text[-3000:]
    last = _last_line(text)
    assert last.startswith("callmeter: error: no local broker running"), last
    assert "giving up" in last, last


def test_invoice_while_a_worker_holds_the_embedded_ledger_says_so_in_one_line(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    """`invoice --allow-incomplete` during a run printed chdb's own exception ("Code: 76.
    DB::Exception: Cannot lock file ...") before its line saying which process holds the ledger."""
    from tests.integration.cli import BackgroundWorker

    events = _month(tmp_path, seed=64)
    callmeter(cm_env, "produce", str(events))
    with BackgroundWorker(cm_env):
        out = tmp_path / "out"
        args = ("invoice", "--period", "2026-10", "--out", str(out), "--allow-incomplete")
        proc = callmeter(cm_env, *args, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "DB::Exception" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("callmeter: error:")]
    assert len(errors) == 1 and _last_line(proc.stderr) == errors[0], proc.stderr
    assert "is open in another process" in errors[0], errors
