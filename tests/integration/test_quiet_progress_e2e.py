"""A new user's runs are quiet and honest: no library noise or escape codes in logs, repeated warnings
summarised, progress on a terminal only, and a demo whose output reads one way."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.integration.cli import EXAMPLES, callmeter, delete_topics

pytestmark = pytest.mark.integration


# -- the demo ------------------------------------------------------------------------------------------


def test_the_demo_prints_no_python_reprs(cm_env: dict[str, str]) -> None:
    proc = callmeter(cm_env, "demo", "--calls", "120", "--tenants", "2")
    assert "{'" not in proc.stdout and "Traceback" not in proc.stderr, proc.stdout
    prefix = cm_env["CALLMETER_TOPIC_PREFIX"]
    assert f"-> published {prefix}calls=" in proc.stdout
    assert "\nduplicates dropped this run: " in proc.stdout
    assert "\x1b[" not in proc.stderr


def test_examples_readme_walk_has_no_traceback(cm_env: dict[str, str], tmp_path: Path) -> None:
    """The README's commands on the shipped examples: each prints what it did, nothing alarming."""
    env = dict(cm_env, CALLMETER_CATALOG=str(EXAMPLES / "catalog.yaml"))
    for args in (
        ("produce", str(EXAMPLES / "events.jsonl")),
        ("worker", "--until-idle"),
        ("invoice", "--period", "2026-11", "--out", str(tmp_path / "inv")),
        ("ledger",),
        ("consume", "alerts", "--max", "1"),
    ):
        proc = callmeter(env, *args)
        assert proc.stdout.strip(), args
        assert "Traceback" not in proc.stderr, (args, proc.stderr)
        assert "\x1b[" not in proc.stderr, args
    assert os.listdir(tmp_path / "inv")


# -- quiet logs, progress on a terminal only -----------------------------------------------------------

NOISE = (
    "\x1b[",  # Faust's spinner: cursor escape codes in a log file
    "\b",
    "Invalid state transition",
    "Error in recovery",
    "Has not committed",
    "Heartbeat failed",
    "is not assigned",
    "Traceback",
    "worker: events consumed",  # progress belongs on a terminal only
)


def test_a_two_process_run_logs_nothing_alarming_and_summarises_copies_in_the_ledger(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    env = dict(cm_env, CALLMETER_WORKER_PROCESSES="2", CALLMETER_CATALOG=str(EXAMPLES / "catalog.yaml"))
    callmeter(env, "produce", str(EXAMPLES / "events.jsonl"))
    first = callmeter(env, "worker", "--until-idle")
    # A fresh cluster under the same ledger: every event comes again, from other offsets (reversed
    # order), and the ledger holds it already. (At the same offsets they would be a redelivery.)
    delete_topics(env)
    for state in ("worker", "worker-1"):
        shutil.rmtree(Path(env["CALLMETER_DATA_DIR"]) / state, ignore_errors=True)
    again = tmp_path / "reversed.jsonl"
    again.write_text("".join(reversed((EXAMPLES / "events.jsonl").read_text().splitlines(keepends=True))))
    callmeter(env, "produce", str(again))
    second = callmeter(env, "worker", "--until-idle")
    for proc in (first, second):
        for noise in NOISE:
            assert noise not in proc.stderr, (noise, proc.stderr[-3000:])
    copies = sum(json.loads(second.stdout.splitlines()[-1])["duplicates_in_ledger"].values())
    summaries = [line for line in second.stderr.splitlines() if "already in the ledger" in line]
    counted = [re.search(r"WARNING sinks\.sink: (\d+) events? already in the ledger", s) for s in summaries]
    assert all(counted), summaries
    assert sum(int(m.group(1)) for m in counted if m) == copies > len(summaries) > 0


def on_a_terminal(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run `callmeter` with stderr on a pseudo-terminal (stdout a pipe); returns code, stdout, stderr."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args], env=env, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    out, _ = proc.communicate(timeout=300)
    reader.join(30)
    os.close(master)
    return proc.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


def test_long_commands_show_progress_on_a_terminal_only(cm_env: dict[str, str], tmp_path: Path) -> None:
    events = tmp_path / "month.jsonl"
    callmeter(
        cm_env, "simulate", "--tenants", "2", "--calls", "3000", "--month", "2026-10", "--out", str(events)
    )

    code, out, err = on_a_terminal(cm_env, "produce", str(events))
    assert code == 0 and "calls=" in out
    assert re.search(r"checking: [\d.]+/[\d.]+ MB \(100 %\), [\d.]+ MB/s", err), err
    assert re.search(r"producing: ([\d,]+)/\1 events \(100 %\), [\d,]+ events/s, ETA 0:00", err), err
    assert err.endswith("\r\x1b[K")  # the line erases itself: the terminal is left clean

    code, out, err = on_a_terminal(cm_env, "worker", "--until-idle")
    assert code == 0 and json.loads(out.splitlines()[-1])["rated"] > 0
    assert re.search(r"worker: events consumed: [\d,]+/[\d,]+ events", err), err

    code, out, err = on_a_terminal(cm_env, "invoice", "--period", "2026-10", "--out", str(tmp_path / "inv"))
    assert code == 0 and out.count(".json  ") == 2
    assert re.search(r"rating calls: ([\d,]+)/\1 calls \(100 %\)", err), err
