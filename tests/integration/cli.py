"""Run the real `callmeter` command line in a subprocess, as operators and scripts do."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

EXAMPLES = Path(__file__).resolve().parents[1] / "fixtures" / "examples"


def callmeter(
    env: dict[str, str], *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"callmeter {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    return proc


def ledger_report(env: dict[str, str]) -> dict[str, Any]:
    return json.loads(callmeter(env, "ledger").stdout)


def worker_stats(env: dict[str, str]) -> dict[str, Any]:
    return json.loads(callmeter(env, "worker", "--until-idle").stdout.strip().splitlines()[-1])


def comparable(invoice: dict[str, Any]) -> dict[str, Any]:
    """Every field but description and generated_at (the examples' README)."""
    out = {k: v for k, v in invoice.items() if k != "generated_at"}
    out["lines"] = [{k: v for k, v in line.items() if k != "description"} for line in invoice["lines"]]
    return out


def read_invoices(directory: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}
