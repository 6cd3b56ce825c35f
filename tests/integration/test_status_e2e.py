"""`callmeter status` reports every process of *its* pipeline and nothing else, through the command
line against the real broker and embedded ledger: two pipelines sharing a port, both worker processes
of the default layout and the sink process, a frozen sink (SIGSTOP), a sink whose inserts fail, a new
data dir and a broker that does not answer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.settings import Settings
from tests.conftest import free_port, pipeline_env
from tests.integration.cli import BackgroundWorker, callmeter

pytestmark = pytest.mark.integration


def _simulated(env: dict[str, str], path: Path, seed: int) -> int:
    """Clean traffic (no duplicates, late or invalid events) produced; returns its number of calls."""
    clean = ("--duplicate-rate", "0", "--late-rate", "0", "--invalid-rate", "0")
    callmeter(
        env, "simulate", "--tenants", "8", "--calls", "300", *clean, "--seed", str(seed), "--out", str(path)
    )
    callmeter(env, "produce", str(path))
    return sum(1 for line in path.read_text().splitlines() if json.loads(line)["type"] == "call")


def _status_of(url: str) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{url}/status", timeout=10) as resp:
        body: dict[str, Any] = json.loads(resp.read())
        return body


def _wait_written(env: dict[str, str], calls: int) -> None:
    """Every call rated by the two worker processes and in the ledger."""
    deadline = time.monotonic() + 180
    base = int(env["CALLMETER_WORKER_WEB_PORT"])
    rated: list[int] = []
    written = -1
    while sum(rated) != calls or written != calls:
        assert time.monotonic() < deadline, (rated, written)
        time.sleep(1)
        try:  # process 1 may still be starting when process 0 is ready
            rated = [_status_of(f"http://127.0.0.1:{base + i}")["stats"]["rated"] for i in range(2)]
        except OSError:
            continue
        proc = callmeter(env, "sql", "--format", "json", "SELECT count() AS n FROM rated_calls")
        written = json.loads(proc.stdout)[0]["n"]


def _holder_pid(env: dict[str, str]) -> int:
    """The process holding the embedded ledger: the sink process (it announces its query port)."""
    return int(json.loads((Path(env["CALLMETER_DATA_DIR"]) / "clickhouse.query.json").read_text())["pid"])


def _healthy(env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    deadline = time.monotonic() + timeout
    while (proc := callmeter(env, "status", check=False)).returncode != 0:
        assert time.monotonic() < deadline, proc.stdout + proc.stderr
        time.sleep(2)
    return proc


def _unhealthy_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stdout.rstrip("\n").splitlines()[-1]
    assert last.startswith("UNHEALTHY: "), proc.stdout
    return last


def test_status_counts_only_its_own_pipeline_on_a_shared_port(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    port = str(free_port())
    theirs = f"{topic_prefix[:-1]}-other."
    mine = dict(pipeline_env(kafka_bootstrap, topic_prefix, tmp_path / "a"), CALLMETER_WORKER_WEB_PORT=port,
                CALLMETER_WORKER_PROCESSES="2")  # fmt: skip
    other = dict(pipeline_env(kafka_bootstrap, theirs, tmp_path / "b"), CALLMETER_WORKER_WEB_PORT=port,
                 CALLMETER_WORKER_PROCESSES="2")  # fmt: skip
    calls = _simulated(other, tmp_path / "b.jsonl", seed=7)
    sink_url = f"http://127.0.0.1:{int(port) + 2}"
    with BackgroundWorker(other):  # the other pipeline's two worker processes and its sink hold the ports
        _wait_written(other, calls)
        per_process = [_status_of(f"http://127.0.0.1:{int(port) + i}")["stats"]["rated"] for i in range(2)]
        assert all(per_process), per_process  # both processes rated calls: the sum is not one of them

        # This pipeline (a new data dir, no worker): none of the answers on its ports is counted.
        proc = callmeter(mine, "status", check=False)
        assert "Traceback" not in proc.stderr and proc.stderr == "", proc.stderr
        unhealthy = _unhealthy_line(proc)
        other_app = Settings(topic_prefix=theirs).app_id
        for i in range(3):
            assert (
                f"not counted: http://127.0.0.1:{int(port) + i} is answered by pipeline {other_app}"
                in proc.stdout
            )
        assert "worker: DOWN" in proc.stdout
        assert f"rated {calls}" not in proc.stdout and "dead letters in the last 5 minutes" not in unhealthy
        assert "no worker process of this pipeline answering" in unhealthy
        # A new data dir: an empty ledger, said so, and not created by looking at it.
        assert (
            f"ledger: empty: nothing written yet (no ledger at {tmp_path / 'a' / 'clickhouse'})"
            in proc.stdout
        )
        assert "UNKNOWN_TABLE" not in proc.stdout
        assert not (tmp_path / "a" / "clickhouse").exists()

        # The other pipeline's own status: both processes summed, its sink process, HEALTHY.
        proc = _healthy(other)
        assert "worker processes: 2 of 2 answering" in proc.stdout, proc.stdout
        assert f"since start: rated {calls}, duplicates 0, dead letters by reason none" in proc.stdout
        for i, rated in enumerate(per_process):
            assert f"  process {i}  http://127.0.0.1:{int(port) + i}  pid " in proc.stdout
            assert f"rated {rated}\n" in proc.stdout
        assert f"ledger sink: ledger sink process 2 at {sink_url}, pid " in proc.stdout
        assert "outputs waiting to be written: none" in proc.stdout
        assert f"ledger: {calls} rated calls" in proc.stdout
        assert "not counted" not in proc.stdout and proc.stdout.rstrip().endswith("HEALTHY")


def test_status_names_a_frozen_sink(cm_env: dict[str, str], tmp_path: Path) -> None:
    env = dict(cm_env, CALLMETER_WORKER_PROCESSES="2")
    calls = _simulated(env, tmp_path / "events.jsonl", seed=11)
    sink_url = f"http://127.0.0.1:{int(env['CALLMETER_WORKER_WEB_PORT']) + 2}"
    with BackgroundWorker(env):
        _wait_written(env, calls)
        _healthy(env)
        sink_pid = _holder_pid(env)
        os.kill(sink_pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            proc = callmeter(env, "status", check=False, timeout=120)
            took = time.monotonic() - started
        finally:
            os.kill(sink_pid, signal.SIGCONT)
        unhealthy = _unhealthy_line(proc)
        assert f"ledger sink (ledger sink process 2 at {sink_url}) does not answer within 3 s" in unhealthy
        assert "worker processes: 2 of 2 answering" in proc.stdout
        assert "ledger: not read: the process holding it (ledger sink process 2" in proc.stdout
        assert took < 45, took
        _healthy(env)  # the sink runs again


@pytest.mark.chaos
def test_status_is_unhealthy_while_the_sink_fails_every_insert(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    """The ledger's table directories made immutable (as in test_ledger_outage_e2e.py): every insert
    fails in ClickHouse itself while the sink retries; status says so at once, not after 5 minutes."""
    calls = _simulated(cm_env, tmp_path / "first.jsonl", seed=3)
    with BackgroundWorker(cm_env) as worker:
        worker.wait_for(lambda s: s["stats"]["rated"] == calls, "first calls rated")
        _healthy(cm_env)
        query = "SELECT data_paths FROM system.tables WHERE name IN ('rated_calls', 'raw_events')"
        paths = [p for (found,) in _query_through(cm_env, query) for p in found]
        subprocess.run(["chattr", "+i", *paths], check=True)
        try:
            _simulated(cm_env, tmp_path / "second.jsonl", seed=4)
            deadline = time.monotonic() + 120
            while worker.log.read_text(errors="replace").count("ledger insert failed") < 2:
                assert time.monotonic() < deadline, "the sink never failed an insert"
                time.sleep(0.5)
            proc = callmeter(cm_env, "status", check=False)
        finally:
            subprocess.run(["chattr", "-i", *paths], check=True)
        unhealthy = _unhealthy_line(proc)
        assert "ledger sink failing inserts for " in unhealthy, unhealthy
        _healthy(cm_env)


def _query_through(env: dict[str, str], sql: str) -> list[list[Any]]:
    proc = callmeter(env, "sql", "--format", "json", sql)
    return [list(row.values()) for row in json.loads(proc.stdout)]


def test_status_with_the_broker_away_is_one_line_and_quick(cm_env: dict[str, str]) -> None:
    env = dict(cm_env, CALLMETER_KAFKA=f"127.0.0.1:{free_port(1)}")  # nothing listens there
    started = time.monotonic()
    proc = callmeter(env, "status", check=False, timeout=120)
    took = time.monotonic() - started
    assert proc.returncode == 1 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        f"callmeter: error: Kafka at {env['CALLMETER_KAFKA']} did not answer within 5 s"
    )
    assert took < 20, took
