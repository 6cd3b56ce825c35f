"""An analyst's `callmeter sql` never stalls billing: while a worker runs (its sink holds the embedded
ledger and serves the queries), a refused statement, an unbounded query and a query past its time or
memory limit leave the sink writing, and every error speaks of the query the analyst wrote."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.integration.cli import BackgroundWorker, callmeter
from tests.integration.eventfiles import call, prov, write_events

pytestmark = pytest.mark.integration


def _rated(env: dict[str, str]) -> int:
    proc = callmeter(env, "sql", "SELECT count() AS n FROM rated_calls", "--format", "json")
    return int(json.loads(proc.stdout)[0]["n"])


def _send_calls(env: dict[str, str], tmp_path: Path, batch: str, n: int) -> None:
    events = [call(f"{batch}-{i}", "acme", f"2026-10-05T10:{i:02d}:00Z", 60) for i in range(n)]
    callmeter(env, "produce", str(write_events(tmp_path / f"{batch}.jsonl", events)))


def _wait_rated(env: dict[str, str], expected: int, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (got := _rated(env)) != expected:
        assert time.monotonic() < deadline, f"{what}: {got} rated calls in the ledger, expected {expected}"
        time.sleep(1)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _one_error_line(proc: object) -> str:
    stderr = proc.stderr  # type: ignore[attr-defined]
    assert proc.returncode == 1, (proc.returncode, stderr)  # type: ignore[attr-defined]
    assert stderr.count("\n") == 1 and stderr.startswith("callmeter: error: "), stderr
    return str(stderr)


def test_queries_never_stall_the_sink(cm_env: dict[str, str], tmp_path: Path) -> None:
    sub = prov(
        "s", "acme", "2026-10-01T00:00:00Z", "SUBSCRIPTION_STARTED", plan_id="starter", tax_region="NONE"
    )
    callmeter(cm_env, "produce", str(write_events(tmp_path / "sub.jsonl", [sub])))
    _send_calls(cm_env, tmp_path, "a", 10)
    announced = Path(cm_env["CALLMETER_DATA_DIR"]) / "clickhouse.query.json"
    with BackgroundWorker(cm_env):
        _wait_rated(cm_env, 10, "before any query")
        holder = int(json.loads(announced.read_text())["pid"])

        # Refused by ClickHouse; the sink's own session is untouched and the next batch is written.
        err = _one_error_line(callmeter(cm_env, "sql", "DROP TABLE invoices", check=False))
        assert "refused: the ledger is read-only" in err, err
        _send_calls(cm_env, tmp_path, "b", 10)
        _wait_rated(cm_env, 20, "after a refused DROP")

        # Unbounded: the default row limit stops it at once, the rows it printed are the first 10000.
        rss_before = _rss_mb(holder)
        started = time.monotonic()
        proc = callmeter(cm_env, "sql", "SELECT number FROM system.numbers", check=False, timeout=120)
        took = time.monotonic() - started
        err = _one_error_line(proc)
        assert "more than 10000 rows" in err and "--max-rows" in err, err
        lines = proc.stdout.splitlines()
        assert lines[0].strip() == "number" and lines[2].strip() == "0" and lines[-2].strip() == "9999"
        assert lines[-1] == "(10000 rows, more not shown)", lines[-1]
        assert len(lines) == 10003
        assert took < 30, took
        assert _rss_mb(holder) - rss_before < 500, (rss_before, _rss_mb(holder))
        _send_calls(cm_env, tmp_path, "c", 10)
        _wait_rated(cm_env, 30, "after an unbounded query")

        # Limits raised or lifted by flags; every format streams.
        unbounded = "SELECT number FROM system.numbers"
        proc = callmeter(cm_env, "sql", "--max-rows", "3", "--format", "json", unbounded, check=False)
        assert "more than 3 rows" in _one_error_line(proc)
        assert json.loads(proc.stdout) == [{"number": 0}, {"number": 1}, {"number": 2}]
        proc = callmeter(
            cm_env, "sql", "--max-rows", "0", "--format", "csv", "SELECT number FROM numbers(25000)"
        )
        assert proc.stdout.splitlines() == ["number", *map(str, range(25000))]
        proc = callmeter(cm_env, "sql", "--max-rows", "25000", "SELECT number FROM numbers(25000)")
        assert proc.stdout.splitlines()[-1] == "(25000 rows)"

        # Time and memory: ClickHouse stops the query, with the flag to raise in the message.
        started = time.monotonic()
        proc = callmeter(
            cm_env, "sql", "--max-seconds", "2", "SELECT count() FROM numbers(1000000000000)", check=False
        )
        err = _one_error_line(proc)
        assert "2 s" in err and "--max-seconds" in err, err
        assert time.monotonic() - started < 30
        proc = callmeter(
            cm_env, "sql", "--max-memory-mb", "20", "SELECT groupArray(number) FROM numbers(50000000)",
            check=False,
        )  # fmt: skip
        err = _one_error_line(proc)
        assert "memory" in err and "--max-memory-mb" in err, err
        _send_calls(cm_env, tmp_path, "d", 10)
        _wait_rated(cm_env, 40, "after queries stopped by their time and memory limits")

        # Errors quote only what the analyst wrote.
        for query, expected in (
            ("SELECT 1 FROM", "failed at position 14 (end of query)"),
            ("SELEC 1", "failed at position 7 (1)"),
            ("SELECT count() FROM rated_calls WHERE", "failed at position 38 (end of query)"),
            ("SELECT nope FROM rated_calls", "nope"),
        ):
            err = _one_error_line(callmeter(cm_env, "sql", query, check=False))
            assert expected in err, err
            for foreign in ("SETTINGS readonly", "readonly", "FORMAT Native", "formatQuery"):
                assert foreign not in err, err
        for query in ("SET readonly = 0", "SELECT 1; DROP TABLE invoices", "SELECT 1 SETTINGS readonly = 0"):
            _one_error_line(callmeter(cm_env, "sql", query, check=False))
        _send_calls(cm_env, tmp_path, "e", 10)
        _wait_rated(cm_env, 50, "after the refused and malformed queries")
