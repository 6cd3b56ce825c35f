"""Simulated gateways report finished calls only (docs/decisions.md, "Future-dated events")."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

from pipeline.commands.simulate import SimulationConfig, generate


def test_calls_that_would_end_after_now_are_left_out_and_earlier_ones_kept() -> None:
    now = datetime(2026, 10, 15, tzinfo=UTC)
    every = [e for e in generate(SimulationConfig(calls=400)) if e["type"] == "call"]
    so_far = [e for e in generate(SimulationConfig(calls=400, now=now)) if e["type"] == "call"]
    assert so_far
    assert all(datetime.fromisoformat(e["ended_at"]) <= now for e in so_far)
    assert {e["event_id"] for e in so_far} == {
        e["event_id"] for e in every if datetime.fromisoformat(e["ended_at"]) <= now
    }


def test_a_month_that_has_not_started_is_refused_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "simulate", "--month", "2999-01", "--out", "/dev/null"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "callmeter: error: --month 2999-01 has not started yet: simulated calls end before now\n"
    )
