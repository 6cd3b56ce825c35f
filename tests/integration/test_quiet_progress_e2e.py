"""A new user's runs are quiet and honest: no library noise or escape codes in logs, repeated warnings
summarised, progress on a terminal only, and a demo whose output reads one way."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.integration.cli import callmeter

pytestmark = pytest.mark.integration


# -- quiet logs, progress on a terminal only -----------------------------------------------------------


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
