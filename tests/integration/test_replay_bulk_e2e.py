"""Replay's bulk path writes exactly the rows the stream wrote, but for the catalog revision."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.integration.cli import EXAMPLES, callmeter, ledger_report, worker_stats
from tests.integration.test_replay_e2e import ALL_NOVEMBER, rev2

pytestmark = pytest.mark.integration

TABLE = """\
tenant          period        old subtotal  new subtotal   difference
---------------------------------------------------------------------
acme            2026-10-01           49.00         49.00         0.00
acme            2026-11-01           69.52         72.52        +3.00
bolt            2026-11-15          204.00        204.00         0.00
dime            2026-11-01           19.00         19.00         0.00
---------------------------------------------------------------------
total                                                           +3.00
(subtotals: amounts before tax, as carried by the adjustment on the next invoice)
"""


def _rows(env: dict[str, str], revision: int) -> list[dict[str, Any]]:
    query = (
        "SELECT * EXCEPT (catalog_revision, rated_at) FROM rated_calls FINAL "
        f"WHERE catalog_revision = {revision} ORDER BY tenant_id, event_id"
    )
    return list(json.loads(callmeter(env, "sql", query, "--format", "json").stdout))


def test_replay_rows_are_the_stream_rows_under_the_new_revision(
    cm_env: dict[str, str], tmp_path: Path
) -> None:
    callmeter(cm_env, "produce", str(EXAMPLES / "events.jsonl"))
    worker_stats(cm_env)
    before = ledger_report(cm_env)
    catalog = rev2(tmp_path)

    # Both sources see the same calls and print the same money, to the cent.
    for source in ("kafka", "ledger"):
        dry = callmeter(
            cm_env, "--catalog", catalog, "replay", *ALL_NOVEMBER, "--source", source, "--dry-run"
        )
        assert dry.stdout == TABLE, source
    assert ledger_report(cm_env) == before

    # Written from the ledger in batches of 2 calls (several inserts, each with its own token)...
    proc = callmeter(
        cm_env, "--catalog", catalog, "replay", *ALL_NOVEMBER, "--source", "ledger", "--batch-size", "2"
    )
    assert proc.stdout == TABLE
    assert "replay: 8 calls read, rated and written in " in proc.stderr
    stream = _rows(cm_env, 1)
    assert len(stream) == 8 and _rows(cm_env, 2) == stream  # the same calls, periods, seconds, offsets
    after = ledger_report(cm_env)
    assert after["rated_calls"] == before["rated_calls"] * 2 == 16

    # ...and again from Kafka in one batch: nothing more is counted, the rows are the same.
    callmeter(cm_env, "--catalog", catalog, "replay", *ALL_NOVEMBER, "--source", "kafka")
    assert ledger_report(cm_env)["rated_calls"] == 16
    assert _rows(cm_env, 2) == stream


def test_a_batch_size_below_one_is_refused_in_one_line(cm_env: dict[str, str]) -> None:
    proc = callmeter(cm_env, "replay", *ALL_NOVEMBER, "--batch-size", "0", check=False)
    # A bad flag is a usage error: exit 2, one line (docs/decisions.md, "Exit codes").
    assert proc.returncode == 2
    assert (
        proc.stderr
        == "callmeter: error: argument --batch-size: must be at least 1, not 0 (see callmeter --help)\n"
    )
